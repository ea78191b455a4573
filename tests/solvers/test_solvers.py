"""Large-n solvers: CG and FALKON equal the direct solve of the same problem; with every point as a
center they are exact kernel ridge regression; ridge on features is KRR with the feature kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ntkit
from ntkit.solvers import choose_solver, falkon, kernel_ridge

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(240, 5, generator=g, dtype=torch.float64)
    y = torch.stack([torch.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2], torch.cos(x[:, 3])], 1)
    y = y + 0.1 * torch.randn(y.shape, generator=g, dtype=torch.float64)
    xt = torch.randn(40, 5, generator=g, dtype=torch.float64)
    return x, y, xt


ARCH = ntkit.mlp(2, W_std=2**0.5, b_std=0.2)


def _krr_reference(kernel, x, y, xt, lam):
    """Independent reference: numpy solve of (K + lam I) alpha = y with the kernel matrices."""
    k = kernel(x).numpy()
    ks = kernel(xt, x).numpy()
    return ks @ np.linalg.solve(k + lam * np.eye(len(k)), y.numpy())


def _close(a, b, tol=1e-6):
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= tol * np.abs(b).max(), np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("kernel", [ARCH.kernel_fn("ntk"), ARCH.kernel_fn("nngp"), ntkit.Laplace(2.0)])
def test_cg_equals_direct_solve(data, kernel):
    x, y, xt = data
    lam = 1e-3 * float(kernel(x, diagonal=True).mean())
    ref = _krr_reference(kernel, x, y, xt, lam)
    chol = kernel_ridge(kernel, x, y, diag_reg=1e-3, solver="cholesky")
    _close(chol.predict(xt), ref, 1e-9)
    cg = kernel_ridge(kernel, x, y, diag_reg=1e-3, solver="cg", n_centers=40, tol=1e-11, max_iter=500,
                     random_state=0)
    assert 1 < cg.iterations < 500
    _close(cg.predict(xt), ref)
    _close(cg.predict(x), chol.predict(x))


def test_falkon_equals_direct_nystrom_solve(data):
    x, y, xt = data
    kf = ARCH.kernel_fn("ntk")
    lam = 1e-2
    ctr, alpha, it, hist = falkon(kf, x, y, lam, n_centers=50, tol=1e-12, random_state=1, progress=False)
    knm, kmm = kf(x, ctr).numpy(), kf(ctr).numpy()
    direct = np.linalg.solve(knm.T @ knm + lam * kmm, knm.T @ y.numpy())
    ref = kf(xt, ctr).numpy() @ direct
    _close(kf(xt, ctr).numpy() @ alpha.numpy(), ref)
    assert hist[-1] <= 1e-12 and it < 60
    # a poor preconditioner cannot be what makes it converge: the Nystrom solution differs from exact KRR
    exact = _krr_reference(kf, x, y, xt, lam)
    assert np.abs(ref - exact).max() > 1e-3 * np.abs(exact).max()


@pytest.mark.parametrize("solver", ["cg", "nystrom"])
def test_all_points_as_centers_is_exact_krr(data, solver):
    x, y, xt = data
    kf = ARCH.kernel_fn("ntk")
    sol = kernel_ridge(kf, x, y[:, 0], diag_reg=1e-4, solver=solver, n_centers=len(x), tol=1e-12)
    lam = 1e-4 * float(kf(x, diagonal=True).mean())
    pred = sol.predict(xt.numpy())
    assert isinstance(pred, np.ndarray) and pred.shape == (40,)
    _close(pred, _krr_reference(kf, x, y[:, :1], xt, lam)[:, 0])
    assert sol.iterations <= 3  # the preconditioner is then (nearly) the system itself


def test_matrix_is_never_formed(data):
    # the n x n matrix would need 0.32 MB (+20% to factorize it); the budget is 0.35 MB
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 4, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(1))
    kf = ARCH.kernel_fn("ntk")
    with pytest.raises(ntkit.MemoryBudgetError, match="solver='cg'"):
        kernel_ridge(kf, x, y, diag_reg=1e-1, solver="cholesky", memory_budget=3.5e5)
    assert choose_solver(200, kf, memory_budget=3.5e5) == "nystrom"
    cg = kernel_ridge(kf, x, y, diag_reg=1e-1, solver="cg", n_centers=40, tol=1e-8, memory_budget=3.5e5)
    ref = kernel_ridge(kf, x, y, diag_reg=1e-1, solver="cholesky")
    _close(cg.predict(x[:50]), ref.predict(x[:50]))
    ny = kernel_ridge(kf, x, y, diag_reg=1e-1, solver="nystrom", n_centers=80, tol=1e-6, memory_budget=3.5e5)
    assert ny.centers.shape == (80, 4)


def test_feature_ridge_is_krr_with_the_feature_kernel(data):
    x, y, xt = data
    sol = kernel_ridge(ARCH, x, y, diag_reg=1e-3, solver="features", n_components=512, random_state=0)
    fm = sol.feature_map
    phi, phit = fm.transform(x), fm.transform(xt)
    lam = 1e-3 * float(ARCH.kernel(x, get="ntk", diagonal=True).mean())  # lambda from the exact kernel
    ref = phit @ phi.T @ torch.linalg.solve(phi @ phi.T + lam * torch.eye(len(x), dtype=x.dtype), y)
    _close(sol.predict(xt), ref, 1e-8)
    # and, with enough features, close to exact KRR
    exact = _krr_reference(ARCH.kernel_fn("ntk"), x, y, xt, lam)
    big = kernel_ridge(ARCH, x, y, diag_reg=1e-3, solver="features", n_components=2048, random_state=0)
    err = np.linalg.norm(big.predict(xt).numpy() - exact) / np.linalg.norm(exact)
    assert err < 0.25, err


def test_auto_choice():
    kf = ARCH.kernel_fn("ntk")
    assert choose_solver(1000, kf, memory_budget=1e9) == "cholesky"
    assert choose_solver(50_000, kf, memory_budget=1e9) == "nystrom"
    assert choose_solver(500_000, kf, memory_budget=1e9) == "features"
    assert choose_solver(500_000, ntkit.Laplace(1.0), memory_budget=1e9) == "nystrom"
    erf = ntkit.mlp(1, activation=ntkit.Erf()).kernel_fn("ntk")
    assert choose_solver(500_000, erf, memory_budget=1e9) == "nystrom"


def test_bad_input(data):
    x, y, xt = data
    with pytest.raises(ValueError, match="solver must be one of"):
        kernel_ridge(ARCH, x, y, solver="lsqr")
    with pytest.raises(ValueError, match="rows"):
        kernel_ridge(ARCH, x, y[:10])
    bad = y.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        kernel_ridge(ARCH, x, bad)
    xb = x.clone()
    xb[7, 1] = float("nan")
    with pytest.raises(ValueError, match="row 7 contains NaN"):
        kernel_ridge(ARCH, xb, y, solver="cg")
    with pytest.warns(RuntimeWarning, match="more than the 240 training points; using all 240"):
        sol = kernel_ridge(ARCH, x, y, diag_reg=1e-2, solver="nystrom", n_centers=1000, progress=False)
    assert sol.centers.shape[0] == 240
    with pytest.raises(ntkit.ConfigError, match="solver='features' needs"):
        kernel_ridge(ntkit.Laplace(1.0), x, y, solver="features")
    with pytest.raises(ValueError, match="diag_reg"):
        kernel_ridge(ARCH, x, y, diag_reg=-1.0)
