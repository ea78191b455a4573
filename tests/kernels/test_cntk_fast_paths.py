"""The fast paths of the spatial kernels: symmetric tiles (pairs i <= j only) and the fused arc-cosine dual.

Each is checked against the computation it replaces: the full b x b tile (a Gram of x with a copy of x is
computed pair by pair, without symmetry), and the eager dual of ABRelu.
"""

import math

import pytest
import torch

import ntkit
from conftest import assert_fused_equals_eager, images_with_parallel_pair
from ntkit.kernels import _fused
from ntkit.kernels.architecture import symmetric_tile_pairs

F64 = torch.float64


def _cnn(readout, act=None, extra=()):
    act = act or ntkit.Relu()
    layers = [ntkit.Conv(8, (3, 3), W_std=1.4, b_std=0.1), act, *extra, ntkit.Conv(8, (3, 2), strides=(1, 2),
              padding="VALID", W_std=1.3, b_std=0.2), act]
    layers += [ntkit.GlobalAvgPool() if readout == "gap" else ntkit.Flatten(), ntkit.Dense(1, 1.5, 0.1)]
    return ntkit.serial(*layers)


ARCHS = {
    "gap-relu": lambda: _cnn("gap"),
    "flatten-relu": lambda: _cnn("flatten"),
    "gap-erf-avgpool": lambda: _cnn("gap", ntkit.Erf(), (ntkit.AvgPool((2, 2), padding="SAME"),)),
    "flatten-abrelu-layernorm": lambda: ntkit.serial(ntkit.Conv(4, (3, 3), W_std=1.2, b_std=0.3), ntkit.LayerNorm(),
                                                     ntkit.ABRelu(-0.3, 1.1), ntkit.Flatten(), ntkit.Dense(1)),
    "gap-dense-relu-dense": lambda: ntkit.serial(ntkit.Conv(4, (3, 3), W_std=1.2, b_std=0.1), ntkit.Relu(),
                                                 ntkit.GlobalAvgPool(), ntkit.Dense(16, 1.3, 0.2), ntkit.Relu(),
                                                 ntkit.Dense(1)),
    "residual-gap": lambda: ntkit.serial(ntkit.Conv(4, (3, 3), W_std=1.2, b_std=0.1), ntkit.Relu(),
                                         ntkit.residual(ntkit.Conv(4, (3, 3), W_std=1.1), ntkit.Relu(),
                                                        ntkit.Conv(4, (3, 3), W_std=1.1)),
                                         ntkit.GlobalAvgPool(), ntkit.Dense(1)),
}


@pytest.fixture(scope="module")
def images():
    return images_with_parallel_pair((7, 6, 5, 2), seed=3, pair=(1, 3), factor=2.0)


def test_symmetric_tile_pairs_cover_each_pair_once():
    for b in (1, 2, 5):
        r1, r2, n = symmetric_tile_pairs(b)
        assert n == b and len(r1) == b * (b + 1) // 2
        assert torch.equal(r1[:b], torch.arange(b)) and torch.equal(r2[:b], torch.arange(b))
        assert bool((r1 <= r2).all())
        assert len({(int(i), int(j)) for i, j in zip(r1, r2)}) == len(r1)


@pytest.mark.parametrize("name", sorted(ARCHS))
@pytest.mark.parametrize("block", [None, 3])
def test_symmetric_tiles_equal_the_full_computation(name, block, images):
    arch = ARCHS[name]()
    full = arch.kernel(images, images.clone(), dtype=F64, block_size=block)  # all b^2 pairs, no symmetry
    sym = arch.kernel(images, dtype=F64, block_size=block)
    for a, b in zip(full, sym):
        assert torch.equal(b, b.T)
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
    diag = arch.kernel(images, dtype=F64, diagonal=True)
    for a, b in zip(diag, sym):
        torch.testing.assert_close(b.diagonal(), a, rtol=1e-12, atol=1e-14)


def test_symmetric_tiles_with_pixel_pairs_forced(images):
    arch = _cnn("flatten")
    a = arch.kernel(images, images.clone(), dtype=F64, pixel_pairs=True)
    b = arch.kernel(images, dtype=F64, pixel_pairs=True)
    c = arch.kernel(images, dtype=F64)
    for u, v, w in zip(a, b, c):
        torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(w, u, rtol=1e-12, atol=1e-14)


def test_fully_connected_gram_keeps_its_matrix_path(monkeypatch):
    # the flat Gram is one matrix product per tile: the pair list must not be used for it
    calls = []
    orig = symmetric_tile_pairs
    monkeypatch.setattr("ntkit.kernels.architecture.symmetric_tile_pairs", lambda *a: calls.append(a) or orig(*a))
    x = torch.randn(9, 4, dtype=F64)
    k = ntkit.mlp(2, activation="relu").kernel(x, dtype=F64, block_size=4)
    assert not calls and torch.equal(k.ntk, k.ntk.T)


# -- the fused arc-cosine dual -------------------------------------------------------------------------
def _factors(var1, var2, k):
    s1, s2 = var1.sqrt(), var2.sqrt()
    eps = torch.finfo(var1.dtype).eps
    return (1 + 4 * eps) / s1, 1 / s2, s1 * k, s2


def _random_pair_states(ab, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = ab
    k = (a - b) ** 2 / (2 * math.pi)
    v1 = torch.rand(6, 1, 4, generator=g, dtype=F64) + 0.1
    v2 = torch.rand(1, 5, 4, generator=g, dtype=F64) + 0.1
    rho = torch.rand(6, 5, 4, generator=g, dtype=F64) * 2 - 1
    rho[0, 0], rho[1, 1], rho[2, 2] = 1.0, -1.0, 1.0 - 1e-9  # snapped and nearly parallel correlations
    cov = rho * (v1 * v2).sqrt()
    theta = torch.randn(6, 5, 4, generator=g, dtype=F64)
    return g, k, v1, v2, cov, theta


@pytest.mark.parametrize("acos", ["torch", "polynomial"])
@pytest.mark.parametrize("ab", [(0.0, 1.0), (-1.0, 1.0), (0.2, 0.9)])
def test_fused_expression_equals_the_eager_dual(ab, acos):
    # the expression that is compiled, run eagerly here, with torch.acos and with the compiled path's acos_poly
    acos = torch.acos if acos == "torch" else _fused.acos_poly
    act = ntkit.ABRelu(*ab)
    a, b = ab
    g, k, v1, v2, cov, theta = _random_pair_states(ab, seed=0)
    want, dot = act.dual(cov, v1, v2)
    got, gt = _fused.abrelu_dual_math(cov, theta, *_factors(v1, v2, k), (a * a + b * b) / 2, k, acos=acos)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(gt, theta * dot, rtol=1e-13, atol=1e-15)
    # with index vectors: the factors of 3 inputs gathered per pair inside the expression
    q = torch.rand(3, 4, generator=g, dtype=F64) + 0.2
    i1, i2 = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([0, 1, 2, 2, 2])
    c = torch.randn(5, 4, generator=g, dtype=F64) * 0.3
    want, _ = act.dual(c, q[i1], q[i2])
    got, _ = _fused.abrelu_dual_math(c, None, *_factors(q, q, k), (a * a + b * b) / 2, k, i1, i2, acos=acos)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_polynomial_arccos_equals_torch_acos(dtype):
    # the arccos of the compiled dual (additions, products, one square root): against torch.acos on a dense
    # grid of [-1, 1], around the branch points +-1/2, and exactly at the ends (snapped correlations)
    x = torch.cat([torch.linspace(-1, 1, 200_001, dtype=F64),
                   0.5 + torch.linspace(-1e-6, 1e-6, 2001, dtype=F64),
                   -0.5 + torch.linspace(-1e-6, 1e-6, 2001, dtype=F64),
                   1 - torch.logspace(-16, -1, 500, dtype=F64), -1 + torch.logspace(-16, -1, 500, dtype=F64)]).to(dtype)
    tol = 4 * torch.finfo(dtype).eps  # two units in the last place of values up to pi
    got = _fused.acos_poly(x)
    assert float((got - torch.acos(x)).abs().max()) <= tol
    ends = _fused.acos_poly(torch.tensor([1.0, -1.0, 0.0], dtype=dtype))
    assert float(ends[0]) == 0.0 and float(ends[1]) == float(torch.tensor(math.pi, dtype=dtype))
    assert abs(float(ends[2]) - math.pi / 2) <= tol


@pytest.mark.parametrize("name", ["gap-relu", "flatten-relu", "flatten-abrelu-layernorm", "residual-gap",
                                  "gap-dense-relu-dense"])
def test_fused_path_equals_eager_without_compiler(name, images, monkeypatch):
    # the whole fused plumbing (marginal factors, index vectors, self-kernels) with the expression run eagerly
    monkeypatch.setenv("NTKIT_NO_COMPILE", "1")
    arch = ARCHS[name]()
    for x2 in (None, images[:4] * 0.7):
        a = arch.kernel(images, x2, dtype=F64, fused=False)
        b = arch.kernel(images, x2, dtype=F64, fused=True, block_size=4)
        for u, v in zip(a, b):
            torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14)


def test_failed_compilation_falls_back_to_eager(images, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(_fused, "_compiled", {})
    monkeypatch.setattr(_fused, "_failed", set())
    monkeypatch.delenv("NTKIT_NO_COMPILE", raising=False)
    arch = ARCHS["gap-relu"]()
    with pytest.warns(RuntimeWarning, match="using eager torch"):
        b = arch.kernel(images, dtype=F64, fused=True)
    a = arch.kernel(images, dtype=F64, fused=False)
    for u, v in zip(a, b):
        torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14)


def test_auto_fuse_only_for_large_spatial_work():
    assert not _fused.auto_fuse(None, 10**9, 1)  # fully connected: never
    assert not _fused.auto_fuse(None, 100, 784)
    assert _fused.auto_fuse(None, 500_500, 196**2)  # a 1000 x 1000 CNTK-GAP Gram on 14 x 14 images
    assert _fused.auto_fuse(True, 1, 1) and not _fused.auto_fuse(False, 10**9, 10**6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gap-relu", "flatten-relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_fused_dual_equals_eager(images, dtype, name, monkeypatch):
    # compiles (seconds to minutes on a cold machine); skipped where torch.compile cannot run. Symmetric tiles
    # (pairs i <= j, pixel pairs or the diagonal layout) and a cross kernel (self-kernels through the dual)
    monkeypatch.delenv("NTKIT_NO_COMPILE", raising=False)
    arch = ARCHS[name]()
    x = images.to(dtype)
    for x2 in (None, x[:4] * 0.7):
        assert_fused_equals_eager(arch, x, x2, dtype)
