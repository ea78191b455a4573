"""Shared pieces of the solvers: kernel access by blocks, targets, the regularization convention."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .._linalg import symmetric_eigh
from .._progress import progress as _progress
from .._validation import as_float_tensor, available_memory_bytes, check_memory, resolve_dtype
from ..kernels import Architecture
from ..kernels.base import KernelFunction

__all__ = ["as_kernel", "as_targets", "as_inputs", "regularization", "row_block", "blockwise_matmul", "kernel_blocks", "pcg"]

# Number of (rows x cols) float buffers alive while an architecture kernel evaluates one block.
_LIVE = 14


def as_kernel(kernel: Any, get: str = "ntk") -> KernelFunction:
    """A KernelFunction: given as one, or an Architecture's ``kernel_fn(get)``."""
    if isinstance(kernel, Architecture):
        return kernel.kernel_fn(get)
    if isinstance(kernel, KernelFunction):
        return kernel
    raise TypeError(f"kernel must be an ntkit.KernelFunction (e.g. arch.kernel_fn('ntk'), ntkit.Laplace(1.0)) or "
                    f"an ntkit.Architecture, got {type(kernel).__name__}")


def as_targets(y: Any, n: int, *, dtype, device) -> tuple[torch.Tensor, bool]:
    """Targets as (n, k) tensor; returns (tensor, was_1d)."""
    t = torch.as_tensor(np.asarray(y, dtype=np.float64)) if not isinstance(y, torch.Tensor) else y
    t = t.to(dtype=dtype, device=device)
    if t.ndim not in (1, 2):
        raise ValueError(f"y must have 1 or 2 dimensions (n,) or (n, k), got shape {tuple(t.shape)}")
    one_d = t.ndim == 1
    if one_d:
        t = t[:, None]
    if t.shape[0] != n:
        raise ValueError(f"y has {t.shape[0]} rows but x has {n}; pass one target row per input row")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("y contains NaN or Inf; remove or impute those samples first")
    return t, one_d


def as_inputs(x: Any, name: str, dtype=torch.float64, device=None) -> torch.Tensor:
    t = as_float_tensor(x, name, dtype=resolve_dtype(dtype), device=device)
    return t.reshape(t.shape[0], -1)


def regularization(kernel: KernelFunction, x: torch.Tensor, diag_reg: float, absolute: bool) -> float:
    """lambda of (K + lambda I): ``diag_reg`` itself, or ``diag_reg * trace(K) / n`` (ntkit's and
    neural-tangents' relative convention), the trace from the kernel's O(n d) diagonal."""
    if isinstance(diag_reg, bool) or not isinstance(diag_reg, (int, float)) or not (0 <= diag_reg < math.inf):
        raise ValueError(f"diag_reg must be a finite number >= 0, got {diag_reg!r}")
    if absolute or diag_reg == 0:
        return float(diag_reg)
    return float(diag_reg) * float(kernel(x, diagonal=True, dtype=x.dtype).mean())


def row_block(n_cols: int, item: int, memory_budget: float | None, device, what: str) -> int:
    """Rows of a (rows, n_cols) kernel block that fit in the budget with its temporaries."""
    budget = memory_budget if memory_budget is not None else 0.5 * available_memory_bytes(device)
    rows = int(budget // (_LIVE * n_cols * item))
    check_memory(_LIVE * n_cols * item, budget, f"one row of {what} ({n_cols} columns, with temporaries)",
                 "raise memory_budget or use fewer centers")
    return max(1, rows)


def kernel_blocks(kernel: KernelFunction, x1: torch.Tensor, x2: torch.Tensor, rows: int):
    """Yield (start, K(x1[start:start+rows], x2)) block by block (computed on the fly, never stored)."""
    for i in range(0, x1.shape[0], rows):
        yield i, kernel(x1[i:i + rows], x2, dtype=x1.dtype)


def blockwise_matmul(kernel: KernelFunction, x1: torch.Tensor, x2: torch.Tensor, v: torch.Tensor, rows: int) -> torch.Tensor:
    """K(x1, x2) @ v by row blocks of x1."""
    out = v.new_empty((x1.shape[0], v.shape[1]))
    for i, blk in kernel_blocks(kernel, x1, x2, rows):
        out[i:i + blk.shape[0]] = blk @ v
    return out


def _psd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^{-1} b for a symmetric PSD ``a``: Cholesky, or the pseudo-inverse by eigendecomposition when
    ``a`` is singular (zero modes dropped, as the dynamics' t = inf limit does)."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        x = torch.cholesky_solve(b, chol)
        if bool(torch.isfinite(x).all()):
            return x
    w, v = symmetric_eigh(a)
    w, v = w.to(a.device), v.to(a.device)
    return _eig_solve(w, v, v.T @ b, 0.0, _eig_tol(w))


def _eig_tol(w: torch.Tensor) -> float:
    """Eigenvalues at or below this are treated as zero modes: max |w| x size x machine epsilon."""
    return max(float(w.abs().max()), 1e-300) * w.shape[0] * torch.finfo(w.dtype).eps


def _eig_solve(w: torch.Tensor, v: torch.Tensor, vtb: torch.Tensor, shift: float, tol: float) -> torch.Tensor:
    """(a + shift I)^+ b from a = v diag(w) v^T and vtb = v^T b, modes with w + shift <= tol dropped."""
    den = w + shift
    inv = torch.where(den > tol, 1.0 / torch.where(den > tol, den, torch.ones_like(den)), torch.zeros_like(den))
    return v @ (inv[:, None] * vtb)


def pcg(matvec, b: torch.Tensor, precond=None, *, tol: float, max_iter: int, progress=True, desc="CG",
        columns: bool = False):
    """Preconditioned conjugate gradients for a symmetric PSD operator, one column of ``b`` per system
    (Hestenes & Stiefel 1952; Saad 2003, Alg. 9.1). Stops when every ||r_j|| <= tol ||b_j||.

    ``columns=True``: ``matvec(v, idx)`` is called with the columns ``idx`` of the systems not yet converged
    only (each column may be a different operator, e.g. another ridge parameter), so converged systems stop
    costing matrix-vector products.

    Returns (x, iterations, relative residual history)."""
    x = torch.zeros_like(b)
    r = b.clone()
    bnorm = b.norm(dim=0).clamp_min(torch.finfo(b.dtype).tiny)
    z = precond(r) if precond is not None else r
    p = z.clone()
    rz = (r * z).sum(0)
    hist = [float((r.norm(dim=0) / bnorm).max())]  # 0 for b = 0: x = 0 is exact
    it = 0
    with _progress(total=max_iter, desc=desc, unit="it", enabled=progress) as bar:
        for it in range(1, max_iter + 1):
            res = r.norm(dim=0) / bnorm
            active = res > tol
            if not bool(active.any()):
                it -= 1
                break
            if columns and not bool(active.all()):
                idx = active.nonzero().flatten()
                ap = torch.zeros_like(p)
                ap[:, idx] = matvec(p[:, idx], idx)
            else:
                ap = matvec(p, torch.arange(p.shape[1], device=p.device)) if columns else matvec(p)
            pap = (p * ap).sum(0)
            ok = active & (pap > 0)
            alpha = torch.where(ok, rz / torch.where(ok, pap, torch.ones_like(pap)), torch.zeros_like(pap))
            x.add_(p * alpha)
            r.sub_(ap * alpha)
            hist.append(float((r.norm(dim=0) / bnorm).max()))
            bar.update(1)
            if hist[-1] <= tol:
                break
            z = precond(r) if precond is not None else r
            rz_new = (r * z).sum(0)
            beta = torch.where(ok, rz_new / torch.where(ok, rz, torch.ones_like(rz)), torch.zeros_like(rz))
            p = z + p * beta
            rz = rz_new
    return x, it, hist
