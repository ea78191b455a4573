"""Convolution stacks that end in global average pooling, a few pairs of inputs at a time (in cache).

Which computation. A network that starts ``Conv, act, Conv, act, ..., GlobalAvgPool`` (then anything flat)
needs, per pair of inputs (x, x'), the covariances Sigma(p, p') and Theta(p, p') of *all* pairs of positions
up to the pooling (Arora et al. 2019, Sec. 4, "CNTK-GAP"; Novak et al. 2019, Sec. 3.1): (H W)^2 numbers per
tensor and pair, 614,656 for 28 x 28 images -- 4.9 MB per pair in float64. The layer-by-layer path
(:meth:`ntkit.Architecture.kernel` with :meth:`~ntkit.kernels.layers.Layer.apply_kernel`) runs every layer on
a whole tile of pairs at once: for a symmetric tile of 4 images that is 10 pairs, 49 MB per tensor in float64,
so each of the ~25 elementwise passes per layer (window sums, affine step, dual) streams from DRAM, and every
multi-megabyte temporary is fresh memory (page faults).

What is blocked and why. Here the same exact recursion runs on **chunks of a few pairs** (by default as many
as fit :data:`CHUNK_BYTES` per state tensor, at least one) through *all* layers up to the pooling before the
next chunk starts, so that the few tensors alive at once (Sigma, Theta and the window-sum temporaries) stay in
the last-level cache and the allocator reuses the same blocks chunk after chunk. Nothing else changes: the
first convolution is the patch-matrix product of the input step (im2col, one batched GEMM per chunk), the
others are separable window sums (:func:`ntkit.kernels.conv.window_sum`: any filter size, stride and
SAME/VALID padding), the activations use their dual kernels (the compiled fused dual of the ReLU family when
``fused``), and the symmetric tile lists each pair i <= j once.

The per-position variances q(p) = Sigma(x, x; p, p) that every dual needs for *both* inputs of a pair are the
diagonals of the self pairs (x, x). The self pairs of the tile are therefore computed first (their own chunks),
and each records its diagonal at the input of every activation; the cross pairs then gather those records.
They are the very numbers the layer-by-layer path takes as marginals (the diagonal of the same self-pair
tensor), so self-correlations are snapped to exactly 1 as there. The last activation and the pooling are one
step: its dual is summed over all position pairs as it is computed (a compiled reduction when ``fused``), so
the last state is never written.

With ``fused``, in float64 on the CPU, a 2-D stack of stride-1 trainable convolutions and ReLU-family
activations (whose padded widths agree, :func:`stack_geometry`) runs as one native loop instead
(:func:`native_plan`, :func:`native_stack`, ``ntkit/kernels/_cntk_gap.c``; see the comment above them): all
layers of a pair fused in a wavefront over the first input's rows, so that only a few rows of each layer exist
at a time, in cache; the pairs are split between threads. Otherwise -- CUDA tensors, or no native library
(``NTKIT_NO_COMPILE=1``; a failed build, which warns once) -- the same stack with the NTK asked for, on images
of at least :data:`COMPILED_MIN_NUMBERS` position pairs, runs as ``torch.compile`` loops over a zero-padded
layout (:func:`compiled_plan`, :func:`compiled_stack`): the window sums and the affine step in one loop per
convolution, the dual in one loop per activation whose output is copied into the next convolution's
zero-padded input, one pair at a time. Where neither runs (a zero variance; compilation unavailable or failed,
which warns once) the chunks compute it.

Used automatically by :meth:`ntkit.Architecture.kernel` (Gram and cross kernels, not ``diagonal=True``) for
tiles whose layer-by-layer state would exceed :data:`TILE_MIN_BYTES` per tensor (:func:`use_chunks`; smaller
tiles stay in cache as they are) when :func:`plan` accepts the architecture: Gaussian initialization, NTK
parameterization, a first convolution,
then only convolutions and pointwise activations (each on a convolution's output) up to a
:class:`~ntkit.GlobalAvgPool`. Anything else (pooling windows, layer normalisation, residual branches, the
standard parameterization, delta-orthogonal convolutions) keeps the layer-by-layer path. The values equal
that path's to rounding (tested to 1e-12 in float64).
"""

from __future__ import annotations

import ctypes
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from . import _fused, _native
from ._state import KernelState
from .activations import ABRelu, Activation
from .conv import Conv
from .pooling import GlobalAvgPool

__all__ = ["plan", "use_chunks", "gap_state", "stack_geometry", "native_plan", "compiled_plan", "CHUNK_BYTES",
           "TILE_MIN_BYTES", "COMPILED_MIN_NUMBERS"]

# Bytes of one position-pair state tensor per chunk: a handful of such tensors are alive at once, and together
# they should stay in the last-level cache (measured on a 2 MB-L2 / 105 MB-L3 machine: benchmarks/RESULTS.md).
CHUNK_BYTES = 8 * 1024**2
# The chunks pay off once the layer-by-layer path's tile no longer fits in the last-level cache: a symmetric
# tile of 4 images of 28 x 28 (10 pairs) holds 25 MB per tensor in float32 (cached: the layer path is ~20%
# faster there) and 49 MB in float64 (from memory: the chunks are 1.4x, the compiled stack 2x faster).
# Measured in benchmarks/RESULTS.md.
TILE_MIN_BYTES = 32 * 1024**2
# The compiled stack runs one pair per call (static shapes); below this many position pairs per pair of inputs
# (28 x 28 images have 614,656, 14 x 14 ones 38,416) its per-call overhead outweighs the chunks' eager passes.
COMPILED_MIN_NUMBERS = 2e5
# The native stack calls its C loop on this many pairs at a time per thread (~0.5 s for 28 x 28 images), so that
# a KeyboardInterrupt is seen between calls.
NATIVE_BATCH = 64


def plan(layers, switch: int, init: str, parameterization: str) -> int | None:
    """Index ``g`` of the :class:`~ntkit.GlobalAvgPool` when ``layers[:g + 1]`` is a stack this module computes
    exactly (see the module docstring), else None. ``switch`` is the index from which the architecture drops
    the position pairs (it must come after the pooling)."""
    if init != "gaussian" or parameterization != "ntk":
        return None
    prev = None
    for g, lay in enumerate(layers):
        if isinstance(lay, GlobalAvgPool):
            break
        if isinstance(lay, Conv):
            pass
        elif isinstance(lay, Activation) and type(lay).apply_kernel is Activation.apply_kernel:
            if not isinstance(prev, Conv):  # an activation needs Gaussian inputs: let the layer path say so
                return None
        else:
            return None
        prev = lay
    else:
        return None
    if g == 0 or not isinstance(layers[0], Conv) or switch <= g:
        return None
    return g


def use_chunks(pairs: int, per_pair: int, itemsize: int) -> bool:
    """Whether a tile of ``pairs`` pairs of ``per_pair`` state numbers each is computed in chunks (its state
    tensor would exceed :data:`TILE_MIN_BYTES`) rather than layer by layer on the whole tile."""
    return pairs * per_pair * itemsize > TILE_MIN_BYTES


def _conv(lay: Conv, S: torch.Tensor, T, shape: tuple):
    """The convolution rule of :meth:`Conv.apply_kernel` (NTK parameterization) on a chunk ``(c, *shape, *shape)``."""
    nd = len(shape)
    geo = lay.geometry(shape)
    w2, b2 = lay.tap_variances()
    b2t = torch.tensor(b2, dtype=S.dtype, device=S.device)

    def filt(t):  # a chunk (c, *shape, *shape): spatial axis pair d is (1 + d, 1 + nd + d)
        return Conv.filter_offsets(t, lambda d: (1 + d, 1 + nd + d), geo)

    s_sum = filt(S)
    S = torch.add(b2t, s_sum, alpha=w2, out=s_sum if s_sum is not S else None)
    if isinstance(T, torch.Tensor):
        t_sum = filt(T)
        own = t_sum is not T
        if lay.trainable:
            T = torch.add(S, t_sum, alpha=w2, out=t_sum if own else None)
        else:
            T = t_sum.mul_(w2) if own else t_sum * w2
    elif T is not None:  # Theta is still the constant 0
        T = S.clone() if lay.trainable else 0.0
    return S, T, tuple(g[4] for g in geo)


def _diagonal(S: torch.Tensor, nd: int) -> torch.Tensor:
    """Sigma(p, p) of a chunk ``(c, *shape, *shape)`` as ``(c, *shape)`` (a view)."""
    for m in range(nd, 0, -1):
        S = torch.diagonal(S, dim1=1, dim2=1 + m)
    return S


def _activation(act: Activation, S, T, q1, q2, fused: bool, pool: bool):
    """The dual of ``act`` on a merged chunk ``(c, M, M)`` with variances ``q1 (c, M, 1)``, ``q2 (c, 1, M)``;
    ``pool``: return the means over all position pairs instead, ``(c,)`` each (the state is never written)."""
    if fused and isinstance(act, ABRelu) and (T is None or isinstance(T, torch.Tensor)):
        f = act.fused_factors(q1, q2, S.dtype)
        if f is not None:
            if pool:
                s, t = _fused.abrelu_dual_sum(S, T, *f)
                m = S.shape[1] * S.shape[2]
                return s / m, (None if T is None else t / m)
            o, t = _fused.abrelu_dual(S, T, *f)
            return o, (None if T is None else t)  # T = None: the second output is the derivative, not needed
    out, dot = act.dual(S, q1, q2, derivative=T is not None)
    if T is None:
        ntk = None
    elif isinstance(T, torch.Tensor) and isinstance(dot, torch.Tensor):
        ntk = T.mul_(dot)
    else:
        ntk = T * dot
    if pool:
        return out.mean(dim=(1, 2)), (ntk.mean(dim=(1, 2)) if isinstance(ntk, torch.Tensor) else ntk)
    return out, ntk


def _pool(t, c: int):
    if not isinstance(t, torch.Tensor):
        return t
    return t.reshape(c, -1).mean(dim=1)


def gap_stack(a: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, n_self: int, layers, fused: bool,
              need_ntk: bool, chunk: int | None = None, native: bool | None = None):
    """Sigma and Theta after ``layers`` (a stack accepted by :func:`plan`, ending in the GlobalAvgPool) for the
    pairs ``(a[r1[m]], a[r2[m]])`` of the channels-last inputs ``a`` ``(n, *size, C)`` (already scaled by
    1 / sqrt(C)). The first ``n_self`` pairs must be the self pairs ``(m, m)``, m < n_self (their diagonals are
    the variances of inputs 0 .. n_self - 1, which every pair's inputs must be among). Returns ``(nngp, ntk)``
    of shape ``(len(r1),)`` (``ntk`` None when not needed, or a float when still constant). ``native``: whether
    the native loop may be used (default: ``fused``; it costs no compilation per process, so
    :meth:`ntkit.Architecture.kernel` allows it unless ``fused=False``)."""
    n, size, C = a.shape[0], tuple(a.shape[1:-1]), a.shape[-1]
    steps = native_plan(layers, size, fused if native is None else native, a.dtype, a.device)
    if steps is not None:
        try:
            return native_stack(a, r1, r2, layers, steps, need_ntk)
        except _Fallback:
            pass
    steps = compiled_plan(layers, size, fused, need_ntk, a.dtype)
    if steps is not None:
        try:
            return compiled_stack(a, r1, r2, n_self, layers, steps)
        except _Fallback:
            pass
    nd = len(size)
    P = len(r1)
    flat = a.reshape(n, -1, C)
    if chunk is None:
        per = math.prod(size) ** 2 * a.element_size()
        chunk = max(1, int(CHUNK_BYTES // per))
    body = layers[:-1]
    records: dict[int, torch.Tensor] = {}
    nngp = a.new_empty(P)
    ntk_out = a.new_empty(P) if need_ntk else None
    ntk_const = None
    bounds = [(c0, min(c0 + chunk, n_self)) for c0 in range(0, n_self, chunk)]
    bounds += [(c0, min(c0 + chunk, P)) for c0 in range(n_self, P, chunk)]
    for c0, c1 in bounds:
        c = c1 - c0
        i1, i2 = r1[c0:c1], r2[c0:c1]
        S = torch.bmm(flat[i1], flat[i2].transpose(1, 2))
        S = S.view(c, *size, *size)
        T = 0.0 if need_ntk else None
        shape = size
        pooled = None
        for li, lay in enumerate(body):
            if isinstance(lay, Conv):
                S, T, shape = _conv(lay, S, T, shape)
                continue
            if c0 < n_self:  # self pairs: record the per-position variances of inputs c0 .. c1 - 1
                if li not in records:
                    records[li] = a.new_empty((n, *shape))
                records[li][c0:c1] = _diagonal(S, nd)
            q = records[li]
            M = math.prod(shape)
            q1, q2 = q[i1].reshape(c, M, 1), q[i2].reshape(c, 1, M)
            Sm = S.reshape(c, M, M)
            Tm = T.reshape(c, M, M) if isinstance(T, torch.Tensor) else T
            last = li == len(body) - 1
            out = _activation(lay, Sm, Tm, q1, q2, fused, pool=last)
            if last:
                pooled = out
                break
            S, T = out[0].view(c, *shape, *shape), (out[1].view(c, *shape, *shape)
                                                   if isinstance(out[1], torch.Tensor) else out[1])
        if pooled is None:
            pooled = (_pool(S, c), _pool(T, c))
        nngp[c0:c1] = pooled[0]
        if need_ntk:
            if isinstance(pooled[1], torch.Tensor):
                ntk_out[c0:c1] = pooled[1]
            else:
                ntk_const = pooled[1]
    if need_ntk and ntk_const is not None:
        ntk_out = ntk_const  # no trainable layer: Theta stays a constant
    return nngp, ntk_out


def _meta(layers) -> dict:
    """The state fields after the pooling, as the layer-by-layer path sets them."""
    convs = [lay for lay in layers if isinstance(lay, Conv)]
    last = layers[-2]
    return dict(width=convs[-1].out_chan, gaussian=isinstance(last, Conv), fresh=isinstance(last, Conv),
                deps=frozenset(), shape=(), pixel_pairs=False)


def gap_state(a1: torch.Tensor, a2: torch.Tensor | None, pairs: tuple | None, layers, fused: bool,
              need_ntk: bool, chunk: int | None = None, native: bool | None = None) -> KernelState:
    """The flat kernel state after the GlobalAvgPool for one tile, exactly as the layer-by-layer path leaves it:
    a symmetric tile (``a2`` None, ``pairs = (r1, r2, b)`` with the b self pairs first) gives the pairwise tied
    state of those pairs; a tile of two different blocks gives the ``(b1, b2)`` matrix state with the
    self-kernels of both blocks (their self pairs are computed too, as there)."""
    meta = _meta(layers)
    if a2 is None:
        r1, r2, b = pairs
        nngp, ntk = gap_stack(a1, r1, r2, b, layers, fused, need_ntk, chunk, native)
        return KernelState(nngp=nngp, ntk=ntk, var1=nngp[:b][r1], var2=nngp[:b][r2], tied=True, pairs=pairs,
                           **meta)
    b1, b2 = a1.shape[0], a2.shape[0]
    n = b1 + b2
    a = torch.cat([a1, a2])
    ar = torch.arange(n, device=a.device)
    i = torch.arange(b1, device=a.device).repeat_interleave(b2)
    j = torch.arange(b1, n, device=a.device).repeat(b1)
    nngp, ntk = gap_stack(a, torch.cat([ar, i]), torch.cat([ar, j]), n, layers, fused, need_ntk, chunk, native)
    own = nngp[:n]
    ntk = ntk[n:].view(b1, b2) if isinstance(ntk, torch.Tensor) else ntk
    return KernelState(nngp=nngp[n:].view(b1, b2), ntk=ntk, var1=own[:b1].unsqueeze(1), var2=own[b1:].unsqueeze(0),
                       **meta)


# -- one compiled loop per convolution, one per activation ---------------------------------------------------
# With ``fused`` the eager window sums (3 + 3 shifted additions over the chunk per tensor and layer, each a
# pass over memory) dominate. For 2-D stride-1 stacks of trainable convolutions and ReLU-family activations
# whose padded widths agree, every convolution is instead one compiled loop over a zero-padded layout, and
# every activation one compiled loop whose output fills the next convolution's padded input:
#
# * The input of a convolution is kept as ``(1, Hp, Wp, Hp * Wp)``: the first input's positions (h, w) padded,
#   and the second input's positions flattened into rows of the padded width Wp (zeros in the padding). A
#   filter offset (oh, ow) then reads one *contiguous* range of the flat axis, at oh Wp + ow, for every
#   output position p' = h' Wp + w' -- no masks, long vectorised rows. The Wp - Wo columns per row past the
#   image are computed too (garbage) and masked to zero by the activation, which is exactly the next padded
#   input's zero padding there.
# * The activation's loop writes the unpadded layout; an eager copy puts it into the interior of the next
#   convolution's padded input, two buffers per geometry whose zero borders are written once per call. (Writing
#   the padded layout inside the compiled loop, a ``pad`` of the dual, made inductor emit a slower loop:
#   9.1 vs 4.0 ms per pair and layer in float64, while the copy costs ~1 ms per tensor; benchmarks/RESULTS.md.)
#   The first activation takes Sigma once (Theta equals it after the first convolution), and the first
#   convolution's output is passed as a strided view, without copies.
# * The first convolution (the 1x1 convolution of the im2col patches) is one batched matrix product of the
#   first input's patches with the second's, zero-padded to that layout, with the bias folded in (baddbmm).
# * The last activation and the pooling are one loop (a masked sum), as above.
# One pair per call (static shapes: each geometry compiles once).


class _Fallback(Exception):
    """The native or compiled stack cannot take this tile (a zero variance, building or compiling failed): the
    next path (native -> compiled -> chunks) computes it."""


def stack_geometry(layers, size: tuple) -> list | None:
    """The convolutions' geometry for the compiled and the native stacks, or None when ``layers`` (ending in the
    GlobalAvgPool, on inputs of spatial ``size``) is not a 2-D stack they compute: the first (patch, 1 x 1)
    convolution, then (ReLU-family activation, stride-1 trainable convolution) pairs whose padded widths agree,
    then a last ReLU-family activation. One dict per convolution after the first (possibly none)."""
    body = layers[:-1]
    if len(size) != 2 or len(body) < 2 or len(body) % 2:
        return None
    convs, acts = body[0::2], body[1::2]
    if not all(isinstance(c, Conv) and c.trainable and c.strides == (1, 1) for c in convs):
        return None
    if not all(isinstance(a, ABRelu) and a.a != a.b for a in acts):
        return None
    if convs[0].filter_shape != (1, 1):
        return None
    steps, shape = [], tuple(size)
    for c in convs[1:]:
        geo = c.geometry(shape)  # (n, f, s, pad, out) per axis
        (h, fh, _, ph, ho), (w, fw, _, pw, wo) = geo
        steps.append(dict(conv=c, H=h, W=w, fh=fh, fw=fw, ph=ph, pw=pw, Ho=ho, Wo=wo, Hp=ho + fh - 1, Wp=wo + fw - 1))
        shape = (ho, wo)
    # an activation writes the next convolution's padded input in its own row width: they must agree
    if any(a["Wp"] != b["Wp"] for a, b in zip(steps, steps[1:])):
        return None
    return steps


def compiled_plan(layers, size: tuple, fused: bool, need_ntk: bool, dtype=torch.float64):
    """The geometry of the compiled stack for ``layers`` (ending in the GlobalAvgPool) on inputs of spatial
    ``size``, or None when it does not apply (then :func:`gap_stack` computes it). Float64 only: in float32
    the arithmetic is cheap enough that the chunks' eager passes are as fast (measured on the 28 x 28
    benchmark of ``benchmarks/bench_cntk.py --gap-paths``)."""
    if not (fused and need_ntk and len(size) == 2 and dtype == torch.float64 and _fused.compile_available()):
        return None
    if math.prod(size) ** 2 < COMPILED_MIN_NUMBERS:  # small images: the per-call overhead would dominate
        return None
    steps = stack_geometry(layers, size)
    return steps or None  # at least two convolutions


def _wsum_fn(st, w2: float, b2: float):
    Ho, Wo, Wp, fh, fw, ph, pw = st["Ho"], st["Wo"], st["Wp"], st["fh"], st["fw"], st["ph"], st["pw"]
    L = (Ho - 1) * Wp + Wo
    order_h = [ph] + [o for o in range(fh) if o != ph] if ph else list(range(fh))
    order_w = [pw] + [o for o in range(fw) if o != pw] if pw else list(range(fw))

    def wsum(X):
        total = None
        for ow in order_w:
            part = None
            for oh in order_h:
                o = oh * Wp + ow
                t = X[:, oh:oh + Ho, ow:ow + Wo, o:o + L]
                part = t if part is None else part + t
            total = part if total is None else total + part
        return total

    def fn(PS, PT):
        S = b2 + w2 * wsum(PS)
        return S, S + w2 * wsum(PT)

    return fn


def _masked_dual(d0: float, k: float):
    """The dual on the unpadded layout, zero where ``mask`` is False (the next convolution's padding)."""
    def fn(S, T, r1, r2, s1k, s2, mask):
        o, t = _fused.abrelu_dual_math(S, T, r1, r2, s1k, s2, d0, k, acos=_fused.acos_poly)
        return torch.where(mask, o, 0.0), torch.where(mask, t, 0.0)
    return fn


def _dual_masked_fn(d0: float, k: float, first: bool):
    """:func:`_masked_dual`; ``first``: Theta is Sigma (after the first, trainable convolution), passed once."""
    fn = _masked_dual(d0, k)
    if first:
        return lambda S, r1, r2, s1k, s2, mask: fn(S, S, r1, r2, s1k, s2, mask)
    return fn


def _dual_sum_fn(d0: float, k: float):
    """The sums of :func:`_masked_dual` (the last activation and the pooling)."""
    fn = _masked_dual(d0, k)

    def total(S, T, r1, r2, s1k, s2, mask):
        o, t = fn(S, T, r1, r2, s1k, s2, mask)
        return o.sum(), t.sum()
    return total


def _call(key, make, *args):
    """The compiled loop of ``key``; :class:`_Fallback` (to the chunked eager path) when it cannot run."""
    out = _fused.run_compiled(key, make, args, "fused CNTK layers", dynamic=False, stacklevel=4)
    if out is _fused.NOT_COMPILED:
        raise _Fallback
    return out


def compiled_stack(a: torch.Tensor, r1, r2, n_self: int, layers, steps):
    """:func:`gap_stack` (``need_ntk``) by the compiled loops described above, one pair at a time."""
    n, size, C = a.shape[0], tuple(a.shape[1:-1]), a.shape[-1]
    H, W = size
    dt, dev = a.dtype, a.device
    body = layers[:-1]
    convs, acts = body[0::2], body[1::2]
    first = steps[0]
    Hp, Wp = first["Hp"], first["Wp"]
    # the first input's patches (rows p = (h, w)) and the second's zero-padded to the rows of conv 2's input
    A1 = a.reshape(n, H * W, C)
    A2 = torch.zeros((n, Hp, Wp, C), dtype=dt, device=dev)
    A2[:, first["ph"]:first["ph"] + H, first["pw"]:first["pw"] + W] = a
    A2 = A2.reshape(n, Hp * Wp, C).transpose(1, 2)
    c0 = convs[0]
    w2_0, b2_0 = c0.tap_variances()  # a 1 x 1 convolution: W_std^2
    b2_0 = torch.tensor(b2_0, dtype=dt, device=dev)
    masks, geo = [], []
    for s in steps:  # the activation before conv l writes its H x W positions in rows of conv l's padded width
        L = (s["H"] - 1) * s["Wp"] + s["W"]
        masks.append((torch.arange(L, device=dev) % s["Wp"]) < s["W"])
        geo.append((s["H"], s["W"], s["Wp"], L))
    last = steps[-1]
    Lo = (last["Ho"] - 1) * last["Wp"] + last["Wo"]
    masks.append((torch.arange(Lo, device=dev) % last["Wp"]) < last["Wo"])
    geo.append((last["Ho"], last["Wo"], last["Wp"], Lo))
    records = [a.new_empty((n, g[0], g[1])) for g in geo]
    # the padded inputs of the convolutions: one pair of buffers per geometry (the window sums return fresh
    # tensors before the next activation overwrites a buffer's interior; its zero borders are never written)
    by_geo: dict = {}
    pads = []
    for st in steps:
        key = tuple(st[name] for name in ("H", "W", "Hp", "Wp", "ph", "pw"))
        if key not in by_geo:
            by_geo[key] = tuple(a.new_zeros((1, st["Hp"], st["Wp"], st["Hp"] * st["Wp"])) for _ in range(2))
        pads.append(by_geo[key])
    P = len(r1)
    nngp, ntk = a.new_empty(P), a.new_empty(P)
    r1l, r2l = r1.tolist(), r2.tolist()
    for m in range(P):
        i, j = r1l[m], r2l[m]
        S0 = torch.baddbmm(b2_0, A1[i:i + 1], A2[j:j + 1], alpha=w2_0)
        L = geo[0][3]
        S = S0.view(1, H, W, Hp * Wp)[..., first["ph"] * Wp + first["pw"]:][..., :L]
        T = None  # Theta = Sigma after the first (trainable) conv: the first dual takes Sigma once
        for li, act in enumerate(acts):
            Hh, Ww, Wpp, L = geo[li]
            if m < n_self:  # the diagonal Sigma(p, p) of a self pair: its input's variances
                records[li][m] = torch.as_strided(S, (Hh, Ww), (S.stride(1) + Wpp * S.stride(3),
                                                                 S.stride(2) + S.stride(3)), S.storage_offset())
            q2 = torch.ones((Hh, Wpp), dtype=dt, device=dev)  # the second input's variances in the padded rows
            q2[:, :Ww] = records[li][j]
            fac = act.fused_factors(records[li][i].reshape(1, Hh, Ww, 1), q2.reshape(1, 1, 1, -1)[..., :L], dt)
            if fac is None:  # a zero variance: the chunks' eager special cases
                raise _Fallback
            *f, d0, kk = fac
            dkey = (float(d0), float(kk), dt, dev.type)
            if li == len(acts) - 1:
                s, t = _call(("cntk-dual-sum",) + dkey + (S.shape, S.stride()),
                             lambda: _dual_sum_fn(d0, kk), S, T, *f, masks[li])
                nngp[m], ntk[m] = s, t
                break
            st = steps[li]
            first_dual = T is None
            args = (S,) if first_dual else (S, T)
            o, t = _call(("cntk-dual-masked", first_dual) + dkey + (S.shape, S.stride()),
                         lambda: _dual_masked_fn(d0, kk, first_dual), *args, *f, masks[li])
            PS, PT = pads[li]  # zero padding written once; the interior (masked columns included) each pair
            inner = (slice(None), slice(st["ph"], st["ph"] + st["H"]), slice(st["pw"], st["pw"] + st["W"]))
            off = st["ph"] * st["Wp"] + st["pw"]
            PS[inner + (slice(off, off + L),)].copy_(o)
            PT[inner + (slice(off, off + L),)].copy_(t)
            del o, t
            cv = convs[li + 1]
            w2, b2 = cv.tap_variances()
            gkey = tuple(st[name] for name in ("Ho", "Wo", "Wp", "fh", "fw", "ph", "pw"))
            S, T = _call(("cntk-wsum", dt, dev.type, w2, b2) + gkey, lambda: _wsum_fn(st, w2, b2), PS, PT)
    m_out = float(geo[-1][0] * geo[-1][1]) ** 2
    return nngp / m_out, ntk / m_out


# -- the native stack: all layers fused in a wavefront over rows (C, ntkit/kernels/_cntk_gap.c) ---------------
# The compiled stack above still streams every layer's state of a pair (4.9 MB per tensor for 28 x 28 images in
# float64) through memory between its loops, and pays eager copies into padded buffers. The native loop keeps
# the same layouts but never holds more than a few rows of each layer: activation l's row r (all columns of the
# first input, all positions of the second) is summed over the filter's columns into a ring of FH rows, and
# convolution l + 1's output row h -- the sum of ring rows h - ph .. h - ph + FH - 1 -- is computed as soon as
# its rows exist, followed at once by activation l + 1 (the deepest ready row first). 2.4 MB of rings per
# thread for the 28 x 28 benchmark, so every layer is consumed from cache; the first convolution is the patch
# product computed row by row, the last activation is summed as it is computed. Pairs are split between
# torch.get_num_threads() threads (ctypes releases the GIL). The per-position variances of every input at
# every activation come from the same-position recursion computed by the same C expressions in the same order,
# so a self pair's diagonal equals them bitwise and its correlations snap to exactly 1 as in the torch paths.


def native_plan(layers, size: tuple, allowed: bool, dtype, device) -> list | None:
    """The geometry of the native stack (:func:`stack_geometry`) when it applies: ``allowed`` (by the caller:
    not ``fused=False``), float64 on the CPU, and native loops not switched off."""
    if not (allowed and dtype == torch.float64 and device.type == "cpu" and _native.compiling_allowed()):
        return None
    return stack_geometry(layers, size)


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def native_stack(a: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, layers, steps: list, need_ntk: bool):
    """:func:`gap_stack` by the native loop described above (all pairs; every input's variances are computed
    from its own same-position recursion). :class:`_Fallback` when the library cannot be built or an input has
    a zero variance (the chunks' eager special cases)."""
    lib = _native.load("cntk_gap")
    if lib is None:
        raise _Fallback
    _declare(lib)
    dt = torch.float64
    a = a.contiguous()
    n, H, W, K = a.shape
    body = layers[:-1]
    convs, acts = body[0::2], body[1::2]
    L = len(acts)
    geo = torch.zeros((L, 10), dtype=torch.int64)
    wb, dk = torch.zeros(2 * L, dtype=dt), torch.zeros(2 * L, dtype=dt)
    for li, st in enumerate(steps, start=1):
        geo[li] = torch.tensor([st[k] for k in ("H", "W", "fh", "fw", "ph", "pw", "Ho", "Wo", "Hp", "Wp")])
        wb[2 * li], wb[2 * li + 1] = convs[li].tap_variances()
    w0, bias0 = convs[0].tap_variances()  # a 1 x 1 convolution: W_std^2
    Wq = steps[0]["Wp"] if steps else W
    hl = [H] + [st["Ho"] for st in steps]
    wl = [W] + [st["Wo"] for st in steps]
    Ll = [(h - 1) * Wq + w for h, w in zip(hl, wl)]
    off1 = torch.tensor([0] + [n * h * w for h, w in zip(hl, wl)], dtype=torch.int64).cumsum(0)
    off2 = torch.tensor([0] + [n * m for m in Ll], dtype=torch.int64).cumsum(0)
    offm = torch.tensor([0] + Ll, dtype=torch.int64).cumsum(0)
    A1 = a.reshape(n, H * W, K)
    if steps:  # the second input's patches in the flat padded-row layout of the second convolution's input
        ph, pw = steps[0]["ph"], steps[0]["pw"]
        A2 = a.new_zeros((n, steps[0]["Hp"], Wq, K))
        A2[:, ph:ph + H, pw:pw + W] = a
        A2T = A2.reshape(n, -1, K)[:, ph * Wq + pw:][:, :Ll[0]].transpose(1, 2).contiguous()
    else:
        A2T = A1.transpose(1, 2).contiguous()
    coef = torch.tensor(_fused._ASIN, dtype=dt)
    Q, R1, S1K = (a.new_zeros(int(off1[-1])) for _ in range(3))
    R2, S2 = a.new_ones(int(off2[-1])), a.new_ones(int(off2[-1]))
    M = a.new_zeros(int(offm[-1]))
    for li, act in enumerate(acts):
        lib.ntkit_cntk_gap_variances(li, n, H, W, K, _ptr(A1), w0, bias0, _ptr(geo), _ptr(wb),
                                     _ptr(dk), _ptr(coef), _ptr(R1), _ptr(S1K),
                                     _ptr(off1), _ptr(Q))
        q = Q[int(off1[li]):int(off1[li + 1])]
        if not bool(torch.isfinite(q).all()):
            raise _Fallback
        fac = act.fused_factors(q, q, dt)
        if fac is None:  # a zero variance
            raise _Fallback
        f1, f2, f1k, f2s, d0, kk = fac
        dk[2 * li], dk[2 * li + 1] = d0, kk
        R1[int(off1[li]):int(off1[li + 1])] = f1
        S1K[int(off1[li]):int(off1[li + 1])] = f1k
        pos = (torch.arange(hl[li])[:, None] * Wq + torch.arange(wl[li])[None]).reshape(-1)
        R2[int(off2[li]):int(off2[li + 1])].view(n, Ll[li])[:, pos] = f2.view(n, -1)
        S2[int(off2[li]):int(off2[li + 1])].view(n, Ll[li])[:, pos] = f2s.view(n, -1)
        M[int(offm[li]):int(offm[li + 1])][pos] = 1.0
    P = len(r1)
    pi, pj = r1.to(torch.int64).contiguous(), r2.to(torch.int64).contiguous()
    nngp, ntk = a.new_empty(P), a.new_empty(P)
    threads = max(1, min(torch.get_num_threads(), P))
    work = lib.ntkit_cntk_gap_workspace(L, H, W, _ptr(geo))
    stop = threading.Event()

    def part(t: int):
        buf = _workspace(work, a)
        mine = torch.arange(t, P, threads)
        for start in range(0, len(mine), NATIVE_BATCH):  # in batches: an interrupt is seen between them
            if stop.is_set():
                return
            idx = mine[start:start + NATIVE_BATCH]
            i, j = pi[idx].contiguous(), pj[idx].contiguous()
            s, u = a.new_empty(len(idx)), a.new_empty(len(idx))
            lib.ntkit_cntk_gap_pairs(L, H, W, K, _ptr(A1), _ptr(A2T), w0, bias0, _ptr(geo), _ptr(wb), _ptr(dk),
                                     _ptr(coef), _ptr(R1), _ptr(S1K), _ptr(off1), _ptr(R2), _ptr(S2), _ptr(off2),
                                     _ptr(M), _ptr(offm), len(idx), _ptr(i), _ptr(j), _ptr(s), _ptr(u), _ptr(buf))
            nngp[idx], ntk[idx] = s, u

    if threads == 1:
        part(0)
    else:
        with ThreadPoolExecutor(threads) as pool:
            try:
                for f in [pool.submit(part, t) for t in range(threads)]:
                    f.result()
            except BaseException:  # e.g. KeyboardInterrupt: the workers stop after their current batch
                stop.set()
                raise
    m_out = float(hl[-1] * wl[-1]) ** 2
    return nngp / m_out, (ntk / m_out if need_ntk else None)


def _workspace(numbers: int, like: torch.Tensor) -> torch.Tensor:
    """One thread's workspace of the native stack: its rings and rows (zeros: their padding is never written).
    About 2 FH Wo Hp Wp numbers per convolution after the first, e.g. 2.4 MB for the 28 x 28 benchmark's three
    layers."""
    return like.new_zeros(numbers)


def _declare(lib) -> None:
    """The C signatures (ctypes would otherwise pass Python ints as 32-bit ints)."""
    if getattr(lib, "_ntkit_declared", False):
        return
    i64, dbl, ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
    lib.ntkit_cntk_gap_workspace.argtypes = [i64, i64, i64, ptr]
    lib.ntkit_cntk_gap_workspace.restype = i64
    lib.ntkit_cntk_gap_variances.argtypes = [i64, i64, i64, i64, i64, ptr, dbl, dbl] + [ptr] * 8
    lib.ntkit_cntk_gap_variances.restype = None
    lib.ntkit_cntk_gap_pairs.argtypes = [i64] * 4 + [ptr] * 2 + [dbl] * 2 + [ptr] * 12 + [i64] + [ptr] * 5
    lib.ntkit_cntk_gap_pairs.restype = None
    lib._ntkit_declared = True
