#!/usr/bin/env python3
"""Analytic CNTK (NNGP + NTK of a convolutional ReLU net): ntkit vs neural-tangents, side by side in one run.

The network and inputs are exactly those of ../shared/tools/neural_tangents/bench.py --cntk: NTK
parameterization, DEPTH x [Conv(64, 3x3, SAME, W_std=sqrt(2), b_std=0.05) + Relu], then GlobalAvgPool ("gap")
or Flatten ("flatten"), then Dense(1, W_std=sqrt(2), b_std=0.05); NHWC inputs
np.random.default_rng(0).standard_normal((N, H, W, C)). Timing as there: one warm-up call, then the median of 3
calls of kernel(x, x, ("nngp", "ntk")); per kernel entry = seconds / N^2. Each ntkit measurement runs in a fresh
subprocess so that its peak resident memory (ru_maxrss, minus the process's size before the call) is its own;
ntkit runs with one torch thread and a stated ``memory_budget`` for its tiles, neural-tangents with XLA's default
threading. The values of both kernels are compared with the ones neural-tangents saves (--save).

Then a CNTK-GAP Gram matrix on MNIST digits (../shared/data/mnist, 2x2 average-pooled to 14x14x1) and the
accuracy of kernel regression (t = infinity, ntkit.dynamics.gradient_descent_mse, one-hot targets) on held-out
digits.

Usage (from the repository root):
    NT=$(bash ../shared/tools/neural_tangents/setup.sh | tail -n 1)
    .venv/bin/python benchmarks/bench_cntk.py --nt "$NT" [--skip-nt] [--mnist-train 1000 --mnist-test 1000]

Prints one JSON line per measurement and a compact markdown table; the MNIST kernels print one progress line
per block of rows (--mnist-strip) and are saved with --save.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))


def cnn(depth: int, readout: str):
    import ntkit

    layers = []
    for _ in range(depth):
        layers += [ntkit.Conv(64, (3, 3), padding="SAME", W_std=2**0.5, b_std=0.05), ntkit.Relu()]
    layers += [ntkit.GlobalAvgPool() if readout == "gap" else ntkit.Flatten(), ntkit.Dense(1, 2**0.5, 0.05)]
    return ntkit.serial(*layers)


def one_ntkit(n, h, w, c, depth, readout, dtype, budget, save, fused=False):
    """Runs in a fresh subprocess: time ntkit on the benchmark inputs and report its peak memory.

    kernel(x) of x with itself (as neural-tangents' bench.py times it; ntkit computes only the pairs
    i <= j of a symmetric Gram), and the cross kernel kernel(x, x') with x' another draw (all n^2 pairs)."""
    import torch

    threads = int(os.environ.get("BENCH_CNTK_THREADS", "1"))
    torch.set_num_threads(threads)
    from ntkit.kernels import _conv_gap

    path = os.environ.get("BENCH_CNTK_GAP_PATH", "auto")  # which computation of a conv stack + GAP
    if path == "layers":  # layer by layer on whole tiles (the code before the chunked path)
        _conv_gap.plan = lambda *a: None
    elif path == "chunks":  # chunks of pairs with eager window sums, no compiled or native stack
        _conv_gap.compiled_plan = lambda *a: None
        _conv_gap.native_plan = lambda *a: None
    elif path == "compiled":  # the torch-compiled stack (the float64 default before the native stack)
        _conv_gap.native_plan = lambda *a: None
    dt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    arch = cnn(depth, readout)
    npdt = np.float32 if dtype == "float32" else None
    x = np.random.default_rng(0).standard_normal((n, h, w, c)).astype(npdt)
    x_other = np.random.default_rng(1).standard_normal((n, h, w, c)).astype(npdt)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    arch.kernel(x, dtype=dt, memory_budget=budget, fused=fused)  # warm-up (compiles when fused)
    first = time.perf_counter() - t0
    times, cross, cpu = [], [], []
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        k = arch.kernel(x, dtype=dt, memory_budget=budget, fused=fused)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    for _ in range(3):
        t0 = time.perf_counter()
        arch.kernel(x, x_other, dtype=dt, memory_budget=budget, fused=fused)
        cross.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    np.savez(save, nngp=k.nngp.double().numpy(), ntk=k.ntk.double().numpy())
    med = statistics.median(times)
    return {"lib": "ntkit", "readout": readout, "n": n, "shape": [h, w, c], "depth": depth, "dtype": dtype,
            "fused": fused, "seconds": round(med, 6), "seconds_per_entry": med / n**2,
            "all_seconds": [round(t, 4) for t in times], "first_call_seconds": round(first, 3),
            "cross_seconds_per_entry": statistics.median(cross) / n**2,
            "cpu_seconds_per_entry": statistics.median(cpu) / n**2,  # the process's CPU time: robust to load
            "peak_extra_rss_bytes": peak * 1024, "memory_budget": budget, "threads": threads}


def run_ntkit(args, n, readout, dtype, save, fused=False, path="auto"):
    cmd = [sys.executable, __file__, "--one",
           json.dumps([n, 28, 28, 1, args.depth, readout, dtype, args.budget, save, fused])]
    out = subprocess.run(cmd, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "BENCH_CNTK_GAP_PATH": path})
    if out.returncode:
        raise RuntimeError(out.stderr)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["gap_path"] = path
    return res


def run_nt(args, n, readout, dtype, save):
    cmd = [args.nt, str(args.tool)] + (["--x64"] if dtype == "float64" else []) + \
        ["--cntk", str(n), "28", "28", "1", str(args.depth), readout, "--save", save]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(a_path, b_path):
    a, b = np.load(a_path), np.load(b_path)
    return {k: float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()) for k in ("nngp", "ntk")}


def _gram_with_progress(arch, xa, xb, dt, budget, strip, label, log):
    """The kernel of xa with xb (xb None: the symmetric Gram of xa), computed in strips of ``strip`` rows
    (symmetric: strip x strip blocks on and above the diagonal, mirrored), printing one progress line per
    block: pairs done, elapsed seconds, estimated remaining seconds."""
    import torch

    same = xb is None
    xb = xa if same else xb
    n1, n2 = len(xa), len(xb)
    out = torch.empty((n1, n2), dtype=dt)
    blocks = [(i0, j0) for i0 in range(0, n1, strip) for j0 in range(i0 if same else 0, n2, strip)]
    total = n1 * (n1 + 1) // 2 if same else n1 * n2
    done, t0 = 0, time.perf_counter()
    for i0, j0 in blocks:
        i1, j1 = min(i0 + strip, n1), min(j0 + strip, n2)
        if same and i0 == j0:
            k = arch.kernel(xa[i0:i1], get="ntk", dtype=dt, memory_budget=budget, fused=True, progress=False)
            done += (i1 - i0) * (i1 - i0 + 1) // 2
        else:
            k = arch.kernel(xa[i0:i1], xb[j0:j1], get="ntk", dtype=dt, memory_budget=budget, fused=True,
                            progress=False)
            done += (i1 - i0) * (j1 - j0)
        out[i0:i1, j0:j1] = k
        if same and i0 != j0:
            out[j0:j1, i0:i1] = k.T
        el = time.perf_counter() - t0
        print(json.dumps({"progress": label, "pairs_done": done, "pairs_total": total, "elapsed_s": round(el, 1),
                          "s_per_pair": round(el / done, 6), "eta_s": round(el / done * (total - done), 1),
                          "utc": time.strftime("%H:%M:%S", time.gmtime())}), file=log, flush=True)
    return out


def mnist_gram(args):
    import torch

    from ntkit.dynamics import gradient_descent_mse
    from ntkit.experiments.data import load_mnist

    torch.set_num_threads(1)
    images, labels = load_mnist(args.mnist, n=args.mnist_train + args.mnist_test)
    x = images.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4))[..., None]  # 2x2 average pooling -> 14x14x1
    x = (x - x.mean()) / x.std()
    xtr, xte = x[: args.mnist_train], x[args.mnist_train:]
    ytr, yte = labels[: args.mnist_train], labels[args.mnist_train:]
    arch = cnn(args.depth, "gap")
    dt = torch.float32 if args.mnist_dtype == "float32" else torch.float64
    if args.mnist_test_rows is not None:  # the accuracy on the first R held-out digits only
        xte, yte = xte[: args.mnist_test_rows], yte[: args.mnist_test_rows]
    t_gram = t_cross = float("nan")
    if args.mnist_load_train:  # a train Gram saved by an earlier (or parallel) run of this script
        k_tt = torch.from_numpy(np.load(args.mnist_load_train)["k_train_train"])
    elif args.mnist_skip_train:
        k_tt = None
    else:
        t0 = time.perf_counter()
        k_tt = _gram_with_progress(arch, xtr, None, dt, args.budget, args.mnist_strip, "train x train", sys.stdout)
        t_gram = time.perf_counter() - t0
        if args.save:
            np.savez(args.save, k_train_train=k_tt.numpy(), y_train=ytr, x_train=xtr, y_test=yte, x_test=xte)
    if args.mnist_load_test:
        k_st = torch.from_numpy(np.load(args.mnist_load_test)["k_test_train"])[: len(yte)]
    else:
        t0 = time.perf_counter()
        k_st = _gram_with_progress(arch, xte, xtr, dt, args.budget, args.mnist_strip, "test x train", sys.stdout)
        t_cross = time.perf_counter() - t0
    acc = float("nan")
    if k_tt is not None:
        onehot = np.eye(10)[ytr] - 0.1
        pred = gradient_descent_mse(k_tt.double(), onehot, diag_reg=1e-4).predict(float("inf"), k_st.double())
        acc = float((np.asarray(pred.test).reshape(len(yte), 10).argmax(1) == yte).mean())
    if args.save:
        arrays = dict(k_test_train=k_st.numpy(), y_train=ytr, y_test=yte, x_train=xtr, x_test=xte)
        if k_tt is not None:
            arrays["k_train_train"] = k_tt.numpy()
        np.savez(args.save, **arrays)
    n = args.mnist_train
    per_entry = t_gram / (n * (n + 1) / 2)  # symmetric: the pairs i <= j are computed
    return {"lib": "ntkit", "kind": "mnist_cntk_gap_14x14", "kernel": "ntk", "dtype": args.mnist_dtype,
            "n_train": n, "n_test": len(yte), "gram_seconds": round(t_gram, 2), "cross_seconds": round(t_cross, 2),
            "seconds_per_unique_entry": per_entry, "cross_seconds_per_entry": t_cross / (n * len(yte)),
            "kernel_regression_test_accuracy": acc, "threads": 1, "memory_budget": args.budget, "fused": True,
            "saved": args.save}


def table(rows):
    """A compact markdown table of the side-by-side measurements."""
    lines = ["| readout | dtype | N | ntkit path | ntkit s/entry kernel(x) | ntkit CPU s/entry kernel(x) | "
             "ntkit s/entry kernel(x, x') | first call s | neural-tangents s/entry | speed-up kernel(x) | "
             "speed-up kernel(x, x') | max rel diff NNGP / NTK |", "|" + " --- |" * 12]
    for r in rows:
        m, ref = r["ntkit"], r.get("nt")
        nt = ref["seconds_per_entry"] if ref else float("nan")
        diff = r.get("diff", {})
        label = ("fused" if m["fused"] else "eager") + ("" if m.get("gap_path", "auto") == "auto" else
                                                         f", {m['gap_path']}")
        lines.append(f"| {m['readout']} | {m['dtype']} | {m['n']} | {label} | "
                     f"{m['seconds_per_entry']:.3g} | {m.get('cpu_seconds_per_entry', float('nan')):.3g} | "
                     f"{m['cross_seconds_per_entry']:.3g} | {m['first_call_seconds']:.3g} | "
                     f"{nt:.3g} | {nt / m['seconds_per_entry']:.2f}x | {nt / m['cross_seconds_per_entry']:.2f}x | "
                     f"{diff.get('nngp', float('nan')):.1e} / {diff.get('ntk', float('nan')):.1e} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nt", help="python of the neural-tangents environment (../shared/tools/neural_tangents/setup.sh)")
    ap.add_argument("--tool", default=SHARED / "tools" / "neural_tangents" / "bench.py")
    ap.add_argument("--skip-nt", action="store_true")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--n-gap", type=int, default=4)
    ap.add_argument("--n-flatten", type=int, default=64)
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--budget", type=float, default=1.5e9, help="ntkit memory_budget in bytes")
    ap.add_argument("--mnist", default=SHARED / "data" / "mnist")
    ap.add_argument("--mnist-train", type=int, default=1000)
    ap.add_argument("--mnist-test", type=int, default=1000)
    ap.add_argument("--mnist-dtype", default="float32")
    ap.add_argument("--skip-mnist", action="store_true")
    ap.add_argument("--only-mnist", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for ntkit's CNTK runs (default 1)")
    ap.add_argument("--fused", choices=("both", "on", "off"), default="both",
                    help="time ntkit with fused=False, fused=True or both (default)")
    ap.add_argument("--mnist-strip", type=int, default=100, help="rows per progress block of the MNIST kernels")
    ap.add_argument("--mnist-test-rows", type=int, help="use only the first R held-out digits")
    ap.add_argument("--mnist-skip-train", action="store_true",
                    help="compute only the test x train kernel (save it with --save; no accuracy)")
    ap.add_argument("--mnist-load-train", help=".npz with k_train_train from an earlier --save")
    ap.add_argument("--mnist-load-test", help=".npz with k_test_train from an earlier --save")
    ap.add_argument("--save", help="save the MNIST train Gram, test x train kernel, inputs and labels to this .npz")
    ap.add_argument("--gap-paths", default="auto",
                    help="comma list of GAP computations to time side by side: auto (the library's choice), "
                         "layers (layer by layer on whole tiles, as before the chunked path), chunks (chunked, "
                         "eager window sums), compiled (the torch-compiled stack, no native loops)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # a subprocess: its torch threads come from the parent's BENCH_CNTK_THREADS
        print(json.dumps(one_ntkit(*json.loads(args.one))))
        return
    os.environ["BENCH_CNTK_THREADS"] = str(args.threads)  # read by the --one subprocesses
    tmp = Path(tempfile.mkdtemp(prefix="bench_cntk_"))
    rows = []
    if not args.only_mnist:
        for readout, n in (("gap", args.n_gap), ("flatten", args.n_flatten)):
            for dtype in args.dtypes.split(","):
                ref = None
                if not (args.skip_nt or not args.nt):
                    ref = run_nt(args, n, readout, dtype, str(tmp / f"nt_{readout}_{dtype}.npz"))
                    print(json.dumps(ref), flush=True)
                runs = [(f, p) for f in {"both": (False, True), "on": (True,), "off": (False,)}[args.fused]
                        for p in (args.gap_paths.split(",") if readout == "gap" else ["auto"])]
                for fused, path in runs:
                    save = str(tmp / f"ntkit_{readout}_{dtype}_{fused}_{path}.npz")
                    mine = run_ntkit(args, n, readout, dtype, save, fused, path)
                    print(json.dumps(mine), flush=True)
                    row = {"ntkit": mine, "nt": ref}
                    if ref is not None:
                        row["diff"] = compare(save, tmp / f"nt_{readout}_{dtype}.npz")
                        print(json.dumps({"readout": readout, "dtype": dtype, "n": n, "fused": fused,
                                          "speedup_per_entry": ref["seconds_per_entry"] / mine["seconds_per_entry"],
                                          "max_rel_diff_vs_nt": row["diff"]}), flush=True)
                    rows.append(row)
        print(table(rows), flush=True)
    if not args.skip_mnist:
        print(json.dumps(mnist_gram(args)), flush=True)


if __name__ == "__main__":
    main()
