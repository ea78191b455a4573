"""Convolutions: the exact infinite-width kernel rule (CNTK) and the finite layer, side by side.

A convolution with weights shared over positions maps the kernel of its input to (Novak et al. 2019,
"Bayesian deep CNNs with many channels are GPs", Eq. (7); Arora et al. 2019, "On exact computation with
an infinitely wide neural net", Sec. 4 / App. B)

    Sbar(p, p') = (1 / F) sum_o Sigma(p s + o - pad, p' s + o - pad)      (zero outside the input)
    Sigma' = W_std^2 Sbar + b_std^2,      Theta' = Sigma' + W_std^2 Tbar        (NTK parameterization)

with the *same* filter offset o on both positions. The sum over o = (o_1, ..., o_D) factorises over the
spatial dimensions, so it is applied one dimension at a time: f_1 + f_2 shifted, strided additions on the
(H, H') and (W, W') diagonals instead of f_1 f_2 (:func:`window_sum`). Without pixel pairs the same
additions run on the same-position diagonal only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .._validation import ConfigError, check_nonnegative
from ._state import KernelState, scratch
from .layers import BuildContext, KernelContext, Layer, SpatialShape, _orthogonal, _scales

__all__ = ["Conv", "ConvModule", "window_sum", "conv_geometry", "PADDINGS"]

PADDINGS = ("SAME", "VALID")


def conv_geometry(size: int, f: int, s: int, padding: str, what: str = "conv") -> tuple[int, int]:
    """(output size, padding before) of a window of size ``f`` and stride ``s`` along an axis of ``size``.

    VALID: no padding, output floor((size - f) / s) + 1. SAME: output ceil(size / s), total padding
    max((out - 1) s + f - size, 0) with floor(total / 2) before (TensorFlow/XLA, neural-tangents).
    """
    if padding == "VALID":
        if size < f:
            raise ValueError(f"{what}: a window of size {f} with VALID padding needs inputs of at least {f} "
                             f"positions along this axis, got {size}; use larger inputs or padding='SAME'")
        return (size - f) // s + 1, 0
    out = -(-size // s)
    total = max((out - 1) * s + f - size, 0)
    return out, total // 2


def window_sum(t: torch.Tensor, axes: tuple, size: int, f: int, s: int, pad: int, out: int) -> torch.Tensor:
    """sum_o t[i s + o - pad] (zero outside ``[0, size)``) along every axis in ``axes`` with the same o.

    ``axes=(p,)`` is a 1-D window sum; ``axes=(p, p')`` sums the diagonal band of a position-pair
    tensor with a shared offset (the convolution rule). Returns a new tensor with those axes of length
    ``out``; f strided slice additions, no padded copy.
    """
    shape = list(t.shape)
    for a in axes:
        shape[a] = out
    spans = []
    for o in range(f):
        start = o - pad
        lo = (-start + s - 1) // s if start < 0 else 0       # first i with i s + start >= 0
        hi = min(out - 1, (size - 1 - start) // s)          # last i with i s + start <= size - 1
        if hi >= lo:
            spans.append((lo, hi, start))
    # start from an offset that covers the whole output (the centre tap for SAME): no zero fill
    spans.sort(key=lambda sp: (sp[0] != 0 or sp[1] != out - 1))

    def index(lo, hi, start):
        src, dst = [slice(None)] * t.ndim, [slice(None)] * t.ndim
        for a in axes:
            src[a] = slice(lo * s + start, hi * s + start + 1, s)
            dst[a] = slice(lo, hi + 1)
        return tuple(src), tuple(dst)

    if not spans:
        return t.new_zeros(shape)
    lo0, hi0, start0 = spans[0]
    res = scratch(shape, t)
    if lo0 == 0 and hi0 == out - 1:
        centre = t[index(lo0, hi0, start0)[0]]
        if len(spans) == 1:
            res.copy_(centre)
            return res
        # centre + the next offset in one pass over their overlap; the centre alone on the border strips
        lo, hi, start = spans[1]
        src, dst = index(lo, hi, start)
        torch.add(centre[dst], t[src], out=res[dst])
        for k, a in enumerate(axes):
            for part in (slice(0, lo), slice(hi + 1, out)):
                if part.stop <= part.start:
                    continue
                idx = [slice(None)] * t.ndim
                for b in axes[:k]:
                    idx[b] = slice(lo, hi + 1)
                idx[a] = part
                res[tuple(idx)] = centre[tuple(idx)]
        rest = spans[2:]
    else:
        res.zero_()
        rest = spans
    for lo, hi, start in rest:
        src, dst = index(lo, hi, start)
        res[dst] += t[src]
    return res


def _tuple(v, n: int | None, name: str, where: str = "conv") -> tuple:
    if isinstance(v, (int, np.integer)):
        v = (int(v),) * (n or 1)
    try:
        v = tuple(int(e) for e in v)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} {name} must be a list of positive integers, got {v!r}") from None
    if not v or any(e < 1 for e in v) or (n is not None and len(v) != n):
        want = f"{n} " if n else ""
        raise ConfigError(f"{where} {name} must be a list of {want}positive integers, got {v!r}")
    return v


@dataclass(frozen=True)
class Conv(Layer):
    """Convolution over the spatial axes (1-D or 2-D), weights shared over positions.

    Parameters
    ----------
    out_chan : int or None
        Output channels of the finite layer (irrelevant to the NTK-parameterization kernels; None: set
        by ``width`` of :meth:`Architecture.init`).
    filter_shape : tuple of int
        ``(fh, fw)`` for images, ``(f,)`` for 1-D signals.
    strides : tuple of int, optional
        Default 1 along every axis.
    padding : {"SAME", "VALID"}
        As in TensorFlow / neural-tangents (see :func:`conv_geometry`).
    W_std, b_std : float
        Weight and bias standard deviations; ``b_std=None``: no bias.
    trainable : bool
        False freezes the layer (it enters the NNGP, not the NTK).

    Kernel rule (``F = prod(filter_shape)``, ``C_in`` = input channels): Sigma' = W_std^2 Sbar + b_std^2 and
    Theta' = Sigma' + W_std^2 Tbar (NTK parameterization) or Theta' = C_in F Sbar + W_std^2 Tbar + 1[bias]
    (standard parameterization: the NTK depends on the fan-in C_in F; Lee et al. 2019, App. C).
    The finite twin (:class:`ConvModule`) is z = (W_std / sqrt(C_in F)) W * x + b_std b with W, b ~ N(0, 1)
    (NTK) or W ~ N(0, W_std^2 / (C_in F)), b ~ N(0, b_std^2) (standard).

    With ``init="orthogonal"`` the twin gets delta-orthogonal filters (Xiao et al. 2018, Alg. 2): a
    Haar-orthogonal matrix at the centre tap, zeros elsewhere. Its limit is not the Gaussian one: the
    forward map sees the centre tap only, Sigma' = W_std^2 Sigma(p s + c - pad, p' s + c - pad) + b_std^2,
    and Theta' = [W_std^2 Sbar + b_std^2] + W_std^2 Theta(centre) -- the gradient with respect to all taps
    still averages over the window (``arch.kernel(..., init="orthogonal")``).
    """

    out_chan: int | None = None
    filter_shape: tuple = (3, 3)
    strides: tuple | None = None
    padding: str = "SAME"
    W_std: float = 1.0
    b_std: float | None = 0.0
    trainable: bool = True
    layer_name = "conv"

    def __post_init__(self):
        fs = _tuple(self.filter_shape, None, "filter_shape")
        if len(fs) > 2:
            raise ConfigError(f"conv supports 1-D and 2-D filters, got filter_shape {fs}")
        object.__setattr__(self, "filter_shape", fs)
        object.__setattr__(self, "strides", _tuple((1,) * len(fs) if self.strides is None else self.strides,
                                                   len(fs), "strides"))
        pad = str(self.padding).upper()
        if pad not in PADDINGS:
            raise ConfigError(f"conv padding must be 'SAME' or 'VALID', got {self.padding!r}")
        object.__setattr__(self, "padding", pad)
        if self.out_chan is not None and (int(self.out_chan) != self.out_chan or self.out_chan < 1):
            raise ConfigError(f"conv out_chan must be a positive integer or None, got {self.out_chan!r}")
        if self.out_chan is not None:
            object.__setattr__(self, "out_chan", int(self.out_chan))
        if not isinstance(self.trainable, (bool, np.bool_)):
            raise ConfigError(f"conv trainable must be true or false, got {self.trainable!r}")
        object.__setattr__(self, "trainable", bool(self.trainable))
        object.__setattr__(self, "W_std", check_nonnegative(self.W_std, "conv W_std"))
        object.__setattr__(self, "b_std", check_nonnegative(self.b_std, "conv b_std", allow_none=True))

    # -- geometry ---------------------------------------------------------------------------------------
    def geometry(self, size: tuple) -> list[tuple[int, int, int, int, int]]:
        """Per spatial axis (size, f, s, pad_before, out) for inputs of spatial ``size``."""
        if len(size) != len(self.filter_shape):
            kind = {1: "1-D signals (n, L, C)", 2: "images (n, H, W, C)"}[len(self.filter_shape)]
            got = "flat features" if not size else f"spatial shape {tuple(size)}"
            raise ConfigError(f"conv with filter_shape {self.filter_shape} needs {kind}, but gets {got}")
        out = []
        for n, f, s in zip(size, self.filter_shape, self.strides):
            o, pad = conv_geometry(n, f, s, self.padding,
                                   f"conv (filter {'x'.join(map(str, self.filter_shape))}) on inputs of spatial "
                                   f"shape {'x'.join(map(str, size))}")
            out.append((n, f, s, pad, o))
        return out

    def _filter(self, t, k: KernelState, geo):
        """sum over filter offsets (not yet divided by F) of a tensor in the state's layout."""
        return self.filter_offsets(t, k.spatial_axes, geo)

    @staticmethod
    def filter_offsets(t, axes, geo):
        """sum over filter offsets (not yet divided by F) of ``t``, whose spatial axis pair ``d`` is ``axes(d)``
        (one axis of a same-position state, the (p, p') pair of a position-pair state); ``geo`` from
        :meth:`geometry`. A constant passes through."""
        if not isinstance(t, torch.Tensor):
            return t
        for d, (n, f, s, pad, o) in enumerate(geo):
            if not (f == 1 and s == 1 and pad == 0 and o == n):  # a 1x1 window is the identity
                t = window_sum(t, axes(d), n, f, s, pad, o)
        return t

    # -- infinite width ---------------------------------------------------------------------------------
    def tap_variances(self) -> tuple[float, float]:
        """``(W_std^2 / F, b_std^2)`` (0 without bias): the factors of the window sum and the bias in the
        kernel rule (NTK parameterization; F the number of filter taps)."""
        return self.W_std**2 / math.prod(self.filter_shape), 0.0 if self.b_std is None else self.b_std**2

    def apply_kernel(self, k: KernelState, ctx: KernelContext) -> KernelState:
        if isinstance(k, tuple):
            raise ConfigError("conv applied to unmerged branches: after fanout, use parallel([...]) for the "
                              "branches and fanin_sum to merge them")
        geo = self.geometry(k.shape)
        w2, b2 = self.tap_variances()
        b2t = torch.tensor(b2, dtype=k.nngp.dtype, device=k.nngp.device)
        standard = ctx.parameterization == "standard" and k.ntk is not None and self.trainable

        def affine(t):  # W_std^2 / F * (sum over offsets) + b_std^2, in one pass
            s = self._filter(t, k, geo)
            return torch.add(b2t, s, alpha=w2, out=s if s is not t else None)

        if ctx.init == "orthogonal":
            return self._delta_orthogonal_kernel(k, ctx, geo, b2t)
        s_sum = self._filter(k.nngp, k, geo)
        owned = s_sum is not k.nngp  # never write into the input state (branches may share it)
        nngp = torch.add(b2t, s_sum, alpha=w2, out=s_sum if owned and not standard else None)
        ntk = k.ntk
        if ntk is not None:
            t_sum = self._filter(ntk, k, geo)
            if not self.trainable:
                ntk = t_sum * w2 if isinstance(t_sum, torch.Tensor) else 0.0
            elif ctx.parameterization == "ntk":
                ntk = nngp.clone() if not isinstance(t_sum, torch.Tensor) else torch.add(
                    nngp, t_sum, alpha=w2, out=t_sum if t_sum is not k.ntk else None)
            else:
                if k.width is None:
                    raise ConfigError("the standard-parameterization NTK of a conv depends on its number of input "
                                      "channels; give every hidden conv an out_chan (or pass width=).")
                ntk = s_sum * float(k.width)  # C_in F Sbar = C_in * (sum over offsets)
                if isinstance(t_sum, torch.Tensor):
                    ntk.add_(t_sum, alpha=w2)
                if self.b_std is not None:
                    ntk.add_(1.0)
        # the self-kernels go through the same operations as nngp (bitwise, as in Dense)
        return k.update(nngp, ntk, affine, width=self.out_chan, gaussian=True, fresh=True, deps=frozenset(),
                        shape=tuple(g[4] for g in geo))

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """The filter windows of channels-last inputs ``(n, *size, C)`` as features ``(n, *out_size, F C)``
        (zero padding included), so that the first convolution's input kernel is a plain Gram of patches:
        Sbar(x, x'; p, p') = (1 / F) sum_o Sigma0(p s + o - pad, p' s + o - pad) = patch(p) . patch'(p') / (F C)
        -- one matrix product instead of building Sigma0 and filtering it (im2col)."""
        geo = self.geometry(tuple(x.shape[1:-1]))
        pads = []
        for n, f, s, pad, o in reversed(geo):
            total = max((o - 1) * s + f - n, 0) if self.padding == "SAME" else 0
            pads += [pad, total - pad]
        x = torch.nn.functional.pad(x, [0, 0] + pads) if any(pads) else x
        for d, (n, f, s, pad, o) in enumerate(geo):
            x = x.unfold(1 + d, f, s)  # appends the window axis
            x = x.narrow(1 + d, 0, o)
        return x.reshape(*x.shape[:1 + len(geo)], -1)

    def pointwise(self) -> "Conv":
        """The same layer as a 1x1 convolution (to be applied to :meth:`patches`)."""
        return Conv(self.out_chan, (1,) * len(self.filter_shape), None, "VALID", self.W_std, self.b_std,
                    self.trainable)

    def _delta_orthogonal_kernel(self, k: KernelState, ctx: KernelContext, geo, b2t) -> KernelState:
        """Limit of the delta-orthogonal twin (Xiao et al. 2018): at initialization only the centre tap
        c = f // 2 is non-zero, so the forward map -- NNGP and the back-propagated NTK -- sees the input at
        position p s + c - pad alone (Sigma' = W_std^2 Sigma_c + b_std^2, Theta' gets W_std^2 Theta_c), while
        the gradient with respect to *all* filter taps still contributes the offset average W_std^2 Sbar +
        b_std^2 (NTK parameterization; C_in F Sbar + 1[bias] in the standard one), as for Gaussian filters."""
        w2 = self.W_std**2
        centre_geo = [(n, 1, s, pad - f // 2, o) for (n, f, s, pad, o) in geo]

        def centre(t):
            return self._filter(t, k, centre_geo)

        def affine(t):
            return torch.add(b2t, centre(t), alpha=w2)

        nngp = affine(k.nngp)
        ntk = k.ntk
        if ntk is not None:
            back = centre(ntk)
            back = back * w2 if isinstance(back, torch.Tensor) else 0.0
            if self.trainable:
                s_sum = self._filter(k.nngp, k, geo)
                if ctx.parameterization == "ntk":
                    grad = torch.add(b2t, s_sum, alpha=w2 / math.prod(self.filter_shape))
                else:
                    if k.width is None:
                        raise ConfigError("the standard-parameterization NTK of a conv depends on its number of "
                                          "input channels; give every hidden conv an out_chan (or pass width=).")
                    grad = (s_sum * float(k.width)).add_(1.0 if self.b_std is not None else 0.0)
                back = grad + back
            ntk = back
        return k.update(nngp, ntk, affine, width=self.out_chan, gaussian=True, fresh=True, deps=frozenset(),
                        shape=tuple(g[4] for g in geo))

    # -- finite width -----------------------------------------------------------------------------------
    def build_module(self, in_features, ctx: BuildContext):
        if isinstance(in_features, tuple):
            raise ConfigError("a conv layer cannot act on several branches; close them with fanin_sum first")
        if not isinstance(in_features, SpatialShape):
            raise ConfigError(f"conv with filter_shape {self.filter_shape} needs spatial inputs, but gets "
                              f"{in_features} flat features")
        if self.out_chan is None:
            raise ConfigError("a conv layer has no out_chan; pass width= to init() or set out_chan")
        geo = self.geometry(in_features.size)
        mod = ConvModule(in_features.channels, self.out_chan, self, geo, ctx)
        return mod, SpatialShape(self.out_chan, tuple(g[4] for g in geo))

    def to_config(self) -> dict:
        cfg = {"layer": "conv", "out_chan": self.out_chan, "filter_shape": list(self.filter_shape),
               "strides": list(self.strides), "padding": self.padding, "W_std": self.W_std, "b_std": self.b_std}
        if not self.trainable:
            cfg["trainable"] = False
        return cfg

    def dense_layers(self):
        return [self]

    def map_dense(self, fn):
        return fn(self)

    def with_out_dim(self, out_dim: int) -> "Conv":
        return Conv(out_dim, self.filter_shape, self.strides, self.padding, self.W_std, self.b_std, self.trainable)


def _delta_orthogonal(out_c: int, in_c: int, filter_shape: tuple, gen: torch.Generator) -> torch.Tensor:
    """Delta-orthogonal filter (Xiao et al. 2018, Algorithm 2): a Haar-orthogonal (out, in) matrix at the
    centre tap, zero elsewhere, scaled so that every output unit has the forward variance of the Gaussian
    filter with the same per-entry scale (unit entries times sqrt(F * max(out, in)))."""
    w = torch.zeros((out_c, in_c, *filter_shape), dtype=torch.float64)
    centre = tuple(f // 2 for f in filter_shape)
    q = _orthogonal((out_c, in_c), gen) * math.sqrt(max(out_c, in_c) * math.prod(filter_shape))
    w[(slice(None), slice(None), *centre)] = q
    return w


class ConvModule(nn.Module):
    """Finite convolution ``y = weight_scale * conv(x, weight) + bias_scale * bias`` on ``(n, C, *size)`` tensors.

    ``weight`` has the torch layout ``(out_channels, in_channels, *filter_shape)``; SAME padding is the
    asymmetric TensorFlow rule (floor(total / 2) before), applied with ``F.pad``.
    """

    def __init__(self, in_channels: int, out_channels: int, spec: Conv, geometry, ctx: BuildContext):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.filter_shape, self.strides = spec.filter_shape, spec.strides
        F = math.prod(spec.filter_shape)
        w_mult, w_std, b_mult, b_init = _scales(ctx.parameterization, spec.W_std, spec.b_std, self.in_channels * F)
        self.weight_scale, self.bias_scale = float(w_mult), float(b_mult)
        self.padding = spec.padding
        gen = ctx.generator
        shape = (self.out_channels, self.in_channels, *spec.filter_shape)
        if ctx.init == "orthogonal":
            w = _delta_orthogonal(self.out_channels, self.in_channels, spec.filter_shape, gen)
        else:
            w = torch.randn(shape, generator=gen, dtype=torch.float64)
        self.weight = nn.Parameter((w * w_std).to(dtype=ctx.dtype, device=ctx.device), requires_grad=spec.trainable)
        if spec.b_std is None:
            self.register_parameter("bias", None)
        else:
            b = torch.randn(self.out_channels, generator=gen, dtype=torch.float64) * b_init
            self.bias = nn.Parameter(b.to(dtype=ctx.dtype, device=ctx.device), requires_grad=spec.trainable)

    def _pads(self, size) -> list[int]:
        pads = []
        for n, f, s in zip(reversed(size), reversed(self.filter_shape), reversed(self.strides)):
            if self.padding == "VALID":
                pads += [0, 0]
                continue
            out = -(-n // s)
            total = max((out - 1) * s + f - n, 0)
            pads += [total // 2, total - total // 2]
        return pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = len(self.filter_shape)
        if x.ndim != nd + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"ConvModule expects (n, {self.in_channels}, {', '.join('HW'[:nd] if nd == 2 else 'L')})"
                             f" inputs, got shape {tuple(x.shape)}")
        size = tuple(x.shape[2:])
        for n, f in zip(size, self.filter_shape):
            if self.padding == "VALID" and n < f:
                raise ValueError(f"ConvModule: a {'x'.join(map(str, self.filter_shape))} VALID filter needs inputs "
                                 f"of at least that size, got spatial shape {size}")
        pads = self._pads(size)
        if any(pads):
            x = torch.nn.functional.pad(x, pads)
        conv = torch.nn.functional.conv2d if nd == 2 else torch.nn.functional.conv1d
        y = conv(x, self.weight, stride=self.strides)
        if self.weight_scale != 1.0:
            y = y * self.weight_scale
        if self.bias is not None:
            b = self.bias * self.bias_scale if self.bias_scale != 1.0 else self.bias
            y = y + b.reshape(-1, *([1] * nd))
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, filter_shape={self.filter_shape}, strides={self.strides}, "
                f"padding={self.padding!r}, weight_scale={self.weight_scale:.4g}, bias_scale={self.bias_scale:.4g}")
