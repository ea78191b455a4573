"""Finite-width behaviour of the empirical NTK of ntkit's finite twins (NTK parameterization).

* Theta_0 approaches the analytic Theta_inf as width grows, and its seed-to-seed fluctuation falls like
  width^-1/2 (Jacot et al. 2018, Thm. 1; Hanin & Nica 2019).
* Under full-batch gradient descent the relative kernel drift ||Theta_T - Theta_0|| / ||Theta_0|| falls
  like width^-1/2 (Jacot et al. 2018, Thm. 2; Lee et al. 2019, Thm. 2.1).

Slopes are fitted by least squares on log-log points; the tolerance is 3 standard errors of the fitted
slope (from the residuals) plus 0.1 for the subleading O(1/width) corrections at these small widths.
"""

import math

import numpy as np
import torch

import ntkit
from ntkit.empirical import KernelTracker, empirical_ntk, monte_carlo_kernel

WIDTHS = [64, 128, 256, 512, 1024]


def _fit_slope(widths, values):
    lx, ly = np.log(widths), np.log(values)
    A = np.vstack([lx, np.ones_like(lx)]).T
    coef, res, *_ = np.linalg.lstsq(A, ly, rcond=None)
    dof = len(lx) - 2
    sigma2 = float(res[0]) / dof if len(res) and dof > 0 else 0.0
    se = math.sqrt(sigma2 / float(((lx - lx.mean()) ** 2).sum()))
    return float(coef[0]), se


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(8, 4, generator=g, dtype=torch.float64)


def test_fluctuations_fall_like_inverse_sqrt_width():
    arch = ntkit.mlp(2, activation="relu", W_std=1.5, b_std=0.1)
    x = _inputs()
    exact = arch.kernel(x, get="ntk")
    fluct, err_mean = [], []
    for w in WIDTHS:
        mc = monte_carlo_kernel(arch, x, width=w, seeds=16, get="ntk")
        sd = mc.samples.std(0)
        fluct.append(float(sd.norm() / exact.norm()))
        err_mean.append(float((mc.mean - exact).norm() / exact.norm()))
    slope, se = _fit_slope(WIDTHS, fluct)
    assert abs(slope + 0.5) <= 3 * se + 0.1, (slope, se, fluct)
    # the mean over seeds approaches the analytic kernel: at the widest width within 4 standard errors
    # of the Monte Carlo mean (sd / sqrt(16)), and much closer than at the narrowest
    assert err_mean[-1] < 4 * fluct[-1] / math.sqrt(16)
    assert err_mean[-1] < err_mean[0] / 2  # expected ratio ~4 (sqrt(1024/64)); /2 leaves room for noise


def test_kernel_drift_under_gradient_descent_falls_like_inverse_sqrt_width():
    x = _inputs()
    y = torch.sin(x.sum(1, keepdim=True))
    arch = ntkit.mlp(2, activation="relu", W_std=1.4, b_std=0.1)
    widths = [128, 256, 512, 1024, 2048]
    drifts = []
    for w in widths:
        per_seed = []
        for seed in range(3):
            net = arch.init(w, seed=seed, in_features=4)
            tracker = KernelTracker(net, x, every=40)
            opt = torch.optim.SGD(net.parameters(), lr=0.5)
            for step in range(41):
                tracker(step)
                loss = 0.5 * ((net(x) - y) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            per_seed.append(tracker.history["drift"][-1])
        drifts.append(float(np.mean(per_seed)))
    slope, se = _fit_slope(widths, drifts)
    assert abs(slope + 0.5) <= 3 * se + 0.1, (slope, se, drifts)


def test_tracker_alignment_with_the_analytic_limit():
    arch = ntkit.mlp(2, activation=ntkit.Erf(), W_std=1.3, b_std=0.1)
    x = _inputs()
    narrow = KernelTracker(arch.init(32, seed=0, in_features=4), x)
    wide = KernelTracker(arch.init(2048, seed=0, in_features=4), x)
    narrow.record(0)
    wide.record(0)
    hn, hw = narrow.history, wide.history
    assert hw["distance_to_limit"][0] < hn["distance_to_limit"][0]
    assert hw["alignment_with_limit"][0] > 0.99
    torch.testing.assert_close(wide.limit, arch.kernel(x, get="ntk"))


def test_monte_carlo_kernel_matches_exact_nngp_and_ntk():
    # CLT: each entry's |mean - exact| / stderr is ~N(0,1); 4.5 bounds the max over 36 entries (two kernels)
    # with family-wise level ~1e-4, plus the O(depth/width) finite-width bias allowance
    arch = ntkit.mlp(1, activation="relu", W_std=1.4, b_std=0.2)
    x = _inputs()[:6]
    mc = monte_carlo_kernel(arch, x, width=1024, seeds=24, out_dim=16)
    k = arch.kernel(x)
    for name in ("nngp", "ntk"):
        exact = getattr(k, name)
        z = (mc[name].mean - exact).abs() - (1 / 1024) * exact.abs().max()
        assert float((z / mc[name].stderr).max()) <= 4.5


def test_structured_is_fast_on_an_mlp():
    # not a timing assertion (machines are noisy): the structured path must not form the Jacobian,
    # checked through its documented memory model being far below the Jacobian's
    from ntkit.empirical import peak_memory_estimate

    n, k, p, width_sum = 256, 1, 784 * 512 + 2 * 512 * 512 + 512, 3 * 512 * 2 + 784
    assert peak_memory_estimate("structured", n, n, k, p, width_sum) * 50 < peak_memory_estimate("jacobian", n, n, k, p,
                                                                                                  width_sum)
