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

import os
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .._dask import check_scheduler, connect, require_distributed, set_torch_threads, torch_threads
from ..kernels import KernelFunction

__all__ = ["check_scheduler", "run_tiles"]


def _tile_task(kernel: KernelFunction, x1: np.ndarray, x2: np.ndarray | None, tile: tuple[int, int], size: int,
               dtype_name: str, root: str, threads: dict[str, int]) -> tuple[int, int]:
    """On a worker: compute one tile, write and fsync its chunk(s), return the tile index."""
    import zarr

    from ._store import _compute_tile, _write_tile

    set_torch_threads(threads)
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
    require_distributed()
    from distributed import as_completed

    x1 = np.ascontiguousarray(t1.detach().cpu().numpy())  # CUDA tensors do not serialize: CPU copies
    x2 = None if t2 is None else np.ascontiguousarray(t2.detach().cpu().numpy())
    n_local = max(1, min(os.cpu_count() or 1, len(todo), max_local_workers))
    client, close = connect(scheduler, n_local, kept="; tiles already stored are kept")
    futures = []
    try:
        threads = torch_threads(client)
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
