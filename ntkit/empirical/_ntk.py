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
  shared). Parameters of any other module fall back to the Jacobian method, restricted to them.
  Memory ~ (n1 + n2) k (sum of layer widths x positions) numbers. Valid when samples do not interact;
  ``"auto"`` checks that by comparing the model's output on a small batch with its outputs on the same
  samples one at a time (train-mode BatchNorm, normalisation over the batch or dropout fail the check),
  and then uses the Jacobian or NTK-vector method on the whole batch instead. The structured rule takes
  the parameters of nn.Linear, nn.Conv1d/2d and ntkit's Dense layers running their own ``forward`` (not
  overridden, no user hooks); every block then checks, on its own autograd graph, that (i) each such
  parameter is used only through recorded layer calls (edge count into its gradient accumulator: no
  ``x @ layer.weight`` elsewhere, no attention ``out_proj`` used through ``F.linear``, no ``torch.where``
  routing some samples around the layer), (ii) every call sees the batch along its first axis, and (iii)
  row p of every recorded output belongs to sample p (a random per-sample cotangent must reach row p
  scaled by its own weight: sorting or permuting the batch inside the model fails it). In-place operations
  on recorded outputs are detected by version counter and the block is recomputed on copies; calls under
  ``no_grad`` do not count. Any parameter that fails goes to the Jacobian method for that block.

``"auto"`` chooses the implementation with the smallest FLOP count (:func:`cost_estimate`) among the
valid ones whose block fits the memory budget (:func:`peak_memory_estimate`); every choice returns the
same numbers (to rounding), so ``auto`` cannot be wrong the way a fast path with an unchecked
assumption can.

``output="trace"`` (default) returns (n1, n2): the mean over output units of Theta_aa, which is the
per-output kernel in the infinite-width limit; ``"full"`` (n1, n2, k, k); ``"diagonal"`` (n1, n2, k).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from .._validation import MemoryBudgetError, as_float_tensor, available_memory_bytes, format_bytes
from ..kernels.layers import DenseModule

__all__ = ["empirical_ntk", "empirical_nngp", "IMPLEMENTATIONS", "OUTPUTS", "peak_memory_estimate",
           "cost_estimate"]

IMPLEMENTATIONS = ("auto", "jacobian", "ntk_vector", "structured")
OUTPUTS = ("trace", "full", "diagonal")
_NTK_VECTOR_CHUNK = 32


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


class _Forward:
    """f(params, x) -> (n, k) through functional_call on a copy of the buffers (so train-mode
    BatchNorm running statistics of the user's model are never updated)."""

    def __init__(self, model: nn.Module, params: Mapping[str, torch.Tensor], model_kwargs: Mapping | None):
        self.model = model
        self.names = list(params)
        self.fixed = {k: v.detach() for k, v in model.named_parameters() if k not in params}
        self.buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
        self.kwargs = dict(model_kwargs or {})

    def __call__(self, p: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        # fresh buffer copies per call: a train-mode BatchNorm updates its running statistics in place,
        # which must touch neither the user's model nor a tensor captured by a torch.func transform
        buffers = {k: v.clone() for k, v in self.buffers.items()}
        out = functional_call(self.model, ({**self.fixed, **p}, buffers), (x,), self.kwargs,
                              tie_weights=True, strict=False)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model returned {type(out).__name__}, not a tensor; wrap it so that forward "
                            "returns the output tensor (n, ...) to differentiate")
        if out.ndim == 0 or out.shape[0] != x.shape[0]:
            raise ValueError(f"the model output has shape {tuple(out.shape)}; its first dimension must be the "
                             f"batch ({x.shape[0]})")
        return out.reshape(out.shape[0], -1)


def _reduce(theta_full: torch.Tensor, output: str) -> torch.Tensor:
    if output == "full":
        return theta_full
    diag = torch.diagonal(theta_full, dim1=2, dim2=3)  # (n1, n2, k)
    return diag if output == "diagonal" else diag.mean(-1)


# ---------------------------------------------------------------------------------------------------
# implementations on one block of inputs: each returns (n1, n2, k, k)
# ---------------------------------------------------------------------------------------------------
def _flat_jacobian(fwd: _Forward, params, x, independent: bool = False) -> torch.Tensor:
    """J(x) as (n, k, P). With independent samples, one Jacobian per sample (``vmap`` of ``jacrev`` of the
    single-sample function: cost linear in n); otherwise ``jacrev`` of the whole batch (n k backward
    passes over the batch: quadratic in n, but exact when samples interact, e.g. train-mode BatchNorm)."""
    jac = None
    if independent and x.shape[0] > 1:
        def single(p, xi):
            return fwd(p, xi.unsqueeze(0))[0]
        try:
            jac = vmap(jacrev(single), in_dims=(None, 0))(params, x)  # name -> (n, k, *shape)
        except (RuntimeError, ValueError, TypeError, NotImplementedError):
            jac = None  # an operation without a batching rule, or batched keyword tensors: whole-batch path
    if jac is None:
        jac = jacrev(fwd)(params, x)  # name -> (n, k, *shape)
    n, k = next(iter(jac.values())).shape[:2]
    return torch.cat([j.reshape(n, k, -1) for j in jac.values()], dim=-1)  # (n, k, P)


def _ntk_jacobian(fwd, params, x1, x2, independent=False, output="full"):
    j1 = _flat_jacobian(fwd, params, x1, independent)
    j2 = j1 if x2 is None else _flat_jacobian(fwd, params, x2, independent)
    return _contract(j1, j2, output)


def _ntk_vector(fwd, params, x1, x2):
    x2_ = x1 if x2 is None else x2
    f2, vjp_fn = vjp(lambda p: fwd(p, x2_), params)
    n2, k = f2.shape

    def column(u):  # J(x1) J(x2)^T u for one cotangent u of shape (n2, k)
        (ju,) = vjp_fn(u)
        _, out = jvp(lambda p: fwd(p, x1), (params,), (ju,))
        return out  # (n1, k)

    basis = torch.eye(n2 * k, dtype=f2.dtype, device=f2.device).reshape(n2 * k, n2, k)
    # at most _NTK_VECTOR_CHUNK cotangents at a time: live memory ~ chunk x (activations of x1 and x2)
    try:
        cols = vmap(column, chunk_size=min(n2 * k, _NTK_VECTOR_CHUNK))(basis)  # (n2 k, n1, k)
    except NotImplementedError as exc:
        if "forward AD" not in str(exc) and "forward-mode" not in str(exc):
            raise
        raise NotImplementedError(
            "implementation='ntk_vector' needs forward-mode AD (jvp) through every operation of the model, and "
            f"torch has none for one of them ({exc}). Use implementation='jacobian' or 'structured' (or 'auto', "
            "which never picks a method the model cannot run).") from None
    return cols.reshape(n2, k, -1, k).permute(2, 0, 3, 1)  # (n1, n2, k_a, k_b)


class _Recorder:
    """Forward hooks on structured modules: record each call's input and output tensor.

    ``names`` selects the modules (those owning one of these parameter names). With ``clone_outputs``
    each hook returns a copy of the output, so that an in-place operation downstream
    (``nn.ReLU(inplace=True)``) changes the copy and the recorded tensor stays the layer's output node in
    the autograd graph; ``versions`` holds the outputs' version counters at record time (to detect such
    operations when not copying)."""

    def __init__(self, model: nn.Module, names: Iterable[str], clone_outputs: bool = True, grad_only: bool = True):
        names = set(names)
        self.grad_only = grad_only
        self.calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self.versions: list[int] = []
        self.handles = []
        self.clone_outputs = clone_outputs
        pid = {id(v): k for k, v in model.named_parameters()}
        self.covered: set[str] = set()
        from torch.nn.modules import module as _mod
        if getattr(_mod, "_global_forward_hooks", None) or getattr(_mod, "_global_forward_pre_hooks", None):
            names = set()  # global hooks could change any layer's input or output: no structured layers
        for m in model.modules():
            if _module_supported(m):
                own = [pid.get(id(p)) for p in (m.weight, getattr(m, "bias", None)) if p is not None]
                if any(n in names for n in own):
                    self.handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
                    self.covered.update(n for n in own if n in names)
        self.bad: set[nn.Module] = set()  # modules with a call the rule cannot describe
        self.geometry: dict[nn.Module, tuple | None] = {}
        self.active = True

    @staticmethod
    def _geometry(module):
        """What the structured rule reads from the module besides its parameters (checked to stay constant)."""
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            return (module.stride, module.padding, module.dilation, module.padding_mode, module.kernel_size)
        if isinstance(module, DenseModule):
            return (module.weight_scale, module.bias_scale)
        return None

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
        if self.grad_only and not output.requires_grad:  # a call under no_grad: no graph, no contribution
            return None
        self.calls.append((module, x, output))
        self.versions.append(output._version)
        if self.clone_outputs:
            return output.clone()
        return None

    def bad_names(self, pid) -> set[str]:
        # geometry read again now: attributes changed after the last call also invalidate the patches
        bad = self.bad | {m for m, geo in self.geometry.items() if self._geometry(m) != geo}
        return {nm for m in bad for nm in _module_param_names(m, pid) if nm is not None}

    def remove(self):
        for h in self.handles:
            h.remove()


def _module_param_names(module: nn.Module, pid: Mapping[int, str]) -> tuple[str | None, str | None]:
    w = pid.get(id(module.weight))
    b = pid.get(id(module.bias)) if getattr(module, "bias", None) is not None else None
    return w, b


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
    layer calls that ``out`` depends on -- ``x @ layer.weight`` elsewhere, attention's
    ``F.linear(x, out_proj.weight)``, a ``torch.where`` that routes some samples around the layer (while a
    detached call of the same layer contributes nothing). Counts the edges into each parameter's gradient
    accumulator in the whole graph and inside the reachable recorded calls (from the call's output node down
    to its input's node): they must agree. Structural, exact, and cheap (walks over the graph's nodes)."""
    target = {id(leaf[nm]): nm for nm in names if nm in leaf}
    total, reachable = _accumulator_edges(out.grad_fn, target)
    inside = dict.fromkeys(total, 0)
    for _module, a, o in calls:
        if o.grad_fn is None or o.grad_fn not in reachable:
            continue  # a call the output does not depend on (detached, under no_grad, ...)
        counts, _ = _accumulator_edges(o.grad_fn, target, stop=a.grad_fn)
        for nm, c in counts.items():
            inside[nm] += c
    return {nm for nm in total if total[nm] != inside[nm]}


def _patches(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """Layer input as (n, positions, features) so that output = patches @ W_flat^T (+ b)."""
    if isinstance(module, (nn.Linear, DenseModule)):
        n = a.shape[0]
        return a.reshape(n, -1, a.shape[-1])
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            pad = module._reversed_padding_repeated_twice
            a = torch.nn.functional.pad(a, pad, mode=module.padding_mode if module.padding_mode != "zeros"
                                        else "constant")
            padding = 0
        else:
            padding = module.padding
        if module.groups != 1:
            raise NotImplementedError
        cols = torch.nn.functional.unfold(a, module.kernel_size, dilation=module.dilation, padding=padding,
                                          stride=module.stride)  # (n, C kh kw, L)
        return cols.transpose(1, 2)
    if isinstance(module, nn.Conv1d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise NotImplementedError
        cols = torch.nn.functional.unfold(a.unsqueeze(-1), (module.kernel_size[0], 1),
                                          dilation=(module.dilation[0], 1), padding=(module.padding[0], 0),
                                          stride=(module.stride[0], 1))
        return cols.transpose(1, 2)
    raise NotImplementedError  # pragma: no cover


def _cotangent_positions(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Output cotangent (n, k, *out_shape) as (n, k, positions, channels)."""
    n, k = g.shape[:2]
    if isinstance(module, (nn.Linear, DenseModule)):
        return g.reshape(n, k, -1, g.shape[-1])
    return g.reshape(n, k, g.shape[2], -1).transpose(2, 3)  # conv: (n, k, C_out, L) -> (n, k, L, C_out)


def _weight_scales(module) -> tuple[float, float]:
    if isinstance(module, DenseModule):
        return module.weight_scale, module.bias_scale
    return 1.0, 1.0


def _structured_features(fwd: _Forward, params, x: torch.Tensor, model: nn.Module, names: set[str]):
    """One forward with hooks and k backward passes.

    Returns ``(calls, uses, k, ok)``: ``calls[c] = (patches (n, L, d), cotangents (n, k, L, c))`` for every
    call of a structured layer; ``ok`` the parameters of ``names`` that this very batch's autograd graph uses
    only through the recorded calls (:func:`_unrecorded_uses`); ``uses[name] =
    [(c, is_weight, scale), ...]`` the calls in which each parameter of ``ok`` takes part (tied weights:
    several), with the parameterization's scale."""
    for clone in (False, True):
        # first without copying layer outputs; if an in-place operation downstream changed a recorded
        # output (its version counter moved), again with the hooks returning copies
        rec = _Recorder(model, names, clone_outputs=clone)
        try:
            with torch.enable_grad():
                # parameters as fresh leaves, so the hooked layers' outputs are graph nodes to differentiate to
                leaf_params = {k: v.detach().requires_grad_(True) for k, v in params.items()}  # views, no copy
                out = fwd(leaf_params, x)
        except BaseException:
            rec.remove()
            raise
        rec.active = False
        if clone or all(o._version == ver for o, ver in zip((c[2] for c in rec.calls), rec.versions)):
            break
        rec.remove()
    pid = {id(v_): name for name, v_ in model.named_parameters()}
    n, k = out.shape
    # every use of each parameter in this block's own graph must be a recorded call (cheap edge count), every
    # call must see this batch along its first axis, and no call may be one the rule cannot describe
    ok = set(names) - _unrecorded_uses(out, leaf_params, rec.calls, names, pid) - rec.bad_names(pid)
    for module, a, o in rec.calls:
        if a.shape[0] != n or o.shape[0] != n:
            ok -= set(_module_param_names(module, pid))
    try:
        with torch.enable_grad():
            node_outs = [c[2] for c in rec.calls]
            grads = [torch.autograd.grad(out[:, a].sum(), node_outs, retain_graph=True, allow_unused=True)
                     for a in range(k)] if node_outs else []
            if node_outs and n > 1:
                # row check: with random per-sample, per-output weights C the cotangent reaching row p of each
                # recorded output must be sum_a C[p, a] g_a[p] -- true when sample p's output depends on row p
                # of the layer only; a permutation of the rows (sorting the batch, say) breaks it
                gen = torch.Generator(device="cpu").manual_seed(4321)
                c = torch.randn((n, k), generator=gen, dtype=torch.float64).to(out.dtype).to(out.device)
                g_c = torch.autograd.grad((out * c).sum(), node_outs, allow_unused=True)
    finally:
        rec.remove()
    calls, uses = [], {}
    for idx, (module, a, o) in enumerate(rec.calls):
        g = torch.stack([grads[b][idx] if grads[b][idx] is not None else torch.zeros_like(o) for b in range(k)], 1)
        names_m = set(_module_param_names(module, pid))
        if names_m & ok and n > 1:
            want = torch.einsum("ia,ia...->i...", c, g)
            got = g_c[idx] if g_c[idx] is not None else torch.zeros_like(o)
            if float((got - want).abs().max()) > torch.finfo(o.dtype).eps ** 0.5 * float(want.abs().max()) + 1e-300:
                ok -= names_m
        if not names_m & ok:
            calls.append((None, None))
            continue
        calls.append((_patches(module, a.detach()), _cotangent_positions(module, g.detach())))
        ws, bs = _weight_scales(module)
        w_name, b_name = _module_param_names(module, pid)
        if w_name in ok:
            uses.setdefault(w_name, []).append((idx, True, ws))
        if b_name in ok:
            uses.setdefault(b_name, []).append((idx, False, bs))
    uses = {name: u for name, u in uses.items() if name in ok}  # a tied parameter may fail at a later call
    return calls, uses, k, ok


def _contract(u1: torch.Tensor, u2: torch.Tensor, output: str) -> torch.Tensor:
    """sum_f u1[i, a, f] u2[j, b, f] for u of shape (n, k, F), reduced as ``output`` asks -- one matmul:
    "full" (n1, n2, k, k); "diagonal" (n1, n2, k) (a = b only); "trace" (n1, n2), the mean over a of the
    diagonal (never forming the k x k blocks)."""
    n1, k, f = u1.shape
    n2 = u2.shape[0]
    if output == "trace":
        return (u1.reshape(n1, k * f) @ u2.reshape(n2, k * f).T).div_(k)
    if output == "diagonal":
        return torch.bmm(u1.transpose(0, 1), u2.permute(1, 2, 0)).permute(1, 2, 0)
    return (u1.reshape(n1 * k, f) @ u2.reshape(n2 * k, f).T).reshape(n1, k, n2, k).permute(0, 2, 1, 3)


def _expand(aa: torch.Tensor, output: str) -> torch.Tensor:
    """A per-pair factor (n1, n2) shaped to multiply a reduced output."""
    return aa if output == "trace" else aa[:, :, None] if output == "diagonal" else aa[:, :, None, None]


def _pair_term(call1, call2, weight: bool, output: str, cache: dict, key) -> torch.Tensor:
    """Contribution of one (use in x1, use in x2) pair of a weight or bias, unscaled.

    One position (a Linear on flat input): (a1 a2^T) (.) (g1 g2^T), and g1 g2^T alone for the bias -- the
    product g1 g2^T is computed once per call pair and shared by weight and bias. Weights shared over
    positions p (convolutions, Linear over a sequence): sum_{p, p'} (a1_p . a2_p') (g1_p . g2_p'),
    contracted over position pairs when there are few, otherwise through per-sample weight gradients."""
    (a1, g1), (a2, g2) = call1, call2
    L1, L2 = a1.shape[1], a2.shape[1]
    if L1 == 1 and L2 == 1:
        if ("gg", key) not in cache:
            cache["gg", key] = _contract(g1[:, :, 0], g2[:, :, 0], output)
        if not weight:
            return cache["gg", key]
        return _expand(a1[:, 0] @ a2[:, 0].T, output) * cache["gg", key]
    if not weight:  # bias: sum over positions of g
        return _contract(g1.sum(2), g2.sum(2), output)
    d, c = a1.shape[2], g1.shape[3]
    if L1 * L2 * (d + c) <= d * c:  # few positions: contract over position pairs
        aa = torch.einsum("ipd,jqd->ijpq", a1, a2)
        spec = {"full": "ijab", "diagonal": "ija", "trace": "ij"}[output]
        term = torch.einsum(f"ijpq,iapc,j{'a' if output != 'full' else 'b'}qc->{spec}", aa, g1, g2)
        return term.div_(g1.shape[1]) if output == "trace" else term
    # many positions: per-sample weight gradients (n, k, d c), then their inner products
    if ("m1", key[0]) not in cache:
        cache["m1", key[0]] = torch.einsum("ipd,iapc->iadc", a1, g1).flatten(2)
    m1 = cache["m1", key[0]]
    m2 = m1 if call2 is call1 else torch.einsum("ipd,iapc->iadc", a2, g2).flatten(2)
    return _contract(m1, m2, output)


def _ntk_structured(fwd: _Forward, params, x1, x2, model, output: str = "full", verified: set | None = None):
    """Structured derivatives (Novak et al. 2022, Sec. 3-4), reduced to ``output`` as it goes."""
    if verified is None:
        rec = _Recorder(model, params)
        verified = set(rec.covered)
        rec.remove()
    covered = set(verified)
    if not covered:  # nothing the structured path can take: Jacobian contraction for everything
        return _ntk_jacobian(fwd, params, x1, x2, independent=True, output=output)
    calls1, uses1, k, ok1 = _structured_features(fwd, params, x1, model, covered)
    if x2 is None:
        calls2, uses2, ok2 = calls1, uses1, ok1
    else:
        calls2, uses2, _, ok2 = _structured_features(fwd, params, x2, model, covered)
    covered = ok1 & ok2  # verified on both blocks' own data
    uses1 = {name: u for name, u in uses1.items() if name in covered}
    n1, n2 = x1.shape[0], (x1 if x2 is None else x2).shape[0]
    theta = None
    cache: dict = {}
    for name, us1 in uses1.items():
        for c1, weight, s1 in us1:
            for c2, _, s2 in uses2.get(name, ()):
                term = _pair_term(calls1[c1], calls2[c2], weight, output, cache, (c1, c2))
                scale = s1 * s2
                if theta is None:
                    theta = term * scale if scale != 1.0 else term.clone()
                else:
                    theta.add_(term, alpha=scale)
    rest = {k_: v for k_, v in params.items() if k_ not in covered}
    if rest:  # parameters without known structure: Jacobian contraction over just those
        term = _ntk_jacobian(fwd_rest(fwd, params, rest), rest, x1, x2, independent=True, output=output)
        theta = term if theta is None else theta.add_(term)
    if theta is None:
        shape = {"full": (n1, n2, k, k), "diagonal": (n1, n2, k), "trace": (n1, n2)}[output]
        theta = torch.zeros(shape, dtype=x1.dtype, device=x1.device)
    return theta


def fwd_rest(fwd: _Forward, params, rest):
    """The forward as a function of the parameters in ``rest`` only (the others held fixed)."""
    fixed = {k: v for k, v in params.items() if k not in rest}

    class _F:
        def __call__(self, p, x):
            return fwd({**fixed, **p}, x)

    return _F()


# ---------------------------------------------------------------------------------------------------
def _has_train_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def _module_supported(m: nn.Module) -> bool:
    """Layers whose parameter Jacobian the structured path assembles from inputs and cotangents; the
    parameters of any other module (grouped convolutions, Conv1d with padding modes or 'same', transposed
    convolutions, embeddings, attention, ...) go through the Jacobian method, restricted to them."""
    # only the library's own forward, and no user hooks that could change its input or output: a subclass
    # that overrides forward (LoRA terms, masks, clamps) or a hook computes something else than the rule assumes
    if m._forward_hooks or m._forward_pre_hooks:
        return False
    if isinstance(m, DenseModule):  # its parameterization scales must be plain numbers
        return (type(m).forward is DenseModule.forward and isinstance(m.weight_scale, (int, float))
                and isinstance(m.bias_scale, (int, float)))
    if isinstance(m, nn.Linear):
        return type(m).forward is nn.Linear.forward
    if isinstance(m, nn.Conv2d):
        return (m.groups == 1 and type(m).forward is nn.Conv2d.forward
                and type(m)._conv_forward is nn.Conv2d._conv_forward)
    if isinstance(m, nn.Conv1d):
        return (m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
                and type(m).forward is nn.Conv1d.forward and type(m)._conv_forward is nn.Conv1d._conv_forward)
    return False


def _samples_independent(fwd: "_Forward", params, t1: torch.Tensor, t2: torch.Tensor | None) -> bool:
    """Whether the model treats the samples of a batch independently: the output of a small batch must
    equal the outputs of its samples run one at a time (to sqrt(eps) relative). Batch-coupled models
    (train-mode BatchNorm, normalisation over the batch, ...) fail; structured derivatives and
    per-sample Jacobians are exact only for independent samples, so ``auto`` must know."""
    probe = torch.cat([t1[:2]] + ([] if t2 is None else [t2[:1]]))
    if probe.shape[0] < 2:
        return True  # a single sample: nothing to couple
    try:
        with torch.no_grad():
            together = fwd(params, probe)
            apart = torch.cat([fwd(params, probe[i:i + 1]) for i in range(probe.shape[0])])
    except (RuntimeError, ValueError):  # e.g. train-mode BatchNorm refuses a batch of one
        return False
    if together.shape != apart.shape:
        return False
    scale = float(together.abs().max())
    tol = torch.finfo(together.dtype).eps ** 0.5 * max(scale, 1e-30)
    return bool((together - apart).abs().max() <= tol)


def peak_memory_estimate(implementation: str, n1: int, n2: int, k: int, n_params: int, width_sum: int,
                         itemsize: int = 8) -> int:
    """Documented peak-memory model (bytes) of one block, used by ``auto`` and the budget check.

    * jacobian:   (n1 + n2) k P            (both Jacobians) + n1 n2 k^2 (result)
    * ntk_vector: n2 k (n1 k + P)          (vmapped products) + n1 n2 k^2
    * structured: (n1 + n2) k W + n1 n2 k^2 (per-layer cotangents; W = sum of layer widths x positions)
    """
    out = n1 * n2 * k * k
    if implementation == "jacobian":
        return itemsize * ((n1 + n2) * k * n_params + out)
    if implementation == "ntk_vector":
        return itemsize * (n2 * k * (n1 * k + n_params) + out)
    return itemsize * ((n1 + n2) * k * width_sum * 2 + out)


def empirical_ntk(
    model: nn.Module,
    x1: Any,
    x2: Any = None,
    *,
    output: str = "trace",
    implementation: str = "auto",
    params: Iterable[str] | None = None,
    batch_size: int | None = None,
    memory_budget: float | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Empirical NTK Theta(x1, x2) of ``model`` at its current parameters.

    Parameters
    ----------
    model : nn.Module
        Any module whose forward takes a batch (first dimension) and returns a tensor (n, ...);
        trailing output dimensions are flattened into k output units. The model is never modified
        (parameters, buffers, train/eval mode and requires_grad flags are left exactly as they were).
        Parameters are substituted through ``torch.func.functional_call``: a tensor derived from a
        parameter and cached as a plain attribute outside ``forward`` (e.g. ``self.wT = self.l.weight.T``
        in ``__init__``) is not differentiated -- derive it inside ``forward``.
    x1, x2 : tensors (n1, ...) and (n2, ...); ``x2=None`` means ``x1`` (and exploits symmetry).
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
        Rows of x1 and x2 per block (default: chosen from the memory budget).
    memory_budget : float, optional
        Bytes a block may use (default: half of the available memory).
    model_kwargs : mapping, optional
        Keyword arguments passed to ``model.forward``.

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
    first = next(iter(model.parameters()), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.get_default_dtype()
    device = first.device if first is not None else None
    t1 = as_float_tensor(x1, "x1", dtype=dtype, device=device, min_ndim=1)
    t2 = None if x2 is None else as_float_tensor(x2, "x2", dtype=dtype, device=device, min_ndim=1)
    if t2 is not None and t1.shape[1:] != t2.shape[1:]:
        raise ValueError(f"x1 samples have shape {tuple(t1.shape[1:])} but x2 samples have shape "
                         f"{tuple(t2.shape[1:])}; they must match")
    chosen = _select_params(model, params)
    snap = _snapshot(model)
    try:
        fwd = _Forward(model, chosen, model_kwargs)
        coupled_bn = _has_train_batchnorm(model)
        try:
            with torch.no_grad():
                rec = _Recorder(model, chosen, clone_outputs=False, grad_only=False)
                try:
                    probe = fwd(chosen, t1 if coupled_bn else t1[:1])
                finally:
                    rec.remove()
        except (TypeError, ValueError):
            raise
        except RuntimeError as exc:
            raise ValueError(f"the model rejected inputs of shape {tuple(t1.shape)}: {exc}") from None
        independent = not coupled_bn and _samples_independent(fwd, chosen, t1, t2)
        k = probe.shape[1]
        n1 = t1.shape[0]
        n2 = n1 if t2 is None else t2.shape[0]
        n_params = sum(v.numel() for v in chosen.values())
        width_sum, layer_flops = _layer_sizes(rec.calls)
        budget = 0.5 * available_memory_bytes(device) if memory_budget is None else float(memory_budget)
        item = torch.finfo(dtype).bits // 8
        impl = implementation
        if impl == "auto":
            impl = _choose(independent, n1, n2, k, n_params, width_sum, layer_flops, item, budget)
        elif impl == "structured" and not independent:
            raise ValueError("implementation='structured' assumes the model treats the samples of a batch "
                             "independently, but its output for a batch differs from its outputs for the samples "
                             "one at a time (train-mode BatchNorm, batch normalisation, dropout, ...). Use "
                             "implementation='jacobian' (or 'auto'), or call model.eval() first.")
        verified = None
        if impl == "structured":  # the parameters of supported layers; each block checks them on its own graph
            rec_s = _Recorder(model, chosen)
            verified = set(rec_s.covered)
            rec_s.remove()
        bs = batch_size
        if bs is None:
            bs = max(n1, n2)
            while bs > 1 and peak_memory_estimate(impl, bs, bs, k, n_params, width_sum, item) > budget:
                bs = (bs + 1) // 2
        if int(bs) != bs or bs < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not independent:  # the samples interact (e.g. batch statistics): the batch is one block
            bs = max(n1, n2)
        need = peak_memory_estimate(impl, min(bs, n1), min(bs, n2), k, n_params, width_sum, item)
        if need > budget:
            raise MemoryBudgetError(
                f"one block of the empirical NTK ({impl}, {min(bs, n1)} x {min(bs, n2)} inputs, k={k} outputs, "
                f"{n_params} parameters) needs ~{format_bytes(need)}, more than the budget {format_bytes(budget)}; "
                "select fewer parameters (params=), use output units in smaller groups, or raise memory_budget")
        out_full = output == "full"
        shape = (n1, n2, k, k) if out_full else (n1, n2, k) if output == "diagonal" else (n1, n2)
        result = torch.empty(shape, dtype=dtype, device=t1.device)
        for i0 in range(0, n1, bs):
            a = t1[i0:i0 + bs]
            for j0 in range(i0 if t2 is None else 0, n2, bs):
                same_block = t2 is None and i0 == j0
                b = None if same_block else (t1 if t2 is None else t2)[j0:j0 + bs]
                block = _block(impl, fwd, chosen, a, b, model, independent, output, verified)
                result[i0:i0 + a.shape[0], j0:j0 + block.shape[1]] = block
                if t2 is None and not same_block:
                    result[j0:j0 + block.shape[1], i0:i0 + a.shape[0]] = block.transpose(0, 1).transpose(2, 3) \
                        if out_full else block.transpose(0, 1)
        return result
    finally:
        _restore_check(model, snap)


def _block(impl, fwd, params, a, b, model, independent, output, verified=None):
    """One block of the kernel, already reduced to ``output``."""
    if impl == "jacobian":
        return _ntk_jacobian(fwd, params, a, b, independent, output)
    if impl == "ntk_vector":
        return _reduce(_ntk_vector(fwd, params, a, b), output)
    return _ntk_structured(fwd, params, a, b, model, output, verified)


def _layer_sizes(calls) -> tuple[int, int]:
    """(W, F) for the cost models, from the structured layers' calls recorded on a probe forward:
    W = sum of output and input sizes per sample (cotangent and activation numbers kept by the
    structured path), F = their forward FLOPs per sample (2 x positions x fan-in x fan-out)."""
    width, flops = 0, 0
    for m, a, o in calls:
        if a.shape[0] == 0 or o.shape[0] == 0:
            continue  # a layer that saw none of the probe's samples (routing)
        try:
            pa = _patches(m, a[:1])
        except (RuntimeError, ValueError, NotImplementedError):
            continue
        positions, d = pa.shape[1], pa.shape[2]
        c = o[0].numel() // max(positions, 1)
        width += int(o[0].numel() + pa.numel() + min(positions * positions * (d + c), d * c))
        flops += 2 * positions * d * c
    return max(width, 1), max(flops, 1)


def cost_estimate(implementation: str, n1: int, n2: int, k: int, n_params: int, layer_flops: int,
                  width_sum: int, independent: bool = True) -> float:
    """Documented FLOP model of one (n1 x n2) block, used by ``auto`` together with the memory model.

    F = forward FLOPs per sample (structured layers, plus 2 per other parameter); W = the structured
    layers' sizes as in :func:`peak_memory_estimate`.

    * jacobian:   (n1 + n2) k 3F  (one backward per sample and output; x (n1 + n2) if the samples are
      coupled and the whole batch is differentiated) + 2 n1 n2 k^2 P (the contraction)
    * ntk_vector: n2 k (n1 + n2) 3F (a vjp over x2 and a jvp over x1 per cotangent)
    * structured: (n1 + n2)(1 + 2k) F (forward, k backwards) + 2 n1 n2 k^2 W (per-layer contractions
      of inputs and cotangents)
    """
    f = float(layer_flops) + 2.0 * n_params
    if implementation == "jacobian":
        passes = (n1 + n2) * k * 3 * f * (1 if independent else (n1 + n2))
        return passes + 2.0 * n1 * n2 * k * k * n_params
    if implementation == "ntk_vector":
        return n2 * k * (n1 + n2) * 3 * f
    return (n1 + n2) * (1 + 2 * k) * f + 2.0 * n1 * n2 * k * k * width_sum


def _choose(independent, n1, n2, k, n_params, width_sum, layer_flops, item, budget) -> str:
    """``auto``: the cheapest valid implementation (FLOP model) among those whose block fits the budget
    (memory model); structured derivatives only when the samples are independent."""
    cands = (["structured"] if independent else []) + ["jacobian", "ntk_vector"]
    b1, b2 = min(n1, 256), min(n2, 256)

    def fits(m):
        return peak_memory_estimate(m, min(n1, 16), min(n2, 16), k, n_params, width_sum, item) <= budget

    ok = [m for m in cands if fits(m)] or cands
    return min(ok, key=lambda m: cost_estimate(m, b1, b2, k, n_params, layer_flops, width_sum, independent))


def empirical_nngp(model: nn.Module, x1: Any, x2: Any = None, *, model_kwargs: Mapping | None = None) -> torch.Tensor:
    """f(x1) f(x2)^T / k: the outer product of the outputs averaged over the k output units -- a
    one-sample estimate of the NNGP kernel (Lee et al. 2018) for a network at initialization."""
    first = next(iter(model.parameters()), None)
    dtype = first.dtype if first is not None else torch.get_default_dtype()
    t1 = as_float_tensor(x1, "x1", dtype=dtype, device=first.device if first is not None else None, min_ndim=1)
    t2 = t1 if x2 is None else as_float_tensor(x2, "x2", dtype=dtype, device=t1.device, min_ndim=1)
    with torch.no_grad():
        f1 = model(t1, **(model_kwargs or {})).reshape(t1.shape[0], -1)
        f2 = f1 if x2 is None else model(t2, **(model_kwargs or {})).reshape(t2.shape[0], -1)
    return f1 @ f2.T / f1.shape[1]
