"""Random features of the NNGP and the NTK of fully-connected ReLU networks (Han et al. 2021)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .._validation import ConfigError
from ._base import FeatureMap
from ._plan import DenseOp, read_architecture
from ._sketch import TensorSRHT

__all__ = ["NTKRandomFeatures"]

SAMPLINGS = ("gaussian", "leverage")


class NTKRandomFeatures(FeatureMap):
    """Random features whose inner products approximate the NNGP or NTK of a ReLU network.

    After Han, Avron, Shoham, Kim and Shin, "Random Features for the Neural Tangent Kernel" (2021),
    Alg. 1: the layer recursion of the kernels (Jacot et al. 2018, Thm. 1) is followed with feature
    vectors instead of kernel matrices. With phi_s(x) features of the current NNGP and phi_t(x) of the
    current NTK (input: phi_s = x / sqrt(d), the input kernel x.x'/d; phi_t = 0):

    * ``Dense(W_std, b_std)``: Sigma' = W_std^2 Sigma + b_std^2 and Theta' = Sigma' + W_std^2 Theta, so
      phi_s' = [W_std phi_s, b_std] and phi_t' = [phi_s', W_std phi_t] (a frozen layer: phi_t' = W_std phi_t).
    * activation phi(z) = a min(z, 0) + b max(z, 0) (ReLU: a=0, b=1): arc-cosine random features
      (Cho & Saul 2009), with G1 (m1 x p), G0 (m0 x p) standard Gaussian,
      phi_s' = phi(G1 phi_s) / sqrt(m1) (E[<.,.>] = E[phi(u) phi(v)], the NNGP dual) and
      dot = phi'(G0 phi_s) / sqrt(m0) (E[<.,.>] = E[phi'(u) phi'(v)]); Theta' = Theta * Sigma_dot is a
      product of kernels, whose features phi_t (x) dot are compressed by TensorSRHT to ms columns
      (Han et al. 2021, Sec. 3.2; unbiased).

    Each step is unbiased given the previous layer's features, so for one hidden layer the feature
    inner products are unbiased estimates of the kernel; deeper, the arc-cosine map of an estimated
    covariance has an O(1/m1) bias (as a finite-width network has), small next to the O(1/sqrt(m))
    spread. The relative error of the Gram matrix decays like n_components^(-1/2).

    Parameters
    ----------
    architecture : ntkit.Architecture or its config
        Dense layers and ReLU-family activations (Relu, LeakyRelu, Abs, ABRelu), NTK parameterization,
        with or without biases, any depth; frozen Dense layers (trainable=False) are supported. Other
        layers raise a ConfigError naming the layer.
    n_components : int
        Number of output features. For ``kernel="ntk"`` half go to the sketched NTK part and half to the
        NNGP part of the readout (Theta = Sigma + W^2 Theta_below); ``n_components_`` is the exact count
        (it differs from ``n_components`` only for architectures without an activation, whose kernel has
        an exact finite feature map of dimension d + 1).
    kernel : {"ntk", "nngp"}
    random_state : int, numpy/torch generator or None
    sampling : {"gaussian", "leverage"}
        "leverage": the weights of the first layer's derivative features are drawn from the density
        ||w||^2 N(w; 0, I) / p, proportional to an upper bound of their ridge leverage function, with
        importance weights sqrt(p) / ||w|| (Han et al. 2021, Sec. 4); unbiased like "gaussian", with a
        lower variance for the x.x' kappa_0 term of the NTK.
    dtype : torch dtype or name, default float64
    device : torch device, optional
        Where features are computed (default: the input's device; CPU for numpy).
    memory_budget : float, optional
        Bytes of working memory per transform batch (default min(1 GiB, 25% of free memory)).
    batch_size : int, optional
        Rows per batch (overrides the budget).
    progress : bool, default True
        A progress bar over batches (on a terminal only).

    Attributes
    ----------
    n_components_ : int
    n_features_in_ : int
    widths_ : dict
        ``{"arccos1": m1, "arccos0": m0, "sketch": ms}``.

    Examples
    --------
    >>> import ntkit, torch
    >>> arch = ntkit.mlp(2, W_std=2**0.5, b_std=0.1)
    >>> x = torch.randn(50, 8, dtype=torch.float64)
    >>> rf = NTKRandomFeatures(arch, 4096, random_state=0).fit(x)
    >>> phi = rf.transform(x)                 # (50, 4096); phi @ phi.T ~ arch.kernel(x, get="ntk")
    """

    def __init__(self, architecture: Any, n_components: int = 1024, *, kernel: str = "ntk",
                 random_state: Any = None, sampling: str = "gaussian", dtype: Any = None, device: Any = None,
                 memory_budget: float | None = None, batch_size: int | None = None, progress: bool = True):
        self.architecture = architecture
        self.n_components = n_components
        self.kernel = kernel
        self.random_state = random_state
        self.sampling = sampling
        self.dtype = dtype
        self.device = device
        self.memory_budget = memory_budget
        self.batch_size = batch_size
        self.progress = progress

    # -- sizes ------------------------------------------------------------------------------------
    def _out_dim(self, d: int, m1: int, ms: int) -> int:
        ntk = self.kernel == "ntk"
        s, t = d, None
        for op in self.ops_:
            if isinstance(op, DenseOp):
                s = s + (1 if op.b_std > 0 else 0)
                if ntk and op.trainable:
                    t = s + (t or 0)
            else:
                s = m1
                t = ms if t is not None else None
        return t if ntk else s

    def _allocate(self, d: int, n: int) -> tuple[int, int]:
        c = self._out_dim(d, 0, 0)
        alpha = self._out_dim(d, 1, 0) - c
        beta = self._out_dim(d, 0, 1) - c
        if alpha == 0 and beta == 0:
            return 0, 0  # no activation: exact linear features
        left = n - c
        if alpha and beta:
            ms = (left + 1) // 2
            m1 = left - ms
        elif beta:
            ms, m1 = left, max(left // 2, 1)
        else:
            m1, ms = left, max(left // 2, 1)
        if min(m1, ms) < 1:
            raise ValueError(f"n_components={n} is too small for this architecture: at least {c + alpha + beta} "
                             "features are needed")
        return m1, ms

    # -- fit --------------------------------------------------------------------------------------
    def _fit(self, d: int, gen: torch.Generator) -> None:
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        self.architecture_, self.ops_ = read_architecture(self.architecture, self.kernel)
        if self.architecture_.input_dim is not None and self.architecture_.input_dim != d:
            raise ValueError(f"X has {d} features, the architecture expects input_dim={self.architecture_.input_dim}")
        m1, ms = self._allocate(d, int(self.n_components))
        m0 = m1
        ntk = self.kernel == "ntk"
        params: list = []
        s, t, first_act = d, None, True
        self._max_dim = d
        for op in self.ops_:
            if isinstance(op, DenseOp):
                s = s + (1 if op.b_std > 0 else 0)
                if ntk and op.trainable:
                    t = s + (t or 0)
                params.append(None)
            else:
                g1 = torch.randn((s, m1), generator=gen, dtype=torch.float64)
                g0 = w0 = sk = None
                if ntk and t is not None:
                    g0 = torch.randn((s, m0), generator=gen, dtype=torch.float64)
                    if self.sampling == "leverage" and first_act:
                        # w = r u with u uniform on the sphere and r ~ chi(p + 2): density ||w||^2 N(w) / p
                        r = torch.randn((s + 2, m0), generator=gen, dtype=torch.float64).norm(dim=0)
                        g0 = g0 / g0.norm(dim=0, keepdim=True) * r
                        w0 = math.sqrt(s) / r
                    sk = TensorSRHT(t, m0, ms, gen)
                    self._max_dim = max(self._max_dim, 2 * (t + m0) * 2)
                params.append((g1, g0, w0, sk))
                self._max_dim = max(self._max_dim, s + m1 + m0 + 4 * ms)
                s, t = m1, (ms if t is not None else None)
                first_act = False
        self.n_components_ = t if ntk else s
        self.widths_ = {"arccos1": m1, "arccos0": m0 if ntk else 0, "sketch": ms if ntk else 0}
        self._params64 = params
        self._params = None
        self._params_key = None

    def _convert(self, layer_params, dtype, device):
        g1, g0, w0, sk = layer_params

        def conv(a):
            return None if a is None else a.to(dtype=dtype, device=device)

        return conv(g1), conv(g0), conv(w0), None if sk is None else sk.to(dtype, device)

    def _row_bytes(self) -> int:
        return 4 * self._max_dim + 2 * self.n_components_

    # -- transform --------------------------------------------------------------------------------
    def _dense_step(self, op: DenseOp, s: torch.Tensor, t: torch.Tensor | None):
        """Dense(W_std, b_std) on features (..., dim): phi_s' = [W_std phi_s, b_std], phi_t' = [phi_s', W_std phi_t]."""
        s = s * op.W_std if op.W_std != 1.0 else s
        if op.b_std > 0:
            s = torch.cat([s, s.new_full((*s.shape[:-1], 1), op.b_std)], dim=-1)
        if self.kernel == "ntk":
            if op.trainable:
                t = s if t is None else torch.cat([s, t * op.W_std], dim=-1)
            elif t is not None:
                t = t * op.W_std
        return s, t

    def _act_step(self, op, prm, s: torch.Tensor, t: torch.Tensor | None):
        """An activation on row features (rows, dim): arc-cosine features of order 1 (NNGP) and 0 (the
        derivative kernel), the latter tensored with phi_t by TensorSRHT (class docstring)."""
        g1, g0, w0, sk = prm
        if self.kernel == "ntk" and t is not None:
            z0 = s @ g0
            dot = torch.where(z0 > 0, op.b, op.a).to(z0.dtype) if op.a != 0 else (z0 > 0).to(z0.dtype)
            if op.b != 1.0 and op.a == 0:
                dot = dot * op.b
            if w0 is not None:
                dot = dot * w0
            dot = dot * (1.0 / math.sqrt(g0.shape[1]))
            t = sk(t, dot)
        z1 = s @ g1
        s = (torch.relu(z1) * op.b if op.a == 0 else op.a * z1.clamp(max=0) + op.b * z1.clamp(min=0))
        s = s * (1.0 / math.sqrt(g1.shape[1]))
        return s, t

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        ntk = self.kernel == "ntk"
        s = x * (1.0 / math.sqrt(x.shape[1]))
        t = None
        for op, p in zip(self.ops_, self._params):
            if isinstance(op, DenseOp):
                s, t = self._dense_step(op, s, t)
            else:
                s, t = self._act_step(op, p, s, t)
        if ntk:
            if t is None:  # pragma: no cover - excluded by read_architecture
                raise ConfigError("the NTK of this architecture is identically zero")
            return t
        return s
