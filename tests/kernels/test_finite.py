"""The finite twin of an architecture: parameterization, initialization, and Monte Carlo convergence of
its empirical NNGP/NTK to the exact infinite-width kernels.

Monte Carlo tolerances: over S independent seeds, the sample mean of each kernel entry has standard
error SE = sd / sqrt(S) (CLT). We require |mean - K| <= z SE + b for every entry, with z = 4.5 (a
Bonferroni bound for the <= 21 distinct entries of a 6 x 6 kernel at family-wise level ~1e-4 under a
normal approximation, leaving room for the t-distribution with S - 1 = 39 dof) and b = depth / width *
max|K|, an allowance for the O(depth / width) finite-width bias of the mean kernel (Hanin & Nica 2019;
Dyer & Gur-Ari 2020).
"""

import functools
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

import ntkit

SEEDS = 40
WIDTH = 1024
Z = 4.5


def _inputs(n=6, d=5):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[1] = 2.0 * x[0]  # parallel pair
    return x


def _empirical(net, x):
    """(NNGP sample, NTK sample) of one network: mean over readout units of f f^T, and J J^T of output 0
    by brute-force autograd over all trainable parameters."""
    params = {k: v.detach() for k, v in net.named_parameters() if v.requires_grad}
    with torch.no_grad():
        f = net(x)
    nngp = f @ f.T / f.shape[1]
    jac = jacrev(lambda p: functional_call(net, p, (x,))[:, 0])(params)
    j = torch.cat([v.reshape(x.shape[0], -1) for v in jac.values()], dim=1)
    return nngp, j @ j.T


@functools.lru_cache(maxsize=None)
def _cached_monte_carlo(name, init="gaussian", seeds=SEEDS):
    return _monte_carlo(CASES[name][0], _inputs(), init=init, seeds=seeds)


def _monte_carlo(arch, x, width=WIDTH, seeds=SEEDS, init="gaussian", out_dim=8):
    samples = [_empirical(arch.init(width, seed=s, init=init, in_features=x.shape[1], out_dim=out_dim), x)
               for s in range(seeds)]
    out = {}
    for i, name in enumerate(("nngp", "ntk")):
        stack = torch.stack([s[i] for s in samples])
        out[name] = (stack.mean(0), stack.std(0) / math.sqrt(seeds))
    return out


def _check(arch, x, mc, depth, width=WIDTH):
    k = arch.kernel(x, width=width)
    for name in ("nngp", "ntk"):
        mean, se = mc[name]
        exact = getattr(k, name)
        bias = depth / width * float(exact.abs().max())
        excess = (mean - exact).abs() - (Z * se + bias)
        assert float(excess.max()) <= 0, (
            f"{name}: worst |mean - exact| exceeds z*SE + bias by {float(excess.max()):.3g} "
            f"(max |mean-exact| {float((mean - exact).abs().max()):.3g}, max SE {float(se.max()):.3g})")


CASES = {
    "relu_ntk": (ntkit.mlp(2, activation="relu", W_std=1.5, b_std=0.2), 2),
    "relu_standard": (ntkit.mlp(2, activation="relu", W_std=1.5, b_std=0.2, parameterization="standard"), 2),
    "erf_ntk": (ntkit.mlp(2, activation=ntkit.Erf(1.0, 1.2, 0.1), W_std=1.3, b_std=0.1), 2),
    "erf_standard": (ntkit.mlp(2, activation=ntkit.Erf(), W_std=1.3, b_std=0.1, parameterization="standard"), 2),
    "tanh_quadrature_ntk": (ntkit.mlp(2, activation=ntkit.Elementwise("tanh"), W_std=1.4, b_std=0.1), 2),
    "tanh_quadrature_standard": (ntkit.mlp(2, activation=ntkit.Elementwise("tanh"), W_std=1.4, b_std=0.1,
                                           parameterization="standard"), 2),
    "residual_ntk": (ntkit.serial(ntkit.Dense(None, 1.2, 0.1), ntkit.residual(ntkit.Relu(), ntkit.Dense(None, 1.0, 0.1)),
                                  ntkit.Relu(), ntkit.Dense(1, 1.0, 0.0)), 3),
    "residual_standard": (ntkit.serial(ntkit.Dense(None, 1.2, 0.1),
                                       ntkit.residual(ntkit.Relu(), ntkit.Dense(None, 1.0, 0.1)),
                                       ntkit.Relu(), ntkit.Dense(1, 1.0, 0.0), parameterization="standard"), 3),
}


@pytest.mark.parametrize("name", CASES)
def test_monte_carlo_converges_to_exact_kernels(name):
    arch, depth = CASES[name]
    _check(arch, _inputs(), _cached_monte_carlo(name), depth)


def test_orthogonal_init_has_the_same_limit():
    # Huang et al. 2020: orthogonal initialization gives the same infinite-width NTK as Gaussian
    arch, depth = CASES["relu_ntk"]
    _check(arch, _inputs(), _cached_monte_carlo("relu_ntk", init="orthogonal", seeds=16), depth)


def test_monte_carlo_detects_a_wrong_kernel():
    # the same statistic rejects a kernel that is off by 5% (the test can fail)
    arch, depth = CASES["relu_ntk"]
    x = _inputs()
    mc = _cached_monte_carlo("relu_ntk")
    wrong = ntkit.mlp(2, activation="relu", W_std=1.5 * 1.025, b_std=0.2)  # ~5% larger kernels
    with pytest.raises(AssertionError):
        _check(wrong, x, mc, depth)


def test_parameterization_scales():
    x = _inputs()
    ntk_net = ntkit.mlp(1, activation="relu", W_std=2.0, b_std=0.5).init(64, seed=0, in_features=5)
    layer = ntk_net.body[0]
    assert isinstance(layer, ntkit.kernels.DenseModule)
    assert layer.weight_scale == pytest.approx(2.0 / math.sqrt(5))
    assert layer.bias_scale == 0.5
    std_net = ntkit.mlp(1, activation="relu", W_std=2.0, b_std=0.5, parameterization="standard").init(
        4096, seed=0, in_features=5)
    w = std_net.body[0].weight
    assert std_net.body[0].weight_scale == 1.0
    # W ~ N(0, W_std^2 / n_in): sample variance within 5 SE (relative SE of a variance: sqrt(2/N))
    n = w.numel()
    assert float(w.detach().var()) == pytest.approx(4.0 / 5, rel=5 * math.sqrt(2 / n))
    assert float(std_net.body[0].bias.detach().std()) == pytest.approx(0.5, rel=5 / math.sqrt(2 * 4096))
    assert ntk_net(x).shape == (6, 1)


def test_seeds_reproducible_and_global_rng_untouched():
    arch = ntkit.mlp(2, 32, input_dim=5)
    state = torch.random.get_rng_state()
    a, b, c = arch.init(seed=3), arch.init(seed=3), arch.init(seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (_, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q)
        assert not torch.equal(p, r)


def test_orthogonal_weights_are_orthogonal():
    net = ntkit.mlp(2, 64, input_dim=16).init(seed=0, init="orthogonal")
    hidden = net.body[2].weight  # 64 x 64
    torch.testing.assert_close(hidden @ hidden.T, 64 * torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-10)
    first = net.body[0].weight  # 64 x 16: orthogonal columns
    torch.testing.assert_close(first.T @ first, 64 * torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-10)


def test_widths_frozen_layers_and_vector_output():
    arch = ntkit.mlp(3, activation="relu", fixed_layers=2, input_dim=4)
    net = arch.init([10, 20, 30], seed=0, out_dim=3, dtype=torch.float32)
    dense = [m for m in net.modules() if isinstance(m, ntkit.kernels.DenseModule)]
    assert [d.out_features for d in dense] == [10, 20, 30, 3]
    assert [d.weight.requires_grad for d in dense] == [False, False, True, True]
    y = net(torch.randn(5, 4))
    assert y.shape == (5, 3) and y.dtype == torch.float32
    with pytest.raises(ValueError, match="expects 4 input features"):
        net(torch.randn(5, 3))
    assert net.architecture.to_config()["layers"][0]["out_dim"] == 10
