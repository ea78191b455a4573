"""Dense linear algebra shared by the upper layers (bottom layer: imports nothing from ntkit)."""

from __future__ import annotations

import torch

__all__ = ["symmetric_eigh"]

_LAPACK_MIN_N = 512


def symmetric_eigh(k: torch.Tensor, *, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric matrix: ascending eigenvalues and orthonormal eigenvectors (columns).

    On the CPU for n >= 512 this calls LAPACK's divide-and-conquer ``syevd`` through scipy, which is about
    1.4x faster than ``torch.linalg.eigh`` on these machines at n = 4000; the matrix is handed over as the
    Fortran-ordered view of its transpose (equal to itself, being symmetric), so nothing is copied, and with
    ``overwrite=True`` (the caller owns ``k`` and no longer needs it) LAPACK works in its buffer. Elsewhere
    (CUDA, small n, other dtypes) and on any LAPACK failure: ``torch.linalg.eigh``.
    """
    if k.device.type == "cpu" and k.ndim == 2 and k.shape[0] >= _LAPACK_MIN_N and k.dtype in (torch.float32,
                                                                                               torch.float64):
        try:
            import scipy.linalg as sl

            a = k.detach()
            if not a.is_contiguous():
                a, overwrite = a.contiguous(), True
            w, v = sl.eigh(a.numpy().T, driver="evd", check_finite=False, overwrite_a=overwrite)
            return torch.from_numpy(w), torch.from_numpy(v)
        except Exception:  # pragma: no cover - fall back to torch on any LAPACK problem
            pass
    return torch.linalg.eigh(k)
