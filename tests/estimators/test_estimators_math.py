"""The estimators and kernel objects against independent references.

References: closed-form linear algebra (numpy solve, scipy expm) on Gram matrices computed by
``ntkit.mlp(...).kernel`` directly; scikit-learn's own SVC / Matern / RBF; an independent numpy
implementation of the ReLU NTK recursion with fixed bottom layers (arc-cosine kernel of Cho & Saul
2009, Eq. 6 with n = 0, 1; NTK recursion of Jacot et al. 2018, Thm. 1 / Arora et al. 2019, Eq. 9-10);
central finite differences for kernel gradients.
"""

import math

import numpy as np
import pytest
import torch
from scipy.linalg import expm
from scipy.spatial.distance import cdist
from sklearn.base import clone
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, Matern, WhiteKernel
from sklearn.svm import SVC

import ntkit
from ntkit.estimators import (GammaExponentialKernel, LaplaceKernel, NNGPClassifier, NNGPKernel, NNGPRegressor,
                              NTKClassifier, NTKKernel, NTKRegressor, make_kernel_function)

RNG = np.random.default_rng(0)
X = RNG.standard_normal((24, 3))
XT = RNG.standard_normal((9, 3))
Y = np.sin(X @ np.array([1.0, -0.5, 0.3])) + 0.1 * RNG.standard_normal(24)


def gram(A, B=None, depth=1, W_std=2**0.5, b_std=0.1, get="ntk", fixed=0):
    arch = ntkit.mlp(depth, W_std=W_std, b_std=b_std, fixed_layers=fixed)
    return arch.kernel(torch.from_numpy(A), None if B is None else torch.from_numpy(B), get).numpy()


# ----------------------------------------------------------------------------------------------
# regression
def test_regressor_infinite_time_is_kernel_regression():
    est = NTKRegressor(depth=2).fit(X, Y)
    K, Kt = gram(X, depth=2), gram(XT, X, depth=2)
    np.testing.assert_allclose(est.predict(XT), Kt @ np.linalg.solve(K, Y), rtol=1e-8, atol=1e-10)
    # interpolation of the training targets (K is positive definite with a bias)
    np.testing.assert_allclose(est.predict(X), Y, rtol=0, atol=1e-8)


@pytest.mark.parametrize("t", [0.0, 0.7, 25.0])
def test_regressor_finite_time_matches_matrix_exponential(t):
    n = len(Y)
    est = NTKRegressor(depth=1, t=t).fit(X, Y)
    K, Kt = gram(X), gram(XT, X)
    want = Kt @ np.linalg.solve(K, (np.eye(n) - expm(-t * K / n)) @ Y)
    np.testing.assert_allclose(est.predict(XT), want, rtol=1e-8, atol=1e-11)


def test_regressor_diag_reg_and_multioutput():
    Y2 = np.stack([Y, Y ** 2], axis=1)
    est = NTKRegressor(depth=3, diag_reg=0.05).fit(X, Y2)
    K, Kt = gram(X, depth=3), gram(XT, X, depth=3)
    lam = 0.05 * np.trace(K) / len(X)
    want = Kt @ np.linalg.solve(K + lam * np.eye(len(X)), Y2)
    np.testing.assert_allclose(est.predict(XT), want, rtol=1e-8, atol=1e-11)
    assert est.predict(XT).shape == (9, 2)


def test_nngp_regressor_is_posterior_mean_and_equals_fully_fixed_ntk():
    """NNGP posterior mean (Lee et al. 2018, Eq. 3-4); the NTK of a net whose hidden layers are all
    fixed (only the readout trains) is the NNGP, so both estimators must agree."""
    nngp = NNGPRegressor(depth=2, diag_reg=0.01).fit(X, Y)
    K, Kt = gram(X, depth=2, get="nngp"), gram(XT, X, depth=2, get="nngp")
    lam = 0.01 * np.trace(K) / len(X)
    np.testing.assert_allclose(nngp.predict(XT), Kt @ np.linalg.solve(K + lam * np.eye(len(X)), Y), rtol=1e-8)
    frozen = NTKRegressor(depth=2, fixed_layers=2, diag_reg=0.01).fit(X, Y)
    np.testing.assert_allclose(frozen.predict(XT), nngp.predict(XT), rtol=1e-10)


def test_regressor_singular_kernel_uses_pseudo_inverse():
    """Duplicated rows make K singular; t = inf must give the minimum-norm solution (pinv)."""
    Xd = np.concatenate([X[:10], X[:10]])
    yd = np.concatenate([Y[:10], Y[:10]])
    est = NTKRegressor(depth=1).fit(Xd, yd)
    K, Kt = gram(Xd), gram(XT, Xd)
    np.testing.assert_allclose(est.predict(XT), Kt @ np.linalg.pinv(K, rcond=1e-10) @ yd, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# classification
def test_classifier_svm_equals_precomputed_svc_and_keeps_labels():
    labels = np.array(["cat", "dog", "emu"])[(X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5).astype(int)]
    est = NTKClassifier(depth=2, C=3.0).fit(X, labels)
    ref = SVC(kernel="precomputed", C=3.0).fit(gram(X, depth=2), labels)
    np.testing.assert_array_equal(est.predict(XT), ref.predict(gram(XT, X, depth=2)))
    np.testing.assert_allclose(est.decision_function(XT), ref.decision_function(gram(XT, X, depth=2)), rtol=1e-9)
    assert set(est.predict(XT)) <= set(labels)


def test_classifier_regression_solver_is_one_hot_kernel_regression():
    yc = (X[:, 0] > 0).astype(int) + (X[:, 2] > 0).astype(int)
    est = NNGPClassifier(depth=1, solver="regression", diag_reg=0.1).fit(X, yc)
    K, Kt = gram(X, get="nngp"), gram(XT, X, get="nngp")
    lam = 0.1 * np.trace(K) / len(X)
    target = np.eye(3)[yc] - 1 / 3
    scores = Kt @ np.linalg.solve(K + lam * np.eye(len(X)), target)
    np.testing.assert_array_equal(est.predict(XT), np.argmax(scores, 1))
    np.testing.assert_allclose(est.decision_function(XT), scores, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("params, match", [
    ({"kernel": "poly"}, "kernel='poly'"),
    ({"depth": -1}, "depth"),
    ({"fixed_layers": 5, "depth": 1}, "fixed_layers"),
    ({"W_std": 0.0}, "W_std"),
    ({"t": -1.0}, "t must be"),
    ({"diag_reg": -0.1}, "diag_reg"),
    ({"C": 0.0}, "C must be"),
    ({"solver": "lbfgs"}, "solver"),
    ({"kernel": "gamma_exponential", "gamma": 2.5}, "gamma"),
    ({"kernel": "laplace", "length_scale": -1.0}, "length_scale"),
])
def test_invalid_parameters_raise_in_fit(params, match):
    est = NTKClassifier(**params)  # __init__ stores only
    with pytest.raises(ValueError, match=match):
        est.fit(X, (X[:, 0] > 0).astype(int))


def test_config_architecture_matches_mlp():
    cfg = ntkit.mlp(2, W_std=1.3, b_std=0.2).to_config()
    a = NTKRegressor(config=cfg).fit(X, Y).predict(XT)
    b = NTKRegressor(depth=2, W_std=1.3, b_std=0.2).fit(X, Y).predict(XT)
    np.testing.assert_allclose(a, b, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# the UCI kernel: ReLU NTK with fixed bottom layers, independent numpy recursion
def relu_ntk_reference(A, n_layers, n_fixed):
    """Arora et al. 2020's kernel: first-layer covariance x.x', W_std = 1, no bias, ReLU; the
    contribution of Dense layer h (0-based) enters only if h >= n_fixed."""
    S = A @ A.T
    H = S.copy() if n_fixed == 0 else np.zeros_like(S)
    for h in range(1, n_layers):
        nrm = np.sqrt(np.outer(np.diag(S), np.diag(S)))
        c = np.clip(S / nrm, -1.0, 1.0)
        th = np.arccos(c)
        S = nrm * (np.sin(th) + (np.pi - th) * c) / (2 * np.pi)  # Cho & Saul 2009, n = 1
        H = H * (np.pi - th) / (2 * np.pi) + (S if h >= n_fixed else 0.0)  # n = 0 arc-cosine
    return H


@pytest.mark.parametrize("n_layers", [1, 2, 4])
def test_uci_ntk_kernel_matches_reference_recursion(n_layers):
    from ntkit.experiments.uci import UCIDataset, _ntk_kernels

    A = RNG.standard_normal((15, 5))
    ds = UCIDataset("toy", A, np.zeros(15, int), 2, np.arange(8), np.arange(8, 15), ())
    built = {(p["L"], p["fixed"]): b for p, b in _ntk_kernels(n_layers)(ds)}
    assert len(built) == n_layers * (n_layers + 1) // 2  # L = 1..n_layers, fixed = 0..L-1
    for fixed in range(n_layers):
        np.testing.assert_allclose(built[(n_layers, fixed)](), relu_ntk_reference(A, n_layers, fixed),
                                   rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# kernel objects
def test_distance_kernels_match_closed_forms():
    r = cdist(X, XT)
    for name, ls, g, want in [("laplace", 0.8, 1.0, np.exp(-r / 0.8)),
                              ("gamma_exponential", 1.1, 1.5, np.exp(-(r / 1.1) ** 1.5)),
                              ("rbf", 0.9, 2.0, np.exp(-r ** 2 / (2 * 0.9 ** 2)))]:
        got = make_kernel_function(name, length_scale=ls, gamma=g)(X, XT).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)


def test_gp_kernels_match_sklearn_and_ntkit():
    np.testing.assert_allclose(LaplaceKernel(0.7)(X, XT), Matern(0.7, nu=0.5)(X, XT), rtol=1e-10)
    np.testing.assert_allclose(GammaExponentialKernel(1.2, gamma=2.0)(X, XT), RBF(1.2 / math.sqrt(2))(X, XT),
                               rtol=1e-10)
    np.testing.assert_allclose(NTKKernel(depth=2)(X, XT), gram(X, XT, depth=2), rtol=1e-12)
    np.testing.assert_allclose(NNGPKernel(depth=2)(X), gram(X, depth=2, get="nngp"), rtol=1e-12)
    np.testing.assert_allclose(NTKKernel(depth=2).diag(X), np.diag(gram(X, depth=2)), rtol=1e-10)
    k = clone(NTKKernel(depth=3, fixed_layers=1))
    assert k.get_params()["depth"] == 3 and k.get_params()["fixed_layers"] == 1
    assert k.theta.shape == (0,)  # sigma_w, sigma_b fixed
    assert LaplaceKernel().theta.shape == (1,) and GammaExponentialKernel().theta.shape == (2,)


@pytest.mark.parametrize("kernel", [LaplaceKernel(0.9), GammaExponentialKernel(1.3, gamma=0.8)])
def test_gp_kernel_gradient_matches_finite_differences(kernel):
    K, G = kernel(X, eval_gradient=True)
    theta, h = kernel.theta.copy(), 1e-6
    for i in range(len(theta)):
        up, dn = theta.copy(), theta.copy()
        up[i] += h
        dn[i] -= h
        fd = (kernel.clone_with_theta(up)(X) - kernel.clone_with_theta(dn)(X)) / (2 * h)
        np.testing.assert_allclose(G[..., i], fd, rtol=1e-5, atol=1e-8)


def test_gp_and_svc_accept_kernel_objects():
    gp = GaussianProcessRegressor(kernel=NTKKernel(depth=1) + WhiteKernel(1e-2, (1e-9, 1.0)), random_state=0).fit(X, Y)
    assert gp.kernel_.k1.get_params()["depth"] == 1
    mean = gp.predict(XT)
    assert mean.shape == (9,) and np.all(np.isfinite(mean))
    gp2 = GaussianProcessRegressor(kernel=LaplaceKernel(1.0, (1e-2, 1e2)), alpha=1e-2).fit(X, Y)
    assert 1e-2 <= gp2.kernel_.length_scale <= 1e2 and gp2.kernel_.length_scale != 1.0
    yc = (X[:, 0] > 0).astype(int)
    a = SVC(kernel=NTKKernel(depth=2, b_std=0.1), C=2.0).fit(X, yc).predict(XT)
    b = NTKClassifier(depth=2, b_std=0.1, C=2.0).fit(X, yc).predict(XT)
    np.testing.assert_array_equal(a, b)


def test_distance_kernels_come_from_ntkit_kernels_classic():
    """The estimators' distance kernels are ntkit.kernels.classic's, with the documented conventions
    (checked against scipy's cdist)."""
    from ntkit.kernels.classic import RBF, GammaExponential, Laplace

    r = cdist(X, XT)
    kf = make_kernel_function("laplace", length_scale=0.8)
    assert isinstance(kf, Laplace)
    np.testing.assert_allclose(kf(X, XT).numpy(), np.exp(-r / 0.8), rtol=1e-10)
    kf = make_kernel_function("gamma_exponential", length_scale=0.8, gamma=1.5)
    assert isinstance(kf, GammaExponential)
    np.testing.assert_allclose(kf(X, XT).numpy(), np.exp(-(r / 0.8) ** 1.5), rtol=1e-10)
    kf = make_kernel_function("rbf", length_scale=0.8)
    assert isinstance(kf, RBF)
    np.testing.assert_allclose(kf(X, XT).numpy(), np.exp(-(r**2) / (2 * 0.8**2)), rtol=1e-10)

# ----------------------------------------------------------------------------------------------
# standard parameterization: the NTK depends on the hidden widths, given by ``width``
def _std_gram(A, B=None, depth=2, width=64, W_std=1.2, b_std=0.3, get="ntk"):
    arch = ntkit.mlp(depth, W_std=W_std, b_std=b_std, parameterization="standard")
    return arch.kernel(torch.from_numpy(A), None if B is None else torch.from_numpy(B), get, width=width).numpy()


@pytest.mark.parametrize("width", [7, [5, 300]])
def test_standard_parameterization_regressor_uses_width(width):
    kw = dict(depth=2, W_std=1.2, b_std=0.3, parameterization="standard")
    est = NTKRegressor(width=width, **kw).fit(X, Y)
    K, Kt = _std_gram(X, width=width), _std_gram(XT, X, width=width)
    np.testing.assert_allclose(est.predict(XT), Kt @ np.linalg.solve(K, Y), rtol=1e-8, atol=1e-10)
    # the width really reaches the kernel: another width gives another standard-parameterization NTK
    other = NTKRegressor(width=1000, **kw).fit(X, Y).predict(XT)
    assert np.abs(other - est.predict(XT)).max() > 1e-3
    # the classifier (regression solver) and the GP kernel object take the same parameter
    lab = (X[:, 0] > 0).astype(int)
    clf = NTKClassifier(solver="regression", width=width, **kw).fit(X, lab)
    c = 2
    alpha = np.linalg.solve(K, np.eye(c)[lab] - 1.0 / c)
    s = Kt @ alpha
    np.testing.assert_allclose(clf.decision_function(XT), s[:, 1] - s[:, 0], rtol=1e-8, atol=1e-10)
    kern = NTKKernel(depth=2, W_std=1.2, b_std=0.3, parameterization="standard", width=width)
    np.testing.assert_allclose(kern(X), K, rtol=1e-12)
    np.testing.assert_allclose(kern(XT, X), Kt, rtol=1e-12)
    np.testing.assert_allclose(kern.diag(X), np.diag(K), rtol=1e-12)
    assert clone(kern).get_params()["width"] == width


def test_standard_parameterization_without_width_is_a_clear_error():
    est = NTKRegressor(parameterization="standard")  # __init__ stores only
    assert est.get_params()["width"] is None
    with pytest.raises(ValueError, match="parameterization='standard' needs width="):
        est.fit(X, Y)
    with pytest.raises(ValueError, match="needs width="):
        NTKKernel(parameterization="standard")(X)
    # set_params / clone carry the width; then fitting works
    est.set_params(width=32)
    np.testing.assert_allclose(clone(est).fit(X, Y).predict(XT), est.fit(X, Y).predict(XT), rtol=1e-14)
    # the NNGP does not depend on the width (same in both parameterizations): no width needed
    nngp = NNGPRegressor(parameterization="standard", depth=2, W_std=1.2, b_std=0.3).fit(X, Y)
    want = _std_gram(XT, X, get="nngp", width=None) @ np.linalg.solve(_std_gram(X, get="nngp", width=None), Y)
    np.testing.assert_allclose(nngp.predict(XT), want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("width", [0, -3, 2.5, True, "64", [8], [8, 0]])
def test_invalid_width_raises_in_fit(width):
    est = NTKRegressor(depth=2, parameterization="standard", width=width)
    with pytest.raises(ValueError, match="width"):
        est.fit(X, Y)
