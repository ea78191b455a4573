"""Conv stacks with global average pooling computed a few pairs at a time (ntkit.kernels._conv_gap).

Every case is checked against the layer-by-layer computation it replaces (the same architecture with the
chunked path switched off), to rounding; the neural-tangents reference cases (test_conv_reference.py) go
through the chunked path as well.
"""

import contextlib
import math

import pytest
import torch

import ntkit
from conftest import assert_fused_equals_eager, images_with_parallel_pair
from ntkit.kernels import _conv_gap, _fused

F64 = torch.float64


@contextlib.contextmanager
def _eager_chunks(monkeypatch):
    """The chunked path without the compiled conv loops (the reference of the compiled stack)."""
    with monkeypatch.context() as m:
        m.setattr(_conv_gap, "compiled_plan", lambda *a: None)
        yield


@pytest.fixture(autouse=True)
def chunks_for_small_tiles(monkeypatch):
    # the test images are tiny: compute their tiles in chunks too (the library does so only for tiles whose
    # state would not fit in the last-level cache); the chunks themselves, not the native stack
    # (test_cntk_native.py checks it against them)
    monkeypatch.setattr(_conv_gap, "TILE_MIN_BYTES", 0)
    monkeypatch.setattr(_conv_gap, "native_plan", lambda *a: None)


def _layer_path(monkeypatch, arch, *args, **kw):
    with monkeypatch.context() as m:
        m.setattr(_conv_gap, "plan", lambda *a: None)
        return arch.kernel(*args, **kw)


def _net(act, conv2=None, tail=(ntkit.Dense(1, 1.5, 0.1),), first=None):
    first = first or ntkit.Conv(8, (3, 3), W_std=1.4, b_std=0.1)
    conv2 = conv2 or ntkit.Conv(8, (3, 2), strides=(1, 2), padding="VALID", W_std=1.3, b_std=0.2)
    return ntkit.serial(first, act, conv2, act, ntkit.GlobalAvgPool(), *tail)


ARCHS = {
    "relu-valid-strided": lambda: _net(ntkit.Relu()),
    "relu-same-5x5": lambda: _net(ntkit.Relu(), ntkit.Conv(8, (5, 5), padding="SAME", W_std=1.2, b_std=None)),
    "leaky": lambda: _net(ntkit.LeakyRelu(0.2), ntkit.Conv(8, (3, 3), W_std=1.1, b_std=0.3)),
    "abrelu-frozen-first": lambda: _net(ntkit.ABRelu(-0.3, 1.1), first=ntkit.Conv(8, (3, 3), W_std=1.4, b_std=0.1,
                                                                                   trainable=False)),
    "erf": lambda: _net(ntkit.Erf(1.0, 1.2, 0.1)),
    "gelu": lambda: _net(ntkit.Gelu()),
    "conv-last": lambda: ntkit.serial(ntkit.Conv(8, (3, 3), W_std=1.4, b_std=0.1), ntkit.Relu(),
                                      ntkit.Conv(8, (3, 3), W_std=1.2), ntkit.GlobalAvgPool(), ntkit.Dense(1)),
    "dense-relu-after": lambda: _net(ntkit.Relu(), tail=(ntkit.Dense(16, 1.3, 0.2), ntkit.Relu(), ntkit.Dense(1))),
    "signals-1d": lambda: ntkit.serial(ntkit.Conv(8, (3,), W_std=1.4, b_std=0.1), ntkit.Relu(),
                                       ntkit.Conv(8, (2,), strides=(2,), padding="SAME", W_std=1.2), ntkit.Relu(),
                                       ntkit.GlobalAvgPool(), ntkit.Dense(1)),
}


@pytest.fixture(scope="module")
def images():
    return images_with_parallel_pair((6, 7, 5, 2), seed=5, pair=(1, 4), factor=3.0)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_chunks_equal_the_layer_path(name, images, monkeypatch):
    arch = ARCHS[name]()
    x = images[..., 0, :] if name == "signals-1d" else images  # (n, L, C) signals
    assert _conv_gap.plan(arch.layers, len(arch.layers), "gaussian", "ntk") is not None
    other = x[:3] * 0.6 + 0.1
    for x2, block, chunk_bytes in [(None, None, None), (None, 4, 1), (other, None, 1), (other, 2, None)]:
        with monkeypatch.context() as m:
            if chunk_bytes is not None:
                m.setattr(_conv_gap, "CHUNK_BYTES", chunk_bytes)  # one pair per chunk
            got = arch.kernel(x, x2, dtype=F64, block_size=block)
        want = _layer_path(monkeypatch, arch, x, x2, dtype=F64, block_size=block)
        for u, v in zip(want, got):
            torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14)
        if x2 is None:
            assert torch.equal(got.ntk, got.ntk.T)


def test_one_kernel_and_the_nngp_alone(images, monkeypatch):
    arch = ARCHS["relu-same-5x5"]()
    for get in ("nngp", "ntk"):
        got = arch.kernel(images, get=get, dtype=F64)
        want = _layer_path(monkeypatch, arch, images, get=get, dtype=F64)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # no trainable layer before the pooling: Theta is the readout's NNGP-like constant path
    frozen = ntkit.serial(ntkit.Conv(4, (3, 3), W_std=1.3, trainable=False), ntkit.Relu(), ntkit.GlobalAvgPool(),
                          ntkit.Dense(1, 1.0, 0.2))
    got = frozen.kernel(images, dtype=F64)
    want = _layer_path(monkeypatch, frozen, images, dtype=F64)
    for u, v in zip(want, got):
        torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14)


def test_parallel_inputs_keep_exact_correlations(images):
    # (x1, 3 x1): Sigma scales by 3 and Theta too through bias-free ReLU layers (degree-1 homogeneity), which
    # needs the self-correlations snapped to 1 at every position pair as in the layer path
    arch = ntkit.serial(ntkit.Conv(4, (3, 3), W_std=1.4), ntkit.Relu(), ntkit.Conv(4, (3, 3), W_std=1.3), ntkit.Relu(),
                        ntkit.GlobalAvgPool(), ntkit.Dense(1, 1.2))
    k = arch.kernel(images, dtype=F64)
    for t in k:
        torch.testing.assert_close(t[1, 4], 3.0 * t[1, 1], rtol=1e-13, atol=0)
        torch.testing.assert_close(t[4, 4], 9.0 * t[1, 1], rtol=1e-13, atol=0)


def test_other_architectures_keep_the_layer_path():
    conv, relu, gap = ntkit.Conv(4, (3, 3), W_std=1.3), ntkit.Relu(), ntkit.GlobalAvgPool()
    ok = [conv, relu, conv, relu, gap, ntkit.Dense(1)]
    assert _conv_gap.plan(ok, 5, "gaussian", "ntk") == 4
    assert _conv_gap.plan(ok, 6, "gaussian", "ntk") == 4  # pixel pairs forced to the end
    assert _conv_gap.plan(ok, 5, "orthogonal", "ntk") is None  # delta-orthogonal convs
    assert _conv_gap.plan(ok, 5, "gaussian", "standard") is None
    for layers in ([conv, relu, ntkit.AvgPool((2, 2)), gap, ntkit.Dense(1)],
                   [conv, ntkit.LayerNorm(), relu, gap, ntkit.Dense(1)],
                   [conv, relu, ntkit.residual(conv, relu, conv), gap, ntkit.Dense(1)],
                   [conv, relu, ntkit.Flatten(), ntkit.Dense(1)],
                   [conv, relu, relu, gap, ntkit.Dense(1)],      # an activation of an activation: the layer path
                   [relu, conv, relu, gap, ntkit.Dense(1)]):     # says what is wrong
        assert _conv_gap.plan(layers, len(layers), "gaussian", "ntk") is None


def test_pooled_dual_equals_dual_then_mean(monkeypatch):
    # abrelu_dual_sum (the last activation and the pooling in one pass), eager expression
    monkeypatch.setenv("NTKIT_NO_COMPILE", "1")
    g = torch.Generator().manual_seed(1)
    q1 = torch.rand(3, 6, 1, generator=g, dtype=F64) + 0.2
    q2 = torch.rand(3, 1, 6, generator=g, dtype=F64) + 0.2
    cov = (torch.rand(3, 6, 6, generator=g, dtype=F64) * 2 - 1) * (q1 * q2).sqrt()
    theta = torch.randn(3, 6, 6, generator=g, dtype=F64)
    act = ntkit.ABRelu(-0.4, 1.0)
    k = (act.a - act.b) ** 2 / (2 * math.pi)
    s1, s2 = q1.sqrt(), q2.sqrt()
    eps = torch.finfo(F64).eps
    f = ((1 + 4 * eps) / s1, 1 / s2, s1 * k, s2, (act.a**2 + act.b**2) / 2, k)
    s, t = _fused.abrelu_dual_sum(cov, theta, *f)
    want, dot = act.dual(cov, q1, q2)
    torch.testing.assert_close(s, want.sum(dim=(1, 2)), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(t, (theta * dot).sum(dim=(1, 2)), rtol=1e-13, atol=1e-15)
    s_only, none = _fused.abrelu_dual_sum(cov, None, *f)
    assert none is None and torch.equal(s_only, s)


def test_fused_chunks_equal_eager_without_compiler(images, monkeypatch):
    monkeypatch.setenv("NTKIT_NO_COMPILE", "1")
    arch = ARCHS["leaky"]()
    for x2 in (None, images[:2] * 0.5):
        a = arch.kernel(images, x2, dtype=F64, fused=False)
        b = arch.kernel(images, x2, dtype=F64, fused=True)
        for u, v in zip(a, b):
            torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14)


def test_one_pixel_images_and_the_fused_nngp_alone(monkeypatch):
    # 1 x 1 images (one position pair per pair of inputs: no pairs of positions, the diagonal layout) with a
    # large block: the layer path, not the chunks; and get="nngp" through the fused (eager-fallback) dual
    arch = ntkit.serial(ntkit.Conv(4, (1, 1), W_std=1.3, b_std=0.1), ntkit.Relu(), ntkit.GlobalAvgPool(),
                        ntkit.Dense(1, 1.0, 0.1))
    x = torch.randn(5, 1, 1, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    got = arch.kernel(x, dtype=F64, block_size=4096)
    flat = ntkit.serial(ntkit.Dense(4, 1.3, 0.1), ntkit.Relu(), ntkit.Dense(1, 1.0, 0.1)).kernel(x[:, 0, 0], dtype=F64)
    for u, v in zip(flat, got):
        torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14)
    monkeypatch.setenv("NTKIT_NO_COMPILE", "1")
    net = ARCHS["leaky"]()
    imgs = torch.randn(4, 7, 5, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    want = _layer_path(monkeypatch, net, imgs, get="nngp", dtype=F64, fused=False)
    torch.testing.assert_close(net.kernel(imgs, get="nngp", dtype=F64, fused=True), want, rtol=1e-12, atol=1e-14)


# -- the compiled stack (fused=True): padded layout, one compiled loop per conv and per activation ------------
def _same_net(act, f2=(3, 3), f3=(3, 3), b_std=0.05):
    return ntkit.serial(ntkit.Conv(4, (3, 3), W_std=1.4, b_std=b_std), act,
                        ntkit.Conv(4, f2, W_std=1.3, b_std=b_std), act,
                        ntkit.Conv(4, f3, W_std=1.2, b_std=b_std), act, ntkit.GlobalAvgPool(), ntkit.Dense(1, 1.1))


def test_compiled_plan_takes_only_what_it_computes(monkeypatch):
    monkeypatch.delenv("NTKIT_NO_COMPILE", raising=False)
    x = torch.zeros(1, 6, 5, 1, dtype=F64)

    def steps(arch, fused=True, need_ntk=True, size=(6, 5), dtype=F64):
        _, layers = arch._input_plan(x, "gaussian")
        return _conv_gap.compiled_plan(layers[:layers.index(ntkit.GlobalAvgPool()) + 1], size, fused, need_ntk,
                                       dtype)

    assert steps(_same_net(ntkit.Relu()), size=(28, 28)) is not None
    assert steps(_same_net(ntkit.Relu()), size=(14, 14)) is None  # small images: the chunks are faster
    monkeypatch.setattr(_conv_gap, "COMPILED_MIN_NUMBERS", 0)
    ok = steps(_same_net(ntkit.Relu()))
    assert [(s["Ho"], s["Wo"], s["Wp"], s["ph"], s["pw"]) for s in ok] == [(6, 5, 7, 1, 1)] * 2
    assert steps(_same_net(ntkit.Relu()), fused=False) is None
    assert steps(_same_net(ntkit.Relu()), dtype=torch.float32) is None  # float32: the chunks are as fast
    assert steps(_same_net(ntkit.Relu()), need_ntk=False) is None
    assert steps(_same_net(ntkit.Erf())) is None  # not the arc-cosine family: eager chunks
    assert steps(_same_net(ntkit.Relu(), f2=(3, 5), f3=(3, 5))) is not None  # same padded width 9 twice
    assert steps(_same_net(ntkit.Relu(), f3=(3, 5))) is None  # padded widths 7 then 9: rows would not line up
    strided = ntkit.serial(ntkit.Conv(4, (3, 3), W_std=1.4), ntkit.Relu(), ntkit.Conv(4, (3, 3), strides=(2, 2)),
                           ntkit.Relu(), ntkit.GlobalAvgPool(), ntkit.Dense(1))
    assert steps(strided) is None
    monkeypatch.setenv("NTKIT_NO_COMPILE", "1")
    assert steps(_same_net(ntkit.Relu())) is None


@pytest.mark.slow
@pytest.mark.parametrize("case", ["relu-3x3", "leaky-5x5-nobias", "abs-3x5"])
@pytest.mark.parametrize("dtype", [torch.float64])
def test_compiled_stack_equals_the_chunks(case, dtype, images, monkeypatch):
    # compiles (a minute on a cold machine); skipped where torch.compile cannot run
    monkeypatch.delenv("NTKIT_NO_COMPILE", raising=False)
    arch = {"relu-3x3": lambda: _same_net(ntkit.Relu()),
            "leaky-5x5-nobias": lambda: _same_net(ntkit.LeakyRelu(0.1), (5, 5), (5, 5), None),
            "abs-3x5": lambda: _same_net(ntkit.Abs(), (3, 5), (3, 5))}[case]()
    x = images.to(dtype)
    monkeypatch.setattr(_conv_gap, "COMPILED_MIN_NUMBERS", 0)  # small test images through the compiled stack
    monkeypatch.setattr(_conv_gap, "native_plan", lambda *a: None)  # not the native stack (test_cntk_native.py)
    calls = []
    orig = _conv_gap.compiled_stack
    monkeypatch.setattr(_conv_gap, "compiled_stack", lambda *a: calls.append(1) or orig(*a))
    for x2 in (None, x[:3] * 0.7):
        assert_fused_equals_eager(arch, x, x2, dtype, eager=_eager_chunks(monkeypatch))
    assert calls
    # parallel inputs (1, 4) stay exactly proportional (bias-free, degree-1 homogeneous) through the compiled loops
    if case == "leaky-5x5-nobias" and dtype == F64:
        k = arch.kernel(x, dtype=dtype, fused=True)
        for t in k:
            torch.testing.assert_close(t[1, 4], 3.0 * t[1, 1], rtol=1e-13, atol=0)


def test_chunks_only_where_a_tile_leaves_the_cache(monkeypatch):
    monkeypatch.undo()  # the library's own threshold
    # a symmetric tile of 4 images of 28 x 28 (10 pairs): 49 MB per state tensor in float64, 25 MB in float32
    assert _conv_gap.use_chunks(10, 784**2, 8) and not _conv_gap.use_chunks(10, 784**2, 4)
    calls = []
    orig = _conv_gap.gap_state
    monkeypatch.setattr(_conv_gap, "gap_state", lambda *a, **k: calls.append(1) or orig(*a, **k))
    arch = ARCHS["leaky"]()
    arch.kernel(torch.randn(3, 6, 5, 1, dtype=F64), dtype=F64)
    assert not calls  # a small tile: layer by layer
    monkeypatch.setattr(_conv_gap, "TILE_MIN_BYTES", 0)
    arch.kernel(torch.randn(3, 6, 5, 1, dtype=F64), dtype=F64)
    assert calls


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_duals_in_chunks_equal_eager(dtype, images, monkeypatch):
    # the chunks with the compiled dual and the compiled pooled dual (abrelu_dual_sum); compiles
    monkeypatch.delenv("NTKIT_NO_COMPILE", raising=False)
    monkeypatch.setattr(_conv_gap, "compiled_plan", lambda *a: None)
    monkeypatch.setattr(_conv_gap, "native_plan", lambda *a: None)
    arch = ARCHS["leaky"]()
    x = images.to(dtype)
    for x2 in (None, x[:3] * 0.7):
        assert_fused_equals_eager(arch, x, x2, dtype)


def test_compiled_stack_falls_back_to_the_chunks(images, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.delenv("NTKIT_NO_COMPILE", raising=False)
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(_fused, "_compiled", {})
    monkeypatch.setattr(_fused, "_failed", set())
    monkeypatch.setattr(_conv_gap, "COMPILED_MIN_NUMBERS", 0)
    monkeypatch.setattr(_conv_gap, "native_plan", lambda *a: None)
    arch = _same_net(ntkit.Relu())
    with pytest.warns(RuntimeWarning, match="using eager torch"):
        got = arch.kernel(images, dtype=F64, fused=True)
    want = _layer_path(monkeypatch, arch, images, dtype=F64, fused=False)
    for u, v in zip(want, got):
        torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14)
