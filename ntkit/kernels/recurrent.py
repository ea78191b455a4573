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
with both sequences aligned at their ends ("chain" mode, O(min(T, T')) per pair; one bidirectional layer
runs a second chain on the reversed sequences). "mean", stacks with bidirectional layers below, and
"sequence" readouts need the whole T x T' grid ("grid" mode: one loop over t, vectorised over t' and a tile
of length-sorted pairs; the top layer keeps two rows and per-pair column sums, not the grid). Bidirectional
layers add an independent RNN on the reversed sequence and concatenate: the kernels per unit are the
average of the two directions'.

Standard parameterization (``W ~ N(0, W_std^2 / n)``, ...): Sigma is the same, and in Theta the direct
terms become n K(t-1, t'-1) + d_in S_in(t, t') + 1[bias] (the finite widths enter, as for Dense).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from .._progress import progress
from .._validation import ConfigError, check_memory, check_nonnegative, empty_output, available_memory_bytes
from ._state import KernelState
from .activations import Activation, Erf
from .layers import BuildContext, KernelContext, Layer, Serial, _orthogonal, _scales

__all__ = ["RNN", "RNNModule", "Sequences", "as_sequences", "is_sequence_architecture", "sequence_kernel"]

READOUTS = ("last", "mean", "sequence")
# grid mode: pairs x time steps per row operation (rows of tiles small enough to stay in cache)
_ROW_CELLS = 1 << 15


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


def _self_chain(rnn: RNN, kin: torch.Tensor, mask: torch.Tensor | None):
    """Per-sequence variances along time: q(t) = Var g_t and E[h_t^2], both (n, T).

    ``kin`` (n, T) is the input kernel of each step with itself; ``mask`` (n, T) marks the valid steps
    (the state is zero before a sequence starts). Invalid steps get E[h^2] = 0 and the q of the nearest
    valid step (a value in the activation's range; those steps are never read). ``mask=None``
    (start-aligned sequences, grid mode): the chain runs on past each end with the zero padding as input,
    the variances of the zero-extended sequence, which the time grids' cells past the ends use.
    """
    w2, u2 = rnn.W_std ** 2, rnn.U_std ** 2
    b2 = 0.0 if rnn.b_std is None else rnn.b_std ** 2
    hv = torch.zeros_like(kin[:, 0])
    qs, hvs = [], []
    for t in range(kin.shape[1]):
        q = w2 * hv + u2 * kin[:, t] + b2
        hv = rnn.activation.variance(q)
        if mask is not None:
            hv = torch.where(mask[:, t], hv, torch.zeros_like(q))
        qs.append(q)
        hvs.append(hv)
    q = torch.stack(qs, 1)
    if mask is None:
        return q, torch.stack(hvs, 1)
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
        theta = torch.mul(kin, a_in).add_(hprev, alpha=a_h).add_(a_b).add_(htprev, alpha=w2)
    else:
        theta = torch.add(sigma, htprev, alpha=w2)
    if tin is not None:
        theta.add_(tin, alpha=u2)
    return h, theta.mul_(dot)


def _pair(v1: torch.Tensor, v2: torch.Tensor, pairwise: bool):
    """Per-sequence tensors (n, ...) as the two sides of a block of pairs: (b1, 1, ...) and (1, b2, ...)
    in matrix mode, unchanged in pairwise mode."""
    if pairwise:
        return v1, v2
    return v1[:, None], v2[None, :]


def _rows(rnn, terms, kin, tin, q1, q2, l1, l2, need_ntk, mode):
    """One direction of one RNN over the (T1, T2) time grids of a block of pairs, one row t at a time.

    kin, tin: (*B, T1, T2) input kernels of the pairs (tin None for raw input), sequences start-aligned;
    q1 (*B1, T1), q2 (*B2, T2): Var g_t of either side, l1 (*B1), l2 (*B2) their lengths, with B1 and B2
    broadcasting to the block B: (b1, 1) and (1, b2) for a tile of b1 x b2 pairs, (P,) and (P,) for a list
    of P pairs. Each row is vectorised over t' and all pairs; step (t, t') reads (t - 1, t' - 1), the
    previous row shifted by one column, held in a buffer whose column 0 is h_0 = 0 (the shift is a view).
    Cells past either sequence's end hold the kernel of the zero-extended sequences (finite, consistent
    with q past the end); valid cells never read them.

    mode "grid": return the grids (K, K' Theta), (*B, T1, T2) views; "mean": their means over the valid
    cells, (*B,), accumulated as column sums over the valid rows (no grid is stored); "last": the values at
    (T1 - 1, T2 - 1) of each pair, (*B,).
    """
    *lead, t1, t2 = kin.shape
    dt, dev = kin.dtype, kin.device
    keep = mode == "grid"
    rows = t1 if keep else 2  # a ring of two rows when the grid itself is not needed
    buf_h = torch.zeros((rows, *lead, t2 + 1), dtype=dt, device=dev)  # each row one (nearly) contiguous block
    buf_t = torch.zeros_like(buf_h) if need_ntk else None
    zero_row = torch.zeros((*lead, t2), dtype=dt, device=dev)
    if mode == "mean":
        row_valid = (torch.arange(t1, device=dev) < l1[..., None]).to(dt)
        col_h = torch.zeros_like(zero_row)
        col_t = torch.zeros_like(zero_row) if need_ntk else None
    elif mode == "last":
        last1 = l1 - 1
        idx2 = (l2 - 1)[..., None].expand(*lead, 1)
        res_h = torch.zeros(lead, dtype=dt, device=dev)
        res_t = torch.zeros_like(res_h) if need_ntk else None
    for t in range(t1):
        r, prev = (t, t - 1) if keep else (t % 2, (t - 1) % 2)
        hprev = buf_h[prev, ..., :t2] if t else zero_row
        htprev = (buf_t[prev, ..., :t2] if t else zero_row) if need_ntk else None
        h, ht = _step(rnn, terms, hprev, htprev, kin[..., t, :], None if tin is None else tin[..., t, :],
                      q1[..., t:t + 1], q2, need_ntk)
        buf_h[r, ..., 1:] = h
        if need_ntk:
            buf_t[r, ..., 1:] = ht
        if mode == "mean":
            col_h.addcmul_(h, row_valid[..., t:t + 1])
            if need_ntk:
                col_t.addcmul_(ht, row_valid[..., t:t + 1])
        elif mode == "last":
            hit = last1 == t
            res_h = torch.where(hit, h.gather(-1, idx2)[..., 0], res_h)
            if need_ntk:
                res_t = torch.where(hit, ht.gather(-1, idx2)[..., 0], res_t)
    if keep:
        return buf_h[..., 1:].movedim(0, -2), (buf_t[..., 1:].movedim(0, -2) if need_ntk else None)
    if mode == "last":
        return res_h, res_t
    col_valid = (torch.arange(t2, device=dev) < l2[..., None]).to(dt)
    count = (l1 * l2).to(dt)
    return ((col_h * col_valid).sum(-1) / count,
            ((col_t * col_valid).sum(-1) / count) if need_ntk else None)


def _flip_grid(g: torch.Tensor, idx1: torch.Tensor, idx2: torch.Tensor, pairwise: bool) -> torch.Tensor:
    """Reverse each pair's grid (*B, T1, T2) within the pair's lengths (idx from _reverse_index)."""
    if pairwise:
        ar = torch.arange(g.shape[0], device=g.device)
        return g[ar[:, None, None], idx1[:, :, None], idx2[:, None, :]]
    a1 = torch.arange(g.shape[0], device=g.device)[:, None, None, None]
    a2 = torch.arange(g.shape[1], device=g.device)[None, :, None, None]
    return g[a1, a2, idx1[:, None, :, None], idx2[None, :, None, :]]


def _input_grid(v1, v2, d, pairwise):
    """x_t . x'_t' / d for a block of pairs: (P, T1, T2) or (b1, b2, T1, T2) (one matrix product)."""
    v1 = v1 * (1.0 / d)  # on the sequences, not on the grid
    if pairwise:
        return torch.bmm(v1, v2.transpose(1, 2))
    b1, ta, b2, tb = v1.shape[0], v1.shape[1], v2.shape[0], v2.shape[1]
    kin = v1.transpose(0, 1).reshape(ta * b1, d) @ v2.reshape(b2 * tb, d).T
    return kin.reshape(ta, b1, b2, tb).movedim(0, -2)  # rows t outermost in memory: contiguous rows


def _pair_grid(stack, terms, v1, l1, v2, l2, q1, q2, need_ntk, d, pairwise):
    """Readout kernels (K, K' Theta) of the top RNN for a block of pairs of sequences by their time grids.

    v1 (n1, T1, d), v2 (n2, T2, d): start-aligned, zero-padded sequences of either side (pairwise: n1 = n2 = P,
    the pairs (v1[p], v2[p]); otherwise all n1 x n2 pairs); q1[l][dir] (n1, T1), q2[l][dir] (n2, T2): Var g_t of
    layer l and direction dir. Lower layers of a stack hand their whole grids up; the top layer keeps only its
    readout ("mean": column sums).
    """
    kin = _input_grid(v1, v2, d, pairwise)
    kin_rev = None
    if stack[0].bidirectional:  # the input kernel of the reversed sequences, straight from the data
        kin_rev = _input_grid(_reverse(v1, l1), _reverse(v2, l2), d, pairwise)
    tin = tin_rev = None
    r1, r2 = _reverse_index(l1, v1.shape[1]), _reverse_index(l2, v2.shape[1])
    la, lb = (l1, l2) if pairwise else (l1[:, None], l2[None, :])

    def side(q1_, q2_):
        return (q1_, q2_) if pairwise else (q1_[:, None], q2_[None, :])

    for li, rnn in enumerate(stack):
        top = li == len(stack) - 1
        mode = rnn.readout if top else "grid"
        outs = [_rows(rnn, terms[li], kin, tin, *side(q1[li][0], q2[li][0]), la, lb, need_ntk, mode)]
        if rnn.bidirectional:
            if kin_rev is None:
                kin_rev = _flip_grid(kin, r1, r2, pairwise)
                tin_rev = None if tin is None else _flip_grid(tin, r1, r2, pairwise)
            # "last" is (T-1, T'-1) and "mean" is flip-invariant, in either time order
            outs.append(_rows(rnn, terms[li], kin_rev, tin_rev, *side(q1[li][1], q2[li][1]), la, lb, need_ntk, mode))
        del kin, tin, kin_rev, tin_rev
        kin_rev = tin_rev = None
        if top:
            k = sum(o[0] for o in outs) / len(outs)
            return k, (sum(o[1] for o in outs) / len(outs) if need_ntk else None)
        hs = [outs[0][0]] + [_flip_grid(o[0], r1, r2, pairwise) for o in outs[1:]]
        kin = sum(hs) / len(hs) if len(hs) > 1 else hs[0]
        tin = None
        if need_ntk:
            ts = [outs[0][1]] + [_flip_grid(o[1], r1, r2, pairwise) for o in outs[1:]]
            tin = sum(ts) / len(ts) if len(ts) > 1 else ts[0]
        del outs, hs


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
        mask = None  # start-aligned: the chains run on past the ends (see _self_chain)
    kin = (vals * vals).sum(-1) / d
    qs, hv_top = [], None
    for rnn in stack:
        dirs, hvs = [], []
        q, hv = _self_chain(rnn, kin, mask)
        dirs.append(q)
        hvs.append(hv)
        if rnn.bidirectional:
            rev = _reverse_index(lengths, kin.shape[1])
            qb, hvb = _self_chain(rnn, kin.gather(1, rev), mask)  # rev: an involution, identity on padding
            dirs.append(qb)
            hvs.append(hvb)
        qs.append(dirs)
        hv_orig = [hvs[0]] + ([hvs[1].gather(1, _reverse_index(lengths, kin.shape[1]))] if rnn.bidirectional else [])
        kin = sum(hv_orig) / len(hv_orig)
        hv_top = hvs
    return vals, mask, qs, hv_top


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


def _readout_variance(stack, terms, seqs, chain_vals, qs, hv_top, d, chunk):
    """Var of the stack's readout per sequence, (n,): E[h_T^2] for "last", the mean over all (t, t')
    of the sequence with itself for "mean" (by the time grids of the pairs (i, i), in chunks)."""
    top = stack[-1]
    lengths = seqs.lengths
    if top.readout == "last":
        if chain_vals is not None:  # end-aligned: the last step is the last column
            return hv_top[0][:, -1].clone()
        outs = []
        for hv in hv_top:  # the backward direction's last step is at T_i - 1 of its own order
            outs.append(hv.gather(1, (lengths - 1)[:, None])[:, 0])
        return sum(outs) / len(outs)
    idx = torch.arange(seqs.values.shape[0], device=lengths.device)
    return _grid_kernels(stack, terms, seqs, seqs, qs, qs, idx, idx, False, d, chunk)[0]


def _grid_kernels(stack, terms, s1, s2, q1, q2, ii, jj, need_ntk, d, chunk, show=False):
    """Readout kernels (K, K' Theta) of the pairs (ii[p], jj[p]) of sequences of s1 and s2, chunk pairs at a
    time (each chunk's time grid spans only its own longest sequences)."""
    out_h = torch.empty(ii.shape[0], dtype=s1.values.dtype, device=s1.values.device)
    out_t = torch.empty_like(out_h) if need_ntk else None
    starts = range(0, ii.shape[0], chunk)
    for p0 in progress(starts, total=len(starts), desc="kernel tiles", unit="tile", enabled=show):
        i, j = ii[p0:p0 + chunk], jj[p0:p0 + chunk]
        l1, l2 = s1.lengths[i], s2.lengths[j]
        ta, tb = int(l1.max()), int(l2.max())
        qa = [[q[i, :ta] for q in dirs] for dirs in q1]
        qb = [[q[j, :tb] for q in dirs] for dirs in q2]
        k, kt = _pair_grid(stack, terms, s1.values[i, :ta], l1, s2.values[j, :tb], l2, qa, qb, need_ntk, d, True)
        out_h[p0:p0 + chunk] = k
        if need_ntk:
            out_t[p0:p0 + chunk] = kt
    return out_h, out_t


def sequence_kernel(arch, x1, x2, names, *, diagonal: bool, dtype, device, memory_budget, block_size,
                    progress_flag: bool | None = None):
    """Exact kernels of a sequence architecture (first layer an RNN), called by ``Architecture.kernel``.

    Validates the sequences, computes the readout kernels of the RNN stack tile by tile under the memory
    budget, and applies the remaining layers (the Dense readout etc.) through the ordinary kernel state.
    Unidirectional stacks with readout "last" run one chain per pair along the time diagonal; everything
    else runs the pairs' whole time grids, row by row. Tiles of length-sorted sequences (upper triangle only
    for x2=None) span only their own longest sequences.
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
    # "last" of a unidirectional stack, or of one bidirectional layer (whose backward RNN's last state is the
    # last state of a unidirectional RNN on the reversed sequences): chains along time diagonals
    chain = stack[-1].readout == "last" and (len(stack) == 1 or not any(r.bidirectional for r in stack))
    chain_stack = [replace(r, bidirectional=False) for r in stack] if chain else stack
    t_frame = max(s1.values.shape[1], s2.values.shape[1])
    item = s1.values.element_size()
    n1, n2 = s1.values.shape[0], s2.values.shape[0]
    t1, t2 = s1.values.shape[1], s2.values.shape[1]
    # memory per pair of sequences: full time grids (grid mode) or per-step scalars (chain mode). Grid mode:
    # the input kernel (+ its reverse), and per lower layer of a stack its output grids (x2 with the NTK, x2
    # again for a bidirectional layer and its flipped copies); the top layer keeps two rows per kernel.
    if chain:
        per_pair = (24 * len(stack) + 8) * item
    else:
        bi = any(r.bidirectional for r in stack)
        grids = (2 if bi else 1) * (2 if need_ntk else 1)
        if len(stack) > 1:
            grids += (2 if need_ntk else 1) * (4 if bi else 2)
        per_pair = (t1 * t2 * grids + (t1 + t2) * (8 * len(stack) + 2 * d + 8) + 16) * item
    budget = memory_budget if memory_budget is not None else 0.9 * available_memory_bytes(s1.values.device)
    out_bytes = (n1 if diagonal else n1 * n2) * len(names) * item
    check_memory(out_bytes, budget, f"the {n1}x{n2} kernel{'s' if len(names) > 1 else ''} in {s1.values.dtype}",
                 "compute it in pieces (slices of x1) or use float32")
    # per-sequence state (values, variances per layer and direction) and the pair index lists
    left = budget - out_bytes - 4 * (n1 + n2) * t_frame * item * (len(stack) + 2)
    if block_size is not None:
        if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        block = int(block_size)
    elif chain:
        block = 512
        while block > 1 and block * block * per_pair > left:
            block //= 2
    else:
        # tiles of ~2^16 grid cells per row operation (cache-sized rows), smaller when the budget says so
        block = max(1, int(math.isqrt(max(1, _ROW_CELLS // max(t2, 1)))))
        while block > 1 and block * block * per_pair > left:
            block -= 1
    check_memory(out_bytes + block * block * per_pair, budget,
                 f"kernel tiles of {block * block} sequence pairs with {t1}x{t2} time steps",
                 "pass a smaller block_size, a larger memory_budget, or shorter sequences")

    # per-sequence variances (and, in chain mode, end-aligned values) of both sides
    if chain:  # one set per direction: (end-aligned values, masks, Var g_t, Var of the readout)
        def sides(s):
            out = []
            for rev in ([False, True] if stack[0].bidirectional else [False]):
                seq = Sequences(_reverse(s.values, s.lengths), s.lengths) if rev else s
                v, mk, q, hv = _side_variances(chain_stack, seq, True, t_frame)
                out.append((v, mk, q, _readout_variance(chain_stack, terms, seq, v, q, hv, d, 1)))
            return out

        dirs1 = sides(s1)
        dirs2 = dirs1 if same else sides(s2)
        var1 = sum(dd[3] for dd in dirs1) / len(dirs1)
        var2 = sum(dd[3] for dd in dirs2) / len(dirs2)
    else:
        _, _, q1, hv1 = _side_variances(stack, s1, False, t_frame)
        q2, hv2 = (q1, hv1) if same else _side_variances(stack, s2, False, t_frame)[2:]
        var1 = _readout_variance(stack, terms, s1, None, q1, hv1, d, block * block)
        var2 = var1 if same else _readout_variance(stack, terms, s2, None, q2, hv2, d, block * block)
    width = stack[-1].features
    rest_body = Serial(rest)

    def finish(k, kt, va, vb):
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

    dev = s1.values.device
    if diagonal and not chain:  # grid mode, pairs (i, i): chunks of pairs of similar lengths
        ii = torch.arange(n1, device=dev)
        show = n1 > block * block if progress_flag is None else bool(progress_flag)
        k, kt = _grid_kernels(stack, terms, s1, s2, q1, q2, ii, ii, need_ntk, d, block * block, show)
        vals = finish(k, kt, var1, var2)
        outs = {}
        for name in names:
            outs[name] = torch.empty(n1, dtype=k.dtype, device=dev)
            outs[name][order1] = vals[name]
        return outs

    def block_state(i0, i1, j0, j1, pairwise):
        sl1, sl2 = slice(i0, i1), slice(j0, j1)
        if chain:  # the directions' per-unit kernels average (features concatenated)
            k = kt = 0.0
            for (va_, ma_, qa_, _), (vb_, mb_, qb_, _) in zip(dirs1, dirs2):
                qa = [[q[sl1] for q in dirs] for dirs in qa_]
                qb = [[q[sl2] for q in dirs] for dirs in qb_]
                kd, ktd = _stack_chain(chain_stack, terms, va_[sl1], vb_[sl2], ma_[sl1], mb_[sl2], qa, qb, pairwise,
                                       need_ntk, d)
                k = k + kd / len(dirs1)
                kt = (kt + ktd / len(dirs1)) if need_ntk else None
        else:  # the time grid of a tile spans only its own longest sequences (tiles hold similar lengths)
            ta, tb = int(s1.lengths[sl1].max()), int(s2.lengths[sl2].max())
            qa = [[q[sl1, :ta] for q in dirs] for dirs in q1]
            qb = [[q[sl2, :tb] for q in dirs] for dirs in q2]
            k, kt = _pair_grid(stack, terms, s1.values[sl1, :ta], s1.lengths[sl1], s2.values[sl2, :tb],
                               s2.lengths[sl2], qa, qb, need_ntk, d, pairwise)
        va, vb = (var1[sl1], var2[sl2]) if pairwise else (var1[sl1, None], var2[None, sl2])
        return finish(k, kt, va, vb)

    if diagonal:
        outs = {name: torch.empty(n1, dtype=s1.values.dtype, device=dev) for name in names}
        for i0 in range(0, n1, block * block):
            i1 = min(i0 + block * block, n1)
            for name, val in block_state(i0, i1, i0, i1, True).items():
                outs[name][i0:i1] = val
        for name in names:
            outs[name][order1] = outs[name].clone()
        return outs
    outs = {name: empty_output((n1, n2), s1.values.dtype, dev) for name in names}
    tiles = [(i0, j0) for i0 in range(0, n1, block) for j0 in range(i0 if same else 0, n2, block)]
    show = len(tiles) > 1 if progress_flag is None else bool(progress_flag)
    for i0, j0 in progress(tiles, desc="kernel tiles", unit="tile", enabled=show):
        i1, j1 = min(i0 + block, n1), min(j0 + block, n2)
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
