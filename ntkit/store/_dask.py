"""The tiles of ``store_kernel`` as tasks on ``dask.distributed``.

Each task computes one tile on a worker and writes its chunk (and the mirrored chunk) straight into
the zarr store, fsynced; chunks are tile-aligned, so no two tasks ever write the same file. Only the
calling process writes the manifest, after a task's result (the tile index) came back, so a tile is
listed only once its chunks are on disk, whatever crashes (the client, a worker, the scheduler).
Workers need the same filesystem path as the caller (a local disk for ``"local"``, a shared one for
a cluster spanning machines).

Known traps handled here: CUDA tensors are moved to the CPU before they are sent (workers compute on
their CPU); Dask starts workers with one BLAS/OpenMP thread, so each task sets torch's thread count
to the worker machine's cores divided by the task slots on that machine; the inputs are scattered
to every worker once instead of travelling with each task; tiles default to up to 4096 x 4096
(seconds of work), far above the ~100 ms a task should cost.
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..kernels import KernelFunction

__all__ = ["check_scheduler", "run_tiles"]


def _require_distributed():
    try:
        import distributed
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError("scheduler= needs dask.distributed: install it with `pip install 'ntkit[distributed]'`"
                          ) from exc
    return distributed


def check_scheduler(scheduler: Any) -> None:
    """Refuse anything but None, ``"local"``, an address string or a ``distributed.Client``."""
    if scheduler is None or isinstance(scheduler, str):
        if isinstance(scheduler, str) and not scheduler.strip():
            raise ValueError("scheduler='' is not an address; pass 'local', 'tcp://host:port' or a Client")
        return
    distributed = _require_distributed()
    if not isinstance(scheduler, distributed.Client):
        raise TypeError(f"scheduler must be None, 'local', a scheduler address ('tcp://host:8786') or a "
                        f"distributed.Client, got {type(scheduler).__name__}")


def _connect(scheduler: Any, n_workers: int):
    """A client for ``scheduler`` and the function that releases what this call started."""
    import dask
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        return scheduler, lambda: None
    if scheduler == "local":
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(cluster)

        def close():
            client.close()
            cluster.close()

        return client, close
    timeout = dask.config.get("distributed.comm.timeouts.connect")
    try:
        client = Client(scheduler, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(
            f"could not reach the Dask scheduler at {scheduler!r} within {timeout} (the "
            f"distributed.comm.timeouts.connect setting): {exc}. Start the scheduler (`dask scheduler`) and check the "
            "address, or pass scheduler='local' for a cluster on this machine; tiles already stored are kept."
        ) from exc
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        client.close()
        raise ConnectionError(f"the Dask scheduler at {scheduler!r} has no workers (waited {timeout}); start "
                              "some with `dask worker <address>`") from exc
    return client, client.close


def _torch_threads(client) -> dict[str, int]:
    """Torch threads per worker: the worker machine's cores over the task slots on that machine."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    cores = client.run(os.cpu_count)
    slots: dict[str, int] = {}
    for info in workers.values():
        slots[info["host"]] = slots.get(info["host"], 0) + int(info["nthreads"])
    return {addr: max(1, int(cores.get(addr) or 1) // max(1, slots[info["host"]])) for addr, info in workers.items()}


def _tile_task(kernel: KernelFunction, x1: np.ndarray, x2: np.ndarray | None, tile: tuple[int, int], size: int,
               dtype_name: str, root: str, threads: dict[str, int]) -> tuple[int, int]:
    """On a worker: compute one tile, write and fsync its chunk(s), return the tile index."""
    import zarr
    from distributed import get_worker

    from ._store import _compute_tile, _write_tile

    n = threads.get(get_worker().address, 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    with warnings.catch_warnings():  # scattered arrays arrive read-only; tiles only read them
        warnings.filterwarnings("ignore", message=".*not writable.*")
        t1 = torch.from_numpy(x1)
        t2 = None if x2 is None else torch.from_numpy(x2)
    values = _compute_tile(kernel, t1, t2, tile, size, getattr(torch, dtype_name))
    _write_tile(zarr.open_array(root, mode="r+"), Path(root), tile, values, size, x2 is None)
    return tile


def run_tiles(scheduler: Any, kernel: KernelFunction, t1: torch.Tensor, t2: torch.Tensor | None,
              todo: list[tuple[int, int]], size: int, dtype: torch.dtype, root: Path,
              done: Callable[[tuple[int, int]], None], max_local_workers: int) -> None:
    """Compute the tiles ``todo`` on a Dask cluster; ``done(tile)`` runs here as each one lands."""
    _require_distributed()
    from distributed import as_completed

    x1 = np.ascontiguousarray(t1.detach().cpu().numpy())  # CUDA tensors do not serialize: CPU copies
    x2 = None if t2 is None else np.ascontiguousarray(t2.detach().cpu().numpy())
    n_local = max(1, min(os.cpu_count() or 1, len(todo), max_local_workers))
    client, close = _connect(scheduler, n_local)
    futures = []
    try:
        threads = _torch_threads(client)
        f1 = client.scatter(x1, broadcast=True, hash=False)
        f2 = None if x2 is None else client.scatter(x2, broadcast=True, hash=False)
        token = uuid.uuid4().hex[:12]
        dtype_name = str(dtype).removeprefix("torch.")
        futures = [client.submit(_tile_task, kernel, f1, f2, tile, size, dtype_name, str(root), threads,
                                 key=f"ntkit-tile-{token}-{tile[0]}-{tile[1]}", pure=False, retries=0)
                   for tile in todo]
        for fut in as_completed(futures):
            done(tuple(fut.result()))
    finally:
        if futures:
            client.cancel(futures)
        close()
