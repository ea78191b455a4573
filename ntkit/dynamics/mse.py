"""Closed-form training dynamics for the mean-squared-error loss (gradient flow and gradient descent).

In the linearized / infinite-width regime, gradient descent on ``L = (1/m) sum_ij (f_ij - y_ij)^2 / 2``
moves the network function by the kernel (Jacot et al. 2018, Sec. 5; Lee et al. 2019, Eqs. (8)-(9)):

    gradient flow:     df/dt      = -(eta / m) K (f - y)
    gradient descent:  f_{s+1}    = f_s - (eta / m) K (f_s - y)
    heavy ball:        f_{s+1}    = f_s - (eta / m) K (f_s - y) + beta (f_s - f_{s-1})
    heavy-ball flow:   f''        = -(1 - beta) f' - (eta / m) K (f - y)     (t in steps, f'(0) = 0)

With ``K = V diag(lambda) V^T`` (one eigendecomposition, cached) every mode of the residual decays
independently, r_i(t) = rho(lambda_i, t) r_i(0) with rho = exp(-c lambda t) (flow),
(1 - c lambda)^s (descent), the heavy-ball recurrence or a damped oscillator, c = eta / m, and the test
predictions are

    f*(t) = f*(0) + K*  V diag((1 - rho(lambda, t)) / lambda) V^T (y - f(0)),

(Lee et al. 2019, Eq. (9)), which at t = infinity is kernel regression K* K^{-1} (y - f(0)).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch

from .._linalg import symmetric_eigh
from ._common import (TrainedTargets, check_rate, normalization_constant, regularize, resolve_kernel, square_kernel,
                      targets, times, to_tensor)

__all__ = ["MSEPredictor", "Prediction", "EigenView", "gradient_descent_mse", "max_learning_rate"]


class Prediction(NamedTuple):
    """Predictions on the training and test points; ``(T, n, k)`` for T times, ``(n, k)`` for one time
    (``(T, n)`` / ``(n,)`` for 1-d targets); ``test`` is None when no test kernel was given."""

    train: torch.Tensor
    test: torch.Tensor | None


class EigenView(NamedTuple):
    """The residual in the kernel's eigenbasis (Jacot et al. 2018, Sec. 5).

    eigenvalues : (n,) eigenvalues lambda_i of the (regularized) train-train kernel, descending
    eigenvectors : (n, n) columns v_i
    rates : (n,) decay rates c * lambda_i (per unit time; per step for gradient descent), c = eta / m
    projections : (n, k) <v_i, y - f(0)>, the initial residual per mode
    decay : (T, n) rho(lambda_i, t): exp(-c lambda_i t), (1 - c lambda_i)^t, or the heavy-ball factor
    residual : (T, n, k) decay[..., None] * projections, the residual per mode at each time
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    rates: torch.Tensor
    projections: torch.Tensor
    decay: torch.Tensor
    residual: torch.Tensor


class MSEPredictor(TrainedTargets):
    """Closed-form MSE training dynamics of a kernel machine (see :func:`gradient_descent_mse`)."""

    def __init__(self, k_train_train: Any, y_train: Any, *, learning_rate: float = 1.0, diag_reg: float = 0.0,
                 diag_reg_absolute_scale: bool = False, loss_normalization: Any = "mean",
                 discrete: bool = False, momentum: float | None = None, x_train: Any = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        k, self.kernel_fn = resolve_kernel(k_train_train, x_train, "k_train_train", dtype=dtype, device=device)
        if dtype is None and k.dtype != torch.float32:
            k = k.to(torch.float64)
        self.x_train = x_train
        self.dtype, self.device = k.dtype, k.device
        self.n = k.shape[0]
        self.y_train, self._y_1d = targets(y_train, self.n, dtype=k.dtype, device=k.device)
        self.learning_rate = check_rate(learning_rate, "learning_rate")
        self.discrete = bool(discrete)
        self.heavy_ball = momentum is not None
        self.momentum = 0.0 if momentum is None else check_rate(momentum, "momentum", allow_zero=True)
        if self.momentum >= 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.m = normalization_constant(loss_normalization, self.n, self.y_train.shape[1])
        self.c = self.learning_rate / self.m
        self.k_train_train = k
        kr, self.diag_reg = regularize(k, diag_reg, diag_reg_absolute_scale)
        lam, vec = symmetric_eigh(kr, overwrite=kr is not k)  # kr is our own copy when regularized
        lam, vec = lam.flip(0), vec.flip(1)
        self.eigenvalues, self.eigenvectors = lam, vec
        lmax = float(lam.abs().max()) if self.n else 0.0
        self._tol = max(self.n, 1) * torch.finfo(k.dtype).eps * lmax
        if float(lam.min()) < -100 * self._tol:
            warnings.warn(f"k_train_train has a negative eigenvalue {float(lam.min()):.3g} (largest {lmax:.3g}); "
                          "it is not positive semi-definite. Negative eigenvalues are clipped to 0.",
                          RuntimeWarning, stacklevel=3)
        self._lam = lam.clamp_min(0.0)
        self._small = self._lam <= self._tol

    # ---------------------------------------------------------------- per-mode factors
    def _decay(self, t: torch.Tensor) -> torch.Tensor:
        """rho(lambda, t), shape (T, n)."""
        a = self.c * self._lam
        out = []
        for ti in t.tolist():
            if math.isinf(ti):
                if self.discrete and bool((a[~self._small] >= 2 * (1 + self.momentum)).any()):
                    limit = 2 * (1 + self.momentum) * self.m / float(self._lam.max())
                    raise ValueError(f"learning_rate={self.learning_rate} is above the stability limit {limit:.6g} "
                                     "(max_learning_rate); gradient descent diverges, so t = inf has no limit.")
                out.append(torch.where(self._small, torch.ones_like(a), torch.zeros_like(a)))
            elif not self.discrete and self.heavy_ball:
                out.append(self._heavy_ball_flow(a, ti))
            elif not self.discrete:
                out.append(torch.exp(-a * ti))
            elif self.momentum == 0:
                out.append(torch.pow(1 - a, ti))
            else:
                out.append(self._heavy_ball(a, int(ti)))
        return torch.stack(out) if out else a.new_zeros((0, self.n))

    def _heavy_ball(self, a: torch.Tensor, s: int) -> torch.Tensor:
        """r_s / r_0 for r_{j+1} = (1 + beta - a) r_j - beta r_{j-1}, r_{-1} = r_0 (start at rest)."""
        if s == 0:
            return torch.ones_like(a)
        b = self.momentum
        mat = torch.zeros(a.shape[0], 2, 2, dtype=a.dtype, device=a.device)
        mat[:, 0, 0] = 1 + b - a
        mat[:, 0, 1] = -b
        mat[:, 1, 0] = 1
        p = torch.linalg.matrix_power(mat, s - 1)
        r1 = 1 - a
        return p[:, 0, 0] * r1 + p[:, 0, 1]

    def _heavy_ball_flow(self, a: torch.Tensor, t: float) -> torch.Tensor:
        """r(t) / r(0) for r'' + gamma r' + a r = 0, r'(0) = 0, gamma = 1 - beta (damped oscillator):
        e^{-gamma t/2} [cosh(d t) + (gamma/2) sinh(d t)/d], d = sqrt(gamma^2/4 - a) (cos/sin when imaginary)."""
        g2 = (1 - self.momentum) / 2
        disc = g2 * g2 - a
        over = disc >= 0
        d = torch.sqrt(disc.clamp_min(0))
        nu = torch.sqrt((-disc).clamp_min(0))
        damp = math.exp(-g2 * t)
        # overdamped: split into exponentials that cannot overflow (g2 - d = a / (g2 + d) >= 0)
        ea = torch.exp(-(a / (g2 + d)) * t)
        eb = torch.exp(-(g2 + d) * t)
        x = d * t
        sinhc = torch.where(x > 1e-8, torch.sinh(x.clamp_max(1.0)) / x.clamp_min(1e-8), torch.ones_like(x))
        sinh_over_d = torch.where(x > 1.0, (ea - eb) / (2 * d.clamp_min(1e-300)), damp * t * sinhc)
        rho_over = 0.5 * (ea + eb) + g2 * sinh_over_d
        y = nu * t
        sinc = torch.where(y > 1e-8, torch.sin(y) / y.clamp_min(1e-8), torch.ones_like(y))
        rho_under = damp * (torch.cos(y) + g2 * t * sinc)
        return torch.where(over, rho_over, rho_under)

    def _gain(self, t: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        """(1 - rho) / lambda, with its limit on (near-)zero modes; shape (T, n)."""
        lam = torch.where(self._small, torch.ones_like(self._lam), self._lam)
        g = (1 - rho) / lam
        if not self.discrete and not self.heavy_ball and rho.numel():
            # accurate form for small c*lambda*t
            g = -torch.expm1(-self.c * self._lam[None, :] * torch.where(torch.isinf(t), 0 * t, t)[:, None]) / lam
            g = torch.where(torch.isinf(t)[:, None], 1 / lam.expand_as(g), g)
        limit = []
        b = self.momentum
        for ti in t.tolist():
            if math.isinf(ti):
                limit.append(0.0)  # pseudo-inverse: drop null modes of the kernel
            elif self.discrete:
                limit.append(self.c / (1 - b) * (ti - b * (1 - b ** ti) / (1 - b)))
            elif not self.heavy_ball:
                limit.append(self.c * ti)
            else:  # heavy-ball flow with a = 0: f' = -c r0 (1 - e^{-gamma t}) / gamma
                gam = 1 - b
                limit.append(self.c * (ti / gam + math.expm1(-gam * ti) / gam**2))
        lim = torch.as_tensor(limit, dtype=g.dtype, device=g.device)[:, None].expand_as(g)
        return torch.where(self._small[None, :], lim, g)

    # ---------------------------------------------------------------- public
    def predict(self, t: Any, k_test_train: Any = None, f0_train: Any = None, f0_test: Any = None, *,
                x_test: Any = None) -> Prediction:
        """Train and test predictions at time(s) ``t``.

        Parameters
        ----------
        t : float or array of floats >= 0 (may contain ``inf``)
            Continuous time (gradient flow) or number of steps (``discrete=True``).
            ``t = inf`` gives kernel (ridge) regression ``K* K_r^{-1} (y - f0_train) + f0_test``.
        k_test_train : (n_test, n_train) kernel between test and training inputs, optional
        f0_train, f0_test : (n, k) network outputs at initialization (default 0: the ensemble mean);
            ``f0_test`` needs a test kernel (``k_test_train`` or ``x_test``), else a ValueError
        x_test : test inputs, when the predictor was built from a kernel function

        Returns
        -------
        Prediction(train, test)
        """
        tt, scalar = times(t, discrete=self.discrete, dtype=self.dtype, device=self.device)
        ks = self._test_kernel(k_test_train, x_test)
        if ks is None and f0_test is not None:
            raise ValueError("f0_test was given but no test kernel: pass k_test_train (or x_test) together with "
                             "f0_test, or drop f0_test (there are no test predictions without a test kernel).")
        f0 = self._f0(f0_train, self.n, "f0_train")
        r0 = self.y_train - f0
        p = self.eigenvectors.T @ r0
        rho = self._decay(tt)
        if bool(torch.isinf(tt).any()) and bool(self._small.any()):
            warnings.warn(f"the train-train kernel is singular ({int(self._small.sum())} eigenvalue(s) <= "
                          f"{self._tol:.3g}); t = inf uses the pseudo-inverse (minimum-norm interpolant). "
                          "Pass diag_reg > 0 for ridge regression.", RuntimeWarning, stacklevel=2)
        train = self.y_train[None] - torch.einsum("ij,tjk->tik", self.eigenvectors, rho[:, :, None] * p[None])
        test = None
        if ks is not None:
            f0t = self._f0(f0_test, ks.shape[0], "f0_test")
            kv = ks @ self.eigenvectors
            g = self._gain(tt, rho)
            test = f0t[None] + torch.einsum("ij,tjk->tik", kv, g[:, :, None] * p[None])
        return Prediction(self._shape(train, scalar), None if test is None else self._shape(test, scalar))

    def eigen_view(self, t: Any, f0_train: Any = None) -> EigenView:
        """Residual projections on the kernel eigenvectors and their decay (Jacot et al. 2018, Sec. 5).

        Mode i converges on the time scale 1 / rates[i]; modes with small eigenvalues (rough functions,
        often noise) are learned last, which is the basis of early stopping.
        """
        tt, _ = times(t, discrete=self.discrete, dtype=self.dtype, device=self.device)
        r0 = self.y_train - self._f0(f0_train, self.n, "f0_train")
        p = self.eigenvectors.T @ r0
        rho = self._decay(tt)
        return EigenView(self.eigenvalues, self.eigenvectors, self.c * self._lam, p, rho, rho[:, :, None] * p[None])

    # ---------------------------------------------------------------- helpers
    def _test_kernel(self, k_test_train, x_test):
        if x_test is not None:
            if self.kernel_fn is None:
                raise ValueError("x_test needs a predictor built from a kernel function; pass k_test_train instead.")
            if k_test_train is not None:
                raise ValueError("pass either k_test_train or x_test, not both")
            k_test_train = self.kernel_fn(x_test, self.x_train)
        if k_test_train is None:
            return None
        ks = to_tensor(k_test_train, "k_test_train", dtype=self.dtype, device=self.device)
        if ks.shape[1] != self.n:
            raise ValueError(f"k_test_train has shape {tuple(ks.shape)}; its second dimension must be the number "
                             f"of training points {self.n}.")
        return ks

    def __repr__(self):
        kind = "gradient descent" if self.discrete else "gradient flow"
        return (f"MSEPredictor({kind}, n_train={self.n}, outputs={self.y_train.shape[1]}, "
                f"learning_rate={self.learning_rate}, m={self.m}, momentum={self.momentum}, diag_reg={self.diag_reg})")


def gradient_descent_mse(k_train_train: Any, y_train: Any, *, learning_rate: float = 1.0, diag_reg: float = 0.0,
                         diag_reg_absolute_scale: bool = False, loss_normalization: Any = "mean",
                         discrete: bool = False, momentum: float | None = None, x_train: Any = None,
                         dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> MSEPredictor:
    """Closed-form predictions of a network (or kernel machine) trained on MSE (Lee et al. 2019, Eq. (9)).

    Parameters
    ----------
    k_train_train : (n, n) tensor/array, or a kernel function
        The NTK (or any PSD kernel) of the training inputs; a :class:`ntkit.KernelFunction` (e.g.
        ``arch.kernel_fn("ntk")``) or any callable ``k(x1, x2=None)`` together with ``x_train``.
    y_train : (n, k) or (n,) targets
    learning_rate : float
        eta. Time ``t`` is measured so that a step of gradient descent advances it by 1.
    diag_reg : float
        Ridge: the kernel becomes K + eps I with eps = diag_reg * trace(K) / n (neural-tangents
        convention) or eps = diag_reg if ``diag_reg_absolute_scale``. Used at all times.
    loss_normalization : "mean" | "sample_mean" | "sum" | float
        L = (1/m) sum_ij (f_ij - y_ij)^2 / 2 with m = n*k ("mean", default, as neural-tangents),
        n, 1 or the number given. The flow is df/dt = -(eta/m) K (f - y).
    discrete : bool
        False: gradient flow (t continuous). True: gradient descent with step eta (t = number of steps).
    momentum : float in [0, 1), optional
        None (default): plain gradient flow / descent. A number: heavy-ball momentum beta (Polyak 1964),
        starting at rest. ``discrete=True``: the
        torch.optim.SGD(momentum=beta) recurrence f_{s+1} = f_s - (eta/m) K (f_s - y) + beta (f_s - f_{s-1});
        ``discrete=False``: its continuum limit (t in steps) f'' + (1 - beta) f' = -(eta/m) K (f - y), solved
        per mode as a damped oscillator. Note that ``momentum=0.0`` is *not* the same as ``momentum=None``
        for ``discrete=False``: it selects this second-order heavy-ball flow f'' + f' = -(eta/m) K (f - y)
        (starting at rest, f'(0) = 0), not the first-order gradient flow f' = -(eta/m) K (f - y) of
        ``momentum=None``. (For ``discrete=True`` both give plain gradient descent.)
    dtype, device : default float64 and the kernel's device

    Returns
    -------
    MSEPredictor
        ``.predict(t, k_test_train=None, f0_train=None, f0_test=None)`` -> Prediction(train, test);
        ``.eigen_view(t)``. The eigendecomposition is computed once here; each time then costs O(n^2 k)
        plus O(n_test n k).

    Examples
    --------
    >>> pred = gradient_descent_mse(k_tt, y, learning_rate=1.0)         # doctest: +SKIP
    >>> pred.predict([0, 10, float("inf")], k_test_train=k_st).test     # doctest: +SKIP
    """
    return MSEPredictor(k_train_train, y_train, learning_rate=learning_rate, diag_reg=diag_reg,
                        diag_reg_absolute_scale=diag_reg_absolute_scale, loss_normalization=loss_normalization,
                        discrete=discrete, momentum=momentum, x_train=x_train, dtype=dtype, device=device)


def max_learning_rate(k_train_train: Any, *, n_outputs: int = 1, loss_normalization: Any = "mean",
                      momentum: float = 0.0, diag_reg: float = 0.0, diag_reg_absolute_scale: bool = False) -> float:
    """Largest stable learning rate of full-batch gradient descent on the MSE loss as normalized here.

    Mode i evolves as r <- (1 - eta lambda_i / m) r (plain) or by the heavy-ball recurrence
    r_{s+1} = (1 + beta - a) r_s - beta r_{s-1}, a = eta lambda_i / m, whose roots lie in the unit
    disk iff 0 < a < 2 (1 + beta) (Jury criterion; Lee et al. 2019, Sec. 2.4 for beta = 0). Hence

        eta_max = 2 (1 + beta) m / lambda_max.

    Gradient descent converges for eta < eta_max and diverges above it.

    Parameters
    ----------
    k_train_train : (n, n) kernel matrix
    n_outputs : int
        k, the number of outputs (enters m for loss_normalization="mean").
    loss_normalization, diag_reg, diag_reg_absolute_scale : as in :func:`gradient_descent_mse`
    momentum : float in [0, 1)
    """
    k = square_kernel(k_train_train, "k_train_train")
    if int(n_outputs) != n_outputs or n_outputs < 1:
        raise ValueError(f"n_outputs must be a positive integer, got {n_outputs!r}")
    beta = check_rate(momentum, "momentum", allow_zero=True)
    if beta >= 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    kr, _ = regularize(k, diag_reg, diag_reg_absolute_scale)
    m = normalization_constant(loss_normalization, k.shape[0], int(n_outputs))
    lmax = float(torch.linalg.eigvalsh(kr)[-1])
    if lmax <= 0:
        raise ValueError("the kernel has no positive eigenvalue; every learning rate is stable (nothing moves).")
    return 2 * (1 + beta) * m / lmax
