"""Empirical (finite-width) NTK of any ``torch.nn.Module``.

Theta(x, x')_{ab} = sum_p  d f_a(x) / d theta_p  *  d f_b(x') / d theta_p      (Jacot et al. 2018, Eq. (3))

Three implementations, which must agree to rounding (tested against brute-force autograd):

* ``"jacobian"`` -- Jacobian contraction: J(x) by ``torch.func.jacrev`` over the parameters, then
  J(x) J(x')^T. Peak memory ~ (n1 + n2) k P numbers (P parameters, k outputs).
* ``"ntk_vector"`` -- NTK-vector products (the torch.func tutorial's second method): for each of the
  n2 k basis cotangents u, J(x) (J(x')^T u) by one vjp and one jvp. Memory ~ n1 k + P per product,
  cost ~ n2 k (forward + backward) passes.
* ``"structured"`` -- structured derivatives (Novak et al. 2022): for layers whose Jacobian has known
  structure the contribution is assembled from layer inputs a and output cotangents g, never forming
  the Jacobian: a Linear layer gives (a1 a2^T) (.) (g1 g2^T) (Hadamard product), a bias g1 g2^T, a
  convolution the same over patches and positions (a double sum over positions, since weights are
  shared); an nn.Embedding the token-match counts times the cotangent products; the affine parameters of
  LayerNorm, GroupNorm and eval-mode BatchNorm their per-sample gradients sum xhat g and sum g; the input
  and output projections of nn.MultiheadAttention (and so of nn.Transformer* layers) the Linear rule on
  the ``F.linear`` calls recorded while the forward runs (rules in ``_rules.py``). A weight shared over
  positions takes, per layer, the cheaper of the position-pair contraction and its per-layer Jacobian rows
  formed from the captured inputs and cotangents (multiply-add model ``_rules.dense_cost``); with x2=None
  each Gram matrix is computed on and above the diagonal only; the k cotangents of every recorded output come
  from k + 1 backward passes through one forward graph of the block (in sub-batches sized by the memory
  budget; the last pass carries the row check below). Parameters of any other
  module fall back to the Jacobian method, restricted to them. Memory ~ (n1 + n2) k (sum of layer widths
  x positions) numbers. Valid when samples do not interact;
  ``"auto"`` checks that by comparing the model's output on a small batch with its outputs on the same
  samples one at a time (train-mode BatchNorm, normalisation over the batch or dropout fail the check),
  and then uses the Jacobian or NTK-vector method on the whole batch instead. The structured rules take
  the parameters of modules running their library ``forward`` (not overridden, no user hooks); every
  block then checks, on its own autograd graph, that (i) each such parameter is used only through
  recorded calls (edge count into its gradient accumulator: no ``x @ layer.weight`` elsewhere, no chunk
  of attention's packed weight used on its own, no ``torch.where`` routing some samples around the layer),
  (ii) every call has a batch layout -- its first axis, its second (sequence-first attention) or
  interleaved in a flattened first axis (attention's output projection) -- under which (iii) row p of the
  call belongs to sample p (a random per-sample cotangent must reach row p scaled by its own weight:
  sorting or permuting the batch inside the model fails it), and (iv) the embedding and norm rules
  reproduce the call's output from its input. In-place operations on recorded outputs are detected by
  version counter and the block is recomputed on copies; calls under ``no_grad`` do not count. Any
  parameter that fails goes to the Jacobian method for that block.

Inputs may be a tensor, a tuple of positional arguments, a dict of keyword arguments, nested; integer
leaves (token ids, masks) included (``_inputs.py``). Blocks run over samples and, when k is large, over
output units (``output_batch_size``), so that the result plus one block's estimated peak
(:func:`peak_memory_estimate`) fit ``memory_budget``.

``"auto"`` chooses the implementation with the smallest FLOP count (:func:`cost_estimate`) among the
valid ones whose block fits the memory budget (:func:`peak_memory_estimate`); every choice returns the
same numbers (to rounding), so ``auto`` cannot be wrong the way a fast path with an unchecked
assumption can.

``output="trace"`` (default) returns (n1, n2): the mean over output units of Theta_aa, which is the
per-output kernel in the infinite-width limit; ``"full"`` (n1, n2, k, k); ``"diagonal"`` (n1, n2, k).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from .._progress import progress
from .._validation import MemoryBudgetError, available_memory_bytes, format_bytes
from ._inputs import Inputs, check_pair_inputs, prepare_inputs, sequence_pair
from ._rules import (GRAD_CHUNK, MIN_CHUNK, Call, Recorder, apply_layout, contract, dense_route, feature_sizes,
                     features, jacobian_numbers, layouts, pair_term)

__all__ = ["empirical_ntk", "empirical_nngp", "IMPLEMENTATIONS", "OUTPUTS", "peak_memory_estimate",
           "cost_estimate"]

IMPLEMENTATIONS = ("auto", "jacobian", "ntk_vector", "structured")
OUTPUTS = ("trace", "full", "diagonal")
_NTK_VECTOR_CHUNK = 32
_METHOD_LOG: list | None = None  # when a list, each structured block appends {parameter: method} (for tests)
_ROUTE_LOG: list | None = None  # when a list, each structured block appends {weight: dense route} (for tests)
_PASS_BATCH: int | None = None  # when set, the structured passes' sub-batch size (for tests)
_GRAD_CHUNK: int | None = None  # when set, the weight-sharing routes' chunk in numbers (for tests)


# ---------------------------------------------------------------------------------------------------
# model state: selection of parameters, buffers, restoration guarantees
# ---------------------------------------------------------------------------------------------------
def _select_params(model: nn.Module, params: Iterable[str] | None) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())  # tied weights appear once (remove_duplicate=True)
    if params is None:
        chosen = {k: v for k, v in named.items() if v.requires_grad}
        if not chosen:
            raise ValueError("the model has no trainable parameters (all have requires_grad=False); pass params= "
                             "to choose some explicitly")
        return {k: v.detach() for k, v in chosen.items()}
    if isinstance(params, str):
        params = [params]
    params = list(params)
    unknown = [p for p in params if p not in named]
    if unknown:
        raise ValueError(f"unknown parameter name(s) {unknown}; the model's parameters are {sorted(named)}")
    if not params:
        raise ValueError("params= is empty; pass at least one parameter name")
    return {k: named[k].detach() for k in params}


def _snapshot(model: nn.Module):
    return ({k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
            {k: v.requires_grad for k, v in model.named_parameters()},
            {name: m.training for name, m in model.named_modules()})


def _restore_check(model: nn.Module, snap) -> None:
    """Put back anything a failing forward may have touched (the library itself never mutates)."""
    state, grads, modes = snap
    with torch.no_grad():
        for k, v in model.state_dict(keep_vars=True).items():
            if k in state and not torch.equal(v.detach(), state[k]):
                v.detach().copy_(state[k])
    for k, p in model.named_parameters():
        p.requires_grad_(grads.get(k, p.requires_grad))
    for name, m in model.named_modules():
        m.training = modes.get(name, m.training)


@contextlib.contextmanager
def _no_fast_path():
    """nn.MultiheadAttention / TransformerEncoderLayer take a fused "fast path" without autograd in eval mode
    under no_grad; while ntkit evaluates the model the ordinary path runs (the same function, to rounding),
    so that every evaluation sees the same operations. The global switch is put back afterwards."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


class _Forward:
    """f(params, x) -> (n, k) through functional_call on a copy of the buffers (so train-mode
    BatchNorm running statistics of the user's model are never updated); ``x`` is an :class:`Inputs`.
    ``outputs`` restricts to a slice of the k output units (blocking over outputs)."""

    def __init__(self, model: nn.Module, params: Mapping[str, torch.Tensor], model_kwargs: Mapping | None):
        self.model = model
        self.names = list(params)
        self.fixed = {k: v.detach() for k, v in model.named_parameters() if k not in params}
        self.buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
        self.kwargs = dict(model_kwargs or {})
        self.outputs: slice | None = None
        self.state: dict = {}  # shared by the sliced copies: e.g. whether layer outputs must be copied

    def sliced(self, outputs: slice | None) -> "_Forward":
        new = object.__new__(_Forward)
        new.__dict__.update(self.__dict__)
        new.outputs = outputs
        return new

    def __call__(self, p: Mapping[str, torch.Tensor], x: Inputs, leaves=None) -> torch.Tensor:
        # fresh buffer copies per call: a train-mode BatchNorm updates its running statistics in place,
        # which must touch neither the user's model nor a tensor captured by a torch.func transform
        buffers = {k: v.clone() for k, v in self.buffers.items()}
        args, kwargs = x.call(leaves)
        n = x.n if leaves is None else leaves[0].shape[0]
        out = functional_call(self.model, ({**self.fixed, **p}, buffers), args, {**self.kwargs, **kwargs},
                              tie_weights=True, strict=False)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model returned {type(out).__name__}, not a tensor; wrap it so that forward "
                            "returns the output tensor (n, ...) to differentiate")
        if out.ndim == 0 or out.shape[0] != n:
            raise ValueError(f"the model output has shape {tuple(out.shape)}; its first dimension must be the "
                             f"batch ({n})")
        out = out.reshape(out.shape[0], -1)
        return out if self.outputs is None else out[:, self.outputs]


def _reduce(theta_full: torch.Tensor, output: str) -> torch.Tensor:
    if output == "full":
        return theta_full
    diag = torch.diagonal(theta_full, dim1=2, dim2=3)  # (n1, n2, k)
    return diag if output == "diagonal" else diag.mean(-1)


# ---------------------------------------------------------------------------------------------------
# implementations on one block of inputs: each returns (n1, n2, k, k)
# ---------------------------------------------------------------------------------------------------
def _flat_jacobian(fwd: _Forward, params, x: Inputs, independent: bool = False) -> torch.Tensor:
    """J(x) as (n, k, P). With independent samples, one Jacobian per sample (``vmap`` of ``jacrev`` of the
    single-sample function: cost linear in n); otherwise ``jacrev`` of the whole batch (n k backward
    passes over the batch: quadratic in n, but exact when samples interact, e.g. train-mode BatchNorm)."""
    jac = None
    if independent and x.n > 1:
        def single(p, leaves):
            return fwd(p, x, tuple(t.unsqueeze(0) for t in leaves))[0]
        try:
            jac = vmap(jacrev(single), in_dims=(None, 0))(params, x.leaves)  # name -> (n, k, *shape)
        except (RuntimeError, ValueError, TypeError, NotImplementedError):
            jac = None  # an operation without a batching rule, or batched keyword tensors: whole-batch path
    if jac is None:
        jac = jacrev(fwd)(params, x)  # name -> (n, k, *shape)
    n, k = next(iter(jac.values())).shape[:2]
    return torch.cat([j.reshape(n, k, -1) for j in jac.values()], dim=-1)  # (n, k, P)


def _ntk_jacobian(fwd, fwd2, params, x1, x2, independent=False, output="full"):
    """Jacobian contraction; ``x2=None`` means x1 (and, with ``fwd2 is fwd``, one Jacobian)."""
    j1 = _flat_jacobian(fwd, params, x1, independent)
    j2 = j1 if x2 is None and fwd2 is fwd else _flat_jacobian(fwd2, params, x1 if x2 is None else x2, independent)
    return contract(j1, j2, output)


def _ntk_vector(fwd, fwd2, params, x1, x2):
    x2_ = x1 if x2 is None else x2
    f2, vjp_fn = vjp(lambda p: fwd2(p, x2_), params)
    n2, k2 = f2.shape

    def column(u):  # J(x1) J(x2)^T u for one cotangent u of shape (n2, k2)
        (ju,) = vjp_fn(u)
        _, out = jvp(lambda p: fwd(p, x1), (params,), (ju,))
        return out  # (n1, k1)

    basis = torch.eye(n2 * k2, dtype=f2.dtype, device=f2.device).reshape(n2 * k2, n2, k2)
    # at most _NTK_VECTOR_CHUNK cotangents at a time: live memory ~ chunk x (activations of x1 and x2)
    try:
        cols = vmap(column, chunk_size=min(n2 * k2, _NTK_VECTOR_CHUNK))(basis)  # (n2 k2, n1, k1)
    except NotImplementedError as exc:
        if "forward AD" not in str(exc) and "forward-mode" not in str(exc):
            raise
        raise NotImplementedError(
            "implementation='ntk_vector' needs forward-mode AD (jvp) through every operation of the model, and "
            f"torch has none for one of them ({exc}). Use implementation='jacobian' or 'structured' (or 'auto', "
            "which never picks a method the model cannot run).") from None
    return cols.reshape(n2, k2, cols.shape[1], cols.shape[2]).permute(2, 0, 3, 1)  # (n1, n2, k_a, k_b)


def _accumulator_edges(root, target: Mapping[int, str], stop=None) -> tuple[dict[str, int], set]:
    """Edges from the autograd graph below ``root`` into the gradient accumulators of ``target`` (id of the
    leaf tensor -> name), not descending below the node ``stop``; and the set of nodes visited."""
    edges = dict.fromkeys(target.values(), 0)
    seen, stack = set(), [root] if root is not None else []
    while stack:
        node = stack.pop()
        if node is None or node in seen or node is stop:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                nm = target.get(id(var))
                if nm is not None:
                    edges[nm] += 1
            elif nxt not in seen:
                stack.append(nxt)
    return edges, seen


def _unrecorded_uses(out: torch.Tensor, leaf: Mapping[str, torch.Tensor], calls, names, pid) -> set[str]:
    """Parameters of ``names`` that the autograd graph of ``out`` uses anywhere but inside the recorded
    layer calls that ``out`` depends on -- ``x @ layer.weight`` elsewhere, a chunk of attention's packed
    projection used on its own, a ``torch.where`` that routes some samples around the layer (while a
    detached call of the same layer contributes nothing). Counts the edges into each parameter's gradient
    accumulator in the whole graph and inside the reachable recorded calls (from the call's output node down
    to its input's node): they must agree. Structural, exact, and cheap (walks over the graph's nodes)."""
    target = {id(leaf[nm]): nm for nm in names if nm in leaf}
    total, reachable = _accumulator_edges(out.grad_fn, target)
    inside = dict.fromkeys(total, 0)
    for call in calls:
        a, o = call.a, call.o
        if o.grad_fn is None or o.grad_fn not in reachable:
            continue  # a call the output does not depend on (detached, under no_grad, ...)
        counts, _ = _accumulator_edges(o.grad_fn, target, stop=a.grad_fn)
        for nm, c in counts.items():
            inside[nm] += c
    return {nm for nm in total if total[nm] != inside[nm]}


def _structured_features(fwd: _Forward, params, x: Inputs, model: nn.Module, names: set[str], k: int | None = None):
    """One forward of the batch with hooks, and k + 1 backward passes through its graph.

    Returns ``(feats, uses, k, ok)``: ``feats[c]`` the rule's data for every recorded call (patches and
    cotangents, token ids and cotangents, or per-sample gradients; None for calls no parameter of ``ok``
    needs); ``ok`` the parameters of ``names`` that this very batch's autograd graph uses only through the
    recorded calls (:func:`_unrecorded_uses`), whose calls all have a batch layout confirmed by the row
    check and whose outputs the rule reproduces; ``uses[name] = [(c, is_weight, scale), ...]`` the calls in
    which each parameter of ``ok`` takes part (tied weights: several), with the parameterization's scale.

    The k cotangents of every layer output come from k + 1 ordinary backward passes through the one forward
    graph (kept between them): pass a (a < k) starts from output unit a on every sample, the last from random
    per-sample weights C (the row check: by linearity it must equal sum_a C_ia g_a on row i, which holds only
    if row i of the call depends on sample i alone). One forward instead of a forward of k + 1 stacked copies
    (k n F fewer multiply-adds; the graph of n samples, not of (k + 1) n, held), and the model's own batched
    kernels (a vmapped backward pass over k cotangents falls back to slow per-cotangent loops for several
    operations, e.g. max-pooling and batch norm)."""
    state = fwd.state
    if k is None:
        with torch.no_grad():
            k = fwd(params, x[:1]).shape[1]
    n = x.n
    reps = k + 1 if n > 1 else k
    for clone in ((True,) if state.get("clone") else (False, True)):
        # first without copying layer outputs; if an in-place operation downstream changed a recorded
        # output (its version counter moved), again with the hooks returning copies (remembered for the
        # next blocks); parameters as fresh leaves, so the hooked layers' outputs are graph nodes
        leaf_params = {k_: v.detach().requires_grad_(True) for k_, v in params.items()}  # views, no copy
        rec = Recorder(model, names, clone_outputs=clone, leaf_names={id(v): k_ for k_, v in leaf_params.items()})
        try:
            with torch.enable_grad(), rec.intercept():
                out = fwd(leaf_params, x)
        except BaseException:
            rec.remove()
            raise
        rec.active = False
        if clone or all(c.o._version == ver for c, ver in zip(rec.calls, rec.versions)):
            break
        state["clone"] = True
        rec.remove()
        del out
    pid = {id(v_): name for name, v_ in model.named_parameters()}
    if out.shape[1] != k:
        raise RuntimeError("the model's number of outputs changed between calls")
    # every use of each parameter in this block's own graph must be a recorded call (cheap edge count), and no
    # call may be one the rule cannot describe
    ok = set(names) - _unrecorded_uses(out, leaf_params, rec.calls, names, pid) - rec.bad_names(pid)
    for call in rec.calls:
        if call.rule is None:
            ok -= call.names
    # cotangents: pass a (a < k) starts from e_a on every sample; pass k (the row check) from random weights C
    gen = torch.Generator(device="cpu").manual_seed(4321)
    cw = torch.randn((n, k), generator=gen, dtype=torch.float64).to(out.dtype).to(out.device)
    wanted = [idx for idx, call in enumerate(rec.calls) if call.names & ok]
    grads: list = [None] * len(rec.calls)  # per call: (pass, *output shape)
    try:
        with torch.enable_grad():
            node_outs = [rec.calls[idx].o for idx in wanted]
            for a in range(reps if node_outs else 0):
                # a scalar root: torch.autograd.grad with explicit grad_outputs imports sympy on its first call
                # in a process (seconds), which a small model's kernel should not pay
                root = out[:, a].sum() if a < k else (out * cw).sum()
                got = torch.autograd.grad(root, node_outs, allow_unused=True, retain_graph=a < reps - 1)
                for idx, g in zip(wanted, got):
                    if g is None:  # no cotangent reaches this call from this output
                        if grads[idx] is not None:
                            grads[idx][a].zero_()
                        continue
                    if grads[idx] is None:  # nor from the passes before this one
                        grads[idx] = torch.empty((reps,) + tuple(g.shape), dtype=g.dtype, device=g.device)
                        grads[idx][:a].zero_()
                    grads[idx][a] = g
                del got, root
    finally:
        rec.remove()
    del out
    feats, uses = [], {}
    for idx, call in enumerate(rec.calls):
        o = call.o.detach()
        g_all = grads[idx]
        grads[idx] = None  # one call's cotangents at a time
        if not call.names & ok:
            feats.append(None)
            continue
        if g_all is None:
            g_all = torch.zeros((reps,) + tuple(o.shape), dtype=o.dtype, device=o.device)
        feat = None
        for lay in layouts(call, n):  # the first layout the row check confirms
            g = apply_layout(g_all, lay, n, offset=1)  # (pass, sample, ...)
            if reps > k:
                want = torch.einsum("ia,ai...->i...", cw, g[:k])
                got = g[k]
                scale = float(want.abs().max()) if want.numel() else 0.0
                if want.numel() and float((got - want).abs().max()) > torch.finfo(o.dtype).eps ** 0.5 * scale + 1e-300:
                    continue
            feat = features(call, apply_layout(call.a.detach(), lay, n), apply_layout(o, lay, n),
                            g[:k].transpose(0, 1), leaf_params)
            break
        del g_all
        if feat is None:  # no batch layout passes the checks, or the rule does not reproduce the output
            ok -= call.names
            feats.append(None)
            continue
        feats.append(feat)
        if call.w in ok:
            uses.setdefault(call.w, []).append((idx, True, call.ws))
        if call.b in ok:
            uses.setdefault(call.b, []).append((idx, False, call.bs))
    del grads
    # a tied parameter may fail at a later call; one used by calls of different rules goes to the Jacobian
    mixed = {name for name, u in uses.items() if len({feats[c][0] if feats[c] is not None else None
                                                      for c, _, _ in u}) != 1}
    ok -= mixed
    uses = {name: u for name, u in uses.items() if name in ok}
    return feats, uses, k, ok


def _features_in_passes(fwd: _Forward, params, x: Inputs, model, names: set[str], k, pass_batch):
    """:func:`_structured_features` of a block whose forward/backward passes run on sub-batches of at most
    ``pass_batch`` samples (so that a sub-batch's graph fits the budget while the block's
    features, and so the pairs contracted at once, stay large); the features are concatenated over the
    sub-batches, a parameter counts as structured only if every sub-batch confirms it with the same calls."""
    if pass_batch is None or x.n <= pass_batch:
        return _structured_features(fwd, params, x, model, names, k)
    parts = [_structured_features(fwd, params, x[i:i + pass_batch], model, names, k)
             for i in range(0, x.n, pass_batch)]
    feats0, uses0, k, ok = parts[0]
    if any(len(p[0]) != len(feats0) for p in parts):  # the sub-batches recorded different calls
        return _structured_features(fwd, params, x, model, names, k)
    for _, uses, _, ok_p in parts[1:]:
        ok = ok & ok_p
        ok -= {nm for nm in ok if uses.get(nm) != uses0.get(nm)}
    feats = []
    for i, f0 in enumerate(feats0):
        fs = [p[0][i] for p in parts]
        if any(f is None or f[0] != f0[0] for f in fs):
            feats.append(None)
            bad = {nm for nm, u in uses0.items() if any(c == i for c, _, _ in u)}
            ok -= bad
            continue
        feats.append((f0[0],) + tuple(torch.cat([f[j] for f in fs]) for j in range(1, len(f0))))
        for p in parts:  # the sub-batches' copies go as soon as they are concatenated
            p[0][i] = None
        del fs
    del parts
    uses = {nm: u for nm, u in uses0.items() if nm in ok}
    return feats, uses, k, ok


def _ntk_structured(fwd: _Forward, fwd2, params, x1: Inputs, x2: Inputs | None, model,
                    output: str = "full", verified: set | None = None, pass_batch: int | None = None,
                    chunk: int = GRAD_CHUNK):
    """Structured derivatives (Novak et al. 2022, Sec. 3-4), reduced to ``output`` as it goes; the
    weight-sharing routes hold at most ~``chunk`` numbers of temporaries at a time."""
    if verified is None:
        rec = Recorder(model, params)
        verified = set(rec.covered)
        rec.remove()
    covered = set(verified)
    if not covered:  # nothing the structured path can take: Jacobian contraction for everything
        return _ntk_jacobian(fwd, fwd2, params, x1, x2, independent=True, output=output)
    same = x2 is None and fwd2 is fwd
    feats1, uses1, k, ok1 = _features_in_passes(fwd, params, x1, model, covered, None, pass_batch)
    if same:
        feats2, uses2, ok2 = feats1, uses1, ok1
    else:
        feats2, uses2, _, ok2 = _features_in_passes(fwd2, params, x1 if x2 is None else x2, model, covered, None,
                                                    pass_batch)
    covered = ok1 & ok2  # verified on both blocks' own data
    uses1 = {name: u for name, u in uses1.items() if name in covered}
    feats_rule = {name: next(iter({rec_rule(feats1[c]) for c, _, _ in u})) for name, u in uses1.items()}
    n1, n2 = x1.n, (x1 if x2 is None else x2).n
    theta = None
    cache: dict = {}
    routes: dict = {}
    param_routes: dict = {}
    for name, us1 in uses1.items():
        for c1, weight, s1 in us1:
            for c2, _, s2 in uses2.get(name, ()):
                term = pair_term(feats1[c1], feats2[c2], weight, output, cache, (c1, c2), routes, chunk)
                if weight and (c1, c2) in routes:
                    param_routes.setdefault(name, set()).add(routes[c1, c2])
                scale = s1 * s2
                if theta is None:
                    theta = term * scale if scale != 1.0 else term.clone()
                else:
                    theta.add_(term, alpha=scale)
                del term
    del feats1, feats2, cache
    rest = {k_: v for k_, v in params.items() if k_ not in covered}
    if _METHOD_LOG is not None:
        rules = {nm: feats_rule[nm] for nm in uses1}
        _METHOD_LOG.append({nm: ("structured:" + rules.get(nm, "unused")) if nm in covered else "jacobian" for nm in params})
    if _ROUTE_LOG is not None:  # the route of each weight-sharing weight ("positions" or "jacobian")
        _ROUTE_LOG.append({nm: "+".join(sorted(r)) for nm, r in param_routes.items()})
    if rest:  # parameters without known structure: Jacobian contraction over just those
        f1 = fwd_rest(fwd, params, rest)
        f2 = f1 if fwd2 is fwd else fwd_rest(fwd2, params, rest)
        term = _ntk_jacobian(f1, f2, rest, x1, x2, independent=True, output=output)
        theta = term if theta is None else theta.add_(term)
    if theta is None:
        with torch.no_grad():
            k2 = k if same else fwd2(params, (x1 if x2 is None else x2)[:1]).shape[1]
        shape = {"full": (n1, n2, k, k2), "diagonal": (n1, n2, k), "trace": (n1, n2)}[output]
        theta = torch.zeros(shape, dtype=next(iter(params.values())).dtype, device=x1.leaves[0].device)
    return theta


def rec_rule(feat) -> str:
    return {"dense": "linear/conv", "embedding": "embedding", "grad": "norm"}[feat[0]]


def fwd_rest(fwd: _Forward, params, rest):
    """The forward as a function of the parameters in ``rest`` only (the others held fixed)."""
    fixed = {k: v for k, v in params.items() if k not in rest}

    class _F:
        def __call__(self, p, x, leaves=None):
            return fwd({**fixed, **p}, x, leaves)

    return _F()


# ---------------------------------------------------------------------------------------------------
def _has_train_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def _samples_independent(fwd: "_Forward", params, t1: Inputs, t2: Inputs | None) -> bool:
    """Whether the model treats the samples of a batch independently: the output of a small batch must
    equal the outputs of its samples run one at a time (to sqrt(eps) relative). Batch-coupled models
    (train-mode BatchNorm, normalisation over the batch, ...) fail; structured derivatives and
    per-sample Jacobians are exact only for independent samples, so ``auto`` must know."""
    parts = [t1[:2]] + ([t2[:1]] if t2 is not None and t1.compatible(t2) else [])
    probe = Inputs.cat(parts)
    if probe.n < 2:
        return True  # a single sample: nothing to couple
    try:
        with torch.no_grad():
            together = fwd(params, probe)
            apart = torch.cat([fwd(params, probe[i:i + 1]) for i in range(probe.n)])
    except (RuntimeError, ValueError):  # e.g. train-mode BatchNorm refuses a batch of one
        return False
    if together.shape != apart.shape:
        return False
    scale = float(together.abs().max())
    tol = torch.finfo(together.dtype).eps ** 0.5 * max(scale, 1e-30)
    return bool((together - apart).abs().max() <= tol)


def peak_memory_estimate(implementation: str, n1: int, n2: int, k: int, n_params: int, width_sum: int,
                         itemsize: int = 8, *, activations: int = 0, inputs_sum: int = 0,
                         max_grad: int = 0, k2: int | None = None, symmetric: bool = False,
                         pair_positions: int = 0, pair_width: int = 0, pass_batch: int | None = None,
                         dense_layers: tuple | None = None, chunk: int = GRAD_CHUNK) -> int:
    """Documented peak-memory model (bytes) of one block, used by ``auto``, the block sizes and the budget
    check. n1, n2 samples and k (x1 side) and k2 (x2 side, default k) output units per block; P parameters;
    A = ``activations``, numbers the autograd graph of one sample saves (measured on the probe forward);
    W = ``width_sum``, the structured layers' output numbers per sample; I = ``inputs_sum``, their input
    (patch) numbers per sample; ``pass_batch``: samples per forward/backward pass of the structured path
    (default m; the passes of a block run in sub-batches of this size); ``dense_layers``: (L, d, c) of each
    weight-sharing layer, whose route (:func:`ntkit.empirical._rules.dense_route`) decides which temporaries
    count (without it, the maxima below); ``pair_positions`` (L^2) and ``pair_width`` (L c) the largest of the
    weight-sharing layers (positions L, output channels c); M = ``max_grad``, the largest per-sample weight
    gradient a shared-position layer forms; m = max(n1, n2); ``chunk`` the numbers a weight-sharing route
    holds at a time (:func:`ntkit.empirical._rules.pair_term`). ``symmetric``: a diagonal block of a kernel
    with x2=None, whose structured features are computed once (the n2 terms drop out).

    * jacobian:   max(2 n1 k, n1 k + 2 n2 k2) P (both Jacobians, each formed per parameter and then
      concatenated; 2 n1 k P for a diagonal block of x2=None) + m (1 + k) A (vmapped backward passes) + result
    * ntk_vector: min(n2 k2, 32) (P + (n1 + n2) A) (chunks of vmapped products) + result
    * structured: 2 m A (the graph of the block's forward, kept for its k + 1 backward passes, and one of them) +
      1.25 ((k + 1) n1 + (k2 + 1) n2) W (the cotangents of all recorded outputs from those passes, and
      the copies a layer's rule makes) + (n1 + n2) I (inputs) + the larger of the two routes' temporaries,
      one layer at a time: per-layer Jacobian rows of a slice of the weight for all samples of both sides with
      their cotangent copy, (n1 k + n2 k2)(d + L) c numbers when they fit ``chunk``, else slices of at most
      ``chunk`` (:func:`ntkit.empirical._rules.jacobian_numbers`), or the position route's row chunks,
      min(max(chunk, n2 Q), n1 n2 Q) with Q = L^2 + 2 k L c (``dense_layers``; without it the maxima
      ``pair_positions``, ``pair_width`` and ``max_grad``) + the route's partial Gram matrix and the result;
      a diagonal block of x2=None computes one side (the n2 terms drop out); m in the first term is
      min(m, ``pass_batch``)
    * result:     n1 n2 k k2
    """
    k2 = k if k2 is None else k2
    out = n1 * n2 * k * k2
    m = max(n1, n2)
    kk = max(k, k2)
    pos, grad = 0, 0
    ch = max(int(chunk), 1)
    sym = symmetric and implementation == "structured"
    if dense_layers is None:  # sizes given as maxima only
        if pair_positions:
            per_row = n2 * (pair_positions + 2 * kk * pair_width)
            pos = min(max(ch, per_row), n1 * per_row)
        if max_grad:
            grad = min(max(ch, 2 * m * kk), (n1 * k + (0 if sym else n2 * k2)) * 2 * max_grad)
    for L, d, c in dense_layers or ():  # the temporaries of the route each weight-sharing layer takes
        routes = {dense_route(n1, n2, k, k2, L, L, d, c, o, symmetric) for o in ("full", "trace")}
        if "positions" in routes:
            per_row = n2 * (L * L + 2 * kk * L * c)
            pos = max(pos, min(max(ch, per_row), n1 * per_row))
        if "jacobian" in routes:
            grad = max(grad, jacobian_numbers(n1, k, L, n2, k2, L, d, c, sym, ch))
    if pos or grad:
        pos, grad = max(pos, grad) + out, 0  # one layer's route at a time, and its partial Gram matrix
    mp = m if pass_batch is None else min(m, pass_batch)
    if symmetric and implementation == "structured":  # a diagonal block of x2=None: one side's features
        return itemsize * (2 * mp * activations + (5 * n1 * (k + 1) * width_sum) // 4 + n1 * inputs_sum
                           + grad + pos + out)
    if implementation == "jacobian":
        # each side's Jacobian per parameter, then concatenated: twice one side's size while it is formed
        jac = max(2 * n1 * k, n1 * k + 2 * n2 * k2) if not symmetric else 2 * n1 * k
        return itemsize * (jac * n_params + m * (1 + max(k, k2)) * activations + out)
    if implementation == "ntk_vector":
        return itemsize * (min(n2 * k2, _NTK_VECTOR_CHUNK) * (n_params + (n1 + n2) * activations) + out)
    return itemsize * (2 * mp * activations + (5 * (n1 * (k + 1) + n2 * (k2 + 1)) * width_sum) // 4
                       + (n1 + n2) * inputs_sum + grad + pos + out)


def _model_inputs(model, x1, x2, batch_dim):
    """(t1, t2 or None, dtype, device): both inputs prepared (sequence lists padded alike, every leaf checked)
    in the dtype and on the device of the model's first floating-point parameter."""
    first = next(iter(model.parameters()), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.get_default_dtype()
    device = first.device if first is not None else None
    x1, x2 = sequence_pair(x1, x2, dtype=dtype, device=device)
    t1 = prepare_inputs(x1, "x1", dtype=dtype, device=device, batch_dim=batch_dim)
    t2 = None if x2 is None else prepare_inputs(x2, "x2", dtype=dtype, device=device, batch_dim=batch_dim)
    if t2 is not None:
        check_pair_inputs(t1, t2)
    return t1, t2, dtype, device


def empirical_ntk(
    model: nn.Module,
    x1: Any,
    x2: Any = None,
    *,
    output: str = "trace",
    implementation: str = "auto",
    params: Iterable[str] | None = None,
    batch_size: int | None = None,
    output_batch_size: int | None = None,
    memory_budget: float | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    batch_dim: Any = 0,
    progress: bool | None = None,
) -> torch.Tensor:
    """Empirical NTK Theta(x1, x2) of ``model`` at its current parameters.

    Parameters
    ----------
    model : nn.Module
        Any module whose forward takes a batch and returns a tensor (n, ...); trailing output dimensions
        are flattened into k output units. The model is never modified (parameters, buffers, train/eval
        mode and requires_grad flags are left exactly as they were). Parameters are substituted through
        ``torch.func.functional_call``: a tensor derived from a parameter and cached as a plain attribute
        outside ``forward`` (e.g. ``self.wT = self.l.weight.T`` in ``__init__``) is not differentiated --
        derive it inside ``forward``.
    x1, x2 : the inputs, n1 and n2 samples; ``x2=None`` means ``x1`` (and exploits symmetry).
        A tensor (or array) is the model's one positional argument; a tuple is unpacked as positional
        arguments (``model(*x)``), a dict as keyword arguments (``model(**x)``: ``input_ids`` with
        ``attention_mask``, say); tuples, lists and dicts nest (a model taking one dict: ``x1=(batch,)``).
        Integer and boolean tensors (token ids, masks) are fine: the kernel is a derivative with respect
        to the parameters. Every tensor leaf holds the batch along ``batch_dim``; x2 must have x1's
        structure and per-sample shapes. Floating leaves are cast to the parameters' dtype and checked for
        NaN/Inf rows. Variable-length sequences (the finite twin of a recurrent architecture): a list of
        (T_i, d) arrays of different lengths or :class:`~ntkit.Sequences`, zero-padded to one length
        (errors name the empty / non-finite sequence and time step).
    output : {"trace", "full", "diagonal"}
        (n1, n2) mean over output units of Theta_aa; (n1, n2, k, k); or (n1, n2, k).
    implementation : {"auto", "jacobian", "ntk_vector", "structured"}
        See the module docstring. ``auto`` takes the cheapest valid path by the FLOP model
        :func:`cost_estimate` among those that fit the memory budget (:func:`peak_memory_estimate`);
        the structured path is valid when the samples of a batch do not interact (checked on a
        probe batch). All paths return the same numbers.
    params : iterable of parameter names, optional
        Restrict the kernel to these parameters (e.g. ``["body.4.weight"]``); by default all
        parameters with ``requires_grad=True`` (frozen ones are excluded). Tied weights count once.
    batch_size : int, optional
        Samples of x1 and x2 per block (default: chosen from the memory budget).
    output_batch_size : int, optional
        Output units per block (default: chosen from the memory budget; all k when they fit). With
        ``output="full"`` every pair of output blocks is computed; otherwise only the diagonal ones.
    memory_budget : float, optional
        Bytes the computation may use: the result plus one block's peak
        (:func:`peak_memory_estimate`); default half of the available memory. Blocks over samples and
        over outputs are made small enough to fit; ``MemoryBudgetError`` when even one sample and one
        output unit do not.
    model_kwargs : mapping, optional
        Keyword arguments passed unchanged to every call of ``model.forward`` (not batched).
    batch_dim : int or structure, optional
        Batch axis of the tensor leaves of x1/x2 (default 0), or a structure like x1 holding an axis or
        None per leaf (None: the tensor is passed whole to every call, e.g. a shared mask).
    progress : bool, optional
        A progress bar over the blocks (drawn only on a terminal; False silences it).

    References
    ----------
    Jacot, Gabriel & Hongler (2018), Eq. (3); Novak et al. (2022), "Fast finite width neural tangent
    kernel", Sec. 3-4 (structured derivatives).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    for nm, val in (("batch_size", batch_size), ("output_batch_size", output_batch_size)):
        if val is not None and (isinstance(val, bool) or int(val) != val or val < 1):
            raise ValueError(f"{nm} must be a positive integer, got {val!r}")
    t1, t2, dtype, device = _model_inputs(model, x1, x2, batch_dim)
    chosen = _select_params(model, params)
    snap = _snapshot(model)
    try:
        with _no_fast_path():
            return _empirical_ntk(model, t1, t2, chosen, output, implementation, batch_size, output_batch_size,
                                  memory_budget, model_kwargs, progress, dtype, device)
    finally:
        _restore_check(model, snap)


def _probe(fwd: _Forward, chosen, model, x: Inputs):
    """One forward with the structured layers recorded and the autograd graph's saved tensors counted:
    (output, recorded calls, saved bytes)."""
    seen: dict = {}
    # the parameters are saved by the graph too, but once, not per sample: not activations
    shared = {(p.untyped_storage().data_ptr(), p.device) for p in model.parameters()}

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            if key in shared:
                return t
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, nested, ...)
            pass
        return t

    leaf = {k: v.detach().requires_grad_(True) for k, v in chosen.items()}
    rec = Recorder(model, leaf, clone_outputs=False, grad_only=False,
                   leaf_names={id(v): k for k, v in leaf.items()})
    try:
        with torch.enable_grad(), rec.intercept(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fwd(leaf, x)
    finally:
        rec.remove()
    if any(c.o._version != ver for c, ver in zip(rec.calls, rec.versions)):
        fwd.state["clone"] = True  # an in-place operation changes a layer output: the blocks copy outputs
    calls = [Call(c.rule, c.module, c.a.detach(), c.o.detach(), c.w, c.b, extra=c.extra) for c in rec.calls]
    return out.detach(), calls, sum(seen.values())


def _empirical_ntk(model, t1: Inputs, t2: Inputs | None, chosen, output, implementation, batch_size,
                   output_batch_size, memory_budget, model_kwargs, progress_flag, dtype, device):
    fwd = _Forward(model, chosen, model_kwargs)
    coupled_bn = _has_train_batchnorm(model)
    try:
        probe_x = t1 if coupled_bn else t1[:1]
        probe, calls, saved = _probe(fwd, chosen, model, probe_x)
    except (TypeError, ValueError):
        raise
    except RuntimeError as exc:
        raise ValueError(f"the model rejected {t1.describe()}: {exc}") from None
    independent = not coupled_bn and _samples_independent(fwd, chosen, t1, t2)
    k = probe.shape[1]
    n1 = t1.n
    n2 = n1 if t2 is None else t2.n
    n_params = sum(v.numel() for v in chosen.values())
    item = torch.finfo(dtype).bits // 8
    sizes = _layer_sizes(calls, probe_x.n)
    sizes["activations"] = -(-saved // (item * probe_x.n))

    width_sum, layer_flops = sizes.pop("width"), sizes.pop("flops")
    budget = 0.5 * available_memory_bytes(device) if memory_budget is None else float(memory_budget)
    if not budget > 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    out_full = output == "full"
    shape = (n1, n2, k, k) if out_full else (n1, n2, k) if output == "diagonal" else (n1, n2)
    result_bytes = item * int(torch.Size(shape).numel())
    if result_bytes > budget:
        raise MemoryBudgetError(
            f"the result alone ({output!r}, shape {shape}) needs {format_bytes(result_bytes)}, more than the budget "
            f"{format_bytes(budget)}; ask for output='trace' or 'diagonal', fewer inputs, or raise memory_budget")
    left = budget - result_bytes
    impl = implementation
    if impl == "auto":
        impl = _choose(independent, n1, n2, k, n_params, width_sum, layer_flops, item, left, sizes)
    elif impl == "structured" and not independent:
        raise ValueError("implementation='structured' assumes the model treats the samples of a batch "
                         "independently, but its output for a batch differs from its outputs for the samples "
                         "one at a time (train-mode BatchNorm, batch normalisation, dropout, ...). Use "
                         "implementation='jacobian' (or 'auto'), or call model.eval() first.")
    verified = None
    if impl == "structured":  # the parameters of supported layers; each block checks them on its own graph
        rec_s = Recorder(model, chosen)
        verified = set(rec_s.covered)
        rec_s.remove()

    pass_batch = None
    if impl == "structured" and sizes["activations"] > 0:
        # the forward/backward passes of a block run on sub-batches whose graph (and a backward pass through it)
        # takes at most a quarter of the budget: blocks are then sized by the features they keep, not by the
        # graph (fewer, larger blocks, so fewer recomputed passes)
        pass_batch = max(1, int(0.25 * left // (item * 2 * sizes["activations"])))
    if impl == "structured" and _PASS_BATCH is not None:
        pass_batch = _PASS_BATCH

    def need(b, kc, ch=GRAD_CHUNK):
        return peak_memory_estimate(impl, min(b, n1), min(b, n2), kc, n_params, width_sum, item, **sizes,
                                    symmetric=t2 is None and b >= n1 and kc >= k, pass_batch=pass_batch, chunk=ch)

    bs = batch_size if batch_size is not None else max(n1, n2)
    kc = output_batch_size if output_batch_size is not None else k
    if not independent:  # the samples interact (e.g. batch statistics): the batch is one block
        bs = max(n1, n2)
    free_bs = batch_size is None and independent
    free_kc = output_batch_size is None
    while need(bs, kc) > left:  # halve the sample blocks down to 8, then the output blocks, then samples again
        if free_bs and bs > 8:
            bs = (bs + 1) // 2
        elif free_kc and kc > 1:
            kc = (kc + 1) // 2
        elif free_bs and bs > 1:
            bs = (bs + 1) // 2
        else:
            break
    kc = min(kc, k)
    # the weight-sharing routes' chunk: blocks are planned with the default; a budget too small for it shrinks
    # it, and whatever the blocks leave of the budget grows it (fewer, larger products: a Gram matrix of a
    # layer's Jacobian rows over all samples of the block at once)
    chunk = GRAD_CHUNK
    while chunk > MIN_CHUNK and need(bs, kc, chunk) > left:
        chunk //= 2
    if impl == "structured" and need(bs, kc, chunk) <= left:
        top = need(bs, kc, 1 << 62)  # the most the routes can use
        while need(bs, kc, chunk) < top and need(bs, kc, 2 * chunk) <= left:
            chunk *= 2
    if _GRAD_CHUNK is not None:
        chunk = _GRAD_CHUNK
    if need(bs, kc, chunk) > left:
        raise MemoryBudgetError(
            f"one block of the empirical NTK ({impl}, {min(bs, n1)} x {min(bs, n2)} inputs, {kc} of k={k} outputs, "
            f"{n_params} parameters) needs ~{format_bytes(need(bs, kc, chunk))} besides the result "
            f"({format_bytes(result_bytes)}), more than the budget {format_bytes(budget)}; select fewer parameters "
            "(params=), pass smaller batch_size/output_batch_size, or raise memory_budget")
    outs = [slice(a, min(a + kc, k)) for a in range(0, k, kc)]
    fwds = {(s.start, s.stop): (fwd if len(outs) == 1 else fwd.sliced(s)) for s in outs}
    opairs = [(a, b) for a in outs for b in outs] if out_full else [(a, a) for a in outs]
    result = torch.zeros(shape, dtype=dtype, device=t1.leaves[0].device)
    blocks = [(i0, j0) for i0 in range(0, n1, bs) for j0 in range(i0 if t2 is None else 0, n2, bs)]
    bar = progress(total=len(blocks) * len(opairs), desc="empirical NTK", unit="block", enabled=progress_flag)
    try:
        for i0, j0 in blocks:
            a = t1[i0:i0 + bs]
            same_block = t2 is None and i0 == j0
            b = None if same_block else (t1 if t2 is None else t2)[j0:j0 + bs]
            nb = a.n if b is None else b.n
            ri, rj = slice(i0, i0 + a.n), slice(j0, j0 + nb)
            for oa, ob in opairs:
                f1, f2 = fwds[oa.start, oa.stop], fwds[ob.start, ob.stop]
                block = _block(impl, f1, f2, chosen, a, b, model, independent, output, verified, pass_batch,
                               chunk)
                if out_full:
                    result[ri, rj, oa, ob] = block
                    if t2 is None and not same_block:
                        result[rj, ri, ob, oa] = block.transpose(0, 1).transpose(2, 3)
                elif output == "diagonal":
                    result[ri, rj, oa] = block
                    if t2 is None and not same_block:
                        result[rj, ri, oa] = block.transpose(0, 1)
                else:
                    w = (oa.stop - oa.start) / k
                    result[ri, rj] += block * w if len(outs) > 1 else block
                    if t2 is None and not same_block:
                        result[rj, ri] += block.transpose(0, 1) * w if len(outs) > 1 else block.transpose(0, 1)
                del block
                bar.update(1)
    finally:
        bar.close()
    return result


def _block(impl, fwd, fwd2, params, a, b, model, independent, output, verified=None, pass_batch=None,
           chunk=GRAD_CHUNK):
    """One block of the kernel, already reduced to ``output``."""
    if impl == "jacobian":
        return _ntk_jacobian(fwd, fwd2, params, a, b, independent, output)
    if impl == "ntk_vector":
        return _reduce(_ntk_vector(fwd, fwd2, params, a, b), output)
    return _ntk_structured(fwd, fwd2, params, a, b, model, output, verified, pass_batch, chunk)


def _layer_sizes(calls, n: int) -> dict:
    """Sizes for the cost models, from the structured layers' calls recorded on a probe forward (n samples):
    width W = output numbers per sample (cotangents kept per output unit), inputs_sum = input/patch numbers
    per sample, max_grad = the largest per-sample weight gradient of a shared-position layer, flops F =
    forward FLOPs per sample (2 x positions x fan-in x fan-out)."""
    width, flops, inputs, max_grad, pair_positions, pair_width = 0, 0, 0, 0, 0, 0
    dense = set()
    for call in calls:
        if call.a.numel() == 0 or call.o.numel() == 0 or call.rule is None:
            continue  # a layer that saw none of the probe's samples (routing)
        try:
            w, f, i, m, pl, pc = feature_sizes(call, n)
        except (RuntimeError, ValueError, NotImplementedError):
            continue
        width, flops, inputs, max_grad = width + w, flops + f, inputs + i, max(max_grad, m)
        pair_positions, pair_width = max(pair_positions, pl * pl), max(pair_width, pl * pc)
        if pl:
            dense.add((pl, m // max(pc, 1), pc))
    return {"width": max(width, 1), "flops": max(flops, 1), "inputs_sum": inputs, "max_grad": max_grad,
            "pair_positions": pair_positions, "pair_width": pair_width, "dense_layers": tuple(sorted(dense))}


def cost_estimate(implementation: str, n1: int, n2: int, k: int, n_params: int, layer_flops: int,
                  width_sum: int, independent: bool = True) -> float:
    """Documented FLOP model of one (n1 x n2) block, used by ``auto`` together with the memory model.

    F = forward FLOPs per sample (structured layers, plus 2 per other parameter); W = the structured
    layers' sizes as in :func:`peak_memory_estimate`.

    * jacobian:   (n1 + n2) k 3F  (one backward per sample and output; x (n1 + n2) if the samples are
      coupled and the whole batch is differentiated) + 2 n1 n2 k^2 P (the contraction)
    * ntk_vector: n2 k (n1 + n2) 3F (a vjp over x2 and a jvp over x1 per cotangent)
    * structured: (n1 + n2)(k + 2) F (a forward, k + 1 backwards of cotangents only) + 2 n1 n2 k^2 W
      (per-layer contractions of inputs and cotangents)
    """
    f = float(layer_flops) + 2.0 * n_params
    if implementation == "jacobian":
        passes = (n1 + n2) * k * 3 * f * (1 if independent else (n1 + n2))
        return passes + 2.0 * n1 * n2 * k * k * n_params
    if implementation == "ntk_vector":
        return n2 * k * (n1 + n2) * 3 * f
    return (n1 + n2) * (k + 2) * f + 2.0 * n1 * n2 * k * k * width_sum


def _choose(independent, n1, n2, k, n_params, width_sum, layer_flops, item, budget, sizes=None) -> str:
    """``auto``: the cheapest valid implementation (FLOP model) among those whose block fits the budget
    (memory model); structured derivatives only when the samples are independent."""
    cands = (["structured"] if independent else []) + ["jacobian", "ntk_vector"]
    b1, b2 = min(n1, 256), min(n2, 256)
    sizes = sizes or {}

    def fits(m):
        return peak_memory_estimate(m, min(n1, 16), min(n2, 16), min(k, 16), n_params, width_sum, item,
                                    **sizes, pass_batch=1 if m == "structured" else None) <= budget

    ok = [m for m in cands if fits(m)] or cands
    return min(ok, key=lambda m: cost_estimate(m, b1, b2, k, n_params, layer_flops, width_sum, independent))


def empirical_nngp(model: nn.Module, x1: Any, x2: Any = None, *, model_kwargs: Mapping | None = None,
                   batch_dim: Any = 0) -> torch.Tensor:
    """f(x1) f(x2)^T / k: the outer product of the outputs averaged over the k output units -- a
    one-sample estimate of the NNGP kernel (Lee et al. 2018) for a network at initialization. Inputs of
    any structure, as for :func:`empirical_ntk`."""
    t1, t2, _, _ = _model_inputs(model, x1, x2, batch_dim)
    t2 = t1 if t2 is None else t2

    def run(t):
        args, kwargs = t.call()
        return model(*args, **{**(model_kwargs or {}), **kwargs}).reshape(t.n, -1)

    with torch.no_grad():
        f1 = run(t1)
        f2 = f1 if x2 is None else run(t2)
    return f1 @ f2.T / f1.shape[1]
