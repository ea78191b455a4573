"""scikit-learn estimators on infinite-width network kernels (NTK / NNGP) and classical kernels.

Design: one parameter ``kernel`` selects the kernel (``"ntk"``, ``"nngp"``, ``"laplace"``,
``"gamma_exponential"``, ``"rbf"``); the architecture parameters (``depth``, ``activation``,
``W_std``, ``b_std``, ``fixed_layers``, ``parameterization``, ``width`` or a ``config``) matter for the
first two, ``length_scale`` / ``gamma`` for the others. :class:`NNGPRegressor` / :class:`NNGPClassifier` are the
same estimators with ``kernel="nngp"`` as default, so NTK and NNGP models are one ``set_params``
apart and a grid search can put ``kernel`` on its grid.

Every estimator follows the scikit-learn contract: ``__init__`` only stores its arguments, ``fit``
validates them and the data, fitted attributes end in ``_``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .._validation import resolve_dtype
from ..solvers import SOLVERS, choose_solver, kernel_ridge
from ._kernels import make_kernel_function, validate_kernel_params

__all__ = ["NTKRegressor", "NTKClassifier", "NNGPRegressor", "NNGPClassifier"]

_BLOCK_ROWS = 4096


class _KernelModel(BaseEstimator):
    """Shared kernel handling: parameter checks, the kernel function, Gram matrices as numpy."""

    def _check_common(self) -> None:
        validate_kernel_params(self)
        if self.t is not None:
            if isinstance(self.t, bool) or not isinstance(self.t, numbers.Real) or not (self.t >= 0) or \
                    math.isnan(self.t):
                raise ValueError(f"t must be None (t = infinity) or a number >= 0, got {self.t!r}.")
        if isinstance(self.diag_reg, bool) or not isinstance(self.diag_reg, numbers.Real) or \
                not (0 <= self.diag_reg < math.inf):
            raise ValueError(f"diag_reg must be a finite number >= 0, got {self.diag_reg!r}.")
        resolve_dtype(self.dtype)  # raises TypeError naming a bad dtype

    def _kernel_function(self):
        return make_kernel_function(self.kernel, depth=self.depth, activation=self.activation, W_std=self.W_std,
                                    b_std=self.b_std, fixed_layers=self.fixed_layers,
                                    parameterization=self.parameterization, config=self.config,
                                    length_scale=self.length_scale, gamma=self.gamma, width=self.width)

    def _gram(self, A: np.ndarray, B: np.ndarray | None = None) -> np.ndarray:
        """k(A, B) (k(A, A) if B is None) as float64 numpy, computed in row blocks of A."""
        kf = self.kernel_function_
        dtype = resolve_dtype(self.dtype)
        ta = torch.as_tensor(np.array(A, dtype=np.float64, copy=True), device=self.device)
        if B is None:
            return kf(ta, dtype=dtype, device=self.device).to("cpu", torch.float64).numpy()
        tb = torch.as_tensor(np.array(B, dtype=np.float64, copy=True), device=self.device)
        out = [kf(ta[i:i + _BLOCK_ROWS], tb, dtype=dtype, device=self.device).to("cpu", torch.float64).numpy()
               for i in range(0, ta.shape[0], _BLOCK_ROWS)]
        return np.concatenate(out, axis=0)

    def _fit_regression(self, K: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Dual coefficients alpha with f_t(x) = k(x, X) alpha (see NTKRegressor)."""
        n = K.shape[0]
        lam = self.diag_reg * float(np.trace(K)) / n
        w, V = np.linalg.eigh(K + lam * np.eye(n))
        w = np.clip(w, 0.0, None)  # round-off below 0 of a PSD matrix
        if self.t is None:
            tol = max(w.max(initial=0.0), 1e-300) * n * np.finfo(np.float64).eps
            g = np.where(w > tol, 1.0 / np.where(w > tol, w, 1.0), 0.0)
        else:
            s = self.t / n
            # (1 - exp(-s w)) / w, with its limit s at w = 0; -expm1 keeps accuracy for small s w
            g = np.where(w * s > 1e-12, -np.expm1(-s * w) / np.where(w > 0, w, 1.0), s)
        Y2 = Y.reshape(n, -1)
        return (V @ (g[:, None] * (V.T @ Y2))).reshape(Y.shape)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags


_DOC_PARAMS = """
    kernel : {"ntk", "nngp", "laplace", "gamma_exponential", "rbf"}
        The kernel. "ntk"/"nngp": infinite-width NTK (Jacot et al. 2018, Thm. 1) / NNGP (Lee et al.
        2018, Eq. 4) of the architecture below. Distance kernels: exp(-r/l), exp(-(r/l)^gamma),
        exp(-r^2/(2 l^2)) with r = ||x - x'||.
    depth : int, default 1
        Number of hidden layers of ``ntkit.mlp`` (0 = linear kernel).
    activation : str or ntkit activation layer, default "relu"
        "relu", "abs", "gelu", "sign", "erf", "tanh", "identity", or a layer object.
    W_std, b_std : float, default sqrt(2), 0.1
        Weight and bias standard deviations.
    fixed_layers : int, default 0
        Number of bottom Dense layers that are not trained (excluded from the NTK, kept in the
        NNGP; Arora et al. 2020, Sec. 4).
    parameterization : {"ntk", "standard"}, default "ntk"
        "standard": the NTK of the standard parameterization (Lee et al. 2019, App. C), which depends
        on the hidden widths: give ``width``.
    width : int or list of int, optional
        Hidden-layer width(s) of the network (one int for all hidden layers, or one per layer), as in
        ``ntkit.mlp(...).kernel(X, width=width)``. Required for ``kernel="ntk"`` with
        ``parameterization="standard"`` (and depth >= 1); no effect on the NTK-parameterization kernels
        or on the NNGP.
    config : dict, str or path, optional
        An ``ntkit.from_config`` architecture; overrides depth/activation/W_std/b_std/fixed_layers.
    length_scale : float, default 1.0
        Length scale l of the distance kernels.
    gamma : float in (0, 2], default 1.0
        Exponent of the gamma-exponential kernel.
    dtype : str or torch dtype, default "float64"
        Precision of the kernel computation.
    device : str or torch device, optional
        Where the kernel is computed ("cuda" if available and wanted); results come back as numpy.
"""


class NTKRegressor(RegressorMixin, _KernelModel):
    __doc__ = """Kernel regression with the NTK: the infinitely wide network trained by gradient flow.

    With Gram matrix K = k(X, X) + lambda I (lambda = ``diag_reg`` * tr K / n) the prediction at
    training time t of a network trained on the loss (1/2n) sum_i ||f(x_i) - y_i||^2 by gradient flow
    from f_0 = 0 (the mean over initializations) is

        f_t(x) = k(x, X) K^{-1} (I - exp(-t K / n)) Y

    (Jacot et al. 2018, Sec. 5; Lee et al. 2019, Sec. 2.3, mean prediction of the linearized
    network); ``t=None`` is t = infinity, f(x) = k(x, X) K^+ Y (kernel regression; for
    ``kernel="nngp"`` the NNGP posterior mean, Lee et al. 2018, Eq. 3-4). Computed from one
    eigendecomposition of K; zero eigenvalues are handled by their limits (pseudo-inverse).

    Parameters
    ----------""" + _DOC_PARAMS + """    t : float >= 0 or None, default None
        Training time (learning rate 1); None means infinity.
    diag_reg : float >= 0, default 0.0
        Diagonal regularization relative to the mean diagonal of K.
    solver : {"auto", "cholesky", "cg", "nystrom", "features"}, default "auto"
        How K alpha = Y is solved (``ntkit.solvers``). "cholesky": the direct solve above (any ``t``);
        the others only for ``t=None``: "cg" exact, by conjugate gradients with kernel blocks computed on
        the fly and a rank-``n_centers`` Nystrom preconditioner; "nystrom": FALKON on ``n_centers`` centers
        (Rudi et al. 2017); "features": ridge regression on ``n_random_features`` NTK/NNGP random features
        (Han et al. 2021; fully-connected ReLU networks), by the m x m normal equations or, from 8192
        features on, by matrix-free Nystrom-preconditioned CG (``ntkit.solvers.feature_ridge``). "auto":
        "cholesky" when ``t`` is set or the n x n matrix fits (n <= 20 000), else "features" for
        n >= 200 000 when the kernel has them, else "nystrom" (``ntkit.solvers.choose_solver``).
    n_centers : int, optional
        Nystrom centers / preconditioner rank (default min(n, max(100, 5 sqrt(n)))).
    n_random_features : int, optional
        Number of random features for ``solver="features"`` (default 4096).
    tol : float, default 1e-8
        Relative residual at which CG stops.
    max_iter : int, optional
        CG iterations at most.
    memory_budget : float, optional
        Bytes for kernel blocks and factors (default: half of the free memory).
    random_state : int or None
        Seeds the centers and the random features.

    Attributes
    ----------
    X_fit_ : ndarray (n_samples, n_features_in_)
    dual_coef_ : ndarray (n_samples,) or (n_samples, n_outputs)
        On the training points ("cholesky", "cg") or on ``centers_`` ("nystrom"); the weights of the
        features ("features").
    solver_ : str
        The solver used.
    n_iter_ : int
        CG iterations ("cg", "nystrom", "features" solved by CG; 1 for the direct solves).
    solution_ : ntkit.solvers solution (not for "cholesky")
    kernel_function_ : ntkit.KernelFunction
    n_features_in_ : int
    """

    def __init__(self, kernel: str = "ntk", *, depth: int = 1, activation: Any = "relu", W_std: float = 2**0.5,
                 b_std: float = 0.1, fixed_layers: int = 0, parameterization: str = "ntk", width: Any = None,
                 config: Any = None,
                 length_scale: float = 1.0, gamma: float = 1.0, t: float | None = None, diag_reg: float = 0.0,
                 dtype: Any = "float64", device: Any = None, solver: str = "auto", n_centers: int | None = None,
                 n_random_features: int | None = None, tol: float = 1e-8, max_iter: int | None = None,
                 memory_budget: float | None = None, random_state: Any = None):
        self.kernel = kernel
        self.depth = depth
        self.activation = activation
        self.W_std = W_std
        self.b_std = b_std
        self.fixed_layers = fixed_layers
        self.parameterization = parameterization
        self.width = width
        self.config = config
        self.length_scale = length_scale
        self.gamma = gamma
        self.t = t
        self.diag_reg = diag_reg
        self.dtype = dtype
        self.device = device
        self.solver = solver
        self.n_centers = n_centers
        self.n_random_features = n_random_features
        self.tol = tol
        self.max_iter = max_iter
        self.memory_budget = memory_budget
        self.random_state = random_state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X, y):
        """Fit on ``X`` (n, d) and targets ``y`` (n,) or (n, k)."""
        self._check_common()
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}.")
        if self.t is not None and self.solver not in ("auto", "cholesky"):
            raise ValueError(f"solver={self.solver!r} computes t = infinity only (kernel ridge regression); use "
                             "t=None, or solver='cholesky' for a finite training time.")
        if not (isinstance(self.tol, numbers.Real) and not isinstance(self.tol, bool) and 0 < self.tol < 1):
            raise ValueError(f"tol must be a number in (0, 1), got {self.tol!r}.")
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=True, multi_output=True)
        self.kernel_function_ = self._kernel_function()
        self.X_fit_ = np.array(X, dtype=np.float64, copy=True)
        n = self.X_fit_.shape[0]
        solver = self.solver
        if solver == "auto":
            solver = "cholesky" if self.t is not None else choose_solver(
                n, self.kernel_function_, memory_budget=self.memory_budget,
                item=torch.finfo(resolve_dtype(self.dtype)).bits // 8, device=self.device)
        self.solver_ = solver
        self.n_iter_ = 1
        y = np.asarray(y, dtype=np.float64)
        if solver == "cholesky":
            K = self._gram(self.X_fit_)
            self.dual_coef_ = self._fit_regression(K, y)
            return self
        sol = kernel_ridge(self.kernel_function_, self.X_fit_, y, diag_reg=float(self.diag_reg), solver=solver,
                           n_centers=self.n_centers, n_components=self.n_random_features, tol=float(self.tol),
                           max_iter=self.max_iter, random_state=self.random_state,
                           memory_budget=self.memory_budget, dtype=resolve_dtype(self.dtype), device=self.device,
                           progress=False)
        self.solution_ = sol
        self.n_iter_ = max(1, int(getattr(sol, "iterations", 0)))
        coef = (sol.weights if solver == "features" else sol.coef).to("cpu", torch.float64).numpy()
        self.dual_coef_ = coef[:, 0] if y.ndim == 1 else coef
        if solver == "nystrom":
            self.centers_ = sol.centers.to("cpu", torch.float64).numpy()
        return self

    def predict(self, X):
        """Mean prediction f_t(X), shape (n,) or (n, k) like the training targets."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        if getattr(self, "solver_", "cholesky") == "cholesky":
            return self._gram(X, self.X_fit_) @ self.dual_coef_
        return np.asarray(self.solution_.predict(np.array(X, dtype=np.float64)), dtype=np.float64)


class NTKClassifier(ClassifierMixin, _KernelModel):
    __doc__ = """Classifier on the NTK: an SVM with the precomputed kernel, or kernel regression.

    ``solver="svm"``: ``sklearn.svm.SVC(kernel="precomputed", C=C)`` on the Gram matrix (the "NTK
    SVM" of Arora et al. 2020, Sec. 4). ``solver="regression"``: kernel regression (at time ``t``,
    see :class:`NTKRegressor`) on the centred one-hot targets e_y - 1/c, predicting the arg-max
    (Arora et al. 2020, Sec. 4, kernel regression; Jacot et al. 2018, Sec. 5).

    Parameters
    ----------""" + _DOC_PARAMS + """    solver : {"svm", "regression"}, default "svm"
    C : float > 0, default 1.0
        SVM regularization (``solver="svm"``).
    t, diag_reg : see :class:`NTKRegressor` (``solver="regression"``).

    Attributes
    ----------
    classes_ : ndarray
    svc_ : sklearn.svm.SVC (``solver="svm"``)
    dual_coef_ : ndarray (n_samples, n_classes) (``solver="regression"``)
    X_fit_, kernel_function_, n_features_in_
    """

    def __init__(self, kernel: str = "ntk", *, depth: int = 1, activation: Any = "relu", W_std: float = 2**0.5,
                 b_std: float = 0.1, fixed_layers: int = 0, parameterization: str = "ntk", width: Any = None,
                 config: Any = None,
                 length_scale: float = 1.0, gamma: float = 1.0, solver: str = "svm", C: float = 1.0,
                 t: float | None = None, diag_reg: float = 0.0, dtype: Any = "float64", device: Any = None):
        self.kernel = kernel
        self.depth = depth
        self.activation = activation
        self.W_std = W_std
        self.b_std = b_std
        self.fixed_layers = fixed_layers
        self.parameterization = parameterization
        self.width = width
        self.config = config
        self.length_scale = length_scale
        self.gamma = gamma
        self.solver = solver
        self.C = C
        self.t = t
        self.diag_reg = diag_reg
        self.dtype = dtype
        self.device = device

    def fit(self, X, y):
        """Fit on ``X`` (n, d) and class labels ``y`` (n,)."""
        self._check_common()
        if self.solver not in ("svm", "regression"):
            raise ValueError(f"solver must be 'svm' or 'regression', got {self.solver!r}.")
        if isinstance(self.C, bool) or not isinstance(self.C, numbers.Real) or not (0 < self.C < math.inf):
            raise ValueError(f"C must be a finite number > 0, got {self.C!r}.")
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        enc = LabelEncoder().fit(y)
        self.classes_ = enc.classes_
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs samples of at least 2 classes; got 1 class "
                             f"({self.classes_[0]!r}).")
        codes = enc.transform(y)
        self.kernel_function_ = self._kernel_function()
        self.X_fit_ = np.array(X, dtype=np.float64, copy=True)
        K = self._gram(self.X_fit_)
        if self.solver == "svm":
            from sklearn.svm import SVC  # noqa: PLC0415

            self.svc_ = SVC(kernel="precomputed", C=float(self.C)).fit(K, codes)
        else:
            c = len(self.classes_)
            Y = np.eye(c)[codes] - 1.0 / c
            self.dual_coef_ = self._fit_regression(K, Y)
        return self

    def decision_function(self, X):
        """SVM decision values, or the regression scores (n, c) (for 2 classes: score_1 - score_0)."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        Kx = self._gram(X, self.X_fit_)
        if self.solver == "svm" and hasattr(self, "svc_"):
            return self.svc_.decision_function(Kx)
        scores = Kx @ self.dual_coef_
        return scores[:, 1] - scores[:, 0] if scores.shape[1] == 2 else scores

    def predict(self, X):
        """Predicted class labels."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        Kx = self._gram(X, self.X_fit_)
        if hasattr(self, "svc_") and self.solver == "svm":
            codes = self.svc_.predict(Kx)
        else:
            codes = np.argmax(Kx @ self.dual_coef_, axis=1)
        return self.classes_[codes]


class NNGPRegressor(NTKRegressor):
    __doc__ = """:class:`NTKRegressor` with ``kernel="nngp"`` by default: the NNGP posterior mean
    (Lee et al. 2018, Eq. 3-4) for ``t=None`` (``diag_reg`` plays the observation noise variance
    relative to the mean prior variance), or the gradient-flow prediction of training only the
    readout layer at time ``t``.

    Parameters
    ----------
    See :class:`NTKRegressor`.
    """

    def __init__(self, kernel: str = "nngp", *, depth: int = 1, activation: Any = "relu", W_std: float = 2**0.5,
                 b_std: float = 0.1, fixed_layers: int = 0, parameterization: str = "ntk", width: Any = None,
                 config: Any = None,
                 length_scale: float = 1.0, gamma: float = 1.0, t: float | None = None, diag_reg: float = 0.0,
                 dtype: Any = "float64", device: Any = None, solver: str = "auto", n_centers: int | None = None,
                 n_random_features: int | None = None, tol: float = 1e-8, max_iter: int | None = None,
                 memory_budget: float | None = None, random_state: Any = None):
        super().__init__(kernel, depth=depth, activation=activation, W_std=W_std, b_std=b_std,
                         fixed_layers=fixed_layers, parameterization=parameterization, width=width, config=config,
                         length_scale=length_scale, gamma=gamma, t=t, diag_reg=diag_reg, dtype=dtype, device=device,
                         solver=solver, n_centers=n_centers, n_random_features=n_random_features, tol=tol,
                         max_iter=max_iter, memory_budget=memory_budget, random_state=random_state)


class NNGPClassifier(NTKClassifier):
    __doc__ = """:class:`NTKClassifier` with ``kernel="nngp"`` by default (SVM on the NNGP kernel, or
    NNGP posterior-mean regression on one-hot targets with ``solver="regression"``).

    Parameters
    ----------
    See :class:`NTKClassifier`.
    """

    def __init__(self, kernel: str = "nngp", *, depth: int = 1, activation: Any = "relu", W_std: float = 2**0.5,
                 b_std: float = 0.1, fixed_layers: int = 0, parameterization: str = "ntk", width: Any = None,
                 config: Any = None,
                 length_scale: float = 1.0, gamma: float = 1.0, solver: str = "svm", C: float = 1.0,
                 t: float | None = None, diag_reg: float = 0.0, dtype: Any = "float64", device: Any = None):
        super().__init__(kernel, depth=depth, activation=activation, W_std=W_std, b_std=b_std,
                         fixed_layers=fixed_layers, parameterization=parameterization, width=width, config=config,
                         length_scale=length_scale, gamma=gamma, solver=solver, C=C, t=t, diag_reg=diag_reg,
                         dtype=dtype, device=device)
