"""Mercer eigenvalues of zonal (dot-product) kernels on the sphere S^{d-1} by the Funk-Hecke formula.

A kernel k(x, y) = kappa(<x, y>) on S^{d-1} (inputs x in R^d with ||x|| = 1) is diagonalised by the spherical
harmonics: for every harmonic Y_k of degree k (there are N(d, k) independent ones),

    integral over S^{d-1} of kappa(<x, y>) Y_k(y) dsigma(y) = lambda_k Y_k(x),

with sigma the **uniform probability measure** on the sphere (the convention used throughout this module,
under which the eigenvalues of the Gram matrix K / n of n uniform points converge to the lambda_k, each
repeated N(d, k) times). The Funk-Hecke formula (Atkinson & Han 2012, "Spherical Harmonics and
Approximations on the Unit Sphere", Thm. 2.22; Bietti & Mairal 2019, Eq. (12)) gives

    lambda_k = (omega_{d-2} / omega_{d-1}) integral_{-1}^{1} kappa(t) P_k^{(d)}(t) (1 - t^2)^{(d-3)/2} dt,

where omega_{p-1} = 2 pi^{p/2} / Gamma(p/2) is the surface area of S^{p-1} and P_k^{(d)} is the Legendre
polynomial of degree k in dimension d (Gegenbauer C_k^{((d-2)/2)} normalised so that P_k^{(d)}(1) = 1),
evaluated by its three-term recurrence (Atkinson & Han, Eq. (2.79))

    P_{k+1}(t) = ((2k + d - 2) t P_k(t) - k P_{k-1}(t)) / (k + d - 2),   P_0 = 1, P_1 = t,

which is stable for |t| <= 1 at any degree (no large-coefficient power forms). Mercer's theorem gives
kappa(1) = sum_k N(d, k) lambda_k.

Quadrature. The kernels of interest have kinks at t = +-1: the ReLU NTK contains arccos t ~ sqrt(2 (1 - t)),
the Laplace kernel exp(-c sqrt(2 - 2 t)), gamma-exponential kernels (2 - 2t)^{gamma/2}. The substitution
t = cos(theta) turns sqrt(1 -+ t) into the analytic sqrt(2) sin(theta/2), cos(theta/2) and the weight
(1 - t^2)^{(d-3)/2} dt into sin^{d-2}(theta) d theta; a further sigmoidal (Kress) change of variable
theta = pi g(s), g(s) = s^p / (s^p + (1 - s)^p), makes any remaining algebraic endpoint singularity
theta^gamma vanish to order ~p gamma, and Gauss-Legendre quadrature in s then converges geometrically for
the analytic cases and fast for the others. The order is doubled until two successive estimates agree
(``rtol``), and the achieved difference is returned as the error estimate.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from scipy.special import roots_legendre

from .._validation import as_float_tensor
from ..kernels.architecture import Architecture
from ..kernels.base import KernelFunction

__all__ = ["harmonic_multiplicity", "legendre_sphere", "zonal_kernel", "MercerSpectrum", "mercer_eigenvalues",
           "DecayFit", "decay_exponent"]

_KRESS_P = 4


def _check_dim(d: Any) -> int:
    if isinstance(d, bool) or int(d) != d or d < 2:
        raise ValueError(f"d (the input dimension; the sphere is S^(d-1)) must be an integer >= 2, got {d!r}")
    return int(d)


def harmonic_multiplicity(d: int, k: int | Sequence[int]) -> int | torch.Tensor:
    """N(d, k): the number of linearly independent spherical harmonics of degree k on S^{d-1}.

    N(d, 0) = 1 and N(d, k) = (2k + d - 2) / k * binom(k + d - 3, k - 1) for k >= 1 (Atkinson & Han 2012,
    Eq. (2.10)); e.g. 2k + 1 on S^2 (d = 3) and 2 on the circle (d = 2, k >= 1).
    """
    d = _check_dim(d)

    def one(k: int) -> int:
        if int(k) != k or k < 0:
            raise ValueError(f"degree k must be an integer >= 0, got {k!r}")
        k = int(k)
        if k == 0:
            return 1
        return (2 * k + d - 2) * math.comb(k + d - 3, k - 1) // k

    if isinstance(k, (int, np.integer)):
        return one(int(k))
    return torch.tensor([one(int(v)) for v in k], dtype=torch.float64)


def legendre_sphere(k_max: int, d: int, t: Any) -> torch.Tensor:
    """P_k^{(d)}(t) for k = 0..k_max: Legendre (Gegenbauer, P_k(1) = 1) polynomials of dimension d.

    Three-term recurrence (Atkinson & Han 2012, Eq. (2.79)); returns ``(k_max + 1, *t.shape)`` in t's dtype.
    For d = 3 these are the classical Legendre polynomials, for d = 2 the Chebyshev polynomials T_k.
    """
    d = _check_dim(d)
    if int(k_max) != k_max or k_max < 0:
        raise ValueError(f"k_max must be an integer >= 0, got {k_max!r}")
    tt = t if isinstance(t, torch.Tensor) else torch.as_tensor(np.asarray(t, dtype=np.float64))
    out = torch.empty((int(k_max) + 1, *tt.shape), dtype=tt.dtype, device=tt.device)
    out[0] = 1.0
    if k_max >= 1:
        out[1] = tt
    for k in range(1, int(k_max)):
        out[k + 1] = ((2 * k + d - 2) * tt * out[k] - k * out[k - 1]) / (k + d - 2)
    return out


def _area_ratio(d: int) -> float:
    """omega_{d-2} / omega_{d-1} = Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2))."""
    return math.exp(math.lgamma(d / 2) - math.lgamma((d - 1) / 2)) / math.sqrt(math.pi)


def zonal_kernel(kernel: Any, d: int, *, get: str = "ntk") -> Callable[[torch.Tensor], torch.Tensor]:
    """kappa as a function of the angle theta = arccos <x, y> between unit vectors of R^d.

    ``kernel`` is an :class:`~ntkit.Architecture` (its ``get`` kernel), a :class:`~ntkit.KernelFunction`
    (e.g. ``ntkit.Laplace()``), or a callable of the cosine t (a tensor) returning kappa(t). Architectures
    and kernel functions are evaluated exactly on the pairs x = e_1, y = cos(theta) e_1 + sin(theta) e_2 of
    unit vectors in R^d (so input scalings such as the NTK parameterization's 1/d are those of real inputs
    on the sphere), vectorised over all angles with ``diagonal=True``.
    """
    d = _check_dim(d)
    if isinstance(kernel, Architecture):
        if get not in ("ntk", "nngp"):
            raise ValueError(f"get must be 'ntk' or 'nngp', got {get!r}")

        def evaluate(x1, x2):
            return kernel.kernel(x1, x2, get, diagonal=True)
    elif isinstance(kernel, KernelFunction):
        def evaluate(x1, x2):
            return kernel(x1, x2, diagonal=True)
    elif callable(kernel):
        def from_t(theta: torch.Tensor) -> torch.Tensor:
            val = kernel(torch.cos(theta))
            val = torch.as_tensor(val, dtype=theta.dtype)
            if val.shape != theta.shape:
                raise ValueError(f"the kernel callable returned shape {tuple(val.shape)} for {theta.numel()} "
                                 "cosines; it must act elementwise on a tensor of cosines t")
            return val
        return from_t
    else:
        raise TypeError(f"kernel must be an ntkit Architecture, a KernelFunction or a callable of the cosine t, "
                        f"got {type(kernel).__name__}")

    def from_theta(theta: torch.Tensor) -> torch.Tensor:
        n = theta.numel()
        x1 = torch.zeros((n, d), dtype=theta.dtype, device=theta.device)
        x1[:, 0] = 1.0
        x2 = torch.zeros_like(x1)
        x2[:, 0] = torch.cos(theta.reshape(-1))
        x2[:, 1] = torch.sin(theta.reshape(-1))
        return evaluate(x1, x2).reshape(theta.shape).to(theta.dtype)

    return from_theta


@lru_cache(maxsize=32)
def _nodes(order: int, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Angles theta_j in (0, pi) and weights w_j with sum_j w_j f(theta_j) ~ integral_0^pi f(theta) dtheta,
    from Gauss-Legendre in s on (0, 1) under theta = pi s^p / (s^p + (1 - s)^p)."""
    x, w = roots_legendre(order)
    s = 0.5 * (x + 1.0)
    ws = 0.5 * w
    a, b = s**p, (1.0 - s) ** p
    den = a + b
    g = a / den
    dg = p * s ** (p - 1) * (1.0 - s) ** (p - 1) / den**2
    return math.pi * g, math.pi * dg * ws


class MercerSpectrum(NamedTuple):
    """Mercer eigenvalues of a zonal kernel on S^{d-1} (see :func:`mercer_eigenvalues`).

    eigenvalues : (k_max + 1,) lambda_k, w.r.t. the uniform probability measure on the sphere
    multiplicities : (k_max + 1,) N(d, k)
    degrees : (k_max + 1,) k
    error : (k_max + 1,) |lambda_k(order) - lambda_k(order / 2)|, the quadrature error estimate
    order : number of quadrature nodes of the returned values
    d : input dimension
    """

    eigenvalues: torch.Tensor
    multiplicities: torch.Tensor
    degrees: torch.Tensor
    error: torch.Tensor
    order: int
    d: int


def mercer_eigenvalues(kernel: Any, d: int, k_max: int = 50, *, get: str = "ntk", rtol: float = 1e-11,
                       order: int | None = None, max_order: int = 1 << 15) -> MercerSpectrum:
    """Eigenvalues lambda_0..lambda_{k_max} of a zonal kernel on S^{d-1} by the Funk-Hecke formula.

    Convention: eigenvalues of the integral operator f -> integral kappa(<x, y>) f(y) dsigma(y) with sigma the
    uniform **probability** measure on S^{d-1}; lambda_k has multiplicity N(d, k) (:func:`harmonic_multiplicity`),
    and

        lambda_k = (omega_{d-2} / omega_{d-1}) integral_{-1}^{1} kappa(t) P_k^{(d)}(t) (1 - t^2)^{(d-3)/2} dt

    (Funk-Hecke; Atkinson & Han 2012, Thm. 2.22; Bietti & Mairal 2019, Eq. (12)), omega_{p-1} the area of
    S^{p-1}, P_k^{(d)} the Legendre polynomial with P_k^{(d)}(1) = 1. So the eigenvalues of K / n for n
    uniform points on the sphere tend to these, each repeated N(d, k) times, and sum_k N(d, k) lambda_k =
    kappa(1).

    Parameters
    ----------
    kernel : Architecture, KernelFunction or callable of t
        See :func:`zonal_kernel`. For an Architecture, the FC NTK/NNGP on unit-norm inputs of R^d;
        for ``ntkit.Laplace`` / ``ntkit.GammaExponential``, kappa(t) = k(||x - y|| = sqrt(2 - 2t)).
    d : int >= 2
        Input dimension (the sphere is S^{d-1}).
    k_max : int
        Largest degree.
    get : "ntk" or "nngp" (architectures only)
    rtol : float
        Doubling stops when |lambda_k(N) - lambda_k(N/2)| <= rtol |lambda_k(N)| + atol for all k, with
        atol = 1e3 eps max_t |kappa(t)| (eigenvalues below atol -- e.g. the vanishing odd ones of the
        bias-free ReLU NTK -- are known only to that absolute accuracy).
    order : int, optional
        A fixed number of nodes (no doubling; the error is estimated against order / 2).
    max_order : int
        Largest number of nodes before giving up with a warning.

    Returns
    -------
    MercerSpectrum
    """
    d = _check_dim(d)
    if isinstance(k_max, bool) or int(k_max) != k_max or k_max < 0:
        raise ValueError(f"k_max must be an integer >= 0, got {k_max!r}")
    k_max = int(k_max)
    if not rtol > 0:
        raise ValueError(f"rtol must be > 0, got {rtol!r}")
    kap = zonal_kernel(kernel, d, get=get)
    ratio = _area_ratio(d)

    def estimate(n: int) -> tuple[torch.Tensor, float]:
        theta_np, w_np = _nodes(n, _KRESS_P)
        theta = torch.as_tensor(theta_np, dtype=torch.float64)
        w = torch.as_tensor(w_np, dtype=torch.float64)
        vals = kap(theta)
        if not bool(torch.isfinite(vals).all()):
            raise ValueError("the kernel is not finite at some angles on the sphere; check its parameters")
        weight = w * torch.sin(theta) ** (d - 2) if d != 2 else w
        p = legendre_sphere(k_max, d, torch.cos(theta))
        return ratio * (p @ (weight * vals)), float(vals.abs().max())

    if order is not None:
        if int(order) != order or order < 4:
            raise ValueError(f"order must be an integer >= 4, got {order!r}")
        lam, _ = estimate(int(order))
        half, _ = estimate(max(2, int(order) // 2))
        n = int(order)
    else:
        n = max(64, 2 * (k_max + 16))
        half, scale = estimate(n)
        while True:
            n *= 2
            lam, scale = estimate(n)
            atol = 1e3 * torch.finfo(torch.float64).eps * scale
            if bool(((lam - half).abs() <= rtol * lam.abs() + atol).all()):
                break
            if n >= max_order:
                worst = float(((lam - half).abs() / lam.abs().clamp_min(atol)).max())
                warnings.warn(f"mercer_eigenvalues: {n} quadrature nodes reach a relative change of {worst:.2g} "
                              f"between the last two orders, above rtol={rtol:g}", RuntimeWarning, stacklevel=2)
                break
            half = lam
    degrees = torch.arange(k_max + 1)
    return MercerSpectrum(lam, harmonic_multiplicity(d, range(k_max + 1)), degrees, (lam - half).abs(), n, d)


class DecayFit(NamedTuple):
    """Least-squares fit log lambda_k = intercept + exponent * log k (see :func:`decay_exponent`)."""

    exponent: float
    stderr: float
    intercept: float
    degrees: torch.Tensor


def decay_exponent(eigenvalues: Any, k_min: int = 1, k_max: int | None = None, *, parity: str | None = None,
                   degrees: Any = None) -> DecayFit:
    """Power-law decay exponent of Mercer eigenvalues: the slope of an ordinary least-squares fit of
    log lambda_k against log k over k_min <= k <= k_max, with its standard error.

    For the ReLU NTK and the Laplace kernel on S^{d-1}, lambda_k ~ k^{-d} (Bietti & Mairal 2019, Thm. 4 /
    Bietti & Bach 2021; Geifman et al. 2020, Thm. 2), so the exponent is close to -d. The standard error is
    the usual OLS one (residual variance / sum (log k - mean)^2); on exact eigenvalues it measures the
    curvature of log lambda vs log k (pre-asymptotic corrections), not noise.

    Parameters
    ----------
    eigenvalues : (K,) lambda_k for k = 0..K-1 (or at ``degrees``), or a :class:`MercerSpectrum`
    k_min, k_max : inclusive range of degrees fitted (k_min >= 1)
    parity : None, "even" or "odd" -- fit only those degrees (e.g. "even" for the bias-free ReLU NTK, whose
        odd eigenvalues vanish for k >= 3)
    degrees : the degrees of ``eigenvalues`` (default 0..K-1)
    """
    if isinstance(eigenvalues, MercerSpectrum):
        lam, ks = eigenvalues.eigenvalues, eigenvalues.degrees.to(torch.float64)
    else:
        lam = as_float_tensor(eigenvalues, "eigenvalues", dtype=torch.float64, min_ndim=1).reshape(-1)
        ks = (torch.arange(lam.numel(), dtype=torch.float64) if degrees is None
              else as_float_tensor(degrees, "degrees", dtype=torch.float64, min_ndim=1).reshape(-1))
        if ks.numel() != lam.numel():
            raise ValueError(f"degrees has {ks.numel()} entries but eigenvalues has {lam.numel()}")
    if k_min < 1:
        raise ValueError(f"k_min must be >= 1 (log k), got {k_min!r}")
    if parity not in (None, "even", "odd"):
        raise ValueError(f"parity must be None, 'even' or 'odd', got {parity!r}")
    sel = ks >= k_min
    if k_max is not None:
        sel &= ks <= k_max
    if parity is not None:
        sel &= (ks % 2 == 0) if parity == "even" else (ks % 2 == 1)
    if bool((lam[sel] <= 0).any()):
        bad = ks[sel][lam[sel] <= 0].to(torch.int64).tolist()
        raise ValueError(f"eigenvalues at degrees {bad[:10]} are <= 0; fit a range (or a parity) where they "
                         "are positive")
    if int(sel.sum()) < 3:
        raise ValueError(f"need at least 3 degrees to fit, got {int(sel.sum())}")
    x, y = ks[sel].log(), lam[sel].log()
    xm, ym = x.mean(), y.mean()
    sxx = ((x - xm) ** 2).sum()
    slope = ((x - xm) * (y - ym)).sum() / sxx
    icpt = ym - slope * xm
    resid = y - icpt - slope * x
    se = torch.sqrt((resid**2).sum() / (x.numel() - 2) / sxx)
    return DecayFit(float(slope), float(se), float(icpt), ks[sel].to(torch.int64))
