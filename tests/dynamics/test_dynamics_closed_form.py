"""Closed-form MSE dynamics against brute force: explicit recurrences, the ODE solver, linear solves."""

import math

import numpy as np
import pytest
import torch

from ntkit.dynamics import (gp_inference, gradient_descent, gradient_descent_mse, gradient_descent_mse_ensemble,
                            max_learning_rate)


def _rbf(x1, x2, ell=1.0):
    return torch.exp(-torch.cdist(x1, x2) ** 2 / (2 * ell**2))


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    xs = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.randn(12, 2, generator=g, dtype=torch.float64)
    f0 = 0.3 * torch.randn(12, 2, generator=g, dtype=torch.float64)
    f0s = 0.3 * torch.randn(5, 2, generator=g, dtype=torch.float64)
    k = _rbf(x, x) + 0.5 * (x @ x.T) / 3
    ks = _rbf(xs, x) + 0.5 * (xs @ x.T) / 3
    kss = _rbf(xs, xs) + 0.5 * (xs @ xs.T) / 3
    return dict(x=x, xs=xs, y=y, f0=f0, f0s=f0s, k=k, ks=ks, kss=kss)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_discrete_matches_recurrence_multi_output(problem):
    p, lr = problem, 1.3
    m = p["y"].numel()
    pred = gradient_descent_mse(p["k"], p["y"], learning_rate=lr, discrete=True, diag_reg=1e-3)
    kr = p["k"] + 1e-3 * torch.trace(p["k"]) / 12 * torch.eye(12, dtype=torch.float64)
    f, fs = p["f0"].clone(), p["f0s"].clone()
    steps = [0, 1, 7, 30]
    out = pred.predict(steps, p["ks"], p["f0"], p["f0s"])
    for s in range(31):
        if s in steps:
            i = steps.index(s)
            assert rel(out.train[i], f) < 1e-10 and rel(out.test[i], fs) < 1e-10
        r = f - p["y"]
        f, fs = f - lr / m * kr @ r, fs - lr / m * p["ks"] @ r


def test_momentum_matches_recurrence(problem):
    p, lr, beta = problem, 2.0, 0.8
    m = p["y"].numel()
    pred = gradient_descent_mse(p["k"], p["y"], learning_rate=lr, discrete=True, momentum=beta)
    f, fs = p["f0"].clone(), p["f0s"].clone()
    vf, vs = torch.zeros_like(f), torch.zeros_like(fs)
    res = {}
    for s in range(41):
        res[s] = (f.clone(), fs.clone())
        r = f - p["y"]
        vf, vs = beta * vf - lr / m * p["k"] @ r, beta * vs - lr / m * p["ks"] @ r
        f, fs = f + vf, fs + vs
    steps = [0, 1, 2, 13, 40]
    out = pred.predict(steps, p["ks"], p["f0"], p["f0s"])
    for i, s in enumerate(steps):
        assert rel(out.train[i], res[s][0]) < 1e-10
        assert rel(out.test[i], res[s][1]) < 1e-10


def test_ode_mse_equals_closed_form(problem):
    p = problem
    ts = [0.0, 3.0, 40.0, 400.0]
    cf = gradient_descent_mse(p["k"], p["y"], learning_rate=2.0).predict(ts, p["ks"], p["f0"], p["f0s"])
    od = gradient_descent("mse", p["k"], p["y"], learning_rate=2.0, rtol=1e-10, atol=1e-13).predict(
        ts[::-1], p["ks"], p["f0"], p["f0s"])
    assert rel(od.train.flip(0), cf.train) < 1e-7
    assert rel(od.test.flip(0), cf.test) < 1e-7
    # callable loss (autograd) gives the same flow
    od2 = gradient_descent(lambda f, y: 0.5 * ((f - y) ** 2).mean(), p["k"], p["y"], learning_rate=2.0).predict(
        ts, p["ks"], p["f0"], p["f0s"])
    assert rel(od2.test, cf.test) < 1e-7


def test_small_steps_approach_flow(problem):
    p, t = problem, 60.0
    flow = gradient_descent_mse(p["k"], p["y"], learning_rate=1.0).predict(t, p["ks"], p["f0"], p["f0s"]).test
    errs = []
    for n in (1, 4, 16, 64):  # lr = 1/n, n * t steps: same flow time
        gd = gradient_descent_mse(p["k"], p["y"], learning_rate=1.0 / n, discrete=True)
        errs.append(rel(gd.predict(int(t * n), p["ks"], p["f0"], p["f0s"]).test, flow))
    assert all(b < a / 3 for a, b in zip(errs, errs[1:])), errs  # first-order convergence: / 4 per refinement
    assert errs[-1] < 1e-3


def test_t0_and_infinity(problem):
    p = problem
    pred = gradient_descent_mse(p["k"], p["y"], learning_rate=1.0)
    out = pred.predict([0.0, 1e7, math.inf], p["ks"], p["f0"], p["f0s"])
    assert torch.equal(out.train[0], p["f0"]) or rel(out.train[0], p["f0"]) < 1e-14
    assert rel(out.test[0], p["f0s"]) < 1e-14
    krr = p["f0s"] + p["ks"] @ torch.linalg.solve(p["k"], p["y"] - p["f0"])
    assert rel(out.test[2], krr) < 1e-8
    assert rel(out.train[2], p["y"]) < 1e-8
    assert rel(out.test[1], krr) < 1e-6  # converges
    # ridge at t = inf, absolute and relative scale
    for reg, absolute in ((0.1, True), (1e-2, False)):
        eps = reg if absolute else reg * float(torch.trace(p["k"])) / 12
        ridge = p["ks"] @ torch.linalg.solve(p["k"] + eps * torch.eye(12, dtype=torch.float64), p["y"])
        got = gradient_descent_mse(p["k"], p["y"], diag_reg=reg, diag_reg_absolute_scale=absolute).predict(
            math.inf, p["ks"]).test
        assert rel(got, ridge) < 1e-10
        assert rel(gp_inference(p["k"], p["y"], p["ks"], diag_reg=reg, diag_reg_absolute_scale=absolute).mean,
                   ridge) < 1e-10


def test_loss_normalization_options(problem):
    p = problem
    a = gradient_descent_mse(p["k"], p["y"], learning_rate=1.0).predict(5.0, p["ks"]).test
    b = gradient_descent_mse(p["k"], p["y"], learning_rate=1.0 / 24, loss_normalization="sum").predict(
        5.0, p["ks"]).test
    c = gradient_descent_mse(p["k"], p["y"], learning_rate=0.5, loss_normalization="sample_mean").predict(
        5.0, p["ks"]).test
    d = gradient_descent_mse(p["k"], p["y"], learning_rate=1.0, loss_normalization=24.0).predict(
        5.0, p["ks"]).test
    assert rel(b, a) < 1e-12 and rel(c, a) < 1e-12 and rel(d, a) < 1e-12
    with pytest.raises(ValueError, match="loss_normalization"):
        gradient_descent_mse(p["k"], p["y"], loss_normalization="median")


def test_vector_times_and_1d_targets(problem):
    p = problem
    pred = gradient_descent_mse(p["k"], p["y"][:, 0], learning_rate=1.0)
    many = pred.predict(np.array([1.0, 2.0, 5.0]), p["ks"]).test
    assert many.shape == (3, 5)
    for i, t in enumerate([1.0, 2.0, 5.0]):
        assert rel(pred.predict(t, p["ks"]).test, many[i]) < 1e-14


def test_eigen_view(problem):
    p = problem
    pred = gradient_descent_mse(p["k"], p["y"], learning_rate=3.0)
    ev = pred.eigen_view([0.0, 2.0, 20.0], f0_train=p["f0"])
    out = pred.predict([0.0, 2.0, 20.0], f0_train=p["f0"])
    lam, v = torch.linalg.eigh(p["k"])
    assert rel(ev.eigenvalues, lam.flip(0)) < 1e-12
    assert torch.all(ev.eigenvalues[:-1] >= ev.eigenvalues[1:])
    assert rel(ev.rates, 3.0 / 24 * lam.flip(0)) < 1e-12
    for i, t in enumerate([0.0, 2.0, 20.0]):
        assert rel(ev.decay[i], torch.exp(-ev.rates * t)) < 1e-12
        # residual reconstructed from its projections
        assert rel(ev.eigenvectors @ ev.residual[i], p["y"] - out.train[i]) < 1e-10


def test_max_learning_rate(problem):
    p = problem
    for beta in (0.0, 0.9):
        eta = max_learning_rate(p["k"], n_outputs=2, momentum=beta)
        lmax = float(torch.linalg.eigvalsh(p["k"])[-1])
        assert abs(eta - 2 * (1 + beta) * 24 / lmax) < 1e-9 * eta
        for factor, converges in ((0.97, True), (1.03, False)):
            pred = gradient_descent_mse(p["k"], p["y"], learning_rate=factor * eta, discrete=True, momentum=beta)
            r = (pred.predict(3000).train - p["y"]).abs().max()
            assert (float(r) < 1e-3) == converges, (beta, factor, float(r))
    with pytest.raises(ValueError, match="stability limit"):
        gradient_descent_mse(p["k"], p["y"], learning_rate=1.1 * max_learning_rate(p["k"], n_outputs=2),
                             discrete=True).predict(math.inf)


def test_ensemble_nngp_regime_is_gp_posterior(problem):
    p = problem
    ens = gradient_descent_mse_ensemble(p["y"], p["k"], p["ks"], p["kss"], diag_reg=1e-2)
    post = gp_inference(p["k"], p["y"], p["ks"], p["kss"], diag_reg=1e-2)
    out = ens.predict(math.inf)
    assert rel(out.mean, post.mean) < 1e-9 and rel(out.cov, post.cov) < 1e-8
    prior = ens.predict(0.0)
    assert float(prior.mean.abs().max()) == 0 and rel(prior.cov, p["kss"]) < 1e-14
    # NNGP regime closed form: K** - K* K^{-1} (I - e^{-2cKt}) K*^T
    t = 7.0
    c = 1.0 / 24
    kr = p["k"] + 1e-2 * torch.trace(p["k"]) / 12 * torch.eye(12, dtype=torch.float64)
    e2 = torch.linalg.matrix_exp(-2 * c * kr * t)
    want = p["kss"] - p["ks"] @ torch.linalg.solve(kr, torch.eye(12, dtype=torch.float64) - e2) @ p["ks"].T
    got = ens.predict(t)
    assert rel(got.cov, want) < 1e-9
    assert rel(ens.predict(t, diagonal=True).cov, torch.diagonal(want)) < 1e-9


def test_ensemble_ntk_regime_formula(problem):
    """Lee et al. 2019 Eq. (16) written with matrix exponentials and solves (independent of the eigen path)."""
    p = problem
    theta, theta_s = 1.5 * p["k"] + 0.2, 1.5 * p["ks"] + 0.2
    ens = gradient_descent_mse_ensemble(p["y"], p["k"], p["ks"], p["kss"], ntk_train_train=theta,
                                        ntk_test_train=theta_s, learning_rate=2.0)
    t, c = 4.0, 2.0 / 24
    eye = torch.eye(12, dtype=torch.float64)
    a = theta_s @ torch.linalg.solve(theta, eye - torch.linalg.matrix_exp(-c * theta * t))
    mu = a @ p["y"]
    cov = p["kss"] + a @ p["k"] @ a.T - a @ p["ks"].T - p["ks"] @ a.T
    got = ens.predict(t)
    assert rel(got.mean, mu) < 1e-9 and rel(got.cov, cov) < 1e-9


def test_singular_kernel_warns_and_pseudo_inverse():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 2, dtype=torch.float64, generator=g)
    k = x @ x.T  # rank 2
    y = torch.randn(6, 1, dtype=torch.float64, generator=g)
    pred = gradient_descent_mse(k, y)
    with pytest.warns(RuntimeWarning, match="singular"):
        out = pred.predict(math.inf, k)
    want = k @ torch.linalg.pinv(k, hermitian=True, rtol=1e-10) @ y
    assert rel(out.test, want) < 1e-8
    with pytest.raises(ValueError, match="positive definite"):
        gp_inference(k, y, k)


def test_bad_input(problem):
    p = problem
    pred = gradient_descent_mse(p["k"], p["y"])
    with pytest.raises(ValueError, match=">= 0"):
        pred.predict([1.0, -2.0])
    with pytest.raises(ValueError, match="rows"):
        gradient_descent_mse(p["k"], p["y"][:5])
    with pytest.raises(ValueError, match="square"):
        gradient_descent_mse(p["ks"], p["y"])
    y = p["y"].clone()
    y[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gradient_descent_mse(p["k"], y)
    with pytest.raises(ValueError, match="second dimension"):
        pred.predict(1.0, p["ks"].T)
    with pytest.raises(ValueError, match="integers"):
        gradient_descent_mse(p["k"], p["y"], discrete=True).predict(1.5)
    with pytest.raises(ValueError, match="learning_rate"):
        gradient_descent_mse(p["k"], p["y"], learning_rate=-1.0)
    with pytest.raises(ValueError, match="symmetric"):
        gradient_descent_mse(p["k"] + torch.triu(torch.ones(12, 12, dtype=torch.float64), 1), p["y"])
    with pytest.raises(ValueError, match=">= 0"):
        gradient_descent("hinge", p["k"], torch.sign(p["y"])).predict(-1.0)
    with pytest.raises(ValueError, match="-1, \\+1"):
        gradient_descent("hinge", p["k"], p["y"])
    with pytest.raises(ValueError, match="t = inf"):
        gradient_descent("mse", p["k"], p["y"]).predict(math.inf)


def test_float32_and_f0_shape_errors(problem):
    p = problem
    pred = gradient_descent_mse(p["k"].float(), p["y"].float(), learning_rate=1.0)
    out = pred.predict([2.0], p["ks"].float())
    assert out.test.dtype == torch.float32
    want = gradient_descent_mse(p["k"], p["y"], learning_rate=1.0).predict([2.0], p["ks"]).test
    assert rel(out.test.double(), want) < 1e-4
    with pytest.raises(ValueError, match="f0_test has 3 rows"):
        gradient_descent_mse(p["k"], p["y"]).predict(1.0, p["ks"], f0_test=torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="outputs"):
        gradient_descent_mse(p["k"], p["y"]).predict(1.0, p["ks"], f0_train=torch.zeros(12, 3, dtype=torch.float64))


def test_ensemble_discrete_covariance_by_propagation(problem):
    """Discrete-time NTK-GP: propagate the joint prior covariance of (f_train, f_test) through the affine GD map
    z <- z - c [Theta; Theta*] (z_train - y) step by step and compare mean and covariance."""
    p = problem
    theta, theta_s = 1.5 * p["k"] + 0.2, 1.5 * p["ks"] + 0.2
    lr, steps, c = 3.0, 9, 3.0 / 24
    ens = gradient_descent_mse_ensemble(p["y"], p["k"], p["ks"], p["kss"], ntk_train_train=theta,
                                        ntk_test_train=theta_s, learning_rate=lr, discrete=True)
    got = ens.predict(steps)
    n, nt = 12, 5
    prior = torch.cat([torch.cat([p["k"], p["ks"].T], 1), torch.cat([p["ks"], p["kss"]], 1)], 0)
    big = torch.cat([theta, theta_s], 0)  # (n + nt, n)
    step = torch.eye(n + nt, dtype=torch.float64)
    step[:, :n] -= c * big
    mmat, b = torch.eye(n + nt, dtype=torch.float64), torch.zeros(n + nt, 2, dtype=torch.float64)
    for _ in range(steps):
        mmat, b = step @ mmat, step @ b + c * big @ p["y"]
    cov = (mmat @ prior @ mmat.T)[n:, n:]
    assert rel(got.mean, b[n:]) < 1e-10
    assert rel(got.cov, cov) < 1e-10


def test_ode_builtin_losses_equal_autograd_callables(problem):
    """Analytic loss gradients of the built-ins vs autograd through the same loss written as a callable."""
    p = problem
    ys = torch.sign(p["y"])
    onehot = torch.nn.functional.one_hot(torch.arange(12) % 3, 3).double()
    cases = [("hinge", ys, lambda f, y: 0.5 * (torch.clamp(1 - y * f, min=0) ** 2).mean()),
             ("logistic", ys, lambda f, y: torch.nn.functional.softplus(-y * f).mean()),
             ("cross_entropy", onehot, lambda f, y: -(y * torch.log_softmax(f, 1)).sum(1).mean())]
    for name, y, fn in cases:
        a = gradient_descent(name, p["k"], y, learning_rate=2.0).predict([1.0, 20.0], p["ks"])
        b = gradient_descent(fn, p["k"], y, learning_rate=2.0).predict([1.0, 20.0], p["ks"])
        assert rel(a.test, b.test) < 1e-7, name
        assert rel(a.train, b.train) < 1e-7, name


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.95, 0.995])
def test_heavy_ball_flow_closed_form_equals_ode(problem, beta):
    """Closed-form heavy-ball flow (over- and under-damped modes) = Dormand-Prince on f'' + (1-beta) f' = ..."""
    p = problem
    ts = [0.0, 0.7, 15.0, 120.0]
    cf = gradient_descent_mse(p["k"], p["y"], learning_rate=2.0, momentum=beta).predict(ts, p["ks"], p["f0"], p["f0s"])
    od = gradient_descent("mse", p["k"], p["y"], learning_rate=2.0, momentum=beta).predict(ts, p["ks"], p["f0"],
                                                                                            p["f0s"])
    assert rel(cf.train, od.train) < 1e-7 and rel(cf.test, od.test) < 1e-7
    inf = gradient_descent_mse(p["k"], p["y"], learning_rate=2.0, momentum=beta).predict(math.inf, p["ks"]).test
    assert rel(inf, p["ks"] @ torch.linalg.solve(p["k"], p["y"])) < 1e-8


def test_f0_test_without_test_kernel_is_an_error(problem):
    p = problem
    pred = gradient_descent_mse(p["k"], p["y"])
    with pytest.raises(ValueError, match="f0_test.*test kernel"):
        pred.predict(1.0, None, None, f0_test=p["f0s"])
    with pytest.raises(ValueError, match="f0_test.*test kernel"):
        pred.predict(1.0, f0_train=p["f0"], f0_test=p["f0s"])
    assert pred.predict(1.0, None, p["f0"]).test is None  # no f0_test: fine


def test_ensemble_kernel_shape_mismatch_names_the_kernels(problem):
    p = problem
    theta = 1.5 * p["k"] + 0.2
    with pytest.raises(ValueError, match=r"ntk_train_train has shape \(5, 5\).*nngp_train_train has shape \(12, 12\)"):
        gradient_descent_mse_ensemble(p["y"], p["k"], p["ks"], p["kss"], ntk_train_train=theta[:5, :5],
                                      ntk_test_train=1.5 * p["ks"][:, :5])
    with pytest.raises(ValueError, match=r"ntk_test_train has shape \(5, 5\).*nngp_test_train has shape \(5, 12\)"):
        gradient_descent_mse_ensemble(p["y"], p["k"], p["ks"], p["kss"], ntk_train_train=theta,
                                      ntk_test_train=1.5 * p["ks"][:, :5])


def test_ensemble_rejects_non_symmetric_nngp_test_test(problem):
    p = problem
    bad = p["kss"] + torch.triu(torch.ones(5, 5, dtype=torch.float64), 1)  # clearly not symmetric
    with pytest.raises(ValueError, match="nngp_test_test is not symmetric"):
        gradient_descent_mse_ensemble(p["y"], p["k"], p["ks"], bad)
    # a symmetric matrix up to round-off and a diagonal are accepted
    ok = p["kss"] + 1e-14 * torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gradient_descent_mse_ensemble(p["y"], p["k"], p["ks"], ok).predict(1.0)
    gradient_descent_mse_ensemble(p["y"], p["k"], p["ks"], torch.diagonal(p["kss"])).predict(1.0, diagonal=True)


def test_momentum_zero_flow_is_heavy_ball_not_gradient_flow():
    """discrete=False, momentum=0.0 is r'' + r' + a r = 0, r'(0) = 0 (a = c lambda), as documented; momentum=None
    is r' = -a r. Reference: the closed form with characteristic roots s = (-1 +- sqrt(1 - 4a)) / 2."""
    lam, y, t = 0.1, 1.0, 3.0
    k = torch.tensor([[lam]], dtype=torch.float64)
    yt = torch.tensor([y], dtype=torch.float64)
    a = lam  # c = eta / m = 1 for one point, one output
    s1, s2 = (-1 + math.sqrt(1 - 4 * a)) / 2, (-1 - math.sqrt(1 - 4 * a)) / 2
    r = (s2 * math.exp(s1 * t) - s1 * math.exp(s2 * t)) / (s2 - s1) * y  # residual y - f, f(0) = 0
    hb = float(gradient_descent_mse(k, yt, momentum=0.0).predict(t).train[0])
    gf = float(gradient_descent_mse(k, yt).predict(t).train[0])
    assert abs(hb - (y - r)) < 1e-12
    assert abs(gf - (y - y * math.exp(-a * t))) < 1e-12
    assert abs(hb - gf) > 1e-2
    doc = gradient_descent_mse.__doc__
    assert "momentum=0.0" in doc and "momentum=None" in doc and "second-order" in doc
