"""NTKSketch: non-negative polynomial fits of the arc-cosine duals, convergence to arch.kernel, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ntkit
from ntkit.features import NTKRandomFeatures, NTKSketch, arccos_polynomials

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("a,b", [(0.0, 1.0), (0.2, 1.0), (-1.0, 1.0)])
def test_polynomial_fits_are_nonnegative_and_accurate(a, b):
    c, e, err_f, err_d = arccos_polynomials(a, b, 8)
    assert (c >= 0).all() and (e >= 0).all()
    # independent check of the duals by Monte Carlo-free closed forms at a few correlations
    for rho in (-0.9, -0.3, 0.0, 0.5, 0.99, 1.0):
        th = math.acos(rho)
        k = (a - b) ** 2 / (2 * math.pi)
        dd = (a * a + b * b) / 2 - k * th
        f = k * math.sin(th) + dd * rho
        assert abs(np.polyval(c[::-1], rho) - f) < 2e-3
        assert abs(np.polyval(e[::-1], rho) - dd) < 0.08  # D has square-root singularities at +-1
    assert err_f < 2e-3 and err_d < 0.08
    # a higher degree fits better
    assert arccos_polynomials(a, b, 16)[3] < err_d


@pytest.mark.parametrize("depth,b_std,kernel", [(1, 0.0, "ntk"), (2, 0.3, "ntk")])
def test_sketch_converges_to_the_kernel(depth, b_std, kernel):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    arch = ntkit.mlp(depth, W_std=2**0.5, b_std=b_std)
    k = arch.kernel(x, get=kernel)
    ms = [128, 512, 2048]
    errs = []
    for m in ms:
        e = []
        for s in range(3):
            f = NTKSketch(arch, m, kernel=kernel, random_state=s).fit_transform(x)
            assert m - 8 < f.shape[1] <= m
            e.append(float((f @ f.T - k).norm() / k.norm()))
        errs.append(np.mean(e))
    slope = np.polyfit(np.log(ms), np.log(errs), 1)[0]
    assert -0.75 < slope < -0.3, (errs, slope)
    assert errs[-1] < 0.2


def test_sketch_contract_and_errors():
    x = np.random.default_rng(0).standard_normal((10, 5))
    arch = ntkit.mlp(1, b_std=0.1)
    sk = NTKSketch(arch, 200, random_state=0, batch_size=3).fit(x)
    f = sk.transform(x)
    assert isinstance(f, np.ndarray) and f.shape == (10, sk.n_components_)
    np.testing.assert_allclose(NTKSketch(arch, 200, random_state=0).fit_transform(x), f, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="n_components must be a positive integer"):
        NTKSketch(arch, -3).fit(x)
    with pytest.raises(ValueError, match="degree"):
        NTKSketch(arch, 64, degree=0).fit(x)
    with pytest.raises(ntkit.ConfigError, match="gelu"):
        NTKSketch(ntkit.mlp(1, activation="gelu"), 64).fit(x)
    bad = x.copy()
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match="row 2 contains NaN"):
        sk.transform(bad)


def _poly_ntk_one_layer(x, W_std, b_std, c, e):
    """The NTK of ntkit.mlp(1, W_std, b_std) with the ReLU duals replaced by the polynomials sum c_j rho^j
    (NNGP dual) and sum e_j rho^j (derivative dual): what the sketch estimates (Jacot et al. 2018, Thm. 1)."""
    d = x.shape[1]
    w2, b2 = W_std**2, b_std**2
    sig = w2 * (x @ x.T) / d + b2
    q = sig.diagonal()
    sq = torch.sqrt(q[:, None] * q[None, :])
    rho = (sig / sq).clamp(-1, 1)
    fp = sum(float(cj) * rho**j for j, cj in enumerate(c))
    dp = sum(float(ej) * rho**j for j, ej in enumerate(e))
    return w2 * sq * fp + b2 + w2 * sig * dp


def test_one_hidden_layer_sketch_is_unbiased_for_the_polynomial_kernel():
    # E[Phi Phi^T] over the sketch's randomness = the NTK with the fitted polynomials (closed form above)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    arch = ntkit.mlp(1, W_std=2**0.5, b_std=0.2)
    c, e, _, _ = arccos_polynomials(0.0, 1.0, 8)
    k_poly = _poly_ntk_one_layer(x, 2**0.5, 0.2, c, e)
    s = 60
    grams = torch.stack([(lambda f: f @ f.T)(NTKSketch(arch, 96, random_state=i).fit_transform(x)) for i in range(s)])
    z = (grams.mean(0) - k_poly) / (grams.std(0) / math.sqrt(s))
    assert float(z.abs().max()) < 5, z  # CLT: every entry's mean within 5 standard errors
    assert float((grams.std(0) / k_poly.abs()).max()) > 0.01  # it is a random estimate: the test can fail


def test_zero_coefficients_cost_no_features_and_variance_is_below_random_features():
    # the degree-8 fit of the ReLU duals has several zero coefficients; the features of the used degrees are
    # mixed by one SRHT (Zandieh et al. 2021, Alg. 1), so none are spent on them: at equal m the sketch's Gram
    # error is below the random features' (it was ~12% above when the features were split evenly by degree)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(60, 40, generator=g, dtype=torch.float64)  # non-negative inputs, as images
    arch = ntkit.mlp(1, W_std=2**0.5, b_std=0.1)
    k = arch.kernel(x, get="ntk")
    c, e, _, _ = arccos_polynomials(0.0, 1.0, 8)
    assert (c[1:] == 0).any() and (e[1:] == 0).any()

    def err(make):
        return np.mean([float((lambda f: (f @ f.T - k).norm() / k.norm())(make(s).fit_transform(x)))
                        for s in range(6)])

    e_sk = err(lambda s: NTKSketch(arch, 1024, random_state=s))
    e_rf = err(lambda s: NTKRandomFeatures(arch, 1024, random_state=s))
    assert e_sk < 0.9 * e_rf, (e_sk, e_rf)


def _sylvester(k):
    h = torch.ones((1, 1), dtype=torch.float64)
    while h.shape[0] < k:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_block_srht_is_the_srht_of_the_padded_concatenation():
    # independent reference: the explicit Sylvester-Hadamard matrix of the concatenation with every block
    # zero-padded to a power of two, the blocks' signs and the sampled rows (BlockSRHT's docstring)
    from ntkit.features._sketch import BlockSRHT

    g = torch.Generator().manual_seed(3)
    k, dim, m, n = 3, 5, 40, 7
    blocks = [torch.randn(n, dim, generator=g, dtype=torch.float64) for _ in range(k)]
    bs = BlockSRHT(k, dim, m, g)
    got = sum(bs.part(j, z) for j, z in enumerate(blocks))
    B, K = 8, 4  # padded block width, padded number of blocks
    z = torch.zeros(n, K * B, dtype=torch.float64)
    for j, blk in enumerate(blocks):
        z[:, j * B:j * B + dim] = blk * bs.signs[j]
    want = (z @ _sylvester(K * B))[:, bs.rows]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # unbiased for <z, z'> (with the 1 / m of an SRHT): mean over seeds within 5 standard errors
    zz = torch.cat(blocks, 1)
    s = 200
    est = []
    for seed in range(s):
        b2 = BlockSRHT(k, dim, m, torch.Generator().manual_seed(seed))
        f = sum(b2.part(j, z) for j, z in enumerate(blocks))
        est.append(f @ f.T / m)
    est = torch.stack(est)
    zscore = (est.mean(0) - zz @ zz.T) / (est.std(0) / math.sqrt(s))
    assert float(zscore.abs().max()) < 5, zscore
    assert float(est.std(0).max()) > 0.01  # a random estimate: the test can fail


def test_sketch_is_deterministic_per_random_state():
    x = torch.rand(30, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    arch = ntkit.mlp(2, W_std=2**0.5, b_std=0.1)
    a, b, c = (NTKSketch(arch, 256, random_state=s).fit_transform(x) for s in (7, 7, 8))
    assert torch.equal(a, b)  # bit for bit
    assert not torch.allclose(a, c)
