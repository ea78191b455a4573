"""Infinite ensembles of wide networks trained on MSE: Gaussian processes at every training time.

Lee et al. (2019), Sec. 2.3, Eqs. (14)-(16): with NNGP kernel K and NTK Theta, the outputs of an infinite
ensemble of infinitely wide networks trained by gradient flow on MSE (df/dt = -c Theta (f - y),
c = eta / m) are Gaussian at each time with

    mu(x, t)       = Theta(x, X) Theta^{-1} (I - e^{-c Theta t}) Y
    Sigma(x, x', t) = K(x, x') + A(x) K(X, X) A(x')^T - A(x) K(X, x') - K(x, X) A(x')^T,
    A(x) = Theta(x, X) Theta^{-1} (I - e^{-c Theta t}).

"NNGP" regime (only the last layer trained; Lee et al. 2019, Sec. 2.3.1): Theta is replaced by K, giving
Sigma = K(x,x') - K(x,X) K^{-1} (I - e^{-2 c K t}) K(X,x'). At t = infinity the NNGP regime is the exact GP
posterior and the NTK regime is the "NTK-GP" (not a Bayesian posterior).
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch

from ._common import check_symmetric, regularize, square_kernel, targets, to_tensor
from .mse import MSEPredictor

__all__ = ["GaussianPrediction", "EnsemblePredictor", "gradient_descent_mse_ensemble", "gp_inference",
           "ensemble_from_architecture"]


class GaussianPrediction(NamedTuple):
    """Mean ``(T, n_test, k)`` (``(n_test, k)`` for one time) and covariance ``(T, n_test, n_test)``
    (or ``(T, n_test)`` variances with ``diagonal=True``) shared by every output column; cov is None when
    not requested."""

    mean: torch.Tensor
    cov: torch.Tensor | None


class EnsemblePredictor:
    """Mean and covariance of an infinite ensemble at any time (see :func:`gradient_descent_mse_ensemble`)."""

    def __init__(self, y_train: Any, nngp_train_train: Any, nngp_test_train: Any, nngp_test_test: Any = None, *,
                 ntk_train_train: Any = None, ntk_test_train: Any = None, learning_rate: float = 1.0,
                 diag_reg: float = 0.0, diag_reg_absolute_scale: bool = False, loss_normalization: Any = "mean",
                 discrete: bool = False, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        dt = dtype or torch.float64
        kxx = square_kernel(nngp_train_train, "nngp_train_train", dtype=dt, device=device)
        self.device = kxx.device
        n = kxx.shape[0]
        self.k_test_train = to_tensor(nngp_test_train, "nngp_test_train", dtype=dt, device=self.device)
        if self.k_test_train.shape[1] != n:
            raise ValueError(f"nngp_test_train has shape {tuple(self.k_test_train.shape)}; need (n_test, {n})")
        nt = self.k_test_train.shape[0]
        self.k_test_test = None
        if nngp_test_test is not None:
            ktt = to_tensor(nngp_test_test, "nngp_test_test", dtype=dt, device=self.device, ndim=(1, 2))
            if ktt.shape[0] != nt or (ktt.ndim == 2 and ktt.shape[1] != nt):
                raise ValueError(f"nngp_test_test has shape {tuple(ktt.shape)}; need ({nt}, {nt}) or ({nt},)")
            if ktt.ndim == 2:
                check_symmetric(ktt, "nngp_test_test", "test")
            self.k_test_test = ktt
        self.regime = "ntk" if ntk_train_train is not None else "nngp"
        kw = dict(learning_rate=learning_rate, diag_reg=diag_reg, diag_reg_absolute_scale=diag_reg_absolute_scale,
                  loss_normalization=loss_normalization, discrete=discrete, dtype=dt, device=self.device)
        if self.regime == "ntk":
            if ntk_test_train is None:
                raise ValueError("ntk_train_train was given without ntk_test_train")
            theta = square_kernel(ntk_train_train, "ntk_train_train", dtype=dt, device=self.device)
            if theta.shape != kxx.shape:
                raise ValueError(f"ntk_train_train has shape {tuple(theta.shape)} but nngp_train_train has shape "
                                 f"{tuple(kxx.shape)}; both are kernels of the same training set and must match.")
            self.theta_test_train = to_tensor(ntk_test_train, "ntk_test_train", dtype=dt, device=self.device)
            if self.theta_test_train.shape != self.k_test_train.shape:
                raise ValueError(f"ntk_test_train has shape {tuple(self.theta_test_train.shape)} but nngp_test_train "
                                 f"has shape {tuple(self.k_test_train.shape)}; both are kernels between the same "
                                 "test and training sets and must match.")
            self.dynamics = MSEPredictor(theta, y_train, **kw)
            self.k_train_train = kxx
        else:
            if ntk_test_train is not None:
                raise ValueError("ntk_test_train was given without ntk_train_train")
            self.theta_test_train = self.k_test_train
            self.dynamics = MSEPredictor(kxx, y_train, **kw)
            self.k_train_train, _ = regularize(kxx, diag_reg, diag_reg_absolute_scale)

    def predict(self, t: Any, *, compute_cov: bool = True, diagonal: bool = False) -> GaussianPrediction:
        """Mean and covariance of the test outputs at time(s) ``t`` (>= 0, ``inf`` allowed).

        t = 0 gives the prior (mean 0, covariance K(x, x')).
        """
        d = self.dynamics
        pred = d.predict(t, self.theta_test_train)
        mean = pred.test
        if not compute_cov:
            return GaussianPrediction(mean, None)
        if self.k_test_test is None:
            raise ValueError("the covariance needs nngp_test_test; pass it or use compute_cov=False")
        from ._common import times
        tt, scalar = times(t, discrete=d.discrete, dtype=d.dtype, device=d.device)
        if bool(torch.isinf(tt).any()) and bool(d._small.any()):
            warnings.warn("singular train-train kernel: t = inf uses the pseudo-inverse", RuntimeWarning,
                          stacklevel=2)
        g = d._gain(tt, d._decay(tt))  # (T, n)
        tv = self.theta_test_train @ d.eigenvectors  # (nt, n)
        kv = self.k_test_train @ d.eigenvectors
        vkv = d.eigenvectors.T @ self.k_train_train @ d.eigenvectors
        covs = []
        for gi in g:
            a = tv * gi  # A(x) V, so A = a V^T
            if diagonal:
                aka = ((a @ vkv) * a).sum(1)
                cross = (a * kv).sum(1)
                prior = self.k_test_test if self.k_test_test.ndim == 1 else torch.diagonal(self.k_test_test)
                covs.append(prior + aka - 2 * cross)
            else:
                if self.k_test_test.ndim == 1:
                    raise ValueError("nngp_test_test is a diagonal; use diagonal=True")
                cross = a @ kv.T
                c = self.k_test_test + a @ vkv @ a.T - cross - cross.T
                covs.append(0.5 * (c + c.T))
        cov = torch.stack(covs)
        return GaussianPrediction(mean, cov[0] if scalar else cov)


def gradient_descent_mse_ensemble(y_train: Any, nngp_train_train: Any, nngp_test_train: Any,
                                  nngp_test_test: Any = None, *, ntk_train_train: Any = None,
                                  ntk_test_train: Any = None, learning_rate: float = 1.0, diag_reg: float = 0.0,
                                  diag_reg_absolute_scale: bool = False, loss_normalization: Any = "mean",
                                  discrete: bool = False, dtype: torch.dtype | None = None,
                                  device: torch.device | str | None = None) -> EnsemblePredictor:
    """Infinite ensemble of wide networks trained by gradient flow on MSE (Lee et al. 2019, Eqs. (14)-(16)).

    Give the NTK matrices for the "NTK-GP" (all layers trained); omit them for the NNGP regime (only
    the readout trained). Conventions (learning rate, loss normalization m, relative diagonal
    regularizer on the dynamics kernel) are those of :func:`ntkit.dynamics.gradient_descent_mse`.
    In the NNGP regime the regularizer also enters the train covariance (then t = inf is the GP
    posterior with noise variance eps). ``discrete=True``: full-batch gradient descent with step eta,
    t = number of steps (the same formulas with exp(-c lambda t) replaced by (1 - c lambda)^t, since
    the outputs remain an affine function of the initial outputs f0).

    Returns
    -------
    EnsemblePredictor with ``.predict(t, compute_cov=True, diagonal=False)`` -> GaussianPrediction.
    """
    return EnsemblePredictor(y_train, nngp_train_train, nngp_test_train, nngp_test_test,
                             ntk_train_train=ntk_train_train, ntk_test_train=ntk_test_train,
                             learning_rate=learning_rate, diag_reg=diag_reg,
                             diag_reg_absolute_scale=diag_reg_absolute_scale, loss_normalization=loss_normalization,
                             discrete=discrete, dtype=dtype, device=device)


def ensemble_from_architecture(arch: Any, x_train: Any, y_train: Any, x_test: Any, *, regime: str = "ntk",
                               **kwargs: Any) -> EnsemblePredictor:
    """:func:`gradient_descent_mse_ensemble` with kernels from ``arch.kernel(x1, x2, get=("nngp", "ntk"))``
    (an :class:`ntkit.Architecture`). ``regime`` is "ntk" (all layers trained) or "nngp" (readout only)."""
    if regime not in ("ntk", "nngp"):
        raise ValueError(f"regime must be 'ntk' or 'nngp', got {regime!r}")
    ktr = arch.kernel(x_train, None, get=("nngp", "ntk"))
    kst = arch.kernel(x_test, x_train, get=("nngp", "ntk"))
    kss = arch.kernel(x_test, None, get="nngp")
    extra = dict(ntk_train_train=ktr.ntk, ntk_test_train=kst.ntk) if regime == "ntk" else {}
    return gradient_descent_mse_ensemble(y_train, ktr.nngp, kst.nngp, kss, **extra, **kwargs)


def gp_inference(k_train_train: Any, y_train: Any, k_test_train: Any, k_test_test: Any = None, *,
                 diag_reg: float = 0.0, diag_reg_absolute_scale: bool = False,
                 dtype: torch.dtype | None = None) -> GaussianPrediction:
    """Exact GP posterior (Rasmussen & Williams 2006, Eqs. (2.25)-(2.26)):

        mean = K* K_r^{-1} Y,   cov = K** - K* K_r^{-1} K*^T,   K_r = K + eps I,

    with eps = diag_reg * trace(K) / n (or diag_reg if absolute). With the NNGP this is Bayesian inference
    with an infinitely wide network (Lee et al. 2018); with the NTK it is the t = inf NTK mean with an
    NTK prior. (The NTK-GP at t = inf, whose covariance mixes NNGP and NTK, is
    ``gradient_descent_mse_ensemble(...).predict(inf)``.) Solved by Cholesky; a clear error if K_r is
    not positive definite.
    """
    dt = dtype or torch.float64
    k = square_kernel(k_train_train, "k_train_train", dtype=dt)
    y, one_d = targets(y_train, k.shape[0], dtype=dt, device=k.device)
    ks = to_tensor(k_test_train, "k_test_train", dtype=dt, device=k.device)
    if ks.shape[1] != k.shape[0]:
        raise ValueError(f"k_test_train has shape {tuple(ks.shape)}; need (n_test, {k.shape[0]})")
    kr, _ = regularize(k, diag_reg, diag_reg_absolute_scale)
    chol, info = torch.linalg.cholesky_ex(kr)
    if int(info) != 0:
        raise ValueError("k_train_train (+ regularizer) is not positive definite (Cholesky failed at row "
                         f"{int(info)}); pass diag_reg > 0 (e.g. 1e-6) or remove duplicate training points.")
    mean = ks @ torch.cholesky_solve(y, chol)
    if one_d:
        mean = mean[:, 0]
    if k_test_test is None:
        return GaussianPrediction(mean, None)
    kss = to_tensor(k_test_test, "k_test_test", dtype=dt, device=k.device, ndim=(1, 2))
    w = torch.linalg.solve_triangular(chol, ks.T, upper=False)
    if kss.ndim == 1:
        return GaussianPrediction(mean, kss - (w * w).sum(0))
    cov = kss - w.T @ w
    return GaussianPrediction(mean, 0.5 * (cov + cov.T))
