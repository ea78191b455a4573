"""Orthogonal and Gaussian twins: the same infinite-width limit, and a difference that falls with width.

Huang, Du & Xu (IJCAI 2021) show that Haar-orthogonal and i.i.d. Gaussian weights give the same NTK at infinite
width (dense, residual and -- weights shared across time -- recurrent nets). Delta-orthogonal convolutions
(Xiao et al. 2018, Alg. 2: an orthogonal matrix at the centre tap, zeros elsewhere) are different: their twin is
not the ordinary Gaussian CNN but a Gaussian CNN whose filter variance sits on the centre tap (Xiao et al.'s
variance profile v = delta: centre tap N(0, F) per entry -- the delta-orthogonal centre tap's per-entry variance --,
the other taps 0 but trainable), and the common limit is ``arch.kernel(x, init="orthogonal")``.

For each family, over S seeds per width:

* at width 512 the mean of each twin's empirical NTK is within Z SE + b of the exact limit for every entry (SE the
  standard error over the seeds, CLT; Z = 4.5, a Bonferroni bound over the <= 21 distinct entries at family-wise
  level ~1e-4 with room for the t distribution; b = depth / width max|K| for the O(depth / width) bias of the
  mean kernel) -- for each twin and for both twins' samples pooled --, and the pooled statistic rejects a
  limit 20% off (so the test can fail);
* the RMS difference between the orthogonal and the Gaussian twin's empirical NTKs (independent draws at the
  same width) falls like width^-1/2 over four widths 64-512: each twin fluctuates around the common limit by
  O(width^-1/2), so their difference does too, while two different limits would leave it flat. The fitted
  log-log slope over the mean of the seeds per width has a standard error of about 0.1 here; we require
  -0.85 < slope < -0.25 (a constant offset of 5% of the kernel would give a slope above -0.2 at these widths),
  and a fall by at least 2x from width 64 to 512 (the expected factor is sqrt(8) = 2.8).
"""

import math

import numpy as np
import pytest
import torch

import ntkit
from ntkit.empirical import empirical_ntk
from ntkit.kernels import ConvModule
from ntkit.kernels.recurrent import RNN

Z = 4.5
WIDTHS = (64, 128, 256, 512)


def _centre_tap_gaussian(net):
    """Turn a Gaussian-initialised twin into the centre-tap Gaussian twin in place: every conv filter keeps a
    Gaussian centre tap scaled to per-entry variance F (the delta-orthogonal centre tap's), its other taps
    become 0 (still trainable, as in the delta-orthogonal twin)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, ConvModule):
                w = m.weight
                centre = (slice(None), slice(None), *(f // 2 for f in m.filter_shape))
                tap = w[centre].clone() * math.sqrt(math.prod(m.filter_shape))
                w.zero_()
                w[centre] = tap
    return net


def _conv():
    return ntkit.serial(ntkit.Conv(None, (3, 3), padding="SAME", W_std=1.5, b_std=0.2), ntkit.Relu(),
                        ntkit.Conv(None, (3, 3), padding="SAME", W_std=1.4, b_std=0.1), ntkit.Relu(),
                        ntkit.GlobalAvgPool(), ntkit.Dense(None, 1.2, 0.1))


def _conv1d():
    return ntkit.serial(ntkit.Conv(None, (3,), padding="SAME", W_std=1.5, b_std=0.2), ntkit.Erf(),
                        ntkit.Conv(None, (3,), padding="SAME", W_std=1.4, b_std=0.1), ntkit.Erf(),
                        ntkit.GlobalAvgPool(), ntkit.Dense(None, 1.2, 0.1))


def _signals():
    return torch.randn((3, 5, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _dense():
    return ntkit.mlp(2, activation="relu", W_std=1.5, b_std=0.2)


def _residual():
    return ntkit.serial(ntkit.Dense(None, 1.2, 0.1), ntkit.residual(ntkit.Relu(), ntkit.Dense(None, 1.0, 0.1)),
                        ntkit.Relu(), ntkit.Dense(1, 1.0, 0.0))


def _recurrent():
    return ntkit.serial(RNN(None, W_std=1.3, U_std=1.1, b_std=0.4, activation=ntkit.Erf(), readout="mean"),
                        ntkit.Dense(None, W_std=1.2, b_std=0.2))


def _images():
    return torch.randn((3, 3, 3, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _rows():
    x = torch.randn((5, 5), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x[1] = 2.0 * x[0]
    return x


def _sequences():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(t, 3, generator=g, dtype=torch.float64) for t in (3, 6, 4, 1)]


# name: (architecture, inputs, in_features, depth for the bias allowance, Gaussian twin, (seeds below 512, at 512))
FAMILIES = {
    "conv-delta-orthogonal": (_conv1d, _signals, (5, 2), 3, _centre_tap_gaussian, (8, 6)),
    "dense": (_dense, _rows, 5, 2, None, (8, 8)),
    "residual-dense": (_residual, _rows, 5, 3, None, (8, 8)),
    "recurrent": (_recurrent, _sequences, 3, 6, None, (4, 6)),
}


def _twins(name, width, seed):
    make, inputs, in_f, _, gauss_fix, _ = FAMILIES[name]
    x = inputs()
    orth = make().init(width, seed=seed, init="orthogonal", in_features=in_f, out_dim=1)
    gauss = make().init(width, seed=10_000 + seed, in_features=in_f, out_dim=1)
    if gauss_fix is not None:
        gauss = gauss_fix(gauss)
    return empirical_ntk(orth, x), empirical_ntk(gauss, x)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_orthogonal_and_gaussian_twins_share_the_limit_and_their_difference_falls(name, single_thread):
    make, inputs, _, depth, _, seeds = FAMILIES[name]
    x = inputs()
    limit = make().kernel(x, get="ntk", init="orthogonal")
    if name != "conv-delta-orthogonal":  # dense, residual and recurrent twins: the Gaussian limit itself
        torch.testing.assert_close(limit, make().kernel(x, get="ntk"), rtol=0, atol=0)
    diffs, top = [], None
    for width in WIDTHS:
        pairs = [_twins(name, width, s) for s in range(seeds[width == WIDTHS[-1]])]
        scale = float(limit.pow(2).mean().sqrt())
        diffs.append(np.mean([float((a - b).pow(2).mean().sqrt()) / scale for a, b in pairs]))
        top = pairs
    # both twins' means at the top width sit on the common limit (CLT), and a 5% wrong limit is rejected
    width = WIDTHS[-1]
    bias = depth / width * float(limit.abs().max())
    for twin, stack in (("orthogonal", [p[0] for p in top]), ("gaussian", [p[1] for p in top]),
                        ("pooled", [k for p in top for k in p])):
        stack = torch.stack(stack)
        mean, se = stack.mean(0), stack.std(0) / math.sqrt(stack.shape[0])
        excess = float(((mean - limit).abs() - (Z * se + bias)).max())
        assert excess <= 0, f"{name} {twin} twin: the mean over seeds misses the limit by {excess:.3g} beyond Z SE + b"
    wrong = float(((mean - 1.2 * limit).abs() - (Z * se + bias)).max())
    assert wrong > 0, f"{name}: a limit 20% off is not rejected by both twins' pooled mean (the test could not fail)"
    slope = np.polyfit(np.log(WIDTHS), np.log(diffs), 1)[0]
    assert -0.85 < slope < -0.25, f"{name}: |orthogonal - gaussian| ~ width^{slope:.2f} (relative RMS {diffs})"
    assert diffs[0] > 2.0 * diffs[-1], f"{name}: the difference fell only {diffs[0] / diffs[-1]:.2f}x (64 -> 512)"


def test_delta_orthogonal_limit_in_2d_is_the_centre_tap_one_not_the_cntk(single_thread):
    """2-D images (the 1-D family above is the fast one): at width 512 the centre-tap Gaussian CNN's mean
    empirical NTK sits on kernel(init="orthogonal") -- as the delta-orthogonal twin's does
    (tests/kernels/test_conv_montecarlo.py) --, while the ordinary Gaussian CNN (all taps N(0, 1)) is many
    standard errors from it and on the Gaussian CNTK: the centre-tap twin is the right Gaussian counterpart."""
    x = _images()
    orth_limit = _conv().kernel(x, get="ntk", init="orthogonal")
    cntk = _conv().kernel(x, get="ntk")
    bias = 3 / 512 * float(orth_limit.abs().max())

    def mc(fix):
        nets = [_conv().init(512, seed=s, in_features=(3, 3, 2), out_dim=1) for s in range(4)]
        stack = torch.stack([empirical_ntk(fix(net), x) for net in nets])
        return stack.mean(0), stack.std(0) / math.sqrt(stack.shape[0])

    mean, se = mc(_centre_tap_gaussian)
    assert float(((mean - orth_limit).abs() - (Z * se + bias)).max()) <= 0
    mean, se = mc(lambda net: net)
    assert float(((mean - orth_limit).abs() / se).max()) > 8
    assert float(((mean - cntk).abs() - (Z * se + bias)).max()) <= 0
