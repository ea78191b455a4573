"""Feature ridge by matrix-free conjugate gradients: equal to the direct solve of the same normal equations
(independent numpy reference), the Nystrom preconditioner cuts the iterations, several lambdas at once,
features kept in memory or recomputed, float32 accuracy, and the errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import ntkit
from ntkit.features import NTKRandomFeatures
from ntkit.solvers import FeatureRidgeInfo, choose_feature_solver, feature_ridge, kernel_ridge

pytestmark = pytest.mark.usefixtures("single_thread")

ARCH = ntkit.mlp(1, W_std=2**0.5, b_std=0.1)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64)
    y = torch.stack([torch.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2], torch.cos(x[:, 3])], 1)
    y = y + 0.1 * torch.randn(y.shape, generator=g, dtype=torch.float64)
    fm = NTKRandomFeatures(ARCH, 300, random_state=0, dtype=torch.float64, progress=False).fit(x)
    phi = fm.transform(x)
    mean_diag = float((phi * phi).sum(1).mean())
    return x, y, fm, phi, mean_diag


def _reference(phi, y, lam):
    """Independent reference: numpy's solve of the normal equations (Phi^T Phi + lam I) w = Phi^T y."""
    p, t = phi.numpy().astype(np.float64), y.numpy()
    return np.linalg.solve(p.T @ p + lam * np.eye(p.shape[1]), p.T @ t)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("preconditioner", ["nystrom", None])
def test_cg_equals_direct_solve_for_several_lambdas(data, preconditioner):
    x, y, fm, phi, md = data
    lams = [1e-3 * md, 1e-2 * md, 1e-1 * md]
    w, info = feature_ridge(fm, x, y, lams, solver="cg", tol=1e-12, max_iter=2000, rank=100,
                            preconditioner=preconditioner, return_info=True)
    assert w.shape == (3, fm.n_components_, 2) and w.dtype == torch.float64
    assert info.solver == "cg" and info.converged and info.stored and info.rank == (100 if preconditioner else 0)
    assert max(info.residual) < 1e-10 and info.iterations > 1
    for j, lam in enumerate(lams):
        ref = _reference(phi, y, lam)
        assert _rel(w[j], ref) < 1e-6, (lam, _rel(w[j], ref))
        # one lambda alone gives the same solution (and the direct solver too)
        one = feature_ridge(fm, x, y, lam, solver="cg", tol=1e-12, max_iter=2000, rank=100,
                            preconditioner=preconditioner)
        assert one.shape == (fm.n_components_, 2) and _rel(one, ref) < 1e-6
    direct = feature_ridge(fm, x, y, lams, solver="direct")  # one eigendecomposition for the grid
    for j, lam in enumerate(lams):
        assert _rel(direct[j], _reference(phi, y, lam)) < 1e-9


def test_preconditioner_cuts_iterations_on_an_ill_conditioned_problem(data):
    x, y, fm, phi, md = data
    lam = 1e-6 * md  # kappa(Phi^T Phi + lam I) ~ 1e8: plain CG needs hundreds of iterations
    s = torch.linalg.svdvals(phi)
    assert float((s[0] ** 2 + lam) / (s[-1] ** 2 + lam)) > 1e6
    kw = dict(solver="cg", tol=1e-8, max_iter=3000, return_info=True)
    w_plain, plain = feature_ridge(fm, x, y, lam, preconditioner=None, **kw)
    w_pre, pre = feature_ridge(fm, x, y, lam, preconditioner="nystrom", rank=150, **kw)
    assert pre.converged and pre.iterations * 3 < plain.iterations, (pre.iterations, plain.iterations)
    # all rows sampled: the preconditioner is (Phi^T Phi + lam I) itself up to its null space -> a few iterations
    _, full = feature_ridge(fm, x, y, lam, preconditioner="nystrom", rank=len(x), **kw)
    assert full.iterations <= 5
    ref = _reference(phi, y, lam)
    assert _rel(w_pre, ref) < 1e-4  # kappa 1e8 x residual 1e-8 bounds the error; predictions are what matter
    assert _rel(phi @ w_pre, phi.numpy() @ ref) < 1e-6


def test_streamed_features_equal_stored(data):
    x, y, fm, phi, md = data
    lam = 1e-2 * md
    small = NTKRandomFeatures(ARCH, 300, random_state=0, dtype=torch.float64, progress=False, batch_size=64).fit(x)
    budget = 400 * 300 * 8 * 1.5  # Phi does not fit half of it: recomputed batch by batch each iteration
    w, info = feature_ridge(small, x, y, lam, solver="cg", tol=1e-12, rank=80, memory_budget=budget + 3 * 80 * 300 * 8
                            + 2 * 80 * 80 * 8, return_info=True)
    assert not info.stored
    w2, info2 = feature_ridge(small, x, y, lam, solver="cg", tol=1e-12, rank=80, return_info=True)
    assert info2.stored
    assert _rel(w, w2) < 1e-10 and _rel(w, _reference(phi, y, lam)) < 1e-6


def test_float32_features_match_the_float64_direct_solve(data):
    x, y, _, _, _ = data
    fm = NTKRandomFeatures(ARCH, 300, random_state=0, dtype=torch.float32, progress=False).fit(x)
    phi = fm.transform(x)
    md = float((phi.double() ** 2).sum(1).mean())
    lam = 1e-2 * md
    w, info = feature_ridge(fm, x, y, lam, solver="cg", tol=1e-9, return_info=True)
    assert info.tol == 1e-5  # raised to what a float32 product can certify
    assert max(info.residual) < 2e-5
    ref = _reference(phi.double(), y, lam)
    # stated accuracy of float32 features: predictions within 1e-4 of the float64 direct solve
    assert _rel(phi.double() @ w, phi.double().numpy() @ ref) < 1e-4


def test_kernel_ridge_features_cg_and_the_auto_choice(data):
    x, y, _, _, _ = data
    kw = dict(diag_reg=1e-2, solver="features", n_components=300, random_state=0, dtype=torch.float64,
              progress=False)
    direct = kernel_ridge(ARCH, x, y, feature_solver="direct", **kw)
    cg = kernel_ridge(ARCH, x, y, feature_solver="cg", tol=1e-12, max_iter=1000, **kw)
    assert direct.feature_solver == "direct" and direct.iterations == 0
    assert cg.feature_solver == "cg" and cg.iterations > 1 and cg.residuals[-1] <= 1e-12
    assert isinstance(cg.info, FeatureRidgeInfo) and cg.info.residual[0] < 1e-10
    xt = x[:50] + 0.1
    assert _rel(cg.predict(xt), direct.predict(xt)) < 1e-6
    auto = kernel_ridge(ARCH, x, y, **kw)
    assert auto.feature_solver == "direct"  # 300 features: the normal equations
    assert choose_feature_solver(20_000, 16_384, 4, memory_budget=8e9) == "cg"
    assert choose_feature_solver(20_000, 4096, 4, memory_budget=8e9) == "direct"
    assert choose_feature_solver(100_000, 16_384, 4, memory_budget=7e9) == "direct"  # Phi does not fit half
    assert choose_feature_solver(10**6, 40_000, 4, memory_budget=8e9) == "cg"  # the m x m matrix does not fit
    with pytest.raises(ValueError, match="feature_solver must be one of"):
        kernel_ridge(ARCH, x, y, feature_solver="lsqr", **kw)


def test_bad_input(data):
    x, y, fm, _, md = data
    with pytest.raises(ValueError, match="solver must be one of"):
        feature_ridge(fm, x, y, 1.0, solver="qr")
    with pytest.raises(ValueError, match="preconditioner must be"):
        feature_ridge(fm, x, y, 1.0, solver="cg", preconditioner="jacobi")
    for lam in (-1.0, float("nan"), float("inf"), [], [1.0, -2.0], "big"):
        with pytest.raises(ValueError, match="lam"):
            feature_ridge(fm, x, y, lam, solver="cg")
    with pytest.raises(RuntimeError, match="not fitted"):
        feature_ridge(NTKRandomFeatures(ARCH, 64), x, y, 1.0)
    with pytest.raises(ValueError, match="rows"):
        feature_ridge(fm, x, y[:10], 1.0, solver="cg")
    with pytest.raises(ValueError, match="2-d"):
        feature_ridge(fm, x, y[:, 0], 1.0, solver="cg")
    for kw, msg in ((dict(tol=0.0), "tol"), (dict(tol=2.0), "tol"), (dict(max_iter=0), "max_iter"),
                    (dict(rank=0), "rank"), (dict(rank=2.5), "rank")):
        with pytest.raises(ValueError, match=msg):
            feature_ridge(fm, x, y, 1.0, solver="cg", **kw)
    with pytest.raises(ntkit.MemoryBudgetError, match="smaller rank"):
        feature_ridge(fm, x, y, 1.0, solver="cg", memory_budget=1e5)
    with pytest.raises(ntkit.MemoryBudgetError, match="solver='cg'"):
        feature_ridge(fm, x, y, 1.0, solver="direct", memory_budget=1e5)
    with pytest.warns(RuntimeWarning, match="stopped after 2 iterations"):
        _, info = feature_ridge(fm, x, y, 1e-6 * md, solver="cg", max_iter=2, preconditioner=None, return_info=True)
    assert not info.converged


def test_edge_cases(data):
    x, y, fm, phi, md = data
    # zero targets: w = 0 is exact, converged after 0 iterations, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        w, info = feature_ridge(fm, x, torch.zeros_like(y), md, solver="cg", return_info=True)
    assert info.converged and info.iterations == 0 and float(w.abs().max()) == 0.0
    # a 0-d tensor or array lambda is one lambda
    want = feature_ridge(fm, x, y, 0.1 * md, solver="direct")
    for lam in (torch.tensor(0.1 * md, dtype=torch.float64), np.array(0.1 * md)):
        got = feature_ridge(fm, x, y, lam, solver="direct")
        assert got.shape == want.shape and _rel(got, want) < 1e-12
    with pytest.raises(ValueError, match="empty"):
        feature_ridge(fm, x[:0], y[:0], 1.0, solver="cg")
    with pytest.raises(ValueError, match="feature_solver"):
        kernel_ridge(ARCH, x, y, solver="cholesky", feature_solver="qr")


def test_regressor_takes_cg_for_many_features():
    """NTKRegressor(solver="features") with 8192 features solves by CG (the auto rule) and equals the dual
    (push-through) solution Phi_t Phi^T (Phi Phi^T + lam I)^{-1} y, an n x n reference independent of CG."""
    from ntkit.estimators import NTKRegressor

    rng = np.random.default_rng(1)
    x, xt = rng.standard_normal((150, 4)), rng.standard_normal((20, 4))
    y = np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.1 * rng.standard_normal(150)
    reg = NTKRegressor(depth=1, diag_reg=1e-2, solver="features", n_random_features=8192, random_state=0,
                       memory_budget=4e9).fit(x, y)
    sol = reg.solution_
    assert sol.feature_solver == "cg" and reg.n_iter_ == sol.iterations >= 1 and sol.info.converged
    assert sol.info.rank == 150  # every row sampled: the preconditioner is exact, one or two iterations
    fm = sol.feature_map
    phi, phit = fm.transform(torch.as_tensor(x)), fm.transform(torch.as_tensor(xt))
    ref = phit @ phi.T @ torch.linalg.solve(phi @ phi.T + sol.lam * torch.eye(150, dtype=torch.float64),
                                            torch.as_tensor(y))
    assert _rel(reg.predict(xt), ref) < 1e-6
