"""Checks at the public boundary: dtypes, shapes, finite rows, memory budgets.

Every public entry point of ntkit calls these once; internal kernel rules trust their input.
Errors name what was wrong (with values) and say what to do about it.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
from typing import Any

import numpy as np
import torch

__all__ = [
    "ConfigError",
    "MemoryBudgetError",
    "as_float_tensor",
    "check_pair",
    "check_finite_rows",
    "resolve_dtype",
    "available_memory_bytes",
    "check_memory",
    "format_bytes",
]


class ConfigError(ValueError):
    """An architecture description or config is invalid (unknown layer, missing key, bad value)."""


class MemoryBudgetError(ValueError):
    """A request needs more memory than the budget allows and cannot be split into blocks."""


_DTYPES = {
    "float64": torch.float64,
    "double": torch.float64,
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: Any, default: torch.dtype = torch.float64) -> torch.dtype:
    """Turn ``None``, a torch dtype, a numpy dtype or a name into a floating torch dtype."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        out = dtype
    elif isinstance(dtype, str) and dtype in _DTYPES:
        out = _DTYPES[dtype]
    else:
        try:
            out = torch.from_numpy(np.zeros(0, dtype=np.dtype(dtype))).dtype
        except TypeError as exc:
            raise TypeError(f"dtype={dtype!r} is not a dtype; use torch.float64 or torch.float32") from exc
    if not out.is_floating_point:
        raise TypeError(f"dtype={dtype!r} is not a floating-point dtype; use torch.float64 or torch.float32")
    return out


def as_float_tensor(
    x: Any,
    name: str = "x",
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    min_ndim: int = 2,
    check_finite: bool = True,
    allow_empty: bool = False,
) -> torch.Tensor:
    """Validate an input batch and return it as a floating torch tensor.

    Accepts numpy arrays, torch tensors and nested lists of floats. Rejects integer/bool/complex
    dtypes (``TypeError``), too few dimensions, empty batches, and rows with NaN or Inf
    (``ValueError`` naming the first bad row).
    """
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        if x.dtype.kind not in "f":
            raise TypeError(
                f"{name} has dtype {x.dtype}; ntkit needs floating-point inputs. "
                f"Convert with {name}.astype(np.float64)."
            )
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # pragma: no cover - exotic input
            raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}") from exc
        if arr.dtype.kind not in "f":
            raise TypeError(
                f"{name} must be a floating-point array or tensor, got {type(x).__name__} "
                f"with dtype {arr.dtype}; convert it to float64 first."
            )
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if not t.is_floating_point():
        raise TypeError(
            f"{name} has dtype {t.dtype}; ntkit needs floating-point inputs. Convert with {name}.double()."
        )
    if t.ndim < min_ndim:
        hint = " Reshape a single sample with x.reshape(1, -1) or a single feature with x.reshape(-1, 1)."
        raise ValueError(f"{name} must have at least {min_ndim} dimensions (batch first), got shape "
                         f"{tuple(t.shape)}.{hint if min_ndim == 2 else ''}")
    if t.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (batch size 0); pass at least one sample.")
    if any(s == 0 for s in t.shape[1:]):
        raise ValueError(f"{name} has a zero-sized feature dimension: shape {tuple(t.shape)}.")
    out_dtype = dtype if dtype is not None else t.dtype
    t = t.to(device=device, dtype=out_dtype)
    if check_finite:
        check_finite_rows(t, name)
    return t


def check_finite_rows(t: torch.Tensor, name: str = "x") -> None:
    """Raise ``ValueError`` naming the first row (sample) that holds NaN or Inf."""
    if t.numel() == 0:
        return
    finite = torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten()
        row = int(bad[0])
        kind = "NaN" if bool(torch.isnan(t[row]).any()) else "Inf"
        more = f" ({len(bad)} bad rows in all)" if len(bad) > 1 else ""
        raise ValueError(f"{name} row {row} contains {kind}{more}; remove or impute non-finite samples first.")


def check_pair(
    x1: Any,
    x2: Any = None,
    *,
    dtype: torch.dtype | None = torch.float64,
    device: torch.device | str | None = None,
    min_ndim: int = 2,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate ``x1`` and optional ``x2`` and check that their per-sample shapes agree."""
    t1 = as_float_tensor(x1, "x1", dtype=dtype, device=device, min_ndim=min_ndim)
    if x2 is None:
        return t1, None
    t2 = as_float_tensor(x2, "x2", dtype=t1.dtype, device=t1.device, min_ndim=min_ndim)
    if t1.shape[1:] != t2.shape[1:]:
        if t1.ndim == 2 and t2.ndim == 2:
            raise ValueError(f"x2 has {t2.shape[1]} features, x1 has {t1.shape[1]}; both must have the same "
                             "number of features.")
        raise ValueError(f"x1 samples have shape {tuple(t1.shape[1:])} but x2 samples have shape "
                         f"{tuple(t2.shape[1:])}; they must match.")
    return t1, t2


def available_memory_bytes(device: torch.device | str | None = None) -> int:
    """Memory that can still be allocated on ``device`` (RAM for CPU, free GPU memory for CUDA)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * 1024**3


_MADV_HUGEPAGE = 14
_HUGEPAGE_MIN_BYTES = 32 * 1024**2
_libc = None


def empty_output(shape: tuple, dtype: torch.dtype, device: torch.device | str | None = None, *,
                 min_bytes: int = _HUGEPAGE_MIN_BYTES) -> torch.Tensor:
    """``torch.empty`` for a large result matrix that is about to be written once, tile by tile.

    A fresh n x n output is paid for in page faults when its pages are first touched (on this class of
    machine ~30 ms per 128 MiB with 4 KiB pages). On Linux, CPU tensors of 32 MiB or more are advised
    to use transparent huge pages (``madvise(MADV_HUGEPAGE)``, as PyTorch's own ``THP_MEM_ALLOC_ENABLE``
    does), which cuts that cost several-fold. Purely a performance hint: any failure is ignored.
    ``min_bytes`` lowers the threshold for large temporaries that are allocated again and again.
    """
    global _libc
    t = torch.empty(shape, dtype=dtype, device=device)
    size = t.numel() * t.element_size()
    if (t.device.type != "cpu" or size < min_bytes or not sys.platform.startswith("linux")
            or _libc is False):
        return t
    try:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        page = 4096
        ptr = t.data_ptr()
        start = (ptr + page - 1) // page * page
        length = (ptr + size - start) // page * page
        if length > 0:
            _libc.madvise(start, length, _MADV_HUGEPAGE)
    except Exception:  # pragma: no cover - a hint only: never try again
        _libc = False
    return t


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def check_memory(needed_bytes: float, budget_bytes: float | None, what: str, hint: str) -> None:
    """Raise :class:`MemoryBudgetError` when ``needed_bytes`` exceeds the budget.

    ``budget_bytes`` None means 90% of the memory available now on the CPU.
    """
    if budget_bytes is None:
        budget_bytes = 0.9 * available_memory_bytes()
    if isinstance(budget_bytes, bool) or not (isinstance(budget_bytes, numbers.Real) and math.isfinite(budget_bytes)
                                               and budget_bytes > 0):
        raise ValueError(f"memory_budget must be a positive finite number of bytes, got {budget_bytes!r}")
    if needed_bytes > budget_bytes:
        raise MemoryBudgetError(
            f"{what} needs {format_bytes(needed_bytes)}, more than the memory budget of "
            f"{format_bytes(budget_bytes)}; {hint}"
        )


def check_nonnegative(value: Any, name: str, *, allow_none: bool = False) -> float | None:
    """Check a scale parameter (a standard deviation, a rate): a finite number >= 0."""
    if value is None:
        if allow_none:
            return None
        raise ConfigError(f"{name} must be a number >= 0, got None")
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a number >= 0, got {value!r}") from exc
    if not math.isfinite(v) or v < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return v
