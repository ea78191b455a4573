"""ntkit kernels as ``sklearn.gaussian_process.kernels.Kernel`` objects.

They work wherever scikit-learn takes a kernel: ``GaussianProcessRegressor(kernel=...)`` (and
sums/products with ``ConstantKernel``, ``WhiteKernel``), or ``SVC(kernel=k)`` as a callable
``k(X, Y) -> (n_X, n_Y)`` array.

* :class:`NTKKernel` / :class:`NNGPKernel`: the infinite-width NTK / NNGP of ``ntkit.mlp`` (or of a
  config). Their architecture parameters are not tuned by the GP optimizer (declared ``"fixed"``):
  depth and activation are discrete, and sigma_w / sigma_b are better chosen by a grid search.
* :class:`LaplaceKernel`: exp(-r / l), l tunable within ``length_scale_bounds``.
* :class:`GammaExponentialKernel`: exp(-(r / l)^gamma) (Rasmussen & Williams 2006, Eq. 4.18), l and
  gamma tunable; gamma bounded to (0, 2] where the kernel is positive definite.
* For the RBF kernel use ``sklearn.gaussian_process.kernels.RBF``: same convention
  exp(-r^2 / (2 l^2)) as ``NTKClassifier(kernel="rbf")``.

Gradients (``eval_gradient=True``) are with respect to the log of the tunable hyper-parameters, as
scikit-learn expects.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
from sklearn.gaussian_process.kernels import Hyperparameter, Kernel

from ._kernels import make_kernel_function

__all__ = ["NTKKernel", "NNGPKernel", "LaplaceKernel", "GammaExponentialKernel"]


def _as_2d(X, name: str) -> np.ndarray:
    A = np.asarray(X)
    if A.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a numeric array, got dtype {A.dtype}.")
    if A.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape {A.shape}.")
    return np.array(A, dtype=np.float64, copy=True)


class _TorchKernelMixin:
    """Values from an ntkit KernelFunction (torch, float64) returned as numpy."""

    def _kf(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def _values(self, X, Y=None) -> np.ndarray:
        X = _as_2d(X, "X")
        kf = self._kf()
        if Y is None:
            return kf(torch.from_numpy(X)).numpy()
        Y = _as_2d(Y, "Y")
        return kf(torch.from_numpy(X), torch.from_numpy(Y)).numpy()

    def diag(self, X) -> np.ndarray:
        """k(x_i, x_i) for every row, shape (n,), without forming the matrix."""
        X = _as_2d(X, "X")
        return self._kf()(torch.from_numpy(X), diagonal=True).numpy()


class NTKKernel(_TorchKernelMixin, Kernel):
    """Infinite-width NTK (Jacot et al. 2018, Thm. 1) of ``ntkit.mlp`` as a scikit-learn kernel.

    Parameters
    ----------
    depth : int, default 1
        Hidden layers (0 = linear kernel).
    activation : str, default "relu"
    W_std, b_std : float, default sqrt(2), 0.1
        Fixed hyper-parameters (not optimized by the GP).
    fixed_layers : int, default 0
        Bottom Dense layers excluded from the NTK (Arora et al. 2020, Sec. 4).
    parameterization : {"ntk", "standard"}, default "ntk"
        "standard": the standard-parameterization NTK (Lee et al. 2019, App. C), which depends on the
        hidden widths: give ``width``.
    config : dict or str, optional
        ``ntkit.from_config`` architecture; overrides the parameters above.
    width : int or list of int, optional
        Hidden-layer width(s) (``arch.with_width(width)``); required for the NTK with
        ``parameterization="standard"`` and depth >= 1, no effect in the NTK parameterization or on
        the NNGP. A fixed parameter (not optimized by the GP). Checked when the kernel is evaluated.
    """

    _get = "ntk"

    def __init__(self, depth: int = 1, activation: str = "relu", W_std: float = 2**0.5, b_std: float = 0.1,
                 fixed_layers: int = 0, parameterization: str = "ntk", config: Any = None, width: Any = None):
        self.depth = depth
        self.activation = activation
        self.W_std = W_std
        self.b_std = b_std
        self.fixed_layers = fixed_layers
        self.parameterization = parameterization
        self.config = config
        self.width = width

    @property
    def hyperparameter_W_std(self):
        return Hyperparameter("W_std", "numeric", "fixed")

    @property
    def hyperparameter_b_std(self):
        return Hyperparameter("b_std", "numeric", "fixed")

    def _kf(self):
        return make_kernel_function(self._get, depth=self.depth, activation=self.activation, W_std=self.W_std,
                                    b_std=self.b_std, fixed_layers=self.fixed_layers,
                                    parameterization=self.parameterization, config=self.config,
                                    width=self.width)

    def __call__(self, X, Y=None, eval_gradient: bool = False):
        """Kernel matrix k(X, Y) (k(X, X) if Y is None); with ``eval_gradient`` also the (empty)
        gradient with respect to the tunable hyper-parameters (there are none)."""
        if eval_gradient and Y is not None:
            raise ValueError("eval_gradient can only be evaluated when Y is None.")
        K = self._values(X, Y)
        if eval_gradient:
            return K, np.empty((K.shape[0], K.shape[1], 0))
        return K

    def is_stationary(self) -> bool:
        return False

    @property
    def requires_vector_input(self) -> bool:
        return True

    def __repr__(self) -> str:
        w = "" if self.width is None else f", width={self.width!r}"
        if self.config is not None:
            return f"{type(self).__name__}(config={self.config!r}{w})"
        p = "" if self.parameterization == "ntk" else f", parameterization={self.parameterization!r}"
        return (f"{type(self).__name__}(depth={self.depth}, activation={self.activation!r}, W_std={self.W_std:.3g}, "
                f"b_std={self.b_std:.3g}, fixed_layers={self.fixed_layers}{p}{w})")


class NNGPKernel(NTKKernel):
    """Infinite-width NNGP kernel (Lee et al. 2018, Eq. 4) of ``ntkit.mlp``; parameters as :class:`NTKKernel`
    (``fixed_layers`` does not change the NNGP)."""

    _get = "nngp"

    def __init__(self, depth: int = 1, activation: str = "relu", W_std: float = 2**0.5, b_std: float = 0.1,
                 fixed_layers: int = 0, parameterization: str = "ntk", config: Any = None, width: Any = None):
        super().__init__(depth, activation, W_std, b_std, fixed_layers, parameterization, config, width)


def _distances(X, Y) -> tuple[np.ndarray, bool]:
    X = _as_2d(X, "X")
    same = Y is None
    Yv = X if same else _as_2d(Y, "Y")
    if Yv.shape[1] != X.shape[1]:
        raise ValueError(f"Y has {Yv.shape[1]} features, X has {X.shape[1]}.")
    sq = (X * X).sum(1)[:, None] + (Yv * Yv).sum(1)[None, :] - 2.0 * X @ Yv.T
    np.maximum(sq, 0.0, out=sq)
    if same:
        np.fill_diagonal(sq, 0.0)
    return np.sqrt(sq), same


class GammaExponentialKernel(Kernel):
    """gamma-exponential kernel exp(-(||x - x'|| / l)^gamma) (Rasmussen & Williams 2006, Eq. 4.18).

    Parameters
    ----------
    length_scale : float > 0, default 1.0
    gamma : float in (0, 2], default 1.0
    length_scale_bounds : pair of floats or "fixed", default (1e-5, 1e5)
    gamma_bounds : pair of floats or "fixed", default (1e-2, 2.0)
    """

    def __init__(self, length_scale: float = 1.0, gamma: float = 1.0, length_scale_bounds=(1e-5, 1e5),
                 gamma_bounds=(1e-2, 2.0)):
        self.length_scale = length_scale
        self.gamma = gamma
        self.length_scale_bounds = length_scale_bounds
        self.gamma_bounds = gamma_bounds

    @property
    def hyperparameter_length_scale(self):
        return Hyperparameter("length_scale", "numeric", self.length_scale_bounds)

    @property
    def hyperparameter_gamma(self):
        return Hyperparameter("gamma", "numeric", self.gamma_bounds)

    def _check(self):
        if not (isinstance(self.length_scale, numbers.Real) and self.length_scale > 0):
            raise ValueError(f"length_scale must be a number > 0, got {self.length_scale!r}.")
        if not (isinstance(self.gamma, numbers.Real) and 0 < self.gamma <= 2):
            raise ValueError(f"gamma must lie in (0, 2] (positive definiteness), got {self.gamma!r}.")

    def __call__(self, X, Y=None, eval_gradient: bool = False):
        """k(X, Y); with ``eval_gradient`` (Y None) also dK/dlog(theta) for the non-fixed
        hyper-parameters: dk/dlog l = gamma u k and dk/dlog gamma = -gamma u log(r/l) k, u = (r/l)^gamma."""
        self._check()
        if eval_gradient and Y is not None:
            raise ValueError("eval_gradient can only be evaluated when Y is None.")
        r, _ = _distances(X, Y)
        s = r / float(self.length_scale)
        u = s ** float(self.gamma)
        K = np.exp(-u)
        if not eval_gradient:
            return K
        grads = {}
        if not self.hyperparameter_length_scale.fixed:
            grads["length_scale"] = self.gamma * u * K
        if not self.hyperparameter_gamma.fixed:
            with np.errstate(divide="ignore", invalid="ignore"):
                logs = np.where(s > 0, np.log(np.where(s > 0, s, 1.0)), 0.0)
            grads["gamma"] = -self.gamma * u * logs * K
        # in the order of self.theta (scikit-learn lists hyper-parameters by name)
        grads = [grads[h.name] for h in self.hyperparameters if not h.fixed]
        G = np.stack(grads, axis=-1) if grads else np.empty(K.shape + (0,))
        return K, G

    def diag(self, X) -> np.ndarray:
        """k(x, x) = 1 for every row."""
        return np.ones(_as_2d(X, "X").shape[0])

    def is_stationary(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}(length_scale={self.length_scale:.3g}, gamma={self.gamma:.3g})"


class LaplaceKernel(GammaExponentialKernel):
    """Laplace kernel exp(-||x - x'|| / l) (gamma-exponential with gamma = 1; Geifman et al. 2020).

    Parameters
    ----------
    length_scale : float > 0, default 1.0
    length_scale_bounds : pair of floats or "fixed", default (1e-5, 1e5)
    """

    def __init__(self, length_scale: float = 1.0, length_scale_bounds=(1e-5, 1e5)):
        self.length_scale = length_scale
        self.length_scale_bounds = length_scale_bounds

    @property
    def gamma(self):
        return 1.0

    @property
    def gamma_bounds(self):
        return "fixed"

    @property
    def hyperparameter_gamma(self):  # not a hyper-parameter of the Laplace kernel
        return Hyperparameter("gamma", "numeric", "fixed")

    @property
    def hyperparameters(self):
        return [self.hyperparameter_length_scale]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(length_scale={self.length_scale:.3g})"
