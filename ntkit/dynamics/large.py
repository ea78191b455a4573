"""The t = inf limit of MSE gradient flow -- kernel (ridge) regression -- at large n, by ntkit.solvers."""

from __future__ import annotations

from typing import Any

import torch

from ..solvers import kernel_ridge
from ..solvers._common import as_inputs, as_targets
from .mse import Prediction

__all__ = ["kernel_regression"]


def kernel_regression(kernel: Any, x_train: Any, y_train: Any, x_test: Any = None, *, diag_reg: float = 0.0,
                      diag_reg_absolute_scale: bool = False, f0_train: Any = None, f0_test: Any = None,
                      solver: str = "auto", get: str = "ntk", **options: Any) -> Prediction:
    """Predictions at t = inf of MSE gradient flow with the kernel, without the n x n eigendecomposition.

    Gradient flow with the (regularized) kernel K_r = K + lambda I converges to kernel ridge regression
    (Jacot et al. 2018, Sec. 5; Lee et al. 2019, Eq. (9) at t = inf):

        f_test(inf) = f0_test + k(X_test, X) K_r^{-1} (y - f0_train),   f_train(inf) = f0_train + K_r K_r^{-1} (y - f0_train),

    the values ``gradient_descent_mse(K, y, diag_reg=...).predict(inf, k_test_train)`` gives, here solved
    with :func:`ntkit.solvers.kernel_ridge` (``solver="auto"|"cholesky"|"cg"|"nystrom"|"features"``; the last
    two solve the Nystrom / random-feature approximation of the problem, and their train predictions are
    the fitted values of that model).

    Parameters
    ----------
    kernel : ntkit.KernelFunction or ntkit.Architecture (``get`` picks "ntk" or "nngp")
    x_train, y_train, x_test : inputs and targets ((n,) or (n, k))
    diag_reg, diag_reg_absolute_scale : lambda = diag_reg * trace(K) / n, or diag_reg (as the dynamics)
    f0_train, f0_test : outputs at initialization (default 0, the ensemble mean)
    solver, **options : see :func:`ntkit.solvers.kernel_ridge` (n_centers, n_components, tol, max_iter,
        random_state, memory_budget, progress)

    Returns
    -------
    Prediction(train, test), each (n, k) or (n,) like ``y_train``; ``test`` None without ``x_test``.
    """
    xt = as_inputs(x_train, "x_train", dtype=options.pop("dtype", None), device=options.pop("device", None))
    y, one_d = as_targets(y_train, xt.shape[0], dtype=xt.dtype, device=xt.device)
    f0 = torch.zeros_like(y) if f0_train is None else as_targets(f0_train, xt.shape[0], dtype=xt.dtype,
                                                                  device=xt.device)[0]
    if f0_test is not None and x_test is None:
        raise ValueError("f0_test was given but no x_test; pass both or neither")
    sol = kernel_ridge(kernel, xt, y - f0, diag_reg=diag_reg, diag_reg_absolute_scale=diag_reg_absolute_scale,
                       solver=solver, get=get, dtype=xt.dtype, **options)
    train = f0 + sol.predict(xt)
    if sol.solver in ("cholesky", "cg") and sol.lam:
        train = train + sol.lam * sol.coef  # the regularized kernel K + lambda I acts on the training set
    test = None
    if x_test is not None:
        xs = as_inputs(x_test, "x_test", dtype=xt.dtype, device=xt.device)
        test = sol.predict(xs)
        if f0_test is not None:
            test = test + as_targets(f0_test, xs.shape[0], dtype=xt.dtype, device=xt.device)[0]
    if one_d:
        train = train[:, 0]
        test = None if test is None else test[:, 0]
    return Prediction(train, test)
