"""One architecture description, two views: exact infinite-width kernels and the finite network."""

from __future__ import annotations

import math
from collections import namedtuple
from functools import lru_cache
from typing import Any, Sequence

import torch
from torch import nn

import numpy as np

from .._progress import progress
from .._validation import (ConfigError, as_float_tensor, check_memory, check_pair, empty_output, format_bytes,
                           available_memory_bytes, resolve_dtype)
from . import _conv_gap, recurrent
from ._fused import auto_fuse
from ._state import KernelState, drop_pixel_pairs, input_state
from .base import KernelFunction
from .conv import Conv
from .layers import (PARAMETERIZATIONS, BuildContext, Dense, FanInSum, FanOut, Identity, KernelContext, Layer,
                     Parallel, Serial, SpatialShape)
from .pooling import AvgPool, Flatten, GlobalAvgPool

__all__ = ["Architecture", "serial", "residual", "mlp", "FiniteNetwork", "KERNEL_NAMES"]

KERNEL_NAMES = ("nngp", "ntk")
INITS = ("gaussian", "orthogonal")
# Number of tile-sized float buffers alive at once while a layer stack runs on a tile (measured
# upper bound for the arc-cosine family and the residual combinators, with a margin).
_LIVE_TILES = 12


# image / signal layouts: name -> channels first?
_LAYOUTS = {"NHWC": False, "NCHW": True, "NLC": False, "NCL": True}


def symmetric_tile_pairs(b: int, device=None) -> tuple:
    """The pairs (i, j), i <= j, of a tile of ``b`` inputs with themselves, the b self pairs (i, i) first:
    ``(r1, r2, b)`` as :class:`~ntkit.kernels._state.KernelState` ``pairs`` takes them. A kernel is
    symmetric, k(x_j, x_i) = k(x_i, x_j) (for position-pair covariances, the transpose), so these
    b (b + 1) / 2 pairs give the whole b x b tile."""
    iu = torch.triu_indices(b, b, offset=1, device=device)
    ar = torch.arange(b, device=device)
    return torch.cat([ar, iu[0]]), torch.cat([ar, iu[1]]), b


def _walk(layer: Layer):
    """The layers of a description in traversal order (inside serial lists and parallel branches)."""
    if isinstance(layer, Serial):
        for lay in layer.layers:
            yield from _walk(lay)
    elif isinstance(layer, Parallel):
        for b in layer.branches:
            yield from _walk(b)
    else:
        yield layer


@lru_cache(maxsize=None)
def _kernels_tuple(names: tuple) -> type:
    return namedtuple("Kernels", names)


def _parse_get(get) -> tuple[tuple[str, ...], bool]:
    if isinstance(get, str):
        names, single = (get,), True
    else:
        try:
            names, single = tuple(get), False
        except TypeError:
            raise ValueError(f"get must be 'nngp', 'ntk' or a tuple of them, got {get!r}") from None
    if not names:
        raise ValueError("get is empty; ask for 'nngp', 'ntk' or both")
    for n in names:
        if n not in KERNEL_NAMES:
            raise ValueError(f"unknown kernel {n!r} in get; choose from {KERNEL_NAMES}")
    if len(set(names)) != len(names):
        raise ValueError(f"get lists a kernel twice: {names}")
    return names, single


class FiniteNetwork(nn.Module):
    """The finite network of an :class:`Architecture` (returned by :meth:`Architecture.init`).

    ``forward(x)`` takes a batch and returns ``(n, out_dim)``: ``(n, ...)`` for fully-connected
    architectures (trailing dimensions are flattened into features), images ``(n, H, W, C)`` (or
    ``(n, C, H, W)`` when built with ``layout="NCHW"``) or signals ``(n, L, C)`` for convolutional ones.
    """

    def __init__(self, body: nn.Module, architecture: "Architecture", in_features, out_features: int,
                 layout: str = "NHWC"):
        super().__init__()
        self.body = body
        self.in_features = in_features  # int, or the per-sample shape (*size, C) of spatial inputs
        self.out_features = out_features
        self.layout = layout
        object.__setattr__(self, "architecture", architecture)  # plain attribute, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if recurrent.is_sequence_architecture(self.architecture.layers):  # sequences of different lengths
            first = next(self.parameters())
            if isinstance(x, recurrent.Sequences) and x.values.ndim == 3 and x.lengths.ndim == 1:
                # already padded (and validated by as_sequences): passed on as it is, so that batched
                # transforms (torch.func.vmap over samples) can run the network
                return self.body(recurrent.Sequences(x.values.to(first.dtype), x.lengths))
            return self.body(recurrent.as_sequences(x, "x", dtype=first.dtype, device=first.device))
        if isinstance(self.in_features, tuple):
            return self.body(self._images(x))
        if x.ndim < 2:
            raise ValueError(f"expected a batch (n, {self.in_features}), got shape {tuple(x.shape)}; "
                             "reshape a single sample with x.reshape(1, -1)")
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"the network expects {self.in_features} input features, got {x.shape[1]}")
        return self.body(x)

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        """Check a batch of images / signals and move channels to axis 1 (torch's convolution layout)."""
        *size, c = self.in_features
        first = _LAYOUTS[self.layout]
        names = ("H", "W") if len(size) == 2 else ("L",)
        want = (f"(n, C={c}, " if first else "(n, ") + ", ".join(f"{a}={v}" for a, v in zip(names, size)) + \
            ("" if first else f", C={c}") + ")"
        if x.ndim != len(size) + 2:
            raise ValueError(f"the network expects a batch of {'images' if len(size) == 2 else 'signals'} {want} "
                             f"({self.layout}), got shape {tuple(x.shape)}")
        got_c = x.shape[1] if first else x.shape[-1]
        got_size = tuple(x.shape[2:] if first else x.shape[1:-1])
        if got_c != c:
            other = x.shape[-1] if first else x.shape[1]
            hint = ""
            if other == c:
                hint = f"; the input looks {'channels-last' if first else 'channels-first'}: build the network " \
                       f"with layout={'NHWC' if first else 'NCHW'!r}"
            raise ValueError(f"the network expects {c} input channels ({self.layout} {want}), got {got_c} in "
                             f"shape {tuple(x.shape)}{hint}")
        if got_size != tuple(size):
            raise ValueError(f"the network was built for spatial size {tuple(size)}, got {got_size} in shape "
                             f"{tuple(x.shape)}")
        return x if first else x.movedim(-1, 1)


class Architecture:
    """A network description (a serial list of layers) in a parameterization.

    The same description gives the exact infinite-width kernels (:meth:`kernel`) and the finite
    network (:meth:`init`), so finite and infinite can always be compared.

    Parameters
    ----------
    layers : sequence of Layer
        Applied in order. Every network should end in a readout ``Dense``.
    parameterization : {"ntk", "standard"}
        NTK parameterization (Jacot et al. 2018, default) or standard parameterization
        (Lee et al. 2019, App. C; its NTK depends on the finite widths).
    input_dim : int, optional
        Number of input features; needed by :meth:`init` if not passed there, and checked by
        :meth:`kernel`.

    Examples
    --------
    >>> import ntkit, torch
    >>> arch = ntkit.serial(ntkit.Dense(512, W_std=2**0.5), ntkit.Relu(), ntkit.Dense(1))
    >>> x = torch.randn(5, 3, dtype=torch.float64)
    >>> arch.kernel(x, get="ntk").shape
    torch.Size([5, 5])
    >>> net = arch.init(width=1024, seed=0, in_features=3)
    >>> net(x).shape
    torch.Size([5, 1])
    """

    def __init__(self, layers: Sequence[Layer], parameterization: str = "ntk", input_dim: int | None = None):
        if parameterization not in PARAMETERIZATIONS:
            raise ConfigError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        if input_dim is not None and (int(input_dim) != input_dim or input_dim < 1):
            raise ConfigError(f"input_dim must be a positive integer, got {input_dim!r}")
        self.body = layers if isinstance(layers, Serial) else Serial(list(layers))
        if not self.body.layers:
            raise ConfigError("an architecture needs at least one layer")
        self.parameterization = parameterization
        self.input_dim = None if input_dim is None else int(input_dim)

    # -- description ------------------------------------------------------------------------------
    @property
    def layers(self) -> tuple:
        return self.body.layers

    def __repr__(self) -> str:
        inner = ",\n    ".join(map(repr, self.layers))
        return f"Architecture([\n    {inner}\n], parameterization={self.parameterization!r})"

    def __eq__(self, other) -> bool:
        return (isinstance(other, Architecture) and self.body == other.body
                and self.parameterization == other.parameterization and self.input_dim == other.input_dim)

    def to_config(self) -> dict:
        """JSON/YAML-able dict in the layer schema of neural-tangents' reference README."""
        cfg = {"parameterization": self.parameterization, "layers": [lay.to_config() for lay in self.layers]}
        if self.input_dim is not None:
            cfg["input_dim"] = self.input_dim
        return cfg

    def with_width(self, width: int | Sequence[int] | None = None, out_dim: int | None = None) -> "Architecture":
        """The same description with hidden widths (every Dense and every Conv's channels, but the last
        Dense) and/or readout width set.

        ``width`` is an int (all hidden layers) or a sequence with one entry per hidden Dense/Conv, in
        order. In the NTK parameterization widths do not change the kernels; in the standard
        parameterization they do.
        """
        if recurrent.is_sequence_architecture(self.layers):  # the rnns' out_dims are hidden widths too
            return recurrent.with_width(self, width, out_dim)
        dense = self.body.dense_layers()
        if not dense:
            if width is not None or out_dim is not None:
                raise ConfigError("this architecture has no Dense layer whose width could be set")
            return self
        n_hidden = len(dense) - 1
        if width is None:
            widths = [None] * n_hidden
        elif isinstance(width, (int,)) or (isinstance(width, float) and float(width).is_integer()):
            widths = [int(width)] * n_hidden
        else:
            widths = [int(w) for w in width]
            if len(widths) != n_hidden:
                raise ConfigError(f"width lists {len(widths)} values but the architecture has {n_hidden} hidden "
                                  "Dense layers")
        for w in widths:
            if w is not None and w < 1:
                raise ConfigError(f"widths must be positive integers, got {width!r}")
        if out_dim is not None and (int(out_dim) != out_dim or out_dim < 1):
            raise ConfigError(f"out_dim must be a positive integer, got {out_dim!r}")
        counter = iter(range(len(dense)))

        def replace(d):
            i = next(counter)
            new = out_dim if i == n_hidden else widths[i]
            if new is None:
                return d
            return d.with_out_dim(new)

        return Architecture(self.body.map_dense(replace).layers, self.parameterization, self.input_dim)

    # -- infinite width ---------------------------------------------------------------------------
    def kernel(
        self,
        x1: Any,
        x2: Any = None,
        get: str | Sequence[str] = ("nngp", "ntk"),
        *,
        diagonal: bool = False,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        memory_budget: float | None = None,
        block_size: int | None = None,
        width: int | Sequence[int] | None = None,
        layout: str = "NHWC",
        pixel_pairs: bool | None = None,
        progress: bool | None = None,
        init: str = "gaussian",
        fused: bool | None = None,
    ):
        """Exact infinite-width NNGP and/or NTK between the rows of ``x1`` and ``x2``.

        Computes Sigma (NNGP, Lee et al. 2018; Novak et al. 2019 for convolutions) and Theta (NTK, Jacot
        et al. 2018, Thm. 1; Arora et al. 2019 for the CNTK) by the layer recursion, blockwise over pairs
        of input rows under a memory budget; for ``x2=None`` only the upper triangle of blocks is computed
        and mirrored, so the result is exactly symmetric.

        Parameters
        ----------
        x1, x2 : array_like
            Inputs, batch first (numpy or torch). Fully-connected architectures take ``(n, d)`` (trailing
            dimensions are flattened); architectures that start with a 2-D conv / pooling take images
            ``(n, H, W, C)`` (NHWC, like neural-tangents) and 1-D convs signals ``(n, L, C)``.
            ``x2=None`` means ``x1``.
            For an architecture that starts with an :class:`~ntkit.RNN`: lists of (T_i, d) sequences of any
            lengths, or (n, T, d) arrays (see ``ntkit.kernels.recurrent``).
        get : "nngp", "ntk" or a tuple of them
            A name returns a tensor; a tuple returns a namedtuple with those fields.
        diagonal : bool
            Return only k(x1_i, x1_i) (or k(x1_i, x2_i) pairwise when ``x2`` is given), shape
            ``(n1,)``, at O(n) cost.
        dtype : torch dtype, default float64
        device : torch device, default: that of ``x1`` (CPU for numpy)
        memory_budget : float, optional
            Bytes that outputs plus temporaries may use (default 90% of available memory). Tiles are
            sized from the per-pair state: 1 number (flat), H W (same-position diagonal) or (H W)^2
            (pixel pairs) per pair of inputs.
        block_size : int, optional
            Tile edge (rows and columns of input pairs per block); chosen from the budget if None.
        width : int or sequence, optional
            Hidden widths / channels (see :meth:`with_width`); matters only in the standard
            parameterization.
        layout : {"NHWC", "NCHW"}
            Axis order of image inputs: channels last (default) or channels first, as torch's
            ``nn.Conv2d`` takes them (``"NCL"``/``"NLC"`` are accepted for 1-D signals).
        pixel_pairs : bool, optional
            Expert override of the spatial layout (see :class:`~ntkit.kernels._state.KernelState`).
            None (default) decides from the architecture: covariances of all position pairs up to the
            last (global) average pooling layer, only the same-position diagonal after it (which is all
            convolutions, pointwise layers and Flatten need). True keeps pixel pairs throughout (same
            numbers, more work); False refuses architectures with pooling.
        progress : bool, optional
            A progress bar over the tiles, drawn only on a terminal. None (default): when the work takes
            more than one tile; False: never; True: always.
        init : {"gaussian", "orthogonal"}
            The initialization of the finite twin (:meth:`init`) whose limit is computed. Gaussian and
            Haar-orthogonal dense layers have the same limit (Huang et al. 2021); delta-orthogonal
            convolutions (Xiao et al. 2018) do not -- their forward map at initialization is the centre tap
            alone (see :class:`~ntkit.Conv`) -- so ``init="orthogonal"`` changes the kernel of conv layers: it
            is the limit of a Gaussian conv whose weight variance sits on the centre tap (Xiao et al.'s
            variance profile v = delta), the limit of recurrent and dense layers is unchanged.
        fused : bool, optional
            Compute the ReLU-family activation duals in one compiled pass (``torch.compile``) instead of a
            dozen eager ones: several times faster on large spatial kernel states, but the first call in
            a process compiles (seconds; a minute or more the very first time on a machine). None
            (default): only when the work is large (at least ``ntkit.kernels._fused.FUSE_MIN_NUMBERS``
            state numbers per layer, e.g. a 1000 x 1000 CNTK-GAP on 14 x 14 images); True: always;
            False: never. Falls back to eager torch if compilation is unavailable; the values agree to
            rounding either way. In float64 on the CPU, conv stacks with global average pooling use a
            native loop (``ntkit/kernels/_cntk_gap.c``, built once per machine in under a second) unless
            ``fused=False``.

        Returns
        -------
        Tensor of shape (n1, n2) (or (n1,) with ``diagonal``), or a namedtuple of them.
        """
        names, single = _parse_get(get)
        if width is not None:
            return self.with_width(width).kernel(x1, x2, get, diagonal=diagonal, dtype=dtype, device=device,
                                                 memory_budget=memory_budget, block_size=block_size,
                                                 layout=layout, pixel_pairs=pixel_pairs, progress=progress,
                                                 init=init, fused=fused)
        if init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {init!r}")
        dt = resolve_dtype(dtype)
        if recurrent.is_sequence_architecture(self.layers):  # x1, x2: lists of (T_i, d) sequences
            with torch.no_grad():
                result = recurrent.sequence_kernel(self, x1, x2, names, diagonal=diagonal, dtype=dt, device=device,
                                                   memory_budget=memory_budget, block_size=block_size,
                                                   progress_flag=progress)
            return result[names[0]] if single else _kernels_tuple(names)(**result)
        if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in (x1, x2)):
            raise NotImplementedError(
                "arch.kernel is not differentiable with respect to its inputs: the exact kernels are computed "
                "tile by tile with in-place operations (and the arc-cosine kernels have infinite slope at "
                "correlation +-1). Pass x.detach(), or call it under torch.no_grad(); for gradients of a "
                "kernel with respect to data use the empirical NTK of a wide finite network.")
        t1, t2 = check_pair(x1, x2, dtype=dt, device=device)
        t1, t2 = self.prepare_inputs(t1, t2, layout)
        switch = self._pixel_pair_plan(pixel_pairs, spatial=t1.ndim > 2)
        if diagonal:
            if t2 is not None and t2.shape[0] != t1.shape[0]:
                raise ValueError(f"diagonal=True pairs row i of x1 with row i of x2, but x1 has {t1.shape[0]} "
                                 f"rows and x2 has {t2.shape[0]}")
            result = self._diagonal(t1, t2, names, switch, memory_budget, progress, init, fused)
        else:
            result = self._matrix(t1, t2, names, memory_budget, block_size, switch, progress, init, fused)
        if single:
            return result[names[0]]
        return _kernels_tuple(names)(**result)

    def kernel_fn(self, get: str = "ntk") -> KernelFunction:
        """The single kernel ``get`` as a :class:`~ntkit.KernelFunction` (callable ``k(x1, x2=None)``)."""
        names, single = _parse_get(get)
        if not single:
            raise ValueError("kernel_fn gives one kernel; pass get='nngp' or get='ntk'")
        return _ArchitectureKernel(self, names[0])

    # -- inputs -----------------------------------------------------------------------------------
    def spatial_ndim(self) -> int | None:
        """Spatial dimensions the inputs must have: 0 (flat features), 1 (signals), 2 (images), or None
        when only the data can tell (the first spatial layer is a Flatten or GlobalAvgPool)."""
        for lay in _walk(self.body):
            if isinstance(lay, Dense):
                return 0
            if isinstance(lay, Conv):
                return len(lay.filter_shape)
            if isinstance(lay, AvgPool):
                return len(lay.window_shape)
            if isinstance(lay, (GlobalAvgPool, Flatten)):
                return None
        return 0

    def prepare_inputs(self, t1: torch.Tensor, t2: torch.Tensor | None, layout: str = "NHWC"):
        """Bring validated input tensors into the layout the kernel recursion takes: ``(n, d)`` for flat
        architectures, channels-last ``(n, *size, C)`` for spatial ones. Raises a ValueError that names
        the expected shape when the inputs cannot be taken."""
        nd = self.spatial_ndim()
        if nd == 0:
            self._check_features(t1)
            flat = [None if t is None else t.reshape(t.shape[0], -1) for t in (t1, t2)]
            return flat[0], flat[1]
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(_LAYOUTS)}, got {layout!r}")
        want = {1: "signals (n, L, C)", 2: "images (n, H, W, C)"}
        if (nd is None and t1.ndim < 3) or (nd is not None and t1.ndim != nd + 2):
            what = want.get(nd, "spatial inputs (n, H, W, C) or (n, L, C)")
            raise ValueError(f"this architecture ({self._first_spatial_name()}) takes {what}, got x1 of shape "
                             f"{tuple(t1.shape)}; reshape flat data to images first")
        if _LAYOUTS[layout]:  # channels first -> channels last
            t1 = t1.movedim(1, -1)
            t2 = None if t2 is None else t2.movedim(1, -1)
        return t1, t2

    def _first_spatial_name(self) -> str:
        for lay in _walk(self.body):
            if isinstance(lay, Conv):
                return f"first layer conv with filter_shape {lay.filter_shape}"
            if isinstance(lay, (AvgPool, GlobalAvgPool, Flatten)):
                return f"first spatial layer {lay.layer_name}"
        return "spatial"

    def _check_features(self, t: torch.Tensor) -> None:
        d = int(math.prod(t.shape[1:]))
        if self.input_dim is not None and d != self.input_dim:
            raise ValueError(f"x1 has {d} features, the architecture expects input_dim={self.input_dim}")

    def _pixel_pair_plan(self, pixel_pairs: bool | None, spatial: bool) -> int:
        """Index of the first top-level layer from which the same-position diagonal suffices (0: never
        pixel pairs; len(layers): pixel pairs throughout)."""
        if pixel_pairs is not None and not isinstance(pixel_pairs, (bool, np.bool_)):
            raise ValueError(f"pixel_pairs must be None, True or False, got {pixel_pairs!r}")
        if not spatial:
            return 0
        need = [i for i, lay in enumerate(self.layers) if lay.needs_pixel_pairs()]
        if pixel_pairs is None:
            return need[-1] + 1 if need else 0
        if pixel_pairs:
            return len(self.layers)
        if need:
            raise ConfigError(f"pixel_pairs=False, but layer {need[0]} ({self.layers[need[0]].layer_name}) mixes "
                              "different positions and needs the covariances of all position pairs; leave "
                              "pixel_pairs=None")
        return 0

    def _input_plan(self, t: torch.Tensor, init: str) -> tuple[torch.Tensor, tuple]:
        """Inputs for the tile loop and the layer list to run on them. A leading Gaussian conv is folded into
        the input step: its filter windows (im2col patches) become the features and the layer a 1x1 conv,
        which gives the same kernel from one matrix product per tile."""
        layers = self.layers
        first = layers[0]
        if t.ndim > 2 and isinstance(first, Conv) and init == "gaussian" and first.filter_shape != (1,) * (t.ndim - 2):
            return first.patches(t), (first.pointwise(),) + tuple(layers[1:])
        return t, layers

    def _run(self, st: KernelState, ctx: KernelContext, switch: int, layers=None) -> KernelState:
        for i, lay in enumerate(self.layers if layers is None else layers):
            if i == switch:
                st = drop_pixel_pairs(st)
            st = lay.apply_kernel(st, ctx)
        if isinstance(st, tuple):
            raise ConfigError("the architecture ends with unmerged branches; close them with fanin_sum")
        if st.shape:
            raise ConfigError(f"the architecture ends with spatial activations {st.shape}; end it with flatten or "
                              "global_avg_pool and a dense readout")
        return st

    @staticmethod
    def _per_pair(t: torch.Tensor, pixel_pairs: bool) -> int:
        """Numbers per pair of inputs in the kernel state: 1 (flat), H W (diagonal) or (H W)^2 (pixel pairs)."""
        if t.ndim == 2:
            return 1
        p = int(math.prod(t.shape[1:-1]))
        return p * p if pixel_pairs else p

    @staticmethod
    def _scaled(t: torch.Tensor) -> torch.Tensor:
        """Inputs divided by sqrt(features per position): the input kernel is x . x' / d (Sigma0)."""
        return t * (1.0 / math.sqrt(t.shape[-1]))

    def _width0(self, t: torch.Tensor) -> int:
        return int(t.shape[-1])

    def _diagonal(self, t1, t2, names, switch, memory_budget, progress_flag, init="gaussian", fused=False):
        n = t1.shape[0]
        item = t1.element_size()
        per = self._per_pair(t1, switch > 0)
        budget = 0.9 * available_memory_bytes(t1.device) if memory_budget is None else memory_budget
        chunk = n if per == 1 else max(1, min(n, int(budget // (_LIVE_TILES * per * item * 3))))
        check_memory(_LIVE_TILES * chunk * per * item * 3 + len(names) * n * item, budget,
                     f"the diagonal kernel ({per} numbers per pair)", "pass a larger memory_budget")
        t1, layers = self._input_plan(t1, init)
        t2 = None if t2 is None else self._input_plan(t2, init)[0]
        a, b = self._scaled(t1), None if t2 is None else self._scaled(t2)
        ctx = KernelContext(self.parameterization, init, auto_fuse(fused, n, per))
        outs = {name: empty_output((n,), t1.dtype, t1.device) for name in names}
        show = n > chunk if progress_flag is None else progress_flag
        for i0 in progress(range(0, n, chunk), desc="kernel diagonal", unit="chunk", enabled=show):
            i1 = min(i0 + chunk, n)
            st = input_state(a[i0:i1], None if b is None else b[i0:i1], pairwise=True, pixel_pairs=switch > 0,
                             need_ntk="ntk" in names, width=self._width0(t1))
            st = self._run(st, ctx, switch, layers)
            for name in names:
                outs[name][i0:i1] = self._field(st, name, st.nngp)
        for name, val in outs.items():
            if not bool(torch.isfinite(val).all()):
                raise FloatingPointError(f"the {name} kernel overflowed or became NaN in {t1.dtype}; check "
                                         "W_std/b_std and depth, or use float64")
        return outs

    @staticmethod
    def _field(st: KernelState, name: str, like: torch.Tensor) -> torch.Tensor:
        val = st.nngp if name == "nngp" else st.ntk
        if not isinstance(val, torch.Tensor):  # e.g. NTK of a net without trainable layers
            return torch.full(like.shape, float(val), dtype=like.dtype, device=like.device)
        if val.shape != like.shape:
            val = val.expand_as(like)
        return val

    def _matrix(self, t1, t2, names, memory_budget, block_size, switch, progress_flag, init="gaussian",
                fused=False):
        same = t2 is None
        n1 = t1.shape[0]
        d = int(math.prod(t1.shape[1:]))
        n2 = n1 if same else t2.shape[0]
        item = t1.element_size()
        per = self._per_pair(t1, switch > 0)
        # budget: outputs are unavoidable; tiles must fit in what is left
        out_bytes = len(names) * n1 * n2 * item
        budget = memory_budget
        if budget is None:
            budget = 0.9 * available_memory_bytes(t1.device)
        check_memory(out_bytes, budget, f"the {n1}x{n2} {'/'.join(names)} kernel{'s' if len(names) > 1 else ''} "
                     f"in {t1.dtype}",
                     "compute it in pieces (slices of x1), ask for one kernel, use float32, or use diagonal=True "
                     "if only k(x, x) is needed")
        left = budget - out_bytes

        def tile_bytes(bl):  # live tile-sized state buffers, the rows' own kernels, and the input slices
            return _LIVE_TILES * (bl * bl + 2 * bl) * per * item + 2 * bl * d * item

        if block_size is None:
            block = 512
            floor = 16 if per == 1 else 1
            while block > floor and tile_bytes(block) > left:
                block //= 2
        else:
            if isinstance(block_size, bool) or int(block_size) != block_size:
                raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
            block = int(block_size)
            if block < 1:
                raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        check_memory(out_bytes + tile_bytes(block), budget,
                     f"kernel blocks of {block}x{block} input pairs ({per} numbers per pair)",
                     "pass a smaller block_size or a larger memory_budget")

        t1, layers = self._input_plan(t1, init)
        t2 = None if same else self._input_plan(t2, init)[0]
        xs1 = self._scaled(t1)
        xs2 = xs1 if same else self._scaled(t2)
        need_ntk = "ntk" in names
        outs = {name: empty_output((n1, n2), t1.dtype, t1.device) for name in names}
        ctx = KernelContext(self.parameterization, init,
                            auto_fuse(fused, n1 * (n1 + 1) // 2 if same else n1 * n2, per))
        # conv stacks ending in global average pooling: chunks of pairs through all layers, in cache
        gap = _conv_gap.plan(layers, switch, init, self.parameterization) if t1.ndim > 2 else None
        tiles = [(i0, j0) for i0 in range(0, n1, block) for j0 in range(i0 if same else 0, n2, block)]
        show = len(tiles) > 1 if progress_flag is None else progress_flag
        for i0, j0 in progress(tiles, desc="kernel tiles", unit="tile", enabled=show):
            i1, j1 = min(i0 + block, n1), min(j0 + block, n2)
            diag_tile = same and i0 == j0
            # a spatial tile of inputs with themselves: only the pairs i <= j (symmetric_tile_pairs)
            pairs = symmetric_tile_pairs(i1 - i0, t1.device) if diag_tile and per > 1 else None
            n_pairs = (i1 - i0) * (i1 - i0 + 1) // 2 if pairs is not None else (i1 - i0) * (j1 - j0)
            if gap is not None and per > 1 and _conv_gap.use_chunks(n_pairs, per, item):
                st = _conv_gap.gap_state(xs1[i0:i1], None if diag_tile else xs2[j0:j1], pairs, layers[:gap + 1],
                                         ctx.fused, need_ntk, native=fused is None or bool(fused))
                st = self._run(st, ctx, switch - gap - 1, layers[gap + 1:])
            else:
                st = input_state(xs1[i0:i1], None if diag_tile else xs2[j0:j1], pairwise=pairs is not None,
                                 pixel_pairs=switch > 0, need_ntk=need_ntk, width=self._width0(t1), pairs=pairs)
                st = self._run(st, ctx, switch, layers)
            for name in names:
                tile = self._field(st, name, st.nngp)
                if not bool(torch.isfinite(tile.sum())):  # NaN/Inf propagate through the sum
                    raise FloatingPointError(
                        f"the {name} kernel overflowed or became NaN in {t1.dtype}; the activations' "
                        "variances probably explode with depth (check W_std/b_std) or the dtype is too "
                        "narrow (use float64)")
                if pairs is not None:  # mirror: k(x_j, x_i) = k(x_i, x_j)
                    full = tile.new_empty((i1 - i0, i1 - i0))
                    full[pairs[0], pairs[1]] = tile
                    full[pairs[1], pairs[0]] = tile
                    tile = full
                elif diag_tile:
                    tile = (tile + tile.T) * 0.5
                outs[name][i0:i1, j0:j1] = tile
                if same and not diag_tile:
                    outs[name][j0:j1, i0:i1] = tile.T
        return outs

    # -- finite width -----------------------------------------------------------------------------
    def init(
        self,
        width: int | Sequence[int] | None = None,
        *,
        seed: int = 0,
        init: str = "gaussian",
        in_features: int | Sequence[int] | None = None,
        out_dim: int | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        layout: str = "NHWC",
    ) -> FiniteNetwork:
        """Build the finite network of this description, randomly initialized.

        Parameters
        ----------
        width : int or sequence, optional
            Hidden widths (every Dense but the readout); defaults to the out_dims in the description.
        seed : int
            Seed of the random initialization (a private ``torch.Generator``; global RNG untouched).
        init : {"gaussian", "orthogonal"}
            i.i.d. Gaussian weights, or Haar-orthogonal weight matrices with the same per-entry scale
            (Saxe et al. 2014; Huang et al. 2020 show the NTK limit is the same); convolutions get
            delta-orthogonal filters (Xiao et al. 2018: an orthogonal matrix at the centre tap).
        in_features : int or tuple, optional
            Input features (default: ``input_dim`` of the description); for convolutional
            architectures the shape of one input, ``(H, W, C)`` or ``(L, C)`` (in ``layout`` order).
        layout : {"NHWC", "NCHW"}
            Axis order of the images the network takes (channels last by default, like ``kernel``;
            ``"NCHW"`` for torch-style channels-first batches).
        out_dim : int, optional
            Width of the readout (default: the description's).
        dtype : default float64
        device : optional

        Returns
        -------
        FiniteNetwork
            ``model(x) -> (n, out_dim)``. In the NTK parameterization, at width -> infinity, its
            output is a GP with kernel ``kernel(get="nngp")`` and its empirical NTK (the mean over
            output units) tends to ``kernel(get="ntk")``.
        """
        if init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {init!r}")
        arch = self.with_width(width, out_dim)
        n_in = in_features if in_features is not None else self.input_dim
        if n_in is None:
            raise ConfigError("the number of input features is unknown; pass in_features= to init() or set "
                              "input_dim in the architecture")
        nd = self.spatial_ndim()
        if isinstance(n_in, (tuple, list, torch.Size)):
            shape = tuple(n_in)
            if not shape or any(int(v) != v or v < 1 for v in shape):
                raise ConfigError(f"in_features must be a positive integer or a shape of them, got {n_in!r}")
            shape = tuple(int(v) for v in shape)
            if nd == 0:
                n_in = math.prod(shape)
            else:
                if layout not in _LAYOUTS:
                    raise ConfigError(f"layout must be one of {sorted(_LAYOUTS)}, got {layout!r}")
                if _LAYOUTS[layout]:
                    shape = shape[1:] + shape[:1]
                if (nd is not None and len(shape) != nd + 1) or len(shape) < 2:
                    raise ConfigError(f"in_features {tuple(n_in)} is not the shape of one "
                                      f"{'image (H, W, C)' if nd == 2 else 'signal (L, C)'} ({self._first_spatial_name()})")
                n_in = shape
        elif nd != 0:
            raise ConfigError(f"this architecture ({self._first_spatial_name()}) takes spatial inputs: pass "
                              "in_features=(H, W, C) (the shape of one NHWC image) or (L, C) to init()")
        elif int(n_in) != n_in or n_in < 1:
            raise ConfigError(f"in_features must be a positive integer, got {n_in!r}")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed))
        ctx = BuildContext(self.parameterization, gen, init, resolve_dtype(dtype), device)
        first = SpatialShape(n_in[-1], n_in[:-1]) if isinstance(n_in, tuple) else int(n_in)
        body, out_f = arch.body.build_module(first, ctx)
        if isinstance(out_f, tuple):
            raise ConfigError("the architecture ends with unmerged branches; close them with fanin_sum")
        if isinstance(out_f, SpatialShape):
            raise ConfigError(f"the architecture ends with spatial activations ({out_f}); end it with flatten or "
                              "global_avg_pool and a dense readout")
        return FiniteNetwork(body, arch, n_in, out_f, layout if isinstance(n_in, tuple) else "NHWC")


class _ArchitectureKernel(KernelFunction):
    def __init__(self, arch: Architecture, name: str):
        self.arch = arch
        self.name = name

    def __call__(self, x1, x2=None, *, diagonal=False, dtype=None, device=None):
        if recurrent.is_sequence_architecture(self.arch.layers):  # lists of (T_i, d) sequences: arch.kernel
            return self.arch.kernel(x1, x2, self.name, diagonal=diagonal, dtype=dtype, device=device)
        return super().__call__(x1, x2, diagonal=diagonal, dtype=dtype, device=device)

    def _matrix(self, x1, x2, same):
        return self.arch.kernel(x1, None if same else x2, self.name, dtype=x1.dtype)

    def _diagonal(self, x1, x2):
        return self.arch.kernel(x1, None if x2 is x1 else x2, self.name, diagonal=True, dtype=x1.dtype)

    def to_config(self):
        return {"kernel": self.name, "architecture": self.arch.to_config()}

    def __repr__(self):
        return f"KernelFunction({self.name!r} of {self.arch!r})"


# -------------------------------------------------------------------------------------------------
def serial(*layers: Layer, parameterization: str = "ntk", input_dim: int | None = None) -> Architecture:
    """Compose layers into an :class:`Architecture` (``serial(Dense(512), Relu(), Dense(1))``)."""
    flat: list[Layer] = []
    for lay in layers:
        if isinstance(lay, Architecture):
            flat.extend(lay.layers)
        else:
            flat.append(lay)
    return Architecture(flat, parameterization=parameterization, input_dim=input_dim)


def residual(*branch: Layer) -> Serial:
    """A residual block x -> x + branch(x): ``fanout(2), parallel([branch, identity]), fanin_sum``.

    The branch should end in a Dense layer of the same width as its input.
    """
    return Serial([FanOut(2), Parallel([list(branch), [Identity()]]), FanInSum()])


def mlp(
    depth: int,
    width: int | None = None,
    activation: str | Layer = "relu",
    *,
    W_std: float = 2**0.5,
    b_std: float | None = 0.0,
    out_dim: int | None = 1,
    readout_W_std: float | None = None,
    readout_b_std: float | None = "same",  # type: ignore[assignment]
    fixed_layers: int = 0,
    parameterization: str = "ntk",
    input_dim: int | None = None,
) -> Architecture:
    """A fully-connected network: ``depth`` x [Dense(width), activation], then a Dense readout.

    ``fixed_layers`` freezes the first Dense layers (Arora et al. 2020's "fixed bottom layers":
    they enter the NNGP but not the NTK). ``activation`` is a layer (``ntkit.Erf()``) or the
    config name of a parameter-free one ("relu", "abs", "gelu", "sign").
    """
    from .config import layer_from_config

    if int(depth) != depth or depth < 0:
        raise ConfigError(f"depth must be an integer >= 0, got {depth!r}")
    if not 0 <= fixed_layers <= depth + 1:
        raise ConfigError(f"fixed_layers must be between 0 and depth + 1 = {depth + 1}, got {fixed_layers!r}")
    act = layer_from_config({"layer": activation}) if isinstance(activation, str) else activation
    layers: list[Layer] = []
    for i in range(int(depth)):
        layers += [Dense(width, W_std, b_std, trainable=i >= fixed_layers), act]
    rw = W_std if readout_W_std is None else readout_W_std
    rb = b_std if readout_b_std == "same" else readout_b_std
    layers.append(Dense(out_dim, rw, rb, trainable=depth >= fixed_layers))
    return Architecture(layers, parameterization=parameterization, input_dim=input_dim)
