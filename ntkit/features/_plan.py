"""Read an architecture into the list of operations the feature maps support (Dense and ABRelu layers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._validation import ConfigError
from ..kernels import Architecture, from_config
from ..kernels.activations import ABRelu
from ..kernels.layers import Dense, Identity, Serial
from ._base import _unsupported

__all__ = ["DenseOp", "ActOp", "read_architecture", "SUPPORTED"]

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


def _flatten(layers, out):
    for lay in layers:
        if isinstance(lay, Serial):
            _flatten(lay.layers, out)
        else:
            out.append(lay)
    return out


def read_architecture(architecture: Any, kernel: str, *, supported: str = SUPPORTED) -> tuple[Architecture, list]:
    """(Architecture, ops) or a ConfigError naming the first unsupported layer and what is supported."""
    if isinstance(architecture, (dict, str)):
        architecture = from_config(architecture)
    if not isinstance(architecture, Architecture):
        raise TypeError(f"architecture must be an ntkit.Architecture (ntkit.serial / ntkit.mlp) or its config, "
                        f"got {type(architecture).__name__}")
    if kernel not in ("ntk", "nngp"):
        raise ValueError(f"kernel must be 'ntk' or 'nngp', got {kernel!r}")
    if kernel == "ntk" and architecture.parameterization != "ntk":
        raise ConfigError("the feature maps approximate the NTK of the NTK parameterization (its infinite-width "
                          "limit does not depend on the widths); got parameterization="
                          f"{architecture.parameterization!r}. Use parameterization='ntk', or kernel='nngp' "
                          "(the same in both parameterizations).")
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
