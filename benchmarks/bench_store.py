#!/usr/bin/env python3
"""Out-of-core kernels: the n = 50 000 float32 NTK Gram on disk, and Dask vs in-process side by side.

Inputs: x ~ N(0, 1) of shape (n, 784) in float32 (MNIST-sized rows), seed 0; kernel: the NTK of a
3-hidden-layer ReLU MLP (``ntkit.mlp(depth=3, b_std=0.1)``, NTK parameterization).

1. ``--compare-n`` (default 12 000): the same Gram with the same tile grid (``--compare-tile``, 2048)
   computed in process (torch with all cores, and with one thread) and with ``scheduler="local"``
   (a LocalCluster, one single-threaded worker per core; its start-up is included), each in a fresh
   subprocess; all stores must be bit-identical.
2. ``--n`` (default 50 000): ``store_kernel(..., dtype=float32, memory_budget=2e9)`` in a fresh
   subprocess (in process, or with ``--full-scheduler local``): wall time, the peak summed RSS of the
   child and its descendants (Dask workers; sampled every 0.5 s) and getrusage's ru_maxrss of the
   child (an upper bound only: Linux carries the parent's pre-exec high-water mark into the child); a spot check of 256 x 256 random entries against the in-memory kernel; the store is
   deleted afterwards. If the run exceeds ``--max-minutes`` it is killed with SIGKILL and the time
   for the whole Gram is extrapolated from the tiles finished so far.

Usage (from the repository root; the stores go to --dir, default a temporary directory):
    .venv/bin/python benchmarks/bench_store.py [--n 50000] [--compare-n 12000] [--max-minutes 40] [--dir DIR]
        [--full-scheduler local] [--full-threads 1] [--full-first]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import ntkit
from ntkit.store import MANIFEST_NAME, store_kernel

D = 784


def kernel():
    return ntkit.mlp(depth=3, b_std=0.1).kernel_fn("ntk")


def inputs(n: int) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(0), dtype=torch.float32)


def child(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    x = inputs(args.n)
    t0 = time.perf_counter()
    store_kernel(kernel(), x, path=args.path, tile_size=args.tile, dtype=torch.float32,
                 memory_budget=args.budget, scheduler=args.scheduler, progress=False)
    print(json.dumps({"store_seconds": time.perf_counter() - t0}), flush=True)


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants (Dask nannies and workers included)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_child(n: int, path: Path, *, tile=None, scheduler=None, budget=None, max_seconds=None, threads=None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--n", str(n), "--path", str(path)]
    if threads:
        cmd += ["--threads", str(threads)]
    if tile:
        cmd += ["--tile", str(tile)]
    if scheduler:
        cmd += ["--scheduler", scheduler]
    if budget:
        cmd += ["--budget", str(budget)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    killed, last, peak_tree = False, -1, 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # this child's own rusage (and its reaped children's)
        if pid:
            break
        peak_tree = max(peak_tree, tree_rss(proc.pid))
        time.sleep(0.5)
        done = completed(path)
        if done != last:
            print(f"  {time.perf_counter() - t0:7.1f} s: {done} tiles", file=sys.stderr, flush=True)
            last = done
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            import psutil

            try:  # the child and what it started (a LocalCluster's nannies and workers)
                descendants = psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error:
                descendants = []
            os.kill(proc.pid, signal.SIGKILL)
            for d in descendants:
                try:
                    d.kill()
                except psutil.Error:
                    pass
            killed = True
            pid, status, usage = os.wait4(proc.pid, 0)
            break
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = proc.stdout.read()
    rss = usage.ru_maxrss * 1024
    res = {"n": n, "scheduler": scheduler or "in-process", "torch_threads": threads or torch.get_num_threads(),
           "wall_seconds": wall, "peak_rss_bytes": rss, "peak_tree_rss_bytes_sampled": peak_tree,
           "killed_at_time_limit": killed, "returncode": proc.returncode}
    if not killed and proc.returncode == 0:
        res.update(json.loads(out.strip().splitlines()[-1]))
    man = json.loads((path / MANIFEST_NAME).read_text())
    res.update(tile_size=man["tile_size"], grid=man["grid"], tiles_done=len(man["completed"]),
               tiles_total=len(man["completed"]) if man["complete"] else None)
    return res


def completed(path: Path) -> int:
    try:
        return len(json.loads((path / MANIFEST_NAME).read_text())["completed"])
    except (OSError, ValueError, KeyError):
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--compare-n", type=int, default=12_000)
    ap.add_argument("--compare-tile", type=int, default=2048)
    ap.add_argument("--budget", type=float, default=2e9)
    ap.add_argument("--max-minutes", type=float, default=40.0)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--skip-compare", action="store_true")
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--full-scheduler", default=None, help="scheduler of the full run (default: in process)")
    ap.add_argument("--full-threads", type=int, default=None, help="torch threads of an in-process full run")
    ap.add_argument("--full-first", action="store_true", help="run the full Gram before the comparison")
    # internal: one measured run
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--tile", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scheduler", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    base = args.dir or Path(tempfile.gettempdir()) / "ntkit-bench-store"
    base.mkdir(parents=True, exist_ok=True)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; stores in {base}")
    results = {}

    def compare():
        n = args.compare_n
        runs = {}
        configs = (("in-process", None, None), ("in-process-1-thread", None, 1), ("dask-local", "local", None))
        for name, sched, threads in configs:
            path = base / f"compare-{name}"
            shutil.rmtree(path, ignore_errors=True)
            runs[name] = run_child(n, path, tile=args.compare_tile, scheduler=sched, threads=threads)
            print(json.dumps(runs[name]), flush=True)
        import zarr

        a = zarr.open_array(str(base / "compare-in-process"), mode="r")
        b = zarr.open_array(str(base / "compare-dask-local"), mode="r")
        identical = all(np.array_equal(np.asarray(a[i:i + 2048]).view(np.uint32), np.asarray(b[i:i + 2048]).view(
            np.uint32)) for i in range(0, n, 2048))
        c = zarr.open_array(str(base / "compare-in-process-1-thread"), mode="r")
        identical = identical and all(np.array_equal(np.asarray(a[i:i + 2048]).view(np.uint32), np.asarray(
            c[i:i + 2048]).view(np.uint32)) for i in range(0, n, 2048))
        ratios = {name: runs[name]["wall_seconds"] / runs["in-process"]["wall_seconds"] for name in runs}
        results["compare"] = {"runs": runs, "bit_identical": identical, "wall_over_inprocess": ratios}
        print(json.dumps({"compare_bit_identical": identical, "wall_over_inprocess": ratios}), flush=True)
        for name in runs:
            shutil.rmtree(base / f"compare-{name}", ignore_errors=True)

    def full():
        path = base / "full"
        shutil.rmtree(path, ignore_errors=True)
        print(f"# free memory {ntkit._validation.format_bytes(ntkit._validation.available_memory_bytes())}, "
              f"free disk {ntkit._validation.format_bytes(shutil.disk_usage(base).free)}", flush=True)
        res = run_child(args.n, path, budget=args.budget, max_seconds=60 * args.max_minutes,
                        scheduler=args.full_scheduler, threads=args.full_threads)
        g = res["grid"][0]
        total = g * (g + 1) // 2
        res["tiles_total"] = total
        res["disk_bytes"] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if res["killed_at_time_limit"]:  # an upper estimate: start-up is counted as if it were tile work
            done = res["tiles_done"]
            res["extrapolated_wall_seconds"] = res["wall_seconds"] * total / done if done else None
        else:
            import zarr

            arr = zarr.open_array(str(path), mode="r")
            rng = np.random.default_rng(1)
            rows, cols = np.sort(rng.choice(args.n, 256, replace=False)), np.sort(rng.choice(args.n, 256, False))
            x = inputs(args.n)
            got = arr.get_orthogonal_selection((rows, cols))
            ref = kernel()(x[rows], x[cols], dtype=torch.float32).numpy()
            res["spot_check_max_rel_err"] = float(np.abs(got - ref).max() / np.abs(ref).max())
            res["complete_attr"] = bool(arr.attrs["ntkit"]["complete"])
        results["full"] = res
        print(json.dumps(res), flush=True)
        shutil.rmtree(path, ignore_errors=True)
    steps = [s for s, skip in ((compare, args.skip_compare), (full, args.skip_full)) if not skip]
    for step in (reversed(steps) if args.full_first else steps):
        step()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
