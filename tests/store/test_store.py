"""store_kernel in process: values, exact symmetry, resume after a crash, and refusals.

The values are checked against neural-tangents' reference kernels (an independent implementation)
and against ntkit's in-memory kernels; resumption is checked bit for bit against an uninterrupted run.
"""

import errno
import json
import shutil

import numpy as np
import pytest
import torch
import zarr

import ntkit
from conftest import load_reference, reference_cases
from ntkit.store import MANIFEST_NAME, StoreError, store_kernel
from instrumented_kernel import Instrumented

NTK = ntkit.mlp(depth=3, b_std=0.1).kernel_fn("ntk")


@pytest.fixture
def x():
    return torch.randn(90, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _manifest(path):
    return json.loads((path / MANIFEST_NAME).read_text())


def test_matches_neural_tangents_reference(tmp_path):
    # tiles smaller than the inputs, so several tiles (and mirrored ones) make up each matrix
    name, p = next(c for c in reference_cases() if "relu_depth4_ntk" in c[0])
    cfg, z = load_reference(p)
    k = ntkit.from_config(json.dumps(cfg)).kernel_fn("ntk")
    gram = store_kernel(k, z["x2"], path=tmp_path / "gram", tile_size=7)[:]
    cross = store_kernel(k, z["x1"], z["x2"], path=tmp_path / "cross", tile_size=4)[:]
    for got, ref in ((gram, z["ntk_x2_x2"]), (cross, z["ntk_x1_x2"])):
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()
    assert np.array_equal(gram, gram.T)  # exactly symmetric: off-diagonal tiles are mirrored


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_in_memory_kernel(tmp_path, x, dtype):
    arr = store_kernel(NTK, x, path=tmp_path / "s", tile_size=32, dtype=dtype, progress=False)
    assert isinstance(arr, zarr.Array) and arr.dtype == np.dtype(str(dtype).removeprefix("torch."))
    assert arr.chunks == (32, 32) and arr.attrs["ntkit"]["complete"] is True
    ref = NTK(x, dtype=dtype).numpy()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(arr[:], ref, rtol=tol, atol=tol * np.abs(ref).max())
    lap = ntkit.Laplace(3.0)
    x2 = x[:41] * 0.5
    cross = store_kernel(lap, x, x2, path=tmp_path / "c", tile_size=16, dtype=dtype)[:]
    np.testing.assert_allclose(cross, lap(x, x2, dtype=dtype).numpy(), rtol=tol, atol=tol)


def test_default_dtype_and_tile(tmp_path, x):
    arr = store_kernel(NTK, x, path=tmp_path / "s")
    assert arr.dtype == np.float64  # ntkit's default for analytic kernels
    assert arr.chunks == (90, 90)  # small inputs: one tile
    assert _manifest(tmp_path / "s")["tile_size"] == 90
    from ntkit.store._store import _choose_tile

    # zarr stores edge chunks at full size: 13 tiles of 3847 cover 50 000 rows with 11 rows of padding, not 3248
    assert _choose_tile(50_000, 0, 4, 2e9) == 3847
    assert _choose_tile(50_000, 0, 8, 1e8) == 1021  # the budget allows 1024; evened out over 49 tiles


def test_resume_after_crash_is_bit_identical(tmp_path, x):
    ref = store_kernel(NTK, x, path=tmp_path / "ref", tile_size=20, dtype=torch.float32)[:]  # 5 x 5 grid, 15 tiles
    path = tmp_path / "s"
    crashing = Instrumented(NTK, fail_after=6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        store_kernel(crashing, x, path=path, tile_size=20, dtype=torch.float32)
    man = _manifest(path)
    assert len(man["completed"]) == 6 and man["complete"] is False
    half = zarr.open_array(str(path), mode="r")
    assert half.attrs["ntkit"]["complete"] is False
    assert np.isnan(half[:]).any()  # a missing tile reads as NaN, never as a number
    resumed = Instrumented(NTK)
    arr = store_kernel(resumed, x, path=path, dtype=torch.float32)  # tile_size=None keeps the store's grid
    assert resumed.calls == 15 - 6  # only the missing tiles
    assert np.array_equal(arr[:].view(np.uint32), ref.view(np.uint32))
    assert _manifest(path)["complete"] is True and arr.attrs["ntkit"]["complete"] is True
    again = Instrumented(NTK)
    store_kernel(again, x, path=path, dtype=torch.float32)  # complete: returned without computing
    assert again.calls == 0


def test_refuses_store_of_other_inputs_or_kernel(tmp_path, x):
    path = tmp_path / "s"
    store_kernel(NTK, x, path=path, tile_size=45)
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    x_other = x.clone()
    x_other[3, 4] += 1e-9
    with pytest.raises(StoreError, match="x1: same shape .* different values"):
        store_kernel(NTK, x_other, path=path)
    with pytest.raises(StoreError, match=r"x1: stored shape \(90, 12\), given \(89, 12\)"):
        store_kernel(NTK, x[:89], path=path)
    with pytest.raises(StoreError, match="x2: stored None"):
        store_kernel(NTK, x, x, path=path)
    with pytest.raises(StoreError, match="the kernel"):
        store_kernel(ntkit.mlp(depth=3, b_std=0.2).kernel_fn("ntk"), x, path=path)
    with pytest.raises(StoreError, match="the kernel"):
        store_kernel(ntkit.mlp(depth=3, b_std=0.1).kernel_fn("nngp"), x, path=path)
    with pytest.raises(StoreError, match="the dtype"):
        store_kernel(NTK, x, path=path, dtype=torch.float32)
    with pytest.raises(StoreError, match="tile_size=45"):
        store_kernel(NTK, x, path=path, tile_size=30)
    after = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert after == before  # never touched


def test_refuses_path_that_is_not_an_ntkit_store(tmp_path, x):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "data.txt").write_text("precious")
    with pytest.raises(StoreError, match="not an ntkit kernel store"):
        store_kernel(NTK, x, path=other)
    assert sorted(p.name for p in other.iterdir()) == ["data.txt"]
    assert (other / "data.txt").read_text() == "precious"
    a_file = tmp_path / "file.zarr"
    a_file.write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        store_kernel(NTK, x, path=a_file)
    assert a_file.read_text() == "x"
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / MANIFEST_NAME).write_text('{"format": "something else"}')
    with pytest.raises(StoreError, match="not an ntkit kernel store manifest"):
        store_kernel(NTK, x, path=fake)
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory is fine
    assert store_kernel(NTK, x, path=empty).shape == (90, 90)


def test_bad_inputs_fail_before_touching_disk(tmp_path, x):
    bad = x.clone()
    bad[7, 2] = float("nan")
    path = tmp_path / "s"
    with pytest.raises(ValueError, match="x1 row 7 contains NaN"):
        store_kernel(NTK, bad, path=path)
    with pytest.raises(ValueError, match="x2 row 7 contains NaN"):
        store_kernel(NTK, x, bad, path=path)
    with pytest.raises(ValueError, match="same number of features|must match"):
        store_kernel(NTK, x, x[:, :5], path=path)
    with pytest.raises(TypeError, match="kernel_fn"):
        store_kernel(ntkit.mlp(depth=2), x, path=path)
    with pytest.raises(TypeError, match="KernelFunction"):
        store_kernel(lambda a, b: a @ b.T, x, path=path)
    with pytest.raises(ValueError, match="tile_size must be a positive integer"):
        store_kernel(NTK, x, path=path, tile_size=0)
    with pytest.raises(ntkit.MemoryBudgetError, match="memory budget"):
        store_kernel(NTK, x, path=path, tile_size=90, memory_budget=1e5)
    assert not path.exists()


def test_full_disk_keeps_finished_tiles(tmp_path, x, monkeypatch):
    ref = store_kernel(NTK, x, path=tmp_path / "ref", tile_size=30)[:]  # 3 x 3 grid, 6 tiles
    path = tmp_path / "s"
    import zarr.storage._local as local

    real_put, writes = local._put, []

    def put(p, value, exclusive=False):  # the disk fills up on the 5th chunk write
        if "/c/" in str(p) and len(writes) >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        writes.append(p)
        return real_put(p, value, exclusive)

    monkeypatch.setattr(local, "_put", put)
    with pytest.raises(OSError, match="is full .* tiles are safely stored and kept") as info:
        store_kernel(Instrumented(NTK), x, path=path, tile_size=30)
    assert info.value.errno == errno.ENOSPC
    done = len(_manifest(path)["completed"])
    # tiles (0,0) and (0,1)+(1,0) are stored; (0,2) got its chunk written but not its mirror (2,0), so it is
    # not marked complete and is recomputed
    assert done == 2
    monkeypatch.setattr(local, "_put", real_put)
    resumed = Instrumented(NTK)
    arr = store_kernel(resumed, x, path=path)
    assert resumed.calls == 6 - done
    assert np.array_equal(arr[:], ref)


def test_not_enough_free_space_is_refused_up_front(tmp_path, x, monkeypatch):
    import ntkit.store._store as mod

    monkeypatch.setattr(mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(OSError, match="need 63.3 KiB on disk.* has 100 B free") as info:
        store_kernel(NTK, x, path=tmp_path / "s")
    assert info.value.errno == errno.ENOSPC
    # edge chunks count at full size: 3 x 3 grid of 40-tiles, 9 chunks of 40 x 40 float64 = 112.5 KiB
    with pytest.raises(OSError, match="need 112.5 KiB on disk"):
        store_kernel(NTK, x, path=tmp_path / "t", tile_size=40)


def test_progress_is_silent_off_a_terminal(tmp_path, x, capsys):
    store_kernel(NTK, x, path=tmp_path / "s", tile_size=30, progress=True)
    store_kernel(NTK, x, path=tmp_path / "t", tile_size=30, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_bar_counts_tiles(tmp_path, x, monkeypatch):
    import ntkit.store._store as mod

    bars = []
    real = mod.progress_bar

    def spy(**kw):
        bar = real(**kw)
        steps = []
        update = bar.update
        bar.update = lambda k=1: (steps.append(k), update(k))
        bars.append((kw, steps))
        return bar

    monkeypatch.setattr(mod, "progress_bar", spy)
    with pytest.raises(RuntimeError):
        store_kernel(Instrumented(NTK, fail_after=2), x, path=tmp_path / "s", tile_size=30, progress=False)
    store_kernel(Instrumented(NTK), x, path=tmp_path / "s", progress=False)
    (kw1, steps1), (kw2, steps2) = bars
    assert kw1["total"] == 6 and kw1["unit"] == "tile" and kw1["enabled"] is False
    assert steps1 == [0, 1, 1]  # two tiles before the crash
    assert steps2 == [2, 1, 1, 1, 1]  # resumed at 2 of 6, then 4 more
