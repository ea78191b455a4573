"""NTKRandomFeatures: inner products converge to arch.kernel (slope -1/2), unbiased at one hidden layer,
the transformer contract (numpy/torch, dtypes, batches) and clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ntkit
from ntkit.features import NTKRandomFeatures

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def x():
    g = torch.Generator().manual_seed(1)
    return torch.randn(30, 6, generator=g, dtype=torch.float64)


def _rel_err(arch, x, kernel, m, seed, **kw):
    f = NTKRandomFeatures(arch, m, kernel=kernel, random_state=seed, **kw).fit_transform(x)
    k = arch.kernel(x, get=kernel)
    return float((f @ f.T - k).norm() / k.norm())


@pytest.mark.parametrize("depth,b_std,kernel", [(1, 0.0, "ntk"), (1, 0.5, "ntk"), (2, 0.2, "nngp"),
                                                (3, 0.2, "ntk")])
def test_error_decays_like_inverse_sqrt_m(x, depth, b_std, kernel):
    arch = ntkit.mlp(depth, W_std=2**0.5, b_std=b_std)
    ms = [128, 512, 2048]
    errs = [np.mean([_rel_err(arch, x[:20], kernel, m, s) for s in range(3)]) for m in ms]
    slope = np.polyfit(np.log(ms), np.log(errs), 1)[0]
    assert -0.7 < slope < -0.35, (errs, slope)
    assert errs[-1] < 0.2


def _z_scores(arch, x, kernel, m, seeds, **kw):
    k = arch.kernel(x, get=kernel)
    est = torch.stack([(lambda f: f @ f.T)(NTKRandomFeatures(arch, m, kernel=kernel, random_state=s, **kw)
                                           .fit_transform(x)) for s in range(seeds)])
    mean, se = est.mean(0), est.std(0) / math.sqrt(seeds)
    iu = torch.triu_indices(k.shape[0], k.shape[0])
    return ((mean - k) / se)[iu[0], iu[1]], mean, se, k


@pytest.mark.parametrize("kernel,sampling,b_std", [("ntk", "gaussian", 0.4), ("ntk", "leverage", 0.0),
                                                   ("nngp", "gaussian", 0.4), ("ntk", "orthogonal", 0.4),
                                                   ("ntk", "orthogonal", 0.0), ("nngp", "orthogonal", 0.4)])
def test_unbiased_one_hidden_layer(x, kernel, sampling, b_std):
    arch = ntkit.mlp(1, W_std=1.3, b_std=b_std)
    xs = x[:8]
    z, mean, se, k = _z_scores(arch, xs, kernel, 64, 150, sampling=sampling)
    assert float(z.abs().max()) < 5.0, float(z.abs().max())
    # the check has power: a 20% bias is many standard errors away
    z_biased = ((mean - 1.2 * k) / se)
    assert float(z_biased.abs().max()) > 5.0


def test_unbiased_orthogonal_for_the_relu_family(x):
    arch = ntkit.serial(ntkit.Dense(None, 1.2, 0.2), ntkit.ABRelu(-0.5, 2.0), ntkit.Dense(1, 1.0, 0.1))
    z, mean, se, k = _z_scores(arch, x[:8], "ntk", 64, 150, sampling="orthogonal")
    assert float(z.abs().max()) < 5.0, float(z.abs().max())
    assert float(((mean - 1.2 * k) / se).abs().max()) > 5.0


def test_orthogonal_directions():
    from ntkit.features._random_features import orthogonal_gaussian
    g = torch.Generator().manual_seed(0)
    w = orthogonal_gaussian(7, 31, g)
    assert w.shape == (7, 31)
    half = w[:, :16]
    torch.testing.assert_close(w[:, 16:], -half[:, :15], rtol=0, atol=0)  # antithetic pairs
    q = half[:, :7] / half[:, :7].norm(dim=0)  # one block: orthonormal directions
    torch.testing.assert_close(q.T @ q, torch.eye(7, dtype=torch.float64), rtol=0, atol=1e-12)
    # blocks narrower than p for large p: (p, k) frames
    w = orthogonal_gaussian(300, 600, g, block=64)
    blk = w[:, :64] / w[:, :64].norm(dim=0)
    torch.testing.assert_close(blk.T @ blk, torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-12)
    # every direction is N(0, I): first and second moments over many draws (CLT bounds); the first moments
    # see the signs of the frames (without the sign fix of the QR, w[0, 0] <= 0 always)
    ws = torch.cat([orthogonal_gaussian(5, 40, g)[:, :20] for _ in range(500)], 1)  # 10 000 directions
    cov = ws @ ws.T / ws.shape[1]
    assert float((cov - torch.eye(5, dtype=torch.float64)).abs().max()) < 5 * math.sqrt(2 / ws.shape[1])
    first = torch.stack([orthogonal_gaussian(5, 5, g, antithetic=False)[:, 0] for _ in range(2000)])
    assert float(first.mean(0).abs().max()) < 5 / math.sqrt(2000)
    assert abs(float((first[:, 0] > 0).double().mean()) - 0.5) < 5 * 0.5 / math.sqrt(2000)
    # without pairs: all m columns in orthogonal frames
    w = orthogonal_gaussian(4, 8, g, antithetic=False)
    q = w[:, 4:] / w[:, 4:].norm(dim=0)
    torch.testing.assert_close(q.T @ q, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)


def test_orthogonal_sampling_lowers_the_error_on_low_dimensional_inputs():
    g = torch.Generator().manual_seed(2)
    x32 = torch.randn(200, 32, generator=g, dtype=torch.float64)
    arch = ntkit.mlp(1, W_std=2**0.5, b_std=0.1)
    err = {s: np.mean([_rel_err(arch, x32, "nngp", 2048, seed, sampling=s) for seed in range(3)])
           for s in ("gaussian", "orthogonal")}
    # measured 2.4x lower on the NNGP part for 1500 such points (benchmarks/RESULTS.md)
    assert err["orthogonal"] < 0.6 * err["gaussian"], err
    # an even activation (Abs) takes no antithetic pairs: they would repeat each feature; still no worse
    abs_arch = ntkit.mlp(1, W_std=2**0.5, b_std=0.1, activation=ntkit.Abs())
    err_abs = {s: np.mean([_rel_err(abs_arch, x32[:100], "ntk", 1024, seed, sampling=s) for seed in range(3)])
               for s in ("gaussian", "orthogonal")}
    assert err_abs["orthogonal"] < 1.05 * err_abs["gaussian"], err_abs
    f = NTKRandomFeatures(abs_arch, 1024, kernel="nngp", sampling="orthogonal", random_state=0).fit_transform(x32)
    assert torch.linalg.matrix_rank(f).item() > 150  # not m / 2 repeated columns
    rf = NTKRandomFeatures(arch, 2048, sampling="orthogonal", random_state=0).fit(x32)
    again = NTKRandomFeatures(arch, 2048, sampling="orthogonal", random_state=0).fit(x32)
    torch.testing.assert_close(rf.transform(x32), again.transform(x32), rtol=0, atol=0)


def test_leverage_sampling_lowers_variance_of_first_layer_term(x):
    # the x.x' kappa_0 part of the two-layer NTK (readout frozen: Theta = W^2 Sigma_1 * Sigma_dot)
    arch = ntkit.serial(ntkit.Dense(None, 1.0, 0.0), ntkit.Relu(), ntkit.Dense(1, 1.0, 0.0, trainable=False))
    err = {s: np.mean([_rel_err(arch, x, "ntk", 512, seed, sampling=s) for seed in range(6)])
           for s in ("gaussian", "leverage")}
    assert err["leverage"] < 1.5 * err["gaussian"]  # same order; unbiasedness is checked above


@pytest.mark.parametrize("act", [ntkit.LeakyRelu(0.2), ntkit.ABRelu(-0.5, 2.0)])
def test_relu_family_and_frozen_layers(x, act):
    x = x[:20]
    arch = ntkit.serial(ntkit.Dense(None, 1.5, 0.3, trainable=False), act, ntkit.Dense(None, 1.2, 0.1), act,
                        ntkit.Dense(1, 1.0, 0.2))
    for kernel in ("ntk", "nngp"):
        assert _rel_err(arch, x, kernel, 2048, 0) < 0.2


def test_transformer_contract(x):
    arch = ntkit.mlp(2, W_std=2**0.5, b_std=0.1)
    rf = NTKRandomFeatures(arch, 300, random_state=3).fit(x)
    assert rf.n_components_ == 300 and rf.n_features_in_ == 6
    full = rf.transform(x)
    assert isinstance(full, torch.Tensor) and full.dtype == torch.float64 and full.shape == (30, 300)
    batched = NTKRandomFeatures(arch, 300, random_state=3, batch_size=7).fit(x).transform(x)
    torch.testing.assert_close(batched, full, rtol=1e-12, atol=1e-12)
    npy = rf.transform(x.numpy())
    assert isinstance(npy, np.ndarray) and npy.dtype == np.float64
    np.testing.assert_allclose(npy, full.numpy(), rtol=1e-12, atol=1e-12)
    f32 = NTKRandomFeatures(arch, 300, random_state=3, dtype="float32").fit(x).transform(x)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), full, rtol=1e-4, atol=1e-5)
    # same seed -> same features; another seed -> others
    again = NTKRandomFeatures(arch, 300, random_state=3).fit_transform(x)
    torch.testing.assert_close(again, full, rtol=0, atol=0)
    other = NTKRandomFeatures(arch, 300, random_state=4).fit_transform(x)
    assert not torch.allclose(other, full)
    nngp = NTKRandomFeatures(arch, 100, kernel="nngp", random_state=0).fit_transform(x)
    assert nngp.shape == (30, 100)


def test_bad_input(x):
    arch = ntkit.mlp(1)
    with pytest.raises(ValueError, match="n_components must be a positive integer"):
        NTKRandomFeatures(arch, 0).fit(x)
    rf = NTKRandomFeatures(arch, 64, random_state=0)
    with pytest.raises(RuntimeError, match="not fitted"):
        rf.transform(x)
    rf.fit(x)
    bad = x.clone()
    bad[4, 2] = float("nan")
    with pytest.raises(ValueError, match="row 4 contains NaN"):
        rf.transform(bad)
    with pytest.raises(ValueError, match="features"):
        rf.transform(x[:, :5])
    with pytest.raises(ntkit.ConfigError, match=r"layer 1.*'erf'.*supported: fully-connected"):
        NTKRandomFeatures(ntkit.mlp(1, activation=ntkit.Erf()), 64).fit(x)
    with pytest.raises(ntkit.ConfigError, match="parameterization"):
        NTKRandomFeatures(ntkit.mlp(1, parameterization="standard"), 64).fit(x)
    with pytest.raises(ntkit.ConfigError, match="fanout"):
        NTKRandomFeatures(ntkit.serial(ntkit.Dense(4), ntkit.Relu(),
                                       ntkit.residual(ntkit.Dense(4), ntkit.Relu(), ntkit.Dense(4)),
                                       ntkit.Dense(1)), 64).fit(x)
    with pytest.raises(ValueError, match="too small"):
        NTKRandomFeatures(ntkit.mlp(1, b_std=0.1), 2).fit(x)
    with pytest.raises(ValueError, match="working memory"):
        NTKRandomFeatures(arch, 64, memory_budget=100).fit(x).transform(x)
    # a budget of a few rows gives the same features in more batches
    small = NTKRandomFeatures(arch, 64, random_state=0, memory_budget=64 * 8 * 40).fit(x)
    assert small._batch_rows(30, 8, x.device) < 30
    torch.testing.assert_close(small.transform(x), NTKRandomFeatures(arch, 64, random_state=0).fit_transform(x))
    with pytest.raises(ValueError, match="kernel must be"):
        NTKRandomFeatures(arch, 64, kernel="rbf").fit(x)
    with pytest.raises(ValueError, match="sampling must be one of"):
        NTKRandomFeatures(arch, 64, sampling="sobol").fit(x)

