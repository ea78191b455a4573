"""NTKNystroem: Nystrom features of the exact kernels, checked against the kernel itself and against FALKON."""

import numpy as np
import pytest
import torch

import ntkit
from ntkit import ConfigError
from ntkit.features import NTKNystroem
from ntkit.solvers import falkon, feature_ridge, kernel_ridge

ARCH = ntkit.mlp(2, W_std=2**0.5, b_std=0.1)
CNN = ntkit.serial(ntkit.Conv(4, (3, 3), padding="SAME"), ntkit.Relu(), ntkit.Conv(4, (3, 3), padding="VALID"),
                   ntkit.Erf(), ntkit.GlobalAvgPool(), ntkit.Dense(1))


@pytest.fixture(scope="module")
def x():
    return torch.as_tensor(np.random.default_rng(0).standard_normal((240, 6)))


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("kernel", ["ntk", "nngp"])
def test_all_rows_as_centers_reproduce_the_kernel(x, kernel):
    k = ARCH.kernel(x, get=kernel)
    ny = NTKNystroem(ARCH, len(x), kernel=kernel, random_state=0, progress=False).fit(x)
    phi = ny.transform(x)
    assert phi.shape == (240, 240) and phi.dtype == torch.float64 and ny.rank_ == 240
    assert _rel(phi @ phi.T, k) < 1e-12
    # new points: k(x', C) K_CC^-1 k(C, x') with C = all of x, i.e. the projection onto span{k(x_i, .)}
    xt = torch.as_tensor(np.random.default_rng(1).standard_normal((30, 6)))
    kc = ARCH.kernel(xt, x, get=kernel)
    ref = kc @ torch.linalg.solve(k, kc.T)
    assert _rel(ny.transform(xt) @ phi.T, kc) < 1e-10 and _rel(ny.transform(xt) @ ny.transform(xt).T, ref) < 1e-8


def test_convolutional_images_exact_on_centers():
    imgs = torch.as_tensor(np.random.default_rng(2).standard_normal((40, 7, 7, 2)))
    k = CNN.kernel(imgs, get="ntk")
    ny = NTKNystroem(CNN, 15, random_state=3, progress=False).fit(imgs)
    assert ny.input_shape_ == (7, 7, 2) and ny.components_.shape == (15, 7, 7, 2)
    phi = ny.transform(imgs)
    idx = torch.as_tensor(ny.component_indices_)
    assert _rel(phi[idx] @ phi[idx].T, k[idx][:, idx]) < 1e-12  # exact on the centers
    assert _rel(phi @ phi[idx].T, k[:, idx]) < 1e-12  # and between any point and a center
    assert torch.equal(ny.transform(imgs.reshape(40, -1)), phi)  # flat rows are reshaped to (7, 7, 2)
    with pytest.raises(ValueError, match=r"rows of shape \(2, 7, 7\), but NTKNystroem was fitted on rows of shape "
                                         r"\(7, 7, 2\).*channels last"):
        ny.transform(imgs.permute(0, 3, 1, 2))  # channels first: the same number of values, another order


def test_error_falls_with_nested_centers_and_residual_is_psd(x):
    # one random_state: the centers of m are the first m of one permutation, so each set contains the last;
    # the residual K - Phi Phi^T is the kernel of the projection's complement: PSD, shrinking as the set grows
    k = ARCH.kernel(x, get="ntk")
    errs = []
    for m in (10, 20, 40, 80, 160):
        phi = NTKNystroem(ARCH, m, random_state=7, progress=False).fit(x).transform(x)
        res = k - phi @ phi.T
        assert float(torch.linalg.eigvalsh(res).min()) > -1e-10 * float(k.diagonal().max())
        assert float(res.diagonal().min()) > -1e-12  # the diagonal is under-estimated, never over
        errs.append(_rel(phi @ phi.T, k))
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.15 * errs[0]  # 0.31 -> 0.028 from 10 to 160 centers


def test_ridge_on_nystrom_features_is_falkon_with_the_same_centers(x):
    # two algorithms for Nystrom kernel ridge regression: ridge on k(x, C) K_CC^{-1/2}, and FALKON's
    # preconditioned CG on (K_nC^T K_nC + lam K_CC) alpha = K_nC^T y
    y = torch.sin(x[:, :2] * 2).sum(1, keepdim=True) + 0.1 * x[:, 2:4]
    kf = ARCH.kernel_fn("ntk")
    lam = 0.05
    ny = NTKNystroem(ARCH, 60, random_state=1, progress=False).fit(x)
    w = feature_ridge(ny, x, y, lam)
    xt = torch.as_tensor(np.random.default_rng(3).standard_normal((50, 6)))
    ctr, alpha, _, _ = falkon(kf, x, y, lam, centers=ny.components_, tol=1e-13, max_iter=500, progress=False)
    assert torch.equal(ctr, ny.components_)
    assert _rel(ny.transform(xt) @ w, kf(xt, ctr) @ alpha) < 1e-8
    # and through kernel_ridge's feature path
    sol = kernel_ridge(kf, x, y, diag_reg=lam, diag_reg_absolute_scale=True, solver="features",
                       feature_map=NTKNystroem(ARCH, 60, random_state=1, progress=False), progress=False)
    assert _rel(sol.predict(xt), kf(xt, ctr) @ alpha) < 1e-8


def test_numpy_torch_dtypes_and_batches(x):
    xn = x.numpy()
    ny = NTKNystroem(ARCH, 50, random_state=0, progress=False).fit(xn)
    out = ny.transform(xn)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (240, 50)
    assert np.allclose(ny.transform(x).numpy(), out, rtol=0, atol=1e-13)
    small = NTKNystroem(ARCH, 50, random_state=0, batch_size=7, progress=False).fit(xn).transform(xn)
    assert np.allclose(small, out, rtol=0, atol=1e-13)  # batches of 7 rows: the same up to the GEMM's rounding
    f32 = NTKNystroem(ARCH, 50, random_state=0, dtype="float32", progress=False).fit(x)
    phi32 = f32.transform(x)
    assert phi32.dtype == torch.float32 and _rel(phi32.double(), torch.as_tensor(out)) < 1e-4
    np.testing.assert_array_equal(ny.component_indices_, f32.component_indices_)  # same seed, same centers
    grad = NTKNystroem(ARCH, 50, random_state=0, progress=False).fit(x.clone().requires_grad_())  # fit detaches
    assert torch.equal(grad.normalization_, ny.normalization_)
    assert NTKNystroem(ARCH, 50, random_state=1, progress=False).fit(xn).component_indices_.tolist() != \
        ny.component_indices_.tolist()


def test_float32_keeps_every_direction_it_can_resolve():
    # 2-d inputs: K_CC's eigenvalues span 4e-6 of the largest. A float32 transform resolves them (kernel
    # rounding ~1e-7, amplified by at most sqrt(max l / l) ~ 500), so it must keep all 200, as float64 does
    x = torch.as_tensor(np.random.default_rng(0).standard_normal((300, 2)))
    ref = NTKNystroem(ARCH, 200, random_state=0, progress=False).fit(x)
    f32 = NTKNystroem(ARCH, 200, random_state=0, dtype=torch.float32, progress=False).fit(x)
    assert ref.rank_ == f32.rank_ == 200
    p64, p32 = ref.transform(x), f32.transform(x).double()
    assert _rel(p32 @ p32.T, p64 @ p64.T) < 1e-4 and _rel(p32, p64) < 2e-3  # measured 2.5e-4


def test_float32_drops_directions_below_its_precision():
    # near-duplicate rows (1e-6 apart): half of K_CC's eigenvalues lie at 4e-9 .. 3e-8 of the largest, above
    # float64's cut-off (60 eps64 ~ 1e-14) and below float32's (eps32 ~ 1.2e-7): float64 keeps them, float32
    # drops them (its rounding would be amplified by > 1 / sqrt(eps32) there) and still approximates K well
    base = torch.as_tensor(np.random.default_rng(4).standard_normal((30, 5)))
    x = torch.cat([base, base + 1e-6 * torch.as_tensor(np.random.default_rng(5).standard_normal((30, 5)))])
    k = ARCH.kernel(x, get="ntk")
    f64 = NTKNystroem(ARCH, 60, random_state=0, progress=False).fit(x)
    f32 = NTKNystroem(ARCH, 60, random_state=0, dtype=torch.float32, progress=False).fit(x)
    assert f64.rank_ == 60 and f32.rank_ == 30
    p64, p32 = f64.transform(x), f32.transform(x).double()
    assert _rel(p64 @ p64.T, k) < 1e-10 and bool(torch.isfinite(p32).all()) and _rel(p32 @ p32.T, k) < 1e-5


def test_duplicated_rows_give_a_pseudo_inverse():
    # duplicated rows make K_CC singular: the pseudo-inverse keeps the features finite and exact
    base = torch.as_tensor(np.random.default_rng(4).standard_normal((30, 5)))
    x = torch.cat([base, base])
    for dt in (torch.float64, torch.float32):
        ny = NTKNystroem(ARCH, 60, random_state=0, dtype=dt, progress=False).fit(x)
        phi = ny.transform(x)
        assert ny.rank_ <= 30 and bool(torch.isfinite(phi).all())
        k = ARCH.kernel(x, get="ntk", dtype=dt)
        assert _rel((phi @ phi.T).double(), k.double()) < (1e-10 if dt == torch.float64 else 1e-4)


def test_bad_inputs(x):
    with pytest.raises(ValueError, match="n_components must be a positive integer"):
        NTKNystroem(ARCH, 0).fit(x)
    with pytest.raises(RuntimeError, match="not fitted"):
        NTKNystroem(ARCH, 5).transform(x)
    with pytest.raises(TypeError, match="needs the training inputs"):
        NTKNystroem(ARCH, 5).fit(6)
    bad = x.clone()
    bad[17, 2] = float("nan")
    with pytest.raises(ValueError, match="17"):
        NTKNystroem(ARCH, 5).fit(bad)
    ny = NTKNystroem(ARCH, 5, random_state=0, progress=False).fit(x)
    with pytest.raises(ValueError, match="17"):
        ny.transform(bad)
    with pytest.raises(ValueError, match=r"X has rows of shape \(5,\), but NTKNystroem was fitted on rows of shape \(6,\)"):
        ny.transform(x[:, :5])
    ny.kernel = "nngp"  # as set_params would: the fitted map keeps the kernel its normalization was made for
    torch.testing.assert_close(ny.transform(x), NTKNystroem(ARCH, 5, random_state=0, progress=False).fit(x).transform(x))
    with pytest.warns(RuntimeWarning, match="more than the 240 rows"):
        assert NTKNystroem(ARCH, 500, random_state=0, progress=False).fit(x).n_components_ == 240
    with pytest.raises(ValueError, match="kernel must be"):
        NTKNystroem(ARCH, 5, kernel="gp").fit(x)
    rnn = ntkit.from_config({"layers": [{"layer": "rnn", "W_std": 1.0, "U_std": 1.0, "b_std": 0.0, "activation": {"layer": "relu"}},
                                        {"layer": "dense", "out_dim": 1, "W_std": 1.0, "b_std": 0.0}]})
    with pytest.raises(ConfigError, match="recurrent"):
        NTKNystroem(rnn, 5).fit(x)
    with pytest.raises(TypeError, match="architecture must be"):
        NTKNystroem(object(), 5).fit(x)
    frozen = ntkit.serial(ntkit.Dense(1, trainable=False))
    with pytest.raises(ValueError, match="matrix of the 5 centers is zero"):
        NTKNystroem(frozen, 5).fit(x)
