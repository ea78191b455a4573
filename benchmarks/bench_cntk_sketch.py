"""CNTK sketch vs the exact CNTK-GAP on 14x14 MNIST digits: accuracy and time, side by side in one run.

Data: the first digits of the MNIST t10k set, 2x2 average-pooled to 14x14x1 and standardised with the mean and
standard deviation of the first 2000 digits (as ``bench_cntk.py --only-mnist`` with its default 1000 + 1000).
Architecture: ``bench_cntk.py``'s CNN (depth x [Conv 3x3 SAME, W_std^2 = 2, b_std = 0.05, ReLU], GlobalAvgPool,
Dense), NTK. Both sides solve the same kernel ridge problem, (K + lam I) a = Y with one-hot targets (minus 0.1)
and lam = diag_reg * mean(diag K): with K the exact kernel, or K~ = Phi Phi^T of the sketch features (solved in
the primal, ``ntkit.solvers.feature_ridge``: the same predictions).

1. Small n (train: digits [0, n), test: digits [1000, 1000 + n_test)): the exact CNTK-GAP (Gram + test kernel)
   vs the sketch at several n_components: accuracy, relative Frobenius error of the train Gram, time.
2. Larger n with one n_components: features of digits [0, n_large) once; train on [0, 1000), test on
   [1000, 2000) (compared with a precomputed exact 1000 x 1000 kernel if ``--exact-cache`` is given), then
   train on [0, 1000) + [2000, n_large), same test set -- a size where the exact kernel is out of reach.

    python benchmarks/bench_cntk_sketch.py --mnist ../shared/data/mnist --out bench_cntk_sketch.json \
        [--exact-cache cntk_mnist14_1000.npz]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

import ntkit
from ntkit.experiments.data import load_mnist
from ntkit.features import CNTKSketch

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


def cnn(depth: int):
    layers = []
    for _ in range(depth):
        layers += [ntkit.Conv(64, (3, 3), padding="SAME", W_std=2**0.5, b_std=0.05), ntkit.Relu()]
    return ntkit.serial(*layers, ntkit.GlobalAvgPool(), ntkit.Dense(1, 2**0.5, 0.05))


def digits(path, n):
    images, labels = load_mnist(path, n=max(n, 2000))
    x = images.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4))[..., None]  # 2x2 average pooling -> 14x14x1
    ref = x[:2000]
    x = (x - ref.mean()) / ref.std()
    return x[:n], labels[:n]


def onehot(labels):
    return torch.as_tensor(np.eye(10)[labels] - 0.1, dtype=torch.float64)


def krr_accuracy(k_tt, k_st, ytr, yte, diag_regs):
    """{diag_reg: test accuracy} of kernel ridge regression, lam = diag_reg * mean(diag K)."""
    k_tt = torch.as_tensor(k_tt, dtype=torch.float64)
    out = {}
    for r in diag_regs:
        lam = r * float(k_tt.diagonal().mean())
        a = torch.linalg.solve(k_tt + lam * torch.eye(len(k_tt), dtype=torch.float64), onehot(ytr))
        pred = torch.as_tensor(k_st, dtype=torch.float64) @ a
        out[r] = float((pred.argmax(1).numpy() == yte).mean())
    return out


def feature_accuracy(ftr, fte, ytr, yte, diag_regs):
    """Ridge on features == kernel ridge with K~ = Phi Phi^T (lam relative to mean(diag K~)): the primal
    normal equations (Phi^T Phi + lam I) w = Phi^T Y, as ``ntkit.solvers.feature_ridge``."""
    ftr, fte = ftr.double(), fte.double()
    out = {}
    for r in diag_regs:
        lam = r * float((ftr * ftr).sum(1).mean())
        a = ftr.T @ ftr
        a.diagonal().add_(lam)
        w = torch.linalg.solve(a, ftr.T @ onehot(ytr))
        out[r] = float(((fte @ w).argmax(1).numpy() == yte).mean())
    return out


def rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def save(args, out):
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mnist", default=SHARED / "data" / "mnist")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--n-exact", type=int, default=150, help="train and test size of the exact side")
    ap.add_argument("--m", default="256,512,1024,2048", help="n_components of the small-n sweep")
    ap.add_argument("--n-large", type=int, default=4000, help="digits featurized for the larger-n part "
                    "(below 2000: skip that part)")
    ap.add_argument("--m-large", type=int, default=512)
    ap.add_argument("--seeds", type=int, default=1, help="random_state 0 .. seeds-1 for each m of the sweep")
    ap.add_argument("--diag-regs", default="1e-4,1e-3,1e-2", help="lam / mean(diag K) values (accuracy for each)")
    ap.add_argument("--save-features", help="save the larger-n features and labels to this .npz")
    ap.add_argument("--budget", type=float, default=1e9, help="memory_budget (bytes) of exact kernel and sketch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--exact-cache", help=".npz with an exact CNTK-GAP on digits [0, 1000) x [0, 1000) and "
                    "[1000, 2000) x [0, 1000) (same data and architecture)")
    ap.add_argument("--out", default="bench_cntk_sketch.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    arch = cnn(args.depth)
    n = args.n_exact
    x, labels = digits(args.mnist, max(args.n_large, 1000 + n))
    xtr, ytr = x[:n], labels[:n]
    xte, yte = x[1000:1000 + n], labels[1000:1000 + n]
    regs = [float(v) for v in args.diag_regs.split(",")]
    out = {"depth": args.depth, "diag_regs": regs, "threads": args.threads, "n_train": n, "n_test": n}

    # 1. exact CNTK-GAP at small n
    t0 = time.perf_counter()
    k_tt = arch.kernel(xtr, get="ntk", dtype=torch.float32, memory_budget=args.budget, progress=False)
    k_st = arch.kernel(xte, xtr, get="ntk", dtype=torch.float32, memory_budget=args.budget, progress=False)
    t_exact = time.perf_counter() - t0
    acc_exact = krr_accuracy(k_tt, k_st, ytr, yte, regs)
    k_tt = k_tt.double()
    rows = [{"method": "exact CNTK-GAP (float32) + kernel ridge", "n_components": None, "accuracy": acc_exact,
             "time_s": round(t_exact, 1)}]
    out["small"] = rows
    save(args, out)
    print(f"exact n={n}: acc {acc_exact} in {t_exact:.1f} s", flush=True)
    for m, seed in [(int(v), s) for v in args.m.split(",") for s in range(args.seeds)]:
        t0 = time.perf_counter()
        fm = CNTKSketch(arch, m, random_state=seed, dtype="float32", memory_budget=args.budget, progress=False).fit(xtr)
        ftr, fte = fm.transform(xtr), fm.transform(xte)
        acc = feature_accuracy(torch.as_tensor(ftr), torch.as_tensor(fte), ytr, yte, regs)
        t = time.perf_counter() - t0
        f = torch.as_tensor(ftr, dtype=torch.float64)
        err = float((f @ f.T - k_tt).norm() / k_tt.norm())
        rows.append({"method": "CNTKSketch (float32) + ridge", "n_components": m, "seed": seed, "accuracy": acc,
                     "time_s": round(t, 1), "gram_rel_frobenius_error": round(err, 4),
                     "speedup_vs_exact": round(t_exact / t, 1)})
        save(args, out)
        print(f"sketch m={m} seed={seed}: acc {acc} in {t:.1f} s, Gram error {err:.3f}", flush=True)

    # 2. larger n: featurize digits [0, n_large) once
    if args.n_large < 2000:
        return
    m = args.m_large
    t0 = time.perf_counter()
    fm = CNTKSketch(arch, m, random_state=0, dtype="float32", memory_budget=args.budget, progress=False).fit(x)
    feats = torch.as_tensor(fm.transform(x[:args.n_large]))
    t_feat = time.perf_counter() - t0
    per_image = t_feat / args.n_large
    large = {"n_components": m, "featurized": args.n_large, "feature_seconds": round(t_feat, 1),
             "seconds_per_image": round(per_image, 4), "peak_rss_gb": round(rss_gb(), 2), "rows": []}
    out["large"] = large
    tr_idx = {1000: np.arange(1000), args.n_large - 1000: np.r_[0:1000, 2000:args.n_large]}
    te_idx = np.arange(1000, 2000)
    for n_tr, idx in tr_idx.items():
        t0 = time.perf_counter()
        acc = feature_accuracy(feats[idx], feats[te_idx], labels[idx], labels[te_idx], regs)
        t_solve = time.perf_counter() - t0
        large["rows"].append({"n_train": int(n_tr), "n_test": 1000, "accuracy": acc,
                              "time_s (features of train + test, solve)":
                                  round(per_image * (n_tr + 1000) + t_solve, 1)})
        print(f"sketch m={m} n_train={n_tr}: acc {acc}", flush=True)
    if args.save_features:
        np.savez(args.save_features, features=feats.numpy(), labels=labels[:args.n_large])
    if args.exact_cache and Path(args.exact_cache).exists():
        z = np.load(args.exact_cache)
        large["exact_cache_keys"] = sorted(z.files)
        ktr, kte = z["k_train_train"], z["k_test_train"]
        acc = krr_accuracy(ktr, kte, labels[:1000], labels[1000:2000], regs)
        f = feats[:1000].double()
        kt = torch.as_tensor(ktr, dtype=torch.float64)
        large["exact_n1000"] = {"accuracy": acc, "gram_rel_frobenius_error_of_sketch":
                                round(float((f @ f.T - kt).norm() / kt.norm()), 4)}
        print(f"exact (cache) n_train=1000: acc {acc}", flush=True)
    save(args, out)


if __name__ == "__main__":
    main()
