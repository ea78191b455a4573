"""Laplace, gamma-exponential and RBF kernels: closed-form values, PSD, diagonal, bad parameters."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

import ntkit
from ntkit.kernels.classic import RBF, GammaExponential, Laplace

X = np.random.default_rng(0).standard_normal((30, 4))
Y = np.random.default_rng(1).standard_normal((7, 4))


@pytest.mark.parametrize("kernel,formula", [
    (Laplace(0.7), lambda r: np.exp(-r / 0.7)),
    (GammaExponential(1.3, 0.5), lambda r: np.exp(-((r / 1.3) ** 0.5))),
    (GammaExponential(0.9, 2.0), lambda r: np.exp(-((r / 0.9) ** 2))),
    (RBF(1.1), lambda r: np.exp(-(r**2) / (2 * 1.1**2))),
])
def test_values_psd_and_diagonal(kernel, formula):
    assert isinstance(kernel, ntkit.KernelFunction)
    np.testing.assert_allclose(kernel(X, Y).numpy(), formula(cdist(X, Y)), rtol=1e-10, atol=1e-12)
    k = kernel(X)
    assert torch.equal(k, k.T) and torch.all(torch.diagonal(k) == 1.0)
    assert float(torch.linalg.eigvalsh(k).min()) >= -1e-12
    torch.testing.assert_close(kernel(X, diagonal=True), torch.ones(30, dtype=torch.float64))
    torch.testing.assert_close(kernel(X, Y[:1].repeat(30, 0), diagonal=True), kernel(X, Y[:1])[:, 0])


def test_bad_parameters():
    with pytest.raises(ntkit.ConfigError, match=r"gamma must lie in \(0, 2\]"):
        GammaExponential(1.0, 2.5)
    with pytest.raises(ntkit.ConfigError, match="gamma"):
        GammaExponential(1.0, 0.0)
    with pytest.raises(ntkit.ConfigError, match="length_scale"):
        Laplace(-1.0)
    with pytest.raises(ValueError, match="row 2 contains NaN"):
        x = X.copy()
        x[2, 0] = np.nan
        Laplace(1.0)(x)


def test_config_round_trip():
    assert Laplace(0.5).to_config() == {"kernel": "laplace", "length_scale": 0.5}
    assert RBF(2.0).to_config() == {"kernel": "rbf", "length_scale": 2.0}
    assert GammaExponential(1.0, 1.5).to_config()["gamma"] == 1.5
