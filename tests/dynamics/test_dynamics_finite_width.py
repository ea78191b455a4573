"""Real finite networks in the NTK parameterization (ntkit.mlp(...).init) trained by full-batch gradient
descent, against the infinite-width closed forms."""

import math

import torch

import ntkit
from ntkit.dynamics import gradient_descent_mse, gradient_descent_mse_ensemble, max_learning_rate

DT = torch.float64


def _data(n=8, n_test=4, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    xs = torch.randn(n_test, d, generator=g, dtype=DT)
    y = torch.sin(x.sum(1, keepdim=True))
    return x, xs, y


def _train(net, x, xs, y, lr, steps):
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((net(x) - y) ** 2).mean()).backward()  # the "mean" normalization, m = y.numel()
        opt.step()
    with torch.no_grad():
        return net(xs)


def test_wide_mlp_approaches_infinite_width_prediction():
    """|f_net(t) - f_lin(t)| with the analytic NTK (and the net's own f0) falls as width grows:
    Jacot et al. 2018 Thm. 2 / Lee et al. 2019 Thm. 2.1 give O(1/sqrt(width)) deviations."""
    x, xs, y = _data()
    arch = ntkit.mlp(depth=1, width=64, activation="relu", W_std=1.5, b_std=0.1, out_dim=1, parameterization="ntk")
    k = arch.kernel(x, None, get="ntk")
    ks = arch.kernel(xs, x, get="ntk")
    lr = 0.5 * max_learning_rate(k)
    steps = 40
    errs = []
    for width in (64, 512, 4096, 32768):
        e = []
        for seed in range(4):  # four seeds per width to damp the randomness of a single net
            net = arch.init(width, seed=seed, in_features=4, dtype=DT)
            with torch.no_grad():
                f0, f0s = net(x), net(xs)
            want = gradient_descent_mse(k, y, learning_rate=lr, discrete=True).predict(steps, ks, f0, f0s).test
            got = _train(net, x, xs, y, lr, steps)
            e.append(float(((got - want) ** 2).mean().sqrt() / y.abs().max()))
        errs.append(sum(e) / len(e))
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0] / 6, errs  # 512x the width: ideally ~22x smaller


def test_ensemble_matches_ntk_gp_mean_and_variance():
    """48 independently initialized width-1024 nets, each trained by GD for s steps: the sample mean and
    variance of test outputs agree with the NTK-GP (Lee et al. 2019, Eqs. (14)-(16); t = s steps,
    discrete ~ flow since lr * lambda_max / m is small) within sampling error.
    Mean: |mean_hat - mu| <= 4 * sqrt(Sigma_ii / N). Variance: for Gaussian outputs the sample variance has
    standard error Sigma_ii * sqrt(2 / (N - 1)); we allow 4 standard errors (+ 0.1 Sigma_ii for finite width).
    A 4-sigma bound over 4 test points fails by chance with probability < 1e-3."""
    x, xs, y = _data(n=6, n_test=4, d=3, seed=1)
    arch = ntkit.mlp(depth=1, width=1024, activation=ntkit.Erf(1.0, 1.0, 0.0), W_std=1.3, b_std=0.3, out_dim=1,
                     parameterization="ntk")
    ktr = arch.kernel(x, None, get=("nngp", "ntk"))
    kst = arch.kernel(xs, x, get=("nngp", "ntk"))
    kss = arch.kernel(xs, None, get="nngp")
    lr = 0.2 * max_learning_rate(ktr.ntk)
    steps, n_nets = 30, 48
    outs = torch.stack([_train(arch.init(1024, seed=100 + s, in_features=3, dtype=DT), x, xs, y, lr, steps)[:, 0]
                        for s in range(n_nets)])
    # the NTK-GP of discrete gradient descent after `steps` steps
    ens = gradient_descent_mse_ensemble(y, ktr.nngp, kst.nngp, kss, ntk_train_train=ktr.ntk, ntk_test_train=kst.ntk,
                                        learning_rate=lr, discrete=True)
    g = ens.predict(steps, diagonal=True)
    mu, var = g.mean[:, 0], g.cov
    mean_hat, var_hat = outs.mean(0), outs.var(0)
    z_mean = (mean_hat - mu).abs() / (var / n_nets).sqrt()
    assert float(z_mean.max()) < 4, (mean_hat, mu, z_mean)
    se_var = var * math.sqrt(2 / (n_nets - 1))
    assert bool(((var_hat - var).abs() <= 4 * se_var + 0.1 * var).all()), (var_hat, var)
    # the prediction is not trivially satisfied: training moved the mean by many standard errors
    prior = ens.predict(0, diagonal=True)
    assert float(((mu - prior.mean[:, 0]).abs() / (var / n_nets).sqrt()).max()) > 8
