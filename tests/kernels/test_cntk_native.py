"""The native CNTK-GAP stack (ntkit/kernels/_cntk_gap.c, built by ntkit.kernels._native).

Every case is checked against the eager chunked path (``fused=False``: the torch expressions of the layer
rules, a different computation order), to rounding; the chunked path is itself checked against the
layer-by-layer path (test_conv_gap.py) and neural-tangents (test_conv_reference.py).
"""

import os
import warnings

import pytest
import torch

import ntkit
from conftest import images_with_parallel_pair
from ntkit.kernels import _conv_gap, _fused, _native

F64 = torch.float64


@pytest.fixture(autouse=True)
def native_on(monkeypatch):
    monkeypatch.delenv("NTKIT_NO_COMPILE", raising=False)
    monkeypatch.setattr(_conv_gap, "TILE_MIN_BYTES", 0)  # tiny test images: the chunked / native path too
    # no torch.compile here (slow to build): where the native stack falls back, the chunks run eagerly
    monkeypatch.setattr(_fused, "compile_available", lambda: False)
    if _native.load("cntk_gap") is None:
        pytest.skip("no C compiler: the native loops cannot be built here")


@pytest.fixture
def spy(monkeypatch):
    calls = []
    orig = _conv_gap.native_stack

    def counted(*args):
        calls.append(1)
        return orig(*args)

    monkeypatch.setattr(_conv_gap, "native_stack", counted)
    return calls


def _same_net(act, f2=(3, 3), f3=(3, 3), b_std=0.05, padding="SAME"):
    return ntkit.serial(ntkit.Conv(4, (3, 3), W_std=1.4, b_std=b_std), act,
                        ntkit.Conv(4, f2, W_std=1.3, b_std=b_std, padding=padding), act,
                        ntkit.Conv(4, f3, W_std=1.2, b_std=b_std), act, ntkit.GlobalAvgPool(), ntkit.Dense(1, 1.1))


NETS = {
    "relu-3x3": lambda: _same_net(ntkit.Relu()),
    "leaky-5x5-nobias": lambda: _same_net(ntkit.LeakyRelu(0.1), (5, 5), (5, 5), None),
    "abs-3x5": lambda: _same_net(ntkit.Abs(), (3, 5), (3, 5)),
    "abrelu-2x2-even": lambda: _same_net(ntkit.ABRelu(-0.3, 1.2), (2, 2), (2, 2)),  # SAME pads 0 before, 1 after
    "one-conv": lambda: ntkit.serial(ntkit.Conv(4, (3, 3), W_std=1.4, b_std=0.1), ntkit.Relu(), ntkit.GlobalAvgPool(),
                                     ntkit.Dense(1)),
    # a tall VALID filter, then SAME (the same padded width 5); filters of 4 rows (SAME pads 1 before, 2 after) and
    # of 9 rows on 7-row images (taller than the image); five layers (four rings at once)
    "tall-valid-then-same": lambda: ntkit.serial(
        ntkit.Conv(4, (3, 3), W_std=1.4, b_std=0.1), ntkit.Relu(),
        ntkit.Conv(4, (5, 3), padding="VALID", W_std=1.3, b_std=0.2), ntkit.Relu(),
        ntkit.Conv(4, (3, 3), W_std=1.2, b_std=0.1), ntkit.Relu(), ntkit.GlobalAvgPool(), ntkit.Dense(1)),
    "even-and-taller-than-image": lambda: _same_net(ntkit.LeakyRelu(0.3), (4, 3), (9, 3)),
    "even-width-4": lambda: _same_net(ntkit.Relu(), (3, 4), (3, 4)),  # pads 1 before, 2 after
    "wider-than-image": lambda: _same_net(ntkit.Abs(), (3, 7), (3, 7)),  # 7 columns on 5: pw = 3
    "deep": lambda: ntkit.serial(*[lay for i in range(5) for lay in (ntkit.Conv(4, (3, 3), W_std=1.4, b_std=0.1 * i),
                                                                     ntkit.LeakyRelu(0.2))],
                                 ntkit.GlobalAvgPool(), ntkit.Dense(1)),
    "valid-then-relu-head": lambda: ntkit.serial(
        ntkit.Conv(4, (3, 3), padding="VALID", W_std=1.4, b_std=0.1), ntkit.Relu(),
        ntkit.Conv(4, (3, 3), padding="VALID", W_std=1.3, b_std=0.2), ntkit.Relu(), ntkit.GlobalAvgPool(),
        ntkit.Dense(8, 1.2, 0.1), ntkit.Relu(), ntkit.Dense(1)),
}


@pytest.fixture(scope="module")
def images():
    return images_with_parallel_pair((6, 7, 5, 2), seed=7, pair=(1, 4), factor=3.0)


@pytest.mark.parametrize("name", sorted(NETS))
def test_native_equals_the_eager_chunks(name, images, spy):
    arch = NETS[name]()
    other = images[:3] * 0.6 + 0.1
    for x2, block in [(None, None), (None, 4), (other, None), (other, 2)]:
        got = arch.kernel(images, x2, dtype=F64, block_size=block, fused=True)
        want = arch.kernel(images, x2, dtype=F64, block_size=block, fused=False)
        for u, v in zip(want, got):
            torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14)
        if x2 is None:
            assert torch.equal(got.ntk, got.ntk.T)
    assert spy, "the native stack was not used"


@pytest.mark.parametrize("channels, first", [(1, (3, 3)), (2, (2, 2)), (1, (1, 1)), (3, (3, 3))])
def test_native_patch_product(channels, first, spy):
    # the first convolution's patch product with K = 9, 8, 1 and 27 numbers per patch; parallel inputs stay
    # exactly proportional
    x = images_with_parallel_pair((5, 6, 5, channels), seed=11, pair=(0, 3), factor=2.0)
    arch = ntkit.serial(ntkit.Conv(4, first, W_std=1.4), ntkit.LeakyRelu(0.1),
                        ntkit.Conv(4, (3, 3), W_std=1.3), ntkit.LeakyRelu(0.1), ntkit.GlobalAvgPool(),
                        ntkit.Dense(1, 1.1))
    got = arch.kernel(x, x[:2] * 0.5, dtype=F64, fused=True)
    want = arch.kernel(x, x[:2] * 0.5, dtype=F64, fused=False)
    for u, v in zip(want, got):
        torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14)
    for t in arch.kernel(x, dtype=F64, fused=True):
        torch.testing.assert_close(t[0, 3], 2.0 * t[0, 0], rtol=1e-13, atol=0)
    assert spy


@pytest.mark.parametrize("shape", [(1, 5), (6, 1)])
def test_native_on_one_row_and_one_column_images(shape, spy):
    x = torch.randn(4, *shape, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    arch = NETS["relu-3x3"]()
    for u, v in zip(arch.kernel(x, dtype=F64, fused=False), arch.kernel(x, dtype=F64, fused=True)):
        torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14)
    assert spy


def test_native_stays_inside_its_workspace(images, monkeypatch, spy):
    # every thread's workspace placed between NaN guards: a write outside it would change a guard, a read
    # outside it would bring a NaN into the kernel
    guards = []

    def guarded(numbers, like):
        big = like.new_full((numbers + 2048,), float("nan"))
        inner = big[1024:1024 + numbers]
        inner.zero_()
        guards.append(big)
        return inner

    monkeypatch.setattr(_conv_gap, "_workspace", guarded)
    for name in ("relu-3x3", "leaky-5x5-nobias", "tall-valid-then-same", "one-conv"):
        arch = NETS[name]()
        got = arch.kernel(images, images[:2] * 0.5, dtype=F64, fused=True)
        want = arch.kernel(images, images[:2] * 0.5, dtype=F64, fused=False)
        for u, v in zip(want, got):
            torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14)
    assert spy and guards
    for big in guards:
        assert bool(big[:1024].isnan().all()) and bool(big[-1024:].isnan().all())


def test_native_by_default_and_not_with_fused_false(images, spy):
    arch = NETS["relu-3x3"]()
    got = arch.kernel(images, dtype=F64)  # fused=None: no compilation per process, so the native loop is used
    assert len(spy) == 1
    want = arch.kernel(images, dtype=F64, fused=False)  # eager torch, as asked
    assert len(spy) == 1
    for u, v in zip(want, got):
        torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14)
    arch.kernel(images.float(), dtype=torch.float32, fused=True)  # float64 only
    assert len(spy) == 1


def test_native_nngp_alone(images, spy):
    arch = NETS["relu-3x3"]()
    got = arch.kernel(images, get="nngp", dtype=F64, fused=True)
    torch.testing.assert_close(got, arch.kernel(images, get="nngp", dtype=F64, fused=False), rtol=1e-12, atol=1e-14)
    assert spy


def test_native_keeps_exact_correlations(images, spy):
    # (x1, 3 x1) through bias-free leaky ReLUs (degree-1 homogeneous): exactly proportional kernels, which needs
    # every self-correlation snapped to 1 (the variances' recursion equals the self pairs' diagonal bitwise)
    arch = NETS["leaky-5x5-nobias"]()
    k = arch.kernel(images, dtype=F64, fused=True)
    assert spy
    for t in k:
        torch.testing.assert_close(t[1, 4], 3.0 * t[1, 1], rtol=1e-13, atol=0)
        torch.testing.assert_close(t[4, 4], 9.0 * t[1, 1], rtol=1e-13, atol=0)


def test_native_threads_give_the_same_numbers(images):
    arch = NETS["abs-3x5"]()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = arch.kernel(images, dtype=F64, fused=True)
        torch.set_num_threads(3)  # pairs split between three threads (ctypes releases the GIL)
        three = arch.kernel(images, dtype=F64, fused=True)
    finally:
        torch.set_num_threads(before)
    for u, v in zip(one, three):
        assert torch.equal(u, v)


def test_zero_variance_falls_back_to_the_chunks(images, spy):
    # bias-free first layer and an all-zero image: zero variances, which the eager path's special cases handle
    arch = NETS["leaky-5x5-nobias"]()
    x = images.clone()
    x[2] = 0.0
    got = arch.kernel(x, dtype=F64, fused=True)
    want = arch.kernel(x, dtype=F64, fused=False)
    assert spy  # tried, then fell back
    for u, v in zip(want, got):
        torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14)
    assert float(got.nngp[2, 2]) == 0.0


def test_native_plan_takes_only_what_it_computes(monkeypatch):
    x = torch.zeros(1, 6, 5, 1, dtype=F64)

    def steps(arch, allowed=True, dtype=F64, device=torch.device("cpu")):
        _, layers = arch._input_plan(x, "gaussian")
        return _conv_gap.native_plan(layers[:layers.index(ntkit.GlobalAvgPool()) + 1], (6, 5), allowed, dtype, device)

    assert steps(_same_net(ntkit.Relu())) is not None
    assert steps(NETS["one-conv"]()) == []  # one convolution: no ring, the patch product and the pooled dual
    assert steps(_same_net(ntkit.Relu()), allowed=False) is None  # fused=False: eager torch
    assert steps(_same_net(ntkit.Relu()), dtype=torch.float32) is None
    assert steps(_same_net(ntkit.Relu()), device=torch.device("meta")) is None  # CPU only
    assert steps(_same_net(ntkit.Erf())) is None  # not the arc-cosine family
    assert steps(_same_net(ntkit.Relu(), f3=(3, 5))) is None  # padded widths 7 then 9
    strided = ntkit.serial(ntkit.Conv(4, (3, 3)), ntkit.Relu(), ntkit.Conv(4, (3, 3), strides=(2, 2)), ntkit.Relu(),
                           ntkit.GlobalAvgPool(), ntkit.Dense(1))
    assert steps(strided) is None
    monkeypatch.setenv("NTKIT_NO_COMPILE", "1")
    assert steps(_same_net(ntkit.Relu())) is None
    assert _native.load("cntk_gap") is None


def test_build_is_cached_and_a_failed_build_falls_back(images, tmp_path, monkeypatch, spy):
    monkeypatch.setattr(_native, "_libs", {})
    monkeypatch.setenv("NTKIT_CACHE_DIR", str(tmp_path / "cache"))
    assert _native.load("cntk_gap") is not None
    built = sorted(os.listdir(tmp_path / "cache"))
    libs = [f for f in built if f.endswith(".so")]
    assert len(libs) == 1 and libs[0].startswith("cntk_gap-")
    monkeypatch.setattr(_native, "_libs", {})
    assert _native.load("cntk_gap") is not None  # a new process: loaded from the cache, nothing rebuilt
    assert sorted(os.listdir(tmp_path / "cache")) == built

    monkeypatch.setattr(_native, "_libs", {})
    monkeypatch.setenv("NTKIT_CACHE_DIR", str(tmp_path / "other"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    arch = NETS["relu-3x3"]()
    with pytest.warns(RuntimeWarning, match="building the native cntk_gap loops failed"):
        got = arch.kernel(images, dtype=F64, fused=True)
    assert spy
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process, not at every call
        arch.kernel(images[:2], dtype=F64, fused=True)
    want = arch.kernel(images, dtype=F64, fused=False)
    for u, v in zip(want, got):
        torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14)


def test_refused_cpu_flags_fall_back_to_portable_ones(images, tmp_path, monkeypatch):
    monkeypatch.setattr(_native, "_libs", {})
    monkeypatch.setenv("NTKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_native, "_tuned", lambda: ["-fno-such-flag-anywhere"] + _native._PORTABLE)
    with pytest.warns(RuntimeWarning, match="built without CPU-specific flags"):
        assert _native.load("cntk_gap") is not None
    files = sorted(os.listdir(tmp_path))
    assert sum(f.endswith(".so") for f in files) == 1 and sum(f.endswith(".failed") for f in files) == 1
    monkeypatch.setattr(_native, "_libs", {})
    with pytest.warns(RuntimeWarning, match="built without CPU-specific flags"):  # remembered, not retried
        assert _native.load("cntk_gap") is not None
    assert sorted(os.listdir(tmp_path)) == files
    # where the CPU's features cannot be read, only portable flags are used (no -march=native library)
    monkeypatch.setattr(_native, "_libs", {})
    monkeypatch.setattr(_native, "_cpu_flags", lambda: "")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _native.load("cntk_gap") is not None
    arch = NETS["relu-3x3"]()
    for u, v in zip(arch.kernel(images, dtype=F64, fused=False), arch.kernel(images, dtype=F64, fused=True)):
        torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14)
