"""ntkit.empirical.width_scaling: fluctuations ~ width^-1/2 and the relative second moment of the diagonal NTK.

References are independent of the implementation: the closed form E[|h_d|^4] / E[|h_d|^2]^2 = (1 + 5/n)^d of a
bias-free He-initialized ReLU network's last hidden layer (each layer of n units multiplies it by
1 + 5/n, since E[relu(z)^4] / E[relu(z)^2]^2 = 6), which is the ratio of the readout-weight NTK (2/n)|h_d|^2;
the CLT standard error of a seed mean for the jackknife; numpy's least squares for the line fit.
"""

import math

import numpy as np
import pytest
import torch

import ntkit
from ntkit.empirical import width_scaling
from ntkit.empirical.scaling import fit_line, jackknife


def test_fit_line_matches_least_squares_and_recovers_a_line():
    rng = np.random.default_rng(0)
    x = np.linspace(0, 1, 12)
    y = 0.3 + 2.0 * x + 0.01 * rng.standard_normal(12)
    f = fit_line(x, y)
    coef, cov = np.polyfit(x, y, 1, cov=True)
    assert f.slope == pytest.approx(coef[0], rel=1e-12) and f.intercept == pytest.approx(coef[1], rel=1e-12)
    assert f.stderr == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-9)
    exact = fit_line([1.0, 2.0, 3.0], [1.0, 3.0, 5.0], [0.1, 0.1, 0.1])
    assert exact.slope == pytest.approx(2.0) and exact.intercept == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="line fit"):
        fit_line([1.0], [2.0])


def test_jackknife_of_a_mean_is_the_clt_standard_error():
    s = torch.randn(50, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    val, se = jackknife(s, lambda t: t[:, 0].mean())
    assert val == pytest.approx(float(s[:, 0].mean()))
    assert se == pytest.approx(float(s[:, 0].std() / math.sqrt(50)), rel=1e-10)


def test_fluctuations_fall_like_inverse_sqrt_width(single_thread):
    arch = ntkit.mlp(2, activation="relu", W_std=2**0.5, b_std=0.1)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ws = width_scaling(arch, x, [32, 64, 128, 256], seeds=12, implementation="jacobian")
    f = ws.fluctuation_fit
    assert ws.depth == 2 and ws.seeds == 12 and ws.fluctuation.shape == (4,)
    assert np.all(np.diff(ws.fluctuation) < 0)
    assert abs(f.slope + 0.5) <= 3 * f.stderr, f
    assert f.stderr < 0.2  # the errors are informative, not a free pass
    # the seed mean is close to the exact kernel: within a few seed standard errors of the whole matrix
    assert ws.bias[-1] < 4 * ws.fluctuation[-1] / math.sqrt(12) + 1e-3


def test_readout_moment_ratio_matches_the_closed_form(single_thread):
    d, n = 2, 24
    arch = ntkit.mlp(d, activation="relu", W_std=2**0.5, b_std=None)
    x = torch.randn(1, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ws = width_scaling(arch, x, [n, 2 * n], seeds=150, params=[f"body.{2 * d}.weight"], implementation="jacobian")
    exact = np.array([(1 + 5 / n) ** d, (1 + 5 / (2 * n)) ** d])
    z = np.abs(ws.moment_ratio - exact) / ws.moment_ratio_stderr
    assert np.all(z < 4), (ws.moment_ratio, ws.moment_ratio_stderr, exact)
    # and a wrong law (no finite-width correction, ratio 1) is rejected by the same errors
    assert np.all(np.abs(ws.moment_ratio - 1) / ws.moment_ratio_stderr > 4)


def test_width_scaling_rejects_bad_input():
    arch = ntkit.mlp(1, activation="relu")
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least 3 seeds"):
        width_scaling(arch, x, [8, 16], seeds=2)
    with pytest.raises(ValueError, match="two distinct"):
        width_scaling(arch, x, [8], seeds=4)
    std = ntkit.mlp(1, activation="relu", parameterization="standard")
    with pytest.raises(ValueError, match="NTK parameterization"):
        width_scaling(std, x, [8, 16], seeds=4)
