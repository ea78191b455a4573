"""Random features and large-n solvers, side by side in one run.

1. MNIST (first 8000 of the t10k set for training, last 2000 for testing): exact NTK kernel regression
   (direct solve) vs ridge regression on NTKRandomFeatures, accuracy and time vs n_components.
2. Scaling on synthetic regression: targets are a teacher network's outputs (a random finite ReLU net,
   width 64) on Gaussian inputs, d = 32, plus noise; features + ridge at n = 1e4 ... 1e6 (time, peak RSS,
   log-log slope of time vs n); at n = 2e4 the exact NTK (direct solve) vs features in the same run;
   FALKON (Nystrom KRR by preconditioned CG, 2000 centers) at n = 2e4 and 1e5.

    python benchmarks/bench_features.py --mnist ../shared/data/mnist --out bench_features.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch

import ntkit
from ntkit.experiments.data import load_mnist
from ntkit.features import NTKRandomFeatures
from ntkit.solvers import cholesky, falkon, feature_ridge
from ntkit.solvers._common import regularization


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def feature_fit_predict(arch, x, y, xt, m, lam, dtype, seed=0):
    def run():
        fm = NTKRandomFeatures(arch, m, random_state=seed, dtype=dtype, progress=False).fit(x)
        w = feature_ridge(fm, x, y, lam)
        pred = torch.cat([f.double() @ w for _, f in fm.iter_transform(xt)])
        return pred
    return timed(run)


def features_tuned(arch, x, y, xv, yv_labels, xt, m, lams, dtype, seed=0):
    """Ridge on features with lambda picked on a validation split (x, y: training part): Phi^T Phi is
    eigendecomposed once, each lambda costs O(m^2 k); then refit on train + validation with the best one."""
    def run():
        fm = NTKRandomFeatures(arch, m, random_state=seed, dtype=dtype, progress=False).fit(x)
        a = None
        b = None
        for i, f in fm.iter_transform(x):
            fa, fb = (f.T @ f).double(), (f.T @ y[i:i + len(f)].to(f.dtype)).double()
            a = fa if a is None else a + fa
            b = fb if b is None else b + fb
        w, v = torch.linalg.eigh(a)
        vb = v.T @ b
        fv = torch.cat([f.double() for _, f in fm.iter_transform(xv)])
        accs = []
        for lam in lams:
            coef = v @ (vb / (w.clamp_min(0) + lam)[:, None])
            accs.append(float((fv @ coef).argmax(1).numpy().__eq__(yv_labels).mean()))
        best = lams[int(np.argmax(accs))]
        fv = None
        for i, f in fm.iter_transform(xv):  # add the validation rows to the normal equations
            yy = torch.as_tensor(np.eye(10)[yv_labels[i:i + len(f)]] - 0.1, dtype=f.dtype)
            a = a + (f.T @ f).double()
            b = b + (f.T @ yy).double()
        a.diagonal().add_(best)
        coef = torch.linalg.solve(a, b)
        pred = torch.cat([f.double() @ coef for _, f in fm.iter_transform(xt)])
        return pred, best, accs
    return timed(run)


def mnist(args, out):
    images, labels = load_mnist(args.mnist)
    x = torch.as_tensor(images.reshape(len(images), -1), dtype=torch.float64)
    y = torch.as_tensor(np.eye(10)[labels] - 0.1)
    xtr, ytr, xte, lte = x[:8000], y[:8000], x[-2000:], labels[-2000:]
    arch = ntkit.mlp(args.depth, W_std=2**0.5, b_std=0.1)
    kf = arch.kernel_fn("ntk")
    lam = regularization(kf, xtr, args.diag_reg, False)

    def exact():
        coef = cholesky(kf, xtr, ytr, lam)
        return torch.cat([kf(xte[i:i + 500], xtr) @ coef for i in range(0, len(xte), 500)])
    pred, t_exact = timed(exact)
    acc_exact = float((pred.argmax(1).numpy() == lte).mean())
    rows = [{"method": "exact NTK (Cholesky)", "n_components": None, "accuracy": acc_exact, "time_s": t_exact,
             "lambda": lam}]
    print(f"MNIST exact: acc {acc_exact:.4f} in {t_exact:.1f} s", flush=True)
    mean_diag = lam / args.diag_reg
    lams = [r * mean_diag for r in (1e-3, 1e-2, 3e-2, 1e-1, 3e-1)]
    for m in args.mnist_m:
        (pred, best, accs), t = features_tuned(arch, xtr[:7000], ytr[:7000], xtr[7000:], labels[7000:8000], xte,
                                               m, lams, torch.float32)
        acc = float((pred.argmax(1).numpy() == lte).mean())
        rows.append({"method": "NTK random features + ridge (lambda on a validation split)", "n_components": m,
                     "accuracy": acc, "time_s": t, "lambda": best, "validation_accuracies": accs})
        out["mnist"] = {"depth": args.depth, "diag_reg": args.diag_reg, "rows": rows}
        save(args, out)
        print(f"MNIST features m={m}: acc {acc:.4f} in {t:.1f} s (lambda {best:.3g}; val {accs})", flush=True)
    out["mnist"] = {"depth": args.depth, "diag_reg": args.diag_reg, "rows": rows}


def teacher_data(n, d, seed, noise):
    g = torch.Generator().manual_seed(seed)
    teacher = ntkit.mlp(2, 64, W_std=2**0.5, b_std=0.1).init(seed=1234, in_features=d, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    with torch.no_grad():
        f = torch.cat([teacher(x[i:i + 100_000]) for i in range(0, n, 100_000)])
    y = f / 1.0 + noise * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x, y


def save(args, out):
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)


def scaling(args, out):
    d = 32
    arch = ntkit.mlp(args.depth, W_std=2**0.5, b_std=0.1)
    kf = arch.kernel_fn("ntk")
    xte, yte = teacher_data(5000, d, 999, args.noise)
    var = float(yte.var())
    res = {"d": d, "noise": args.noise, "test_target_variance": var, "rows": []}

    def mse(pred):
        return float(((pred - yte) ** 2).mean())

    # features + ridge, n = 1e4 ... 1e6 (data generated outside the timing)
    for n in args.scale_n:
        x, y = teacher_data(n, d, 0, args.noise)
        lam = regularization(kf, x, args.diag_reg, False)
        pred, t = feature_fit_predict(arch, x, y, xte, args.scale_m, lam, torch.float32)
        row = {"n": n, "n_components": args.scale_m, "mse": mse(pred), "time_s": t, "rss_gb": rss_gb()}
        res["rows"].append(row)
        out["scaling"] = res
        save(args, out)
        print(f"n={n} features m={args.scale_m}: mse {mse(pred):.4f} in {t:.1f} s, peak RSS {rss_gb():.2f} GB",
              flush=True)
        del x, y
    ns = [r["n"] for r in res["rows"]]
    if len(ns) >= 2:
        res["time_slope"] = float(np.polyfit(np.log(ns), np.log([r["time_s"] for r in res["rows"]]), 1)[0])
        print(f"log-log slope of time vs n: {res['time_slope']:.3f}", flush=True)
    # n = n0 (2e4 by default): exact vs features vs FALKON, same run
    n0 = args.n0
    x, y = teacher_data(n0, d, 0, args.noise)
    lam = regularization(kf, x, args.diag_reg, False)
    if not args.skip_exact:
        def exact():
            coef = cholesky(kf, x, y, lam, memory_budget=args.memory_budget)
            return torch.cat([kf(xte[i:i + 1000], x) @ coef for i in range(0, len(xte), 1000)])
        pred, t = timed(exact)
        res["exact_n0"] = {"mse": mse(pred), "time_s": t, "rss_gb": rss_gb()}
        save(args, out)
        print(f"n={n0} exact: mse {mse(pred):.4f} in {t:.1f} s", flush=True)
    for m in args.compare_m:
        pred, t = feature_fit_predict(arch, x, y, xte, m, lam, torch.float32)
        res.setdefault("features_n0", []).append({"n_components": m, "mse": mse(pred), "time_s": t})
        save(args, out)
        print(f"n={n0} features m={m}: mse {mse(pred):.4f} in {t:.1f} s", flush=True)

    def run_falkon(xx, yy, lam_):
        ctr, alpha, it, hist = falkon(kf, xx, yy, lam_, n_centers=args.centers, tol=1e-6, max_iter=200,
                                      random_state=0, memory_budget=args.memory_budget, progress=False)
        return torch.cat([kf(xte[i:i + 1000], ctr) @ alpha for i in range(0, len(xte), 1000)]), it
    (pred, it), t = timed(lambda: run_falkon(x, y, lam))
    res["falkon_n0"] = {"centers": args.centers, "mse": mse(pred), "time_s": t, "iterations": it}
    out["scaling"] = res
    save(args, out)
    print(f"n={n0} FALKON: mse {mse(pred):.4f} in {t:.1f} s ({it} it)", flush=True)
    del x, y

    for n in args.falkon_n:
        x, y = teacher_data(n, d, 0, args.noise)
        lam = regularization(kf, x, args.diag_reg, False)
        (pred, it), t = timed(lambda: run_falkon(x, y, lam))
        res.setdefault("falkon", []).append({"n": n, "centers": args.centers, "mse": mse(pred), "time_s": t,
                                             "iterations": it, "rss_gb": rss_gb()})
        print(f"n={n} FALKON: mse {mse(pred):.4f} in {t:.1f} s ({it} it), peak RSS {rss_gb():.2f} GB", flush=True)
        del x, y

    out["scaling"] = res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", default="../shared/data/mnist")
    p.add_argument("--mnist-m", type=int, nargs="*", default=[1024, 2048, 4096])
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--diag-reg", type=float, default=1e-3)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--compare-m", type=int, nargs="*", default=[1024, 2048, 4096])
    p.add_argument("--scale-n", type=int, nargs="*", default=[10_000, 30_000, 100_000, 300_000, 1_000_000])
    p.add_argument("--scale-m", type=int, default=1024)
    p.add_argument("--n0", type=int, default=20_000)
    p.add_argument("--falkon-n", type=int, nargs="*", default=[100_000])
    p.add_argument("--centers", type=int, default=2000)
    p.add_argument("--memory-budget", type=float, default=6e9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-exact", action="store_true")
    p.add_argument("--skip-mnist", action="store_true")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--out", default="bench_features.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = {"args": vars(args), "torch": torch.__version__, "threads": args.threads}
    t0 = time.perf_counter()
    if not args.skip_scaling:
        scaling(args, out)
    if not args.skip_mnist:
        mnist(args, out)
    out["total_s"] = time.perf_counter() - t0
    out["peak_rss_gb"] = rss_gb()
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
