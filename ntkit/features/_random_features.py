"""Random features of the NNGP and the NTK of fully-connected ReLU networks (Han et al. 2021)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .._validation import ConfigError
from ._base import FeatureMap
from ._plan import DenseOp, read_architecture
from ._sketch import TensorSRHT, fwht

__all__ = ["NTKRandomFeatures"]

SAMPLINGS = ("gaussian", "leverage", "orthogonal")
#: block size of the orthogonal directions of sampling="orthogonal" (a (p, k) QR per block: O(p k^2))
_ORTHOGONAL_BLOCK = 256
#: default batches keep their widest temporary below this many bytes (see NTKRandomFeatures._batch_rows)
_REUSE_BYTES = 24 * 1024**2


def orthogonal_gaussian(p: int, m: int, gen: torch.Generator, block: int = _ORTHOGONAL_BLOCK,
                        antithetic: bool = True) -> torch.Tensor:
    """(p, m) directions, each N(0, I_p)-distributed, orthogonal within blocks (and in antithetic pairs).

    The first ceil(m / 2) columns (all m with ``antithetic=False``) come in blocks of min(p, block) mutually
    orthogonal directions -- a Haar-distributed orthonormal frame from the QR of a Gaussian (p, k) matrix,
    signs fixed by R's diagonal -- with independent chi(p) lengths (Yu et al. 2016); the other columns are
    their negatives.
    """
    base = (m + 1) // 2 if antithetic else m
    k = min(p, block)
    nb = -(-base // k)
    q, r = torch.linalg.qr(torch.randn((nb, p, k), generator=gen, dtype=torch.float64))
    q = q * torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0)[:, None, :]
    lengths = torch.randn((nb, p, k), generator=gen, dtype=torch.float64).norm(dim=1)
    w = (q * lengths[:, None, :]).permute(1, 0, 2).reshape(p, nb * k)[:, :base]
    return torch.cat([w, -w], 1)[:, :m] if antithetic else w


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
    sampling : {"gaussian", "leverage", "orthogonal"}
        How the Gaussian directions of the arc-cosine features are drawn. "gaussian": independent
        N(0, I). "leverage": the weights of the first layer's derivative features are drawn from the
        density ||w||^2 N(w; 0, I) / p, proportional to an upper bound of their ridge leverage function,
        with importance weights sqrt(p) / ||w|| (Han et al. 2021, Sec. 4); unbiased like "gaussian", with a
        lower variance for the x.x' kappa_0 term of the NTK. "orthogonal": orthogonal random features
        (Yu et al., "Orthogonal Random Features", NeurIPS 2016; Choromanski, Rowland & Weller 2017 for
        the arc-cosine kernels) in antithetic pairs: blocks of up to 256 mutually orthogonal directions
        with independent chi(p) lengths, each followed by its negative w -> -w (not for even
        activations such as Abs, where the negative would repeat the feature). Every direction is still
        N(0, I)-distributed, so the features stay unbiased; the negative correlations within a block
        and the pairs lower the variance of the kernel estimate on low-dimensional inputs (2.4x lower
        Frobenius error of the NNGP part on 32-d Gaussian inputs; no gain on MNIST digits; ridge
        regression's test error unchanged within seed noise: benchmarks/RESULTS.md). Costs one (p, k)
        QR per block at fit time.
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

    _reuse_bytes = _REUSE_BYTES

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
                g1 = self._directions(s, m1, gen, op)
                g0 = w0 = sk = None
                if ntk and t is not None:
                    g0 = self._directions(s, m0, gen, op)
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

    def _directions(self, p: int, m: int, gen: torch.Generator, op) -> torch.Tensor:
        """(p, m) Gaussian directions, independent or orthogonal (``sampling``). The antithetic pairs w, -w are
        left out for even activations (a = -b, e.g. Abs): there phi(-z) = phi(z) and phi'(-z) phi'(-z') =
        phi'(z) phi'(z'), so the pair's second feature would repeat the first."""
        if self.sampling != "orthogonal":
            return torch.randn((p, m), generator=gen, dtype=torch.float64)
        return orthogonal_gaussian(p, m, gen, antithetic=op.a != -op.b)

    def _convert(self, layer_params, dtype, device):
        g1, g0, w0, sk = layer_params

        def conv(a):
            return None if a is None else a.to(dtype=dtype, device=device)

        # g1 carries the 1 / sqrt(m1) of the arc-cosine features: phi(c z) = c phi(z) for c > 0 and the
        # ReLU family, so the scaling costs no pass over the (rows, m1) activations
        g1 = None if g1 is None else (g1 * (1.0 / math.sqrt(g1.shape[1]))).to(dtype=dtype, device=device)
        return g1, conv(g0), conv(w0), None if sk is None else sk.to(dtype, device)

    def _batch_rows(self, n: int, item: int, device: torch.device) -> int:
        rows = super()._batch_rows(n, item, device)
        if self.batch_size is None and self.memory_budget is None and self._reuse_bytes:
            # glibc's malloc hands blocks above its mmap threshold (dynamic, at most 32 MiB) back to the kernel
            # on free, and every batch then pays first-touch page faults on fresh temporaries (about half the
            # transform time, benchmarks/RESULTS.md); batches whose widest temporary stays below it reuse memory
            widest = max(self._max_dim, self.n_components_) * item
            rows = min(rows, max(64, int(self._reuse_bytes // widest)))
        return rows

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
                t = s if t is None else torch.cat([s, t * op.W_std if op.W_std != 1.0 else t], dim=-1)
            elif t is not None and op.W_std != 1.0:
                t = t * op.W_std
        return s, t

    def _act_step(self, op, prm, s: torch.Tensor, t: torch.Tensor | None):
        """An activation on row features (rows, dim): arc-cosine features of order 1 (NNGP) and 0 (the
        derivative kernel), the latter tensored with phi_t by TensorSRHT (class docstring)."""
        g1, g0, w0, sk = prm
        if self.kernel == "ntk" and t is not None:
            t = self._derivative_sketch(op, s, t, g0, w0, sk)
        z1 = s @ g1  # g1 includes 1 / sqrt(m1) (_convert)
        if op.a == 0:
            s = z1.relu_() if op.b == 1.0 else z1.relu_().mul_(op.b)
        else:
            s = op.a * z1.clamp(max=0) + op.b * z1.clamp(min=0)
        return s, t

    @staticmethod
    def _derivative_sketch(op, s: torch.Tensor, t: torch.Tensor, g0, w0, sk) -> torch.Tensor:
        """TensorSRHT(phi_t, dot) with dot = phi'(G0 phi_s) [w0] / sqrt(m0), in few passes: phi'(z) takes two
        values, so dot times the right factor's random signs and every constant scale (1 / sqrt(m0), the
        sketch's 1 / sqrt(ms), the importance weights w0) is one product with the step function, written into
        the zero-padded buffer of the Walsh-Hadamard transform. Equal to ``sk(t, dot)`` up to rounding."""
        z0 = s @ g0
        right = sk.right
        c = 1.0 / math.sqrt(g0.shape[1] * sk.m)
        hi, lo = right.signs * (op.b * c), right.signs * (op.a * c)
        if w0 is not None:
            hi, lo = hi * w0, lo * w0
        buf = z0.new_empty((z0.shape[0], right.pad))
        if right.pad > right.dim:
            buf[:, right.dim:].zero_()
        step = z0.gt_(0)  # 1 where z > 0, else 0 (in place: torch.where is ~4x slower here)
        if op.a == 0:
            torch.mul(step, hi, out=buf[:, :right.dim])
        else:
            torch.addcmul(lo, step, hi - lo, out=buf[:, :right.dim])
        del z0, step
        return sk.left(t).mul_(torch.index_select(fwht(buf), 1, right.rows))

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
