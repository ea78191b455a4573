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

import math
import warnings

import numpy as np
import torch

from ._native import compiling_allowed

__all__ = ["abrelu_dual_math", "abrelu_dual", "abrelu_dual_sum", "auto_fuse", "FUSE_MIN_NUMBERS", "compile_available",
           "acos_poly", "run_compiled", "NOT_COMPILED"]

# fused=None fuses when a kernel computation handles at least this many state numbers per layer
# (pairs of inputs x numbers per pair): from there the eager passes cost minutes and a one-time
# compilation of seconds pays for itself.
FUSE_MIN_NUMBERS = 5e8

_compiled: dict = {}
_failed: set = set()


def compile_available() -> bool:
    """Whether ``torch.compile`` may be tried at all (not disabled by ``NTKIT_NO_COMPILE=1``)."""
    return compiling_allowed() and hasattr(torch, "compile")


def auto_fuse(fused: bool | None, pairs: int, per_pair: int) -> bool:
    """The fusion decision of one kernel call: ``fused`` if given, else whether pairs x per_pair numbers
    reach :data:`FUSE_MIN_NUMBERS` (only position-pair and same-position states: per_pair > 1)."""
    if fused is not None:
        return bool(fused)
    return per_pair > 1 and pairs * per_pair >= FUSE_MIN_NUMBERS


def _asin_coefficients(degree: int = 11) -> tuple[float, ...]:
    """Monomial coefficients of P(z) = (arcsin(sqrt z) - sqrt z) / z^(3/2) on [0, 1/4] (so that
    arcsin(s) = s + s z P(z), z = s^2, for 0 <= s <= 1/2): the Chebyshev interpolant of degree ``degree`` of
    the Taylor series P(z) = sum_{n >= 1} (2n)! / (4^n (n!)^2 (2n + 1)) z^(n - 1) (Abramowitz & Stegun 4.4.40),
    summed to 80 terms. Degree 11 gives arcsin to ~1e-16 absolute on [0, 1/2]."""
    nodes = 0.125 * (np.cos(np.pi * (np.arange(64) + 0.5) / 64) + 1.0)
    terms, c = np.zeros_like(nodes), 1.0
    for n in range(1, 81):
        c *= (2 * n - 1) / (2 * n)
        terms += c / (2 * n + 1) * nodes ** (n - 1)
    fit = np.polynomial.chebyshev.Chebyshev.fit(nodes, terms, degree, domain=[0.0, 0.25])
    return tuple(float(v) for v in fit.convert(kind=np.polynomial.Polynomial).coef)


_ASIN = _asin_coefficients()


def acos_poly(x: torch.Tensor) -> torch.Tensor:
    """arccos(x) for x in [-1, 1] from additions, multiplications, one square root and selections only.

    Written for compiled loops: inductor's vectorised float64 ``acos`` (SLEEF) costs ~4x MKL's eager one and
    ~5x a pass over memory, while this form is as fast as a copy. With a = |x|: for a <= 1/2,
    arccos(a) = pi/2 - arcsin(a); for a > 1/2, arccos(a) = 2 arcsin(sqrt((1 - a) / 2)) (exact near a = 1:
    arccos(1) = 0); arccos(-a) = pi - arccos(a). arcsin(s) = s + s z P(z), z = s^2 <= 1/4, with the degree-11
    polynomial P of :func:`_asin_coefficients` evaluated by Estrin's scheme (short dependency chains).
    Within two units in the last place of pi of torch.acos (float64 and float32; tested).
    """
    a = x.abs()
    big = a > 0.5
    z = torch.where(big, 0.5 - 0.5 * a, a * a)
    s = torch.where(big, torch.sqrt(z), a)
    c = _ASIN
    z2 = z * z
    z4 = z2 * z2
    q0 = (c[0] + c[1] * z) + (c[2] + c[3] * z) * z2
    q1 = (c[4] + c[5] * z) + (c[6] + c[7] * z) * z2
    q2 = (c[8] + c[9] * z) + (c[10] + c[11] * z) * z2
    p = q0 + (q1 + q2 * z4) * z4
    r = s + s * z * p
    r = torch.where(big, 2.0 * r, 0.5 * math.pi - r)
    return torch.where(x < 0, math.pi - r, r)


def abrelu_dual_math(cov, ntk, r1, r2, s1k, s2, d0: float, k: float, i1=None, i2=None, acos=torch.acos):
    """The arc-cosine dual of phi = a min(x, 0) + b max(x, 0) as one elementwise expression
    (Cho & Saul 2009; see :class:`~ntkit.ABRelu`): with rho = clamp(Sigma r1 r2, -1, 1),
    theta = arccos(rho) and D = d0 - k theta,

        Sigma' = k sqrt(q1 q2) sqrt(1 - rho^2) + D Sigma,    Theta' = D Theta.

    ``r1 = (1 + 4 eps) / sqrt(q1)``, ``r2 = 1 / sqrt(q2)``, ``s1k = k sqrt(q1)``, ``s2 = sqrt(q2)`` are
    the per-position factors (small tensors that broadcast against ``cov``), formed as in the eager
    path so that self-correlations are snapped to exactly 1. ``ntk=None``: returns D in its place.
    ``i1``, ``i2``: optional index vectors; the factors of pair m are then ``r1[i1[m]]`` etc. (a symmetric
    tile: the factors are formed once per input, the gather happens inside the fused loop).
    Pure torch: runs eagerly as it is, or compiled into one loop by :func:`abrelu_dual` (there with
    ``acos=acos_poly``).
    """
    if i1 is not None:
        r1, s1k = r1[i1], s1k[i1]
    if i2 is not None:
        r2, s2 = r2[i2], s2[i2]
    rho = torch.clamp(cov * r1 * r2, -1.0, 1.0)
    dmat = d0 - k * acos(rho)
    out = torch.sqrt(1.0 - rho * rho) * s1k * s2 + dmat * cov
    return out, (dmat if ntk is None else ntk * dmat)


def _abrelu_dual_poly(cov, ntk, r1, r2, s1k, s2, d0: float, k: float, i1=None, i2=None):
    return abrelu_dual_math(cov, ntk, r1, r2, s1k, s2, d0, k, i1, i2, acos=acos_poly)


def _compiled_fn(name, fn, dynamic: bool = True):
    f = _compiled.get(name)
    if f is None:
        compiled = torch.compile(fn, dynamic=dynamic, fullgraph=True)

        def f(*args):
            # Python floats (polynomial coefficients, slopes) as compile-time constants: otherwise
            # dynamo turns each into a 0-d tensor input, and inductor splits the expression into several loops
            # over memory. All keys share one code object, whose graphs (dtypes, layouts, ranks, activation
            # slopes) count against one recompile limit: allow more than dynamo's default 8.
            with torch._dynamo.config.patch(specialize_float=True, recompile_limit=64):
                return compiled(*args)

        _compiled[name] = f
    return f


#: what :func:`run_compiled` returns when the compiled function cannot run (the caller computes eagerly)
NOT_COMPILED = object()


def run_compiled(key, make, args: tuple, what: str, *, dynamic: bool = True, stacklevel: int = 3):
    """``make()`` compiled once per ``key`` and called on ``args``; :data:`NOT_COMPILED` when compilation is
    disabled, or failed (once per key and process: then it warns, naming ``what``, and is not retried)."""
    if not compile_available() or key in _failed:
        return NOT_COMPILED
    try:
        f = _compiled.get(key)
        return (f if f is not None else _compiled_fn(key, make(), dynamic))(*args)
    except Exception as err:  # no compiler, unsupported device, ...: the caller's eager path gives the same
        _failed.add(key)
        warnings.warn(f"ntkit: compiling the {what} failed ({type(err).__name__}: "
                      f"{str(err).splitlines()[0][:200] if str(err) else ''}); using eager torch",
                      RuntimeWarning, stacklevel=stacklevel)
        return NOT_COMPILED


def abrelu_dual(cov, ntk, r1, r2, s1k, s2, d0: float, k: float, i1=None, i2=None):
    """:func:`abrelu_dual_math`, compiled (one pass; inputs made contiguous-friendly by the caller), or
    eager when compilation is unavailable or failed once in this process."""
    key = ("abrelu", cov.dtype, cov.device.type, ntk is None, i1 is None, i2 is None)
    out = run_compiled(key, lambda: _abrelu_dual_poly, (cov, ntk, r1, r2, s1k, s2, d0, k, i1, i2),
                       "fused arc-cosine kernel")
    if out is not NOT_COMPILED:
        return out
    return abrelu_dual_math(cov, ntk, r1, r2, s1k, s2, d0, k, i1, i2)


def _abrelu_dual_sum_poly(cov, ntk, r1, r2, s1k, s2, d0: float, k: float):
    out, t = abrelu_dual_math(cov, ntk, r1, r2, s1k, s2, d0, k, acos=acos_poly)
    dims = tuple(range(1, cov.ndim))
    return out.sum(dim=dims), (None if ntk is None else t.sum(dim=dims))


def abrelu_dual_sum(cov: torch.Tensor, ntk: torch.Tensor | None, r1: torch.Tensor, r2: torch.Tensor,
                    s1k: torch.Tensor, s2: torch.Tensor, d0: float, k: float
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sums over all axes but the first of both results of :func:`abrelu_dual_math`: the dual followed
    by a (global average) pooling in one compiled loop that never writes the dual's outputs. ``ntk=None``:
    ``(sum of Sigma', None)``. Eager when compilation is unavailable or failed once in this process."""
    key = ("abrelu_sum", cov.dtype, cov.device.type, ntk is None)
    res = run_compiled(key, lambda: _abrelu_dual_sum_poly, (cov, ntk, r1, r2, s1k, s2, d0, k),
                       "fused arc-cosine kernel")
    if res is not NOT_COMPILED:
        return res
    out, t = abrelu_dual_math(cov, ntk, r1, r2, s1k, s2, d0, k)
    dims = tuple(range(1, cov.ndim))
    return out.sum(dim=dims), (None if ntk is None else t.sum(dim=dims))
