"""Kernel construction shared by the estimators and the UCI runner.

One function, :func:`make_kernel_function`, turns the estimator parameters (``kernel="ntk"`` plus
depth / activation / W_std / b_std / fixed layers / parameterization / width, or a config) into a
:class:`ntkit.KernelFunction`.

Widths: in the NTK parameterization the infinite-width kernels do not depend on the hidden widths. In
the standard parameterization the NTK does (Lee et al. 2019, App. C: Theta' = W_std^2 Theta + n_in Sigma
+ 1 per Dense layer, n_in its input width), so ``kernel="ntk"`` with ``parameterization="standard"``
and ``depth >= 1`` needs ``width`` (an int for every hidden layer, or one int per hidden layer). The
NNGP is the same in both parameterizations and ignores ``width``.

The classical distance kernels are those of ``ntkit.kernels.classic`` (``Laplace``,
``GammaExponential``, ``RBF``), with the conventions:

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
from ..kernels.classic import RBF, GammaExponential, Laplace

__all__ = ["KERNELS", "make_kernel_function", "validate_kernel_params"]

#: every value accepted by the ``kernel`` parameter of the estimators
KERNELS = ("ntk", "nngp", "laplace", "gamma_exponential", "rbf")
_ACTIVATIONS = ("relu", "abs", "gelu", "sign", "erf", "tanh", "identity")


def _check_width(width: Any, *, kernel: str, depth: Any, parameterization: Any, config: Any) -> None:
    """ValueError unless ``width`` is None, a positive int or a sequence of positive ints (one per hidden
    layer), and present where it is needed: the standard-parameterization NTK of an MLP with hidden layers."""
    if width is not None:
        if isinstance(width, numbers.Integral) and not isinstance(width, bool):
            if width < 1:
                raise ValueError(f"width must be a positive integer (hidden-layer width), got {width!r}.")
        elif isinstance(width, (list, tuple)):
            if not width or any(isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1 for w in width):
                raise ValueError(f"width as a sequence must hold positive integers (one per hidden layer), "
                                 f"got {width!r}.")
            if config is None and isinstance(depth, numbers.Integral) and len(width) != depth:
                raise ValueError(f"width lists {len(width)} values but depth={depth} hidden layers; give one "
                                 "width per hidden layer, or a single int for all.")
        else:
            raise ValueError(f"width must be None, a positive integer or a list of positive integers, got {width!r}.")
        return
    if (config is None and kernel == "ntk" and parameterization == "standard" and isinstance(depth, numbers.Integral)
            and depth >= 1):
        raise ValueError("parameterization='standard' needs width=: the standard-parameterization NTK depends on "
                         "the finite hidden-layer widths (Lee et al. 2019, App. C). Pass width=<int> (e.g. the "
                         "width of the network it models), or use parameterization='ntk', whose infinite-width "
                         "NTK does not depend on it.")


def validate_kernel_params(est: Any) -> None:
    """Check the kernel-related parameters of an estimator (called in ``fit``, scikit-learn style)."""
    kernel = est.kernel
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not supported; use one of {KERNELS}.")
    if kernel in ("ntk", "nngp"):
        if est.config is not None:
            if not isinstance(est.config, (dict, str)):
                raise TypeError(f"config must be a dict, a JSON string or a path, got {type(est.config).__name__}")
            _check_width(est.width, kernel=kernel, depth=None, parameterization=None, config=est.config)
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
        _check_width(est.width, kernel=kernel, depth=depth, parameterization=est.parameterization, config=None)
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
    width: Any = None,
) -> KernelFunction:
    """Build the kernel named ``kernel`` as an :class:`ntkit.KernelFunction`.

    ``"ntk"`` / ``"nngp"``: the infinite-width NTK (Jacot et al. 2018, Thm. 1) or NNGP (Lee et al.
    2018, Eq. 4) of ``ntkit.mlp(depth, activation=..., W_std, b_std, fixed_layers,
    parameterization)`` (``depth`` hidden layers; the first ``fixed_layers`` Dense layers frozen as in
    Arora et al. 2020, Sec. 4), or of ``ntkit.from_config(config)`` when ``config`` is given.
    ``"laplace"`` / ``"gamma_exponential"`` / ``"rbf"``: the distance kernels of the module
    docstring with length scale ``length_scale`` (and exponent ``gamma``).
    ``width``: hidden-layer width(s) of the architecture (``arch.with_width(width)``); required for
    ``"ntk"`` with ``parameterization="standard"`` and ``depth >= 1`` (see the module docstring),
    irrelevant otherwise.
    """
    if kernel in ("ntk", "nngp"):
        _check_width(width, kernel=kernel, depth=depth, parameterization=parameterization, config=config)
        if config is not None:
            arch = from_config(config)
        else:
            arch = mlp(int(depth), activation=_activation_layer(activation), W_std=float(W_std),
                       b_std=float(b_std), fixed_layers=int(fixed_layers), parameterization=parameterization)
        if width is not None:
            arch = arch.with_width(list(width) if isinstance(width, (list, tuple)) else int(width))
        return arch.kernel_fn(kernel)
    if kernel not in KERNELS:
        raise ConfigError(f"kernel={kernel!r} is not supported; use one of {KERNELS}.")
    if kernel == "laplace":
        return Laplace(length_scale)
    if kernel == "rbf":
        return RBF(length_scale)
    return GammaExponential(length_scale, gamma)
