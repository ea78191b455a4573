"""The solvers behind NTKRegressor(solver=...) and the dynamics' t = inf (kernel_regression)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ntkit
from ntkit.dynamics import gradient_descent_mse, kernel_regression
from ntkit.estimators import NTKRegressor

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 4))
    y = np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.1 * rng.standard_normal(200)
    return x, y, rng.standard_normal((30, 4))


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("kernel", ["ntk", "nngp", "laplace"])
def test_regressor_solvers_agree(data, kernel):
    x, y, xt = data
    ref = NTKRegressor(kernel=kernel, depth=2, diag_reg=1e-3, solver="cholesky").fit(x, y).predict(xt)
    auto = NTKRegressor(kernel=kernel, depth=2, diag_reg=1e-3).fit(x, y)
    assert auto.solver_ == "cholesky"
    cg = NTKRegressor(kernel=kernel, depth=2, diag_reg=1e-3, solver="cg", n_centers=40, tol=1e-11, max_iter=500,
                      random_state=0).fit(x, y)
    assert cg.solver_ == "cg" and _rel(cg.predict(xt), ref) < 1e-6
    ny = NTKRegressor(kernel=kernel, depth=2, diag_reg=1e-3, solver="nystrom", n_centers=len(x), tol=1e-12,
                      random_state=0).fit(x, y)
    assert _rel(ny.predict(xt), ref) < 1e-6 and ny.centers_.shape == x.shape


def test_regressor_features_and_errors(data):
    x, y, xt = data
    ref = NTKRegressor(depth=1, diag_reg=1e-2).fit(x, y).predict(xt)
    feat = NTKRegressor(depth=1, diag_reg=1e-2, solver="features", n_random_features=4096, random_state=0).fit(x, y)
    assert feat.dual_coef_.shape == (4096,)
    err = np.linalg.norm(feat.predict(xt) - ref) / np.linalg.norm(ref)
    assert err < 0.3, err  # the features approximate the kernel to ~3% (Frobenius); KRR amplifies it
    with pytest.raises(ValueError, match="t = infinity only"):
        NTKRegressor(solver="cg", t=1.0).fit(x, y)
    with pytest.raises(ValueError, match="solver must be one of"):
        NTKRegressor(solver="qr").fit(x, y)
    with pytest.raises(ntkit.ConfigError, match="solver='features' needs"):
        NTKRegressor(kernel="laplace", solver="features").fit(x, y)
    with pytest.raises(ntkit.ConfigError, match="not supported by this feature map"):
        NTKRegressor(activation="erf", solver="features").fit(x, y)


@pytest.mark.parametrize("solver", ["cholesky", "cg", "nystrom"])
def test_dynamics_t_inf(data, solver):
    x, y, xt = data
    arch = ntkit.mlp(2, W_std=2**0.5, b_std=0.1)
    xt_t, x_t = torch.as_tensor(xt), torch.as_tensor(x)
    y2 = np.stack([y, np.cos(x[:, 3])], 1)
    f0 = 0.3 * np.ones_like(y2)
    ref = gradient_descent_mse(arch.kernel(x_t, get="ntk"), y2, diag_reg=1e-3).predict(
        float("inf"), arch.kernel(xt_t, x_t, get="ntk"), f0_train=f0, f0_test=0.3 * np.ones((30, 2)))
    out = kernel_regression(arch, x, y2, xt, diag_reg=1e-3, solver=solver, n_centers=len(x), tol=1e-12,
                            f0_train=f0, f0_test=0.3 * np.ones((30, 2)), progress=False)
    assert _rel(out.test, ref.test) < 1e-6
    if solver != "nystrom":  # exact solvers: train predictions under K + lambda I, as the dynamics
        assert _rel(out.train, ref.train) < 1e-6
    else:  # the Nystrom model's fitted values k(X, X_M) alpha
        fitted = arch.kernel(x_t, get="ntk") @ torch.linalg.solve(
            arch.kernel(x_t, get="ntk") + out.train.new_tensor(1e-3 * float(arch.kernel(x_t, get="ntk",
                                                                                         diagonal=True).mean()))
            * torch.eye(len(x), dtype=torch.float64), torch.as_tensor(y2 - f0)) + torch.as_tensor(f0)
        assert _rel(out.train, fitted) < 1e-6
    one = kernel_regression(arch, x, y, xt, diag_reg=1e-3, solver=solver, n_centers=len(x), tol=1e-12)
    assert one.test.shape == (30,) and one.train.shape == (200,)
