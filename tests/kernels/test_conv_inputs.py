"""Inputs a convolutional architecture cannot take, and descriptions it cannot compute, give clear errors;
the finite twin takes NHWC and NCHW batches and agrees between them."""

import numpy as np
import pytest
import torch

import ntkit
from ntkit import ConfigError


def _arch(padding="SAME", pool=True):
    return ntkit.serial(ntkit.Conv(8, (3, 3), padding=padding, W_std=1.4, b_std=0.1), ntkit.Relu(),
                        ntkit.GlobalAvgPool() if pool else ntkit.Flatten(), ntkit.Dense(1, 1.0, 0.0))


def _x(*shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_flat_inputs_to_a_conv_architecture():
    with pytest.raises(ValueError, match=r"images \(n, H, W, C\).*shape \(4, 32\)"):
        _arch().kernel(_x(4, 32))


def test_image_too_small_for_a_valid_filter():
    with pytest.raises(ValueError, match="at least 3 positions.*got 2"):
        _arch("VALID").kernel(_x(2, 2, 5, 1))
    with pytest.raises(ValueError, match="at least 3 positions"):
        _arch("VALID").init(4, in_features=(2, 5, 1))


def test_nan_in_one_image_names_the_sample():
    x = _x(3, 4, 4, 2)
    x[1, 2, 3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"x1.*\b1\b"):
        _arch().kernel(x)


def test_mismatched_image_shapes():
    with pytest.raises(ValueError, match="shape"):
        _arch().kernel(_x(2, 4, 4, 2), _x(2, 4, 4, 3))


def test_finite_twin_wrong_channels_and_layout_hint():
    net = _arch().init(4, in_features=(4, 4, 2), out_dim=1)
    x = _x(3, 4, 4, 2)
    assert net(x).shape == (3, 1)
    with pytest.raises(ValueError, match="expects 2 input channels.*got 3"):
        net(_x(3, 4, 4, 3))
    with pytest.raises(ValueError, match="layout='NCHW'"):
        net(x.permute(0, 3, 1, 2).contiguous().reshape(3, 2, 4, 4)[:, :, :4, :2].repeat(1, 1, 1, 2)
            .permute(0, 1, 2, 3))  # channels-first batch (n, 2, 4, 4) given to an NHWC twin
    with pytest.raises(ValueError, match=r"spatial size \(4, 4\)"):
        net(_x(3, 5, 5, 2))
    with pytest.raises(ConfigError, match=r"in_features=\(H, W, C\)"):
        _arch().init(4, in_features=32)


def test_nchw_twin_is_the_same_network():
    x = _x(3, 4, 4, 2)
    nhwc = _arch(pool=False).init(4, seed=3, in_features=(4, 4, 2), out_dim=2)
    nchw = _arch(pool=False).init(4, seed=3, in_features=(2, 4, 4), out_dim=2, layout="NCHW")
    torch.testing.assert_close(nhwc(x), nchw(x.permute(0, 3, 1, 2)), rtol=0, atol=0)


@pytest.mark.parametrize("layers,match", [
    ([ntkit.Conv(4, (3, 3)), ntkit.Relu(), ntkit.Dense(1)], "add flatten or global_avg_pool"),
    ([ntkit.Conv(4, (3, 3), padding="SAME"), ntkit.Relu()], "ends with spatial activations"),
    ([ntkit.Conv(4, (3,), padding="SAME"), ntkit.Flatten(), ntkit.Dense(1)], r"signals \(n, L, C\)"),
    ([ntkit.Conv(4, (3, 3), padding="SAME"), ntkit.Relu(), ntkit.LayerNorm(), ntkit.Flatten(), ntkit.Dense(1)],
     "directly after a dense or conv"),
    ([ntkit.Conv(4, (3, 3), padding="SAME"), ntkit.FanOut(2),
      ntkit.Parallel([[ntkit.Relu(), ntkit.Conv(4, (3, 3), padding="VALID")], [ntkit.Identity()]]),
      ntkit.FanInSum(), ntkit.Flatten(), ntkit.Dense(1)], "different spatial shapes"),
])
def test_descriptions_that_cannot_be_computed(layers, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        ntkit.serial(*layers).kernel(_x(2, 5, 5, 2))


@pytest.mark.parametrize("cfg,match", [
    ({"layer": "conv", "filter_shape": [3, 3], "W_std": 1.0, "b_std": 0.0, "padding": "FULL"}, "SAME' or 'VALID"),
    ({"layer": "conv", "filter_shape": [3, 0], "W_std": 1.0, "b_std": 0.0}, "filter_shape"),
    ({"layer": "conv", "filter_shape": [3, 3], "W_std": -1.0, "b_std": 0.0}, "W_std"),
    ({"layer": "conv", "filter_shape": [3, 3], "W_std": 1.0, "b_std": 0.0, "strides": [1]}, "strides"),
    ({"layer": "layer_norm", "axis": 1}, "channel axis"),
    ({"layer": "avg_pool"}, "window_shape"),
])
def test_bad_layer_configs(cfg, match):
    with pytest.raises(ConfigError, match=match):
        ntkit.kernels.layer_from_config(cfg)


def test_width_sets_hidden_channels_and_standard_parameterization_depends_on_them(single_thread):
    arch = ntkit.serial(ntkit.Conv(None, (3, 3), padding="SAME", W_std=1.4, b_std=0.1), ntkit.Relu(),
                        ntkit.Conv(None, (3, 3), padding="SAME", W_std=1.4, b_std=0.1), ntkit.Relu(),
                        ntkit.Flatten(), ntkit.Dense(1, 1.0, 0.0), parameterization="standard")
    x = _x(3, 4, 4, 2)
    k8, k16 = (arch.kernel(x, get="ntk", width=w) for w in (8, 16))
    assert not torch.allclose(k8, k16)
    net = arch.init(8, in_features=(4, 4, 2), out_dim=1)
    assert [m.out_channels for m in net.modules() if isinstance(m, ntkit.kernels.ConvModule)] == [8, 8]
    np.testing.assert_allclose(arch.with_width(8).kernel(x, get="nngp"), arch.kernel(x, get="nngp", width=16))
