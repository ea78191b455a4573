"""Pooling and flattening of spatial activations: exact kernel rules and finite layers side by side.

Average pooling and global average pooling are linear maps that mix *different* positions, so their
kernels need the covariances of all pairs of positions (Novak et al. 2019, Sec. 3.1; Arora et al. 2019,
Sec. 4, "CNTK-GAP"); Flatten followed by a Dense layer only sees the same-position diagonal (Novak et al.
2019, Eq. (9): "CNN-GP without pooling"), which is why the architecture keeps the pixel-pair layout only
as far as the last pooling layer (:class:`~ntkit.kernels._state.KernelState`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .._validation import ConfigError
from ._state import KernelState, drop_pixel_pairs
from .conv import PADDINGS, _tuple, conv_geometry, window_sum
from .layers import Layer, SpatialShape

__all__ = ["AvgPool", "GlobalAvgPool", "Flatten"]


def _spatial(k, name: str) -> KernelState:
    if isinstance(k, tuple):
        raise ConfigError(f"{name} applied to unmerged branches; close them with fanin_sum first")
    return k


def _mean_over_space(t, k: KernelState):
    if not isinstance(t, torch.Tensor):
        return t
    return t.mean(dim=tuple(range(k.batch_ndim, t.ndim)))


@dataclass(frozen=True)
class AvgPool(Layer):
    """Average pooling over windows of the spatial axes (1-D or 2-D).

    Parameters
    ----------
    window_shape : tuple of int
    strides : tuple of int, optional
        Default 1 along every axis (neural-tangents' ``stax.AvgPool`` convention; pass ``strides=window_shape``
        for non-overlapping windows).
    padding : {"VALID", "SAME"}
        SAME pads with zeros that count in the average (neural-tangents' ``normalize_edges=False``).

    Kernel rule: with independent window offsets o, o' on the two positions,
    Sigma'(p, p') = (1 / F^2) sum_{o, o'} Sigma(p s + o - pad, p' s + o' - pad), F = prod(window_shape),
    applied one spatial axis at a time (a 1-D window average on each of p and p'). Needs pixel pairs.
    """

    window_shape: tuple = (2, 2)
    strides: tuple | None = None
    padding: str = "VALID"
    layer_name = "avg_pool"

    def __post_init__(self):
        ws = _tuple(self.window_shape, None, "window_shape", "avg_pool")
        if len(ws) > 2:
            raise ConfigError(f"avg_pool supports 1-D and 2-D windows, got window_shape {ws}")
        object.__setattr__(self, "window_shape", ws)
        object.__setattr__(self, "strides", _tuple((1,) * len(ws) if self.strides is None else self.strides,
                                                   len(ws), "strides", "avg_pool"))
        pad = str(self.padding).upper()
        if pad not in PADDINGS:
            raise ConfigError(f"avg_pool padding must be 'SAME' or 'VALID', got {self.padding!r}")
        object.__setattr__(self, "padding", pad)

    def needs_pixel_pairs(self):
        return True

    def geometry(self, size):
        if len(size) != len(self.window_shape):
            got = "flat features" if not size else f"spatial shape {tuple(size)}"
            raise ConfigError(f"avg_pool with window_shape {self.window_shape} needs {len(self.window_shape)}-D "
                              f"spatial activations, but gets {got}")
        return [(n, f, s, *conv_geometry(n, f, s, self.padding, f"avg_pool (window "
                                          f"{'x'.join(map(str, self.window_shape))}) on spatial shape {tuple(size)}"))
                for n, f, s in zip(size, self.window_shape, self.strides)]

    def apply_kernel(self, k, ctx):
        k = _spatial(k, "avg_pool")
        if not k.pixel_pairs:
            raise ConfigError("avg_pool needs the covariances of all pairs of positions; do not pass "
                              "pixel_pairs=False for an architecture with pooling")
        geo = self.geometry(k.shape)
        scale = 1.0 / math.prod(self.window_shape) ** 2

        def pool(t):
            if not isinstance(t, torch.Tensor):
                return t
            for d, (n, f, s, o, pad) in enumerate(geo):
                for ax in k.spatial_axes(d):  # independent offsets on p and on p'
                    t = window_sum(t, (ax,), n, f, s, pad, o)
            return t.mul_(scale)

        return k.update(pool(k.nngp), pool(k.ntk), pool, shape=tuple(g[3] for g in geo))

    def build_module(self, in_features, ctx):
        if not isinstance(in_features, SpatialShape):
            raise ConfigError(f"avg_pool needs spatial activations, got {in_features!r}")
        geo = self.geometry(in_features.size)
        return _AvgPoolModule(self, geo), SpatialShape(in_features.channels, tuple(g[3] for g in geo))

    def to_config(self):
        return {"layer": "avg_pool", "window_shape": list(self.window_shape), "strides": list(self.strides),
                "padding": self.padding}


class _AvgPoolModule(nn.Module):
    def __init__(self, spec: AvgPool, geo):
        super().__init__()
        self.window, self.strides, self.padding = spec.window_shape, spec.strides, spec.padding
        self.pads = []
        for n, f, s, o, pad in reversed(geo):
            total = max((o - 1) * s + f - n, 0) if spec.padding == "SAME" else 0
            self.pads += [pad, total - pad]

    def forward(self, x):
        if any(self.pads):
            x = torch.nn.functional.pad(x, self.pads)
        pool = torch.nn.functional.avg_pool2d if len(self.window) == 2 else torch.nn.functional.avg_pool1d
        return pool(x, self.window, self.strides)


@dataclass(frozen=True)
class GlobalAvgPool(Layer):
    """Average over all spatial positions: ``(n, C, *size) -> (n, C)``.

    Kernel rule: Sigma'(x, x') = mean over all pairs (p, p') of Sigma(p, p'), and the same for Theta
    (Arora et al. 2019, Sec. 4, CNTK-GAP). Needs pixel pairs; the next Dense has fan-in C.
    """

    layer_name = "global_avg_pool"

    def needs_pixel_pairs(self):
        return True

    def apply_kernel(self, k, ctx):
        k = _spatial(k, "global_avg_pool")
        if not k.shape:
            raise ConfigError("global_avg_pool needs spatial activations (images or 1-D signals), got flat features")
        if not k.pixel_pairs:
            raise ConfigError("global_avg_pool needs the covariances of all pairs of positions; do not pass "
                              "pixel_pairs=False for an architecture with pooling")
        mean = lambda t: _mean_over_space(t, k)  # noqa: E731
        return k.update(mean(k.nngp), mean(k.ntk), mean, shape=(), pixel_pairs=False)

    def build_module(self, in_features, ctx):
        if not isinstance(in_features, SpatialShape):
            raise ConfigError(f"global_avg_pool needs spatial activations, got {in_features!r} flat features")
        return _GlobalAvgPoolModule(), in_features.channels

    def to_config(self):
        return {"layer": "global_avg_pool"}


class _GlobalAvgPoolModule(nn.Module):
    def forward(self, x):
        return x.mean(dim=tuple(range(2, x.ndim)))


@dataclass(frozen=True)
class Flatten(Layer):
    """Reshape ``(n, C, *size)`` into ``(n, prod(size) * C)`` features, in (H, W, C) order (as NHWC).

    Kernel rule: Sigma'(x, x') = mean over positions p of Sigma(p, p) -- the same-position diagonal only
    (Novak et al. 2019, Eq. (9)); the next Dense layer has fan-in prod(size) C, whose 1 / fan-in makes
    the sum over positions a mean. Flatten of flat features is the identity.
    """

    layer_name = "flatten"

    def apply_kernel(self, k, ctx):
        k = _spatial(k, "flatten")
        if not k.shape:
            return k
        diag = drop_pixel_pairs(k)
        mean = lambda t: _mean_over_space(t, diag)  # noqa: E731
        return diag.update(mean(diag.nngp), mean(diag.ntk), mean, shape=(),
                           width=None if k.width is None else k.width * math.prod(k.shape))

    def build_module(self, in_features, ctx):
        if not isinstance(in_features, SpatialShape):
            return nn.Identity(), in_features
        return _FlattenModule(), in_features.channels * math.prod(in_features.size)

    def to_config(self):
        return {"layer": "flatten"}


class _FlattenModule(nn.Module):
    def forward(self, x):
        return x.movedim(1, -1).reshape(x.shape[0], -1)
