#!/usr/bin/env python3
"""Analytic FC ReLU NNGP+NTK: ntkit vs neural-tangents vs the matmul floor, side by side in one run.

The network and inputs are exactly those of ../shared/tools/neural_tangents/bench.py: NTK
parameterization, DEPTH x [Dense(W_std=sqrt(2), b_std=0.05), Relu], Dense readout with the same
W_std, b_std; x = np.random.default_rng(0).standard_normal((N, D)). Timing: one warm-up call, then
the median of REPEATS (default 5) calls. The floor is the Gram matrix x x^T (one matmul) plus one in-place
elementwise pass over the n x n matrix per Dense layer.

Usage (from the repository root):
    .venv/bin/python benchmarks/bench_kernels.py [--n 4000] [--d 784] [--depth 3] [--large 20000]

Prints one JSON line per measurement and a summary table; neural-tangents runs in its own venv
(created by ../shared/tools/neural_tangents/setup.sh) as a subprocess of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import ntkit

ROOT = Path(__file__).resolve().parents[1]
NT_DIR = ROOT.parent / "shared" / "tools" / "neural_tangents"


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def nt_python() -> str | None:
    try:
        out = subprocess.run(["bash", str(NT_DIR / "setup.sh")], capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[-1]
    except Exception as exc:  # pragma: no cover - environment dependent
        print(f"# neural-tangents unavailable: {exc}", file=sys.stderr)
        return None


def run_nt(py, n, d, depth, x64):
    cmd = [py, str(NT_DIR / "bench.py")] + (["--x64"] if x64 else []) + [str(n), str(d), str(depth)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--d", type=int, default=784)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-nt", action="store_true", help="skip neural-tangents")
    ap.add_argument("--large", type=int, default=0, help="also time one float64 kernel of this many inputs")
    args = ap.parse_args(argv)

    arch = ntkit.mlp(args.depth, 512, activation="relu", W_std=2**0.5, b_std=0.05)
    x_np = np.random.default_rng(0).standard_normal((args.n, args.d))
    py = None if args.no_nt else nt_python()
    rows = []
    for dtype in (torch.float32, torch.float64):
        x = torch.as_tensor(x_np, dtype=dtype)
        med, times = timed(lambda: arch.kernel(x, get=("nngp", "ntk"), dtype=dtype), args.repeats)
        rows.append({"lib": "ntkit", "dtype": str(dtype), "seconds": med, "all": times})

        def floor():
            g = x @ x.T
            for _ in range(args.depth + 1):
                g.mul_(1.0001)
            return g

        fmed, ftimes = timed(floor, args.repeats)
        rows.append({"lib": "floor(matmul+1 pass/layer)", "dtype": str(dtype), "seconds": fmed, "all": ftimes})
        if py:
            r = run_nt(py, args.n, args.d, args.depth, dtype == torch.float64)
            rows.append({"lib": "neural-tangents", "dtype": r["dtype"], "seconds": r["seconds"],
                         "all": r["all_seconds"], "versions": f"nt {r['nt']} jax {r['jax']}"})
    for r in rows:
        print(json.dumps(r))
    print(f"\nn={args.n} d={args.d} depth={args.depth}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'dtype':>14} {'ntkit s':>9} {'floor s':>9} {'nt s':>9} {'nt/ntkit':>9} {'ntkit/floor':>12}")
    for dt in ("torch.float32", "torch.float64"):
        k = next(r["seconds"] for r in rows if r["lib"] == "ntkit" and r["dtype"] == dt)
        f = next(r["seconds"] for r in rows if r["lib"].startswith("floor") and r["dtype"] == dt)
        nts = [r["seconds"] for r in rows if r["lib"] == "neural-tangents" and r["dtype"] == dt.split(".")[1]]
        nt = nts[0] if nts else float("nan")
        print(f"{dt:>14} {k:>9.3f} {f:>9.3f} {nt:>9.3f} {nt / k:>9.2f} {k / f:>12.2f}")
    if args.large:
        xl = torch.as_tensor(np.random.default_rng(1).standard_normal((args.large, args.d)))
        t0 = time.perf_counter()
        k = arch.kernel(xl, get=("nngp", "ntk"))
        dt_large = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        print(f"\nlarge: n={args.large} float64 NNGP+NTK in {dt_large:.1f} s, peak RSS {rss:.1f} GiB "
              f"(outputs {2 * args.large**2 * 8 / 1024**3:.1f} GiB), finite={bool(torch.isfinite(k.ntk).all())}")


if __name__ == "__main__":
    main()
