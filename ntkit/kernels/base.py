"""The common interface of every kernel in ntkit: a callable ``k(x1, x2=None, *, diagonal=False)``.

Dynamics, spectra, estimators and benchmarks accept any :class:`KernelFunction` (or a precomputed
matrix), so an architecture's NTK, its NNGP, and classical kernels (Laplace, gamma-exponential, RBF)
are interchangeable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from .._validation import check_pair, resolve_dtype

__all__ = ["KernelFunction"]


class KernelFunction(ABC):
    """A positive semi-definite kernel on batches of inputs.

    Subclasses implement :meth:`_matrix` (and optionally :meth:`_diagonal`) on validated
    tensors; :meth:`__call__` does the input work once: numpy/torch conversion, dtype (float64
    by default), device, finite rows, matching feature shapes, ``x2=None`` meaning ``x1``.
    """

    #: short name used in configs and reprs, e.g. "laplace"
    name: str = "kernel"

    def __call__(
        self,
        x1: Any,
        x2: Any = None,
        *,
        diagonal: bool = False,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Kernel matrix ``(n1, n2)`` between the rows of ``x1`` and ``x2`` (``x1`` if None).

        With ``diagonal=True`` returns ``(n1,)`` without forming the matrix: k(x1_i, x1_i), or
        the pairwise values k(x1_i, x2_i) when ``x2`` (with as many rows) is given.
        """
        dt = resolve_dtype(dtype)
        t1, t2 = check_pair(x1, x2, dtype=dt, device=device)
        if diagonal:
            if t2 is not None and t2.shape[0] != t1.shape[0]:
                raise ValueError(f"diagonal=True pairs row i of x1 with row i of x2, but x1 has "
                                 f"{t1.shape[0]} rows and x2 has {t2.shape[0]}.")
            return self._diagonal(t1, t1 if t2 is None else t2)
        return self._matrix(t1, t1 if t2 is None else t2, t2 is None)

    @abstractmethod
    def _matrix(self, x1: torch.Tensor, x2: torch.Tensor, same: bool) -> torch.Tensor:
        """Kernel matrix of validated inputs; ``same`` is True when ``x2`` is ``x1``."""

    def _diagonal(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """k(x1_i, x2_i); the default evaluates one pair at a time (override for speed)."""
        return torch.stack([self._matrix(x1[i : i + 1], x2[i : i + 1], x1 is x2)[0, 0]
                            for i in range(x1.shape[0])])

    def to_config(self) -> dict:
        """A JSON-able description; override in subclasses that can be rebuilt from config."""
        raise NotImplementedError(f"{type(self).__name__} has no config form")

    def __repr__(self) -> str:
        try:
            cfg = self.to_config()
        except NotImplementedError:
            return f"{type(self).__name__}()"
        args = ", ".join(f"{k}={v!r}" for k, v in cfg.items() if k != "kernel")
        return f"{type(self).__name__}({args})"
