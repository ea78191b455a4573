"""Elementwise activations: the finite function phi and its infinite-width dual kernel.

For Gaussian pre-activations (u, v) ~ N(0, [[q1, Sigma], [Sigma, q2]]) an activation maps

    Sigma' = E[phi(u) phi(v)],     Theta' = E[phi'(u) phi'(v)] * Theta

(Jacot et al. 2018, Thm. 1 and Eq. (5)-(6); Lee et al. 2018 for the NNGP map). Every activation
implements :meth:`Activation.dual` returning both expectations; closed forms are used where they
exist (Cho & Saul 2009 for the arc-cosine family, Williams 1997 for erf, Tsuchida et al. 2021 for
GELU), the Hermite (Mehler) expansion for polynomials, and Gauss-Hermite quadrature of the Mehler
expansion for any other torch function (:class:`Elementwise`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch

from .._validation import ConfigError
from . import _fused
from ._state import KernelState, scratch
from .layers import Layer

__all__ = [
    "Activation",
    "ABRelu",
    "Relu",
    "LeakyRelu",
    "Abs",
    "Erf",
    "Gelu",
    "Sign",
    "Sin",
    "Cos",
    "Rbf",
    "Exp",
    "Gaussian",
    "Monomial",
    "Polynomial",
    "Elementwise",
]

_PI = math.pi


def _correlation(cov: torch.Tensor, var1: torch.Tensor, var2: torch.Tensor):
    """(rho, sqrt(q1), sqrt(q2)): rho = Sigma / sqrt(q1 q2) clamped into [-1, 1], 0 where a variance is 0.

    Correlations within a few ulps of +-1 are snapped to exactly +-1. The arc-cosine and arcsine
    kernels have a square-root singularity there, so rounding noise of one ulp in rho would become a
    ~1e-8 relative error after one layer and ~1e-4 after two; snapping keeps coincident and parallel
    inputs exact through any depth (the change it makes, |d rho| <= 4 eps, is rounding-level).
    rho is formed as (Sigma * ((1 + 4 eps) / sqrt(q1))) * (1 / sqrt(q2)) with the reciprocals taken on
    the variance vectors: two multiplications per matrix entry instead of an outer product and a
    division (the rounding of the vector factors, <= 2 eps, stays inside the 4 eps snapping margin).
    """
    s1, s2 = torch.sqrt(var1), torch.sqrt(var2)
    eps = torch.finfo(cov.dtype).eps
    if bool((var1 <= 0).any()) or bool((var2 <= 0).any()):
        sq = torch.mul(s1, s2)
        rho = torch.where(sq > 0, cov / sq.clamp_min(torch.finfo(cov.dtype).tiny), torch.zeros_like(cov))
        return rho.mul_(1.0 + 4 * eps).clamp_(-1.0, 1.0), s1, s2
    rho = torch.mul(cov, (1.0 + 4 * eps) / s1, out=scratch(torch.broadcast_shapes(cov.shape, s1.shape), cov))
    rho = rho.mul_(torch.reciprocal(s2)).clamp_(-1.0, 1.0)
    return rho, s1, s2


class Activation(Layer):
    """Base class of elementwise activation layers.

    Subclasses define :meth:`fn` (the finite function, applied by the finite network) and
    :meth:`dual` (the two Gaussian expectations used by the infinite-width kernel).
    """

    def fn(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def dual(self, cov, var1, var2, derivative: bool = True):
        """Return ``(E[phi(u) phi(v)], E[phi'(u) phi'(v)])`` for the bivariate Gaussian with
        variances ``var1``, ``var2`` and covariance ``cov`` (tensors that broadcast together).

        The second element is None when ``derivative`` is False.
        """
        raise NotImplementedError  # pragma: no cover

    def variance(self, var: torch.Tensor) -> torch.Tensor:
        """E[phi(u)^2] for u ~ N(0, var)."""
        return self.dual(var, var, var, derivative=False)[0]

    # -- layer protocol -------------------------------------------------------------------------
    def apply_kernel(self, k: KernelState, ctx) -> KernelState:
        if isinstance(k, tuple):
            raise ConfigError(f"activation {self.layer_name!r} applied to unmerged branches: after fanout, use "
                              "parallel([...]) for the branches and fanin_sum to merge them")
        if not k.gaussian:
            raise ConfigError(
                f"activation {self.layer_name!r} must act on Gaussian pre-activations: put a Dense layer "
                "(or a residual sum of Dense outputs) before it, not the raw input or another activation."
            )
        fused = None
        if getattr(ctx, "fused", False):
            q1, i1, q2, i2 = k.marginal_parts()
            fused = _merged_spatial(self, k, k.nngp, k.ntk, q1, q2, i1, i2)
        if fused is not None:
            nngp, ntk = fused
        else:
            q1, q2 = k.marginals()  # per-position variances: pointwise on images too
            nngp, dot = self.dual(k.nngp, q1, q2, derivative=k.ntk is not None)
            if k.ntk is None:
                ntk = None
            elif isinstance(k.ntk, torch.Tensor) and isinstance(dot, torch.Tensor):
                ntk = torch.mul(k.ntk, dot, out=scratch(torch.broadcast_shapes(k.ntk.shape, dot.shape), dot))
            else:
                ntk = k.ntk * dot
        if k.pixel_pairs:  # each sample's own position-pair covariance goes through the same dual
            def self_fn(v):
                a, b = k.self_marginals(v)
                f = _merged_spatial(self, k, v, None, a, b) if getattr(ctx, "fused", False) else None
                return f[0] if f is not None else self.dual(v, a, b, derivative=False)[0]
        else:
            self_fn = self.variance
        return k.update(nngp, ntk, self_fn, gaussian=False, fresh=False)

    def _fused_dual(self, cov, ntk, var1, var2, i1=None, i2=None):
        """``(Sigma', Theta')`` from a fused (compiled) pass, or None where this activation has none or the
        inputs need the eager path's special cases. The variances are ``var1[i1]``, ``var2[i2]`` (no
        gather where an index is None)."""
        return None

    def build_module(self, in_features, ctx):
        return _ActivationModule(self), in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _merged_spatial(act: Activation, k: KernelState, cov, ntk, q1, q2, i1=None, i2=None):
    """``act._fused_dual`` on views with the spatial axes merged -- (..., H W, H' W') for pixel pairs,
    (..., H W) for the same-position diagonal -- so that the compiled loop runs along whole images
    (rows of H W numbers) instead of rows of W, whose short tails a vectorised loop handles one number at a
    time. Returns the results in the state's layout, or None (no fused dual)."""
    nd = len(k.shape)
    if nd < 2:
        return act._fused_dual(cov, ntk, q1, q2, i1, i2)
    lead = cov.ndim - (2 * nd if k.pixel_pairs else nd)

    def merged(t):
        if not isinstance(t, torch.Tensor):
            return t
        head = list(t.shape[:t.ndim - (cov.ndim - lead)])
        if not k.pixel_pairs:
            return t.reshape(*head, -1)
        p, q = math.prod(t.shape[-2 * nd:-nd]), math.prod(t.shape[-nd:])
        return t.reshape(*head, p, q)

    out = act._fused_dual(merged(cov), merged(ntk), merged(q1), merged(q2), i1, i2)
    if out is None:
        return None
    return tuple(o.reshape(cov.shape) if isinstance(o, torch.Tensor) else o for o in out)


class _ActivationModule(torch.nn.Module):
    def __init__(self, act: Activation):
        super().__init__()
        self.act = act

    def forward(self, x):
        return self.act.fn(x)

    def extra_repr(self) -> str:
        return repr(self.act)


# ---------------------------------------------------------------------------------------------------
# The arc-cosine family: a*min(x,0) + b*max(x,0)
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ABRelu(Activation):
    """phi(x) = a * min(x, 0) + b * max(x, 0).

    Dual kernel (Cho & Saul 2009, arc-cosine kernel of degree 1, generalised to two slopes): with
    rho = Sigma / sqrt(q1 q2), theta = arccos(rho), k = (a - b)^2 / (2 pi) and
    D = (a^2 + b^2) / 2 - k * theta,

        E[phi(u) phi(v)] = k * sqrt(q1 q2) * sin(theta) + D * Sigma,    E[phi'(u) phi'(v)] = D.

    Homogeneous of degree 1, so bias-free ReLU nets give K(c x, y) = c K(x, y).
    """

    a: float = 0.0
    b: float = 1.0
    layer_name = "abrelu"

    def fn(self, x):
        if self.a == 0.0 and self.b == 1.0:
            return torch.relu(x)
        return self.a * torch.clamp(x, max=0) + self.b * torch.clamp(x, min=0)

    def dual(self, cov, var1, var2, derivative=True):
        a, b = float(self.a), float(self.b)
        k = (a - b) ** 2 / (2 * _PI)
        d0 = (a * a + b * b) / 2
        if k == 0.0:  # linear function: phi = a x
            out = d0 * cov
            return out, (torch.full_like(out, d0) if derivative else None)
        rho, s1, s2 = _correlation(cov, var1, var2)
        # D = d0 - k * theta, in place on theta's buffer (one pass)
        dmat = torch.acos(rho, out=scratch(rho.shape, rho))
        dmat = torch.add(torch.tensor(d0, dtype=dmat.dtype, device=dmat.device), dmat, alpha=-k, out=dmat)
        # k sqrt(q1 q2) sin(theta), sin(theta) = sqrt(1 - rho^2) exactly 0 at rho = +-1, in rho's buffer
        one = torch.ones((), dtype=rho.dtype, device=rho.device)
        out = torch.addcmul(one, rho, rho, value=-1.0, out=rho).sqrt_().mul_(s1 * k).mul_(s2)
        out = out.addcmul_(dmat, cov)
        return out, (dmat if derivative else None)

    def variance(self, var):
        return (self.a**2 + self.b**2) / 2 * var

    def fused_factors(self, var1: torch.Tensor, var2: torch.Tensor, dtype: torch.dtype):
        """The arguments after ``(cov, ntk)`` of :func:`ntkit.kernels._fused.abrelu_dual_math` for the variances
        ``var1``, ``var2`` (shaped to broadcast against the covariance): ``(r1, r2, s1k, s2, d0, k)``, with
        r1 = (1 + 4 eps) / sqrt(var1) so that self-correlations snap to exactly 1. None for the eager path's
        special cases: a linear phi (k = 0) or a zero variance."""
        a, b = float(self.a), float(self.b)
        k = (a - b) ** 2 / (2 * _PI)
        if k == 0.0 or bool((var1 <= 0).any()) or bool((var2 <= 0).any()):
            return None
        s1, s2 = torch.sqrt(var1), torch.sqrt(var2)
        eps = torch.finfo(dtype).eps
        return (1.0 + 4 * eps) / s1, torch.reciprocal(s2), s1 * k, s2, (a * a + b * b) / 2, k

    def _fused_dual(self, cov, ntk, var1, var2, i1=None, i2=None):
        # one compiled pass for the whole dual (ntkit.kernels._fused); the eager special cases (linear phi,
        # a zero variance, Theta still a constant) stay on the eager path
        if ntk is not None and not isinstance(ntk, torch.Tensor):
            return None
        f = self.fused_factors(var1, var2, cov.dtype)
        return None if f is None else _fused.abrelu_dual(cov, ntk, *f, i1, i2)

    def to_config(self):
        return {"layer": "abrelu", "a": self.a, "b": self.b}


class Relu(ABRelu):
    """phi(x) = max(x, 0) (ABRelu(0, 1)); arc-cosine kernel of Cho & Saul (2009)."""

    layer_name = "relu"

    def __init__(self):
        super().__init__(0.0, 1.0)

    def to_config(self):
        return {"layer": "relu"}

    def __repr__(self):
        return "Relu()"


class LeakyRelu(ABRelu):
    """phi(x) = alpha * min(x, 0) + max(x, 0) (ABRelu(alpha, 1))."""

    layer_name = "leaky_relu"

    def __init__(self, alpha: float = 0.01):
        super().__init__(float(alpha), 1.0)

    @property
    def alpha(self) -> float:
        return self.a

    def to_config(self):
        return {"layer": "leaky_relu", "alpha": self.a}

    def __repr__(self):
        return f"LeakyRelu(alpha={self.a})"


class Abs(ABRelu):
    """phi(x) = |x| (ABRelu(-1, 1))."""

    layer_name = "abs"

    def __init__(self):
        super().__init__(-1.0, 1.0)

    def to_config(self):
        return {"layer": "abs"}

    def __repr__(self):
        return "Abs()"


# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Erf(Activation):
    """phi(x) = a * erf(b x) + c.

    Dual kernel (Williams 1997, Eq. 11): with P = (1 + 2 b^2 q1)(1 + 2 b^2 q2),

        E[phi phi] = a^2 (2/pi) arcsin(2 b^2 Sigma / sqrt(P)) + c^2,
        E[phi' phi'] = a^2 b^2 (4/pi) / sqrt(P - 4 b^4 Sigma^2).
    """

    a: float = 1.0
    b: float = 1.0
    c: float = 0.0
    layer_name = "erf"

    def fn(self, x):
        return self.a * torch.erf(self.b * x) + self.c

    def dual(self, cov, var1, var2, derivative=True):
        a, b, c = float(self.a), float(self.b), float(self.c)
        b2 = 2 * b * b
        p = (1 + b2 * var1) * (1 + b2 * var2)
        arg = (b2 * cov) / torch.sqrt(p)
        out = torch.asin(arg.clamp_(-1.0, 1.0)).mul_(a * a * 2 / _PI).add_(c * c)
        if not derivative:
            return out, None
        den = torch.sqrt((p - (b2 * cov) ** 2).clamp_min(torch.finfo(cov.dtype).tiny))
        return out, (a * a * b * b * 4 / _PI) / den

    def to_config(self):
        return {"layer": "erf", "a": self.a, "b": self.b, "c": self.c}


@dataclass(frozen=True)
class Gelu(Activation):
    """phi(x) = x * Phi(x), the exact GELU (Hendrycks & Gimpel 2016).

    Closed-form dual kernel (Tsuchida et al. 2021; the neural-tangents convention): with
    P1 = (1 + q1)(1 + q2), Delta = sqrt(P1 - Sigma^2), A = arctan2(Sigma, Delta),

        E[phi phi] = Sigma/4 + [(Sigma^2 + q1 q2 Delta^2) / (P1 Delta) + Sigma A] / (2 pi),
        E[phi' phi'] = 1/4 + A/(2 pi) + Sigma/(2 pi Delta) (1/Delta^2 + (1 - q1 q2)/P1 + 1).
    """

    layer_name = "gelu"

    def fn(self, x):
        return torch.nn.functional.gelu(x)

    def dual(self, cov, var1, var2, derivative=True):
        q12 = var1 * var2
        p1 = (1 + var1) * (1 + var2)
        delta2 = (p1 - cov * cov).clamp_min(torch.finfo(cov.dtype).tiny)
        delta = torch.sqrt(delta2)
        ang = torch.atan2(cov, delta)
        out = cov / 4 + ((cov * cov + q12 * delta2) / (p1 * delta) + cov * ang) / (2 * _PI)
        if not derivative:
            return out, None
        dot = 0.25 + ang / (2 * _PI) + cov / (2 * _PI * delta) * (1 / delta2 + (1 - q12) / p1 + 1)
        return out, dot

    def to_config(self):
        return {"layer": "gelu"}


@dataclass(frozen=True)
class Sign(Activation):
    """phi(x) = sign(x); E[phi phi] = (2/pi) arcsin(rho). Its derivative is taken to be 0 (as in
    neural-tangents), so it passes no NTK from the layers below."""

    layer_name = "sign"

    def fn(self, x):
        return torch.sign(x)

    def dual(self, cov, var1, var2, derivative=True):
        rho = _correlation(cov, var1, var2)[0]
        out = torch.asin(rho).mul_(2 / _PI)
        return out, (torch.zeros_like(out) if derivative else None)

    def variance(self, var):
        return torch.where(var > 0, torch.ones_like(var), torch.zeros_like(var))

    def to_config(self):
        return {"layer": "sign"}


@dataclass(frozen=True)
class Sin(Activation):
    """phi(x) = a * sin(b x + c).

    With e_pm = exp(b^2 (-(q1 + q2)/2 +- Sigma)):
    E[phi phi] = a^2/2 (e_+ - e_- cos 2c),  E[phi' phi'] = a^2 b^2 / 2 (e_+ + e_- cos 2c).
    """

    a: float = 1.0
    b: float = 1.0
    c: float = 0.0
    layer_name = "sin"

    def fn(self, x):
        return self.a * torch.sin(self.b * x + self.c)

    def dual(self, cov, var1, var2, derivative=True):
        a, b, c = float(self.a), float(self.b), float(self.c)
        base = -(var1 + var2) / 2
        ep = torch.exp(b * b * (base + cov))
        em = torch.exp(b * b * (base - cov))
        cos2c = math.cos(2 * c)
        out = (a * a / 2) * (ep - em * cos2c)
        if not derivative:
            return out, None
        return out, (a * a * b * b / 2) * (ep + em * cos2c)

    def to_config(self):
        return {"layer": "sin", "a": self.a, "b": self.b, "c": self.c}


class Cos(Sin):
    """phi(x) = a * cos(b x + c) = a * sin(b x + c + pi/2)."""

    layer_name = "cos"

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 0.0):
        super().__init__(float(a), float(b), float(c) + _PI / 2)
        object.__setattr__(self, "_c_cos", float(c))

    def fn(self, x):
        return self.a * torch.cos(self.b * x + self._c_cos)

    def to_config(self):
        return {"layer": "cos", "a": self.a, "b": self.b, "c": self._c_cos}

    def __repr__(self):
        return f"Cos(a={self.a}, b={self.b}, c={self._c_cos})"


class Rbf(Sin):
    """phi(x) = sqrt(2) sin(sqrt(2 gamma) x + pi/4): random Fourier features whose NNGP map is the
    RBF kernel exp(-gamma (q1 + q2 - 2 Sigma)) (Rahimi & Recht 2007)."""

    layer_name = "rbf"

    def __init__(self, gamma: float = 1.0):
        if not gamma > 0:
            raise ConfigError(f"rbf gamma must be > 0, got {gamma!r}")
        super().__init__(math.sqrt(2.0), math.sqrt(2.0 * gamma), _PI / 4)
        object.__setattr__(self, "gamma", float(gamma))

    def to_config(self):
        return {"layer": "rbf", "gamma": self.gamma}

    def __repr__(self):
        return f"Rbf(gamma={self.gamma})"


@dataclass(frozen=True)
class Exp(Activation):
    """phi(x) = a * exp(b x); E[phi phi] = a^2 exp(b^2 ((q1 + q2)/2 + Sigma)), E[phi' phi'] = b^2 E[phi phi]."""

    a: float = 1.0
    b: float = 1.0
    layer_name = "exp"

    def fn(self, x):
        return self.a * torch.exp(self.b * x)

    def dual(self, cov, var1, var2, derivative=True):
        a, b = float(self.a), float(self.b)
        out = (a * a) * torch.exp(b * b * ((var1 + var2) / 2 + cov))
        return out, ((b * b) * out if derivative else None)

    def to_config(self):
        return {"layer": "exp", "a": self.a, "b": self.b}


@dataclass(frozen=True)
class Gaussian(Activation):
    """phi(x) = a * exp(b x^2). With R = sqrt((1 - 2 b q1)(1 - 2 b q2) - 4 b^2 Sigma^2):
    E[phi phi] = a^2 / R, E[phi' phi'] = 4 a^2 b^2 Sigma / R^3. Finite only while
    2 b (q1 + q2) < 1 (always for b <= 0)."""

    a: float = 1.0
    b: float = -1.0
    layer_name = "gaussian"

    def fn(self, x):
        return self.a * torch.exp(self.b * x * x)

    def dual(self, cov, var1, var2, derivative=True):
        a, b = float(self.a), float(self.b)
        if b > 0:
            worst = float(2 * b * (var1.max() + var2.max()))
            if worst >= 1:
                raise ValueError(f"gaussian activation exp({b} x^2) has infinite second moment for "
                                 f"pre-activation variance {float(max(var1.max(), var2.max())):.4g}; "
                                 "use b < 1/(4 q) or b <= 0.")
        r2 = (1 - 2 * b * var1) * (1 - 2 * b * var2) - 4 * b * b * cov * cov
        r = torch.sqrt(r2.clamp_min(torch.finfo(cov.dtype).tiny))
        out = (a * a) / r
        if not derivative:
            return out, None
        return out, (4 * a * a * b * b) * cov / (r2 * r)

    def to_config(self):
        return {"layer": "gaussian", "a": self.a, "b": self.b}


# ---------------------------------------------------------------------------------------------------
# Polynomials: exact Hermite expansion
# ---------------------------------------------------------------------------------------------------
def _hermite_polynomial_coefficients(coef: Sequence[float]) -> list[list[tuple[int, float]]]:
    """For p(x) = sum_k c_k x^k and u = sqrt(q) z, write p(u) = sum_m beta_m(q) q^{m/2} He_m(z).

    Returns, for each m, the list of (j, coefficient) with beta_m(q) = sum_j coefficient * q^j,
    using x^k = sum_m k! / (m! j! 2^j) He_m(x), j = (k - m)/2.
    """
    deg = len(coef) - 1
    out = []
    for m in range(deg + 1):
        terms = []
        for k in range(m, deg + 1, 2):
            if coef[k] == 0:
                continue
            j = (k - m) // 2
            a_km = math.factorial(k) / (math.factorial(m) * math.factorial(j) * 2**j)
            terms.append((j, coef[k] * a_km))
        out.append(terms)
    return out


def _polynomial_dual(coef: Sequence[float], cov, var1, var2):
    """E[p(u) p(v)] = sum_m m! beta_m(q1) beta_m(q2) Sigma^m (Mehler / Hermite expansion), exact."""
    terms = _hermite_polynomial_coefficients(coef)

    def beta(terms_m, var):
        val = torch.zeros_like(var)
        for j, c in terms_m:
            val = val + c * var**j
        return val

    out = torch.zeros_like(cov)
    for m in range(len(terms) - 1, -1, -1):  # Horner in Sigma
        term = math.factorial(m) * beta(terms[m], var1) * beta(terms[m], var2)
        out = out * cov + term
    return out


@dataclass(frozen=True)
class Polynomial(Activation):
    """phi(x) = coef[0] + coef[1] x + coef[2] x^2 + ... (constant term first).

    The dual kernel is exact: expanding p(sqrt(q) z) in Hermite polynomials He_m, Mehler's formula
    gives E[p(u) p(v)] = sum_m m! beta_m(q1) beta_m(q2) Sigma^m (e.g. O'Donnell 2014, Ch. 11).
    """

    coef: tuple = (0.0, 1.0)
    layer_name = "polynomial"

    def __post_init__(self):
        object.__setattr__(self, "coef", tuple(float(c) for c in self.coef))
        if len(self.coef) == 0:
            raise ConfigError("polynomial needs at least one coefficient")

    def fn(self, x):
        out = torch.zeros_like(x) + self.coef[-1]
        for c in reversed(self.coef[:-1]):
            out = out * x + c
        return out

    def _deriv_coef(self):
        d = tuple(k * c for k, c in enumerate(self.coef))[1:]
        return d if d else (0.0,)

    def dual(self, cov, var1, var2, derivative=True):
        out = _polynomial_dual(self.coef, cov, var1, var2)
        if not derivative:
            return out, None
        return out, _polynomial_dual(self._deriv_coef(), cov, var1, var2)

    def to_config(self):
        return {"layer": "polynomial", "coef": list(self.coef)}


class Monomial(Polynomial):
    """phi(x) = x^degree (exact dual kernel by the Hermite expansion, any degree)."""

    layer_name = "monomial"

    def __init__(self, degree: int = 1):
        if int(degree) != degree or degree < 0:
            raise ConfigError(f"monomial degree must be an integer >= 0, got {degree!r}")
        super().__init__(tuple([0.0] * int(degree) + [1.0]))
        object.__setattr__(self, "degree", int(degree))

    def fn(self, x):
        return x ** self.degree

    def to_config(self):
        return {"layer": "monomial", "degree": self.degree}

    def __repr__(self):
        return f"Monomial(degree={self.degree})"


# ---------------------------------------------------------------------------------------------------
# Any elementwise torch function: Gauss-Hermite quadrature of the Mehler expansion
# ---------------------------------------------------------------------------------------------------
_NAMED_FUNCTIONS = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": torch.nn.functional.softplus,
    "silu": torch.nn.functional.silu,
    "swish": torch.nn.functional.silu,
    "elu": torch.nn.functional.elu,
    "selu": torch.nn.functional.selu,
    "celu": torch.nn.functional.celu,
    "mish": torch.nn.functional.mish,
    "gelu": torch.nn.functional.gelu,
    "relu": torch.relu,
    "sin": torch.sin,
    "cos": torch.cos,
    "erf": torch.erf,
    "atan": torch.atan,
    "arctan": torch.atan,
    "softsign": torch.nn.functional.softsign,
    "exp": torch.exp,
    "identity": lambda x: x,
}


def resolve_function(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Look up an elementwise torch function by name ("tanh", "silu", "torch.special.expit", ...)."""
    if name in _NAMED_FUNCTIONS:
        return _NAMED_FUNCTIONS[name]
    for mod in (torch, torch.nn.functional, torch.special):
        short = name.split(".")[-1]
        if name.startswith(("torch.", "F.")) or "." not in name:
            fn = getattr(mod, short, None)
            if callable(fn):
                return fn
    raise ConfigError(f"unknown elementwise function {name!r}; use one of {sorted(_NAMED_FUNCTIONS)} or a name "
                      "in torch, torch.nn.functional or torch.special")


@lru_cache(maxsize=16)
def _hermite_table(nodes: int, order: int):
    """Gauss-Hermite nodes z and weights w for N(0, 1) (sum w = 1), and the weighted orthonormal
    Hermite functions sqrt(w_k) h_m(z_k), h_m = He_m / sqrt(m!), for m < order.

    The three-term recurrence runs on sqrt(w) h_m, which is bounded by 1 (the rows are orthonormal),
    so it neither overflows at far nodes for high orders nor loses accuracy.
    """
    from scipy.special import roots_hermitenorm

    z, w = roots_hermitenorm(nodes)
    w = w / math.sqrt(2 * math.pi)
    sw = np.sqrt(w)
    h = np.zeros((order, nodes))
    h[0] = sw
    if order > 1:
        h[1] = z * sw
    for m in range(1, order - 1):
        h[m + 1] = (z * h[m] - math.sqrt(m) * h[m - 1]) / math.sqrt(m + 1)
    return z, w, sw, h


class Elementwise(Activation):
    """Any elementwise torch function phi, with its dual kernel by quadrature.

    The Gaussian expectations are computed through Mehler's expansion in orthonormal Hermite
    polynomials h_m: with b_m(q) = E[phi(sqrt(q) z) h_m(z)], z ~ N(0, 1),

        E[phi(u) phi(v)] = sum_m b_m(q1) b_m(q2) rho^m,   rho = Sigma / sqrt(q1 q2),

    and likewise for phi' (obtained by autograd) for the NTK term. The coefficients b_m are computed
    by ``deg``-point Gauss-Hermite quadrature; the series is truncated at the first order M whose
    tail energy (E[phi^2] - sum_{m<M} b_m^2, computed exactly by Parseval) is below ``tol`` times
    E[phi^2] for every input, so the error is at most ``tol`` relative for |rho| <= 1. For smooth
    (analytic) functions this converges geometrically; a warning is issued when ``max_order`` terms
    do not reach ``tol`` (e.g. functions with kinks, for which a closed form should be preferred).

    Cost: the coefficients are computed once per distinct pre-activation variance (memoized); each
    kernel entry then costs two multiply-adds per series term, with M ~ 100 terms for tanh at unit
    variance and M ~ 500 at variance ~5 (tolerance 1e-13) -- far cheaper than the deg^2 evaluations per
    entry of a two-dimensional quadrature, but slower than the closed-form activations.

    Parameters
    ----------
    fn : callable or str
        Elementwise function of a tensor, or its name (``"tanh"``, ``"silu"``, ``"softplus"``, ...).
        Only named functions can be written to a config.
    deg : int
        Number of Gauss-Hermite nodes (default 2000: cheap, since only one-dimensional integrals
        are evaluated, once per distinct variance).
    max_order : int
        Largest number of Hermite terms.
    tol : float
        Relative truncation tolerance of the series (a warning is issued when ``max_order`` terms
        leave more than 1e-9).
    """

    layer_name = "numerical"

    def __init__(self, fn: Callable | str, deg: int = 2000, max_order: int = 1000, tol: float = 1e-13):
        if isinstance(fn, str):
            self.fn_name = fn
            self._fn = resolve_function(fn)
        elif callable(fn):
            self.fn_name = getattr(fn, "__name__", None)
            self._fn = fn
        else:
            raise ConfigError(f"Elementwise needs a callable or a function name, got {fn!r}")
        if int(deg) < 2:
            raise ConfigError(f"deg must be an integer >= 2, got {deg!r}")
        if int(max_order) < 1 or not (0 < float(tol) < 1):
            raise ConfigError(f"max_order must be >= 1 and 0 < tol < 1, got max_order={max_order!r}, tol={tol!r}")
        self.deg = int(deg)
        self.max_order = int(max_order)
        self.tol = float(tol)
        self.warn_tol = 1e-9
        self._named = isinstance(fn, str)

    def __eq__(self, other):
        return (isinstance(other, Elementwise) and self._fn is other._fn and self.deg == other.deg
                and self.max_order == other.max_order and self.tol == other.tol)

    def __hash__(self):
        return hash((id(self._fn), self.deg, self.max_order))

    def __repr__(self):
        return f"Elementwise({self.fn_name or self._fn!r}, deg={self.deg})"

    def fn(self, x):
        return self._fn(x)

    def _values(self, x: torch.Tensor, derivative: bool):
        if not derivative:
            return self._fn(x), None
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            y = self._fn(xg)
            (g,) = torch.autograd.grad(y.sum(), xg)
        return y.detach(), g.detach()

    def _compute_coefficients(self, values: torch.Tensor, derivative: bool, upto: int | None = None):
        """Hermite coefficients of phi (and phi') for each variance in ``values`` (float64, CPU), each
        row truncated at its own order: the first m whose tail energy is below ``tol`` E[phi^2]; with
        ``upto``, exactly the first ``upto`` coefficients of every row (no truncation search)."""
        order = min(self.max_order, self.deg)
        if upto is not None:
            order = min(max(int(upto), 1), self.deg)
        z, w, sw, h = _hermite_table(self.deg, order)
        zt, wt, swt, ht = (torch.as_tensor(a, dtype=torch.float64) for a in (z, w, sw, h))
        x = torch.sqrt(values.clamp_min(0))[:, None] * zt[None, :]
        y, g = self._values(x, derivative)
        if not bool(torch.isfinite(y).all()) or (g is not None and not bool(torch.isfinite(g).all())):
            raise ValueError(f"{self!r} returned non-finite values on the Gaussian quadrature nodes "
                             f"(pre-activation std up to {float(values.max().sqrt()):.3g})")
        out = []
        for vals in (y, g):
            if vals is None:
                out.append(None)
                continue
            weighted = vals * swt
            energy = (vals * vals * wt).sum(-1)  # E[phi^2] per variance (Parseval: = sum_m b_m^2)
            limit = self.tol * energy.abs().clamp_min(1e-300)
            if upto is not None:
                coeffs = weighted @ ht[:order].T
                out.append([coeffs[i].clone() for i in range(coeffs.shape[0])])
                continue
            m = 64  # double the number of terms until every row's tail energy is below tol
            while True:
                m = min(m, order)
                coeffs = weighted @ ht[:m].T  # (u, m): b_m = sum_k w_k phi(z_k) h_m(z_k)
                tail = energy[:, None] - torch.cumsum(coeffs * coeffs, dim=-1)
                ok = tail <= limit[:, None]
                if bool(ok.any(dim=1).all()) or m == order:
                    break
                m *= 2
            rows = []
            for i in range(coeffs.shape[0]):
                hit = ok[i].nonzero()
                if len(hit):
                    rows.append(coeffs[i, : int(hit[0]) + 1].clone())
                    continue
                rows.append(coeffs[i].clone())
                worst = float(tail[i, -1] / energy[i].abs().clamp_min(1e-300))
                if worst > self.warn_tol:
                    warnings.warn(
                        f"{self!r}: {order} Hermite terms leave a relative error up to {worst:.2g} at "
                        "|correlation| = 1 (the function is not smooth enough at this pre-activation "
                        "scale); prefer a closed-form activation or raise max_order/deg.",
                        RuntimeWarning, stacklevel=5)
            out.append(rows)
        return out

    def _coefficients(self, var: torch.Tensor, derivative: bool):
        """Coefficient matrices (u, M) of phi and phi' for the distinct values of ``var``, zero-padded to
        a common length M, and the index of each entry of ``var`` into them.

        Coefficients depend only on the variance, so they are memoized per value: a kernel matrix
        computed in tiles evaluates the quadrature once per distinct input variance, not once per tile.
        """
        uniq, inverse = torch.unique(var.reshape(-1).to(torch.float64).cpu(), return_inverse=True)
        keys = uniq.tolist()
        memo = self.__dict__.setdefault("_memo", {})
        if len(memo) > 200_000:
            memo.clear()
        missing = [i for i, key in enumerate(keys) if key not in memo or (derivative and memo[key][1] is None)]
        if missing:
            fn_rows, d_rows = self._compute_coefficients(uniq[missing], derivative)
            for j, i in enumerate(missing):
                memo[keys[i]] = (fn_rows[j], None if d_rows is None else d_rows[j])
        # One common order M for all rows. Truncating each row at its own order M_i (zero-padding the
        # rest) would cut the cross series sum_m b_m(q1) b_m(q2) rho^m at min(M_1, M_2), an error up to
        # sqrt(tol) relative (Cauchy-Schwarz) when the variances differ; with both rows carried to
        # M >= max(M_i) it is at most tol sqrt(E[phi(u)^2] E[phi(v)^2]).
        need = max(len(memo[key][w]) for key in keys for w in ((0, 1) if derivative else (0,)))
        short = [i for i, key in enumerate(keys)
                 if any(len(memo[key][w]) < need for w in ((0, 1) if derivative else (0,)))]
        if short:
            fn_rows, d_rows = self._compute_coefficients(uniq[short], derivative, upto=need)
            for j, i in enumerate(short):
                memo[keys[i]] = (fn_rows[j], None if d_rows is None else d_rows[j])
        results = []
        for which in (0, 1) if derivative else (0,):
            rows = [memo[key][which] for key in keys]
            m = max(len(r) for r in rows)
            mat = torch.zeros((len(rows), m), dtype=torch.float64)
            for i, r in enumerate(rows):
                mat[i, : len(r)] = r
            results.append((mat.to(device=var.device), m))
        if not derivative:
            results.append(None)
        return uniq, inverse.to(var.device).reshape(var.shape), results

    @staticmethod
    def _series(coef1, coef2, rho, m):
        """sum_{j<m} coef1[..., j] coef2[..., j] rho^j by Horner's rule (two passes per term)."""
        out = coef1[..., m - 1] * coef2[..., m - 1] + torch.zeros_like(rho)
        for j in range(m - 2, -1, -1):
            out = out.mul_(rho).addcmul_(coef1[..., j], coef2[..., j])
        return out

    def dual(self, cov, var1, var2, derivative=True):
        rho = _correlation(cov, var1, var2)[0]
        # one set of coefficients (and one truncation order) for the variances of both sides
        both = torch.cat([var1.reshape(-1), var2.reshape(-1)])
        _, inverse, results = self._coefficients(both, derivative)
        inv1 = inverse[: var1.numel()].reshape(var1.shape)
        inv2 = inverse[var1.numel():].reshape(var2.shape)
        outs = []
        for res in results:
            if res is None:
                outs.append(None)
                continue
            coeffs, m = res
            coeffs = coeffs.to(cov.dtype)
            outs.append(self._series(coeffs[inv1], coeffs[inv2], rho, m))
        return outs[0], outs[1]

    def variance(self, var):
        z, w, _, _ = _hermite_table(self.deg, 2)
        flat = var.reshape(-1)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        x = torch.sqrt(uniq.to(torch.float64).clamp_min(0))[:, None] * torch.as_tensor(z, device=var.device)[None]
        y = self._fn(x)
        e = (y * y * torch.as_tensor(w, device=var.device)).sum(-1)
        return e.to(var.dtype)[inverse].reshape(var.shape)

    def to_config(self):
        if not self._named:
            raise ConfigError(f"{self!r} wraps an unnamed Python function and cannot be written to a config; "
                              "build it with Elementwise('tanh') (a name) to make it serialisable.")
        return {"layer": "numerical", "fn": self.fn_name, "deg": self.deg, "max_order": self.max_order,
                "tol": self.tol}
