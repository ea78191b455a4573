"""NTKSketch: non-negative polynomial fits of the arc-cosine duals, convergence to arch.kernel, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ntkit
from ntkit.features import NTKSketch, arccos_polynomials

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
