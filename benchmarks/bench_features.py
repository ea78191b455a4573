"""Random features and large-n solvers, side by side in one run.

1. MNIST (first 8000 of the t10k set for training, last 2000 for testing): exact NTK kernel regression
   (direct solve) vs ridge regression on NTKRandomFeatures, accuracy and time vs n_components.
2. Scaling on synthetic regression: targets are a teacher network's outputs (a random finite ReLU net,
   width 64) on Gaussian inputs, d = 32, plus noise; features + ridge at n = 1e4 ... 1e6 (time, peak RSS,
   log-log slope of time vs n); at n = 2e4 the exact NTK (direct solve) vs features in the same run;
   FALKON (Nystrom KRR by preconditioned CG, 2000 centers) at n = 2e4 and 1e5.
3. ``--fair``: at n = n0 the exact NTK vs feature maps (random features, leverage-score features, NTK
   Sketch; ``nystrom:M`` / ``nystrom64:M``: Nystrom features with M centers, float32 / float64; ``cg:M``:
   random features with the ridge solved by matrix-free preconditioned CG) over m, every
   regressor with its own ridge picked by the same validation split of the training data; test MSE and
   times of both.

    python benchmarks/bench_features.py --mnist ../shared/data/mnist --out bench_features.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import warnings

import numpy as np
import torch

import ntkit
from ntkit.experiments.data import load_mnist
from ntkit.features import NTKNystroem, NTKRandomFeatures, NTKSketch
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


def features_tuned(arch, x, y, xv, yv_labels, xt, m, lams, dtype, seed=0, kind="random"):
    """Ridge on features with lambda picked on a validation split (x, y: training part): Phi^T Phi is
    eigendecomposed once, each lambda costs O(m^2 k); then refit on train + validation with the best one.
    ``kind``: "random" (NTKRandomFeatures) or "nystrom" (NTKNystroem, centers from the training part)."""
    def run():
        cls = NTKNystroem if kind == "nystrom" else NTKRandomFeatures
        fm = cls(arch, m, random_state=seed, dtype=dtype, progress=False).fit(x)
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
    runs = [("random", m) for m in args.mnist_m] + [("nystrom", m) for m in args.mnist_nystrom]
    for kind, m in runs:
        (pred, best, accs), t = features_tuned(arch, xtr[:7000], ytr[:7000], xtr[7000:], labels[7000:8000], xte,
                                               m, lams, torch.float32, kind=kind)
        acc = float((pred.argmax(1).numpy() == lte).mean())
        name = {"random": "NTK random features", "nystrom": "NTK Nystrom features"}[kind]
        rows.append({"method": f"{name} + ridge (lambda on a validation split)", "n_components": m,
                     "accuracy": acc, "time_s": t, "lambda": best, "validation_accuracies": accs})
        out["mnist"] = {"depth": args.depth, "diag_reg": args.diag_reg, "rows": rows}
        save(args, out)
        print(f"MNIST {name} m={m}: acc {acc:.4f} in {t:.1f} s (lambda {best:.3g}; val {accs})", flush=True)
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


# ------------------------------------------------------------------------------------------------
# n = n0: exact NTK vs features, each with its own ridge picked by the same validation procedure
def fair_cg(args, res, arch, kf, x, y, xf, yf, xv, yv, xte, yte, m, grid, mean_diag, mse, cg_tol, variant="cg"):
    """Random features (Han et al.) with the ridge solved by matrix-free Nystrom-preconditioned CG
    (``feature_ridge(..., solver="cg")``): the whole lambda grid in one CG run on the fit part (one pass over
    the features per iteration for all lambdas), validation MSE per lambda, then a refit on all n0 points at
    the chosen lambda and one score on the test set. Phi^T Phi is never formed.
    ``variant`` "cg": the default features (Gaussian directions); flags after "+" change them: "orth"
    (sampling="orthogonal"), "lev" (sampling="leverage")."""
    flags = variant.split("+")[1:]
    opts = {}
    for f in flags:
        if f in ("orth", "lev"):
            if "sampling" in opts:
                raise SystemExit(f"{variant!r}: one sampling flag at most")
            opts["sampling"] = {"orth": "orthogonal", "lev": "leverage"}[f]
        else:
            raise SystemExit(f"unknown feature flag {f!r} in {variant!r}")

    def make():
        return NTKRandomFeatures(arch, m, random_state=args.rf_seed, dtype=torch.float32, progress=False, **opts)

    def tune():
        fm = make().fit(xf)
        w, info = feature_ridge(fm, xf, yf, [r * mean_diag for r in grid], solver="cg", tol=cg_tol,
                                rank=args.cg_rank, max_iter=1000, return_info=True)
        pred = torch.cat([torch.einsum("bm,lmk->lbk", f.double(), w) for _, f in fm.iter_transform(xv)], 1)
        return [mse(pred[j], yv) for j in range(len(grid))], info
    (errs, tinfo), t_tune = timed(tune)
    r_best = grid[int(np.argmin(errs))]
    lam = r_best * float(kf(x, diagonal=True).mean())
    times = {}

    def fit_predict():
        t0 = time.perf_counter()
        fm = make().fit(x)
        w, info = feature_ridge(fm, x, y, lam, solver="cg", tol=cg_tol, rank=args.cg_rank, max_iter=1000,
                                return_info=True)
        t1 = time.perf_counter()
        pred = torch.cat([f.double() @ w for _, f in fm.iter_transform(xte)])
        times["test_predictions"] = time.perf_counter() - t1
        times["ridge_total"] = t1 - t0
        return pred, info, fm
    (pred, info, fm), t = timed(fit_predict)
    row = {"map": "CG " + (", ".join(f"{k}={v}" for k, v in opts.items()) or "gaussian"), "n_components": m,
           "random_state": args.rf_seed, "validation_mse": errs, "r": r_best, "lambda": lam,
           "test_mse": mse(pred, yte), "time_s": t, "tune_time_s": t_tune, "cg_tol": info.tol,
           "rank": info.rank, "iterations": info.iterations, "residual": info.residual, "times": {**info.times, **times},
           "features_stored": info.stored, "tune_iterations": tinfo.iterations, "tune_residual": tinfo.residual,
           "tune_times": tinfo.times}
    print(f"n={args.n0} {row['map']} m={m} tol {cg_tol:g}: r={r_best:g} test mse {row['test_mse']:.4f}, fit {t:.1f} s ({info.iterations} it, "
          f"residual {info.residual[0]:.1e}, times {row['times']}), tuning {t_tune:.1f} s ({tinfo.iterations} it "
          f"for {len(grid)} lambdas); validation {['%.4f' % e for e in errs]}", flush=True)
    if m in args.cg_plain:  # the same final solve without the preconditioner (iterations and time only)
        (_, info2), t2 = timed(lambda: feature_ridge(fm, x, y, lam, solver="cg", tol=cg_tol, preconditioner=None,
                                                      max_iter=2000, return_info=True))
        with warnings.catch_warnings():  # the grid's small lambdas need far more: capped, the residual reported
            warnings.simplefilter("ignore", RuntimeWarning)
            (_, info3), t3 = timed(lambda: feature_ridge(fm, x, y, [r * mean_diag for r in grid], solver="cg",
                                                          tol=cg_tol, preconditioner=None,
                                                          max_iter=args.cg_plain_max_iter, return_info=True))
        row["unpreconditioned"] = {"iterations": info2.iterations, "residual": info2.residual, "time_s": t2,
                                   "converged": info2.converged, "grid_iterations": info3.iterations,
                                   "grid_converged": info3.converged, "grid_residual": info3.residual,
                                   "grid_time_s": t3, "times": info2.times}
        print(f"  without preconditioner: {info2.iterations} it ({t2:.1f} s) at the chosen lambda; "
              f"{info3.iterations} it for the grid on all {len(x)} ({t3:.1f} s, residuals "
              f"{['%.1e' % v for v in info3.residual]})", flush=True)
        # the grid with the preconditioner: all lambdas in one CG run vs one run per lambda
        (_, info4), t4 = timed(lambda: feature_ridge(fm, x, y, [r * mean_diag for r in grid], solver="cg",
                                                      tol=cg_tol, rank=args.cg_rank, max_iter=1000,
                                                      return_info=True))
        sep = []
        for r in grid:
            (_, inf), tt = timed(lambda: feature_ridge(fm, x, y, r * mean_diag, solver="cg", tol=cg_tol,
                                                       rank=args.cg_rank, max_iter=1000, return_info=True))
            sep.append({"r": r, "iterations": inf.iterations, "time_s": tt})
        row["grid_preconditioned"] = {"together_iterations": info4.iterations, "together_time_s": t4,
                                      "separate": sep, "separate_time_s": sum(v["time_s"] for v in sep)}
        print(f"  grid with the preconditioner on all {len(x)}: together {info4.iterations} it in {t4:.1f} s; one run "
              f"per lambda {[v['iterations'] for v in sep]} it in {row['grid_preconditioned']['separate_time_s']:.1f} s",
              flush=True)
    if m in args.cg_check:  # the same float32 features solved directly in float64 (normal equations)
        (wd, _), td = timed(lambda: feature_ridge(fm, x, y, lam, solver="direct", return_info=True))
        pd = torch.cat([f.double() @ wd for _, f in fm.iter_transform(xte)])
        row["direct_same_features"] = {"test_mse": mse(pd, yte), "time_s": td,
                                       "prediction_rel_diff": float((pred - pd).norm() / pd.norm())}
        print(f"  direct solve of the same features: test mse {mse(pd, yte):.4f} in {td:.1f} s; CG vs direct "
              f"predictions differ by {row['direct_same_features']['prediction_rel_diff']:.1e} (relative)", flush=True)
    res["features"].append(row)

def _val_split(n, frac):
    n_val = int(round(frac * n))
    return n - n_val


def fair_comparison(args, out):
    """Exact NTK regression vs ridge on features at n = n0, tuned alike on the training data only.

    Procedure, identical for every regressor: the training set is split into its first 80% (fit) and last
    20% (validation); lambda = r x mean diag K for r in --lam-grid; the r with the lowest validation MSE is
    refit on all n0 training points and scored once on the held-out test set. Exact: one fit Gram, one
    Cholesky per r. Features: Phi_fit^T Phi_fit eigendecomposed once, every r from it. Times: the final fit
    (kernel or features + solve + test predictions) and the tuning, separately.
    """
    d = 32
    arch = ntkit.mlp(args.depth, W_std=2**0.5, b_std=0.1)
    kf = arch.kernel_fn("ntk")
    xte, yte = teacher_data(5000, d, 999, args.noise)
    x, y = teacher_data(args.n0, d, 0, args.noise)
    n_fit = _val_split(args.n0, 0.2)
    xf, yf, xv, yv = x[:n_fit], y[:n_fit], x[n_fit:], y[n_fit:]
    mean_diag = float(kf(xf, diagonal=True).mean())
    grid = list(args.lam_grid)
    res = {"n": args.n0, "n_fit": n_fit, "n_val": args.n0 - n_fit, "n_test": len(xte), "d": d, "noise": args.noise,
           "test_target_variance": float(yte.var()), "lam_grid_times_mean_diag": grid, "mean_diag_fit": mean_diag,
           "features": []}
    out["fair"] = res

    def mse(pred, target):
        return float(((pred - target) ** 2).mean())

    res["load_average_start"] = os.getloadavg()
    for spec in args.fair_maps:
        kind, m, *tol = spec.split(":")
        m = int(m)
        if kind.split("+")[0] == "cg":
            fair_cg(args, res, arch, kf, x, y, xf, yf, xv, yv, xte, yte, m, grid, mean_diag, mse,
                    float(tol[0]) if tol else args.cg_tol, variant=kind)
            save(args, out)
            continue

        def make():
            if kind == "sketch":
                return NTKSketch(arch, m, random_state=0, dtype=torch.float32, progress=False)
            if kind in ("nystrom", "nystrom64"):  # centers: rows of the data the map is fitted on
                return NTKNystroem(arch, m, random_state=args.rf_seed, progress=False,
                                   dtype=torch.float64 if kind == "nystrom64" else torch.float32)
            return NTKRandomFeatures(arch, m, random_state=0, dtype=torch.float32, progress=False,
                                     sampling="leverage" if kind == "leverage" else "gaussian")

        def tune_features():
            fm = make().fit(xf)
            a = b = None
            for i, f in fm.iter_transform(xf):
                fa, fb = (f.T @ f).double(), (f.T @ yf[i:i + len(f)].to(f.dtype)).double()
                a = fa if a is None else a.add_(fa)
                b = fb if b is None else b.add_(fb)
            w, v = torch.linalg.eigh(a)
            fv = torch.cat([f.double() for _, f in fm.iter_transform(xv)]) @ v
            vb = v.T @ b
            return [mse(fv @ (vb / (w.clamp_min(0) + r * mean_diag)[:, None]), yv) for r in grid]
        errs, t_tune = timed(tune_features)
        r_best = grid[int(np.argmin(errs))]
        lam = r_best * float(kf(x, diagonal=True).mean())

        def fit_predict():
            fm = make().fit(x)
            w = feature_ridge(fm, x, y, lam)
            return torch.cat([f.double() @ w for _, f in fm.iter_transform(xte)])
        pred, t = timed(fit_predict)
        row = {"map": kind, "n_components": m, "validation_mse": errs, "r": r_best, "lambda": lam,
               "test_mse": mse(pred, yte), "time_s": t, "tune_time_s": t_tune}
        res["features"].append(row)
        save(args, out)
        print(f"n={args.n0} {kind} m={m}: r={r_best:g} test mse {row['test_mse']:.4f}"
              + f", fit {t:.1f} s, tuning {t_tune:.1f} s; validation {['%.4f' % e for e in errs]}", flush=True)

    if not args.skip_exact:
        import scipy.linalg as sl

        def tune_exact():
            k = arch.kernel(xf, None, "ntk", dtype=torch.float64)
            kv = kf(xv, xf)
            errs = []
            for r in grid:
                kk = k.clone()
                kk.diagonal().add_(r * mean_diag)  # factorized in place (as ntkit.solvers.cholesky does)
                c = sl.cho_factor(kk.numpy().T, lower=False, overwrite_a=True, check_finite=False)
                alpha = torch.from_numpy(sl.cho_solve(c, yf.numpy(), check_finite=False))
                del kk, c
                errs.append(mse(kv @ alpha, yv))
                print(f"  exact validation r={r:g}: {errs[-1]:.4f}", flush=True)
            return errs
        errs, t_tune = timed(tune_exact)
        r_best = grid[int(np.argmin(errs))]
        lam = r_best * float(kf(x, diagonal=True).mean())

        def exact():
            coef = cholesky(kf, x, y, lam, memory_budget=args.memory_budget)
            return torch.cat([kf(xte[i:i + 1000], x) @ coef for i in range(0, len(xte), 1000)])
        pred, t = timed(exact)
        res["exact"] = {"validation_mse": errs, "r": r_best, "lambda": lam, "test_mse": mse(pred, yte),
                        "time_s": t, "tune_time_s": t_tune, "rss_gb": rss_gb()}
        save(args, out)
        print(f"n={args.n0} exact: r={r_best:g} test mse {mse(pred, yte):.4f}, fit {t:.1f} s, tuning {t_tune:.1f} s",
              flush=True)

    res["load_average_end"] = os.getloadavg()
    if "exact" in res:  # ratios once both are measured (features first: the exact solve is the long part)
        ex = res["exact"]
        for row in res["features"]:
            row["mse_ratio"] = row["test_mse"] / ex["test_mse"]
            row["time_ratio"] = ex["time_s"] / row["time_s"]
            row["time_ratio_with_tuning"] = (ex["time_s"] + ex["tune_time_s"]) / (row["time_s"] + row["tune_time_s"])
            print(f"  {row['map']} m={row['n_components']}: MSE {row['mse_ratio']:.3f} x exact, "
                  f"{row['time_ratio']:.1f}x less time ({row['time_ratio_with_tuning']:.1f}x with tuning)", flush=True)
        save(args, out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", default="../shared/data/mnist")
    p.add_argument("--mnist-m", type=int, nargs="*", default=[1024, 2048, 4096])
    p.add_argument("--mnist-nystrom", type=int, nargs="*", default=[], help="Nystrom centers for the MNIST rows")
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
    p.add_argument("--rf-seed", type=int, default=0, help="random_state of the cg:M maps' features and of the Nystrom centers")
    p.add_argument("--skip-mnist", action="store_true")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--fair", action="store_true",
                   help="only the n = n0 exact-vs-features comparison with each regressor's ridge tuned alike")
    p.add_argument("--lam-grid", type=float, nargs="*", default=[1e-3, 1e-2, 1e-1, 1.0],
                   help="lambda / mean diag K candidates of --fair")
    p.add_argument("--fair-maps", nargs="*", default=["gaussian:512", "gaussian:1024", "gaussian:2048",
                                                      "gaussian:4096", "leverage:1024", "leverage:2048",
                                                      "leverage:4096", "sketch:1024", "sketch:2048", "sketch:4096"],
                   help="feature maps of --fair as KIND:M, KIND in gaussian, leverage, sketch (normal equations) "
                        "or cg (random features, ridge by matrix-free preconditioned CG; cg:M:TOL sets its tolerance)")
    p.add_argument("--cg-tol", type=float, default=1e-5, help="relative residual of the CG feature ridge (cg:M maps)")
    p.add_argument("--cg-rank", type=int, default=None, help="Nystrom preconditioner rank of cg:M (default 1000)")
    p.add_argument("--cg-plain", type=int, nargs="*", default=[],
                   help="for these cg:M maps also solve without the preconditioner (iterations, time)")
    p.add_argument("--cg-plain-max-iter", type=int, default=400,
                   help="iteration cap of the unpreconditioned grid run of --cg-plain")
    p.add_argument("--cg-check", type=int, nargs="*", default=[],
                   help="for these cg:M maps also solve the same features directly (normal equations, float64)")
    p.add_argument("--out", default="bench_features.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = {"args": vars(args), "torch": torch.__version__, "threads": args.threads}
    t0 = time.perf_counter()
    if args.fair:
        args.skip_scaling = args.skip_mnist = True
        fair_comparison(args, out)
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
