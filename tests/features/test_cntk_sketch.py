"""CNTKSketch: feature inner products converge to the exact CNTK-GAP / CNN-GP of arch.kernel (slope -1/2 in
n_components, from a fit with its standard error), are unbiased with one conv layer (CLT bounds over seeds),
are exact without activations (every conv / pooling geometry), the transformer contract and clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import ntkit
from ntkit.features import CNTKSketch

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(7)
    return torch.randn(8, 6, 6, 2, generator=g, dtype=torch.float64)


def cnn(depth, b_std=0.1, act=None, W_std=2**0.5):
    layers = []
    for _ in range(depth):
        layers += [ntkit.Conv(None, (3, 3), W_std=W_std, b_std=b_std), act or ntkit.Relu()]
    return ntkit.serial(*layers, ntkit.GlobalAvgPool(), ntkit.Dense(1, W_std, b_std))


def _rel_err(arch, x, kernel, m, seed, exact=None):
    f = CNTKSketch(arch, m, kernel=kernel, random_state=seed).fit_transform(x)
    k = arch.kernel(x, get=kernel) if exact is None else exact
    return float((f @ f.T - k).norm() / k.norm())


@pytest.mark.parametrize("kernel", ["ntk", "nngp"])
def test_error_decays_like_inverse_sqrt_m(images, kernel):
    """Depth 2 on 6x6x2 images: log(relative Frobenius error) vs log(m) over 3 values of m and 6 seeds each;
    the fitted slope is -1/2 within 4 standard errors of the fit (plus 0.05 for the O(1/m) bias of depth 2)."""
    arch = cnn(2)
    k = arch.kernel(images, get=kernel)
    ms = [64, 256, 1024]
    logm, loge = [], []
    for m in ms:
        for seed in range(6):
            logm.append(math.log(m))
            loge.append(math.log(_rel_err(arch, images, kernel, m, seed, k)))
    fit = stats.linregress(logm, loge)
    assert abs(fit.slope + 0.5) < 4 * fit.stderr + 0.05, (fit.slope, fit.stderr, np.exp(loge))
    assert fit.stderr < 0.15  # the check has power: the slope is pinned down to about +-0.45
    assert math.exp(np.mean(loge[-6:])) < 0.1  # geometric mean error at m = 1024


def _z_scores(arch, x, kernel, m, seeds):
    k = arch.kernel(x, get=kernel)
    est = torch.stack([(lambda f: f @ f.T)(CNTKSketch(arch, m, kernel=kernel, random_state=s).fit_transform(x))
                       for s in range(seeds)])
    mean, se = est.mean(0), est.std(0) / math.sqrt(seeds)
    iu = torch.triu_indices(k.shape[0], k.shape[0])
    return ((mean - k) / se)[iu[0], iu[1]], mean, se, k


@pytest.mark.parametrize("kernel,b_std", [("ntk", 0.3), ("ntk", 0.0), ("nngp", 0.3)])
def test_unbiased_one_conv_layer(images, kernel, b_std):
    """One Conv + ReLU, GAP, Dense: each feature step is unbiased, so the mean over S seeds is within
    5 standard errors (estimated from the seeds) of the exact kernel; a 10% bias would not be."""
    arch = cnn(1, b_std=b_std, W_std=1.3)
    z, mean, se, k = _z_scores(arch, images[:5], kernel, 48, 150)
    assert float(z.abs().max()) < 5.0, float(z.abs().max())
    assert float(((mean - 1.1 * k) / se).abs().max()) > 5.0


@pytest.mark.parametrize("layers,shape", [
    ([ntkit.Conv(None, (3, 3), W_std=1.3, b_std=0.2)], (6, 6, 2)),
    ([ntkit.Conv(None, (3, 3), W_std=1.3, b_std=0.2), ntkit.Conv(None, (2, 3), strides=(2, 1), padding="VALID",
                                                                 W_std=0.9, b_std=0.1)], (6, 6, 2)),
    ([ntkit.Conv(None, (3, 3), W_std=1.1, b_std=None, trainable=False), ntkit.AvgPool((2, 2), padding="SAME"),
      ntkit.Conv(None, (4, 2), W_std=0.8, b_std=0.4)], (5, 6, 3)),
    ([ntkit.Conv(None, (3,), W_std=1.2, b_std=0.3), ntkit.AvgPool((2,), strides=(2,)),
      ntkit.Conv(None, (5,), padding="SAME", W_std=0.7, b_std=0.0)], (9, 2)),
])
@pytest.mark.parametrize("kernel", ["ntk", "nngp"])
def test_exact_without_activations(layers, shape, kernel):
    """Without activations the construction has no randomness: the patch concatenation (conv), window
    mean (AvgPool), pixel mean (GAP) and readout reproduce arch.kernel to rounding, for every padding,
    stride, filter shape, frozen layer and 1-D signals -- the normalisation is ntkit's exactly."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, *shape, generator=g, dtype=torch.float64)
    arch = ntkit.serial(*layers, ntkit.GlobalAvgPool(), ntkit.Dense(1, 1.4, 0.25))
    f = CNTKSketch(arch, 10, kernel=kernel).fit_transform(x)
    torch.testing.assert_close(f @ f.T, arch.kernel(x, get=kernel), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", ["ntk", "nngp"])
def test_one_dimensional_relu_family_and_dense_head(kernel):
    """1-D signals, LeakyRelu, a frozen conv, an AvgPool and a Dense + ReLU head after the pooling: the mean
    error over 3 seeds at m = 1024 is at the 1/sqrt(m) scale seen above (about 0.1; a wrong factor in any
    layer's normalisation gives O(1))."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 10, 3, generator=g, dtype=torch.float64)
    act = ntkit.LeakyRelu(0.2)
    arch = ntkit.serial(ntkit.Conv(None, (3,), W_std=1.4, b_std=0.2, trainable=False), act,
                        ntkit.AvgPool((2,), strides=(2,)), ntkit.Conv(None, (3,), W_std=1.4, b_std=0.2), act,
                        ntkit.GlobalAvgPool(), ntkit.Dense(None, 1.3, 0.1), ntkit.Relu(), ntkit.Dense(1, 1.0, 0.1))
    errs = [_rel_err(arch, x, kernel, 1024, s) for s in range(3)]
    assert np.mean(errs) < 0.15, errs


def test_transformer_contract(images):
    arch = cnn(2)
    cs = CNTKSketch(arch, 300, random_state=3).fit(images)
    assert cs.n_components_ == 300 and cs.input_shape_ == (6, 6, 2)
    full = cs.transform(images)
    assert isinstance(full, torch.Tensor) and full.dtype == torch.float64 and full.shape == (8, 300)
    batched = CNTKSketch(arch, 300, random_state=3, batch_size=3).fit(images).transform(images)
    torch.testing.assert_close(batched, full, rtol=1e-12, atol=1e-12)
    chunks = [f for _, f in CNTKSketch(arch, 300, random_state=3, batch_size=3).fit(images).iter_transform(images)]
    assert [len(c) for c in chunks] == [3, 3, 2]
    npy = cs.transform(images.numpy())
    assert isinstance(npy, np.ndarray) and npy.dtype == np.float64
    np.testing.assert_allclose(npy, full.numpy(), rtol=1e-12, atol=1e-12)
    f32 = CNTKSketch(arch, 300, random_state=3, dtype="float32").fit(images).transform(images)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), full, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(CNTKSketch(arch, 300, random_state=3).fit_transform(images), full, rtol=0, atol=0)
    assert not torch.allclose(CNTKSketch(arch, 300, random_state=4).fit_transform(images), full)
    assert CNTKSketch(arch, 100, kernel="nngp", random_state=0).fit_transform(images).shape == (8, 100)
    # a memory budget of a few images gives the same features in several batches
    small = CNTKSketch(arch, 300, random_state=3, memory_budget=3 * cs._row_bytes() * 8).fit(images)
    assert small._batch_rows(8, 8, images.device) == 3
    torch.testing.assert_close(small.transform(images), full, rtol=1e-12, atol=1e-12)


def test_bad_input(images):
    arch = cnn(1)
    with pytest.raises(ValueError, match="n_components must be a positive integer"):
        CNTKSketch(arch, 0).fit(images)
    cs = CNTKSketch(arch, 64, random_state=0)
    with pytest.raises(RuntimeError, match="not fitted"):
        cs.transform(images)
    cs.fit(images)
    bad = images.clone()
    bad[2, 1, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="row 2 contains NaN"):
        cs.transform(bad)
    with pytest.raises(ValueError, match=r"shape \(5, 5, 2\).*fitted on samples of shape \(6, 6, 2\)"):
        cs.transform(images[:, :5, :5])
    with pytest.raises(ValueError, match=r"takes images \(n, H, W, C\)"):
        CNTKSketch(arch, 64).fit(images.reshape(8, -1))
    with pytest.raises(ValueError, match="too small"):
        CNTKSketch(arch, 2).fit(images)
    with pytest.raises(ValueError, match="kernel must be"):
        CNTKSketch(arch, 64, kernel="rbf").fit(images)
    with pytest.raises(ValueError, match="working memory"):
        CNTKSketch(arch, 64, memory_budget=100).fit(images).transform(images)
    conv = ntkit.Conv(None, (3, 3), W_std=1.0, b_std=0.1)
    unsupported = [
        (ntkit.serial(conv, ntkit.Relu(), ntkit.Flatten(), ntkit.Dense(1)), r"layer 2.*'flatten'.*before global_avg"),
        (ntkit.serial(conv, ntkit.Erf(), ntkit.GlobalAvgPool(), ntkit.Dense(1)), r"layer 1.*'erf'.*supported: conv"),
        (ntkit.serial(conv, ntkit.Relu(), ntkit.Dense(4), ntkit.GlobalAvgPool(), ntkit.Dense(1)),
         r"layer 2.*'dense'.*spatial activations"),
        (ntkit.serial(conv, ntkit.Relu(), ntkit.Dense(1)), r"layer 2.*'dense'"),
        (ntkit.serial(ntkit.Relu(), conv, ntkit.GlobalAvgPool(), ntkit.Dense(1)), "raw input"),
        (ntkit.serial(conv, ntkit.Relu(), ntkit.GlobalAvgPool()), "no Dense readout"),
        (ntkit.serial(conv, ntkit.Relu(), ntkit.GlobalAvgPool(), ntkit.Dense(1), ntkit.GlobalAvgPool()),
         r"layer 4.*'global_avg_pool'.*after global_avg_pool"),
    ]
    for bad_arch, msg in unsupported:
        with pytest.raises(ntkit.ConfigError, match=msg):
            CNTKSketch(bad_arch, 64).fit(images)
    with pytest.raises(ntkit.ConfigError, match="parameterization"):
        CNTKSketch(ntkit.serial(*cnn(1).layers, parameterization="standard"), 64).fit(images)
    with pytest.raises(ValueError, match="do not fit layer.*VALID padding needs inputs of at least 7"):
        CNTKSketch(ntkit.serial(ntkit.Conv(None, (7, 7), padding="VALID"), ntkit.Relu(), ntkit.GlobalAvgPool(),
                                ntkit.Dense(1)), 64).fit(images)
