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
  Memory ~ (n1 + n2) k (sum of layer widths x positions) numbers. Valid when samples do not interact
  (no train-mode BatchNorm); ``"auto"`` checks that.

``output="trace"`` (default) returns (n1, n2): the mean over output units of Theta_aa, which is the
per-output kernel in the infinite-width limit; ``"full"`` (n1, n2, k, k); ``"diagonal"`` (n1, n2, k).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from .._validation import MemoryBudgetError, as_float_tensor, available_memory_bytes, format_bytes
from ..kernels.layers import DenseModule

__all__ = ["empirical_ntk", "empirical_nngp", "IMPLEMENTATIONS", "OUTPUTS", "peak_memory_estimate"]

IMPLEMENTATIONS = ("auto", "jacobian", "ntk_vector", "structured")
OUTPUTS = ("trace", "full", "diagonal")
_STRUCTURED_TYPES = (nn.Linear, DenseModule, nn.Conv1d, nn.Conv2d)


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
def _flat_jacobian(fwd: _Forward, params, x) -> torch.Tensor:
    jac = jacrev(fwd)(params, x)  # name -> (n, k, *shape)
    n, k = next(iter(jac.values())).shape[:2]
    return torch.cat([j.reshape(n, k, -1) for j in jac.values()], dim=-1)  # (n, k, P)


def _ntk_jacobian(fwd, params, x1, x2):
    j1 = _flat_jacobian(fwd, params, x1)
    j2 = j1 if x2 is None else _flat_jacobian(fwd, params, x2)
    return torch.einsum("iap,jbp->ijab", j1, j2)


def _ntk_vector(fwd, params, x1, x2):
    x2_ = x1 if x2 is None else x2
    f2, vjp_fn = vjp(lambda p: fwd(p, x2_), params)
    n2, k = f2.shape

    def column(u):  # J(x1) J(x2)^T u for one cotangent u of shape (n2, k)
        (ju,) = vjp_fn(u)
        _, out = jvp(lambda p: fwd(p, x1), (params,), (ju,))
        return out  # (n1, k)

    basis = torch.eye(n2 * k, dtype=f2.dtype, device=f2.device).reshape(n2 * k, n2, k)
    cols = vmap(column)(basis)  # (n2 k, n1, k)
    return cols.reshape(n2, k, -1, k).permute(2, 0, 3, 1)  # (n1, n2, k_a, k_b)


class _Recorder:
    """Forward hooks on structured modules: record each call's input (as patches) and output tensor."""

    def __init__(self, model: nn.Module, params: Mapping[str, torch.Tensor]):
        self.calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self.handles = []
        pid = {id(v): k for k, v in model.named_parameters()}
        self.covered: set[str] = set()
        for m in model.modules():
            if isinstance(m, _STRUCTURED_TYPES):
                names = [pid.get(id(p)) for p in (m.weight, getattr(m, "bias", None)) if p is not None]
                if any(n in params for n in names):
                    self.handles.append(m.register_forward_hook(self._hook))
                    self.covered.update(n for n in names if n in params)

    def _hook(self, module, inputs, output):
        self.calls.append((module, inputs[0], output))

    def remove(self):
        for h in self.handles:
            h.remove()


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


def _structured_features(fwd: _Forward, params, x: torch.Tensor, model: nn.Module):
    """Run one forward with hooks and k backward passes; return per parameter-group the (patches,
    cotangents) of every use, plus the output dimension k."""
    rec = _Recorder(model, params)
    try:
        p = {k: v.detach().requires_grad_(False) for k, v in params.items()}
        with torch.enable_grad():
            # parameters as fresh leaves, so the hooked layers' outputs are graph nodes we can differentiate to
            leaf_params = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
            out = fwd(leaf_params, x)
            n, k = out.shape
            node_outs = [c[2] for c in rec.calls]
            grads = [torch.autograd.grad(out[:, a].sum(), node_outs, retain_graph=True, allow_unused=True)
                     for a in range(k)]
    finally:
        rec.remove()
    groups: dict[str, list] = {}
    pid = {id(v): name for name, v in model.named_parameters()}
    for idx, (module, a, o) in enumerate(rec.calls):
        g = torch.stack([grads[b][idx] if grads[b][idx] is not None else torch.zeros_like(o) for b in range(k)], 1)
        ws, bs = _weight_scales(module)
        w_name = pid.get(id(module.weight))
        b_name = pid.get(id(module.bias)) if getattr(module, "bias", None) is not None else None
        pa = _patches(module, a.detach())
        gc = _cotangent_positions(module, g.detach())
        if w_name in params:
            groups.setdefault(w_name, []).append((pa * ws, gc))
        if b_name in params:
            groups.setdefault(b_name, []).append((None, gc * bs))
    return groups, k


def _group_contribution(uses1, uses2) -> torch.Tensor:
    """sum over uses u, v and positions p, p' of (a1 . a2)(g1 . g2): (n1, n2, k, k)."""
    total = None
    for a1, g1 in uses1:
        for a2, g2 in uses2:
            if a1 is None:  # bias: sum over positions of g, then g1 g2^T
                s1, s2 = g1.sum(2), g2.sum(2)  # (n, k, out)
                term = torch.einsum("iac,jbc->ijab", s1, s2)
            elif a1.shape[1] == 1 and a2.shape[1] == 1:  # one position: (a1 a2^T) (.) (g1 g2^T)
                term = torch.einsum("id,jd->ij", a1[:, 0], a2[:, 0])[:, :, None, None] * \
                    torch.einsum("iac,jbc->ijab", g1[:, :, 0], g2[:, :, 0])
            else:  # weights shared over positions p: sum_{p,p'} (a1_p . a2_p') (g1_p . g2_p')
                L1, L2, d, c = a1.shape[1], a2.shape[1], a1.shape[2], g1.shape[3]
                if L1 * L2 * (d + c) <= d * c:  # few positions: contract over position pairs
                    aa = torch.einsum("ipd,jqd->ijpq", a1, a2)
                    term = torch.einsum("ijpq,iapc,jbqc->ijab", aa, g1, g2)
                else:  # many positions: per-sample weight gradients (d x c), then their inner products
                    m1 = torch.einsum("ipd,iapc->iadc", a1, g1)
                    m2 = m1 if (a2 is a1 and g2 is g1) else torch.einsum("ipd,iapc->iadc", a2, g2)
                    term = torch.einsum("iadc,jbdc->ijab", m1, m2)
            total = term if total is None else total + term
    return total


def _ntk_structured(fwd: _Forward, params, x1, x2, model):
    rec = _Recorder(model, params)
    covered = set(rec.covered)
    rec.remove()
    groups1, k = _structured_features(fwd, params, x1, model)
    groups2 = groups1 if x2 is None else _structured_features(fwd, params, x2, model)[0]
    n1, n2 = x1.shape[0], (x1 if x2 is None else x2).shape[0]
    theta = None
    for name in groups1:
        term = _group_contribution(groups1[name], groups2[name])
        theta = term if theta is None else theta + term
    rest = {k_: v for k_, v in params.items() if k_ not in covered}
    if rest:  # parameters without known structure: Jacobian contraction over just those
        term = _ntk_jacobian(fwd_rest(fwd, params, rest), rest, x1, x2)
        theta = term if theta is None else theta + term
    if theta is None:
        dtype = x1.dtype
        theta = torch.zeros((n1, n2, k, k), dtype=dtype, device=x1.device)
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


def _structured_ok(model: nn.Module) -> bool:
    """Structured derivatives need per-sample independence and the conv variants handled here."""
    if _has_train_batchnorm(model):
        return False
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            return False
        if isinstance(m, nn.Conv1d) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
            return False
    return True


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
    x1, x2 : tensors (n1, ...) and (n2, ...); ``x2=None`` means ``x1`` (and exploits symmetry).
    output : {"trace", "full", "diagonal"}
        (n1, n2) mean over output units of Theta_aa; (n1, n2, k, k); or (n1, n2, k).
    implementation : {"auto", "jacobian", "ntk_vector", "structured"}
        See the module docstring. ``auto`` uses the structured path when it is valid for the model
        (no train-mode BatchNorm, supported conv variants) and otherwise the cheaper of the other two
        by the memory model :func:`peak_memory_estimate`; all paths return the same numbers.
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
        try:
            with torch.no_grad():
                probe = fwd(chosen, t1 if _has_train_batchnorm(model) else t1[:1])
        except (TypeError, ValueError):
            raise
        except RuntimeError as exc:
            raise ValueError(f"the model rejected inputs of shape {tuple(t1.shape)}: {exc}") from None
        k = probe.shape[1]
        n1 = t1.shape[0]
        n2 = n1 if t2 is None else t2.shape[0]
        n_params = sum(v.numel() for v in chosen.values())
        width_sum = _width_sum(model, chosen, t1 if _has_train_batchnorm(model) else t1[:1], fwd)
        impl = implementation
        if impl == "auto":
            impl = "structured" if _structured_ok(model) else min(
                ("jacobian", "ntk_vector"),
                key=lambda m: peak_memory_estimate(m, min(n1, 64), min(n2, 64), k, n_params, width_sum))
        elif impl == "structured" and not _structured_ok(model):
            raise ValueError("implementation='structured' assumes samples do not interact and plain convolutions; "
                             "this model has train-mode BatchNorm or grouped/padded-mode convolutions. Use "
                             "implementation='jacobian' (or 'auto'), or call model.eval() first.")
        budget = 0.5 * available_memory_bytes(device) if memory_budget is None else float(memory_budget)
        item = torch.finfo(dtype).bits // 8
        bs = batch_size
        if bs is None:
            bs = max(n1, n2)
            while bs > 1 and peak_memory_estimate(impl, bs, bs, k, n_params, width_sum, item) > budget:
                bs = (bs + 1) // 2
        if int(bs) != bs or bs < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if _has_train_batchnorm(model):  # batch statistics couple the samples: the batch is one block
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
                theta = _block(impl, fwd, chosen, a, b, model)
                block = _reduce(theta, output)
                result[i0:i0 + a.shape[0], j0:j0 + block.shape[1]] = block
                if t2 is None and not same_block:
                    result[j0:j0 + block.shape[1], i0:i0 + a.shape[0]] = block.transpose(0, 1).transpose(2, 3) \
                        if out_full else block.transpose(0, 1)
        return result
    finally:
        _restore_check(model, snap)


def _block(impl, fwd, params, a, b, model):
    if impl == "jacobian":
        return _ntk_jacobian(fwd, params, a, b)
    if impl == "ntk_vector":
        return _ntk_vector(fwd, params, a, b)
    return _ntk_structured(fwd, params, a, b, model)


def _width_sum(model, params, x, fwd) -> int:
    """Sum over structured layers of output channels x positions (for the structured memory model)."""
    rec = _Recorder(model, params)
    try:
        with torch.no_grad():
            fwd(params, x)
    finally:
        rec.remove()
    total = 0
    for m, a, o in rec.calls:
        pa = _patches(m, a[:1]) if _structured_ok(model) else a[:1].reshape(1, 1, -1)
        positions, d = pa.shape[1], pa.shape[2]
        c = o[0].numel() // max(positions, 1)
        total += int(o[0].numel() + pa.numel() + min(positions * positions * (d + c), d * c))
    return max(total, 1)


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
