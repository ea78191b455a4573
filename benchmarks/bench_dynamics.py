"""Benchmark: MSE training-dynamics predictions at many times from one eigendecomposition.

Side by side in one run, on the same kernel (NTK of a depth-2 ReLU MLP, ntkit, float64):

1. ntkit.dynamics.gradient_descent_mse: one eigendecomposition, then O(n^2 k + n_test n k) per time;
2. re-solving per time (a fresh eigendecomposition of K for every t; timed on a few t and scaled to all);
3. neural-tangents 0.6.5 ``nt.predict.gradient_descent_mse`` (its own venv, JAX x64, CPU), as a subprocess
   reading the kernel from a temporary .npy file.

Usage (from the repo root):

    NT=$(../shared/tools/neural_tangents/setup.sh | tail -n 1)
    .venv/bin/python benchmarks/bench_dynamics.py --n 5000 --n-test 1000 --times 100 --nt-python "$NT"
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import ntkit
from ntkit.dynamics import gradient_descent_mse

NT_SCRIPT = r"""
import sys, time, json
import numpy as np
from jax import config
config.update("jax_enable_x64", True)
import jax.numpy as jnp
import neural_tangents as nt
d = sys.argv[1]
k = jnp.asarray(np.load(d + "/k.npy")); ks = jnp.asarray(np.load(d + "/ks.npy")); y = jnp.asarray(np.load(d + "/y.npy"))
ts = jnp.asarray(np.load(d + "/t.npy")); lr = float(sys.argv[2]); reg = float(sys.argv[3])
t0 = time.perf_counter()
fn = nt.predict.gradient_descent_mse(k, y, learning_rate=lr, diag_reg=reg)
tr, te = fn(ts, 0., 0., ks)
te = np.asarray(te.block_until_ready()); tr = np.asarray(tr)
sec = time.perf_counter() - t0
np.save(d + "/nt_test.npy", te)
print(json.dumps({"seconds": sec}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--d", type=int, default=20)
    ap.add_argument("--k", type=int, default=1, help="outputs")
    ap.add_argument("--times", type=int, default=100)
    ap.add_argument("--resolve-sample", type=int, default=3, help="times actually re-solved (scaled to --times)")
    ap.add_argument("--nt-python", default=None)
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n + args.n_test, args.d, generator=g, dtype=torch.float64)
    xtr, xte = x[: args.n], x[args.n:]
    y = torch.sin(xtr[:, : args.k] * 2) + 0.1 * torch.randn(args.n, args.k, generator=g, dtype=torch.float64)
    arch = ntkit.mlp(depth=2, width=512, activation="relu", W_std=2**0.5, b_std=0.1, out_dim=1)
    t0 = time.perf_counter()
    k = arch.kernel(xtr, None, get="ntk")
    ks = arch.kernel(xte, xtr, get="ntk")
    t_kernel = time.perf_counter() - t0
    lr, reg = 1.0, 1e-4
    lam_mean = float(torch.trace(k)) / args.n
    m = args.n * args.k
    ts = torch.logspace(-1, 2, args.times, dtype=torch.float64) * m / (lr * lam_mean)  # 0.1 .. 100 mean-mode times

    # 1. ntkit
    t0 = time.perf_counter()
    pred = gradient_descent_mse(k, y, learning_rate=lr, diag_reg=reg)
    t_eig = time.perf_counter() - t0
    out = pred.predict(ts, k_test_train=ks)
    t_ours = time.perf_counter() - t0
    ours = out.test.numpy()

    # 2. re-solve per time (fresh eigh each time), on a sample of times
    sample = list(range(0, args.times, max(1, args.times // args.resolve_sample)))[: args.resolve_sample]
    t0 = time.perf_counter()
    err_resolve = 0.0
    for i in sample:
        p = gradient_descent_mse(k, y, learning_rate=lr, diag_reg=reg).predict(float(ts[i]), k_test_train=ks).test
        err_resolve = max(err_resolve, float((p - out.test[i]).abs().max() / out.test[i].abs().max()))
    t_resolve = (time.perf_counter() - t0) / len(sample) * args.times

    res = {"n": args.n, "n_test": args.n_test, "k": args.k, "times": args.times, "kernel_s": t_kernel,
           "ntkit_eigh_s": t_eig, "ntkit_total_s": t_ours, "ntkit_per_time_ms": (t_ours - t_eig) / args.times * 1e3,
           "resolve_total_s_extrapolated": t_resolve, "resolve_sampled_times": len(sample),
           "resolve_vs_ntkit_max_rel_diff": err_resolve, "torch_threads": torch.get_num_threads()}

    if args.nt_python:
        with tempfile.TemporaryDirectory() as d:
            np.save(d + "/k.npy", k.numpy())
            np.save(d + "/ks.npy", ks.numpy())
            np.save(d + "/y.npy", y.numpy())
            np.save(d + "/t.npy", ts.numpy())
            script = Path(d) / "nt_run.py"
            script.write_text(NT_SCRIPT)
            r = subprocess.run([args.nt_python, str(script), d, str(lr), str(reg)], capture_output=True, text=True)
            if r.returncode != 0:
                res["nt_error"] = r.stderr[-2000:]
            else:
                res["nt_total_s"] = json.loads(r.stdout.strip().splitlines()[-1])["seconds"]
                nt_test = np.load(d + "/nt_test.npy").reshape(ours.shape)
                res["nt_vs_ntkit_max_rel_diff"] = float(np.abs(nt_test - ours).max() / np.abs(ours).max())
    res["resolve_over_ntkit"] = res["resolve_total_s_extrapolated"] / res["ntkit_total_s"]
    if "nt_total_s" in res:
        res["nt_over_ntkit"] = res["nt_total_s"] / res["ntkit_total_s"]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.exit(main())
