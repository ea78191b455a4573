"""Recurrent layers: the exact recurrent NTK (RNTK) and the finite RNN, side by side.

The finite twin (NTK parameterization) of ``RNN(out_dim=n, W_std, U_std, b_std, activation=phi)`` reads a
sequence x_1, ..., x_T of d features with **the same** W (n x n), U (n x d), b (n) at every step:

    h_0 = 0,    g_t = (W_std / sqrt(n)) W h_{t-1} + (U_std / sqrt(d)) U x_t + b_std b,    h_t = phi(g_t),

W, U, b ~ N(0, 1), and outputs h_T (``readout="last"``), (1/T) sum_t h_t (``"mean"``) or the whole sequence
h_1..h_T (``"sequence"``, to feed a stacked RNN). A following ``Dense`` is the readout.

Infinite width (Alemohammad, Wang, Balestriero & Baraniuk 2021, "The Recurrent Neural Tangent Kernel", ICLR,
Sec. 3, Thm. 1 and App. B; the recursion below is its specialisation to zero initial state). For two
sequences x, x' and time steps (t, t'), with K(t, t') = E[phi(g_t) phi(g'_t')], K'(t, t') = E[phi'(g_t)
phi'(g'_t')] (the activation's dual kernel at the Gaussian (g_t, g'_t')), and the input kernels
S_in(t, t') = x_t . x'_t' / d, Theta_in = 0 (or the output kernels K, K' Theta of the RNN below):

    Sigma(t, t') = W_std^2 K(t-1, t'-1) + U_std^2 S_in(t, t') + b_std^2                       (NNGP)
    Theta(t, t') = Sigma(t, t') + W_std^2 K'(t-1, t'-1) Theta(t-1, t'-1) + U_std^2 Theta_in(t, t')   (NTK)

with K(0, .) = K(., 0) = 0 (h_0 = 0). The second term of Theta is the gradient through time: the weights
are shared, so the gradients of g_t and g'_t' through h_{t-1}, h'_{t'-1} add to the direct ones. The
output kernels of the layer are (K, K' Theta) at (T, T') for "last" and their mean over all pairs
(t, t') for "mean". Because (t, t') depends only on (t-1, t'-1), the kernel of two sequences of
**different lengths** under "last" is one chain along a time diagonal ending at (T, T'); it is computed
with both sequences aligned at their ends ("chain" mode, O(min(T, T')) per pair). "mean", stacks with
bidirectional layers below, and "sequence" readouts need the whole T x T' grid ("grid" mode, one loop over
t, vectorised over t' and the tile of pairs). Bidirectional layers add an independent RNN on the reversed
sequence and concatenate: the kernels per unit are the average of the two directions'.

Standard parameterization (``W ~ N(0, W_std^2 / n)``, ...): Sigma is the same, and in Theta the direct
terms become n K(t-1, t'-1) + d_in S_in(t, t') + 1[bias] (the finite widths enter, as for Dense).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from .._validation import ConfigError, check_memory, check_nonnegative, empty_output, available_memory_bytes
from ._state import KernelState
from .activations import Activation, Erf
from .layers import BuildContext, KernelContext, Layer, Serial, _orthogonal, _scales

__all__ = ["RNN", "RNNModule", "Sequences", "as_sequences", "is_sequence_architecture", "sequence_kernel"]

READOUTS = ("last", "mean", "sequence")


class Sequences(NamedTuple):
    """A batch of variable-length sequences: ``values`` (n, T_max, d) zero-padded at the end, ``lengths`` (n,)."""

    values: torch.Tensor
    lengths: torch.Tensor


# -------------------------------------------------------------------------------------------------
# input validation
# -------------------------------------------------------------------------------------------------
def as_sequences(x: Any, name: str = "x", *, dtype: torch.dtype | None = torch.float64,
                 device: torch.device | str | None = None) -> Sequences:
    """Validate a batch of sequences and pad it at the end.

    ``x`` is a list/tuple of (T_i, d) arrays or tensors (lengths may differ; a 1-D array is a univariate
    sequence (T_i, 1)), an (n, T, d) array/tensor of equal lengths, or a :class:`Sequences`. Empty
    batches or sequences, sequences with different feature sizes, integer data and NaN/Inf raise errors
    naming the sample (and the time step).
    """
    if isinstance(x, Sequences):
        vals, lengths = x.values, x.lengths.to(torch.long)
        if vals.ndim != 3 or lengths.shape != (vals.shape[0],):
            raise ValueError(f"{name}: Sequences needs values (n, T, d) and lengths (n,), got "
                             f"{tuple(vals.shape)} and {tuple(lengths.shape)}")
        seqs = [vals[i, : int(lengths[i])] for i in range(vals.shape[0])]
    elif isinstance(x, (list, tuple)):
        seqs = list(x)
    elif isinstance(x, (torch.Tensor, np.ndarray)):
        if x.ndim != 3:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}; a recurrent architecture takes sequences: an (n, T, d) "
                "array of equal-length sequences or a list of (T_i, d) arrays. For univariate sequences "
                "use x[..., None] (n, T, 1).")
        seqs = list(x)
    else:
        raise TypeError(f"{name} must be a list of (T_i, d) arrays/tensors or an (n, T, d) array, got "
                        f"{type(x).__name__}")
    if not seqs:
        raise ValueError(f"{name} holds no sequences; pass at least one.")
    out, d0 = [], None
    for i, s in enumerate(seqs):
        if isinstance(s, np.ndarray):
            if s.dtype.kind != "f":
                raise TypeError(f"{name} sequence {i} has dtype {s.dtype}; convert it with .astype(np.float64)")
            s = torch.from_numpy(np.ascontiguousarray(s))
        elif not isinstance(s, torch.Tensor):
            try:
                arr = np.asarray(s, dtype=np.float64)
            except (TypeError, ValueError):
                raise TypeError(f"{name} sequence {i} is a {type(s).__name__}, not an array of numbers") from None
            s = torch.from_numpy(arr)
        if not s.is_floating_point():
            raise TypeError(f"{name} sequence {i} has dtype {s.dtype}; convert it with .double()")
        if s.ndim == 1:
            s = s[:, None]
        if s.ndim != 2:
            raise ValueError(f"{name} sequence {i} has shape {tuple(s.shape)}; each sequence must be (T_i, d)")
        if s.shape[0] == 0:
            raise ValueError(f"{name} sequence {i} is empty (length 0); every sequence needs at least one "
                             "time step -- drop it or give it one.")
        if s.shape[1] == 0:
            raise ValueError(f"{name} sequence {i} has 0 features (shape {tuple(s.shape)})")
        if d0 is None:
            d0 = s.shape[1]
        elif s.shape[1] != d0:
            raise ValueError(f"{name} sequence {i} has {s.shape[1]} features per time step but sequence 0 has "
                             f"{d0}; all sequences must have the same number of features.")
        bad = ~torch.isfinite(s).all(dim=1)
        if bool(bad.any()):
            t = int(torch.nonzero(bad)[0])
            kind = "NaN" if bool(torch.isnan(s[t]).any()) else "Inf"
            raise ValueError(f"{name} sequence {i} contains {kind} at time step {t} (of {s.shape[0]}); remove "
                             "or impute non-finite values first.")
        out.append(s)
    dt = dtype if dtype is not None else out[0].dtype
    dev = device if device is not None else out[0].device
    lengths = torch.tensor([s.shape[0] for s in out], dtype=torch.long, device=dev)
    vals = torch.zeros((len(out), int(lengths.max()), d0), dtype=dt, device=dev)
    for i, s in enumerate(out):
        vals[i, : s.shape[0]] = s.to(dtype=dt, device=dev)
    return Sequences(vals, lengths)


def _reverse(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence within its own length (padding stays at the end): works on (n, T, ...)."""
    return values.gather(1, _reverse_index(lengths, values.shape[1]).reshape(
        values.shape[0], values.shape[1], *([1] * (values.ndim - 2))).expand_as(values))


def _reverse_index(lengths: torch.Tensor, t_max: int) -> torch.Tensor:
    """(n, T) index: T_i - 1 - t on the valid steps, t on the padding (an involution)."""
    t = torch.arange(t_max, device=lengths.device)[None, :]
    rev = lengths[:, None] - 1 - t
    return torch.where(rev >= 0, rev, t)


def _end_align(values: torch.Tensor, lengths: torch.Tensor, t_max: int) -> torch.Tensor:
    """Move each sequence (n, T, ...) to the end of a frame of t_max steps (zero padding at the start)."""
    n = values.shape[0]
    s = torch.arange(t_max, device=lengths.device)[None, :]
    src = s - (t_max - lengths[:, None])
    valid = src >= 0
    src = src.clamp_min(0).clamp_max(values.shape[1] - 1)
    idx = src.reshape(n, t_max, *([1] * (values.ndim - 2))).expand(n, t_max, *values.shape[2:])
    out = values.gather(1, idx)
    return out * valid.reshape(n, t_max, *([1] * (values.ndim - 2))).to(values.dtype)


# -------------------------------------------------------------------------------------------------
# the layer description
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RNN(Layer):
    """Elman recurrent layer with weights shared across time; exact kernel = the recurrent NTK.

    Parameters
    ----------
    out_dim : int or None
        Hidden units n of the finite RNN (irrelevant to the NTK-parameterization kernels). None: set by
        ``width=`` of :meth:`Architecture.init`.
    W_std, U_std, b_std : float
        Standard deviations of the recurrent weights, the input weights and the bias (``b_std=None``: no
        bias parameter).
    activation : Activation
        Any ntkit activation (its dual kernel gives E[phi phi] and E[phi' phi']).
    readout : {"last", "mean", "sequence"}
        Output h_T, the mean (1/T) sum_t h_t, or the whole sequence (only to feed another RNN stacked on
        top; the last RNN of a stack must read out "last" or "mean").
    bidirectional : bool
        Add an independent RNN on the reversed sequence and concatenate the two (2 n features).

    The kernel recursion and the finite network are given in the module docstring (Alemohammad et al.
    2021, ICLR, Thm. 1). An RNN must be the first layer of an architecture (or follow an RNN with
    ``readout="sequence"``); ``arch.kernel`` and the finite network then take lists of (T_i, d) sequences
    of different lengths, or an (n, T, d) tensor.
    """

    out_dim: int | None = None
    W_std: float = 1.0
    U_std: float = 1.0
    b_std: float | None = 0.0
    activation: Activation = field(default_factory=Erf)
    readout: str = "last"
    bidirectional: bool = False
    layer_name = "rnn"

    def __post_init__(self):
        if self.out_dim is not None and (isinstance(self.out_dim, bool) or int(self.out_dim) != self.out_dim
                                         or self.out_dim < 1):
            raise ConfigError(f"rnn out_dim must be a positive integer or None, got {self.out_dim!r}")
        if self.out_dim is not None:
            object.__setattr__(self, "out_dim", int(self.out_dim))
        object.__setattr__(self, "W_std", check_nonnegative(self.W_std, "rnn W_std"))
        object.__setattr__(self, "U_std", check_nonnegative(self.U_std, "rnn U_std"))
        object.__setattr__(self, "b_std", check_nonnegative(self.b_std, "rnn b_std", allow_none=True))
        if not isinstance(self.activation, Activation):
            raise ConfigError(f"rnn activation must be an ntkit activation layer (e.g. ntkit.Erf()), got "
                              f"{self.activation!r}")
        if self.readout not in READOUTS:
            raise ConfigError(f"rnn readout must be one of {READOUTS}, got {self.readout!r}")
        if not isinstance(self.bidirectional, (bool, np.bool_)):
            raise ConfigError(f"rnn bidirectional must be true or false, got {self.bidirectional!r}")
        object.__setattr__(self, "bidirectional", bool(self.bidirectional))

    @property
    def features(self) -> int | None:
        """Features of the output per time step (2 out_dim when bidirectional)."""
        return None if self.out_dim is None else self.out_dim * (2 if self.bidirectional else 1)

    def with_out_dim(self, out_dim: int) -> "RNN":
        return RNN(out_dim, self.W_std, self.U_std, self.b_std, self.activation, self.readout, self.bidirectional)

    def apply_kernel(self, k, ctx):
        raise ConfigError("an rnn layer takes sequences: it must be the first layer of the architecture, or "
                          "follow another rnn with readout='sequence'")

    def build_module(self, in_features, ctx: BuildContext):
        if isinstance(in_features, tuple):
            raise ConfigError("an rnn cannot act on several branches")
        if self.out_dim is None:
            raise ConfigError("an rnn layer has no out_dim; set it in the description or pass width= to init()")
        return RNNModule(in_features, self, ctx), self.features

    def to_config(self) -> dict:
        return {"layer": "rnn", "out_dim": self.out_dim, "W_std": self.W_std, "U_std": self.U_std,
                "b_std": self.b_std, "activation": self.activation.to_config(), "readout": self.readout,
                "bidirectional": self.bidirectional}


# -------------------------------------------------------------------------------------------------
# the finite twin
# -------------------------------------------------------------------------------------------------
class _Direction(nn.Module):
    """One direction of a finite RNN: weight (n, n), input_weight (n, d), bias (n)."""

    def __init__(self, d: int, n: int, spec: RNN, ctx: BuildContext):
        super().__init__()
        gen = ctx.generator
        w_mult, w_std, b_mult, b_init = _scales(ctx.parameterization, spec.W_std, spec.b_std, n)
        u_mult, u_std, _, _ = _scales(ctx.parameterization, spec.U_std, None, d)
        self.weight_scale, self.input_scale, self.bias_scale = float(w_mult), float(u_mult), float(b_mult)
        if ctx.init == "orthogonal":  # Haar-orthogonal with per-entry variance 1 (Saxe et al. 2014)
            w = _orthogonal((n, n), gen) * math.sqrt(n)
            u = _orthogonal((n, d), gen) * math.sqrt(max(n, d))
        else:
            w = torch.randn((n, n), generator=gen, dtype=torch.float64)
            u = torch.randn((n, d), generator=gen, dtype=torch.float64)
        self.weight = nn.Parameter((w * w_std).to(dtype=ctx.dtype, device=ctx.device))
        self.input_weight = nn.Parameter((u * u_std).to(dtype=ctx.dtype, device=ctx.device))
        if spec.b_std is None:
            self.register_parameter("bias", None)
        else:
            b = torch.randn(n, generator=gen, dtype=torch.float64) * b_init
            self.bias = nn.Parameter(b.to(dtype=ctx.dtype, device=ctx.device))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, act: Activation, readout: str):
        n_seq, t_max, _ = x.shape
        inp = torch.nn.functional.linear(x, self.input_weight) * self.input_scale  # (n_seq, T, n)
        if self.bias is not None:
            inp = inp + self.bias * self.bias_scale
        h = torch.zeros(n_seq, self.weight.shape[0], dtype=x.dtype, device=x.device)
        outs, total = [], torch.zeros_like(h)
        for t in range(t_max):
            new = act.fn(torch.nn.functional.linear(h, self.weight) * self.weight_scale + inp[:, t])
            valid = (t < lengths)[:, None]
            h = torch.where(valid, new, h)  # past its end a sequence keeps its last state
            if readout == "mean":
                total = total + torch.where(valid, new, torch.zeros_like(new))
            elif readout == "sequence":
                outs.append(torch.where(valid, new, torch.zeros_like(new)))
        if readout == "last":
            return h
        if readout == "mean":
            return total / lengths[:, None].to(x.dtype)
        return torch.stack(outs, 1)


class RNNModule(nn.Module):
    """The finite RNN of an :class:`RNN` layer; takes :class:`Sequences`, returns (n, features) or
    :class:`Sequences` (readout "sequence")."""

    def __init__(self, in_features: int, spec: RNN, ctx: BuildContext):
        super().__init__()
        self.in_features = int(in_features)
        self.spec = spec
        self.forward_rnn = _Direction(self.in_features, spec.out_dim, spec, ctx)
        self.backward_rnn = _Direction(self.in_features, spec.out_dim, spec, ctx) if spec.bidirectional else None

    def forward(self, seqs: Sequences):
        if not isinstance(seqs, Sequences):
            raise TypeError("an RNN module takes Sequences (values, lengths); build the input with "
                            "ntkit.kernels.recurrent.as_sequences or call the FiniteNetwork on a list of sequences")
        x, lengths = seqs
        if x.shape[-1] != self.in_features:
            raise ValueError(f"the rnn expects {self.in_features} features per time step, got {x.shape[-1]}")
        act, readout = self.spec.activation, self.spec.readout
        out = self.forward_rnn(x, lengths, act, readout)
        if self.backward_rnn is not None:
            back = self.backward_rnn(_reverse(x, lengths), lengths, act, readout)
            if readout == "sequence":
                back = _reverse(back, lengths)  # h_t of the backward RNN at the original position t
            out = torch.cat([out, back], dim=-1)
        return Sequences(out, lengths) if readout == "sequence" else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, {self.spec!r}"


# -------------------------------------------------------------------------------------------------
# infinite width
# -------------------------------------------------------------------------------------------------
def is_sequence_architecture(layers: Sequence[Layer]) -> bool:
    """Whether an architecture's first layer is an RNN (its inputs are then sequences)."""
    return bool(layers) and isinstance(layers[0], RNN)


def split_stack(layers: Sequence[Layer]) -> tuple[list[RNN], list[Layer]]:
    """The leading stack of RNN layers and the rest; checks that the stack is well formed."""
    stack = [layers[0]]
    i = 1
    while i < len(layers) and isinstance(layers[i], RNN) and stack[-1].readout == "sequence":
        stack.append(layers[i])
        i += 1
    rest = list(layers[i:])
    for j, lay in enumerate(stack[:-1]):
        if lay.readout != "sequence":  # pragma: no cover - excluded by the loop above
            raise ConfigError(f"rnn {j} feeds another rnn, so it needs readout='sequence'")
    if stack[-1].readout == "sequence":
        nxt = "the end of the architecture" if not rest else f"a {rest[0].layer_name} layer"
        raise ConfigError(f"the last rnn of the stack has readout='sequence' but is followed by {nxt}; "
                          "use readout='last' or 'mean' there (readout='sequence' only feeds another rnn)")
    if rest and isinstance(rest[0], RNN):
        raise ConfigError(f"an rnn with readout={stack[-1].readout!r} is followed by another rnn; the lower one "
                          "needs readout='sequence' to pass its whole output sequence up the stack")
    return stack, rest


def with_width(arch, width, out_dim):
    """``arch.with_width`` for sequence architectures: the RNNs' out_dims are hidden widths (first, in
    order), then the hidden Dense layers after them; ``out_dim`` sets the readout Dense."""
    stack, rest = split_stack(arch.layers)
    cls = type(arch)
    if not rest:
        if out_dim is not None:
            raise ConfigError("this architecture has no Dense readout whose out_dim could be set")
        rest_arch, n_rest = None, 0
    else:
        rest_arch = cls(rest, arch.parameterization)
        n_rest = max(len(rest_arch.body.dense_layers()) - 1, 0)
    if width is None:
        widths = [None] * (len(stack) + n_rest)
    elif isinstance(width, (int, np.integer)) or (isinstance(width, float) and float(width).is_integer()):
        widths = [int(width)] * (len(stack) + n_rest)
    else:
        widths = [None if w is None else int(w) for w in width]
        if len(widths) != len(stack) + n_rest:
            raise ConfigError(f"width lists {len(widths)} values but the architecture has {len(stack)} rnn and "
                              f"{n_rest} hidden Dense layers")
    for w in widths:
        if w is not None and w < 1:
            raise ConfigError(f"widths must be positive integers, got {width!r}")
    new = [r if w is None else r.with_out_dim(w) for r, w in zip(stack, widths)]
    if rest_arch is not None:
        rest_w = widths[len(stack):]
        new += list(rest_arch.with_width(rest_w if any(w is not None for w in rest_w) else None, out_dim).layers)
    return cls(new, arch.parameterization, arch.input_dim)


def _self_chain(rnn: RNN, kin: torch.Tensor, mask: torch.Tensor):
    """Per-sequence variances along time: q(t) = Var g_t and E[h_t^2], both (n, T).

    ``kin`` (n, T) is the input kernel of each step with itself; ``mask`` (n, T) marks the valid steps
    (the state is zero before a sequence starts). Invalid steps get E[h^2] = 0 and the q of the nearest
    valid step (a value in the activation's range; those steps are never read).
    """
    w2, u2 = rnn.W_std ** 2, rnn.U_std ** 2
    b2 = 0.0 if rnn.b_std is None else rnn.b_std ** 2
    hv = torch.zeros_like(kin[:, 0])
    qs, hvs = [], []
    for t in range(kin.shape[1]):
        q = w2 * hv + u2 * kin[:, t] + b2
        hv = torch.where(mask[:, t], rnn.activation.variance(q), torch.zeros_like(q))
        qs.append(q)
        hvs.append(hv)
    q = torch.stack(qs, 1)
    first = mask.to(torch.int8).argmax(1)  # the valid steps are contiguous: [first, last]
    last = mask.shape[1] - 1 - mask.flip(1).to(torch.int8).argmax(1)
    t = torch.arange(mask.shape[1], device=mask.device)[None, :]
    q = q.gather(1, torch.minimum(torch.maximum(t, first[:, None]), last[:, None]))
    return q, torch.stack(hvs, 1)


def _direct_terms(rnn: RNN, ctx: KernelContext, d_in: int | None):
    """Multipliers (of K(t-1, t'-1), of S_in, constant) of the direct terms of Theta."""
    if ctx.parameterization == "ntk":
        return rnn.W_std ** 2, rnn.U_std ** 2, (0.0 if rnn.b_std is None else rnn.b_std ** 2)
    if rnn.out_dim is None or d_in is None:
        raise ConfigError("the standard-parameterization NTK of an rnn depends on its finite width and the "
                          "width of its input; give every rnn an out_dim (or pass width=)")
    return float(rnn.out_dim), float(d_in), (0.0 if rnn.b_std is None else 1.0)


def _step(rnn, terms, hprev, htprev, kin, tin, var1, var2, need_ntk):
    """One time step of the recursion for a block of pairs: returns (K, K' Theta) of h_t.

    hprev, htprev: K and K' Theta of h_{t-1}; kin, tin: input NNGP and NTK of step t; var1, var2:
    Var g_t of either side (broadcastable).
    """
    w2, u2 = rnn.W_std ** 2, rnn.U_std ** 2
    b2 = 0.0 if rnn.b_std is None else rnn.b_std ** 2
    sigma = torch.mul(kin, u2).add_(hprev, alpha=w2).add_(b2)
    h, dot = rnn.activation.dual(sigma, var1, var2, derivative=need_ntk)
    if not need_ntk:
        return h, None
    a_h, a_in, a_b = terms
    if a_h != w2 or a_in != u2 or a_b != b2:  # standard parameterization: the finite widths enter
        theta = torch.mul(kin, a_in).add_(hprev, alpha=a_h).add_(a_b)
    else:
        theta = sigma.clone()
    theta.add_(htprev, alpha=w2)
    if tin is not None:
        theta.add_(tin, alpha=u2)
    return h, theta.mul_(dot)


def _pair(v1: torch.Tensor, v2: torch.Tensor, pairwise: bool):
    """Per-sequence tensors (n, ...) as the two sides of a block of pairs: (b1, 1, ...) and (1, b2, ...)
    in matrix mode, unchanged in pairwise mode."""
    if pairwise:
        return v1, v2
    return v1[:, None], v2[None, :]


def _grid(rnn, terms, kin, tin, q1, q2, m1, m2, pairwise, need_ntk):
    """Output kernels (K, K' Theta) of h over the whole (T1, T2) grid of time pairs, one row t at a time.

    kin, tin: (*P, T1, T2) input kernels (tin None for raw input); q1 (n1, T1), q2 (n2, T2): Var g_t;
    m1, m2: masks of the valid steps. Sequences are aligned at their starts; pairs of steps past either
    sequence's end are set to 0 (they are never read: (t, t') only depends on earlier steps).
    """
    p1, p2 = _pair(q1, q2, pairwise)  # (*P', T1) and (*P', T2)
    v1, v2 = _pair(m1, m2, pairwise)
    t1 = kin.shape[-2]
    shape = (t1, *kin.shape[:-2], kin.shape[-1])  # rows t outermost: each row is one contiguous block
    out_h = torch.empty(shape, dtype=kin.dtype, device=kin.device)
    out_ht = torch.empty(shape, dtype=kin.dtype, device=kin.device) if need_ntk else None
    zero = torch.zeros((), dtype=kin.dtype, device=kin.device)
    # step (t+1, t'+1) reads (t, t'): the previous row shifted one step along t' (h_0 = 0 at t' = 0)
    hprev = torch.zeros_like(kin[..., 0, :])
    htprev = torch.zeros_like(hprev) if need_ntk else None
    for t in range(t1):
        h, ht = _step(rnn, terms, hprev, htprev, kin[..., t, :], None if tin is None else tin[..., t, :],
                      p1[..., t:t + 1], p2, need_ntk)
        valid = v1[..., t:t + 1] & v2
        torch.where(valid, h, zero, out=out_h[t])
        hprev[..., 1:] = out_h[t, ..., :-1]
        if need_ntk:
            torch.where(valid, ht, zero, out=out_ht[t])
            htprev[..., 1:] = out_ht[t, ..., :-1]
    return out_h.movedim(0, -2), (out_ht.movedim(0, -2) if need_ntk else None)


def _flip_grid(g: torch.Tensor, idx1: torch.Tensor, idx2: torch.Tensor, pairwise: bool) -> torch.Tensor:
    """Reverse each pair's grid (*P, T1, T2) within the pair's lengths (idx from _reverse_index)."""
    if pairwise:
        n = g.shape[0]
        ar = torch.arange(n, device=g.device)
        return g[ar[:, None, None], idx1[:, :, None], idx2[:, None, :]]
    b1, b2 = g.shape[0], g.shape[1]
    a1 = torch.arange(b1, device=g.device)[:, None, None, None]
    a2 = torch.arange(b2, device=g.device)[None, :, None, None]
    return g[a1, a2, idx1[:, None, :, None], idx2[None, :, None, :]]


def _side_variances(stack, seqs: Sequences, chain: bool, t_frame: int):
    """Var g_t of every layer and direction, and the per-step E[h_t^2] passed up the stack.

    chain=True: sequences end-aligned in a frame of t_frame steps (unidirectional stacks only);
    otherwise start-aligned.
    """
    vals, lengths = seqs
    d = vals.shape[-1]
    if chain:
        vals = _end_align(vals, lengths, t_frame)
        steps = torch.arange(t_frame, device=vals.device)[None, :]
        mask = steps >= (t_frame - lengths[:, None])
    else:
        mask = torch.arange(vals.shape[1], device=vals.device)[None, :] < lengths[:, None]
    kin = (vals * vals).sum(-1) / d
    qs, hv_top = [], None
    for rnn in stack:
        dirs, hvs = [], []
        q, hv = _self_chain(rnn, kin, mask)
        dirs.append(q)
        hvs.append(hv)
        if rnn.bidirectional:
            rev = _reverse_index(lengths, kin.shape[1])
            qb, hvb = _self_chain(rnn, kin.gather(1, rev), mask)
            dirs.append(qb)
            hvs.append(hvb)
        qs.append(dirs)
        hv_orig = [hvs[0]] + ([hvs[1].gather(1, _reverse_index(lengths, kin.shape[1]))] if rnn.bidirectional else [])
        kin = sum(hv_orig) / len(hv_orig)
        hv_top = hvs
    return vals, mask, qs, hv_top


def _stack_grid(stack, terms, s1, s2, q1, q2, pairwise, need_ntk, d):
    """Readout kernels (K, K' Theta) of the top RNN for a block of pairs, by full time grids."""
    (v1, l1), (v2, l2) = s1, s2
    # time rows outermost in memory (contiguous rows for _grid), viewed as (*P, T1, T2)
    if pairwise:
        kin = torch.bmm(v1, v2.transpose(1, 2)).div_(d).permute(1, 0, 2).contiguous().movedim(0, -2)
    else:  # one matmul (T1 b1, d) x (d, b2 T2), viewed as (b1, b2, T1, T2)
        b1, ta, b2, tb = v1.shape[0], v1.shape[1], v2.shape[0], v2.shape[1]
        kin = (v1.transpose(0, 1).reshape(ta * b1, d) @ v2.reshape(b2 * tb, d).T).div_(d)
        kin = kin.reshape(ta, b1, b2, tb).movedim(0, -2)
    tin = None
    r1, r2 = _reverse_index(l1, v1.shape[1]), _reverse_index(l2, v2.shape[1])
    m1 = torch.arange(v1.shape[1], device=v1.device)[None, :] < l1[:, None]
    m2 = torch.arange(v2.shape[1], device=v2.device)[None, :] < l2[:, None]
    for li, rnn in enumerate(stack):
        top = li == len(stack) - 1
        h, ht = _grid(rnn, terms[li], kin, tin, q1[li][0], q2[li][0], m1, m2, pairwise, need_ntk)
        outs = [(h, ht, False)]
        if rnn.bidirectional:
            kb = _flip_grid(kin, r1, r2, pairwise)
            tb = None if tin is None else _flip_grid(tin, r1, r2, pairwise)
            hb, htb = _grid(rnn, terms[li], kb, tb, q1[li][1], q2[li][1], m1, m2, pairwise, need_ntk)
            del kb, tb
            outs.append((hb, htb, True))
        if not top:
            hs = [_flip_grid(a, r1, r2, pairwise) if flipped else a for a, _, flipped in outs]
            kin = sum(hs) / len(hs)
            if need_ntk:
                ts = [_flip_grid(b, r1, r2, pairwise) if flipped else b for _, b, flipped in outs]
                tin = sum(ts) / len(ts)
            continue
        res_h, res_t = [], []
        for a, b, _ in outs:  # "last" is (T-1, T'-1) and "mean" is flip-invariant, in either time order
            res_h.append(_readout(a, rnn.readout, l1, l2, pairwise))
            if need_ntk:
                res_t.append(_readout(b, rnn.readout, l1, l2, pairwise))
        k = sum(res_h) / len(res_h)
        return k, (sum(res_t) / len(res_t) if need_ntk else None)


def _readout(g: torch.Tensor, readout: str, l1: torch.Tensor, l2: torch.Tensor, pairwise: bool) -> torch.Tensor:
    if readout == "last":
        if pairwise:
            ar = torch.arange(g.shape[0], device=g.device)
            return g[ar, l1 - 1, l2 - 1]
        a1 = torch.arange(g.shape[0], device=g.device)[:, None]
        a2 = torch.arange(g.shape[1], device=g.device)[None, :]
        return g[a1, a2, (l1 - 1)[:, None], (l2 - 1)[None, :]]
    # the grid is zero on pairs of steps past either end (see _grid): the mean is a plain sum
    count = (l1 * l2) if pairwise else (l1[:, None] * l2[None, :])
    return g.sum((-2, -1)) / count.to(g.dtype)


def _stack_chain(stack, terms, v1, v2, m1, m2, q1, q2, pairwise, need_ntk, d):
    """Readout kernels for a unidirectional stack with readout "last": one chain per pair along the time
    diagonal ending at (T, T'), both sequences end-aligned in a common frame (padding at the start)."""
    t_frame = v1.shape[1]
    shape = (v1.shape[0],) if pairwise else (v1.shape[0], v2.shape[0])
    zero = torch.zeros(shape, dtype=v1.dtype, device=v1.device)
    h = [zero] * len(stack)
    ht = [zero] * len(stack)
    # steps before the longest chain of the block starts are zero state for every pair: skip them
    start = t_frame - int(torch.minimum(m1.sum(1).max(), m2.sum(1).max()))
    for s in range(start, t_frame):
        if pairwise:
            kin = (v1[:, s] * v2[:, s]).sum(-1) / d
        else:
            kin = (v1[:, s] @ v2[:, s].T) / d
        tin = None
        valid = (m1[:, s] & m2[:, s]) if pairwise else (m1[:, s, None] & m2[None, :, s])
        for li, rnn in enumerate(stack):
            a, b = _pair(q1[li][0][:, s], q2[li][0][:, s], pairwise)
            hn, htn = _step(rnn, terms[li], h[li], ht[li], kin, tin, a, b, need_ntk)
            h[li] = torch.where(valid, hn, zero)  # zero state until both sequences have started
            if need_ntk:
                ht[li] = torch.where(valid, htn, zero)
            kin, tin = h[li], ht[li] if need_ntk else None
    return h[-1], (ht[-1] if need_ntk else None)


def _readout_variance(stack, terms, seqs, chain_vals, chain_mask, qs, hv_top, need_ntk, d, block):
    """Var of the stack's readout per sequence, (n,): E[h_T^2] for "last", the mean over all (t, t')
    of the sequence with itself for "mean" (by the pairwise grid, in blocks of sequences)."""
    top = stack[-1]
    lengths = seqs.lengths
    if top.readout == "last":
        if chain_vals is not None:  # end-aligned: the last step is the last column
            return hv_top[0][:, -1]
        outs = []
        for i, hv in enumerate(hv_top):  # the backward direction's last step is at T_i - 1 of its own order
            outs.append(hv.gather(1, (lengths - 1)[:, None])[:, 0])
        return sum(outs) / len(outs)
    res = []
    for i0 in range(0, seqs.values.shape[0], block):
        sl = slice(i0, i0 + block)
        t = int(lengths[sl].max())
        sub = Sequences(seqs.values[sl, :t], lengths[sl])
        q = [[qq[sl, :t] for qq in dirs] for dirs in qs]
        k, _ = _stack_grid(stack, terms, sub, sub, q, q, True, False, d)
        res.append(k)
    return torch.cat(res)


def sequence_kernel(arch, x1, x2, names, *, diagonal: bool, dtype, device, memory_budget, block_size):
    """Exact kernels of a sequence architecture (first layer an RNN), called by ``Architecture.kernel``.

    Validates the sequences, computes the readout kernels of the RNN stack tile by tile under the memory
    budget, and applies the remaining layers (the Dense readout etc.) through the ordinary kernel state.
    """
    stack, rest = split_stack(arch.layers)
    ctx = KernelContext(arch.parameterization)
    need_ntk = "ntk" in names
    s1 = as_sequences(x1, "x1", dtype=dtype, device=device)
    s2 = None if x2 is None else as_sequences(x2, "x2", dtype=s1.values.dtype, device=s1.values.device)
    d = s1.values.shape[-1]
    if s2 is not None and s2.values.shape[-1] != d:
        raise ValueError(f"x2 sequences have {s2.values.shape[-1]} features per time step, x1 sequences have {d}; "
                         "they must match")
    if arch.input_dim is not None and d != arch.input_dim:
        raise ValueError(f"x1 sequences have {d} features per time step, the architecture expects "
                         f"input_dim={arch.input_dim}")
    if diagonal and s2 is not None and s2.values.shape[0] != s1.values.shape[0]:
        raise ValueError(f"diagonal=True pairs sequence i of x1 with sequence i of x2, but x1 has "
                         f"{s1.values.shape[0]} sequences and x2 has {s2.values.shape[0]}")
    # sort by length so that tiles hold sequences of similar lengths (undone at the end)
    order1 = torch.argsort(s1.lengths, stable=True)
    order2 = order1 if (s2 is None or diagonal) else torch.argsort(s2.lengths, stable=True)
    s1 = Sequences(s1.values[order1], s1.lengths[order1])
    if s2 is not None:
        s2 = Sequences(s2.values[order2], s2.lengths[order2])
    widths = [d] + [r.features for r in stack[:-1]]
    terms = [_direct_terms(r, ctx, w) for r, w in zip(stack, widths)]
    same = s2 is None
    s2 = s1 if same else s2
    chain = stack[-1].readout == "last" and not any(r.bidirectional for r in stack)
    t_frame = max(s1.values.shape[1], s2.values.shape[1])
    item = s1.values.element_size()
    n1, n2 = s1.values.shape[0], s2.values.shape[0]
    t1, t2 = s1.values.shape[1], s2.values.shape[1]
    # memory per pair of sequences in a tile: full time grids (grid mode) or per-step scalars (chain mode)
    # live (T1, T2) grids per pair: the layer's input and output kernels (x2 with the NTK), the reversed
    # copies of a bidirectional layer, twice that while a stack hands over, +2 for rows and readouts
    # (measured peaks: 50-75% of this bound for one and two layers, uni- and bidirectional)
    per_layer = (2 + (2 if any(r.bidirectional for r in stack) else 0)) * (2 if need_ntk else 1)
    per_pair = (t1 * t2 * (per_layer * (2 if len(stack) > 1 else 1) + 2) + 16) * item \
        if not chain else (24 * len(stack) + 8) * item
    budget = memory_budget if memory_budget is not None else 0.9 * available_memory_bytes(s1.values.device)
    out_bytes = (n1 if diagonal else n1 * n2) * len(names) * item
    check_memory(out_bytes, budget, f"the {n1}x{n2} kernel{'s' if len(names) > 1 else ''} in {s1.values.dtype}",
                 "compute it in pieces (slices of x1) or use float32")
    left = budget - out_bytes - 4 * (n1 + n2) * t_frame * item * (len(stack) + 2)
    if block_size is not None:
        if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        block = int(block_size)
    else:
        # grid mode: tiles of <= 64 x 64 pairs keep rows of >= 4096 pairs x T' per operation, and let the
        # length-sorted tiles span only their own longest sequences
        block = 512 if chain else 64
        while block > 1 and block * block * per_pair > left:
            block //= 2
    check_memory(out_bytes + block * block * per_pair, budget,
                 f"kernel tiles of {block}x{block} sequence pairs with {t1}x{t2} time steps",
                 "pass a smaller block_size, a larger memory_budget, or shorter sequences")

    # per-sequence variances (and, in chain mode, end-aligned values) of both sides
    v1, mk1, q1, hv1 = _side_variances(stack, s1, chain, t_frame)
    if same:
        v2, mk2, q2, hv2 = v1, mk1, q1, hv1
    else:
        v2, mk2, q2, hv2 = _side_variances(stack, s2, chain, t_frame)
    var_block = max(1, min(512, int(left // max(per_pair, 1))))
    var1 = _readout_variance(stack, terms, s1, v1 if chain else None, mk1, q1, hv1, need_ntk, d, var_block)
    var2 = var1 if same else _readout_variance(stack, terms, s2, v2 if chain else None, mk2, q2, hv2, need_ntk, d,
                                               var_block)
    width = stack[-1].features
    rest_body = Serial(rest)

    def block_state(i0, i1, j0, j1, pairwise):
        sl1, sl2 = slice(i0, i1), slice(j0, j1)
        if chain:
            qa = [[q[sl1] for q in dirs] for dirs in q1]
            qb = [[q[sl2] for q in dirs] for dirs in q2]
            k, kt = _stack_chain(stack, terms, v1[sl1], v2[sl2], mk1[sl1], mk2[sl2], qa, qb, pairwise, need_ntk, d)
        else:  # the time grid of a tile spans only its own longest sequences (tiles hold similar lengths)
            ta, tb = int(s1.lengths[sl1].max()), int(s2.lengths[sl2].max())
            qa = [[q[sl1, :ta] for q in dirs] for dirs in q1]
            qb = [[q[sl2, :tb] for q in dirs] for dirs in q2]
            k, kt = _stack_grid(stack, terms, Sequences(s1.values[sl1, :ta], s1.lengths[sl1]),
                                Sequences(s2.values[sl2, :tb], s2.lengths[sl2]), qa, qb, pairwise, need_ntk, d)
        va, vb = (var1[sl1], var2[sl2]) if pairwise else (var1[sl1, None], var2[None, sl2])
        st = KernelState(nngp=k, ntk=kt if need_ntk else None, var1=va, var2=vb, width=width, gaussian=False)
        st = rest_body.apply_kernel(st, ctx)
        if isinstance(st, tuple):
            raise ConfigError("the architecture ends with unmerged branches; close them with fanin_sum")
        out = {}
        for name in names:
            val = st.nngp if name == "nngp" else st.ntk
            if not isinstance(val, torch.Tensor):
                val = torch.full_like(k, float(val))
            val = val.expand_as(k)
            if not bool(torch.isfinite(val.sum())):
                raise FloatingPointError(f"the {name} kernel overflowed or became NaN in {k.dtype}; check "
                                         "W_std/U_std/b_std and the sequence lengths, or use float64")
            out[name] = val
        return out

    if diagonal:
        outs = {name: torch.empty(n1, dtype=s1.values.dtype, device=s1.values.device) for name in names}
        for i0 in range(0, n1, block * block):
            i1 = min(i0 + block * block, n1)
            for name, val in block_state(i0, i1, i0, i1, True).items():
                outs[name][i0:i1] = val
        for name in names:
            outs[name][order1] = outs[name].clone()
        return outs
    outs = {name: empty_output((n1, n2), s1.values.dtype, s1.values.device) for name in names}
    for i0 in range(0, n1, block):
        i1 = min(i0 + block, n1)
        for j0 in range(i0 if same else 0, n2, block):
            j1 = min(j0 + block, n2)
            diag_tile = same and i0 == j0
            for name, tile in block_state(i0, i1, j0, j1, False).items():
                if diag_tile:
                    tile = (tile + tile.T) * 0.5
                outs[name][i0:i1, j0:j1] = tile
                if same and not diag_tile:
                    outs[name][j0:j1, i0:i1] = tile.T
    for name in names:
        sorted_out = outs[name]
        outs[name] = empty_output((n1, n2), sorted_out.dtype, sorted_out.device)
        outs[name][order1[:, None], order2[None, :]] = sorted_out
    return outs
