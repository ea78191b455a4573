"""Kernel ridge regression at any n: direct (Cholesky), preconditioned conjugate gradients, Nystrom/FALKON
and ridge regression on explicit features.

All solve the problem min_f sum_i ||f(x_i) - y_i||^2 + lambda ||f||_H^2 of the kernel k, i.e.
(K + lambda I) alpha = Y with f(x) = k(x, X) alpha -- exactly ("cholesky", "cg") or restricted to a
subspace ("nystrom": span of k(., c_j) for M centers; "features": an explicit feature map with
phi(x).phi(x') ~ k(x, x')). With lambda = 0 it is kernel regression (interpolation), the t = inf limit of
the gradient-flow dynamics (Jacot et al. 2018, Sec. 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._validation import ConfigError, available_memory_bytes, check_memory
from ..features import NTKRandomFeatures
from ..features._base import FeatureMap, clip_rows, pick_rows
from ..features._plan import read_architecture
from ..kernels.base import KernelFunction
from ._common import (_psd_solve, as_inputs, as_kernel, as_targets, blockwise_matmul, kernel_blocks, pcg,
                      regularization, row_block)
from ._feature_ridge import FEATURE_SOLVERS, FeatureRidgeInfo, feature_ridge

__all__ = ["SOLVERS", "KernelRidgeSolution", "FeatureRidgeSolution", "kernel_ridge", "choose_solver",
           "cholesky", "conjugate_gradient", "falkon", "feature_ridge", "default_centers"]

SOLVERS = ("auto", "cholesky", "cg", "nystrom", "features")
#: largest n that "auto" solves directly (O(n^3) time: ~1 minute at 2e4 on two cores)
DIRECT_MAX_N = 20_000
#: smallest n at which "auto" prefers explicit features (when the kernel has them) over Nystrom
FEATURES_MIN_N = 200_000


def _to_output(t: torch.Tensor, like_numpy: bool, one_d: bool):
    if one_d:
        t = t[:, 0]
    return t.cpu().numpy() if like_numpy else t


@dataclass
class KernelRidgeSolution:
    """f(x) = k(x, centers) @ coef (centers: all training points for "cholesky"/"cg", M of them for
    "nystrom"). ``predict`` evaluates the kernel in row blocks under ``memory_budget``."""

    kernel: KernelFunction
    centers: torch.Tensor
    coef: torch.Tensor
    solver: str
    lam: float
    one_d: bool = False
    iterations: int = 0
    residuals: list = field(default_factory=list)
    memory_budget: float | None = None

    def predict(self, x: Any):
        """Predictions (n, k) -- or (n,) for 1-d targets; numpy for numpy input."""
        t = as_inputs(x, "x", dtype=self.centers.dtype, device=self.centers.device)
        rows = row_block(self.centers.shape[0], t.element_size(), self.memory_budget, t.device, "k(x, centers)")
        out = blockwise_matmul(self.kernel, t, self.centers, self.coef, rows)
        return _to_output(out, not isinstance(x, torch.Tensor), self.one_d)


@dataclass
class FeatureRidgeSolution:
    """f(x) = phi(x) @ weights for a fitted feature map phi.

    ``info`` is the :class:`FeatureRidgeInfo` of the solve (solver, iterations, residuals, preconditioner
    rank, times); ``feature_solver``, ``iterations`` and ``residuals`` read it ("direct", 0 and [] without)."""

    feature_map: FeatureMap
    weights: torch.Tensor
    lam: float
    one_d: bool = False
    solver: str = "features"
    info: FeatureRidgeInfo | None = None

    @property
    def feature_solver(self) -> str:
        """How the ridge system was solved: "direct" normal equations or matrix-free "cg"."""
        return self.info.solver if self.info is not None else "direct"

    @property
    def iterations(self) -> int:
        """CG iterations (0 for the direct solve)."""
        return self.info.iterations if self.info is not None else 0

    @property
    def residuals(self) -> list:
        """Largest relative residual after each CG iteration."""
        return self.info.history if self.info is not None else []

    def predict(self, x: Any):
        out = torch.cat([f.to(self.weights.dtype) @ self.weights for _, f in self.feature_map.iter_transform(x)])
        return _to_output(out, not isinstance(x, torch.Tensor), self.one_d)


# ------------------------------------------------------------------------------------------------
def _chol_jitter(a: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """Cholesky factor of a + eps I with the smallest eps (from 1e-14 x mean diagonal up) that works."""
    scale = max(float(a.diagonal().mean()), 1e-300)
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    eps = 0.0
    for k in range(-14, 0):
        chol, info = torch.linalg.cholesky_ex(a + eps * eye, upper=upper)
        if int(info) == 0:
            return chol
        eps = scale * 10.0**k
    raise np.linalg.LinAlgError("kernel matrix of the centers is not positive definite even with jitter")


def default_centers(n: int) -> int:
    """M = min(n, max(100, 5 sqrt(n))): FALKON's M ~ sqrt(n) log n regime (Rudi et al. 2017, Thm. 3)."""
    return int(min(n, max(100, round(5 * math.sqrt(n)))))


def _check_positive_int(v, name):
    if v is None:
        return None
    if isinstance(v, bool) or int(v) != v or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _clip_centers(m: int, n: int) -> int:
    return clip_rows(m, n, "n_centers", "training points", stacklevel=5)


def _pick_centers(x, m, random_state):
    return pick_rows(x.shape[0], m, random_state).to(x.device)


# ------------------------------------------------------------------------------------------------
def cholesky(kernel: KernelFunction, x: torch.Tensor, y: torch.Tensor, lam: float, *,
             memory_budget: float | None = None) -> torch.Tensor:
    """alpha = (K + lam I)^{-1} Y by Cholesky (pseudo-inverse if K + lam I is singular). Forms K: O(n^2)
    memory, once (on the CPU LAPACK factorizes it in place)."""
    n = x.shape[0]
    budget = memory_budget if memory_budget is not None else 0.9 * available_memory_bytes(x.device)
    check_memory(1.2 * n * n * x.element_size(), budget, f"the direct solve with the {n}x{n} kernel matrix",
                 "use solver='cg' (kernel blocks on the fly), 'nystrom' or 'features'")
    arch = getattr(kernel, "arch", None)
    k = (arch.kernel(x, None, kernel.name, dtype=x.dtype, memory_budget=budget) if arch is not None
         else kernel(x, dtype=x.dtype))
    if lam:
        k.diagonal().add_(lam)
    if k.device.type == "cpu" and k.dtype in (torch.float32, torch.float64):
        import scipy.linalg as sl

        try:  # K is symmetric: its C-ordered buffer is the Fortran-ordered K^T = K, factorized in place
            c = sl.cho_factor(k.numpy().T, lower=False, overwrite_a=True, check_finite=False)
            out = torch.from_numpy(sl.cho_solve(c, y.cpu().numpy(), check_finite=False))
            if bool(torch.isfinite(out).all()):
                return out.to(y.dtype)
        except np.linalg.LinAlgError:
            pass
        del k
        k = kernel(x, dtype=x.dtype)
        if lam:
            k.diagonal().add_(lam)
    return _psd_solve(k, y)


def conjugate_gradient(kernel: KernelFunction, x: torch.Tensor, y: torch.Tensor, lam: float, *,
                       n_centers: int | None = None, tol: float = 1e-8, max_iter: int | None = None,
                       random_state: Any = None, memory_budget: float | None = None, progress: bool = True):
    """Solve (K + lam I) alpha = Y exactly by conjugate gradients, K applied by blocks computed on the fly.

    Preconditioner: the Nystrom approximation of rank M, P = C W^{-1} C^T + lam I (C = k(X, X_M),
    W = k(X_M, X_M)), inverted by the Woodbury identity with B = C L^{-T}, W = L L^T:
    P^{-1} v = (v - B (lam I + B^T B)^{-1} B^T v) / lam (Frangella, Tropp & Udell 2023; Rudi et al. 2017).
    Memory: O(n M) for B and one block of kernel rows per matrix-vector product; K is never stored.
    Returns (alpha, iterations, residual history).
    """
    n = x.shape[0]
    m = _clip_centers(_check_positive_int(n_centers, "n_centers") or default_centers(n), n)
    max_iter = _check_positive_int(max_iter, "max_iter") or max(100, 4 * int(math.sqrt(n)))
    budget = memory_budget if memory_budget is not None else 0.5 * available_memory_bytes(x.device)
    item = x.element_size()
    check_memory(3 * n * m * item, budget, f"the rank-{m} Nystrom preconditioner for n={n}",
                 "pass fewer n_centers or a larger memory_budget")
    idx = _pick_centers(x, m, random_state)
    m = idx.shape[0]
    rows = row_block(max(m, 1), item, budget / 3, x.device, "k(X, centers)")
    c = torch.cat([blk for _, blk in kernel_blocks(kernel, x, x[idx], rows)])
    w = c[idx]
    w = 0.5 * (w + w.T)
    chol_w = _chol_jitter(w)
    bmat = torch.linalg.solve_triangular(chol_w, c.T, upper=False).T  # C L^{-T}
    del c
    lam_p = lam if lam > 0 else 1e-10 * float(kernel(x[idx], diagonal=True, dtype=x.dtype).mean())
    inner = torch.linalg.cholesky(bmat.T @ bmat + lam_p * torch.eye(m, dtype=x.dtype, device=x.device))

    def precond(v):
        return (v - bmat @ torch.cholesky_solve(bmat.T @ v, inner)) / lam_p

    rows_n = row_block(n, item, budget - 3 * n * m * item, x.device, "the kernel blocks k(X_i, X)")

    def matvec(v):
        out = blockwise_matmul(kernel, x, x, v, rows_n)
        return out.add_(v, alpha=lam) if lam else out

    return pcg(matvec, y, precond, tol=tol, max_iter=max_iter, progress=progress, desc="CG (Nystrom precond.)")


def falkon(kernel: KernelFunction, x: torch.Tensor, y: torch.Tensor, lam: float, *,
           n_centers: int | None = None, centers: torch.Tensor | None = None, tol: float = 1e-8,
           max_iter: int | None = None, random_state: Any = None, memory_budget: float | None = None,
           progress: bool = True):
    """Nystrom kernel ridge regression solved by FALKON (Rudi, Carratino & Rosasco 2017, Alg. 1; Meanti et
    al. 2020).

    With M centers X_M, K_nM = k(X, X_M), K_MM = k(X_M, X_M), the Nystrom estimator f = k(., X_M) alpha
    solves H alpha = K_nM^T Y, H = K_nM^T K_nM + lam K_MM (with all points as centers this is exactly
    (K + lam I)^{-1} Y). Preconditioner: K_MM = T^T T, A^T A = (n/M) T T^T + lam I, B = T^{-1} A^{-1}, so that
    B^T H B ~ I; CG on B^T H B beta = B^T K_nM^T Y, alpha = B beta. K_nM is applied by row blocks computed
    on the fly (kept in memory only if it fits in half the budget); the n x n matrix never exists.
    Returns (centers, alpha, iterations, residual history).
    """
    n = x.shape[0]
    if centers is None:
        m = _clip_centers(_check_positive_int(n_centers, "n_centers") or default_centers(n), n)
        ctr = x[_pick_centers(x, m, random_state)]
        m = ctr.shape[0]
    else:
        ctr = as_inputs(centers, "centers", dtype=x.dtype, device=x.device)
        m = ctr.shape[0]
    max_iter = _check_positive_int(max_iter, "max_iter") or 100
    budget = memory_budget if memory_budget is not None else 0.5 * available_memory_bytes(x.device)
    item = x.element_size()
    check_memory(4 * m * m * item, budget, f"FALKON's {m}x{m} preconditioner", "pass fewer n_centers")
    kmm = kernel(ctr, dtype=x.dtype)
    t_up = _chol_jitter(kmm, upper=True)
    a_mat = (n / m) * (t_up @ t_up.T)
    a_mat.diagonal().add_(lam)
    a_up = _chol_jitter(a_mat, upper=True)
    del a_mat
    cache = n * m * item <= 0.5 * (budget - 4 * m * m * item)
    rows = row_block(m, item, max(budget - 4 * m * m * item, 1.0) / 2, x.device, "k(X, centers)")
    knm = torch.cat([blk for _, blk in kernel_blocks(kernel, x, ctr, rows)]) if cache else None

    def knm_t_knm(v):  # K_nM^T K_nM v, one pass over the row blocks
        if knm is not None:
            return knm.T @ (knm @ v)
        out = torch.zeros_like(v)
        for _, blk in kernel_blocks(kernel, x, ctr, rows):
            out.addmm_(blk.T, blk @ v)
        return out

    def knm_t(u):
        if knm is not None:
            return knm.T @ u
        out = u.new_zeros((m, u.shape[1]))
        for i, blk in kernel_blocks(kernel, x, ctr, rows):
            out.addmm_(blk.T, u[i:i + blk.shape[0]])
        return out

    def b_apply(v):  # T^{-1} A^{-1} v
        return torch.linalg.solve_triangular(t_up, torch.linalg.solve_triangular(a_up, v, upper=True), upper=True)

    def bt_apply(v):  # A^{-T} T^{-T} v
        u = torch.linalg.solve_triangular(t_up.T, v, upper=False)
        return torch.linalg.solve_triangular(a_up.T, u, upper=False)

    def matvec(beta):
        v = b_apply(beta)
        hv = knm_t_knm(v)
        if lam:
            hv.add_(kmm @ v, alpha=lam)
        return bt_apply(hv)

    rhs = bt_apply(knm_t(y))
    beta, it, hist = pcg(matvec, rhs, None, tol=tol, max_iter=max_iter, progress=progress, desc="FALKON CG")
    return ctr, b_apply(beta), it, hist


# ------------------------------------------------------------------------------------------------
def _features_for(kernel: KernelFunction):
    """(architecture, kernel name) when ``kernel`` is an architecture's NNGP/NTK that NTKRandomFeatures
    supports, else None."""
    arch, name = getattr(kernel, "arch", None), getattr(kernel, "name", None)
    if arch is None or name not in ("ntk", "nngp"):
        return None
    try:
        read_architecture(arch, name)
    except (ConfigError, ValueError, TypeError):
        return None
    return arch, name


def choose_solver(n: int, kernel: KernelFunction, *, memory_budget: float | None = None, item: int = 8,
                  device=None) -> str:
    """The solver "auto" takes, from n, the memory budget and the kernel.

    * "cholesky" when n <= 20 000 and the n x n matrix (twice, for the factorization) fits the budget:
      exact and fastest there;
    * "features" when n >= 200 000 and the kernel is the NTK/NNGP of an architecture with random features
      (fully-connected ReLU networks): linear time in n;
    * "nystrom" (FALKON) otherwise: O(n M) time per iteration, O(n M) or less memory.
    """
    budget = memory_budget if memory_budget is not None else 0.9 * available_memory_bytes(device)
    if n <= DIRECT_MAX_N and 2 * n * n * item <= budget:
        return "cholesky"
    if n >= FEATURES_MIN_N and _features_for(kernel) is not None:
        return "features"
    return "nystrom"


def kernel_ridge(kernel: Any, x: Any, y: Any, *, diag_reg: float = 0.0, diag_reg_absolute_scale: bool = False,
                 solver: str = "auto", get: str = "ntk", n_centers: int | None = None,
                 n_components: int | None = None, feature_map: FeatureMap | None = None, tol: float = 1e-8,
                 max_iter: int | None = None, random_state: Any = None, memory_budget: float | None = None,
                 dtype: Any = None, device: Any = None, progress: bool = True, feature_solver: str = "auto"):
    """Kernel ridge regression (K + lambda I) alpha = Y with the solver that fits n.

    Parameters
    ----------
    kernel : ntkit.KernelFunction or ntkit.Architecture (then ``get`` picks "ntk" or "nngp")
    x : array (n, d); y : array (n,) or (n, k)
    diag_reg : float >= 0
        lambda = diag_reg * trace(K) / n (relative, as the dynamics and estimators), or diag_reg itself
        with ``diag_reg_absolute_scale=True``. 0: kernel regression (minimum-norm interpolation).
    solver : {"auto", "cholesky", "cg", "nystrom", "features"}
        See :func:`choose_solver` for "auto"; "cg" and "cholesky" solve the exact problem, "nystrom"
        (FALKON) the Nystrom-restricted one with ``n_centers`` centers, "features" ridge regression on
        ``feature_map`` (default ``NTKRandomFeatures(arch, n_components, kernel=get)``).
    n_centers : int, optional
        Nystrom centers (FALKON) or preconditioner rank (CG); default min(n, max(100, 5 sqrt(n))).
    n_components : int, optional
        Features for "features" (default 4096).
    tol, max_iter : CG stopping rule on the relative residual (for "features" with float32 features the
        tolerance is at least 1e-5, see :func:`feature_ridge`).
    random_state : seeds the centers and the features.
    memory_budget : bytes for kernel blocks and factors (default: half of the free memory).
    feature_solver : {"auto", "direct", "cg"}
        How "features" solves its ridge system (:func:`feature_ridge`): the m x m normal equations, or
        matrix-free Nystrom-preconditioned CG; "auto" takes CG from m >= 8192 features when they fit in memory.

    Returns
    -------
    KernelRidgeSolution or FeatureRidgeSolution, with ``predict(x_new)``.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if feature_solver not in FEATURE_SOLVERS:
        raise ValueError(f"feature_solver must be one of {FEATURE_SOLVERS}, got {feature_solver!r} (it is used "
                         "by solver='features')")
    kf = as_kernel(kernel, get)
    xt = as_inputs(x, "x", dtype=dtype, device=device)
    n = xt.shape[0]
    yt, one_d = as_targets(y, n, dtype=xt.dtype, device=xt.device)
    if solver == "auto":
        solver = choose_solver(n, kf, memory_budget=memory_budget, item=xt.element_size(), device=xt.device)
    lam = regularization(kf, xt, diag_reg, diag_reg_absolute_scale)
    if solver == "features":
        fm = feature_map
        if fm is None:
            spec = _features_for(kf)
            if spec is None and getattr(kf, "arch", None) is not None and getattr(kf, "name", None) in ("ntk", "nngp"):
                read_architecture(kf.arch, kf.name)  # raises the error that names the unsupported layer
            if spec is None:
                raise ConfigError("solver='features' needs the NTK/NNGP of a fully-connected ReLU architecture "
                                  f"(random features exist for those), got {kf!r}; pass feature_map= or use "
                                  "solver='nystrom'")
            fm = NTKRandomFeatures(spec[0], 4096 if n_components is None else n_components, kernel=spec[1],
                                   random_state=random_state, dtype=xt.dtype, progress=progress)
        if not hasattr(fm, "n_features_in_"):
            fm.fit(xt)
        w, info = feature_ridge(fm, xt, yt, lam, solver=feature_solver, tol=tol, max_iter=max_iter,
                                random_state=0 if random_state is None else random_state,
                                memory_budget=memory_budget, progress=progress, return_info=True)
        return FeatureRidgeSolution(fm, w.to(xt.dtype), lam, one_d, info=info)
    if solver == "cholesky":
        coef = cholesky(kf, xt, yt, lam, memory_budget=memory_budget)
        return KernelRidgeSolution(kf, xt, coef, "cholesky", lam, one_d, memory_budget=memory_budget)
    if solver == "cg":
        coef, it, hist = conjugate_gradient(kf, xt, yt, lam, n_centers=n_centers, tol=tol, max_iter=max_iter,
                                            random_state=random_state, memory_budget=memory_budget,
                                            progress=progress)
        return KernelRidgeSolution(kf, xt, coef, "cg", lam, one_d, it, hist, memory_budget)
    ctr, coef, it, hist = falkon(kf, xt, yt, lam, n_centers=n_centers, tol=tol, max_iter=max_iter,
                                 random_state=random_state, memory_budget=memory_budget, progress=progress)
    return KernelRidgeSolution(kf, ctr, coef, "nystrom", lam, one_d, it, hist, memory_budget)
