"""Feature transforms as tasks on ``dask.distributed`` (``FeatureMap.transform(X, scheduler=...)``).

The fitted map is copied to the CPU and scattered to every worker once; the rows of ``X`` travel as
chunks, one task per chunk, each computing exactly what the in-process transform computes for those
rows (the same random matrices, the same arithmetic). Traps handled: CUDA tensors do not serialize
(inputs and the map's matrices are moved to the CPU; a CUDA input gets its features back on its
device); Dask workers start with one torch/BLAS thread, so every task sets the worker machine's cores
over its task slots (:func:`ntkit._dask.torch_threads`); a task holds at least ~100 ms of work (rows
enough to touch ~100 MB of working memory) and at most one memory batch of the map.
"""

from __future__ import annotations

import copy
import math
import os
import uuid
import warnings
from typing import Any

import numpy as np
import torch

from .._dask import connect, require_distributed, set_torch_threads, torch_threads
from .._progress import progress as progress_bar
from .._validation import available_memory_bytes, check_memory

__all__ = ["dask_transform", "task_rows"]

_TASK_BYTES = 1e8  # working memory touched by a task of ~100 ms (memory-bound transforms: ~1 GB/s)


def task_rows(fmap, n: int, item: int, slots: int) -> int:
    """Rows per task: at least ~100 ms of work, two tasks per task slot when there is enough work, at most
    one memory batch of the map (its ``batch_size`` / ``memory_budget``)."""
    per_row = max(1, fmap._row_bytes() * item)
    least = math.ceil(_TASK_BYTES / per_row)
    most = fmap._batch_rows(n, item, torch.device("cpu"))
    return max(1, min(most, n, max(least, math.ceil(n / (2 * max(1, slots))))))


def _cpu_copy(fmap, rows: int):
    """The fitted map with its random matrices on the CPU, its batches ``rows`` long, no progress bar."""
    state = dict(fmap.__dict__)
    state["_params"], state["_params_key"] = None, None
    clone = object.__new__(type(fmap))
    clone.__dict__ = copy.deepcopy(state)
    clone.device, clone.batch_size, clone.progress = "cpu", int(rows), False
    clone._to(clone.dtype_, torch.device("cpu"))  # the CPU copies of the matrices travel with the map
    return clone


def _transform_task(fmap, x: np.ndarray, threads: dict[str, int]) -> np.ndarray:
    """On a worker: the features of one chunk of rows."""
    set_torch_threads(threads)
    with warnings.catch_warnings():  # scattered arrays arrive read-only; the transform only reads them
        warnings.filterwarnings("ignore", message=".*not writable.*")
        t = torch.from_numpy(x)
    return fmap.transform(t).numpy()


def dask_transform(fmap, X: Any, scheduler: Any) -> Any:
    """``fmap.transform(X)`` computed as tasks on the Dask cluster ``scheduler`` (see ntkit._dask)."""
    require_distributed()
    from distributed import as_completed

    t, numpy_in = fmap._prepare(X)
    n, m, item = t.shape[0], fmap.n_components_, t.element_size()
    check_memory(n * m * item, 0.9 * available_memory_bytes(), f"the ({n}, {m}) feature matrix in {t.dtype}",
                 "transform X in pieces, or consume iter_transform(X) batch by batch")
    x = np.ascontiguousarray(t.detach().cpu().numpy())  # CUDA tensors do not serialize: a CPU copy
    n_local = max(1, min(os.cpu_count() or 1, math.ceil(n / task_rows(fmap, n, item, 1))))
    client, close = connect(scheduler, n_local)
    futures: list = []
    try:
        threads = torch_threads(client)
        slots = sum(int(w["nthreads"]) for w in client.scheduler_info(n_workers=-1)["workers"].values())
        rows = task_rows(fmap, n, item, slots)
        starts = list(range(0, n, rows))
        shipped = client.scatter(_cpu_copy(fmap, rows), broadcast=True, hash=False)
        chunks = client.scatter([x[i:i + rows] for i in starts], hash=False)
        token = uuid.uuid4().hex[:12]
        futures = [client.submit(_transform_task, shipped, c, threads, key=f"ntkit-features-{token}-{k}",
                                 pure=False, retries=0) for k, c in enumerate(chunks)]
        where = {f.key: i for f, i in zip(futures, starts)}
        out = np.empty((n, m), dtype=x.dtype)
        with progress_bar(total=len(futures), desc=f"{type(fmap).__name__} (dask)", unit="task",
                          enabled=fmap.progress if len(futures) > 1 else False) as bar:
            for fut in as_completed(futures):
                part = fut.result()
                i = where[fut.key]
                out[i:i + part.shape[0]] = part
                bar.update(1)
    finally:
        if futures:
            client.cancel(futures)
        close()
    return out if numpy_in else torch.from_numpy(out).to(t.device)
