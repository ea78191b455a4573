"""The infinite-width kernel state that flows through the layers of an architecture."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Union

import torch

from .._validation import empty_output

__all__ = ["KernelState", "State", "to_diagonal", "drop_pixel_pairs", "input_state", "scratch"]


@dataclass(frozen=True)
class KernelState:
    """Kernels of the current activations for a block of input pairs.

    Layout. The leading axes of every tensor are the *batch* axes: ``(b1, b2)`` in matrix mode (rows of
    x1 against rows of x2) or ``(b,)`` in pairwise mode (row i of x1 with row i of x2). Flat activations
    (``shape == ()``) have nothing after them, so the fully-connected path carries plain matrices. Spatial
    activations (images ``(H, W)``, 1-D signals ``(L,)``) append one of two layouts:

    * ``pixel_pairs=True``: covariances of every pair of positions (p, p'), all axes of p, then all axes
      of p' -- ``(b1, b2, H, W, H', W')`` for images, a (P x P') matrix per pair of inputs (P = H W), so
      the innermost loops run over whole images. Needed below average pooling and global average
      pooling, which mix different positions.
    * ``pixel_pairs=False``: only the same-position diagonal Sigma(p, p), ``(b1, b2, H, W)``: enough for
      convolutions, pointwise layers and a Flatten readout (Arora et al. 2019, Sec. 4; Novak et al.
      2019, Sec. 3), and H W times smaller.

    The architecture decides the layout from the whole network before computing (see
    :meth:`ntkit.Architecture.kernel`, ``pixel_pairs=``).

    Attributes
    ----------
    nngp : Tensor
        Sigma(x, x') for the block, in the layout above.
    ntk : Tensor, float or None
        Theta(x, x') with the same shape as ``nngp``; ``0.0`` before any trainable layer; ``None``
        when the NTK is not requested (saves the work).
    var1, var2 : Tensor
        The kernels of each x1 row (resp. x2 row) with itself, shaped to broadcast against ``nngp``:
        batch axes ``(b1, 1)`` resp. ``(1, b2)`` in matrix mode, ``(b,)`` in pairwise mode, followed by
        the same spatial layout as ``nngp`` -- so for ``pixel_pairs=True`` they hold each sample's own
        position-pair covariance (which global average pooling needs), and the per-position variances
        q(p) are their diagonals (:meth:`marginals`). For flat and diagonal states they *are* the
        per-position variances.
    width : int or None
        Number of features (channels for spatial activations) in the finite network (needed by the
        standard parameterization, whose NTK depends on the finite widths); None if unknown.
    gaussian : bool
        Whether the current activations are Gaussian pre-activations (the output of an affine
        layer, possibly summed over residual branches), which the activation dual kernels require.
    deps : frozenset
        The fan-outs whose input these activations are a function of without a Dense layer since
        (a Dense layer resets it).
    fresh : bool
        Whether the last layer was a Dense layer: the activations are zero-mean with weights of
        their own. ``FanInSum`` adds branch kernels only when every branch but one is fresh with
        empty ``deps`` -- then all cross terms E[f_i(x) f_j(x')] vanish; otherwise (x + relu(x), or
        two branches ending in ReLU, whose means do not vanish) the kernel of the sum needs cross
        terms, and it refuses rather than guess.
    shape : tuple of int
        Spatial sizes of the activations, ``()`` for flat features.
    pixel_pairs : bool
        Which spatial layout ``nngp`` has (see above); False for flat states.
    tied : bool
        ``var1``/``var2`` are views of the diagonal pairs (x_i, x_i) of ``nngp`` (a tile of inputs with
        themselves); layers then update them through :meth:`update` for free.
    pairs : tuple or None
        Symmetric tiles (pairwise mode, ``tied=True``): ``(r1, r2, b)`` -- the pairs of a tile of b inputs
        with themselves listed once each, i <= j, as index vectors ``r1 = i``, ``r2 = j`` into the tile, with
        the b self pairs (i, i) first. The pair (j, i) is never computed: its kernels are those of (i, j)
        (its position-pair covariances are the transpose). ``var1``/``var2`` are then gathered from the
        first b entries of ``nngp``; for spatial states they *are* those b self-kernels, ``(b, *spatial)``,
        and :meth:`marginals` gathers them (their diagonals, for pixel pairs) per pair only when a layer
        asks -- the fused activation gathers inside its loop (:meth:`marginal_parts`), so no per-layer
        copies of pair-sized variance tensors are made.
    """

    nngp: torch.Tensor
    ntk: Union[torch.Tensor, float, None]
    var1: torch.Tensor
    var2: torch.Tensor
    width: int | None
    gaussian: bool
    deps: frozenset = frozenset()
    fresh: bool = False
    shape: tuple = ()
    pixel_pairs: bool = False
    tied: bool = False
    pairs: tuple | None = None

    def replace(self, **changes) -> "KernelState":
        return replace(self, **changes)

    def update(self, nngp, ntk, self_fn, **changes) -> "KernelState":
        """The state after a layer: new ``nngp``/``ntk`` and self-kernels ``self_fn(var1)``, ``self_fn(var2)``.

        For a *tied* state (a tile of inputs with themselves, ``tied=True``) the self-kernels are the
        diagonal pairs (x_i, x_i) of ``nngp`` itself, so they are taken as views of the new ``nngp`` and
        ``self_fn`` is not called: the tile costs b^2 pairs instead of b^2 + 2 b.
        """
        if self.tied:
            new = self.replace(nngp=nngp, ntk=ntk, **changes)
            return new.replace(**_tied_vars(nngp, self.batch_ndim == 1, new.pairs, bool(new.shape)))
        v1 = self_fn(self.var1)
        v2 = v1 if self.var2 is self.var1 else self_fn(self.var2)
        return self.replace(nngp=nngp, ntk=ntk, var1=v1, var2=v2, **changes)

    # -- layout helpers -------------------------------------------------------------------------------
    @property
    def spatial_ndim(self) -> int:
        """Number of trailing spatial axes of ``nngp`` (0 for flat states)."""
        return len(self.shape) * (2 if self.pixel_pairs else 1)

    @property
    def batch_ndim(self) -> int:
        """Number of leading batch axes: 2 in matrix mode, 1 in pairwise mode."""
        return self.nngp.ndim - self.spatial_ndim

    def spatial_axes(self, d: int) -> tuple[int, ...]:
        """Axes of spatial dimension ``d``: ``(p, p')`` with pixel pairs, ``(p,)`` without."""
        nb, nd = self.batch_ndim, len(self.shape)
        return (nb + d, nb + nd + d) if self.pixel_pairs else (nb + d,)

    def marginals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position variances (q1(p), q2(p')) of the two inputs, shaped to broadcast against ``nngp``.

        These are what a pointwise layer (activation, layer normalisation) needs: for pixel pairs the
        diagonals of ``var1`` on the p axes and of ``var2`` on the p' axes, otherwise ``var1``, ``var2``.
        """
        if self.pairs is not None and self.shape and not self.pixel_pairs:  # gathered per pair on demand
            r1, r2, _ = self.pairs
            return self.var1[r1], self.var2[r2]
        if not self.pixel_pairs:
            return self.var1, self.var2
        if self.pairs is not None:  # var1 = var2 = the b self-kernels; gather their diagonals per pair
            r1, r2, _ = self.pairs
            return (_expand_diagonal(self.var1, self, first=True, index=r1),
                    _expand_diagonal(self.var2, self, first=False, index=r2))
        return _expand_diagonal(self.var1, self, first=True), _expand_diagonal(self.var2, self, first=False)

    def marginal_parts(self):
        """``(q1, i1, q2, i2)``: the per-position variances as :meth:`marginals` gives them are ``q1[i1]``,
        ``q2[i2]`` -- for a symmetric tile (``pairs``) ``q`` holds the b inputs' own variances and ``i`` the
        pair index vectors (so per-position factors can be formed on b rows instead of b (b + 1) / 2 pairs);
        otherwise ``i1 = i2 = None`` and ``q1, q2`` are :meth:`marginals`."""
        if self.pairs is None or not self.tied or self.pixel_pairs:  # pixel pairs: the factors are small anyway
            q1, q2 = self.marginals()
            return q1, None, q2, None
        r1, r2, b = self.pairs
        own = self.nngp[:b]
        return own, r1, own, r2

    def self_marginals(self, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q(p), q(p')) of one input, shaped to broadcast against its own pixel-pair kernel ``var``."""
        return _expand_diagonal(var, self, first=True), _expand_diagonal(var, self, first=False)


def to_diagonal(t, k: KernelState):
    """The same-position diagonal ``(..., H, W)`` of a pixel-pair tensor ``(..., H, W, H', W')`` (a view)."""
    if not isinstance(t, torch.Tensor) or not k.pixel_pairs:
        return t
    nb, nd = k.batch_ndim, len(k.shape)
    for m in range(nd, 0, -1):  # each call moves one diagonal to the end, so the order (H, W) is kept
        t = torch.diagonal(t, dim1=nb, dim2=nb + m)
    return t


def _expand_diagonal(var: torch.Tensor, k: KernelState, first: bool, index=None) -> torch.Tensor:
    d = to_diagonal(var, k)  # (..., H, W) -> (..., H, W, 1, 1) (positions p) or (..., 1, 1, H, W) (p')
    if index is not None:
        d = d[index]
    for _ in k.shape:
        d = d.unsqueeze(-1) if first else d.unsqueeze(k.batch_ndim)
    return d


State = Union[KernelState, tuple]


_SCRATCH_MIN_BYTES = 4 * 1024**2


def scratch(shape, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tile-sized temporary like ``like``; large ones are backed by transparent huge pages
    (the kernels of image pairs allocate many multi-megabyte temporaries per layer, and with 4 KiB pages
    their first touch costs as much as the arithmetic)."""
    return empty_output(tuple(shape), like.dtype, like.device, min_bytes=_SCRATCH_MIN_BYTES)


def _tied_vars(nngp: torch.Tensor, pairwise: bool, pairs=None, lazy=False) -> dict:
    if pairs is not None:
        r1, r2, b = pairs
        own = nngp[:b]  # the self pairs (i, i) come first
        if lazy:  # spatial states: gathered per pair only where needed (KernelState.marginals)
            return {"var1": own, "var2": own}
        return {"var1": own[r1], "var2": own[r2]}
    if pairwise:
        return {"var1": nngp, "var2": nngp}
    d = torch.diagonal(nngp, 0, 0, 1).movedim(-1, 0)
    return {"var1": d.unsqueeze(1), "var2": d.unsqueeze(0)}


def drop_pixel_pairs(k):
    """The same state with only the same-position diagonal kept (pixel pairs -> diagonal layout)."""
    if isinstance(k, tuple):
        return tuple(drop_pixel_pairs(b) for b in k)
    if not k.pixel_pairs:
        return k
    return k.update(to_diagonal(k.nngp, k), to_diagonal(k.ntk, k), lambda v: to_diagonal(v, k), pixel_pairs=False)


_LETTERS = "hwlHWL"


def input_state(a: torch.Tensor, b: torch.Tensor | None, *, pairwise: bool, pixel_pairs: bool, need_ntk: bool,
                width: int, pairs: tuple | None = None) -> KernelState:
    """The kernel state of the raw inputs for one tile: Sigma0(x, x') = x . x' / d (flat, ``a`` of shape
    ``(b1, d)``) or Sigma0(x, x'; p, p') = sum_c x_c(p) x'_c(p') / C (spatial, ``a`` of shape
    ``(b1, *size, C)``, channels last), Theta0 = 0.

    ``a`` and ``b`` are already scaled by 1 / sqrt(d) resp. 1 / sqrt(C); ``b=None`` means the tile pairs
    ``a`` with itself (then Sigma(x, x) on the diagonal equals the variance exactly). ``pairwise`` pairs
    row i of ``a`` with row i of ``b`` (batch axes ``(b,)``) instead of all rows with all rows.
    ``pairs=(r1, r2, n)`` (with ``b=None``): a symmetric tile, the pairs (a[r1[k]], a[r2[k]]), i <= j, the
    n self pairs first (see :class:`KernelState`, ``pairs``); pairwise batch axes ``(len(r1),)``.
    """
    if pairs is not None:
        r1, r2, _ = pairs
        nd = a.ndim - 2
        p, q = _LETTERS[:nd], _LETTERS[3:3 + nd]
        if nd and pixel_pairs:
            nngp = torch.einsum(f"i{p}c,i{q}c->i{p}{q}", a[r1], a[r2]).contiguous()
        else:  # all b^2 products in one batched matrix product (cheap here), then the pairs i <= j
            nngp = torch.einsum(f"i{p}c,j{p}c->ij{p}", a, a)[r1, r2].contiguous()
        st = KernelState(nngp=nngp, ntk=0.0 if need_ntk else None, var1=nngp, var2=nngp, width=width,
                         gaussian=False, shape=tuple(a.shape[1:-1]), pixel_pairs=pixel_pairs and nd > 0, tied=True,
                         pairs=pairs)
        return st.replace(**_tied_vars(nngp, True, pairs, bool(st.shape)))
    same = b is None
    b = a if same else b
    nd = a.ndim - 2
    ntk = 0.0 if need_ntk else None
    if nd == 0:
        if pairwise:
            var1 = (a * a).sum(1)
            var2 = var1 if same else (b * b).sum(1)
            nngp = var1 if same else (a * b).sum(1)
            return KernelState(nngp=nngp, ntk=ntk, var1=var1, var2=var2, width=width, gaussian=False)
        var1 = (a * a).sum(1)
        var2 = var1 if same else (b * b).sum(1)
        g = a @ b.T
        if same:
            g.diagonal().copy_(var1)
        return KernelState(nngp=g, ntk=ntk, var1=var1[:, None], var2=var2[None, :], width=width, gaussian=False)
    p, q = _LETTERS[:nd], _LETTERS[3:3 + nd]
    if pixel_pairs:
        pair = p + q
        self_ = f"i{p}c,i{q}c->i{pair}"
        if pairwise:
            nngp = torch.einsum(self_, a, b)
        else:
            nngp = torch.einsum(f"i{p}c,j{q}c->ij{pair}", a, b)
        var1 = var2 = None if same else (torch.einsum(self_, a, a).contiguous(), torch.einsum(self_, b, b).contiguous())
    else:
        if pairwise:
            nngp = (a * b).sum(-1)
        else:
            nngp = torch.einsum(f"i{p}c,j{p}c->ij{p}", a, b)
        var1 = var2 = None if same else ((a * a).sum(-1), (b * b).sum(-1))
    nngp = nngp.contiguous()  # einsum may return a permuted view; every later pass would pay for it
    if same:  # the self-kernels are the diagonal pairs of nngp (tied views)
        st = KernelState(nngp=nngp, ntk=ntk, var1=nngp, var2=nngp, width=width, gaussian=False,
                         shape=tuple(a.shape[1:-1]), pixel_pairs=pixel_pairs, tied=True)
        return st.replace(**_tied_vars(nngp, pairwise))
    var1, var2 = var1
    if not pairwise:
        var1, var2 = var1.unsqueeze(1), var2.unsqueeze(0)
    return KernelState(nngp=nngp, ntk=ntk, var1=var1, var2=var2, width=width, gaussian=False,
                       shape=tuple(a.shape[1:-1]), pixel_pairs=pixel_pairs)
