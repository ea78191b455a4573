"""CNTK sketch: random features of the CNTK / CNN-GP with global average pooling (Zandieh et al. 2021)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .._validation import ConfigError, as_float_tensor
from ._plan import ActOp, ConvOp, DenseOp, PoolOp, read_conv_architecture
from ._random_features import NTKRandomFeatures
from ._sketch import TensorSRHT, _next_pow2, _SRHT

__all__ = ["CNTKSketch"]


class CNTKSketch(NTKRandomFeatures):
    """Random features whose inner products approximate the CNTK (or CNN-GP) of a convolutional ReLU
    network with global average pooling.

    After the CNTK sketch of Zandieh, Han, Avron, Shoham, Kim and Shin, "Scaling Neural Tangent Kernels via
    Sketching and Random Features" (NeurIPS 2021): every position p of an image carries features
    phi(p) of the NNGP Sigma(p, p') and psi(p) of the NTK Theta(p, p') (inner products between positions
    of two images approximate the position-pair kernels of the exact recursion of Arora et al. 2019,
    App. B, as implemented by :class:`ntkit.Conv` and :class:`ntkit.GlobalAvgPool`):

    * input: phi_0(p) = x(p) / sqrt(C) (the input kernel x(p) . x'(p') / C), psi_0 = 0.
    * ``Conv(W_std, b_std)`` with F filter taps, Sigma' = (W_std^2 / F) sum_o Sigma(p+o, p'+o) + b_std^2 and
      Theta' = Sigma' + (W_std^2 / F) sum_o Theta(p+o, p'+o): the features of the window around p are
      concatenated (zero padding, the same geometry as the exact kernel: :meth:`ntkit.Conv.patches`),
      phi'(p) = [(W_std / sqrt(F)) patch(phi)(p), b_std] and psi'(p) = [phi'(p), (W_std / sqrt(F)) patch(psi)(p)]
      -- exact, no randomness. Before an activation a phi' longer than the arc-cosine width is reduced
      by an SRHT shared by all positions and images (unbiased for inner products; the reduced phi' also
      enters psi'): O(F m log(F m) + m^2) per position instead of the O(F m^2) of a Gaussian on the patch.
    * ReLU-family activation, per position: arc-cosine random features of order 1 (NNGP) and 0 (the
      derivative kernel Sigma_dot) with Gaussian weights shared by all positions, and
      psi'(p) = TensorSRHT(psi(p) (x) dot(p)) for Theta' = Theta * Sigma_dot, exactly as
      :class:`NTKRandomFeatures` does for one fully-connected layer (Han et al. 2021, Alg. 1).
    * ``AvgPool``: the window mean of the features; ``GlobalAvgPool``: the mean over positions
      (Sigma' = mean over all pairs (p, p') of Sigma(p, p') is the inner product of the means).
    * ``Dense`` readout (and any Dense / activation layers after the pooling): as in
      :class:`NTKRandomFeatures`.

    Zandieh et al. sketch the ReLU duals by PolySketch of polynomial fits; this class uses the
    arc-cosine random features of their NTK random-features map instead (no polynomial-fit error). With
    one convolution + activation the feature inner products are unbiased estimates of the exact kernel;
    deeper, the arc-cosine map of an estimated covariance (and the SRHT reduction) adds an O(1/m) bias,
    small next to the O(1/sqrt(m)) spread. The relative error decays like n_components^(-1/2).

    Cost per image: O(P (F m log(F m) + m^2)) per layer for P positions and m features per position;
    the working memory is about (batch, P, F m) numbers, batched under ``memory_budget``.

    Parameters
    ----------
    architecture : ntkit.Architecture or its config
        NTK parameterization: ``Conv`` layers (1-D or 2-D; any filter, stride and padding; trainable or
        frozen), ReLU-family activations (Relu, LeakyRelu, Abs, ABRelu) after a Conv, optional ``AvgPool``,
        then ``GlobalAvgPool``, then ``Dense`` layers and activations ending in a Dense readout. Other
        layers (Flatten readout, Dense on spatial activations, other activations, ...) raise a
        ConfigError naming the layer.
    n_components : int
        Number of output features (``n_components_`` is the exact count; for ``kernel="ntk"`` about half
        go to the NNGP part and half to the sketched NTK part, as in :class:`NTKRandomFeatures`).
    kernel : {"ntk", "nngp"}
    random_state, dtype, device, memory_budget, batch_size, progress
        As :class:`NTKRandomFeatures`; ``batch_size`` counts images.

    Inputs are channels-last, ``(n, H, W, C)`` images or ``(n, L, C)`` signals, as ``arch.kernel`` takes by
    default (``layout="NHWC"``); ``transform`` needs the spatial shape seen by ``fit``.

    Attributes
    ----------
    n_components_ : int
    input_shape_ : tuple
        ``(H, W, C)`` or ``(L, C)``.
    widths_ : dict
        ``{"arccos1": m1, "arccos0": m0, "sketch": ms, "projection": r}`` (per-position widths).

    Examples
    --------
    >>> import ntkit, torch
    >>> arch = ntkit.serial(ntkit.Conv(None, (3, 3), W_std=2**0.5, b_std=0.1), ntkit.Relu(),
    ...                     ntkit.GlobalAvgPool(), ntkit.Dense(1, 2**0.5, 0.1))
    >>> x = torch.randn(10, 6, 6, 2, dtype=torch.float64)
    >>> cs = CNTKSketch(arch, 1024, random_state=0).fit(x)
    >>> phi = cs.transform(x)            # (10, 1024); phi @ phi.T ~ arch.kernel(x, get="ntk")
    """

    def __init__(self, architecture: Any, n_components: int = 1024, *, kernel: str = "ntk",
                 random_state: Any = None, dtype: Any = None, device: Any = None,
                 memory_budget: float | None = None, batch_size: int | None = None, progress: bool = True):
        super().__init__(architecture, n_components, kernel=kernel, random_state=random_state, sampling="gaussian",
                         dtype=dtype, device=device, memory_budget=memory_budget, batch_size=batch_size,
                         progress=progress)

    # -- inputs -----------------------------------------------------------------------------------
    def _kind(self, nd: int) -> str:
        return {1: "signals (n, L, C)", 2: "images (n, H, W, C)"}[nd]

    def fit(self, X: Any, y: Any = None) -> "CNTKSketch":
        """Draw the feature map for inputs of the shape of ``X`` (only its shape is read)."""
        _, _, nd = read_conv_architecture(self.architecture, self.kernel)
        t = as_float_tensor(X, "X", dtype=None, check_finite=False)
        if t.ndim != nd + 2:
            raise ValueError(f"this architecture ({nd}-D conv / pooling layers) takes {self._kind(nd)} channels-last, "
                             f"got X of shape {tuple(t.shape)}; reshape flat data to that layout first")
        self.input_shape_ = tuple(int(s) for s in t.shape[1:])
        return super().fit(t)

    def _prepare(self, X: Any) -> tuple[torch.Tensor, bool]:
        self._check_fitted()
        shape = tuple(X.shape[1:]) if hasattr(X, "shape") else tuple(np.shape(X)[1:])
        if tuple(int(s) for s in shape) != self.input_shape_:
            kind = self._kind(len(self.input_shape_) - 1)
            raise ValueError(f"X has samples of shape {tuple(shape)}, but {type(self).__name__} was fitted on "
                             f"samples of shape {self.input_shape_} (channels-last {kind}); fit again for another "
                             "input shape")
        t, numpy_in = super()._prepare(X)  # validated, flattened
        return t.reshape(t.shape[0], *self.input_shape_), numpy_in

    # -- sizes ------------------------------------------------------------------------------------
    def _out_dim(self, d: int, m1: int, ms: int) -> int:
        """Output dimension for per-position arc-cosine width m1 and sketch width ms (linear in both)."""
        ntk = self.kernel == "ntk"
        s, t = d, None
        for op in self.ops_:
            if isinstance(op, ConvOp):
                if op.mean:
                    continue
                F = math.prod(op.layer.filter_shape)
                s = F * s + (1 if op.b_std > 0 else 0)
                if ntk and op.trainable:
                    t = s + F * (t or 0)
                elif t is not None:
                    t = F * t
            elif isinstance(op, DenseOp):
                s = s + (1 if op.b_std > 0 else 0)
                if ntk and op.trainable:
                    t = s + (t or 0)
            elif isinstance(op, ActOp):
                s = m1
                t = ms if t is not None else None
        return t if ntk else s

    # -- fit --------------------------------------------------------------------------------------
    def _fit(self, d: int, gen: torch.Generator) -> None:
        self.architecture_, self.ops_, nd = read_conv_architecture(self.architecture, self.kernel)
        size, C = self.input_shape_[:-1], self.input_shape_[-1]
        m1, ms = self._allocate(C, int(self.n_components))
        m0 = r = m1
        ntk = self.kernel == "ntk"
        params: list = []
        s, t = C, None
        positions = math.prod(size)
        work = positions * C
        for k, op in enumerate(self.ops_):
            prm = None
            if isinstance(op, ConvOp):
                try:
                    geo = op.layer.geometry(tuple(size))
                except (ConfigError, ValueError) as exc:
                    raise ValueError(f"inputs of spatial shape {tuple(size)} do not fit layer {op.layer!r}: {exc}") \
                        from None
                size = tuple(g[4] for g in geo)
                positions = math.prod(size)
                F = math.prod(op.layer.filter_shape)
                if op.mean:
                    work = max(work, positions * 2 * F * (s + (t or 0)))
                else:
                    s_full = F * s + (1 if op.b_std > 0 else 0)
                    nxt = self.ops_[k + 1] if k + 1 < len(self.ops_) else None
                    if isinstance(nxt, ActOp) and s_full > r:
                        prm = _SRHT(s_full, r, gen)
                        work = max(work, positions * (s_full + 2 * _next_pow2(s_full)))
                        s_new = r
                    else:
                        s_new = s_full
                    t_new = (s_new + F * (t or 0)) if (ntk and op.trainable) else (F * t if t is not None else None)
                    work = max(work, positions * (2 * F * (s + (t or 0)) + s_full + (t_new or 0)))
                    s, t = s_new, t_new
            elif isinstance(op, PoolOp):
                positions, size = 1, ()
            elif isinstance(op, DenseOp):
                s = s + (1 if op.b_std > 0 else 0)
                if ntk and op.trainable:
                    t = s + (t or 0)
            else:
                g1 = torch.randn((s, m1), generator=gen, dtype=torch.float64)
                g0 = sk = None
                if ntk and t is not None:
                    g0 = torch.randn((s, m0), generator=gen, dtype=torch.float64)
                    sk = TensorSRHT(t, m0, ms, gen)
                prm = (g1, g0, None, sk)
                work = max(work, positions * (s + (t or 0) + 2 * m1 + 2 * m0 + 3 * _next_pow2(t or 1)
                                              + 3 * _next_pow2(m0) + 3 * ms))
                s, t = m1, (ms if t is not None else None)
            params.append(prm)
        self.n_components_ = t if ntk else s
        self.widths_ = {"arccos1": m1, "arccos0": m0 if ntk else 0, "sketch": ms if ntk else 0, "projection": r}
        self._work = int(work)
        self._params64 = params
        self._params = None
        self._params_key = None

    _reuse_bytes = 0  # keeps its own batch sizing (NTKRandomFeatures._batch_rows)

    def _convert(self, layer_params, dtype, device):
        if isinstance(layer_params, _SRHT):
            return layer_params.to(dtype, device)
        return super()._convert(layer_params, dtype, device)

    def _row_bytes(self) -> int:
        return 2 * self._work + 2 * self.n_components_

    # -- transform --------------------------------------------------------------------------------
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        ntk = self.kernel == "ntk"
        x = x.reshape(x.shape[0], *self.input_shape_)
        s = x * (1.0 / math.sqrt(x.shape[-1]))
        t = None
        for op, prm in zip(self.ops_, self._params):
            if isinstance(op, ConvOp):
                s, t = self._conv_step(op, prm, s, t)
            elif isinstance(op, PoolOp):
                axes = tuple(range(1, s.ndim - 1))
                s = s.mean(dim=axes)
                t = None if t is None else t.mean(dim=axes)
            elif isinstance(op, DenseOp):
                s, t = self._dense_step(op, s, t)
            else:
                lead = s.shape[:-1]
                s, t = self._act_step(op, prm, s.reshape(-1, s.shape[-1]),
                                      None if t is None else t.reshape(-1, t.shape[-1]))
                s = s.reshape(*lead, s.shape[-1])
                t = None if t is None else t.reshape(*lead, t.shape[-1])
        return t if ntk else s

    def _conv_step(self, op: ConvOp, proj, s: torch.Tensor, t: torch.Tensor | None):
        """A convolution (or average pooling window) on per-position features (b, *size, dim)."""
        lay = op.layer
        F = math.prod(lay.filter_shape)
        if op.mean:  # AvgPool: Sigma' = (1 / F^2) sum_{o, o'} Sigma(p + o, p' + o') = <mean patch, mean patch'>
            def mean(u):
                pt = lay.patches(u)
                return pt.reshape(*pt.shape[:-1], u.shape[-1], F).mean(dim=-1)
            return mean(s), None if t is None else mean(t)
        c = op.W_std / math.sqrt(F)
        s = lay.patches(s) * c
        if op.b_std > 0:
            s = torch.cat([s, s.new_full((*s.shape[:-1], 1), op.b_std)], dim=-1)
        if proj is not None:  # phi' reduced by an SRHT shared by all positions (unbiased for Sigma')
            r = proj.rows.shape[0]
            lead = s.shape[:-1]
            s = (proj(s.reshape(-1, s.shape[-1])) * (1.0 / math.sqrt(r))).reshape(*lead, r)
        if self.kernel == "ntk":
            if op.trainable:
                t = s if t is None else torch.cat([s, lay.patches(t) * c], dim=-1)
            elif t is not None:
                t = lay.patches(t) * c
        return s, t
