"""Structured rules of the empirical NTK: which layer calls are recorded, and how each one's contribution
is assembled from its input and its output cotangents (Novak et al. 2022, Sec. 3-4).

Rules (``_Call.rule``):

* ``"linear"`` -- nn.Linear, ntkit's Dense, and the ``F.linear`` calls of nn.MultiheadAttention's input and
  output projections (``in_proj_weight``/``in_proj_bias``, ``out_proj``): y = a W^T + b over any leading axes.
* ``"conv"`` -- nn.Conv1d/2d (ungrouped): the same over patches.
* ``"embedding"`` -- nn.Embedding: y = W[ids]. Theta_W(x, x') = sum over position pairs with equal tokens of
  g_p . g'_q (token-match counts times cotangent products), never forming one-hot inputs or the Jacobian.
* ``"layernorm"``, ``"channelnorm"`` (GroupNorm, eval-mode BatchNorm with running statistics): y = xhat w + b
  with xhat the normalised input: the per-sample gradients sum_positions xhat g (weight) and sum g (bias) are
  formed directly, O(n k size(y)).

The batch axis of a linear-type call (linear, embedding, layernorm) may be its first axis, its second
(sequence-first attention), or interleaved in a flattened first axis (attention's output projection sees
(L n, E) rows); the layout is chosen per call and accepted only if the row check confirms it (row p of the
laid-out call belongs to sample p alone).
"""

from __future__ import annotations

import threading
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.layers import DenseModule

_BN = nn.modules.batchnorm._BatchNorm
LINEAR_LIKE = ("linear", "embedding", "layernorm")


class Call:
    """One recorded call of a structured layer: rule, module, input a, output o, and the parameter names."""

    __slots__ = ("rule", "module", "a", "o", "w", "b", "ws", "bs", "extra")

    def __init__(self, rule, module, a, o, w, b, ws=1.0, bs=1.0, extra=None):
        self.rule, self.module, self.a, self.o = rule, module, a, o
        self.w, self.b, self.ws, self.bs, self.extra = w, b, ws, bs, extra

    @property
    def names(self) -> set[str]:
        return {nm for nm in (self.w, self.b) if nm is not None}


def module_rule(m: nn.Module) -> str | None:
    """The rule for a module's own parameters, or None when the Jacobian method must take them.

    Only the library's own forward, and no user hooks that could change its input or output: a subclass that
    overrides forward (LoRA terms, masks, clamps) or a hook computes something else than the rule assumes."""
    if m._forward_hooks or m._forward_pre_hooks:
        return None
    if isinstance(m, DenseModule):  # its parameterization scales must be plain numbers
        ok = (type(m).forward is DenseModule.forward and isinstance(m.weight_scale, (int, float))
              and isinstance(m.bias_scale, (int, float)))
        return "linear" if ok else None
    if isinstance(m, nn.Linear):
        return "linear" if type(m).forward is nn.Linear.forward else None
    if isinstance(m, nn.Conv2d):
        ok = (m.groups == 1 and type(m).forward is nn.Conv2d.forward
              and type(m)._conv_forward is nn.Conv2d._conv_forward)
        return "conv" if ok else None
    if isinstance(m, nn.Conv1d):
        ok = (m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
              and type(m).forward is nn.Conv1d.forward and type(m)._conv_forward is nn.Conv1d._conv_forward)
        return "conv" if ok else None
    if isinstance(m, nn.Embedding):
        ok = (type(m).forward is nn.Embedding.forward and m.max_norm is None and not m.scale_grad_by_freq
              and not m.sparse)
        return "embedding" if ok else None
    if isinstance(m, nn.LayerNorm):
        return "layernorm" if type(m).forward is nn.LayerNorm.forward and m.elementwise_affine else None
    if isinstance(m, nn.GroupNorm):
        return "channelnorm" if type(m).forward is nn.GroupNorm.forward and m.affine else None
    if isinstance(m, _BN):
        ok = (type(m).forward is _BN.forward and m.affine and m.track_running_stats
              and m.running_mean is not None)
        return "channelnorm" if ok else None
    return None


def _attention_params(model: nn.Module, pid: Mapping[int, str]):
    """For each nn.MultiheadAttention: its projection weights (by name) with their biases."""
    pairs, out_projs = [], set()
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention) and not (m._forward_hooks or m._forward_pre_hooks):
            if type(m).forward is not nn.MultiheadAttention.forward:
                continue
            if m.in_proj_weight is not None:
                pairs.append((pid.get(id(m.in_proj_weight)),
                              pid.get(id(m.in_proj_bias)) if m.in_proj_bias is not None else None))
            op = m.out_proj
            if isinstance(op, nn.Linear) and not (op._forward_hooks or op._forward_pre_hooks):
                pairs.append((pid.get(id(op.weight)), pid.get(id(op.bias)) if op.bias is not None else None))
                out_projs.add(op)
    return [(w, b) for w, b in pairs if w is not None], out_projs


# ---------------------------------------------------------------------------------------------------
# F.linear calls inside nn.MultiheadAttention: recorded through a wrapper of torch.nn.functional.linear that
# is installed only while a structured forward runs (the projections never run through a module forward)
# ---------------------------------------------------------------------------------------------------
_LINEAR_LOCK = threading.RLock()
_ORIGINAL_LINEAR = F.linear
_ACTIVE = threading.local()


def _recording_linear(input, weight, bias=None):  # noqa: A002 - torch's signature
    out = _ORIGINAL_LINEAR(input, weight, bias)
    rec = getattr(_ACTIVE, "recorder", None)
    if rec is not None:
        out = rec.linear_call(input, weight, bias, out)
    return out


class _LinearInterception:
    def __init__(self, recorder):
        self.recorder = recorder

    def __enter__(self):
        _LINEAR_LOCK.acquire()
        self.prev = getattr(_ACTIVE, "recorder", None)
        _ACTIVE.recorder = self.recorder
        self.saved = F.linear
        F.linear = _recording_linear
        return self

    def __exit__(self, *exc):
        F.linear = self.saved
        _ACTIVE.recorder = self.prev
        _LINEAR_LOCK.release()
        return False


class Recorder:
    """Forward hooks on structured modules and interception of attention's F.linear calls: record each call's
    input and output tensor.

    ``names`` selects the parameters. ``leaf_names`` maps id(tensor) of the parameters handed to the forward
    to their names (the forward runs through functional_call, so modules hold these tensors while it runs).
    With ``clone_outputs`` each call returns a copy of its output, so that an in-place operation downstream
    (``nn.ReLU(inplace=True)``) changes the copy and the recorded tensor stays the layer's output node in the
    autograd graph; ``versions`` holds the outputs' version counters at record time (to detect such operations
    when not copying)."""

    def __init__(self, model: nn.Module, names: Iterable[str], clone_outputs: bool = True, grad_only: bool = True,
                 leaf_names: Mapping[int, str] | None = None):
        names = set(names)
        self.grad_only = grad_only
        self.calls: list[Call] = []
        self.versions: list[int] = []
        self.handles = []
        self.clone_outputs = clone_outputs
        self.leaf_names = dict(leaf_names or {})
        pid = {id(v): k for k, v in model.named_parameters()}
        self.covered: set[str] = set()
        from torch.nn.modules import module as _mod
        if getattr(_mod, "_global_forward_hooks", None) or getattr(_mod, "_global_forward_pre_hooks", None):
            names = set()  # global hooks could change any layer's input or output: no structured layers
        pairs, out_projs = _attention_params(model, pid)
        self.linear_weights = {w: b for w, b in pairs if w in names}
        self.covered.update(self.linear_weights)
        self.covered.update(b for b in self.linear_weights.values() if b in names)
        self.rules: dict[nn.Module, str] = {}
        for m in model.modules():
            rule = module_rule(m)
            if rule is None or m in out_projs:
                continue
            own = [pid.get(id(p)) for p in (m.weight, getattr(m, "bias", None)) if p is not None]
            if any(n in names for n in own):
                self.rules[m] = rule
                self.handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
                self.covered.update(n for n in own if n in names)
        self.bad: set[nn.Module] = set()  # modules with a call the rule cannot describe
        self.bad_names_: set[str] = set()
        self.geometry: dict[nn.Module, tuple | None] = {}
        self.active = True

    def intercept(self):
        """Context manager: record attention's projection calls while the forward runs."""
        if not self.linear_weights:
            import contextlib
            return contextlib.nullcontext()
        return _LinearInterception(self)

    @staticmethod
    def _geometry(module):
        """What the structured rule reads from the module besides its parameters (checked to stay constant)."""
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            return (module.stride, module.padding, module.dilation, module.padding_mode, module.kernel_size)
        if isinstance(module, DenseModule):
            return (module.weight_scale, module.bias_scale)
        if isinstance(module, nn.LayerNorm):
            return (tuple(module.normalized_shape), module.eps)
        if isinstance(module, nn.GroupNorm):
            return (module.num_groups, module.eps)
        if isinstance(module, _BN):
            return (module.eps, module.training)
        if isinstance(module, nn.Embedding):
            return (module.padding_idx, module.max_norm)
        return None

    def _record(self, call: Call):
        o = call.o
        if self.grad_only and not o.requires_grad:  # a call under no_grad: no graph, no contribution
            return o
        self.calls.append(call)
        self.versions.append(o._version)
        return o.clone() if self.clone_outputs else o

    def _hook(self, module, args, kwargs, output):
        if not self.active:  # e.g. recomputation inside a backward pass (activation checkpointing)
            self.bad.add(module)
            return None
        if self._geometry(module) != self.geometry.setdefault(module, self._geometry(module)):
            self.bad.add(module)  # a shared convolution called with different stride/padding/dilation
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            self.bad.add(module)
            return None
        rule = self.rules.get(module)
        if rule == "channelnorm" and isinstance(module, _BN) and module.training:
            self.bad.add(module)  # batch statistics: not an affine map of the sample
            return None
        w = self.leaf_names.get(id(module.weight))
        bias = getattr(module, "bias", None)
        b = self.leaf_names.get(id(bias)) if bias is not None else None
        ws, bs = (module.weight_scale, module.bias_scale) if isinstance(module, DenseModule) else (1.0, 1.0)
        extra = None
        if isinstance(module, _BN):
            extra = (module.running_mean, module.running_var)
        new = self._record(Call(rule, module, x, output, w, b, ws, bs, extra))
        return new if new is not output else None

    def linear_call(self, x, weight, bias, out):
        w = self.leaf_names.get(id(weight))
        if w not in self.linear_weights or not isinstance(x, torch.Tensor):
            return out
        if not self.active:
            self.bad_names_.update({w, self.linear_weights[w]} - {None})
            return out
        b = self.leaf_names.get(id(bias)) if bias is not None else None
        if b is not None and b != self.linear_weights[w]:
            b = None  # some other tensor as bias: its own uses are checked like any unrecorded use
        return self._record(Call("linear", None, x, out, w, b))

    def bad_names(self, pid) -> set[str]:
        # geometry read again now: attributes changed after the last call also invalidate the patches
        bad = self.bad | {m for m, geo in self.geometry.items() if self._geometry(m) != geo}
        out = set(self.bad_names_)
        for m in bad:
            out.update(nm for nm in module_param_names(m, pid) if nm is not None)
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def module_param_names(module: nn.Module, pid: Mapping[int, str]) -> tuple[str | None, str | None]:
    w = pid.get(id(module.weight))
    b = pid.get(id(module.bias)) if getattr(module, "bias", None) is not None else None
    return w, b


# ---------------------------------------------------------------------------------------------------
# layouts: where the batch is in a call
# ---------------------------------------------------------------------------------------------------
def _feature_ndim(call: Call) -> int:
    """Trailing axes of the output that are features (not positions or batch)."""
    if call.rule == "layernorm":
        return len(call.module.normalized_shape)
    return 1


def layouts(call: Call, n: int) -> list[str]:
    """Candidate batch layouts of a call's leading axes, in the order they are tried."""
    o = call.o
    if call.rule not in LINEAR_LIKE:
        return ["first"] if o.ndim >= 1 and o.shape[0] == n and call.a.shape[0] == n else []
    lead = o.shape[:o.ndim - _feature_ndim(call)]
    out = []
    if len(lead) >= 1 and lead[0] == n:
        out.append("first")
    if len(lead) >= 2 and lead[1] == n:
        out.append("second")
    if len(lead) >= 1 and lead[0] % n == 0 and lead[0] > n:
        out += ["interleaved", "blocked"]
    return out


def apply_layout(t: torch.Tensor, layout: str, n: int, offset: int = 0) -> torch.Tensor:
    """Move the batch of a tensor shaped like the call (after ``offset`` leading axes) to axis ``offset``."""
    if layout == "first":
        return t
    if layout == "second":
        return t.movedim(offset + 1, offset)
    m = t.shape[offset] // n
    shape = t.shape[:offset]
    rest = t.shape[offset + 1:]
    if layout == "interleaved":  # rows r = l n + p
        return t.reshape(*shape, m, n, *rest).movedim(offset + 1, offset)
    return t.reshape(*shape, n, m, *rest)  # blocked: rows r = p m + l


# ---------------------------------------------------------------------------------------------------
# per-call features
# ---------------------------------------------------------------------------------------------------
def patches(module: nn.Module | None, a: torch.Tensor) -> torch.Tensor:
    """Layer input (batch first) as (n, positions, features) so that output = patches @ W_flat^T (+ b)."""
    if module is None or isinstance(module, (nn.Linear, DenseModule)):
        n = a.shape[0]
        return a.reshape(n, -1, a.shape[-1])
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            pad = module._reversed_padding_repeated_twice
            a = F.pad(a, pad, mode=module.padding_mode if module.padding_mode != "zeros" else "constant")
            padding = 0
        else:
            padding = module.padding
        if module.groups != 1:
            raise NotImplementedError
        cols = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=padding,
                        stride=module.stride)  # (n, C kh kw, L)
        return cols.transpose(1, 2)
    if isinstance(module, nn.Conv1d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise NotImplementedError
        cols = F.unfold(a.unsqueeze(-1), (module.kernel_size[0], 1), dilation=(module.dilation[0], 1),
                        padding=(module.padding[0], 0), stride=(module.stride[0], 1))
        return cols.transpose(1, 2)
    raise NotImplementedError  # pragma: no cover


def cotangent_positions(call: Call, g: torch.Tensor) -> torch.Tensor:
    """Output cotangent (n, k, *out_shape) as (n, k, positions, channels)."""
    n, k = g.shape[:2]
    if call.rule in ("linear", "embedding"):
        return g.reshape(n, k, -1, g.shape[-1])
    return g.reshape(n, k, g.shape[2], -1).transpose(2, 3)  # conv: (n, k, C_out, L) -> (n, k, L, C_out)


def _normalised(call: Call, a: torch.Tensor) -> torch.Tensor:
    """xhat of a norm layer's call (input batch first), recomputed the way the module computes it."""
    m = call.module
    if isinstance(m, nn.LayerNorm):
        return F.layer_norm(a, tuple(m.normalized_shape), None, None, m.eps)
    if isinstance(m, nn.GroupNorm):
        return F.group_norm(a, m.num_groups, None, None, m.eps)
    mean, var = call.extra
    shape = (1, -1) + (1,) * (a.ndim - 2)
    return (a - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + m.eps)


def _affine_shape(call: Call, ndim: int) -> tuple:
    if call.rule == "layernorm":
        return tuple(call.module.normalized_shape)
    return (-1,) + (1,) * (ndim - 2)


def features(call: Call, a: torch.Tensor, o: torch.Tensor, g: torch.Tensor, params: Mapping[str, torch.Tensor]):
    """The per-call data the pair terms need, from the batch-first input a, output o and cotangents
    g (n, k, *o.shape[1:]); None when the call is not what the rule describes (checked against its output)."""
    n, k = g.shape[:2]
    if call.rule in ("linear", "conv"):
        return ("dense", patches(call.module, a), cotangent_positions(call, g))
    if call.rule == "embedding":
        weight = params[call.w]
        if a.is_floating_point() or a.is_complex() or not torch.equal(F.embedding(a, weight.detach()), o):
            return None
        ids = a.reshape(n, -1).to(torch.int64)
        pad = call.module.padding_idx
        if pad is not None:
            ids = torch.where(ids == pad, torch.full_like(ids, -1), ids)  # no gradient reaches the padding row
        return ("embedding", ids, cotangent_positions(call, g))
    # norms: y = xhat w + b
    xhat = _normalised(call, a)
    fd = _feature_ndim(call) if call.rule == "layernorm" else None
    w = params[call.w] if call.w is not None else call.module.weight.detach()
    bias = params[call.b] if call.b is not None else (call.module.bias.detach() if call.module.bias is not None
                                                      else None)
    shape = _affine_shape(call, a.ndim)
    want = xhat * w.detach().reshape(shape) + (0 if bias is None else bias.detach().reshape(shape))
    tol = torch.finfo(o.dtype).eps ** 0.5 * (1.0 + float(o.detach().abs().max()))
    if want.shape != o.shape or float((want - o.detach()).abs().max()) > tol:
        return None
    if call.rule == "layernorm":  # sum over the leading positions, keep the normalised features
        gw = (xhat.unsqueeze(1) * g).reshape(n, k, -1, *g.shape[g.ndim - fd:]).sum(2).reshape(n, k, -1)
        gb = g.reshape(n, k, -1, *g.shape[g.ndim - fd:]).sum(2).reshape(n, k, -1)
    else:  # channels on axis 1 of the call: sum over the spatial positions
        c = o.shape[1]
        gw = (xhat.unsqueeze(1) * g).reshape(n, k, c, -1).sum(-1)
        gb = g.reshape(n, k, c, -1).sum(-1)
    return ("grad", gw, gb)


def feature_sizes(call: Call, n: int) -> tuple[int, int, int, int, int, int]:
    """Per sample, for the cost and memory models: (output numbers kept per output unit, forward FLOPs,
    input/patch numbers kept, size d c of the per-sample weight gradient of a weight-sharing layer, its
    positions L and output channels c) -- the last three 0 for layers used at one position."""
    o, a = call.o, call.a
    per_o = o.numel() // max(n, 1)
    if call.rule in ("linear", "conv"):
        lay = next(iter(layouts(call, n)), None)
        if lay is None:
            return 0, 0, 0, 0, 0, 0
        pa = patches(call.module, apply_layout(a, lay, n)[:1])
        positions, d = pa.shape[1], pa.shape[2]
        c = per_o // max(positions, 1)
        if positions == 1:
            return int(per_o), 2 * d * c, int(pa.numel()), 0, 0, 0
        return int(per_o), 2 * positions * d * c, int(pa.numel()), d * c, positions, c
    if call.rule == "embedding":
        return int(per_o), per_o, int(a.numel() // max(n, 1)), 0, 0, 0
    return int(per_o), 8 * per_o, int(per_o), 0, 0, 0


# ---------------------------------------------------------------------------------------------------
# pair terms
# ---------------------------------------------------------------------------------------------------
def contract(u1: torch.Tensor, u2: torch.Tensor, output: str) -> torch.Tensor:
    """sum_f u1[i, a, f] u2[j, b, f] for u of shape (n, k, F), reduced as ``output`` asks -- one matmul:
    "full" (n1, n2, k, k); "diagonal" (n1, n2, k) (a = b only); "trace" (n1, n2), the mean over a of the
    diagonal (never forming the k x k blocks)."""
    n1, k, f = u1.shape
    n2, k2 = u2.shape[:2]
    if output == "trace":
        return (u1.reshape(n1, k * f) @ u2.reshape(n2, k * f).T).div_(k)
    if output == "diagonal":
        return torch.bmm(u1.transpose(0, 1), u2.permute(1, 2, 0)).permute(1, 2, 0)
    return (u1.reshape(n1 * k, f) @ u2.reshape(n2 * k2, f).T).reshape(n1, k, n2, k2).permute(0, 2, 1, 3)


def _expand(aa: torch.Tensor, output: str) -> torch.Tensor:
    """A per-pair factor (n1, n2) shaped to multiply a reduced output."""
    return aa if output == "trace" else aa[:, :, None] if output == "diagonal" else aa[:, :, None, None]


_PAIR_CHUNK = 1 << 22  # numbers per gathered chunk of matched token pairs
# numbers a weight-sharing layer's route holds at a time (per-layer Jacobian rows of both sides, or the position
# route's temporaries): the default and the size blocks are planned with; ``empirical_ntk`` grows it to what the
# memory budget leaves (``chunk=`` of :func:`pair_term`)
GRAD_CHUNK = 1 << 25
MIN_CHUNK = 1 << 12  # the smallest chunk a small budget may shrink it to


def _embedding_term(e1, e2, output: str) -> torch.Tensor:
    """sum over (p, q) with ids1[i, p] == ids2[j, q] of g1[i, a, p] . g2[j, b, q].

    Per sample and token the cotangents are summed first (h[i, t] = sum_{p: ids[i, p] = t} g[i, :, p]); then
    only pairs of rows holding the same token are multiplied (sorted search), in bounded chunks."""
    (_, ids1, g1), (_, ids2, g2) = e1, e2
    n1, k, _, dim = g1.shape
    n2 = g2.shape[0]
    top = int(max(int(ids1.max()), int(ids2.max()), 0)) + 1

    def rows(ids, g):
        n, length = ids.shape
        k = g.shape[1]
        keep = ids.reshape(-1) >= 0
        key = (torch.arange(n, device=ids.device).repeat_interleave(length) * top + ids.reshape(-1))[keep]
        uniq, inv = torch.unique(key, return_inverse=True)
        gg = g.permute(0, 2, 1, 3).reshape(n * length, k, dim)[keep]
        h = torch.zeros((uniq.numel(), k, dim), dtype=g.dtype, device=g.device).index_add_(0, inv, gg)
        return uniq // top, uniq % top, h

    s1, t1, h1 = rows(ids1, g1)
    s2, t2, h2 = (s1, t1, h1) if e2 is e1 else rows(ids2, g2)
    order = torch.argsort(t2)
    t2s = t2[order]
    lo = torch.searchsorted(t2s, t1, right=False)
    hi = torch.searchsorted(t2s, t1, right=True)
    counts = hi - lo
    shape = {"full": (n1 * n2, k, g2.shape[1]), "diagonal": (n1 * n2, k), "trace": (n1 * n2,)}[output]
    out = torch.zeros(shape, dtype=g1.dtype, device=g1.device)
    total = int(counts.sum())
    if total:
        r1 = torch.repeat_interleave(torch.arange(t1.numel(), device=t1.device), counts)
        start = torch.cumsum(counts, 0) - counts
        within = torch.arange(total, device=t1.device) - torch.repeat_interleave(start, counts)
        r2 = order[lo[r1] + within]
        step = max(1, _PAIR_CHUNK // max(1, k * dim))
        for c0 in range(0, total, step):
            a_, b_ = r1[c0:c0 + step], r2[c0:c0 + step]
            u, v = h1[a_], h2[b_]  # (m, k, D)
            if output == "full":
                val = torch.bmm(u, v.transpose(1, 2))
            elif output == "diagonal":
                val = (u * v).sum(-1)
            else:
                val = (u * v).sum((1, 2)) / k
            out.index_add_(0, s1[a_] * n2 + s2[b_], val)
    return out.reshape(n1, n2, *shape[1:])


def dense_cost(route: str, n1: int, n2: int, k1: int, k2: int, positions1: int, positions2: int, d: int, c: int,
               output: str, symmetric: bool = False) -> float:
    """Multiply-adds of one weight-sharing (Linear over positions, convolution) call pair, by route.

    With a_p the patch (d numbers) and g_ap the cotangent of output unit a (c numbers) at position p:

    * ``"positions"``: sum_{p,q} (a1_p . a2_q) (g1_ap . g2_bq): the patch products (n1 n2 L1 L2 d), then for
      "full" T_{ij p b} = sum_q (a1_p . a2_q) g2_bq (n1 n2 L1 L2 k2 c) contracted with g1 (n1 n2 L1 c k1 k2);
      for "trace"/"diagonal" the cotangent products (n1 n2 L1 L2 k c). Cost grows like positions^2: cheap for
      few positions.
    * ``"jacobian"``: the per-layer Jacobian rows J_a = sum_p g_ap (x) a_p (d c numbers per sample and output,
      from the captured inputs and cotangents: n k L d c, no extra backward pass), then their inner products
      (n1 n2 k1 k2 d c for "full", n1 n2 k d c otherwise).
      Independent of the positions: cheap for many positions and narrow layers.

    A symmetric diagonal block (``symmetric``) computes the fraction :func:`sym_fraction` of the position
    route's pair products and of the Jacobian rows' "full" Gram matrix (row chunks on and above the diagonal;
    :func:`contract_sym` computes a "trace"/"diagonal" one whole), and forms one side's Jacobian rows.
    """
    kk = k1 * k2 if output == "full" else k1
    s = sym_fraction(n1) if symmetric else 1.0
    if route == "positions":
        extra = n1 * n2 * kk * positions1 * c if output == "full" else 0
        return float(s * (n1 * n2 * positions1 * positions2 * (d + k2 * c) + extra))
    form = n1 * k1 * positions1 * d * c + (0 if symmetric else n2 * k2 * positions2 * d * c)
    return float(form + (s if output == "full" else 1.0) * n1 * n2 * kk * d * c)


def dense_route(n1, n2, k1, k2, positions1, positions2, d, c, output, symmetric=False) -> str:
    """The cheaper route of :func:`dense_cost` for one call pair (per layer, never per model)."""
    args = (n1, n2, k1, k2, positions1, positions2, d, c, output, symmetric)
    return "positions" if dense_cost("positions", *args) <= dense_cost("jacobian", *args) else "jacobian"


SYM_MIN_ROWS = 8  # a symmetric Gram matrix is computed in row chunks of at least this many samples


def sym_fraction(n: int) -> float:
    """Fraction of the n x n pair products that the row chunks of a symmetric block compute (chunks on and
    above the diagonal, :func:`contract_sym`): 1 below 2 chunks, 0.58 at n = 64."""
    chunks = min(6, n // SYM_MIN_ROWS)
    if chunks < 2:
        return 1.0
    step = -(-n // chunks)
    return sum(min(step, n - i0) * (n - i0) for i0 in range(0, n, step)) / (n * n)


def contract_sym(u: torch.Tensor, output: str) -> torch.Tensor:
    """:func:`contract` (u, u, output) computing only the chunks on and above the diagonal (the rest mirrored):
    about (1 + 1/c)/2 of the multiply-adds with c chunks -- for ``"full"`` only, whose products have n k rows.
    A "trace" or "diagonal" Gram matrix is a product with n rows and a long inner dimension, bound by reading
    u: row chunks of it each read all of u again (measured: an 11-row chunk of a 64 x 1.5 M product takes as
    long as all 64 rows), so it is computed whole."""
    n = u.shape[0]
    chunks = min(6, n // SYM_MIN_ROWS)
    if chunks < 2 or output != "full":
        return contract(u, u, output)
    step = -(-n // chunks)
    out = None
    for i0 in range(0, n, step):
        i1 = min(i0 + step, n)
        part = contract(u[i0:i1], u[i0:], output)  # rows i0:i1, columns i0:n
        if out is None:
            out = torch.empty((n, n) + part.shape[2:], dtype=part.dtype, device=part.device)
        out[i0:i1, i0:] = part
        if i1 < n:
            rest = part[:, i1 - i0:]
            out[i1:, i0:i1] = rest.transpose(0, 1).transpose(2, 3) if output == "full" else rest.transpose(0, 1)
    return out


def _positions_term(a1, g1, a2, g2, output: str, same: bool, chunk: int = GRAD_CHUNK) -> torch.Tensor:
    """sum_{p,q} (a1_p . a2_q) (g1_ap . g2_bq) in row chunks of x1 whose temporaries hold at most ~``chunk``
    numbers (at least one row); with ``same`` (x2 is x1) only the columns from the chunk's first row on, mirrored.

    "trace"/"diagonal": two matrix products with long inner dimensions, the patch products (n1 L1 x n2 L2,
    inner d) and the cotangent products summed over the output units (inner k c) or per unit (inner c),
    multiplied and summed over the position pairs. "full": T = sum_q (a1_p . a2_q) g2_bq first (n1 n2 L1 L2 k c),
    then contracted with g1 over (p, c) -- cheaper than the k^2 L^2 cotangent products when L > k."""
    n1, k1, L1, c = g1.shape
    n2, k2, L2, _ = g2.shape
    d = a1.shape[2]
    if output == "full":
        per_row = n2 * L1 * (L2 + 2 * k2 * c)
    else:
        per_row = n2 * L1 * L2 * (2 if output == "trace" else k1 + 1)
    rows = max(1, chunk // max(1, per_row))
    if same and n1 > SYM_MIN_ROWS:
        rows = min(rows, max(SYM_MIN_ROWS, -(-n1 // 6)))
    if output == "full":  # x2's cotangents as (n2, L2, c k2): the right-hand side of the batched products
        g2q = g2.permute(0, 2, 3, 1).reshape(n2, L2, c * k2)
    elif output == "trace":
        h1 = g1.permute(0, 2, 1, 3).reshape(n1 * L1, k1 * c)
        h2 = h1 if same else g2.permute(0, 2, 1, 3).reshape(n2 * L2, k2 * c)
    elif output == "diagonal":
        h1 = g1.permute(1, 0, 2, 3).reshape(k1, n1 * L1, c)
        h2 = h1 if same else g2.permute(1, 0, 2, 3).reshape(k2, n2 * L2, c)
    out = None
    for i0 in range(0, n1, rows):
        i1 = min(i0 + rows, n1)
        j0 = i0 if same else 0
        r, m = i1 - i0, n2 - j0
        if output == "full":
            # aa (r L1, m L2) as a batch over x2's samples j of (r L1, L2) matrices, times g2 (L2, c k) per j:
            # t[j, (i p), (c b)]; then per row i one batched product g1[i] (k, L1 c) @ t[j, i] (L1 c, k)
            aa = (a1[i0:i1].reshape(r * L1, d) @ a2[j0:].reshape(m * L2, d).T).view(r * L1, m, L2)
            t = torch.bmm(aa.transpose(0, 1), g2q[j0:])  # (m, r L1, c k2)
            del aa
            t = t.view(m, r, L1 * c, k2)
            part = torch.empty((r, m, k1, k2), dtype=g1.dtype, device=g1.device)
            for i in range(r):
                lhs = g1[i0 + i].reshape(k1, L1 * c)
                torch.bmm(lhs.expand(m, k1, L1 * c), t[:, i], out=part[i])
            del t
        else:
            aa = a1[i0:i1].reshape(r * L1, d) @ a2[j0:].reshape(m * L2, d).T  # (r L1, m L2)
            if output == "trace":
                gg = h1[i0 * L1:i1 * L1] @ h2[j0 * L2:].T
                part = (gg.mul_(aa)).reshape(r, L1, m, L2).sum((1, 3)).div_(k1)
            else:
                gg = torch.bmm(h1[:, i0 * L1:i1 * L1], h2[:, j0 * L2:].transpose(1, 2))  # (k, r L1, m L2)
                part = gg.mul_(aa).reshape(k1, r, L1, m, L2).sum((2, 4)).permute(1, 2, 0)
            del aa, gg
        if out is None:
            out = torch.empty((n1, n2) + part.shape[2:], dtype=part.dtype, device=part.device)
        out[i0:i1, j0:] = part
        if same and i1 < n2:
            rest = part[:, i1 - j0:]
            out[i1:, i0:i1] = rest.transpose(0, 1).transpose(2, 3) if output == "full" else rest.transpose(0, 1)
        del part
    return out


def layer_jacobian(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-layer Jacobian rows J[i, a] = sum_p g[i, a, p] (x) a[i, p] of a weight-sharing layer, (n, k, c d),
    from its inputs a (n, L, d) and output cotangents g (n, k, L, c): one batched matrix product per sample,
    written contiguously (the (c, d) order of the flattened weight is the same on both sides of a pair)."""
    n, k, L, c = g.shape
    gt = g.transpose(2, 3).reshape(n, k * c, L)
    return torch.bmm(gt, a).reshape(n, k, c * a.shape[2])


def jacobian_chunks(n1: int, k1: int, L1: int, n2: int, k2: int, L2: int, d: int, c: int, same: bool,
                    chunk: int) -> tuple[int, int]:
    """(output channels, input features) of the per-layer Jacobian rows formed at a time: the rows of a
    (channels x features) slice of the weight, for all samples and outputs of both sides at once, with the
    cotangent copy they are formed from, hold at most ``chunk`` numbers -- or one channel and one feature."""
    side1 = n1 * k1
    side2 = 0 if same else n2 * k2
    per_channel = side1 * (d + L1) + side2 * (d + L2)  # Jacobian rows (d) + the transposed cotangents (L)
    if per_channel <= chunk:
        return max(1, min(c, chunk // max(1, per_channel))), d
    feats = (chunk - side1 * L1 - side2 * L2) // max(1, side1 + side2)
    return 1, max(1, min(d, feats))


def jacobian_numbers(n1, k1, L1, n2, k2, L2, d, c, same, chunk) -> int:
    """Numbers the per-layer Jacobian route holds at a time (for the memory model): :func:`jacobian_chunks`."""
    cc, dd = jacobian_chunks(n1, k1, L1, n2, k2, L2, d, c, same, chunk)
    return n1 * k1 * cc * (dd + L1) + (0 if same else n2 * k2 * cc * (dd + L2))


def _jacobian_term(a1, g1, a2, g2, output: str, same: bool, chunk: int) -> torch.Tensor:
    """sum over the weight's entries of J1 J2^T with J the per-layer Jacobian rows (:func:`layer_jacobian`),
    accumulated over slices of the weight (output channels, then input features when one channel is too
    large): every row is formed once and each slice's Gram matrix is one product over all samples of the block
    -- the contraction is a sum over the weight's entries, so slicing them needs no recomputation."""
    n1, k1, L1, c = g1.shape
    n2, k2, L2, _ = g2.shape
    d = a1.shape[2]
    cc, dd = jacobian_chunks(n1, k1, L1, n2, k2, L2, d, c, same, chunk)
    out = None
    for c0 in range(0, c, cc):
        h1 = g1[..., c0:c0 + cc]
        h2 = h1 if same else g2[..., c0:c0 + cc]
        for d0 in range(0, d, dd):
            m1 = layer_jacobian(a1 if dd == d else a1[..., d0:d0 + dd], h1)
            if same:
                part = contract_sym(m1, output)
            else:
                m2 = layer_jacobian(a2 if dd == d else a2[..., d0:d0 + dd], h2)
                part = contract(m1, m2, output)
                del m2
            del m1
            if out is None:
                out = part
            else:
                out.add_(part)
                del part
    return out


def pair_term(f1, f2, weight: bool, output: str, cache: dict, key, routes: dict | None = None,
              chunk: int = GRAD_CHUNK) -> torch.Tensor:
    """Contribution of one (use in x1, use in x2) pair of a weight or bias, unscaled.

    Dense calls on one position (a Linear on flat input): (a1 a2^T) (.) (g1 g2^T), and g1 g2^T alone for the
    bias -- the product g1 g2^T is computed once per call pair and shared by weight and bias. Weights shared
    over positions p (convolutions, Linear over a sequence): the cheaper of two routes by :func:`dense_cost`,
    chosen per call pair (``routes[key]`` records it): the position-pair contraction or the per-layer
    Jacobian (per-sample weight gradients), each holding at most ~``chunk`` numbers of temporaries at a time.
    Embeddings: token matches; norms: their per-sample gradients. With ``f2 is f1`` (a diagonal block of
    x2=None) only half of each symmetric Gram matrix is computed."""
    kind = f1[0]
    same = f2 is f1
    if kind == "grad":
        u1, u2 = (f1[1], f2[1]) if weight else (f1[2], f2[2])
        return contract_sym(u1, output) if same else contract(u1, u2, output)
    if kind == "embedding":
        return _embedding_term(f1, f2, output)
    (_, a1, g1), (_, a2, g2) = f1, f2
    L1, L2 = a1.shape[1], a2.shape[1]
    if L1 == 1 and L2 == 1:
        if ("gg", key) not in cache:
            u1, u2 = g1[:, :, 0], g2[:, :, 0]
            cache["gg", key] = contract_sym(u1, output) if same else contract(u1, u2, output)
        if not weight:
            return cache["gg", key]
        if routes is not None:
            routes[key] = "one-position"
        return _expand(a1[:, 0] @ a2[:, 0].T, output) * cache["gg", key]
    if not weight:  # bias: sum over positions of g
        u1 = g1.sum(2)
        return contract_sym(u1, output) if same else contract(u1, g2.sum(2), output)
    n1, k, _, c = g1.shape
    n2, k2 = g2.shape[:2]
    d = a1.shape[2]
    route = dense_route(n1, n2, k, k2, L1, L2, d, c, output, same)
    if routes is not None:
        routes[key] = route
    if route == "positions":
        return _positions_term(a1, g1, a2, g2, output, same, chunk)
    return _jacobian_term(a1, g1, a2, g2, output, same, chunk)
