"""Layers of an architecture description: each holds its infinite-width kernel rule and builds its
finite ``nn.Module``, side by side, so the two views cannot drift apart.

Kernel rules follow Jacot et al. (2018), Thm. 1 (NTK recursion) and Lee et al. (2019), App. C
(standard parameterization); conventions are those of neural-tangents (Novak et al. 2020) so that
values are directly comparable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .._validation import ConfigError, check_nonnegative
from ._state import KernelState, State

__all__ = ["Layer", "Dense", "Identity", "FanOut", "Parallel", "FanInSum", "Serial", "BuildContext",
           "DenseModule", "PARAMETERIZATIONS", "SpatialShape"]

PARAMETERIZATIONS = ("ntk", "standard")


@dataclass
class BuildContext:
    """Settings shared by all layers while building a finite network."""

    parameterization: str
    generator: torch.Generator
    init: str = "gaussian"
    dtype: torch.dtype = torch.float64
    device: torch.device | str | None = None


@dataclass(frozen=True)
class SpatialShape:
    """Shape of spatial activations in the finite network: ``channels`` at each of ``size`` positions.

    Layers' ``build_module`` receive it instead of a feature count (an int) when the activations are
    images (``size = (H, W)``) or 1-D signals (``size = (L,)``).
    """

    channels: int
    size: tuple

    def __str__(self):
        return "x".join(map(str, self.size)) + f" positions x {self.channels} channels"


@dataclass
class KernelContext:
    """Settings shared by all layers while computing kernels: the parameterization, the weight
    initialization of the finite twin whose limit is computed (only delta-orthogonal convolutions,
    ``init="orthogonal"``, have a limit of their own), and whether activations may use their fused
    (compiled) dual kernels."""

    parameterization: str
    init: str = "gaussian"
    fused: bool = False  # compiled one-pass activation duals where available (ntkit.kernels._fused)


class Layer:
    """Base class: a layer maps a kernel state to a kernel state and builds a finite module."""

    layer_name: str = "layer"

    def apply_kernel(self, k: State, ctx: KernelContext) -> State:  # pragma: no cover - abstract
        raise NotImplementedError

    def build_module(self, in_features, ctx: BuildContext):  # pragma: no cover - abstract
        """Return ``(module, out_features)``; features may be a tuple for branched states."""
        raise NotImplementedError

    def to_config(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def dense_layers(self) -> list["Layer"]:
        """All layers with an output width (Dense, Conv) in traversal order."""
        return []

    def needs_pixel_pairs(self) -> bool:
        """Whether the layer mixes different spatial positions (average pooling, global average pooling),
        so that its input kernel must carry the covariances of all pairs of positions."""
        return False

    def map_dense(self, fn) -> "Layer":
        """A copy with every Dense layer replaced by fn(dense)."""
        return self


# ---------------------------------------------------------------------------------------------------
def _scales(parameterization: str, W_std: float, b_std: float | None, n_in: int):
    """Forward multipliers and initial standard deviations of (weight, bias) for one Dense layer.

    NTK parameterization (Jacot et al. 2018, Eq. 1; neural-tangents): z = (W_std/sqrt(n_in)) W x + b_std b
    with W, b ~ N(0, 1). Standard parameterization: z = W x + b with W ~ N(0, W_std^2/n_in),
    b ~ N(0, b_std^2). Returns (weight_multiplier, weight_init_std, bias_multiplier, bias_init_std).
    """
    if parameterization == "ntk":
        return W_std / math.sqrt(n_in), 1.0, (b_std or 0.0), 1.0
    return 1.0, W_std / math.sqrt(n_in), 1.0, (b_std or 0.0)


class DenseModule(nn.Module):
    """Finite fully-connected layer ``y = weight_scale * x @ weight.T + bias_scale * bias``.

    ``weight`` has shape ``(out_features, in_features)`` like ``nn.Linear``; ``weight_scale`` and
    ``bias_scale`` are the constant multipliers of the parameterization (1 in the standard one).
    """

    def __init__(self, in_features: int, out_features: int, W_std: float, b_std: float | None,
                 ctx: BuildContext, trainable: bool = True):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        w_mult, w_std, b_mult, b_init = _scales(ctx.parameterization, W_std, b_std, in_features)
        self.weight_scale = float(w_mult)
        self.bias_scale = float(b_mult)
        gen = ctx.generator
        shape = (self.out_features, self.in_features)
        if ctx.init == "gaussian":
            w = torch.randn(shape, generator=gen, dtype=torch.float64)
        elif ctx.init == "orthogonal":
            w = _orthogonal(shape, gen) * math.sqrt(max(shape))
        else:  # validated earlier
            raise ConfigError(f"unknown init {ctx.init!r}")
        self.weight = nn.Parameter((w * w_std).to(dtype=ctx.dtype, device=ctx.device), requires_grad=trainable)
        if b_std is None:
            self.register_parameter("bias", None)
        else:
            b = torch.randn(self.out_features, generator=gen, dtype=torch.float64) * b_init
            self.bias = nn.Parameter(b.to(dtype=ctx.dtype, device=ctx.device), requires_grad=trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"DenseModule expects {self.in_features} input features, got {x.shape[-1]} "
                             f"(input shape {tuple(x.shape)})")
        y = torch.nn.functional.linear(x, self.weight)
        if self.weight_scale != 1.0:
            y = y * self.weight_scale
        if self.bias is not None:
            y = y + (self.bias * self.bias_scale if self.bias_scale != 1.0 else self.bias)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight_scale={self.weight_scale:.4g}, bias_scale={self.bias_scale:.4g}")


def _orthogonal(shape, gen: torch.Generator) -> torch.Tensor:
    """A Haar-random matrix with orthonormal rows (rows <= cols) or columns (rows > cols)."""
    rows, cols = shape
    a = torch.randn((max(rows, cols), min(rows, cols)), generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))[None, :]  # makes the distribution Haar
    return q if rows >= cols else q.T


@dataclass(frozen=True)
class Dense(Layer):
    """Fully-connected (affine) layer.

    Parameters
    ----------
    out_dim : int or None
        Output features of the finite layer. Irrelevant to the NTK-parameterization kernels;
        in the standard parameterization the *next* layer's NTK depends on it. None: set later by
        ``width`` (hidden layers) or ``out_dim`` (readout) of :meth:`Architecture.init`.
    W_std, b_std : float
        Weight and bias standard deviations; ``b_std=None`` means no bias parameter.
    trainable : bool
        False freezes the layer (its parameters get ``requires_grad=False``, and it contributes to
        the NNGP but not to the NTK: the "fixed bottom layers" of Arora et al. 2020).

    Kernel rule, with Sigma' = W_std^2 Sigma + b_std^2 in both parameterizations:

    * NTK parameterization: Theta' = W_std^2 Theta + Sigma' (Jacot et al. 2018, Thm. 1).
    * standard parameterization: Theta' = W_std^2 Theta + n_in Sigma + 1[bias]
      (Lee et al. 2019, App. C; n_in = width of the layer's input).
    """

    out_dim: int | None = None
    W_std: float = 1.0
    b_std: float | None = 0.0
    trainable: bool = True
    layer_name = "dense"

    def __post_init__(self):
        if not isinstance(self.trainable, (bool, np.bool_)):
            raise ConfigError(f"dense trainable must be true or false, got {self.trainable!r}")
        object.__setattr__(self, "trainable", bool(self.trainable))
        if self.out_dim is not None and (int(self.out_dim) != self.out_dim or self.out_dim < 1):
            raise ConfigError(f"dense out_dim must be a positive integer or None, got {self.out_dim!r}")
        object.__setattr__(self, "W_std", check_nonnegative(self.W_std, "dense W_std"))
        object.__setattr__(self, "b_std", check_nonnegative(self.b_std, "dense b_std", allow_none=True))
        if self.out_dim is not None:
            object.__setattr__(self, "out_dim", int(self.out_dim))

    def apply_kernel(self, k: KernelState, ctx: KernelContext) -> KernelState:
        if isinstance(k, tuple):
            raise ConfigError("dense applied to unmerged branches: after fanout, use parallel([...]) for the "
                              "branches and fanin_sum to merge them")
        if k.shape:
            raise ConfigError(f"dense applied to spatial activations of shape {k.shape}: add flatten or "
                              "global_avg_pool before it (or use a conv with a 1x1 filter)")
        w2 = self.W_std**2
        b2 = 0.0 if self.b_std is None else self.b_std**2
        # Sigma and the variances q must go through bitwise-identical operations (no fused multiply-add
        # on one and not the other): then Sigma(x, x) == q(x) exactly, the self-correlation stays exactly 1,
        # and in the chaotic phase (chi_1 > 1) no rounding difference can grow like chi_1^depth.
        nngp = torch.mul(k.nngp, w2).add_(b2) if w2 != 1.0 or b2 != 0.0 else k.nngp
        var1, var2 = k.var1 * w2 + b2, k.var2 * w2 + b2
        ntk = k.ntk
        if ntk is not None:
            if not self.trainable:
                ntk = ntk * w2
            elif ctx.parameterization == "ntk":  # Sigma' + w2 * Theta in one pass
                ntk = nngp.clone() if isinstance(ntk, float) and ntk == 0.0 else torch.add(nngp, ntk, alpha=w2)
            else:
                if k.width is None:
                    raise ConfigError("the standard-parameterization NTK depends on the finite width of each "
                                      "Dense layer's input; give every hidden Dense an out_dim (or pass width=).")
                ntk = k.nngp * float(k.width) + ntk * w2 + (1.0 if self.b_std is not None else 0.0)
        return KernelState(nngp=nngp, ntk=ntk, var1=var1, var2=var2, width=self.out_dim, gaussian=True, fresh=True)

    def build_module(self, in_features, ctx: BuildContext):
        if isinstance(in_features, tuple):
            raise ConfigError("a Dense layer cannot act on several branches; close them with fanin_sum first")
        if isinstance(in_features, SpatialShape):
            raise ConfigError(f"dense applied to spatial activations {in_features}: add flatten or "
                              "global_avg_pool before it")
        if self.out_dim is None:
            raise ConfigError("a Dense layer has no out_dim; pass width= (hidden layers) and out_dim= (readout) "
                              "to init(), or set out_dim in the description.")
        return DenseModule(in_features, self.out_dim, self.W_std, self.b_std, ctx, self.trainable), self.out_dim

    def to_config(self) -> dict:
        cfg = {"layer": "dense", "out_dim": self.out_dim, "W_std": self.W_std, "b_std": self.b_std}
        if not self.trainable:
            cfg["trainable"] = False
        return cfg

    def dense_layers(self):
        return [self]

    def map_dense(self, fn):
        return fn(self)

    def with_out_dim(self, out_dim: int) -> "Dense":
        return Dense(out_dim, self.W_std, self.b_std, self.trainable)


@dataclass(frozen=True)
class Identity(Layer):
    """The identity map (the skip connection of a residual block)."""

    layer_name = "identity"

    def apply_kernel(self, k, ctx):
        return k

    def build_module(self, in_features, ctx):
        return nn.Identity(), in_features

    def to_config(self):
        return {"layer": "identity"}


@dataclass(frozen=True)
class FanOut(Layer):
    """Copy the current activations into ``num`` branches."""

    num: int = 2
    layer_name = "fanout"

    def __post_init__(self):
        if int(self.num) != self.num or self.num < 1:
            raise ConfigError(f"fanout num must be a positive integer, got {self.num!r}")

    def apply_kernel(self, k, ctx):
        if isinstance(k, tuple):
            raise ConfigError("fanout applied to branches that were not merged; add fanin_sum first")
        token = object()  # this fan-out: the branches are functions of one input until a Dense layer
        branch = k.replace(deps=k.deps | {token})
        return tuple([branch] * self.num)

    def build_module(self, in_features, ctx):
        return _FanOutModule(self.num), tuple([in_features] * self.num)

    def to_config(self):
        return {"layer": "fanout", "num": self.num}


class _FanOutModule(nn.Module):
    def __init__(self, num):
        super().__init__()
        self.num = num

    def forward(self, x):
        return tuple([x] * self.num)


@dataclass(frozen=True)
class FanInSum(Layer):
    """Add the branches elementwise. Kernels add when the cross terms E[f_i(x) f_j(x')] vanish, which
    holds when every branch but one ends in a Dense layer of its own (zero-mean output, fresh weights).
    Other sums -- x + relu(x), x + x, two branches ending in ReLU (non-zero means) -- get a ConfigError
    from the kernel rather than a wrong number; the finite network builds them all the same."""

    layer_name = "fanin_sum"

    def apply_kernel(self, ks, ctx):
        if not isinstance(ks, tuple):
            raise ConfigError("fanin_sum needs branches: put fanout and parallel before it")
        widths = {k.width for k in ks if k.width is not None}
        if len(widths) > 1:
            raise ConfigError(f"fanin_sum adds branches of different widths {sorted(widths)}; they must match")
        layouts = {(k.shape, k.pixel_pairs) for k in ks}
        if len(layouts) > 1:
            raise ConfigError(f"fanin_sum adds branches of different spatial shapes {sorted(s for s, _ in layouts)}; "
                              "they must match (SAME padding and stride 1 inside a residual branch)")
        loose = [i for i, k in enumerate(ks) if k.deps or not k.fresh]
        if len(loose) > 1:
            i, j = loose[:2]
            why = ("both weight-free functions of the same fan-out input" if ks[i].deps & ks[j].deps else
                   "not both zero-mean outputs of Dense layers of their own")
            raise ConfigError(
                f"fanin_sum adds branches {i} and {j}, which are {why}, so the kernel of their sum has "
                "cross terms E[f_i(x) f_j(x')] that do not vanish (correlation, or non-zero means as after "
                "a ReLU) and that ntkit does not compute. End every branch but one with a Dense (or Conv) layer, as in "
                "the usual residual block x + Dense(phi(Dense(x))) (ntkit.residual(Dense, act, Dense)).")
        ntks = [k.ntk for k in ks]
        ntk = None if any(t is None for t in ntks) else sum(ntks[1:], ntks[0])
        vsum = lambda attr: sum((getattr(k, attr) for k in ks[1:]), getattr(ks[0], attr))  # noqa: E731
        common = dict(width=next(iter(widths)) if widths else None, gaussian=all(k.gaussian for k in ks),
                      deps=frozenset().union(*(k.deps for k in ks)), fresh=all(k.fresh for k in ks))
        if all(k.tied for k in ks):  # self-kernels: views of the summed kernel's diagonal pairs
            return ks[0].update(vsum("nngp"), ntk, None, **common)
        return ks[0].replace(nngp=vsum("nngp"), ntk=ntk, var1=vsum("var1"), var2=vsum("var2"), tied=False, **common)

    def build_module(self, in_features, ctx):
        if not isinstance(in_features, tuple):
            raise ConfigError("fanin_sum needs branches: put fanout and parallel before it")
        if len(set(in_features)) > 1:
            raise ConfigError(f"fanin_sum adds branches with different numbers of features {in_features}")
        return _FanInSumModule(), in_features[0]

    def to_config(self):
        return {"layer": "fanin_sum"}


class _FanInSumModule(nn.Module):
    def forward(self, xs):
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class Serial(Layer):
    """Apply layers one after another (the composition f_n o ... o f_1)."""

    layer_name = "serial"

    def __init__(self, layers: Sequence[Layer]):
        layers = tuple(layers)
        for lay in layers:
            if not isinstance(lay, Layer):
                raise ConfigError(f"serial expects ntkit layers, got {lay!r}")
        self.layers = layers

    def __eq__(self, other):
        return isinstance(other, Serial) and self.layers == other.layers

    def __hash__(self):
        return hash(self.layers)

    def __repr__(self):
        return "Serial(" + ", ".join(map(repr, self.layers)) + ")"

    def apply_kernel(self, k, ctx):
        for lay in self.layers:
            k = lay.apply_kernel(k, ctx)
        return k

    def build_module(self, in_features, ctx):
        mods = []
        for lay in self.layers:
            mod, in_features = lay.build_module(in_features, ctx)
            mods.append(mod)
        return nn.Sequential(*mods), in_features

    def to_config(self):
        return {"layer": "serial", "layers": [lay.to_config() for lay in self.layers]}

    def dense_layers(self):
        return [d for lay in self.layers for d in lay.dense_layers()]

    def needs_pixel_pairs(self):
        return any(lay.needs_pixel_pairs() for lay in self.layers)

    def map_dense(self, fn):
        return Serial([lay.map_dense(fn) for lay in self.layers])


class Parallel(Layer):
    """Apply the i-th branch (a layer or list of layers) to the i-th input branch."""

    layer_name = "parallel"

    def __init__(self, branches: Sequence[Layer | Sequence[Layer]]):
        if len(branches) == 0:
            raise ConfigError("parallel needs at least one branch")
        self.branches = tuple(b if isinstance(b, Layer) else Serial(b) for b in branches)

    def __eq__(self, other):
        return isinstance(other, Parallel) and self.branches == other.branches

    def __hash__(self):
        return hash(self.branches)

    def __repr__(self):
        return "Parallel(" + ", ".join(map(repr, self.branches)) + ")"

    def _check(self, n):
        if n != len(self.branches):
            raise ConfigError(f"parallel has {len(self.branches)} branches but receives {n}; "
                              "match the fanout num")

    def apply_kernel(self, ks, ctx):
        if not isinstance(ks, tuple):
            raise ConfigError("parallel needs branches: put fanout before it")
        self._check(len(ks))
        return tuple(b.apply_kernel(k, ctx) for b, k in zip(self.branches, ks))

    def build_module(self, in_features, ctx):
        if not isinstance(in_features, tuple):
            raise ConfigError("parallel needs branches: put fanout before it")
        self._check(len(in_features))
        mods, outs = [], []
        for b, f in zip(self.branches, in_features):
            m, o = b.build_module(f, ctx)
            mods.append(m)
            outs.append(o)
        return _ParallelModule(mods), tuple(outs)

    def to_config(self):
        out = []
        for b in self.branches:
            out.append([lay.to_config() for lay in b.layers] if isinstance(b, Serial) else [b.to_config()])
        return {"layer": "parallel", "branches": out}

    def dense_layers(self):
        return [d for b in self.branches for d in b.dense_layers()]

    def needs_pixel_pairs(self):
        return any(b.needs_pixel_pairs() for b in self.branches)

    def map_dense(self, fn):
        return Parallel([b.map_dense(fn) for b in self.branches])


class _ParallelModule(nn.Module):
    def __init__(self, mods):
        super().__init__()
        self.branches = nn.ModuleList(mods)

    def forward(self, xs):
        return tuple(m(x) for m, x in zip(self.branches, xs))
