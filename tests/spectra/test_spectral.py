"""Spectral tools on kernel matrices: validation, eigenpairs (full and top-k), diagnostics, and the per-mode
convergence times checked against ntkit.dynamics on a real data set (256 MNIST test images)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import ntkit
from ntkit.dynamics import gradient_descent_mse
from ntkit.spectra import (check_kernel_matrix, condition_number, convergence_times, effective_rank,
                           eigendecomposition, kernel_pca, target_projections)

MNIST = Path(__file__).resolve().parents[1] / "data" / "mnist_small" / "mnist_t10k_first256.npz"

pytestmark = pytest.mark.usefixtures("single_thread")


def _mnist(n):
    z = np.load(MNIST)
    x = torch.from_numpy(z["images"][:n].reshape(n, -1).astype(np.float64) / 255.0)
    x = (x - x.mean(0)) / 0.3
    labels = torch.from_numpy(z["labels"][:n].astype(np.int64))
    y = torch.nn.functional.one_hot(labels, 10).to(torch.float64) - 0.1
    return x, y


def _psd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(a)
    lam = torch.logspace(0, -4, n, dtype=torch.float64)
    return (q * lam) @ q.T, lam, q


def test_bad_matrices_raise():
    k, _, _ = _psd(6)
    bad = k.clone()
    bad[0, 1] += 1e-3
    with pytest.raises(ValueError, match="not symmetric"):
        eigendecomposition(bad)
    nan = k.clone()
    nan[2, 3] = nan[3, 2] = float("nan")
    with pytest.raises(ValueError):
        condition_number(nan)
    inf = k.clone()
    inf[1, 1] = float("inf")
    with pytest.raises(ValueError):
        effective_rank(inf)
    with pytest.raises(ValueError, match="square"):
        check_kernel_matrix(torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive semi-definite"):
        eigendecomposition(-k)
    with pytest.raises(ValueError, match="top_k"):
        eigendecomposition(k, top_k=0)
    with pytest.raises(ValueError, match="learning_rate"):
        convergence_times(k, learning_rate=0.0)
    with pytest.raises(ValueError, match="rows"):
        target_projections(k, torch.zeros(5, dtype=torch.float64))


def test_eigendecomposition_full_and_top_k():
    k, lam, q = _psd(200)
    full = eigendecomposition(k)
    torch.testing.assert_close(full.eigenvalues, lam, rtol=1e-10, atol=1e-13)
    top = eigendecomposition(k, top_k=10, tol=1e-12)
    torch.testing.assert_close(top.eigenvalues, lam[:10], rtol=1e-10, atol=0)
    # eigenvectors up to sign
    overlap = (top.eigenvectors * q[:, :10]).sum(0).abs()
    torch.testing.assert_close(overlap, torch.ones(10, dtype=torch.float64), rtol=0, atol=1e-8)
    resid = k @ top.eigenvectors - top.eigenvectors * top.eigenvalues
    assert float(resid.norm(dim=0).max()) <= 1e-11
    assert condition_number(k) == pytest.approx(1e4, rel=1e-8)


def test_effective_rank_and_kernel_pca():
    n = 50
    assert effective_rank(torch.eye(n, dtype=torch.float64)) == pytest.approx(n, rel=1e-12)
    one = torch.ones(n, n, dtype=torch.float64)
    assert effective_rank(one) == pytest.approx(1.0, abs=1e-9)
    # kernel PCA of a linear kernel = PCA of centred data: scores reproduce the centred Gram matrix
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.2], dtype=torch.float64)
    scores = kernel_pca(x @ x.T, 3)
    xc = x - x.mean(0)
    torch.testing.assert_close(scores @ scores.T, xc @ xc.T, rtol=1e-9, atol=1e-9)
    var = scores.pow(2).sum(0)
    torch.testing.assert_close(var, torch.linalg.svdvals(xc) ** 2, rtol=1e-9, atol=1e-9)


def test_convergence_times_match_ntkit_dynamics_on_mnist():
    # Jacot et al. 2018, Sec. 5: under the MSE flow the residual's projection on eigenvector v_i decays as
    # exp(-eta lambda_i t / m) = exp(-t / tau_i). Checked against ntkit.dynamics.gradient_descent_mse (its
    # closed form), on the NTK of a depth-2 ReLU net of 128 MNIST images with one-hot targets (m = n * 10).
    x, y = _mnist(128)
    k = ntkit.mlp(depth=2, activation="relu", W_std=2**0.5, b_std=0.1).kernel(x, get="ntk")
    eta = 0.7
    tau = convergence_times(k, learning_rate=eta, n_targets=y.numel())
    spec = eigendecomposition(k)
    p0 = target_projections(k, y)  # (n, 10): <v_i, y> (f(0) = 0: the ensemble mean)
    torch.testing.assert_close(p0, spec.eigenvectors.T @ y)
    assert bool((tau[1:] >= tau[:-1]).all())
    pred = gradient_descent_mse(k, y, learning_rate=eta)
    for i in (0, 5, 40, 127):
        t = float(tau[i])
        f = pred.predict(t).train
        p_t = spec.eigenvectors.T @ (y - f)
        expected = torch.exp(-t / tau)[:, None] * p0
        torch.testing.assert_close(p_t, expected, rtol=0, atol=1e-9 * float(y.norm()))
        # mode i itself has decayed by exactly 1/e at t = tau_i
        torch.testing.assert_close(p_t[i], p0[i] / math.e, rtol=1e-7, atol=1e-12)
    # the MSE loss at time t from the spectrum: (1 / 2m) sum_i exp(-2 t / tau_i) |<v_i, y>|^2
    t = float(tau[20])
    loss_dyn = 0.5 * (pred.predict(t).train - y).pow(2).sum() / y.numel()
    loss_spec = 0.5 * (torch.exp(-2 * t / tau)[:, None] * p0**2).sum() / y.numel()
    assert float(loss_dyn) == pytest.approx(float(loss_spec), rel=1e-9)


def test_float32_top_k_converges_with_the_dtype_aware_default_tolerance():
    # Regression: the default tol was 1e-10 whatever the dtype, below float32's rounding level (the Ritz residual
    # ||K v - lambda v|| / lambda_max bottoms out at a few eps = ~5e-7 here), so float32 ran all max_iter
    # iterations and warned "clustered" although lambda_1..3 = 1, 0.855, 0.731 are well separated.
    k, lam, q = _psd(60)
    k32 = k.float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "did not converge" warning
        top = eigendecomposition(k32, top_k=3)
    assert top.eigenvalues.dtype == torch.float32 and top.eigenvectors.shape == (60, 3)
    # float32 accuracy: default tol = 10 sqrt(60) eps32 = 9.2e-6; eigenvalue error <= residual (Bauer-Fike for a
    # symmetric matrix), eigenvector angle <= residual / gap (Davis-Kahan, gap 0.12)
    eps = torch.finfo(torch.float32).eps
    tol = 10 * math.sqrt(60) * eps
    torch.testing.assert_close(top.eigenvalues.double(), lam[:3], rtol=0, atol=tol)
    overlap = (top.eigenvectors.double() * q[:, :3]).sum(0).abs()
    torch.testing.assert_close(overlap, torch.ones(3, dtype=torch.float64), rtol=0, atol=tol / 0.12)
    # float64 keeps the historical default 1e-10 exactly (same iterations, same numbers)
    a = eigendecomposition(k, top_k=3)
    b = eigendecomposition(k, top_k=3, tol=1e-10)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.eigenvectors, b.eigenvectors)
    # an explicit tolerance below float32's rounding level still warns, and says why
    with pytest.warns(RuntimeWarning, match="rounding level"):
        eigendecomposition(k32, top_k=3, tol=1e-10, max_iter=20)


def test_counts_beyond_n_and_bad_counts_raise():
    # Regression: top_k > n silently returned n pairs, kernel_pca(K, 60) with n = 40 returned 40 columns, and
    # n_targets = 0 gave tau = 0 for every mode.
    k, _, _ = _psd(60)
    with pytest.raises(ValueError, match=r"top_k=100 exceeds the kernel size n=60"):
        eigendecomposition(k, top_k=100)
    assert eigendecomposition(k, top_k=60).eigenvalues.shape == (60,)  # n itself is fine
    k40 = k[:40, :40]
    with pytest.raises(ValueError, match=r"n_components=60 exceeds the kernel size n=40"):
        kernel_pca(k40, 60)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="n_components must be a positive integer"):
            kernel_pca(k40, bad)
        with pytest.raises(ValueError, match="n_targets must be a positive integer"):
            convergence_times(k40, n_targets=bad)
    with pytest.raises(ValueError, match="tol"):
        eigendecomposition(k, top_k=3, tol=-1.0)
    assert kernel_pca(k40, 40).shape == (40, 40)
    # a valid n_targets is used as m in tau_i = m / (eta lambda_i)
    tau = convergence_times(k40, learning_rate=2.0, n_targets=120)
    lam = torch.linalg.eigvalsh(k40).flip(0)
    torch.testing.assert_close(tau, 120 / (2.0 * lam), rtol=1e-9, atol=0)
