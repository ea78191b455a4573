"""Connecting to ``dask.distributed`` for ntkit's ``scheduler=`` arguments (``store_kernel``, feature maps).

The convention: ``None`` computes in the calling process; ``"local"`` starts a ``LocalCluster`` on the
loopback interface for the call (one single-threaded worker process per task slot) and closes it
afterwards; a scheduler address (``"tcp://host:8786"``) or a ``distributed.Client`` uses that cluster
and leaves it running. An unreachable address fails within ``distributed.comm.timeouts.connect``.

Dask starts its workers with one BLAS/OpenMP thread; :func:`torch_threads` gives each worker the
worker machine's cores divided by the task slots on that machine, which the tasks apply with
:func:`set_torch_threads`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

__all__ = ["require_distributed", "check_scheduler", "connect", "torch_threads", "set_torch_threads"]


def require_distributed():
    """The ``distributed`` module, or an ImportError that says how to install it."""
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
    distributed = require_distributed()
    if not isinstance(scheduler, distributed.Client):
        raise TypeError(f"scheduler must be None, 'local', a scheduler address ('tcp://host:8786') or a "
                        f"distributed.Client, got {type(scheduler).__name__}")


def connect(scheduler: Any, n_workers: int, *, kept: str = "") -> tuple[Any, Callable[[], None]]:
    """A client for ``scheduler`` and the function that releases what this call started.

    ``n_workers`` is the number of worker processes of a ``"local"`` cluster; ``kept`` ends the error
    message of an unreachable scheduler (what of the caller's work is safe).
    """
    require_distributed()
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
            f"address, or pass scheduler='local' for a cluster on this machine{kept}."
        ) from exc
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        client.close()
        raise ConnectionError(f"the Dask scheduler at {scheduler!r} has no workers (waited {timeout}); start "
                              "some with `dask worker <address>`") from exc
    return client, client.close


def torch_threads(client) -> dict[str, int]:
    """Torch threads per worker address: the worker machine's cores over the task slots on that machine."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    cores = client.run(os.cpu_count)
    slots: dict[str, int] = {}
    for info in workers.values():
        slots[info["host"]] = slots.get(info["host"], 0) + int(info["nthreads"])
    return {addr: max(1, int(cores.get(addr) or 1) // max(1, slots[info["host"]])) for addr, info in workers.items()}


def set_torch_threads(threads: dict[str, int]) -> None:
    """On a worker: set torch's thread count to this worker's entry of :func:`torch_threads`."""
    import torch
    from distributed import get_worker

    n = threads.get(get_worker().address, 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
