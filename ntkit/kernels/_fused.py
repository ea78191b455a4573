"""Fused elementwise passes: one compiled loop instead of a dozen eager ones, with an eager fallback.

The dual kernel of an activation is a chain of elementwise operations (correlation, clamp, arccos,
square root, products) over the whole kernel state. On position-pair states (CNTK with pooling) each
eager operation is a pass over tens of megabytes, so the chain is memory-bound; ``torch.compile``
(inductor) turns it into one loop that reads the covariance and the NTK once and writes the two results
once. Compilation costs seconds (up to a minute or two the very first time on a machine, then inductor's
on-disk cache makes it a few seconds per process), so it is used only when asked for (``fused=True``)
or when the estimated work is large (``fused=None``, see :func:`auto_fuse`). If compilation is not
available or fails (no C++ compiler, an unsupported device), the same function runs eagerly: the result
is the same up to rounding, never different.
"""

from __future__ import annotations

import os
import warnings

import torch

__all__ = ["abrelu_dual_math", "abrelu_dual", "auto_fuse", "FUSE_MIN_NUMBERS", "compile_available"]

# fused=None fuses when a kernel computation handles at least this many state numbers per layer
# (pairs of inputs x numbers per pair): from there the eager passes cost minutes and a one-time
# compilation of seconds pays for itself.
FUSE_MIN_NUMBERS = 5e8

_compiled: dict = {}
_failed: set = set()


def compile_available() -> bool:
    """Whether ``torch.compile`` may be tried at all (not disabled by ``NTKIT_NO_COMPILE=1``)."""
    return os.environ.get("NTKIT_NO_COMPILE", "0") in ("", "0") and hasattr(torch, "compile")


def auto_fuse(fused: bool | None, pairs: int, per_pair: int) -> bool:
    """The fusion decision of one kernel call: ``fused`` if given, else whether pairs x per_pair numbers
    reach :data:`FUSE_MIN_NUMBERS` (only position-pair and same-position states: per_pair > 1)."""
    if fused is not None:
        return bool(fused)
    return per_pair > 1 and pairs * per_pair >= FUSE_MIN_NUMBERS


def abrelu_dual_math(cov, ntk, r1, r2, s1k, s2, d0: float, k: float, i1=None, i2=None):
    """The arc-cosine dual of phi = a min(x, 0) + b max(x, 0) as one elementwise expression
    (Cho & Saul 2009; see :class:`~ntkit.ABRelu`): with rho = clamp(Sigma r1 r2, -1, 1),
    theta = arccos(rho) and D = d0 - k theta,

        Sigma' = k sqrt(q1 q2) sqrt(1 - rho^2) + D Sigma,    Theta' = D Theta.

    ``r1 = (1 + 4 eps) / sqrt(q1)``, ``r2 = 1 / sqrt(q2)``, ``s1k = k sqrt(q1)``, ``s2 = sqrt(q2)`` are
    the per-position factors (small tensors that broadcast against ``cov``), formed as in the eager
    path so that self-correlations are snapped to exactly 1. ``ntk=None``: returns D in its place.
    ``i1``, ``i2``: optional index vectors; the factors of pair m are then ``r1[i1[m]]`` etc. (a symmetric
    tile: the factors are formed once per input, the gather happens inside the fused loop).
    Pure torch: runs eagerly as it is, or compiled into one loop by :func:`abrelu_dual`.
    """
    if i1 is not None:
        r1, s1k = r1[i1], s1k[i1]
    if i2 is not None:
        r2, s2 = r2[i2], s2[i2]
    rho = torch.clamp(cov * r1 * r2, -1.0, 1.0)
    dmat = d0 - k * torch.acos(rho)
    out = torch.sqrt(1.0 - rho * rho) * s1k * s2 + dmat * cov
    return out, (dmat if ntk is None else ntk * dmat)


def _compiled_fn(name, fn):
    f = _compiled.get(name)
    if f is None:
        f = _compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    return f


def abrelu_dual(cov, ntk, r1, r2, s1k, s2, d0: float, k: float, i1=None, i2=None):
    """:func:`abrelu_dual_math`, compiled (one pass; inputs made contiguous-friendly by the caller), or
    eager when compilation is unavailable or failed once in this process."""
    key = ("abrelu", cov.dtype, cov.device.type, ntk is None, i1 is None, i2 is None)
    if compile_available() and key not in _failed:
        try:
            return _compiled_fn(key, abrelu_dual_math)(cov, ntk, r1, r2, s1k, s2, d0, k, i1, i2)
        except Exception as err:  # no compiler, unsupported device, ...: the eager expression is the same
            _failed.add(key)
            warnings.warn(f"ntkit: compiling the fused arc-cosine kernel failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200] if str(err) else ''}); using eager torch",
                          RuntimeWarning, stacklevel=2)
    return abrelu_dual_math(cov, ntk, r1, r2, s1k, s2, d0, k, i1, i2)

