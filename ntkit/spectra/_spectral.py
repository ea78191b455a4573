"""Spectral diagnostics of a kernel matrix (Jacot et al. 2018, Sec. 5; Xiao et al. 2020, Sec. 3).

Under the MSE gradient flow df/dt = -(eta / m) K (f - y) (m = number of target entries, the loss
normalisation of :mod:`ntkit.dynamics`), the residual's projection on the i-th eigenvector of K decays
like exp(-eta lambda_i t / m): the top kernel principal components are learned first, directions with
small eigenvalues last -- the case for early stopping.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch

from .._linalg import symmetric_eigh
from .._validation import as_float_tensor

__all__ = ["Spectrum", "check_kernel_matrix", "eigendecomposition", "condition_number", "effective_rank",
           "kernel_pca", "convergence_times", "target_projections"]


class Spectrum(NamedTuple):
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric PSD kernel matrix."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor


def check_kernel_matrix(k: Any, name: str = "kernel", *, psd: bool = True) -> torch.Tensor:
    """Validate a kernel matrix: floating, square, finite, symmetric (to rounding); returns (K + K^T) / 2.

    Raises ValueError naming the problem (shape, the first non-finite row, or the largest asymmetry
    max |K - K^T|, tolerated up to 100 eps max |K|).
    """
    t = as_float_tensor(k, name, min_ndim=2)
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"{name} must be a square (n, n) matrix, got shape {tuple(t.shape)}")
    scale = float(t.abs().max())
    asym = float((t - t.T).abs().max())
    tol = 100 * torch.finfo(t.dtype).eps * max(scale, 1e-300)
    if asym > tol:
        raise ValueError(f"{name} is not symmetric: max |K - K^T| = {asym:.3g} (tolerance {tol:.3g}); pass a kernel "
                         "matrix k(X, X), or symmetrise it with (K + K.T) / 2 if the asymmetry is rounding")
    return (t + t.T) / 2


def _clip_psd(vals: torch.Tensor, name: str) -> torch.Tensor:
    """Clip tiny negative eigenvalues (rounding) with a warning; raise on significant ones."""
    top = float(vals.abs().max()) if vals.numel() else 0.0
    tol = 1e3 * torch.finfo(vals.dtype).eps * max(top, 1e-300) * max(1, vals.numel()) ** 0.5
    low = float(vals.min()) if vals.numel() else 0.0
    if low < -tol:
        raise ValueError(f"{name} is not positive semi-definite: smallest eigenvalue {low:.3g} vs largest "
                         f"{top:.3g}; check that it is a kernel (Gram) matrix")
    if low < 0:
        warnings.warn(f"{name}: clipped {int((vals < 0).sum())} negative eigenvalue(s) down to {low:.2g} "
                      "(rounding) to 0", RuntimeWarning, stacklevel=3)
        vals = vals.clamp_min(0.0)
    return vals


def _default_tol(dtype: torch.dtype, n: int) -> float:
    """Default residual tolerance of the subspace iteration: 1e-10, or 10 sqrt(n) eps(dtype) when that is larger.

    A Ritz residual ||K v - lambda v|| / lambda_max cannot fall below the rounding level of the matrix-vector
    products, about eps(dtype) times a slowly growing function of n (measured for float32: 4 eps at n = 60,
    10 eps at n = 2000, i.e. below sqrt(n) eps). In float64 the maximum is 1e-10 for every n < 2e9 (the
    historical default, unchanged); in float32 it is ~1e-5 at n = 60 and ~5e-5 at n = 2000.
    """
    return max(1e-10, 10.0 * math.sqrt(max(n, 1)) * torch.finfo(dtype).eps)


def _check_count(value: Any, what: str, n: float) -> int:
    """A positive integer <= n (the kernel's size), else ValueError naming both."""
    try:
        iv = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{what} must be a positive integer, got {value!r}") from None
    if isinstance(value, bool) or bool(iv != value) or iv < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    if iv > n:
        raise ValueError(f"{what}={iv} exceeds the kernel size n={n}: an n x n kernel has only n eigenpairs; "
                         f"ask for at most {n}")
    return iv


def eigendecomposition(k: Any, top_k: int | None = None, *, name: str = "kernel", tol: float | None = None,
                       max_iter: int = 1000, seed: int = 0) -> Spectrum:
    """Eigenpairs of a symmetric PSD kernel matrix, eigenvalues in descending order.

    Parameters
    ----------
    k : (n, n) kernel matrix (validated by :func:`check_kernel_matrix`: square, finite, symmetric)
    top_k : int, optional
        None computes all pairs (``torch.linalg.eigh``, O(n^3)). An integer 1 <= r <= n (ValueError
        otherwise, naming n); r < n / 2 computes the leading r by block subspace iteration with Rayleigh-Ritz
        (Saad 2011, "Numerical Methods for Large Eigenvalue Problems", Alg. 5.3): a block of 2r + 8 vectors,
        O(n^2 r) per iteration and O(n r) memory, stopped when every wanted Ritz pair has residual
        ||K v - lambda v|| <= tol lambda_max; r >= n / 2 takes the leading r of the full decomposition.
    tol : float, optional
        Relative residual tolerance of the iteration. Default: max(1e-10, 10 sqrt(n) eps), eps =
        ``torch.finfo(K.dtype).eps`` -- 1e-10 in float64, ~1e-5 in float32, where rounding in the
        matrix-vector products puts the attainable residual near a few eps.
    max_iter, seed : of the iteration (seed of its random start; the global RNG is untouched)

    Returns
    -------
    Spectrum(eigenvalues (r,), eigenvectors (n, r))
        Tiny negative eigenvalues from rounding are clipped to 0 with a warning; significant ones raise
        ValueError (not a PSD kernel).
    """
    t = check_kernel_matrix(k, name)
    n = t.shape[0]
    if top_k is not None:
        top_k = _check_count(top_k, "top_k", n)
    if tol is None:
        tol = _default_tol(t.dtype, n)
    else:
        try:
            tol_f = float(tol)
        except (TypeError, ValueError):
            tol_f = math.nan
        if isinstance(tol, bool) or not (math.isfinite(tol_f) and tol_f >= 0):
            raise ValueError(f"tol must be a finite number >= 0 or None (dtype-aware default), got {tol!r}")
        tol = tol_f
    if top_k is None or top_k >= n // 2:
        vals, vecs = symmetric_eigh(t, overwrite=True)  # t is check_kernel_matrix's own copy
        vals = _clip_psd(vals.flip(0), name)
        vecs = vecs.flip(1)
        if top_k is not None:
            vals, vecs = vals[:top_k], vecs[:, :top_k]
        return Spectrum(vals, vecs)
    r = int(top_k)
    block = min(n, 2 * r + 8)  # oversampling: convergence factor lambda_{block+1} / lambda_r per iteration
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    q, _ = torch.linalg.qr(torch.randn(n, block, generator=g, dtype=torch.float64).to(dtype=t.dtype,
                                                                                         device=t.device))
    for _ in range(max_iter):
        z = t @ q
        small = q.T @ z
        w, v = torch.linalg.eigh((small + small.T) / 2)
        w, v = w.flip(0), v.flip(1)
        x, kx = q @ v[:, :r], z @ v[:, :r]
        res = float((kx - x * w[:r]).norm(dim=0).max())
        if res <= tol * max(float(w[0].abs()), 1e-300):
            break
        q, _ = torch.linalg.qr(z @ v)
    else:
        floor = _default_tol(t.dtype, n)
        why = (f"tol={tol:g} is below the {t.dtype} rounding level (~{floor:.1g}); raise tol or leave it at None"
               if tol < floor else "the leading eigenvalues are clustered -- use top_k=None")
        warnings.warn(f"eigendecomposition(top_k={r}) did not converge in {max_iter} iterations (residual "
                      f"{res:.2g} vs tolerance {tol:g} lambda_max); {why}", RuntimeWarning, stacklevel=2)
    return Spectrum(_clip_psd(w[:r], name), x)


def condition_number(k: Any, *, name: str = "kernel") -> float:
    """kappa = lambda_max / lambda_min (inf for a singular kernel): the trainability measure of Xiao et al.
    (2020), Sec. 3 -- gradient descent needs ~kappa steps to fit the slowest direction."""
    vals = eigendecomposition(k, name=name).eigenvalues
    return float(vals[0] / vals[-1]) if float(vals[-1]) > 0 else math.inf


def effective_rank(k: Any, *, name: str = "kernel") -> float:
    """exp of the Shannon entropy of the normalised eigenvalues (Roy & Vetterli 2007): between 1 (one
    dominant direction) and n (flat spectrum)."""
    vals = eigendecomposition(k, name=name).eigenvalues
    p = vals / vals.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def kernel_pca(k: Any, n_components: int, *, center: bool = True, name: str = "kernel") -> torch.Tensor:
    """Kernel PCA scores (n, n_components): sqrt(lambda_i) v_i of the (doubly centred) kernel matrix
    (Schoelkopf, Smola & Mueller 1998).

    ``n_components`` must be an integer in [1, n]; ValueError (naming n) otherwise. With centring the
    centred kernel has rank <= n - 1, so the last column is then zero.
    """
    t = check_kernel_matrix(k, name)
    n_components = _check_count(n_components, "n_components", t.shape[0])
    if center:
        n = t.shape[0]
        h = torch.eye(n, dtype=t.dtype, device=t.device) - 1.0 / n
        t = h @ t @ h
    spec = eigendecomposition(t, n_components, name=name)
    return spec.eigenvectors * spec.eigenvalues.clamp_min(0).sqrt()


def convergence_times(k: Any, *, learning_rate: float = 1.0, n_targets: int | None = None,
                      name: str = "kernel") -> torch.Tensor:
    """Time constants tau_i = m / (eta lambda_i) of the MSE gradient flow along each eigenvector
    (descending eigenvalues, so ascending times; inf for lambda_i = 0). m = number of target entries
    (``n_targets``, a positive integer: n times the number of outputs; default n, one output), matching the
    loss normalisation of :func:`ntkit.dynamics.gradient_descent_mse`."""
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    if n_targets is not None:
        n_targets = _check_count(n_targets, "n_targets", math.inf)
    vals = eigendecomposition(k, name=name).eigenvalues
    m = vals.numel() if n_targets is None else n_targets
    return torch.where(vals > 0, m / (learning_rate * vals.clamp_min(1e-300)), torch.full_like(vals, math.inf))


def target_projections(k: Any, y: Any, *, name: str = "kernel") -> torch.Tensor:
    """<v_i, y> for each eigenvector v_i (rows, descending eigenvalues) and each target column: how much of
    the targets lies along each kernel principal component."""
    spec = eigendecomposition(k, name=name)
    yt = as_float_tensor(y, "y", dtype=spec.eigenvectors.dtype, min_ndim=1)
    if yt.shape[0] != spec.eigenvectors.shape[0]:
        raise ValueError(f"y has {yt.shape[0]} rows but the kernel is {spec.eigenvectors.shape[0]} x "
                         f"{spec.eigenvectors.shape[0]}")
    return spec.eigenvectors.T @ yt.reshape(yt.shape[0], -1)
