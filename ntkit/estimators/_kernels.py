"""Kernel construction shared by the estimators and the UCI runner.

One function, :func:`make_kernel_function`, turns the estimator parameters (``kernel="ntk"`` plus
depth / activation / W_std / b_std / fixed layers / parameterization, or a config) into a
:class:`ntkit.KernelFunction`.

The classical distance kernels come from ``ntkit.kernels.classic`` (``Laplace``,
``GammaExponential``, ``RBF``) when that module is installed *and* its convention agrees with the
one documented here (checked numerically once per process, see :func:`_classic_matches`); otherwise
a small private implementation with the conventions below is used, so a convention mismatch can
never silently change a hyper-parameter grid:

* Laplace:            k(x, x') = exp(-||x - x'|| / l)
* gamma-exponential:  k(x, x') = exp(-(||x - x'|| / l)^gamma),  0 < gamma <= 2
  (Rasmussen & Williams 2006, Eq. 4.18; gamma = 1 is Laplace, gamma = 2 a Gaussian)
* RBF:                k(x, x') = exp(-||x - x'||^2 / (2 l^2))  (Rasmussen & Williams 2006, Eq. 4.9)
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .._validation import ConfigError
from ..kernels import KernelFunction, from_config, mlp

__all__ = ["KERNELS", "make_kernel_function", "validate_kernel_params"]

#: every value accepted by the ``kernel`` parameter of the estimators
KERNELS = ("ntk", "nngp", "laplace", "gamma_exponential", "rbf")
_ACTIVATIONS = ("relu", "abs", "gelu", "sign", "erf", "tanh", "identity")


def _pairwise_distance(x1: torch.Tensor, x2: torch.Tensor, same: bool) -> torch.Tensor:
    """Euclidean distances ||x1_i - x2_j|| (exact zeros on the diagonal when ``same``)."""
    a = x1.reshape(x1.shape[0], -1)
    b = x2.reshape(x2.shape[0], -1)
    # the expanded form ||a||^2 + ||b||^2 - 2 a.b is fast; clamp its round-off below 0
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    sq = sq.clamp_min_(0.0)
    if same:
        sq.fill_diagonal_(0.0)
    return sq.sqrt_()


class _GammaExponential(KernelFunction):
    """exp(-(||x - x'|| / l)^gamma) (Rasmussen & Williams 2006, Eq. 4.18); private fallback."""

    def __init__(self, length_scale: float, gamma: float, name: str):
        self.length_scale = float(length_scale)
        self.gamma = float(gamma)
        self.name = name

    def _matrix(self, x1, x2, same):
        r = _pairwise_distance(x1, x2, same) / self.length_scale
        if self.gamma == 2.0:
            return torch.exp(-0.5 * r * r) if self.name == "rbf" else torch.exp(-r * r)
        return torch.exp(-r.pow(self.gamma))

    def _diagonal(self, x1, x2):
        a = x1.reshape(x1.shape[0], -1)
        b = x2.reshape(x2.shape[0], -1)
        r = (a - b).norm(dim=1) / self.length_scale
        if self.name == "rbf":
            return torch.exp(-0.5 * r * r)
        return torch.exp(-r.pow(self.gamma))

    def to_config(self):
        cfg = {"kernel": self.name, "length_scale": self.length_scale}
        if self.name == "gamma_exponential":
            cfg["gamma"] = self.gamma
        return cfg


def _fallback(kernel: str, length_scale: float, gamma: float) -> KernelFunction:
    if kernel == "laplace":
        return _GammaExponential(length_scale, 1.0, "laplace")
    if kernel == "rbf":
        return _GammaExponential(length_scale, 2.0, "rbf")
    return _GammaExponential(length_scale, gamma, "gamma_exponential")


_CLASSIC_OK: dict[str, bool] = {}


def _build_classic(kernel: str, length_scale: float, gamma: float) -> KernelFunction | None:
    """The kernel from ``ntkit.kernels.classic`` if it exists and can be built, else None."""
    try:
        from ..kernels import classic  # noqa: PLC0415 - optional sibling module
    except ImportError:
        return None
    cls_name = {"laplace": "Laplace", "gamma_exponential": "GammaExponential", "rbf": "RBF"}[kernel]
    cls = getattr(classic, cls_name, None)
    if cls is None:
        return None
    kwargs: dict[str, Any] = {"length_scale": length_scale}
    if kernel == "gamma_exponential":
        kwargs["gamma"] = gamma
    try:
        return cls(**kwargs)
    except TypeError:
        return None


def _classic_matches(kernel: str) -> bool:
    """Whether ``ntkit.kernels.classic`` implements ``kernel`` with the conventions of this module.

    Checked once on two points at distance 1.5 with l = 0.7 (and gamma = 1.3), to 1e-12.
    """
    if kernel not in _CLASSIC_OK:
        ok = False
        kf = _build_classic(kernel, 0.7, 1.3)
        if kf is not None:
            x = torch.tensor([[0.0, 0.0], [0.9, 1.2]], dtype=torch.float64)
            try:
                got = kf(x)
                want = _fallback(kernel, 0.7, 1.3)(x)
                ok = tuple(got.shape) == (2, 2) and bool(torch.allclose(got, want, rtol=1e-12, atol=1e-14))
            except Exception:  # noqa: BLE001 - any failure means "do not use it"
                ok = False
        _CLASSIC_OK[kernel] = ok
    return _CLASSIC_OK[kernel]


def validate_kernel_params(est: Any) -> None:
    """Check the kernel-related parameters of an estimator (called in ``fit``, scikit-learn style)."""
    kernel = est.kernel
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not supported; use one of {KERNELS}.")
    if kernel in ("ntk", "nngp"):
        if est.config is not None:
            if not isinstance(est.config, (dict, str)):
                raise TypeError(f"config must be a dict, a JSON string or a path, got {type(est.config).__name__}")
            return
        depth = est.depth
        if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 0:
            raise ValueError(f"depth must be an integer >= 0 (number of hidden layers), got {depth!r}.")
        if not (isinstance(est.W_std, numbers.Real) and math.isfinite(est.W_std) and est.W_std > 0):
            raise ValueError(f"W_std must be a finite number > 0, got {est.W_std!r}.")
        if not (isinstance(est.b_std, numbers.Real) and math.isfinite(est.b_std) and est.b_std >= 0):
            raise ValueError(f"b_std must be a finite number >= 0, got {est.b_std!r}.")
        fl = est.fixed_layers
        if isinstance(fl, bool) or not isinstance(fl, numbers.Integral) or not 0 <= fl <= depth + 1:
            raise ValueError(f"fixed_layers must be an integer between 0 and depth + 1 = {depth + 1}, got {fl!r}.")
        if est.parameterization not in ("ntk", "standard"):
            raise ValueError(f"parameterization must be 'ntk' or 'standard', got {est.parameterization!r}.")
        if not (isinstance(est.activation, str) and est.activation in _ACTIVATIONS) and not hasattr(
                est.activation, "dual"):
            raise ValueError(f"activation must be one of {_ACTIVATIONS} or an ntkit activation layer, "
                             f"got {est.activation!r}.")
    else:
        ls = est.length_scale
        if not (isinstance(ls, numbers.Real) and not isinstance(ls, bool) and math.isfinite(ls) and ls > 0):
            raise ValueError(f"length_scale must be a finite number > 0, got {ls!r}.")
        if kernel == "gamma_exponential":
            g = est.gamma
            if not (isinstance(g, numbers.Real) and not isinstance(g, bool) and 0 < g <= 2):
                raise ValueError(f"gamma must lie in (0, 2] for a positive definite gamma-exponential kernel "
                                 f"(Rasmussen & Williams 2006, Sec. 4.2.1), got {g!r}.")


def _activation_layer(activation: Any):
    if not isinstance(activation, str):
        return activation
    import ntkit.kernels as K  # noqa: PLC0415

    if activation == "erf":
        return K.Erf()
    if activation == "tanh":
        return K.Elementwise(torch.tanh)
    if activation == "identity":
        return K.Identity()
    return activation


def make_kernel_function(
    kernel: str = "ntk",
    *,
    depth: int = 1,
    activation: Any = "relu",
    W_std: float = 2**0.5,
    b_std: float = 0.0,
    fixed_layers: int = 0,
    parameterization: str = "ntk",
    config: Any = None,
    length_scale: float = 1.0,
    gamma: float = 1.0,
) -> KernelFunction:
    """Build the kernel named ``kernel`` as an :class:`ntkit.KernelFunction`.

    ``"ntk"`` / ``"nngp"``: the infinite-width NTK (Jacot et al. 2018, Thm. 1) or NNGP (Lee et al.
    2018, Eq. 4) of ``ntkit.mlp(depth, activation=..., W_std, b_std, fixed_layers,
    parameterization)`` (``depth`` hidden layers; the first ``fixed_layers`` Dense layers frozen as in
    Arora et al. 2020, Sec. 4), or of ``ntkit.from_config(config)`` when ``config`` is given.
    ``"laplace"`` / ``"gamma_exponential"`` / ``"rbf"``: the distance kernels of the module
    docstring with length scale ``length_scale`` (and exponent ``gamma``).
    """
    if kernel in ("ntk", "nngp"):
        if config is not None:
            arch = from_config(config)
        else:
            arch = mlp(int(depth), activation=_activation_layer(activation), W_std=float(W_std),
                       b_std=float(b_std), fixed_layers=int(fixed_layers), parameterization=parameterization)
        return arch.kernel_fn(kernel)
    if kernel not in KERNELS:
        raise ConfigError(f"kernel={kernel!r} is not supported; use one of {KERNELS}.")
    if _classic_matches(kernel):
        kf = _build_classic(kernel, length_scale, gamma)
        if kf is not None:
            return kf
    return _fallback(kernel, length_scale, gamma)
