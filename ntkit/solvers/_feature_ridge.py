"""Ridge regression on explicit features: the normal equations (direct) or matrix-free preconditioned CG.

Both solve (Phi^T Phi + lambda I) w = Phi^T Y for the (n, m) feature matrix Phi of a fitted feature map.

* "direct": Phi^T Phi (m x m) and Phi^T Y are accumulated batch by batch in float64 and solved by Cholesky
  (pseudo-inverse for a singular system): O(n m^2 + m^3) time, O(m^2) memory.
* "cg": conjugate gradients on the same system without ever forming Phi^T Phi: each iteration applies
  Phi and Phi^T (O(n m) time), with a randomized Nystrom preconditioner of Phi^T Phi built from a uniform
  row subsample of Phi (Frangella, Tropp & Udell 2023, "Randomized Nystrom preconditioning", SIAM J. Matrix
  Anal. Appl. 44(2), Eq. (5.3); the row-sampled Nystrom approximation as in Rudi, Carratino & Rosasco 2017).
  Phi is kept in memory (its own dtype, e.g. float32) when it fits the budget, else recomputed batch by
  batch at every iteration.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .._validation import available_memory_bytes, check_memory, empty_output
from ..features._base import FeatureMap, make_generator
from .._linalg import symmetric_eigh
from ._common import _eig_solve, _eig_tol, _psd_solve, pcg

__all__ = ["FeatureRidgeInfo", "feature_ridge", "choose_feature_solver", "FEATURE_SOLVERS"]

FEATURE_SOLVERS = ("auto", "direct", "cg")
#: "auto" takes CG from this many features on (when Phi fits the memory budget): below it the m x m normal
#: equations are cheap (n m^2 flops in a fast matrix product); above it CG's O(n m) per iteration wins
#: (benchmarks/RESULTS.md, "Feature ridge by conjugate gradients").
CG_MIN_FEATURES = 8192
#: default rank of the Nystrom preconditioner (rows sampled): the preconditioner costs ~4 s m (rank)
#: flops per column and iteration, a small fraction of the 4 n m of the matrix-vector product
DEFAULT_RANK = 1000
#: the smallest relative residual "cg" is asked to reach with features in float32 / float16-like dtypes
#: (a float32 product Phi^T (Phi v) is exact to ~1e-6 relative; below that the residual is round-off)
_TOL_FLOOR = {torch.float32: 1e-5, torch.float64: 1e-13}
#: rows per product inside a stored block: the (rows, m) slab is read twice per matvec, from cache the second time
_SLAB = 256


@dataclass
class FeatureRidgeInfo:
    """How a feature ridge problem was solved (returned by ``feature_ridge(..., return_info=True)``).

    Attributes
    ----------
    solver : "direct" or "cg"
    iterations : int
        CG iterations (0 for "direct").
    residual : list of float
        Final relative residual ||Phi^T Y - (Phi^T Phi + lambda I) w|| / ||Phi^T Y|| per lambda (max over the
        target columns), recomputed from w at the end (not the recursively updated one); [] for "direct".
    history : list of float
        Largest relative residual after each CG iteration (recursively updated).
    tol : float
        The stopping tolerance used (never below the dtype's floor, 1e-5 for float32 features).
    converged : bool
    rank : int
        Rank of the Nystrom preconditioner (0: none).
    stored : bool
        Whether Phi was kept in memory (False: recomputed batch by batch at every iteration).
    times : dict
        Seconds spent in "features", "preconditioner", "solve".
    """

    solver: str
    iterations: int = 0
    residual: list = field(default_factory=list)
    history: list = field(default_factory=list)
    tol: float = 0.0
    converged: bool = True
    rank: int = 0
    stored: bool = False
    times: dict = field(default_factory=dict)


def _lams(lam: Any) -> tuple[list[float], bool]:
    """(list of lambdas, was a sequence); each a finite number >= 0."""
    if isinstance(lam, (torch.Tensor, np.ndarray)):
        many = lam.ndim > 0
        seq = [float(v) for v in lam.reshape(-1)]
    else:
        many = not isinstance(lam, numbers.Real) or isinstance(lam, bool)
        seq = list(lam) if many else [lam]
    if not seq:
        raise ValueError("lam is an empty sequence; pass one lambda >= 0 or a non-empty list of them")
    for v in seq:
        if isinstance(v, bool) or not isinstance(v, (numbers.Real, torch.Tensor)) or not (0 <= float(v) < math.inf):
            raise ValueError(f"lam must be a finite number >= 0 (or a sequence of them), got {v!r}")
    return [float(v) for v in seq], many


def _preconditioner_bytes(r: int, m: int) -> int:
    """Float64 memory of the rank-r Nystrom preconditioner of m features (rows, factors, r x r Gram)."""
    return 3 * r * m * 8 + 2 * r * r * 8


def _phi_fits(n: int, m: int, item: int, budget: float, rank: int = DEFAULT_RANK) -> bool:
    """Whether CG keeps the (n, m) features in memory: they must fit half of what the budget leaves after
    the rank-``rank`` preconditioner (the one rule of :func:`choose_feature_solver` and of the CG itself)."""
    return n * m * item <= 0.5 * (budget - _preconditioner_bytes(min(n, rank), m))


def choose_feature_solver(n: int, m: int, item: int, memory_budget: float | None = None, device=None) -> str:
    """The feature solver that ``solver="auto"`` takes.

    Parameters
    ----------
    n, m : int
        Rows and features of Phi.
    item : int
        Bytes per feature value (4 for float32, 8 for float64).
    memory_budget : float, optional
        Bytes; default 90% of the free memory of ``device``.
    device : torch.device, optional
        Where the features live (the budget's default is that device's free memory).

    Returns
    -------
    str
        "cg" when m >= ``CG_MIN_FEATURES`` (8192) and Phi fits in memory for the CG, or when the m x m
        float64 normal matrix does not fit at all; "direct" otherwise.
    """
    budget = memory_budget if memory_budget is not None else 0.9 * available_memory_bytes(device)
    if 3 * m * m * 8 > budget:
        return "cg"
    if m >= CG_MIN_FEATURES and _phi_fits(n, m, item, budget):
        return "cg"
    return "direct"


def _direct(feature_map: FeatureMap, x: Any, y: torch.Tensor, lams: list[float], budget: float | None,
            info: FeatureRidgeInfo) -> torch.Tensor:
    """w for every lambda from the normal equations (one Cholesky, or one eigendecomposition for several)."""
    m = feature_map.n_components_
    if budget is None:
        budget = 0.9 * available_memory_bytes(feature_map.device)
    check_memory(3 * m * m * 8, budget,
                 f"the {m}x{m} float64 normal equations of feature ridge",
                 "use solver='cg' (matrix-free), fewer features, or a larger memory_budget")
    t0 = time.perf_counter()
    a = b = None
    for i, f in feature_map.iter_transform(x):
        yb = y[i:i + f.shape[0]].to(device=f.device, dtype=f.dtype)
        fa, fb = (f.T @ f).to(torch.float64), (f.T @ yb).to(torch.float64)
        a = fa if a is None else a.add_(fa)
        b = fb if b is None else b.add_(fb)
    info.times["features"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if len(lams) == 1:
        if lams[0]:
            a.diagonal().add_(lams[0])
        out = _psd_solve(a, b)[None]
    else:  # one eigendecomposition, every lambda from it (zero modes dropped for lambda = 0, as _psd_solve)
        w, v = symmetric_eigh(a, overwrite=True)  # a is ours, not needed after
        w, v = w.to(a.device), v.to(a.device)
        vb, tol = v.T @ b, _eig_tol(w)
        out = torch.stack([_eig_solve(w, v, vb, lam, tol) for lam in lams])
    info.times["solve"] = time.perf_counter() - t0
    return out


class _Features:
    """Phi as an operator: kept in memory in row blocks (its own dtype) or recomputed batch by batch.
    Products accumulate block results in float64 (each block's product in the features' dtype)."""

    def __init__(self, feature_map: FeatureMap, x: Any, n: int, budget: float, rank: int):
        self.fm, self.x = feature_map, x
        self.m = feature_map.n_components_
        self.dtype = feature_map.dtype_
        item = torch.finfo(self.dtype).bits // 8
        self.stored = _phi_fits(n, self.m, item, budget, rank)
        self.blocks: list[tuple[int, torch.Tensor]] | None = None
        if self.stored:  # one allocation (given back to the system when freed; huge pages on Linux), not n/batch
            phi = None
            for i, f in feature_map.iter_transform(x):
                if phi is None:
                    phi = empty_output((n, self.m), f.dtype, f.device)
                phi[i:i + f.shape[0]] = f
            self.blocks = [(0, phi)]
            self.device = phi.device

    def batches(self):
        return iter(self.blocks) if self.stored else self.fm.iter_transform(self.x)

    def _slabs(self):
        for i, f in self.batches():
            self.device = f.device
            for j in range(0, f.shape[0], _SLAB):
                yield i + j, f[j:j + _SLAB]

    def rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        """Phi^T y, (m, k) float64."""
        out = None
        for i, f in self._slabs():
            part = (y[i:i + f.shape[0]].to(device=f.device, dtype=f.dtype).T @ f).to(torch.float64)
            out = part if out is None else out.add_(part)
        return out.T

    def gram_matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Phi^T (Phi v), (m, k) float64 for v (m, k) float64."""
        vt = None
        out = None
        for _, f in self._slabs():
            if vt is None:
                vt = v.T.to(device=f.device, dtype=f.dtype).contiguous()
            part = ((vt @ f.T) @ f).to(torch.float64)  # (k, rows) then (k, m): wide products, fast BLAS paths
            out = part if out is None else out.add_(part)
        return out.T

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Phi[idx] in float64."""
        if self.stored:
            phi = self.blocks[0][1]
            return phi[idx.to(phi.device)].to(torch.float64)
        xs = self.x[idx.to(self.x.device)] if isinstance(self.x, torch.Tensor) else self.x[idx.numpy()]
        f = self.fm.transform(xs)
        return torch.as_tensor(f).to(torch.float64)


class _Nystrom:
    """Randomized Nystrom preconditioner of A = Phi^T Phi + mu I from r uniformly sampled rows of Phi.

    A_hat = (n / r) Phi_S^T Phi_S = U diag(lam_hat) U^T (U from the r x r Gram Phi_S Phi_S^T = V diag(s^2) V^T:
    U = Phi_S^T V diag(1/s), lam_hat = (n / r) s^2; directions with s^2 below 1e-10 of the largest dropped), and
    P^{-1} = (lam_hat_min + mu) U diag(1 / (lam_hat + mu)) U^T + (I - U U^T)   (Frangella, Tropp & Udell 2023,
    Eq. (5.3)), one mu per column. In float64 (U orthonormal to ~1e-11); U is applied through its factors
    Phi_S^T (V diag(1/s)) -- as cheap as U itself, O(m r) per column, and one r x r x m product less to build.
    """

    def __init__(self, phi_s: torch.Tensor, n: int):
        r = phi_s.shape[0]
        gram = phi_s @ phi_s.T
        s2, v = torch.linalg.eigh(0.5 * (gram + gram.T))
        keep = s2 > 1e-10 * float(s2.max().clamp_min(1e-300)) if s2.numel() else s2 > 0
        s2, v = s2[keep], v[:, keep]
        self.phi_s, self.coef = phi_s, v / s2.sqrt()  # U = phi_s^T coef
        self.lam_hat = (n / r) * s2
        self.rank = int(s2.shape[0])

    def __call__(self, mus: torch.Tensor):
        lo = self.lam_hat.min()
        d = (lo + mus)[None, :] / (self.lam_hat[:, None] + mus[None, :]) - 1.0  # (rank, k)

        def apply(rv: torch.Tensor) -> torch.Tensor:
            ut_r = self.coef.T @ (self.phi_s @ rv)
            return rv + self.phi_s.T @ (self.coef @ (d * ut_r))

        return apply


def feature_ridge(feature_map: FeatureMap, x: Any, y: torch.Tensor, lam: float | Sequence[float], *,
                  solver: str = "auto", tol: float | None = None, max_iter: int | None = None,
                  preconditioner: str | None = "nystrom", rank: int | None = None, random_state: Any = 0,
                  memory_budget: float | None = None, progress: bool = False, return_info: bool = False):
    """Ridge regression on features: w = (Phi^T Phi + lam I)^{-1} Phi^T Y, for one or several lam.

    With phi(x).phi(x') = k~(x, x') the predictions phi(x)^T w equal those of kernel ridge regression with
    k~ (push-through identity). Phi is produced batch by batch by ``feature_map.iter_transform(x)``.

    Parameters
    ----------
    feature_map : fitted ntkit feature map (``NTKRandomFeatures``, ``NTKSketch``, ...)
    x : inputs (n, d); y : tensor (n, k) of targets
    lam : float >= 0, or a sequence of them
        Ridge parameter(s). A sequence returns one solution per value (validation over a grid): "direct"
        from one eigendecomposition of Phi^T Phi, "cg" from one CG run whose every iteration applies Phi and
        Phi^T to the vectors of all lambdas not yet converged at once (one pass over the features for the
        grid; the preconditioner is shared, with each lambda's shift).
    solver : {"auto", "direct", "cg"}
        "direct": the m x m normal equations in float64 (O(n m^2 + m^3) time, O(m^2) memory; pseudo-inverse
        for lam = 0). "cg": preconditioned conjugate gradients (Hestenes & Stiefel 1952) on
        (Phi^T Phi + lam I) w = Phi^T Y, matrix-free: O(n m) per iteration, Phi^T Phi never formed. "auto":
        :func:`choose_feature_solver` ("cg" for m >= 8192 when Phi fits half the budget).
    tol : float, optional
        CG stops when every ||r|| <= tol ||Phi^T Y|| (default 1e-6 for float64 features, 1e-5 for float32;
        never below 1e-5 for float32 features, whose products are exact to ~1e-6 only).
    max_iter : int, optional
        CG iterations at most (default 500). Not converging warns (RuntimeWarning) with the residual reached.
    preconditioner : {"nystrom", None}
        "nystrom": the randomized Nystrom preconditioner of Phi^T Phi from ``rank`` uniformly sampled rows of
        Phi (Frangella, Tropp & Udell 2023), exact when rank >= n; None: plain CG.
    rank : int, optional
        Rows sampled for the preconditioner (default min(n, 1000)).
    random_state : seeds the row sample (default 0: deterministic).
    memory_budget : float, optional
        Bytes: Phi is kept in memory if it fits half of it (else recomputed every iteration), the direct
        solver's m x m matrix must fit it. Default: 90% of the free memory.
    progress : bool
        A progress bar over CG iterations.
    return_info : bool
        Also return a :class:`FeatureRidgeInfo` (solver, iterations, final residual, times).

    Returns
    -------
    w : float64 tensor (m, k), or (len(lam), m, k) for a sequence of lam; with ``return_info``, (w, info).

    Notes
    -----
    Accuracy of "cg" with float32 features: the CG vectors (w, residual, direction) are float64; each
    product Phi^T (Phi p) is computed in slabs of 256 rows in the features' dtype and the slab results are
    summed in float64, so the operator is applied to ~1e-6 relative accuracy. The predictions agree with
    the float64 direct solve of the same float32 features to ~1e-4 relative at tol 1e-5
    (tests/solvers/test_feature_cg.py).
    """
    if solver not in FEATURE_SOLVERS:
        raise ValueError(f"solver must be one of {FEATURE_SOLVERS}, got {solver!r}")
    if preconditioner not in ("nystrom", None):
        raise ValueError(f"preconditioner must be 'nystrom' or None, got {preconditioner!r}")
    if not hasattr(feature_map, "n_components_"):
        raise RuntimeError(f"feature_map {feature_map!r} is not fitted yet; call feature_map.fit(x) first")
    lams, many = _lams(lam)
    if not isinstance(y, torch.Tensor) or y.ndim != 2:
        raise ValueError("y must be a 2-d tensor (n, k) of targets; reshape 1-d targets to (n, 1)")
    n, m = len(x), feature_map.n_components_
    if n == 0:
        raise ValueError("x is empty; pass at least one row")
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} rows but x has {n}; pass one target row per input row")
    dtype = feature_map.dtype_
    item = torch.finfo(dtype).bits // 8
    if solver == "auto":
        solver = choose_feature_solver(n, m, item, memory_budget, feature_map.device)
    info = FeatureRidgeInfo(solver=solver)
    if solver == "direct":
        w = _direct(feature_map, x, y, lams, memory_budget, info)
        w = w if many else w[0]
        return (w, info) if return_info else w

    floor = _TOL_FLOOR.get(dtype, 1e-3)
    if tol is None:
        tol = 1e-6 if dtype == torch.float64 else floor
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (0 < tol < 1):
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
    tol = max(float(tol), floor)
    if max_iter is None:
        max_iter = 500
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1):
        raise ValueError(f"rank must be a positive integer (rows sampled for the preconditioner), got {rank!r}")
    budget = memory_budget if memory_budget is not None else 0.9 * available_memory_bytes(feature_map.device)
    r = min(n, rank if rank is not None else DEFAULT_RANK) if preconditioner else 0
    pre_bytes = _preconditioner_bytes(r, m)
    check_memory(pre_bytes + 8 * m * y.shape[1] * len(lams) * 8, budget,
                 f"the CG vectors and the rank-{r} preconditioner of feature ridge (m={m})",
                 "pass a smaller rank, fewer lambdas, or a larger memory_budget")
    t0 = time.perf_counter()
    ops = _Features(feature_map, x, n, budget, r)
    info.stored = ops.stored
    k = y.shape[1]
    b = ops.rmatvec(y)  # (m, k) float64
    info.times["features"] = time.perf_counter() - t0
    rhs = b.repeat(1, len(lams))  # columns: lambda-major
    mus = torch.tensor(lams, dtype=torch.float64, device=b.device).repeat_interleave(k)

    precond = None
    t0 = time.perf_counter()
    if r:
        gen = make_generator(random_state)
        idx = torch.randperm(n, generator=gen)[:r].sort().values
        nys = _Nystrom(ops.rows(idx).to(b.device), n)
        info.rank = nys.rank
        precond = nys(mus) if nys.rank else None  # all sampled rows zero: plain CG
    info.times["preconditioner"] = time.perf_counter() - t0

    def matvec(v, idx):  # columns idx only: systems that converged cost no more passes over Phi
        return ops.gram_matvec(v).add_(v * mus[idx])

    t0 = time.perf_counter()
    w, it, hist = pcg(matvec, rhs, precond, tol=tol, max_iter=max_iter, progress=progress,
                      desc="feature ridge CG" + (" (Nystrom precond.)" if r else ""), columns=True)
    tiny = torch.finfo(torch.float64).tiny
    res = (rhs - matvec(w, torch.arange(w.shape[1]))).norm(dim=0) / rhs.norm(dim=0).clamp_min(tiny)
    info.times["solve"] = time.perf_counter() - t0
    info.iterations, info.history, info.tol = it, hist, tol
    info.residual = [float(v) for v in res.reshape(len(lams), k).max(1).values]
    info.converged = hist[-1] <= tol
    if not info.converged:
        warnings.warn(f"feature ridge CG stopped after {it} iterations at relative residual {hist[-1]:.2e} "
                      f"(tol {tol:g}); raise max_iter, the preconditioner rank, or lam", RuntimeWarning, stacklevel=2)
    w = w.T.reshape(len(lams), k, m).transpose(1, 2)
    w = w if many else w[0]
    return (w, info) if return_info else w
