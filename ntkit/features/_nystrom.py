"""Nyström features of an architecture's exact NNGP or NTK (any architecture with array inputs)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._linalg import symmetric_eigh
from .._validation import ConfigError, as_float_tensor, resolve_dtype
from ..kernels import Architecture
from ..kernels.recurrent import is_sequence_architecture
from ._base import FeatureMap, check_n_components, clip_rows, pick_rows
from ._plan import as_architecture

__all__ = ["NTKNystroem"]


class NTKNystroem(FeatureMap):
    """Nyström features of the exact NNGP or NTK of an architecture: phi(x) = k(x, C) K_CC^{-1/2}.

    The data-dependent counterpart of the random feature maps (Williams & Seeger, "Using the Nyström
    method to speed up kernel machines", NIPS 2001; the transformer of scikit-learn's
    ``kernel_approximation.Nystroem``, here with the exact infinite-width kernels). ``fit(X)`` draws
    ``n_components`` rows of ``X`` uniformly without replacement as the centers C and computes their kernel
    matrix K_CC = V diag(l) V^T; ``transform(X)`` computes the exact kernel between the rows of ``X`` and the
    centers and multiplies it by the pseudo-inverse square root (K_CC^+)^{1/2} = V diag(l^{-1/2}) V^T, with
    eigenvalues l <= max(l) * max(n_components * eps(float64), eps(dtype)) treated as zero. So phi(x) . phi(x') =
    k(x, C) K_CC^+ k(C, x'): exact on the centers and on their span, the orthogonal projection of k(x, .)
    onto span{k(c, .)} in the kernel's Hilbert space elsewhere (an under-estimate of the diagonal).

    Ridge regression on these features is Nyström kernel ridge regression -- the estimator FALKON solves
    (Rudi, Carratino & Rosasco 2017), ``kernel_ridge(..., solver="nystrom")``: with alpha = K_CC^{-1/2} w
    both minimise ||K_nC alpha - y||^2 + lam alpha^T K_CC alpha (tested). Its error depends on how well the
    centers span the data, not on a Monte Carlo estimate per entry, so on smooth kernels a few thousand
    centers reach the exact kernel's test error where random features need many more
    (benchmarks/RESULTS.md). Costs: fit O(m^2) kernel entries and an m x m eigendecomposition; transform
    O(n m) kernel entries and an (n, m) x (m, m) product.

    Parameters
    ----------
    architecture : ntkit.Architecture or its config
        Any architecture whose kernel takes arrays: fully connected (n, d), convolutional images
        (n, H, W, C) (NHWC) or signals (n, L, C); not recurrent ones (lists of sequences).
    n_components : int
        Number of centers, and of output features. More than the rows given to ``fit``: all rows are
        used (with a warning, as scikit-learn does).
    kernel : {"ntk", "nngp"}
    random_state : int, numpy/torch generator or None
        Which rows are the centers.
    dtype : torch dtype or name, default float64
        Working dtype of the transform (the centers' kernel matrix and its eigendecomposition are float64).
        In float32 eigenvalues below 1.2e-7 max(l) are dropped, so that kernel rounding of order eps is
        amplified by at most 1 / sqrt(eps) along any direction.
    device : torch device, optional
        Where the kernels are computed (default: the input's device; CPU for numpy).
    memory_budget : float, optional
        Bytes of working memory per transform batch, passed on to the kernel computation.
    batch_size : int, optional
        Rows per batch (overrides the budget).
    progress : bool, default True
        A progress bar over batches (on a terminal only).

    Attributes
    ----------
    n_components_ : int
        Number of centers and of output features.
    n_features_in_ : int
        Numbers per input row (the product of its shape).
    input_shape_ : tuple
        Shape of one input row (rows given to ``transform`` with the same number of values are reshaped
        to it).
    component_indices_ : ndarray of int
        Rows of the ``fit`` input that are the centers.
    components_ : torch.Tensor
        The centers, float64 on the CPU, shape (n_components_, *input_shape_).
    normalization_ : torch.Tensor
        (K_CC^+)^{1/2}, the pseudo-inverse square root, (n_components_, n_components_), float64 on the CPU.
    rank_ : int
        Number of eigenvalues of K_CC above the cut-off (the rank of the feature space).

    Examples
    --------
    >>> import ntkit, torch
    >>> arch = ntkit.mlp(2, W_std=2**0.5, b_std=0.1)
    >>> x = torch.randn(500, 8, dtype=torch.float64)
    >>> ny = NTKNystroem(arch, 200, random_state=0).fit(x)
    >>> phi = ny.transform(x)                 # (500, 200); phi @ phi.T ~ arch.kernel(x, get="ntk")
    """

    def __init__(self, architecture: Any, n_components: int = 1024, *, kernel: str = "ntk",
                 random_state: Any = None, dtype: Any = None, device: Any = None,
                 memory_budget: float | None = None, batch_size: int | None = None, progress: bool = True):
        self.architecture = architecture
        self.n_components = n_components
        self.kernel = kernel
        self.random_state = random_state
        self.dtype = dtype
        self.device = device
        self.memory_budget = memory_budget
        self.batch_size = batch_size
        self.progress = progress

    def _architecture(self) -> Architecture:
        arch = as_architecture(self.architecture, self.kernel, "ntkit.serial / ntkit.mlp / ntkit.from_config")
        if is_sequence_architecture(arch.layers):
            raise ConfigError("NTKNystroem takes array inputs; recurrent architectures (lists of sequences) are "
                              "not supported. Compute arch.kernel(seqs, centers) and its normalization directly.")
        return arch

    def fit(self, X: Any, y: Any = None) -> "NTKNystroem":
        """Draw the centers from the rows of ``X`` and factor their kernel matrix.

        Parameters
        ----------
        X : array_like, (n, d) or (n, *input_shape)
            Training inputs (numpy or torch); rows with NaN or Inf are refused.
        y : ignored
        """
        arch = self._architecture()
        m = check_n_components(self.n_components)
        if isinstance(X, (int, np.integer)) and not isinstance(X, bool):
            raise TypeError("NTKNystroem.fit needs the training inputs (its centers are rows of X), not a number "
                            "of features")
        self.dtype_ = resolve_dtype(self.dtype)
        dev = self.device if self.device is not None else (X.device if isinstance(X, torch.Tensor) else None)
        t = as_float_tensor(X.detach() if isinstance(X, torch.Tensor) else X, "X")  # checked, not copied
        n = t.shape[0]
        m = clip_rows(m, n, "n_components", "rows of X")
        idx = pick_rows(n, m, self.random_state)
        centers = t[idx.to(t.device)].to(device=dev, dtype=torch.float64)  # only the centers in float64
        kcc = arch.kernel(centers, None, self.kernel, dtype=torch.float64, memory_budget=self.memory_budget,
                          progress=False).cpu()
        lam, vec = symmetric_eigh(0.5 * (kcc + kcc.T), overwrite=True)
        # below m eps64 max(l) an eigenvalue is the eigensolver's rounding; below eps max(l) of a float32
        # transform, rounding of order eps in k(x, C) would be amplified by sqrt(max(l) / l) > 1 / sqrt(eps)
        # along that direction (a heuristic: kernel entries near correlation 1 may be less accurate than eps)
        cut = float(lam[-1]) * max(m * torch.finfo(torch.float64).eps, torch.finfo(self.dtype_).eps)
        keep = lam > cut
        if not bool(keep.any()):
            raise ValueError(f"the {self.kernel.upper()} matrix of the {m} centers is zero (largest eigenvalue "
                             f"{float(lam[-1]):.3g}): the kernel vanishes on these rows (no trainable layer for "
                             "the NTK, or all-zero rows without biases), so there are no features")
        inv_sqrt = torch.where(keep, lam.clamp_min(cut).rsqrt(), torch.zeros_like(lam))
        self.normalization_ = (vec * inv_sqrt) @ vec.T
        self.rank_ = int(keep.sum())
        self.components_ = centers.cpu()
        self.component_indices_ = idx.numpy()
        self.input_shape_ = tuple(t.shape[1:])
        self.n_features_in_ = int(np.prod(self.input_shape_))
        self.n_components_ = m
        self.arch_, self.kernel_ = arch, self.kernel
        self._params64 = [(self.components_, self.normalization_)]
        self._params, self._params_key = None, None
        return self

    def _convert(self, layer_params: tuple, dtype: torch.dtype, device: torch.device) -> tuple:
        return tuple(p.to(device=device, dtype=dtype) for p in layer_params)

    def _prepare(self, X: Any) -> tuple[torch.Tensor, bool]:
        # rows must have the fitted shape, or be flat: a same-size reshape of images in another axis order
        # (channels first, say) would otherwise give wrong features silently
        self._check_fitted()
        shape = tuple(X.shape) if hasattr(X, "shape") else np.shape(X)
        if len(shape) >= 2 and tuple(shape[1:]) not in (self.input_shape_, (self.n_features_in_,)):
            raise ValueError(f"X has rows of shape {tuple(shape[1:])}, but NTKNystroem was fitted on rows of shape "
                             f"{self.input_shape_}" + (f" (flat rows of {self.n_features_in_} values are accepted "
                             "too; images are channels last, NHWC)" if len(self.input_shape_) > 1 else ""))
        return super()._prepare(X)

    def _row_bytes(self) -> int:
        return 4 * self.n_components_ + self.n_features_in_

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        centers, norm = self._params[0]
        k = self.arch_.kernel(x.reshape(x.shape[0], *self.input_shape_), centers, self.kernel_, dtype=x.dtype,
                              device=x.device, memory_budget=self.memory_budget, progress=False)
        return k @ norm
