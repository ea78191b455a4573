#!/usr/bin/env python3
"""Recurrent NTK: timing of a 200 x 200 kernel of variable-length sequences, and RNTK-SVM vs the NTK of
resampled / zero-padded sequences vs DTW-1NN on real time-series classification sets, side by side in one run.

Part 1 (timing): 200 sequences of lengths drawn uniformly in [50, 100], d = 3 features, RNN(ReLU,
W_std = sqrt(2), U_std = 1, b_std = 0.1) + Dense readout; NNGP + NTK for readout "last" (one time-diagonal
chain per pair) and "mean" (the whole T x T' grid per pair), float64 and float32; one warm-up call on 20
sequences, then the median of --repeats calls. Memory budget 2 GB (``memory_budget=``), --threads torch
threads (default 1: on a shared, oversubscribed machine small per-step tensors lose ~1000x to OpenMP
contention with 2 threads).

Part 2 (classification): the data sets bundled with aeon (``aeon.datasets.load_classification``, the
copies inside the wheel; nothing is downloaded), train/test splits as published (UCR/UEA archive). Each
channel is standardised with the training set's mean and standard deviation. Methods:

* ``rntk``: SVC on the precomputed RNTK (normalised to unit diagonal) of RNN(ReLU, U_std = 1, b_std = 0.1)
  + Dense; W_std in {0.5, 1, sqrt 2}, readout in {last, mean} ("mean", whose cost is the full time grid,
  only when (sum_i T_i)^2 / 2 <= --max-mean-pairs (default 5e8) pairs of time steps), C in
  {0.1, 1, 10, 100, 1000}, chosen by 3-fold stratified cross-validation on the training set.
* ``ntk-resampled`` / ``ntk-padded``: SVC on the NTK (unit diagonal) of a ReLU MLP (depth 1-3, W_std sqrt 2,
  b_std 0.1) on the sequences linearly resampled to the median training length / zero-padded to the
  longest, flattened; same C grid and selection.
* ``dtw-1nn``: aeon's KNeighborsTimeSeriesClassifier(distance="dtw", n_neighbors=1), no window.

Times are wall seconds of kernel computation + model selection + fit + prediction, in one process.

Usage (from the repository root):
    python benchmarks/bench_rntk.py [--datasets JapaneseVowels PickupGestureWiimoteZ ...] [--out benchmarks/out/rntk]
    python benchmarks/bench_rntk.py --datasets --baseline /path/to/older/checkout --bidirectional   # timing vs an older version
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import ntkit

BUDGET = 2e9
VARIABLE = ("JapaneseVowels", "PickupGestureWiimoteZ")
FIXED = ("ItalyPowerDemand", "GunPoint", "ArrowHead", "BasicMotions", "OSULeaf")


def rnn_arch(W_std, readout, act=None, bidirectional=False):
    return ntkit.serial(ntkit.RNN(W_std=W_std, U_std=1.0, b_std=0.1, activation=act or ntkit.Relu(),
                                  readout=readout, bidirectional=bidirectional),
                        ntkit.Dense(1, W_std=1.0, b_std=0.0))


# -------------------------------------------------------------------------------------------------
N_TIMING = 200


def timing_sequences(n=None, lengths=(50, 100), d=3, seed=0):
    n = N_TIMING if n is None else n
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(t), d)) for t in rng.integers(lengths[0], lengths[1] + 1, size=n)]


def time_kernel(readout, dtype, repeats, bidirectional=False):
    """(wall seconds of each call, the NTK) of the 200 x 200 NNGP + NTK, after a warm-up on 20 sequences."""
    seqs = timing_sequences()
    arch = rnn_arch(2 ** 0.5, readout, bidirectional=bidirectional)
    arch.kernel(seqs[:20], dtype=dtype, memory_budget=BUDGET)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        k = arch.kernel(seqs, dtype=dtype, memory_budget=BUDGET)
        times.append(time.perf_counter() - t0)
    return times, k.ntk.double().numpy()


def bench_timing(repeats=3, baseline=None, configs=None):
    """Timing table; with ``baseline`` (a directory holding another version of the ntkit package) each
    configuration is also timed with that version, in a subprocess, right before the current one."""
    n = len(timing_sequences())
    rows, refs = [], {}
    configs = configs or [(r, dt, False) for r in ("last", "mean") for dt in ("float64", "float32")]
    for readout, dtype, bidir in configs:
        row = dict(readout=readout + (" bidirectional" if bidir else ""), dtype=dtype)
        if baseline is not None:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "k.npz"
                env = {**os.environ, "PYTHONPATH": str(Path(baseline).resolve())}
                subprocess.run([sys.executable, str(Path(__file__).resolve()), "--timing-worker", readout, dtype, str(int(bidir)), str(out),
                                "--repeats", str(repeats), "--threads", str(torch.get_num_threads()),
                                "--timing-n", str(n)],
                               check=True, env=env, cwd=tempfile.gettempdir())
                z = np.load(out)
                base_times, base_k = list(z["times"]), z["k"]
            row["baseline_seconds"] = statistics.median(base_times)
            row["baseline_times"] = base_times
        times, k = time_kernel(readout, getattr(torch, dtype), repeats, bidir)
        med = statistics.median(times)
        key = (readout, bidir)
        if dtype == "float64":
            refs[key] = k
        row.update(seconds=med, times=times, per_entry_us=med / (n * (n + 1) / 2) * 1e6)
        if key in refs:
            row["rel_err_vs_f64"] = float(np.abs(k - refs[key]).max() / np.abs(refs[key]).max())
        if baseline is not None:
            row["speedup"] = row["baseline_seconds"] / med
            row["rel_diff_vs_baseline"] = float(np.abs(k - base_k).max() / np.abs(base_k).max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# -------------------------------------------------------------------------------------------------
def load(name):
    from aeon.datasets import load_classification

    out = []
    for split in ("train", "test"):
        X, y = load_classification(name, split=split)
        seqs = [np.asarray(x, dtype=np.float64).T for x in X]  # (channels, T) -> (T, channels)
        out.append((seqs, np.asarray(y)))
    return out


def standardise(train, test):
    cat = np.concatenate(train, 0)
    mu, sd = cat.mean(0), cat.std(0) + 1e-12
    return [(s - mu) / sd for s in train], [(s - mu) / sd for s in test]


def normalise(k_all, n_train):
    d = np.sqrt(np.clip(np.diag(k_all), 1e-300, None))
    return k_all / np.outer(d, d)


def select_svc(kernels, y_train, n_train):
    """(cv accuracy, best key, best C) by stratified CV over kernels (dict key -> (n_all, n_all)): the
    alemohammad-rntk reproduction's selection, so benchmark and reproduction choose alike."""
    from ntkit.experiments.reproductions.alemohammad_rntk import select_svm_by_cv

    return select_svm_by_cv(kernels, np.asarray(y_train), n_train)


def fit_predict(k, y_train, y_test, n_train, c):
    from sklearn.svm import SVC

    clf = SVC(kernel="precomputed", C=c).fit(k[:n_train, :n_train], y_train)
    return float((clf.predict(k[n_train:, :n_train]) == y_test).mean())


def resample(seqs, length):
    out = []
    for s in seqs:
        t_old = np.linspace(0.0, 1.0, len(s))
        t_new = np.linspace(0.0, 1.0, length)
        out.append(np.stack([np.interp(t_new, t_old, s[:, c]) for c in range(s.shape[1])], 1).reshape(-1))
    return np.stack(out)


def pad(seqs, length):
    out = np.zeros((len(seqs), length, seqs[0].shape[1]))
    for i, s in enumerate(seqs):
        out[i, : min(len(s), length)] = s[:length]
    return out.reshape(len(seqs), -1)


def run_dataset(name, max_mean_pairs=5e8):
    (tr, ytr), (te, yte) = load(name)
    tr, te = standardise(tr, te)
    n_train = len(tr)
    allseq = tr + te
    lens = [len(s) for s in allseq]
    res = dict(dataset=name, n_train=n_train, n_test=len(te), channels=tr[0].shape[1], length_min=min(lens),
               length_max=max(lens), classes=int(len(np.unique(ytr))))
    print(f"# {name}: {res}", flush=True)

    # RNTK-SVM
    t0 = time.perf_counter()
    kernels = {}
    readouts = ("last", "mean") if sum(lens) ** 2 / 2 <= max_mean_pairs else ("last",)
    for readout in readouts:
        for w in (0.5, 1.0, 2 ** 0.5):
            k = rnn_arch(w, readout).kernel(allseq, get="ntk", memory_budget=BUDGET)
            kernels[(readout, w)] = normalise(k.numpy(), n_train)
    t_kernel = time.perf_counter() - t0
    cv, key, c = select_svc(kernels, ytr, n_train)
    res["rntk"] = dict(acc=fit_predict(kernels[key], ytr, yte, n_train, c), cv=cv, readout=key[0], W_std=key[1],
                       C=c, kernel_seconds=t_kernel, seconds=time.perf_counter() - t0)
    print(json.dumps({"dataset": name, "rntk": res["rntk"]}), flush=True)
    del kernels

    # NTK of resampled / padded sequences
    for method, flat in (("ntk-resampled", resample(allseq, int(np.median([len(s) for s in tr])))),
                         ("ntk-padded", pad(allseq, max(lens)))):
        t0 = time.perf_counter()
        kernels = {depth: normalise(ntkit.mlp(depth, W_std=2 ** 0.5, b_std=0.1).kernel(
                       flat, get="ntk", memory_budget=BUDGET).numpy(), n_train) for depth in (1, 2, 3)}
        cv, depth, c = select_svc(kernels, ytr, n_train)
        res[method] = dict(acc=fit_predict(kernels[depth], ytr, yte, n_train, c), cv=cv, depth=depth, C=c,
                           seconds=time.perf_counter() - t0)
        print(json.dumps({"dataset": name, method: res[method]}), flush=True)

    # DTW-1NN (aeon)
    from aeon.classification.distance_based import KNeighborsTimeSeriesClassifier

    t0 = time.perf_counter()
    knn = KNeighborsTimeSeriesClassifier(distance="dtw", n_neighbors=1)
    knn.fit([s.T for s in tr], ytr)
    acc = float((knn.predict([s.T for s in te]) == yte).mean())
    res["dtw-1nn"] = dict(acc=acc, seconds=time.perf_counter() - t0)
    print(json.dumps({"dataset": name, "dtw-1nn": res["dtw-1nn"]}), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="*", default=list(VARIABLE))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--max-mean-pairs", type=float, default=5e8)
    ap.add_argument("--out", default="benchmarks/out/rntk")
    ap.add_argument("--baseline", default=None,
                    help="directory holding another version of the ntkit package (e.g. a git worktree of an "
                         "older commit): the timing table runs it side by side, configuration by configuration")
    ap.add_argument("--bidirectional", action="store_true", help="also time bidirectional RNNs (both readouts)")
    ap.add_argument("--timing-n", type=int, default=200, help="sequences in the timing kernel (default 200)")
    ap.add_argument("--timing-worker", nargs=4, metavar=("READOUT", "DTYPE", "BIDIR", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global N_TIMING
    N_TIMING = args.timing_n
    if args.timing_worker:
        readout, dtype, bidir, out = args.timing_worker
        times, k = time_kernel(readout, getattr(torch, dtype), args.repeats, bool(int(bidir)))
        np.savez(out, times=np.array(times), k=k)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"torch_threads": torch.get_num_threads()}
    if not args.skip_timing:
        configs = [(r, dt, False) for r in ("last", "mean") for dt in ("float64", "float32")]
        if args.bidirectional:
            configs += [(r, "float64", True) for r in ("last", "mean")]
        results["timing"] = bench_timing(repeats=args.repeats, baseline=args.baseline, configs=configs)
    results["classification"] = [run_dataset(name, args.max_mean_pairs) for name in args.datasets]
    (out / "bench.json").write_text(json.dumps(results, indent=1))

    if "timing" in results:
        base = args.baseline is not None
        nt = N_TIMING
        print("\n| readout | dtype | " + ("baseline (s) | " if base else "") + f"{nt}x{nt} NNGP+NTK (s) | " +
              ("speed-up | max rel. diff vs baseline | " if base else "") + "per entry (us) | max rel. diff vs float64 |")
        print("| --- " * (8 if base else 5) + "|")
        for r in results["timing"]:
            cells = [r["readout"], r["dtype"]] + ([f"{r['baseline_seconds']:.2f}"] if base else []) + \
                [f"{r['seconds']:.2f}"] + ([f"{r['speedup']:.1f}x", f"{r['rel_diff_vs_baseline']:.1e}"] if base else []) + \
                [f"{r['per_entry_us']:.1f}", f"{r.get('rel_err_vs_f64', 0.0):.1e}" if r["dtype"] != "float64" else "-"]
            print("| " + " | ".join(cells) + " |")
    print("\n| data set | n train/test | channels | lengths | RNTK-SVM | NTK resampled | NTK padded | DTW-1NN |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results["classification"]:
        cells = [f"{100 * r[m]['acc']:.1f}% ({r[m]['seconds']:.1f} s)"
                 for m in ("rntk", "ntk-resampled", "ntk-padded", "dtw-1nn")]
        print(f"| {r['dataset']} | {r['n_train']}/{r['n_test']} | {r['channels']} | {r['length_min']}-"
              f"{r['length_max']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
