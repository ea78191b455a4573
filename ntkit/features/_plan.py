"""Read an architecture into the list of operations the feature maps support (Dense and ABRelu layers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._validation import ConfigError
from ..kernels import Architecture, from_config
from ..kernels.activations import ABRelu
from ..kernels.conv import Conv
from ..kernels.layers import Dense, Identity, Serial
from ..kernels.pooling import AvgPool, GlobalAvgPool
from ._base import _unsupported

__all__ = ["DenseOp", "ActOp", "ConvOp", "PoolOp", "as_architecture", "read_architecture", "read_conv_architecture",
           "SUPPORTED", "SUPPORTED_CONV"]

SUPPORTED = ("fully-connected architectures in the NTK parameterization: Dense layers (any W_std, b_std, "
             "trainable or frozen) and ReLU-family activations (Relu, LeakyRelu, Abs, ABRelu), each activation "
             "after a Dense layer")


@dataclass(frozen=True)
class DenseOp:
    W_std: float
    b_std: float
    trainable: bool


@dataclass(frozen=True)
class ActOp:
    a: float  # slope for x < 0
    b: float  # slope for x > 0


@dataclass(frozen=True)
class ConvOp:
    """A convolution (or, with ``W_std=1``, ``b_std=0`` and ``mean=True``, an average pooling window):
    ``layer.patches`` gathers the filter windows of per-position features."""
    layer: Conv
    W_std: float
    b_std: float
    trainable: bool
    mean: bool = False  # AvgPool: average the window instead of concatenating it


@dataclass(frozen=True)
class PoolOp:
    """Global average pooling: the mean of the per-position features."""


SUPPORTED_CONV = ("convolutional architectures in the NTK parameterization: Conv layers (1-D or 2-D, any filter, "
                  "stride and padding, trainable or frozen), ReLU-family activations (Relu, LeakyRelu, Abs, "
                  "ABRelu) after a Conv or Dense layer, AvgPool, then GlobalAvgPool, then Dense layers and "
                  "activations (a Dense readout)")


def _flatten(layers, out):
    for lay in layers:
        if isinstance(lay, Serial):
            _flatten(lay.layers, out)
        else:
            out.append(lay)
    return out


def as_architecture(architecture: Any, kernel: str, builders: str) -> Architecture:
    """The Architecture of ``architecture`` (or its config) and a valid ``kernel`` name, or the error."""
    if isinstance(architecture, (dict, str)):
        architecture = from_config(architecture)
    if not isinstance(architecture, Architecture):
        raise TypeError(f"architecture must be an ntkit.Architecture ({builders}) or its config, "
                        f"got {type(architecture).__name__}")
    if kernel not in ("ntk", "nngp"):
        raise ValueError(f"kernel must be 'ntk' or 'nngp', got {kernel!r}")
    return architecture


def _checked(architecture: Any, kernel: str, builders: str) -> Architecture:
    """The Architecture of ``architecture`` (or its config), after the checks every random feature map shares."""
    architecture = as_architecture(architecture, kernel, builders)
    if kernel == "ntk" and architecture.parameterization != "ntk":
        raise ConfigError("the feature maps approximate the NTK of the NTK parameterization (its infinite-width "
                          "limit does not depend on the widths); got parameterization="
                          f"{architecture.parameterization!r}. Use parameterization='ntk', or kernel='nngp' "
                          "(the same in both parameterizations).")
    return architecture


def read_architecture(architecture: Any, kernel: str, *, supported: str = SUPPORTED) -> tuple[Architecture, list]:
    """(Architecture, ops) or a ConfigError naming the first unsupported layer and what is supported."""
    architecture = _checked(architecture, kernel, "ntkit.serial / ntkit.mlp")
    ops: list = []
    prev_dense = False
    for i, lay in enumerate(_flatten(architecture.layers, [])):
        if isinstance(lay, Identity):
            continue
        if isinstance(lay, Dense):
            ops.append(DenseOp(float(lay.W_std), float(lay.b_std or 0.0), bool(lay.trainable)))
            prev_dense = True
        elif isinstance(lay, ABRelu):
            if not prev_dense:
                raise ConfigError(f"layer {i} ({lay!r}) acts on the raw input or on another activation; put a "
                                  "Dense layer before every activation")
            ops.append(ActOp(float(lay.a), float(lay.b)))
            prev_dense = False
        else:
            raise ConfigError(f"layer {i}: {_unsupported(lay, supported)}")
    if not ops:
        raise ConfigError("the architecture has no layers the feature maps can use")
    if kernel == "ntk" and not any(isinstance(o, DenseOp) and o.trainable for o in ops):
        raise ConfigError("no Dense layer of this architecture is trainable, so its NTK is identically 0; "
                          "use kernel='nngp'")
    return architecture, ops


def read_conv_architecture(architecture: Any, kernel: str) -> tuple[Architecture, list, int]:
    """(Architecture, ops, spatial ndim) of a convolutional architecture with global average pooling,
    or a ConfigError naming the first unsupported layer and what is supported."""
    architecture = _checked(architecture, kernel, "ntkit.serial")
    ops: list = []
    prev_affine = False
    spatial, ndim = True, None
    for i, lay in enumerate(_flatten(architecture.layers, [])):
        if isinstance(lay, Identity):
            continue
        if isinstance(lay, Conv) and spatial:
            nd = len(lay.filter_shape)
            if ndim is not None and nd != ndim:
                raise ConfigError(f"layer {i} ({lay!r}): a {nd}-D filter after {ndim}-D layers")
            ndim = nd
            ops.append(ConvOp(lay, float(lay.W_std), float(lay.b_std or 0.0), bool(lay.trainable)))
            prev_affine = True
        elif isinstance(lay, AvgPool) and spatial:
            nd = len(lay.window_shape)
            if ndim is not None and nd != ndim:
                raise ConfigError(f"layer {i} ({lay!r}): a {nd}-D window after {ndim}-D layers")
            ndim = nd
            ops.append(ConvOp(Conv(None, lay.window_shape, lay.strides, lay.padding), 1.0, 0.0, False, True))
        elif isinstance(lay, GlobalAvgPool) and spatial:
            if ndim is None:
                raise ConfigError(f"layer {i} (global_avg_pool) comes before any Conv layer; "
                                  f"supported: {SUPPORTED_CONV}")
            ops.append(PoolOp())
            spatial = False
        elif isinstance(lay, Dense) and not spatial:
            ops.append(DenseOp(float(lay.W_std), float(lay.b_std or 0.0), bool(lay.trainable)))
            prev_affine = True
        elif isinstance(lay, ABRelu):
            if not prev_affine:
                raise ConfigError(f"layer {i} ({lay!r}) acts on the raw input, a pooled input or another "
                                  "activation; put a Conv (or, after global_avg_pool, a Dense) layer before every "
                                  "activation")
            ops.append(ActOp(float(lay.a), float(lay.b)))
            prev_affine = False
        else:
            where = ("before global_avg_pool: convolutional features must be pooled by global_avg_pool "
                     "(a flatten readout or a Dense layer on spatial activations is not supported)") if spatial \
                else "after global_avg_pool"
            raise ConfigError(f"layer {i}: {_unsupported(lay, SUPPORTED_CONV)} ({where})")
    if spatial:
        raise ConfigError("the architecture has no global_avg_pool layer; this feature map supports "
                          f"{SUPPORTED_CONV}")
    if not any(isinstance(o, DenseOp) for o in ops):
        raise ConfigError("the architecture has no Dense readout after global_avg_pool; end it with "
                          "global_avg_pool and a Dense layer")
    if kernel == "ntk" and not any(isinstance(o, (DenseOp, ConvOp)) and o.trainable for o in ops):
        raise ConfigError("no layer of this architecture is trainable, so its NTK is identically 0; "
                          "use kernel='nngp'")
    return architecture, ops, ndim
