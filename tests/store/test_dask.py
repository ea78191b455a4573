"""store_kernel on a real dask.distributed LocalCluster (2 worker processes, loopback only).

The Dask path must write the same bits as the in-process path, including when it finishes a store
that an in-process run left half done.
"""

import errno
import time

import dask
import numpy as np
import pytest
import torch
import zarr

distributed = pytest.importorskip("distributed")

import ntkit  # noqa: E402
from ntkit.store import store_kernel  # noqa: E402

NTK = ntkit.mlp(depth=3, b_std=0.1).kernel_fn("ntk")


def _bits(a):
    return np.asarray(a[:]).view(np.uint32)


@pytest.fixture(scope="module")
def x():
    return torch.randn(300, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float32)


def test_local_cluster_gives_the_in_process_result(tmp_path, x, local_cluster_spy):
    started = local_cluster_spy
    ref = store_kernel(NTK, x, path=tmp_path / "ref", tile_size=64, dtype=torch.float32)  # 5 x 5 grid, 15 tiles
    got = store_kernel(NTK, x, path=tmp_path / "dask", tile_size=64, dtype=torch.float32, scheduler="local")
    assert np.array_equal(_bits(got), _bits(ref)) and got.attrs["ntkit"]["complete"] is True
    (kw, address, n_workers), = started
    assert address.startswith("tcp://127.0.0.1:") and kw["dashboard_address"] is None
    assert n_workers == min(2, kw["n_workers"]) and kw["threads_per_worker"] == 1


def test_client_and_address_finish_a_half_done_store(tmp_path, x, monkeypatch, single_thread):
    # single_thread restores torch's thread count, which the tasks set per worker (here: in this process)
    import ntkit.store._store as mod

    x2 = x[:130] * 0.7
    ref = store_kernel(NTK, x, x2, path=tmp_path / "ref", tile_size=50, dtype=torch.float32)  # 6 x 3 grid
    path = tmp_path / "s"
    real, calls = mod._compute_tile, []

    def crash_after_7(*args):
        if len(calls) == 7:
            raise RuntimeError("simulated crash")
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(mod, "_compute_tile", crash_after_7)  # in this process only, not on the workers
    with pytest.raises(RuntimeError, match="simulated crash"):
        store_kernel(NTK, x, x2, path=path, tile_size=50, dtype=torch.float32)
    monkeypatch.setattr(mod, "_compute_tile", real)
    # worker threads in this process (the worker processes are tested above), talking TCP on the loopback
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp",
                                  host="127.0.0.1", dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        assert len(cluster.workers) == 2
        # the rest of the half-done store through a Client, then the same store again through the address
        got = store_kernel(NTK, x, x2, path=path, dtype=torch.float32, scheduler=client)
        assert np.array_equal(_bits(got), _bits(ref))
        assert client.status == "running"  # a caller's client is left open
        sym_ref = store_kernel(NTK, x2, path=tmp_path / "sym_ref", tile_size=40, dtype=torch.float32)
        sym = store_kernel(NTK, x2, path=tmp_path / "sym", tile_size=40, dtype=torch.float32,
                           scheduler=cluster.scheduler_address)
        assert np.array_equal(_bits(sym), _bits(sym_ref))
        assert np.array_equal(sym[:], sym[:].T)

        # a full disk on the workers: a clear error here, finished tiles kept, and the resume completes
        import zarr.storage._local as local

        real_put, writes = local._put, []

        def put(p, value, exclusive=False):
            if "/c/" in str(p) and len(writes) >= 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            writes.append(p)
            return real_put(p, value, exclusive)

        monkeypatch.setattr(local, "_put", put)  # the worker threads share this process's zarr
        with pytest.raises(OSError, match="is full .* safely stored and kept") as info:
            store_kernel(NTK, x, x2, path=tmp_path / "full", tile_size=50, dtype=torch.float32, scheduler=client)
        assert info.value.errno == errno.ENOSPC
        monkeypatch.setattr(local, "_put", real_put)
        got = store_kernel(NTK, x, x2, path=tmp_path / "full", dtype=torch.float32, scheduler=client)
        assert np.array_equal(_bits(got), _bits(ref))


def test_unreachable_scheduler_is_a_clear_error(tmp_path, x):
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match=r"could not reach the Dask scheduler at 'tcp://127.0.0.1:1' "
                                                  r"within 1s"):
            store_kernel(NTK, x, path=tmp_path / "s", scheduler="tcp://127.0.0.1:1")  # port 1: refused
        assert time.monotonic() - t0 < 30
    with pytest.raises(TypeError, match="scheduler must be"):
        store_kernel(NTK, x, path=tmp_path / "s", scheduler=42)
    # nothing was computed, and the store can be finished in process afterwards
    assert zarr.open_array(str(tmp_path / "s"), mode="r").attrs["ntkit"]["complete"] is False
    assert store_kernel(NTK, x, path=tmp_path / "s").attrs["ntkit"]["complete"] is True


def test_torch_threads_per_worker_share_the_machine():
    from ntkit._dask import torch_threads

    class FakeClient:  # two machines: 16 cores with 2 workers x 2 threads, 8 cores with 1 worker x 1 thread
        def scheduler_info(self, n_workers=-1):
            return {"workers": {"tcp://a:1": {"host": "a", "nthreads": 2}, "tcp://a:2": {"host": "a", "nthreads": 2},
                                "tcp://b:1": {"host": "b", "nthreads": 1}}}

        def run(self, fn):
            return {"tcp://a:1": 16, "tcp://a:2": 16, "tcp://b:1": 8}

    assert torch_threads(FakeClient()) == {"tcp://a:1": 4, "tcp://a:2": 4, "tcp://b:1": 8}
