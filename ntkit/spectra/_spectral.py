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


def eigendecomposition(k: Any, top_k: int | None = None, *, name: str = "kernel", tol: float = 1e-10,
                       max_iter: int = 1000, seed: int = 0) -> Spectrum:
    """Eigenpairs of a symmetric PSD kernel matrix, eigenvalues in descending order.

    Parameters
    ----------
    k : (n, n) kernel matrix (validated by :func:`check_kernel_matrix`: square, finite, symmetric)
    top_k : int, optional
        None computes all pairs (``torch.linalg.eigh``, O(n^3)). An integer r < n / 2 computes the leading r
        by block subspace iteration with Rayleigh-Ritz (Saad 2011, "Numerical Methods for Large Eigenvalue
        Problems", Alg. 5.3): a block of 2r + 8 vectors, O(n^2 r) per iteration and O(n r) memory, stopped when
        every wanted Ritz pair has residual ||K v - lambda v|| <= tol lambda_max.
    tol, max_iter, seed : of the iteration (seed of its random start; the global RNG is untouched)

    Returns
    -------
    Spectrum(eigenvalues (r,), eigenvectors (n, r))
        Tiny negative eigenvalues from rounding are clipped to 0 with a warning; significant ones raise
        ValueError (not a PSD kernel).
    """
    t = check_kernel_matrix(k, name)
    n = t.shape[0]
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
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
        warnings.warn(f"eigendecomposition(top_k={r}) did not converge in {max_iter} iterations (residual "
                      f"{res:.2g} vs tolerance {tol:g} lambda_max); the leading eigenvalues are clustered -- use "
                      "top_k=None", RuntimeWarning, stacklevel=2)
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
    (Schoelkopf, Smola & Mueller 1998)."""
    t = check_kernel_matrix(k, name)
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
    (default n: one output), matching the loss normalisation of :func:`ntkit.dynamics.gradient_descent_mse`."""
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    vals = eigendecomposition(k, name=name).eigenvalues
    m = vals.numel() if n_targets is None else int(n_targets)
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
