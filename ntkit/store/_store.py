"""``store_kernel``: a kernel matrix computed tile by tile into a resumable zarr store.

Layout of a store (a directory):

* ``zarr.json`` + ``c/i/j``: a zarr (format 3) array of shape ``(n1, n2)``, one chunk per tile,
  uncompressed, fill value NaN (a tile that was never written reads as NaN, never as a number);
  its attribute ``ntkit`` holds the kernel config and ``"complete"``, which turns True only after
  every tile is on disk.
* ``ntkit-store.json``: the manifest. Its identity block (format version, kernel class and config,
  SHA-256 and shape of the inputs, dtype, shape, tile size, grid) says what the store holds; its
  ``completed`` list names the tiles whose chunks are durably written. It is replaced atomically
  (write to a temporary file, fsync, rename, fsync the directory), and a tile enters it only after
  its chunk files (and the mirrored chunk) were fsynced, so after a crash every listed tile is on
  disk and every other tile is recomputed.

The computation of a tile depends only on the inputs, the kernel, the dtype and the tile grid, so a
resumed run (in process or on Dask workers) writes the same bits as an uninterrupted one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import numbers
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._progress import progress as progress_bar
from .._validation import as_float_tensor, available_memory_bytes, check_memory, format_bytes, resolve_dtype
from ..kernels import Architecture, KernelFunction

__all__ = ["store_kernel", "StoreError", "MANIFEST_NAME"]

MANIFEST_NAME = "ntkit-store.json"
_FORMAT = "ntkit-kernel-store"
_VERSION = 1
#: largest automatic tile edge; a 4096 x 4096 tile is >= 0.1 s of work for any kernel on a CPU core
_MAX_TILE = 4096
#: the automatic tile edge steps down by this until a tile fits the memory budget
_TILE_STEP = 256
#: tile-sized buffers alive at once while a tile is computed and written (the kernel's output and
#: temporaries, the transposed copy for the mirrored chunk, zarr's chunk buffer)
_TILE_BUFFERS = 6
#: the kernel's own scratch (architectures compute in 512 x 512 blocks, ~12 live block buffers)
_KERNEL_SCRATCH_ITEMS = 12 * 512 * 512
_STORE_DTYPES = (torch.float16, torch.float32, torch.float64)


class StoreError(ValueError):
    """A path cannot be used as this kernel's store (another ntkit store, or not an ntkit store at all)."""


# ------------------------------------------------------------------------------------------------
def _require_zarr():
    try:
        import zarr
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError("store_kernel needs zarr >= 3: install it with `pip install 'ntkit[store]'`") from exc
    if int(zarr.__version__.split(".")[0]) < 3:  # pragma: no cover
        raise ImportError(f"store_kernel needs zarr >= 3 (stores are zarr format 3); found zarr {zarr.__version__}. "
                          "Upgrade with `pip install -U 'zarr>=3'`.")
    return zarr


def _check_kernel(kernel: Any) -> KernelFunction:
    if isinstance(kernel, Architecture):
        raise TypeError("store_kernel stores one kernel: pass arch.kernel_fn('ntk') or arch.kernel_fn('nngp') "
                        "instead of the Architecture")
    if not isinstance(kernel, KernelFunction):
        raise TypeError(f"kernel must be an ntkit KernelFunction (arch.kernel_fn('ntk'), ntkit.Laplace(...), ...), "
                        f"got {type(kernel).__name__}")
    return kernel


def _kernel_identity(kernel: KernelFunction) -> dict:
    """Class path and config of a kernel (its repr when it has no config), normalised through JSON."""
    cls = f"{type(kernel).__module__}.{type(kernel).__qualname__}"
    try:
        cfg = kernel.to_config()
        desc = {"class": cls, "config": cfg}
    except NotImplementedError:
        desc = {"class": cls, "repr": repr(kernel)}
    try:
        return json.loads(json.dumps(desc, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the config of {kernel!r} is not JSON-serialisable, so a store cannot record which kernel "
                        "it holds; give the kernel a JSON-able to_config()") from exc


def _input_identity(t: torch.Tensor) -> dict:
    """Shape and SHA-256 of the bytes of an input in the compute dtype (C order, little-endian)."""
    a = np.ascontiguousarray(t.detach().cpu().numpy())
    if a.dtype.byteorder == ">":  # pragma: no cover - big-endian hosts
        a = a.byteswap().view(a.dtype.newbyteorder("<"))
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
    return {"shape": list(a.shape), "sha256": h.hexdigest()}


def _tiles(grid: tuple[int, int], symmetric: bool) -> list[tuple[int, int]]:
    g1, g2 = grid
    if symmetric:
        return [(i, j) for i in range(g1) for j in range(i, g2)]
    return [(i, j) for i in range(g1) for j in range(g2)]


def _tile_bytes(tile: int, item: int) -> int:
    return (_TILE_BUFFERS * tile * tile + _KERNEL_SCRATCH_ITEMS) * item


def _check_tile_size(tile_size: Any) -> int | None:
    if tile_size is None:
        return None
    if isinstance(tile_size, bool) or not isinstance(tile_size, numbers.Integral) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive integer (rows and columns of one tile), got {tile_size!r}")
    return int(tile_size)


def _choose_tile(n_max: int, fixed_bytes: int, item: int, budget: float) -> int:
    """The largest tile edge up to 4096 (stepping down by 256) that fits the budget, evened out over the grid.

    zarr stores every chunk at full size, so a grid of 4096-tiles over n = 50 000 would pad the last
    row and column of chunks to 53 248; evening out (3847 here) keeps the padding under one row per tile.
    """
    tile = min(_MAX_TILE, n_max)
    while tile > _TILE_STEP and fixed_bytes + _tile_bytes(tile, item) > budget:
        tile = max(_TILE_STEP, tile - _TILE_STEP)
    grid = -(-n_max // tile)
    return -(-n_max // grid)


# ------------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class _Manifest:
    """The manifest file: identity of the store plus the tiles that are durably on disk."""

    def __init__(self, root: Path, data: dict):
        self.root = root
        self.path = root / MANIFEST_NAME
        self.data = data
        self.completed = {tuple(t) for t in data["completed"]}

    def save(self) -> None:
        self.data["completed"] = sorted([list(t) for t in self.completed])
        _write_json_atomic(self.path, self.data)

    def mark(self, tile: tuple[int, int]) -> None:
        self.completed.add(tuple(tile))
        try:
            self.save()
        except BaseException:
            self.completed.discard(tuple(tile))  # the file on disk still holds the previous, valid state
            raise


def _read_manifest(root: Path) -> dict | None:
    """The manifest of an existing ntkit store, None for a new or empty directory; refuses anything else."""
    if not root.exists():
        return None
    if not root.is_dir():
        raise StoreError(f"{root} exists and is a file, not an ntkit kernel store; it was left untouched. Pass a new "
                         "path (or an empty directory) for the store.")
    mpath = root / MANIFEST_NAME
    if not mpath.exists():
        if any(root.iterdir()):
            raise StoreError(f"{root} exists and is not an ntkit kernel store (it has no {MANIFEST_NAME}); it was left "
                             "untouched. Pass a new path or an empty directory for the store.")
        return None
    try:
        data = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{mpath} cannot be read as an ntkit store manifest ({exc}); the store was left untouched. "
                         "Pass a new path, or delete this directory to recompute.") from exc
    if not isinstance(data, dict) or data.get("format") != _FORMAT or "identity" not in data:
        raise StoreError(f"{mpath} is not an ntkit kernel store manifest; the directory was left untouched. Pass a "
                         "new path or an empty directory for the store.")
    if data.get("version") != _VERSION:
        raise StoreError(f"{root} was written by a store format version {data.get('version')!r}, this ntkit writes "
                         f"version {_VERSION}; recompute it in a new path.")
    return data


_FIELD_NAMES = {"kernel": "the kernel", "x1": "x1", "x2": "x2", "dtype": "the dtype", "shape": "the shape"}


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Paths (``architecture.layers[0].b_std``) at which two JSON values differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (u, v) in enumerate(zip(a, b)) for d in _differences(u, v, f"{where}[{i}]")]
    return [] if a == b else [f"{where or 'value'} {json.dumps(a)[:80]} vs {json.dumps(b)[:80]}"]


def _kernel_difference(old: dict, new: dict) -> str:
    if old.get("class") != new.get("class"):
        return f"the kernel: stored a {old.get('class')}, given a {new.get('class')}"
    diffs = _differences(old, new)
    more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
    return "the kernel's config: " + ", ".join(diffs[:3]) + more + " (stored vs given)"


def _check_identity(root: Path, stored: dict, identity: dict) -> None:
    old = stored["identity"]
    diffs = []
    for key, label in _FIELD_NAMES.items():
        if old.get(key) != identity.get(key):
            if key in ("x1", "x2"):
                a, b = old.get(key), identity.get(key)
                if a is None or b is None:
                    diffs.append(f"{label}: stored {'None' if a is None else 'an array'}, given "
                                 f"{'None' if b is None else 'an array'}")
                elif a["shape"] != b["shape"]:
                    diffs.append(f"{label}: stored shape {tuple(a['shape'])}, given {tuple(b['shape'])}")
                else:
                    diffs.append(f"{label}: same shape {tuple(a['shape'])} but different values (SHA-256 "
                                 f"{a['sha256'][:12]}... vs {b['sha256'][:12]}...)")
            elif key == "kernel":
                diffs.append(_kernel_difference(old[key], identity[key]))
            else:
                diffs.append(f"{label}: stored {old.get(key)!r}, given {identity.get(key)!r}")
    if diffs:
        raise StoreError(f"{root} holds a kernel matrix of other inputs or another kernel, and a store is never mixed: "
                         + "; ".join(diffs) + ". Pass another path, or delete this store to recompute it.")


# ------------------------------------------------------------------------------------------------
def _compute_tile(kernel: KernelFunction, t1: torch.Tensor, t2: torch.Tensor | None, tile: tuple[int, int],
                  size: int, dtype: torch.dtype) -> np.ndarray:
    """The kernel values of one tile as a C-contiguous numpy array (the same bits wherever it runs)."""
    i, j = tile
    a = t1[i * size:(i + 1) * size]
    with torch.no_grad():
        if t2 is None and i == j:  # a diagonal tile of a symmetric Gram: exactly symmetric by construction
            k = kernel(a, dtype=dtype)
            b = a
        else:
            b = (t1 if t2 is None else t2)[j * size:(j + 1) * size]
            k = kernel(a, b, dtype=dtype)
    if tuple(k.shape) != (a.shape[0], b.shape[0]):
        raise ValueError(f"{kernel!r} returned shape {tuple(k.shape)} for a ({a.shape[0]}, {b.shape[0]}) tile")
    if not bool(torch.isfinite(k).all()):
        raise FloatingPointError(f"tile {tile} of {kernel!r} holds NaN or Inf in {dtype}; check the kernel's "
                                 "parameters or use float64. Tiles already written are kept.")
    return np.ascontiguousarray(k.detach().to(device="cpu", dtype=dtype).numpy())


def _write_tile(arr, root: Path, tile: tuple[int, int], values: np.ndarray, size: int, symmetric: bool) -> None:
    """Write one tile's chunk (and its mirror for a symmetric Gram) and fsync them before returning."""
    i, j = tile
    r0, c0 = i * size, j * size
    arr[r0:r0 + values.shape[0], c0:c0 + values.shape[1]] = values
    chunks = [(i, j)]
    if symmetric and i != j:
        arr[c0:c0 + values.shape[1], r0:r0 + values.shape[0]] = np.ascontiguousarray(values.T)
        chunks.append((j, i))
    for ck in chunks:
        p = root / arr.metadata.encode_chunk_key(ck)
        _fsync_file(p)
        _fsync_dir(p.parent)


def _disk_full(root: Path, exc: OSError, done: int, total: int) -> OSError:
    return OSError(exc.errno, f"the disk holding {root} is full ({exc.strerror or exc}); {done} of {total} tiles are "
                              "safely stored and kept. Free some space, then call store_kernel again with the same "
                              "arguments: it computes only the missing tiles.")


def _open_array(zarr, root: Path, shape: tuple[int, int], tile: int, np_dtype, attrs: dict):
    meta = root / "zarr.json"
    if meta.exists():
        arr = zarr.open_array(str(root), mode="r+")
        if tuple(arr.shape) != shape or tuple(arr.chunks) != (tile, tile) or arr.dtype != np_dtype:
            raise StoreError(f"the zarr array in {root} (shape {arr.shape}, chunks {arr.chunks}, {arr.dtype}) does "
                             "not match its manifest; the store is damaged. Delete it and recompute.")
        return arr
    return zarr.create_array(store=str(root), shape=shape, chunks=(tile, tile), dtype=np_dtype, fill_value=np.nan,
                             compressors=None, attributes={"ntkit": attrs})


# ------------------------------------------------------------------------------------------------
def store_kernel(
    kernel: KernelFunction,
    x1: Any,
    x2: Any = None,
    *,
    path: str | os.PathLike,
    tile_size: int | None = None,
    dtype: torch.dtype | str | None = None,
    memory_budget: float | None = None,
    scheduler: Any = None,
    progress: bool = True,
):
    """Compute the kernel matrix ``k(x1, x2)`` tile by tile into a zarr store on disk; resumable.

    For Gram matrices too large for memory (the 50 000 x 50 000 float32 NTK is 10 GB): memory holds
    the inputs and one tile per worker, the matrix lives on disk as one zarr chunk per tile. For
    ``x2=None`` only the upper triangle of tiles is computed and each off-diagonal tile is also
    written transposed, so the stored Gram is exactly symmetric. Calling it again with the same
    arguments after a crash, SIGKILL or full disk computes only the missing tiles; the result is
    bit-identical to an uninterrupted run (each tile is a deterministic function of the inputs,
    the kernel, the dtype and the tile grid).

    Parameters
    ----------
    kernel : KernelFunction
        Any ntkit kernel: ``arch.kernel_fn("ntk")`` / ``arch.kernel_fn("nngp")`` for an architecture's
        exact infinite-width kernels (Jacot et al. 2018; Lee et al. 2018), ``ntkit.Laplace(...)``, ...
        One store holds one kernel, so an :class:`~ntkit.Architecture` itself is refused.
    x1, x2 : array_like, shape (n1, d) and (n2, d)
        Inputs, batch first (numpy or torch; CUDA tensors are computed on their device in process,
        and moved to the CPU for Dask workers). ``x2=None`` means the symmetric Gram of ``x1``.
    path : str or path-like
        Directory of the store: new, empty, or a store made by an earlier call with the same
        kernel, inputs and dtype (then it is resumed, or returned at once when complete). A store of
        other inputs or another kernel, and a non-empty directory that is not an ntkit store, are
        refused with :class:`StoreError` and left untouched.
    tile_size : int, optional
        Rows and columns of one tile (= one zarr chunk). Default: the largest edge up to 4096 that
        fits the memory budget, evened out over the grid so that edge chunks carry little padding
        (3847 for n = 50 000: seconds of work per tile, far above the ~100 ms a Dask task should
        have); a resumed store keeps its own tile size.
    dtype : torch dtype, default float64
        Dtype of the computation and of the store (ntkit's default for analytic kernels; pass
        ``torch.float32`` to halve the disk space).
    memory_budget : float, optional
        Bytes this call may use on this machine: inputs plus in-flight tiles (default 90% of the
        memory available now). With ``scheduler="local"`` it also bounds the number of workers;
        with an existing cluster it is the budget of each worker.
    scheduler : None, "local", str or distributed.Client
        None computes in this process. ``"local"`` starts a ``dask.distributed`` LocalCluster on the
        loopback interface for this call (one worker per core, one thread each); a scheduler address
        (``"tcp://host:8786"``) or a ``Client`` uses that cluster. Workers compute tiles and write
        their chunks; this process records completed tiles in the manifest. Workers must see
        ``path`` (a shared filesystem for a multi-machine cluster). As with any multiprocessing, a
        script that uses ``"local"`` needs the ``if __name__ == "__main__":`` guard.
    progress : bool
        Progress bar over tiles (drawn only on a terminal).

    Returns
    -------
    zarr.Array
        The complete ``(n1, n2)`` array, opened read-only; ``arr.attrs["ntkit"]`` holds the kernel
        config and ``"complete": True``.

    Raises
    ------
    StoreError
        ``path`` holds another store, or something that is not an ntkit store.
    OSError
        With ``errno.ENOSPC`` when the disk is full (checked before starting, and during writes);
        every tile finished before stays on disk.
    ConnectionError
        The Dask scheduler cannot be reached within ``distributed.comm.timeouts.connect``.
    ValueError, TypeError, MemoryBudgetError
        NaN/Inf rows, mismatched feature shapes, a non-kernel, a tile that cannot fit the budget.

    Notes
    -----
    Bit-identity holds for the same device type and the same torch build (a tile computed on a GPU
    may differ from a CPU tile in the last bits); in process and on Dask workers it was checked to
    hold on CPU. Two calls resuming the same store at once are safe (they write identical chunks and
    each lists only tiles it has on disk), merely wasteful.
    """
    kernel = _check_kernel(kernel)
    tile_size = _check_tile_size(tile_size)
    dt = resolve_dtype(dtype)
    if dt not in _STORE_DTYPES:
        raise TypeError(f"dtype={dt} cannot be stored; use torch.float64, torch.float32 or torch.float16")
    if scheduler is not None:
        from ._dask import check_scheduler

        check_scheduler(scheduler)
    t1 = as_float_tensor(x1, "x1", dtype=dt)
    t2 = None if x2 is None else as_float_tensor(x2, "x2", dtype=dt, device=t1.device)
    if t2 is not None and t1.shape[1:] != t2.shape[1:]:
        raise ValueError(f"x1 samples have shape {tuple(t1.shape[1:])} but x2 samples have shape "
                         f"{tuple(t2.shape[1:])}; they must match.")
    zarr = _require_zarr()
    symmetric = t2 is None
    n1 = t1.shape[0]
    n2 = n1 if symmetric else t2.shape[0]
    item = t1.element_size()
    root = Path(os.fspath(path)).absolute()

    identity = {"kernel": _kernel_identity(kernel), "x1": _input_identity(t1),
                "x2": None if symmetric else _input_identity(t2),
                "dtype": str(dt).removeprefix("torch."), "shape": [n1, n2]}
    stored = _read_manifest(root)
    if stored is not None:
        _check_identity(root, stored, identity)
        if tile_size is not None and tile_size != stored["tile_size"]:
            raise StoreError(f"{root} was made with tile_size={stored['tile_size']}, this call asks for "
                             f"tile_size={tile_size}; pass tile_size={stored['tile_size']} (or None) to resume it.")
        tile_size = int(stored["tile_size"])

    # memory: the inputs (and their CPU copies for Dask) stay resident; tiles must fit in the rest
    budget = memory_budget if memory_budget is not None else 0.9 * available_memory_bytes()
    check_memory(0, budget, "", "")  # validates the budget itself
    input_bytes = (t1.numel() + (0 if t2 is None else t2.numel())) * item
    if tile_size is None:
        tile_size = _choose_tile(max(n1, n2), input_bytes, item, budget)
    check_memory(input_bytes + _tile_bytes(tile_size, item), budget,
                 f"the inputs ({format_bytes(input_bytes)}) plus one {tile_size}x{tile_size} tile in {dt}",
                 "pass a smaller tile_size or a larger memory_budget" if tile_size > 1 else
                 "the inputs alone do not fit: pass a larger memory_budget")
    grid = (-(-n1 // tile_size), -(-n2 // tile_size))
    tiles = _tiles(grid, symmetric)

    attrs = {"complete": False, "kernel": identity["kernel"], "manifest": MANIFEST_NAME}
    if stored is None:
        root.mkdir(parents=True, exist_ok=True)
        data = {"format": _FORMAT, "version": _VERSION, "identity": identity, "tile_size": tile_size,
                "grid": list(grid), "completed": [], "complete": False}
        manifest = _Manifest(root, data)
        manifest.save()  # the manifest comes first: a directory with a manifest is ours from now on
    else:
        manifest = _Manifest(root, stored)
        for leftover in [*root.glob(f".{MANIFEST_NAME}.*.tmp"), *root.glob("c/**/*.partial")]:
            leftover.unlink(missing_ok=True)  # debris of an interrupted write
    try:
        arr = _open_array(zarr, root, (n1, n2), tile_size, np.dtype(str(identity["dtype"])), attrs)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(root, exc, len(manifest.completed), len(tiles)) from exc
        raise

    todo = [t for t in tiles if t not in manifest.completed]
    if todo:
        # every chunk is stored at full size, edge chunks included
        need = sum(2 if symmetric and i != j else 1 for i, j in todo) * tile_size * tile_size * item
        free = shutil.disk_usage(root).free
        if need > free:
            raise OSError(errno.ENOSPC, f"the {len(todo)} tiles left need {format_bytes(need)} on disk, but the "
                                        f"disk holding {root} has {format_bytes(free)} free. Free some space (or pass "
                                        f"another path); {len(manifest.completed)} tiles already stored are kept.")
        bar = progress_bar(total=len(tiles), desc=f"{getattr(kernel, 'name', 'kernel')} tiles", unit="tile",
                           enabled=progress)
        bar.update(len(tiles) - len(todo))

        def done(tile):
            manifest.mark(tile)
            bar.update(1)

        try:
            with bar:
                if scheduler is None:
                    for tile in todo:
                        values = _compute_tile(kernel, t1, t2, tile, tile_size, dt)
                        _write_tile(arr, root, tile, values, tile_size, symmetric)
                        done(tile)
                else:
                    from ._dask import run_tiles

                    per_worker = input_bytes + _tile_bytes(tile_size, item)
                    run_tiles(scheduler, kernel, t1, t2, todo, tile_size, dt, root, done,
                              max_local_workers=max(1, int((budget - input_bytes) // per_worker)))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _disk_full(root, exc, len(manifest.completed), len(tiles)) from exc
            raise

    # every tile is on disk: only now do the manifest and then the array's attributes say "complete"
    if not manifest.data.get("complete"):
        manifest.data["complete"] = True
        manifest.save()
    if not arr.attrs.get("ntkit", {}).get("complete"):
        arr.attrs.update({"ntkit": {**attrs, "complete": True}})
    return zarr.open_array(str(root), mode="r")
