"""Input checks and conventions shared by the dynamics module.

Loss normalization
------------------
All training here minimizes ``L(f) = (1/m) * sum_ij l(f_ij, y_ij)`` by gradient descent on the
parameters with learning rate ``eta``; in the linearized / infinite-width regime this is the
function-space flow (Jacot et al. 2018, Eq. (3); Lee et al. 2019, Eq. (5))

    df/dt = -eta * K @ dL/df = -(eta / m) * K @ l'(f, y).

``m`` is set by ``loss_normalization``:

* ``"mean"`` (default, as neural-tangents): m = y.size = n * k (mean over all entries);
* ``"sample_mean"``: m = n (mean over samples, sum over outputs);
* ``"sum"``: m = 1;
* a positive number: that m.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .._validation import resolve_dtype
from ..kernels.base import KernelFunction

NORMALIZATIONS = ("mean", "sample_mean", "sum")


def normalization_constant(loss_normalization: Any, n: int, k: int) -> float:
    """The divisor ``m`` of the loss for ``n`` training points with ``k`` outputs each."""
    if isinstance(loss_normalization, str):
        if loss_normalization == "mean":
            return float(n * k)
        if loss_normalization == "sample_mean":
            return float(n)
        if loss_normalization == "sum":
            return 1.0
        raise ValueError(f"loss_normalization must be one of {NORMALIZATIONS} or a positive number, "
                         f"got {loss_normalization!r}")
    try:
        m = float(loss_normalization)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"loss_normalization must be one of {NORMALIZATIONS} or a positive number, "
                        f"got {loss_normalization!r}") from exc
    if not math.isfinite(m) or m <= 0:
        raise ValueError(f"loss_normalization as a number must be finite and > 0, got {loss_normalization!r}")
    return m


def to_tensor(x: Any, name: str, *, dtype=None, device=None, ndim: tuple[int, ...] = (2,),
              finite: bool = True) -> torch.Tensor:
    """numpy / torch / list -> floating tensor with a check of ndim and finiteness."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"{name} must be a real numeric array or tensor, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be real floating point, got {t.dtype}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    t = t.to(dtype=dtype if dtype is not None else t.dtype, device=device)
    if t.ndim not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dimensions, got shape {tuple(t.shape)}")
    if finite and t.numel() and not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise ValueError(f"{name} contains {kind} (first at index {tuple(bad)}); remove or impute "
                         "non-finite values first.")
    return t


def targets(y: Any, n: int | None, *, dtype, device, name: str = "y_train") -> tuple[torch.Tensor, bool]:
    """Targets as (n, k); returns (tensor, was_1d)."""
    t = to_tensor(y, name, dtype=dtype, device=device, ndim=(1, 2))
    was_1d = t.ndim == 1
    if was_1d:
        t = t[:, None]
    if n is not None and t.shape[0] != n:
        what = "training" if "train" in name else "test"
        raise ValueError(f"{name} has {t.shape[0]} rows but the kernel has {n} {what} points; "
                         f"pass one row per {what} point.")
    return t, was_1d


def check_symmetric(t: torch.Tensor, name: str, what: str = "training") -> None:
    """ValueError unless the square matrix ``t`` is symmetric up to 1e-8 relative to its largest entry."""
    asym = float((t - t.T).abs().max()) if t.numel() else 0.0
    scale = float(t.abs().max()) if t.numel() else 0.0
    if asym > 1e-8 * max(scale, 1e-300):
        raise ValueError(f"{name} is not symmetric (max |K - K^T| = {asym:.3g}, max |K| = {scale:.3g}); "
                         f"pass a kernel matrix of the {what} set with itself.")


def square_kernel(k: Any, name: str, *, dtype=None, device=None) -> torch.Tensor:
    t = to_tensor(k, name, dtype=dtype, device=device)
    if t.shape[0] != t.shape[1]:
        raise ValueError(f"{name} must be square (n_train, n_train), got shape {tuple(t.shape)}")
    check_symmetric(t, name)
    return 0.5 * (t + t.T)


def resolve_kernel(k: Any, x_train: Any, name: str, *, dtype=None, device=None):
    """A train-train matrix, or a KernelFunction evaluated on ``x_train``. Returns (matrix, fn or None)."""
    if isinstance(k, KernelFunction) or (callable(k) and not isinstance(k, (torch.Tensor, np.ndarray))):
        if x_train is None:
            raise ValueError(f"{name} is a kernel function; pass x_train= (the training inputs) too.")
        mat = k(x_train, dtype=resolve_dtype(dtype)) if isinstance(k, KernelFunction) else k(x_train)
        return square_kernel(mat, name, dtype=dtype, device=device), k
    if x_train is not None:
        raise ValueError(f"x_train is only used when {name} is a kernel function; got a matrix and x_train.")
    return square_kernel(k, name, dtype=dtype, device=device), None


def check_rate(value: Any, name: str, *, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return v


def regularize(k: torch.Tensor, diag_reg: float, absolute: bool) -> tuple[torch.Tensor, float]:
    """K + eps I with eps = diag_reg (absolute) or diag_reg * trace(K) / n (relative, as neural-tangents)."""
    diag_reg = check_rate(diag_reg, "diag_reg", allow_zero=True)
    n = k.shape[0]
    eps = diag_reg if absolute else diag_reg * float(torch.trace(k)) / n
    if eps == 0:
        return k, 0.0
    return k + eps * torch.eye(n, dtype=k.dtype, device=k.device), eps


def times(t: Any, *, discrete: bool = False, dtype=torch.float64, device=None) -> tuple[torch.Tensor, bool]:
    """Times as a 1-d tensor (allowing +inf); returns (tensor, was_scalar)."""
    if isinstance(t, torch.Tensor):
        tt = t.detach().to(dtype=dtype, device=device)
    else:
        tt = torch.as_tensor(np.asarray(t, dtype=np.float64), dtype=dtype, device=device)
    scalar = tt.ndim == 0
    tt = tt.reshape(-1)
    if bool(torch.isnan(tt).any()):
        raise ValueError("times contain NaN")
    if bool((tt < 0).any()):
        raise ValueError(f"times must be >= 0 (training runs forward), got min {float(tt.min())}")
    if discrete:
        fin = tt[torch.isfinite(tt)]
        if bool((fin != torch.round(fin)).any()):
            raise ValueError("for discrete gradient descent the times are step counts; pass integers "
                             f"(got e.g. {float(fin[fin != torch.round(fin)][0])}).")
    return tt, scalar


class TrainedTargets:
    """Shared by the predictors: initial outputs and the shape of what ``predict`` returns.

    Subclasses set ``y_train`` (an (n, k) tensor), ``dtype``, ``device`` and ``_y_1d`` (whether the user passed
    one-dimensional targets, which are then returned one-dimensional).
    """

    y_train: torch.Tensor
    _y_1d: bool

    def _f0(self, f0, n, name):
        if f0 is None:
            return torch.zeros(n, self.y_train.shape[1], dtype=self.dtype, device=self.device)
        f, _ = targets(f0, n, dtype=self.dtype, device=self.device, name=name)
        if f.shape[1] != self.y_train.shape[1]:
            raise ValueError(f"{name} has {f.shape[1]} outputs but y_train has {self.y_train.shape[1]}")
        return f

    def _shape(self, x, scalar):
        if self._y_1d:
            x = x[..., 0]
        return x[0] if scalar else x
