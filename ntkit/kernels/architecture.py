"""One architecture description, two views: exact infinite-width kernels and the finite network."""

from __future__ import annotations

import math
from collections import namedtuple
from functools import lru_cache
from typing import Any, Sequence

import torch
from torch import nn

from .._validation import (ConfigError, as_float_tensor, check_memory, check_pair, empty_output, format_bytes,
                           available_memory_bytes, resolve_dtype)
from . import recurrent
from ._state import KernelState
from .base import KernelFunction
from .layers import (PARAMETERIZATIONS, BuildContext, Dense, FanInSum, FanOut, Identity, KernelContext, Layer,
                     Parallel, Serial)

__all__ = ["Architecture", "serial", "residual", "mlp", "FiniteNetwork", "KERNEL_NAMES"]

KERNEL_NAMES = ("nngp", "ntk")
INITS = ("gaussian", "orthogonal")
# Number of tile-sized float buffers alive at once while a layer stack runs on a tile (measured
# upper bound for the arc-cosine family and the residual combinators, with a margin).
_LIVE_TILES = 12


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

    ``forward(x)`` takes a batch ``(n, ...)`` (trailing dimensions are flattened into features)
    and returns ``(n, out_dim)``.
    """

    def __init__(self, body: nn.Module, architecture: "Architecture", in_features: int, out_features: int):
        super().__init__()
        self.body = body
        self.in_features = in_features
        self.out_features = out_features
        object.__setattr__(self, "architecture", architecture)  # plain attribute, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if recurrent.is_sequence_architecture(self.architecture.layers):  # sequences of different lengths
            first = next(self.parameters())
            return self.body(recurrent.as_sequences(x, "x", dtype=first.dtype, device=first.device))
        if x.ndim < 2:
            raise ValueError(f"expected a batch (n, {self.in_features}), got shape {tuple(x.shape)}; "
                             "reshape a single sample with x.reshape(1, -1)")
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"the network expects {self.in_features} input features, got {x.shape[1]}")
        return self.body(x)


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
        """The same description with hidden widths (every Dense but the last) and/or readout width set.

        ``width`` is an int (all hidden layers) or a sequence with one entry per hidden Dense, in
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

        def replace(d: Dense) -> Dense:
            i = next(counter)
            new = out_dim if i == n_hidden else widths[i]
            if new is None:
                return d
            return Dense(new, d.W_std, d.b_std, d.trainable)

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
    ):
        """Exact infinite-width NNGP and/or NTK between the rows of ``x1`` and ``x2``.

        Computes Sigma (NNGP, Lee et al. 2018) and Theta (NTK, Jacot et al. 2018, Thm. 1) by the
        layer recursion, blockwise over pairs of input rows under a memory budget; for ``x2=None``
        only the upper triangle of blocks is computed and mirrored, so the result is exactly symmetric.

        Parameters
        ----------
        x1, x2 : array_like, shape (n1, d) and (n2, d)
            Inputs, batch first (numpy or torch; trailing dimensions are flattened). ``x2=None``
            means ``x1``. For an architecture that starts with an :class:`~ntkit.RNN`: lists of
            (T_i, d) sequences of any lengths, or (n, T, d) arrays (see ``ntkit.kernels.recurrent``).
        get : "nngp", "ntk" or a tuple of them
            A name returns a tensor; a tuple returns a namedtuple with those fields.
        diagonal : bool
            Return only k(x1_i, x1_i) (or k(x1_i, x2_i) pairwise when ``x2`` is given), shape
            ``(n1,)``, at O(n d) cost.
        dtype : torch dtype, default float64
        device : torch device, default: that of ``x1`` (CPU for numpy)
        memory_budget : float, optional
            Bytes that outputs plus temporaries may use (default 90% of available memory).
        block_size : int, optional
            Tile edge (rows and columns of input pairs per block); chosen from the budget if None.
        width : int or sequence, optional
            Hidden widths (see :meth:`with_width`); matters only in the standard parameterization.

        Returns
        -------
        Tensor of shape (n1, n2) (or (n1,) with ``diagonal``), or a namedtuple of them.
        """
        names, single = _parse_get(get)
        if width is not None:
            return self.with_width(width).kernel(x1, x2, get, diagonal=diagonal, dtype=dtype, device=device,
                                                 memory_budget=memory_budget, block_size=block_size)
        dt = resolve_dtype(dtype)
        if recurrent.is_sequence_architecture(self.layers):  # x1, x2: lists of (T_i, d) sequences
            with torch.no_grad():
                result = recurrent.sequence_kernel(self, x1, x2, names, diagonal=diagonal, dtype=dt, device=device,
                                                   memory_budget=memory_budget, block_size=block_size)
            return result[names[0]] if single else _kernels_tuple(names)(**result)
        if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in (x1, x2)):
            raise NotImplementedError(
                "arch.kernel is not differentiable with respect to its inputs: the exact kernels are computed "
                "tile by tile with in-place operations (and the arc-cosine kernels have infinite slope at "
                "correlation +-1). Pass x.detach(), or call it under torch.no_grad(); for gradients of a "
                "kernel with respect to data use the empirical NTK of a wide finite network.")
        t1, t2 = check_pair(x1, x2, dtype=dt, device=device)
        self._check_features(t1)
        if diagonal:
            if t2 is not None and t2.shape[0] != t1.shape[0]:
                raise ValueError(f"diagonal=True pairs row i of x1 with row i of x2, but x1 has {t1.shape[0]} "
                                 f"rows and x2 has {t2.shape[0]}")
            result = self._diagonal(t1, t2, names)
        else:
            result = self._matrix(t1, t2, names, memory_budget, block_size)
        if single:
            return result[names[0]]
        return _kernels_tuple(names)(**result)

    def kernel_fn(self, get: str = "ntk") -> KernelFunction:
        """The single kernel ``get`` as a :class:`~ntkit.KernelFunction` (callable ``k(x1, x2=None)``)."""
        names, single = _parse_get(get)
        if not single:
            raise ValueError("kernel_fn gives one kernel; pass get='nngp' or get='ntk'")
        return _ArchitectureKernel(self, names[0])

    def _check_features(self, t: torch.Tensor) -> None:
        d = int(math.prod(t.shape[1:]))
        if self.input_dim is not None and d != self.input_dim:
            raise ValueError(f"x1 has {d} features, the architecture expects input_dim={self.input_dim}")

    def _run(self, state: KernelState) -> KernelState:
        out = self.body.apply_kernel(state, KernelContext(self.parameterization))
        if isinstance(out, tuple):
            raise ConfigError("the architecture ends with unmerged branches; close them with fanin_sum")
        return out

    def _diagonal(self, t1, t2, names):
        n, d = t1.shape[0], int(math.prod(t1.shape[1:]))
        a = t1.reshape(n, d)
        var1 = (a * a).sum(1) / d
        if t2 is None:
            cov, var2 = var1, var1
        else:
            b = t2.reshape(n, d)
            var2 = (b * b).sum(1) / d
            cov = (a * b).sum(1) / d
        st = self._run(KernelState(nngp=cov, ntk=0.0 if "ntk" in names else None, var1=var1, var2=var2,
                                   width=d, gaussian=False))
        out = {name: self._field(st, name, cov) for name in names}
        for name, val in out.items():
            if not bool(torch.isfinite(val).all()):
                raise FloatingPointError(f"the {name} kernel overflowed or became NaN in {t1.dtype}; check "
                                         "W_std/b_std and depth, or use float64")
        return out

    @staticmethod
    def _field(st: KernelState, name: str, like: torch.Tensor) -> torch.Tensor:
        val = st.nngp if name == "nngp" else st.ntk
        if not isinstance(val, torch.Tensor):  # e.g. NTK of a net without trainable layers
            return torch.full_like(like, float(val))
        if val.shape != like.shape:
            val = val.expand_as(like)
        return val

    def _matrix(self, t1, t2, names, memory_budget, block_size):
        same = t2 is None
        n1 = t1.shape[0]
        d = int(math.prod(t1.shape[1:]))
        n2 = n1 if same else t2.shape[0]
        item = t1.element_size()
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
        if block_size is None:
            block = 512
            while block > 16 and _LIVE_TILES * block * block * item + 2 * block * d * item > left:
                block //= 2
        else:
            if isinstance(block_size, bool) or int(block_size) != block_size:
                raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
            block = int(block_size)
            if block < 1:
                raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        tile_bytes = _LIVE_TILES * block * block * item
        check_memory(out_bytes + tile_bytes, budget, f"kernel blocks of {block}x{block}",
                     "pass a smaller block_size or a larger memory_budget")

        scale = 1.0 / math.sqrt(d)
        xs1 = t1.reshape(n1, d) * scale
        xs2 = xs1 if same else t2.reshape(n2, d) * scale
        var1 = (xs1 * xs1).sum(1)
        var2 = var1 if same else (xs2 * xs2).sum(1)
        need_ntk = "ntk" in names
        outs = {name: empty_output((n1, n2), t1.dtype, t1.device) for name in names}
        ctx = KernelContext(self.parameterization)
        for i0 in range(0, n1, block):
            i1 = min(i0 + block, n1)
            for j0 in range(i0 if same else 0, n2, block):
                j1 = min(j0 + block, n2)
                g = xs1[i0:i1] @ xs2[j0:j1].T
                diag_tile = same and i0 == j0
                if diag_tile:  # identical points: make Sigma(x, x) agree exactly with its variance
                    g.diagonal().copy_(var1[i0:i1])
                st = KernelState(nngp=g, ntk=0.0 if need_ntk else None, var1=var1[i0:i1, None],
                                 var2=var2[None, j0:j1], width=d, gaussian=False)
                st = self.body.apply_kernel(st, ctx)
                if isinstance(st, tuple):
                    raise ConfigError("the architecture ends with unmerged branches; close them with fanin_sum")
                for name in names:
                    tile = self._field(st, name, g)
                    if not bool(torch.isfinite(tile.sum())):  # NaN/Inf propagate through the sum
                        raise FloatingPointError(
                            f"the {name} kernel overflowed or became NaN in {t1.dtype}; the activations' "
                            "variances probably explode with depth (check W_std/b_std) or the dtype is too "
                            "narrow (use float64)")
                    if diag_tile:
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
        in_features: int | None = None,
        out_dim: int | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
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
            (Saxe et al. 2014; Huang et al. 2020 show the NTK limit is the same).
        in_features : int, optional
            Input features (default: ``input_dim`` of the description).
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
        if int(n_in) != n_in or n_in < 1:
            raise ConfigError(f"in_features must be a positive integer, got {n_in!r}")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed))
        ctx = BuildContext(self.parameterization, gen, init, resolve_dtype(dtype), device)
        body, out_f = arch.body.build_module(int(n_in), ctx)
        if isinstance(out_f, tuple):
            raise ConfigError("the architecture ends with unmerged branches; close them with fanin_sum")
        return FiniteNetwork(body, arch, int(n_in), out_f)


class _ArchitectureKernel(KernelFunction):
    def __init__(self, arch: Architecture, name: str):
        self.arch = arch
        self.name = name

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
