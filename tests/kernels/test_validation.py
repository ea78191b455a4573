"""Bad input gets a clear exception naming the problem, never a silent wrong number."""

import json

import numpy as np
import pytest
import torch

import ntkit
from ntkit import ConfigError, MemoryBudgetError

ARCH = ntkit.mlp(2, 16, activation="relu", W_std=1.4, b_std=0.1, input_dim=3)


def test_nan_and_inf_rows_are_named():
    x = np.random.default_rng(0).standard_normal((5, 3))
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="x1 row 3 contains NaN"):
        ARCH.kernel(x)
    y = np.ones((4, 3))
    y[2, 0] = np.inf
    with pytest.raises(ValueError, match="x2 row 2 contains Inf"):
        ARCH.kernel(np.ones((2, 3)), y)


def test_mismatched_feature_dimensions():
    with pytest.raises(ValueError, match="x2 has 4 features, x1 has 3"):
        ARCH.kernel(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="expects input_dim=3"):
        ARCH.kernel(np.ones((2, 5)))
    with pytest.raises(ValueError, match="pairs row i"):
        ARCH.kernel(np.ones((2, 3)), np.ones((3, 3)), diagonal=True)


def test_empty_and_one_dimensional_inputs():
    with pytest.raises(ValueError, match="empty"):
        ARCH.kernel(np.ones((0, 3)))
    with pytest.raises(ValueError, match="reshape"):
        ARCH.kernel(np.ones(3))


def test_non_floating_dtypes():
    with pytest.raises(TypeError, match="floating-point"):
        ARCH.kernel(np.ones((2, 3), dtype=np.int64))
    with pytest.raises(TypeError, match="floating-point"):
        ARCH.kernel(torch.ones((2, 3), dtype=torch.int32))
    with pytest.raises(TypeError, match="floating-point"):
        ARCH.kernel(np.ones((2, 3)), dtype=torch.int64)
    with pytest.raises(TypeError):
        ARCH.kernel([["a", "b", "c"]])


def test_unknown_layers_and_missing_keys():
    with pytest.raises(ConfigError, match="unknown layer 'relux'"):
        ntkit.from_config({"layers": [{"layer": "dense", "W_std": 1, "b_std": 0}, {"layer": "relux"}]})
    with pytest.raises(ConfigError, match=r"missing key.*W_std"):
        ntkit.from_config({"layers": [{"layer": "dense", "out_dim": 3, "b_std": 0.0}]})
    with pytest.raises(ConfigError, match=r"missing key.*'layer'"):
        ntkit.from_config({"layers": [{"out_dim": 3}]})
    with pytest.raises(ConfigError, match="missing the 'layers' key"):
        ntkit.from_config({"parameterization": "ntk"})
    with pytest.raises(ConfigError, match=r"missing keys \['a', 'b', 'c'\]"):
        ntkit.from_config({"layers": [{"layer": "erf"}]})
    with pytest.raises(ConfigError, match="unknown key"):
        ntkit.from_config({"layers": [{"layer": "relu", "alpha": 0.1}]})
    with pytest.raises(ConfigError, match="parameterization"):
        ntkit.from_config({"parameterization": "mean_field", "layers": [{"layer": "dense", "W_std": 1, "b_std": 0}]})
    with pytest.raises(ConfigError, match="does not exist"):
        ntkit.from_config("/nonexistent/arch.json")


def test_negative_and_invalid_standard_deviations():
    with pytest.raises(ConfigError, match="W_std must be a finite number >= 0"):
        ntkit.Dense(10, W_std=-1.0)
    with pytest.raises(ConfigError, match="b_std must be a finite number >= 0"):
        ntkit.from_config({"layers": [{"layer": "dense", "W_std": 1.0, "b_std": -0.1}]})
    with pytest.raises(ConfigError, match="W_std"):
        ntkit.Dense(10, W_std=float("nan"))
    with pytest.raises(ConfigError, match="out_dim"):
        ntkit.Dense(0)
    with pytest.raises(ConfigError, match="gamma"):
        ntkit.Rbf(-1.0)
    with pytest.raises(ConfigError, match="degree"):
        ntkit.Monomial(-2)


def test_structural_errors():
    with pytest.raises(ConfigError, match="must act on Gaussian pre-activations"):
        ntkit.serial(ntkit.Relu(), ntkit.Dense(1)).kernel(np.ones((2, 3)))
    with pytest.raises(ConfigError, match="unmerged branches"):
        ntkit.serial(ntkit.Dense(4), ntkit.FanOut(2)).kernel(np.ones((2, 3)))
    with pytest.raises(ConfigError, match="finite width"):
        ntkit.mlp(2, None, parameterization="standard").kernel(np.ones((2, 3)))
    with pytest.raises(ConfigError, match="in_features"):
        ntkit.mlp(1, 8).init()
    with pytest.raises(ConfigError, match="init must be one of"):
        ARCH.init(8, init="xavier")
    with pytest.raises(ConfigError, match="width lists 1 values"):
        ARCH.init([8])


def test_get_argument_errors():
    with pytest.raises(ValueError, match="unknown kernel 'nngpp'"):
        ARCH.kernel(np.ones((2, 3)), get="nngpp")
    with pytest.raises(ValueError, match="empty"):
        ARCH.kernel(np.ones((2, 3)), get=())


def test_memory_budget():
    x = np.ones((2000, 3))
    # 2 outputs of 2000 x 2000 float64 = 64 MB, more than a 10 MB budget
    with pytest.raises(MemoryBudgetError, match=r"needs .* more than the memory budget"):
        ARCH.kernel(x, memory_budget=10e6)
    # a budget that fits the outputs but forces small tiles still gives the right answer
    small = ARCH.kernel(x[:300], get="ntk", memory_budget=300 * 300 * 8 + 12 * 32 * 32 * 8 * 2)
    torch.testing.assert_close(small, ARCH.kernel(x[:300], get="ntk"))
    # a request for a 10^6 x 10^6 kernel fails fast instead of trying to allocate 8 TB
    with pytest.raises(MemoryBudgetError, match="TiB"):
        ARCH.kernel(torch.zeros(1, 3).expand(1_000_000, 3), get="ntk")


def test_overflow_is_reported_not_returned():
    arch = ntkit.mlp(200, activation=ntkit.Exp(1.0, 1.0), W_std=2.0, b_std=0.0)
    with pytest.raises(FloatingPointError, match="overflowed"):
        arch.kernel(np.ones((3, 2)))


def test_inputs_requiring_grad_get_a_clear_error():
    arch = ntkit.mlp(2, activation="relu", W_std=1.4, b_std=0.1)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="not differentiable"):
        arch.kernel(x)
    with torch.no_grad():
        k = arch.kernel(x, get="ntk")
    torch.testing.assert_close(k, arch.kernel(x.detach(), get="ntk"))


def test_correlated_branches_are_refused_not_summed_wrongly():
    """x + x, or x + relu(x): both branches are weight-free functions of one fan-out input, so the kernel of
    the sum needs cross-covariances; adding the branch kernels (what an independence assumption does) would
    give K(x + x) = 2 K(x) instead of 4 K(x). The standard residual block (a Dense in the branch) is fine."""
    x = torch.randn(4, 3, dtype=torch.float64)
    twice = ntkit.serial(ntkit.Dense(None, 1.0, 0.0), ntkit.FanOut(2),
                         ntkit.Parallel([[ntkit.Identity()], [ntkit.Identity()]]), ntkit.FanInSum(),
                         ntkit.Dense(1, 1.0, 0.0))
    with pytest.raises(ConfigError, match="same fan-out input"):
        twice.kernel(x)
    with pytest.raises(ConfigError, match="same fan-out input"):
        ntkit.serial(ntkit.Dense(None, 1.0, 0.0), ntkit.residual(ntkit.Relu()), ntkit.Dense(1, 1.0)).kernel(x)
    # nested: the inner sum still depends on the outer fan-out input through its identity branch
    inner = ntkit.residual(ntkit.Relu(), ntkit.Dense(None, 1.0, 0.1))
    nested = ntkit.serial(ntkit.Dense(None, 1.0, 0.0), ntkit.FanOut(2), ntkit.Parallel([[ntkit.Identity()], [inner]]),
                          ntkit.FanInSum(), ntkit.Dense(1, 1.0))
    with pytest.raises(ConfigError, match="cross terms"):
        nested.kernel(x)
    # two branches ending in ReLU after Dense layers of their own: uncorrelated, but with non-zero means, so
    # E[relu(z) relu(z')] = E[relu(z)] E[relu(z')] != 0 is a cross term (Monte Carlo showed a 30% error)
    d = ntkit.Dense(None, 1.5, 0.1)
    for arch in (ntkit.serial(d, ntkit.Relu(), ntkit.FanOut(2), ntkit.Parallel([[d, ntkit.Relu()], [d, ntkit.Relu()]]),
                              ntkit.FanInSum(), ntkit.Dense(1, 1.0)),
                 ntkit.serial(d, ntkit.Relu(), ntkit.residual(d, ntkit.Relu()), ntkit.Dense(1, 1.0))):
        with pytest.raises(ConfigError, match="cross terms"):
            arch.kernel(x)
    ok = ntkit.serial(ntkit.Dense(None, 1.0, 0.0), inner, ntkit.residual(ntkit.Relu(), ntkit.Dense(None, 1.0, 0.1)),
                      ntkit.Relu(), ntkit.Dense(1, 1.0))
    k = ok.kernel(x, get="nngp")
    assert torch.isfinite(k).all()


def test_unmerged_branches_get_a_config_error():
    x = torch.randn(4, 3, dtype=torch.float64)
    for arch in (ntkit.serial(ntkit.Dense(3), ntkit.FanOut(2), ntkit.Dense(1)),
                 ntkit.serial(ntkit.Dense(3), ntkit.FanOut(2), ntkit.Relu(), ntkit.Dense(1))):
        with pytest.raises(ConfigError, match="unmerged branches"):
            arch.kernel(x)
