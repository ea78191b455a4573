"""Monte Carlo over wide finite twins: the exact CNTK / CNN-GP kernels are the limit of the empirical ones.

Each check compares the mean over S independently initialised networks (width = channels of every hidden
conv) with the exact kernel, entry by entry, in units of the standard error estimated from the seeds
(CLT; |z| <= 6 with S = 8 seeds is a t-test with 7 degrees of freedom at p ~ 5e-4 per entry, and the
finite-width bias, O(1/width), is far below it at width 512), and checks that the error of one network
falls like width^-1/2 over four widths (fitted log-log slope).
"""

from functools import lru_cache

import numpy as np
import pytest
import torch

import ntkit
from ntkit.empirical import empirical_ntk, monte_carlo_kernel


def _gap():
    return ntkit.serial(ntkit.Conv(None, (3, 3), padding="SAME", W_std=1.5, b_std=0.2), ntkit.Relu(),
                        ntkit.Conv(None, (3, 3), padding="SAME", W_std=1.4, b_std=0.1), ntkit.Relu(),
                        ntkit.GlobalAvgPool(), ntkit.Dense(None, 1.2, 0.1))


def _flatten():
    return ntkit.serial(ntkit.Conv(None, (3, 3), padding="VALID", W_std=1.3, b_std=0.3), ntkit.Erf(1.0, 1.0, 0.1),
                        ntkit.Conv(None, (2, 2), strides=(1, 1), padding="SAME", W_std=1.4, b_std=0.1), ntkit.Relu(),
                        ntkit.Flatten(), ntkit.Dense(None, 1.1, 0.2))


def _mixed_1d():
    # 1-D conv, layer norm, average pooling, a residual block of convs, a VALID conv, erf, GAP
    return ntkit.serial(ntkit.Conv(None, (3,), padding="SAME", W_std=1.3, b_std=0.2), ntkit.LayerNorm(),
                        ntkit.Relu(), ntkit.AvgPool((2,), (2,), "VALID"),
                        ntkit.residual(ntkit.Conv(None, (3,), padding="SAME", W_std=1.2, b_std=0.1), ntkit.Relu(),
                                       ntkit.Conv(None, (3,), padding="SAME", W_std=0.9, b_std=0.1)),
                        ntkit.Conv(None, (3,), padding="VALID", W_std=1.2, b_std=0.1), ntkit.Erf(1.0, 0.8, 0.0),
                        ntkit.GlobalAvgPool(), ntkit.Dense(None, 1.0, 0.1))


ARCHS = {"gap": (_gap, (3, 4, 4, 2)), "flatten": (_flatten, (3, 5, 5, 1)), "mixed_1d": (_mixed_1d, (3, 8, 2))}


def _inputs(shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@lru_cache(maxsize=None)
def _monte_carlo(name, width, seeds):
    """NTK with one readout unit (the NTK concentrates), NNGP with 256 (one GP sample per unit)."""
    make, shape = ARCHS[name]
    torch.set_num_threads(1)
    x = _inputs(shape)
    return {"ntk": monte_carlo_kernel(make(), x, width=width, seeds=range(seeds), get="ntk", out_dim=1),
            "nngp": monte_carlo_kernel(make(), x, width=width, seeds=range(seeds), get="nngp", out_dim=256)}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_monte_carlo_converges_to_the_exact_kernels(name, single_thread):
    make, shape = ARCHS[name]
    exact = make().kernel(_inputs(shape))
    mc = _monte_carlo(name, 512, 8)
    for kname in ("nngp", "ntk"):
        ex, m = getattr(exact, kname), mc[kname]
        z = ((m.mean - ex) / m.stderr).abs().max().item()
        assert z < 6.0, f"{name} {kname}: mean over seeds {z:.1f} standard errors from the exact kernel"
        # and the exact kernel is not trivially inside the error bars: they are a few percent of it
        assert (m.stderr / ex.abs().max()).max().item() < 0.1


def test_a_wrong_kernel_is_detected(single_thread):
    # the same check must fail for a slightly different exact kernel (W_std of the first conv 1.5 -> 1.65)
    wrong = ntkit.serial(ntkit.Conv(None, (3, 3), padding="SAME", W_std=1.65, b_std=0.2), *_gap().layers[1:])
    ex = wrong.kernel(_inputs(ARCHS["gap"][1]), get="ntk")
    m = _monte_carlo("gap", 512, 8)["ntk"]
    assert ((m.mean - ex) / m.stderr).abs().max().item() > 6.0


@pytest.mark.parametrize("name", ["gap", "flatten"])
def test_error_falls_like_inverse_sqrt_width(name, single_thread):
    make, shape = ARCHS[name]
    x = _inputs(shape)
    exact = make().kernel(x, get="ntk")
    widths = (32, 64, 128, 256)
    errs = []
    for w in widths:
        per_net = [(empirical_ntk(make().init(w, seed=s, in_features=shape[1:], out_dim=1), x) - exact).abs().mean().item()
                   for s in range(6)]
        errs.append(np.mean(per_net) / exact.abs().mean().item())
    slope = np.polyfit(np.log(widths), np.log(errs), 1)[0]
    assert -0.75 < slope < -0.3, f"{name}: error ~ width^{slope:.2f}, expected width^-0.5 (errors {errs})"


def test_delta_orthogonal_filters():
    net = _gap().init(8, seed=0, init="orthogonal", in_features=(4, 4, 2), out_dim=1)
    convs = [m for m in net.modules() if isinstance(m, ntkit.kernels.ConvModule)]
    for m in convs:
        w = m.weight.detach()
        centre = w[:, :, 1, 1]
        off = w.clone()
        off[:, :, 1, 1] = 0
        assert off.abs().max() == 0  # only the centre tap
        gram = centre @ centre.T if centre.shape[0] <= centre.shape[1] else centre.T @ centre
        torch.testing.assert_close(gram / gram[0, 0], torch.eye(gram.shape[0], dtype=gram.dtype))


def test_delta_orthogonal_twins_converge_to_their_own_limit(single_thread):
    """Xiao et al.'s delta-orthogonal filters are not a Gaussian filter in disguise: at initialization the forward
    map is the centre tap alone, so the limit differs from the Gaussian CNTK (it is kernel(init="orthogonal")),
    unlike Haar-orthogonal dense layers, whose limit is the Gaussian one (tests/kernels/test_finite.py)."""
    make, shape = ARCHS["gap"]
    x = _inputs(shape)
    orth, gauss = make().kernel(x, init="orthogonal"), make().kernel(x)
    ntk = monte_carlo_kernel(make(), x, width=512, seeds=range(8), get="ntk", out_dim=1, init="orthogonal")
    nngp = monte_carlo_kernel(make(), x, width=512, seeds=range(8), get="nngp", out_dim=256, init="orthogonal")
    for name, m in (("ntk", ntk), ("nngp", nngp)):
        z_orth = ((m.mean - getattr(orth, name)) / m.stderr).abs().max().item()
        z_gauss = ((m.mean - getattr(gauss, name)) / m.stderr).abs().max().item()
        assert z_orth < 6.0, f"{name}: {z_orth:.1f} standard errors from the delta-orthogonal limit"
        assert z_gauss > 6.0, f"{name}: the Gaussian limit is not distinguishable ({z_gauss:.1f})"
