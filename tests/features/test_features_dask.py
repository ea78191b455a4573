"""Feature transforms on a real dask.distributed cluster (loopback only): the in-process features, bit for bit."""

import time

import dask
import numpy as np
import pytest
import torch

distributed = pytest.importorskip("distributed")

import ntkit  # noqa: E402
from ntkit.features import NTKNystroem, NTKRandomFeatures, NTKSketch  # noqa: E402
from ntkit.features._dask import task_rows  # noqa: E402

ARCH = ntkit.mlp(2, W_std=2**0.5, b_std=0.1)


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(5).standard_normal((2300, 16))


def test_local_cluster_gives_the_in_process_features(x, local_cluster_spy, single_thread):
    started = local_cluster_spy
    fm = NTKRandomFeatures(ARCH, 300, random_state=1, dtype=torch.float32, batch_size=500, progress=False).fit(x)
    ref = fm.transform(x)
    got = fm.transform(x, scheduler="local")  # 5 tasks of 500 rows
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and np.array_equal(got, ref)
    (kw, address, n_workers), = started
    assert address.startswith("tcp://127.0.0.1:") and kw["dashboard_address"] is None
    assert n_workers == kw["n_workers"] == 2 and kw["threads_per_worker"] == 1 and kw["processes"] is True
    assert np.array_equal(fm.transform(x), ref)  # shipping a CPU copy left the map itself unchanged


def test_client_and_address(x, single_thread):
    # worker threads in this process (worker processes are tested above), talking TCP on the loopback
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp",
                                  host="127.0.0.1", dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        sk = NTKSketch(ARCH, 256, random_state=3, batch_size=400, progress=False)  # float64
        xt = torch.as_tensor(x[:1000])
        ref = sk.fit_transform(xt)
        got = sk.fit_transform(xt, scheduler=client)  # torch in, torch out; 3 tasks
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float64 and torch.equal(got, ref)
        assert client.status == "running"  # a caller's client is left open
        rf = NTKRandomFeatures(ARCH, 200, kernel="nngp", random_state=0, batch_size=700, progress=False).fit(x)
        assert np.array_equal(rf.transform(x, scheduler=cluster.scheduler_address), rf.transform(x))
        # the features are right, not merely equal: inner products approximate the kernel
        phi = rf.transform(x[:300], scheduler=client)
        k = ARCH.kernel(torch.as_tensor(x[:300]), get="nngp").numpy()
        assert np.linalg.norm(phi @ phi.T - k) / np.linalg.norm(k) < 0.3
        # Nystrom features: the exact kernel against the centers on the workers (2 tasks)
        ny = NTKNystroem(ARCH, 80, random_state=2, batch_size=500, progress=False).fit(x[:1000])
        assert np.array_equal(ny.transform(x[:1000], scheduler=client), ny.transform(x[:1000]))


def test_task_size():
    fm = NTKRandomFeatures(ARCH, 512, random_state=0, progress=False).fit(16)
    per_row = fm._row_bytes() * 8
    least = int(np.ceil(1e8 / per_row))  # rows of ~100 ms of work
    assert task_rows(fm, 10**7, 8, 4) == min(fm._batch_rows(10**7, 8, torch.device("cpu")), 10**7 // 8)
    assert task_rows(fm, 10 * least, 8, 100) == least  # never below ~100 ms, however many slots
    assert task_rows(fm, 50, 8, 2) == 50
    fm.batch_size = 7
    assert task_rows(fm, 10**6, 8, 2) == 7  # at most one memory batch


def test_unreachable_scheduler_and_bad_arguments(x):
    fm = NTKRandomFeatures(ARCH, 64, random_state=0, progress=False)
    with pytest.raises(RuntimeError, match="not fitted"):
        fm.transform(x, scheduler="local")
    fm.fit(x)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match=r"could not reach the Dask scheduler at 'tcp://127.0.0.1:1' "
                                                  r"within 1s"):
            fm.transform(x, scheduler="tcp://127.0.0.1:1")  # port 1: refused
        assert time.monotonic() - t0 < 30
    with pytest.raises(TypeError, match="scheduler must be"):
        fm.transform(x, scheduler=42)
    with pytest.raises(ValueError, match="not an address"):
        fm.transform(x, scheduler=" ")
    with pytest.raises(ValueError, match="NaN|finite"):
        fm.transform(np.full((3, 16), np.nan), scheduler="local")  # checked before any cluster starts
