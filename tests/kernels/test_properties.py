"""Properties of the exact kernels: symmetry, PSD, positive diagonal, homogeneity, closed-form values,
diagonal mode, blocking invariance, numerical stability at large depth."""

import math

import numpy as np
import pytest
import torch

import ntkit

ARCHS = {
    "relu": ntkit.mlp(3, activation="relu", W_std=1.5, b_std=0.2),
    "erf": ntkit.mlp(2, activation=ntkit.Erf(), W_std=1.3, b_std=0.1),
    "gelu_standard": ntkit.mlp(2, 64, activation="gelu", W_std=1.2, b_std=0.3, parameterization="standard"),
    "tanh_quadrature": ntkit.mlp(2, activation=ntkit.Elementwise("tanh"), W_std=1.4, b_std=0.1),
    "residual": ntkit.serial(ntkit.Dense(None, 1.2, 0.1), ntkit.residual(ntkit.Relu(), ntkit.Dense(None, 1.0, 0.1)),
                             ntkit.Relu(), ntkit.Dense(1, 1.0, 0.0)),
    "mixed": ntkit.serial(ntkit.Dense(None, 1.5, 0.1), ntkit.Gelu(), ntkit.Dense(None, 1.1, 0.0), ntkit.Sin(1, 1, 0.3),
                          ntkit.Dense(None, 1.3, 0.2), ntkit.Abs(), ntkit.Dense(1)),
}


@pytest.fixture(scope="module")
def x():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 7, generator=g, dtype=torch.float64)
    x[5] = x[3]  # duplicate
    x[6] = -x[3]  # antipodal
    x[7] = 2.5 * x[3]  # parallel
    return x


@pytest.mark.filterwarnings("ignore:.*Hermite terms")
@pytest.mark.parametrize("name", ARCHS)
def test_symmetric_psd_positive_diagonal(name, x):
    k = ARCHS[name].kernel(x)
    for mat in k:
        assert torch.equal(mat, mat.T)
        ev = torch.linalg.eigvalsh(mat)
        assert ev.min() >= -1e-12 * ev.max()
        assert (torch.diagonal(mat) > 0).all()


@pytest.mark.filterwarnings("ignore:.*Hermite terms")
@pytest.mark.parametrize("name", ARCHS)
def test_diagonal_mode_and_blocking(name, x):
    arch = ARCHS[name]
    full = arch.kernel(x)
    diag = arch.kernel(x, diagonal=True)
    for a, b in zip(full, diag):
        torch.testing.assert_close(b, torch.diagonal(a), rtol=1e-12, atol=0)
    # pairwise diagonal k(x1_i, x2_i) agrees with the matrix
    y = x.flip(0)
    cross = arch.kernel(x, y, "ntk")
    pair = arch.kernel(x, y, "ntk", diagonal=True)
    torch.testing.assert_close(pair, torch.diagonal(cross), rtol=1e-12, atol=1e-14)
    # block size does not change the result (tiles of 7 do not divide 40)
    blocked = arch.kernel(x, get="ntk", block_size=7)
    torch.testing.assert_close(blocked, full.ntk, rtol=1e-12, atol=1e-14)
    # x2 = x1 explicitly gives the same matrix as x2=None
    torch.testing.assert_close(arch.kernel(x, x, "nngp"), full.nngp, rtol=1e-12, atol=1e-14)


def test_relu_homogeneity_without_bias(x):
    # bias-free ReLU: Sigma0 and every layer map are positively homogeneous of degree 1
    arch = ntkit.mlp(3, activation="relu", W_std=1.7, b_std=None)
    y = x[:10]
    base = arch.kernel(x, y)
    for c in (0.3, 2.0, 7.5):
        scaled = arch.kernel(c * x, y)
        for a, b in zip(scaled, base):
            torch.testing.assert_close(a, c * b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("depth", [1, 2, 5, 10])
def test_relu_ntk_diagonal_equals_number_of_dense_layers(depth, x):
    # sigma_w^2 = 2 hidden layers, sigma_b = 0, readout W_std = 1 and Sigma0(x, x) = |x|^2/d = 1:
    # every Sigma^(h)(x, x) = 1 and every Sigma-dot^(h)(x, x) = 1, so Theta(x, x) = depth + 1
    # (Arora et al. 2019, Eq. (9)-(10)).
    d = x.shape[1]
    xu = x / x.norm(dim=1, keepdim=True) * math.sqrt(d)
    arch = ntkit.mlp(depth, activation="relu", W_std=math.sqrt(2), b_std=0.0, readout_W_std=1.0)
    theta = arch.kernel(xu, get="ntk", diagonal=True)
    torch.testing.assert_close(theta, torch.full_like(theta, depth + 1.0), rtol=1e-13, atol=0)
    # the same with the readout also at sigma_w^2 = 2: Theta = 2 (depth + 1) (neural-tangents convention)
    arch2 = ntkit.mlp(depth, activation="relu", W_std=math.sqrt(2), b_std=0.0)
    theta2 = arch2.kernel(xu, get="ntk", diagonal=True)
    torch.testing.assert_close(theta2, torch.full_like(theta2, 2.0 * (depth + 1)), rtol=1e-13, atol=0)


def test_one_hidden_layer_relu_closed_form():
    # NTK of a one-hidden-layer ReLU net, NTK parameterization, no bias, W_std = 1 (Jacot et al. 2018; Cho & Saul):
    # Sigma1 = <x,x'>/d; Theta = Sigma1 * k0(rho) + sqrt(q q') k1(rho)/(2 pi) ... written out directly
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    arch = ntkit.serial(ntkit.Dense(None, 1.0, None), ntkit.Relu(), ntkit.Dense(1, 1.0, None))
    k = arch.kernel(x, y)
    s = x @ y.T / 4
    q1, q2 = (x * x).sum(1, keepdim=True) / 4, (y * y).sum(1, keepdim=True).T / 4
    rho = (s / torch.sqrt(q1 * q2)).clamp(-1, 1)
    t = torch.acos(rho)
    nngp = torch.sqrt(q1 * q2) / (2 * math.pi) * (torch.sin(t) + (math.pi - t) * rho)
    ntk = nngp + s * (math.pi - t) / (2 * math.pi)
    torch.testing.assert_close(k.nngp, nngp, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(k.ntk, ntk, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("act,W,b", [("relu", math.sqrt(2), 0.0), ("relu", math.sqrt(2), 0.1),
                                     (ntkit.Erf(), 1.0, 0.0), (ntkit.Erf(), 1.5, 0.1)])
def test_deep_networks_stay_finite_symmetric_psd(act, W, b, x):
    for depth, dtype in ((1000, torch.float64), (100, torch.float32)):
        arch = ntkit.mlp(depth, activation=act, W_std=W, b_std=b)
        k = arch.kernel(x[:20], dtype=dtype)
        for mat in k:
            assert mat.dtype == dtype
            assert torch.isfinite(mat).all()
            assert torch.equal(mat, mat.T)
            ev = torch.linalg.eigvalsh(mat.double())
            assert ev.min() >= -1e-5 * ev.max()  # PSD to float32 rounding


def test_float32_on_request_close_to_float64(x):
    arch = ARCHS["relu"]
    k64 = arch.kernel(x)
    k32 = arch.kernel(x.float(), dtype=torch.float32)
    assert k32.ntk.dtype == torch.float32
    torch.testing.assert_close(k32.ntk.double(), k64.ntk, rtol=2e-5, atol=1e-5)


def test_numpy_input_and_get_forms(x):
    arch = ARCHS["erf"]
    k = arch.kernel(x.numpy())
    assert isinstance(k.nngp, torch.Tensor) and k.nngp.dtype == torch.float64
    assert k._fields == ("nngp", "ntk")
    assert arch.kernel(x, get=("ntk",))._fields == ("ntk",)
    torch.testing.assert_close(arch.kernel(x, get="ntk"), k.ntk)
    kf = arch.kernel_fn("nngp")
    assert isinstance(kf, ntkit.KernelFunction)
    torch.testing.assert_close(kf(x), k.nngp)
    torch.testing.assert_close(kf(x, diagonal=True), torch.diagonal(k.nngp))


def test_frozen_layers_drop_out_of_the_ntk_only(x):
    # Arora et al. 2020: fixing the bottom layers keeps the NNGP and removes their NTK terms
    full = ntkit.mlp(2, activation="relu", W_std=1.4, b_std=0.1)
    fixed = ntkit.mlp(2, activation="relu", W_std=1.4, b_std=0.1, fixed_layers=1)
    kf, kx = full.kernel(x), fixed.kernel(x)
    torch.testing.assert_close(kf.nngp, kx.nngp)
    assert (kf.ntk - kx.ntk).abs().max() > 1e-3
    # all layers fixed: NTK = 0
    none = ntkit.mlp(1, activation="relu", fixed_layers=2)
    assert float(none.kernel(x, get="ntk").abs().max()) == 0.0


def test_standard_parameterization_depends_on_width(x):
    arch = ntkit.mlp(2, activation="relu", W_std=1.3, b_std=0.2, parameterization="standard")
    k1 = arch.kernel(x, get="ntk", width=100)
    k2 = arch.kernel(x, get="ntk", width=200)
    assert not torch.allclose(k1, k2)
    nngp1, nngp2 = arch.kernel(x, get="nngp", width=100), arch.kernel(x, get="nngp", width=200)
    torch.testing.assert_close(nngp1, nngp2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(x):
    arch = ARCHS["residual"]
    a = arch.kernel(x)
    b = arch.kernel(x, device="cuda")
    assert b.ntk.device.type == "cuda"
    torch.testing.assert_close(b.ntk.cpu(), a.ntk, rtol=1e-10, atol=1e-12)
