"""Benchmarks of ntkit.spectra: top-k subspace iteration vs full eigh, Funk-Hecke vs Gram-matrix eigenvalues.

Run from the repository root:  .venv/bin/python benchmarks/bench_spectra.py [--n 4000]
"""

from __future__ import annotations

import argparse
import time

import torch

import ntkit
from ntkit.spectra import Laplace, eigendecomposition, mercer_eigenvalues


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, 3, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    arch = ntkit.mlp(depth=2, activation="relu", W_std=2**0.5, b_std=0.3)
    k, tk = _timed(lambda: arch.kernel(x, get="ntk"))
    print(f"NTK kernel n={args.n}: {tk:.2f} s")
    full, tf = _timed(lambda: eigendecomposition(k))
    top, tt = _timed(lambda: eigendecomposition(k, top_k=args.top_k, tol=1e-10))
    err = float(((top.eigenvalues - full.eigenvalues[: args.top_k]).abs() / full.eigenvalues[: args.top_k]).max())
    print(f"full eigh: {tf:.2f} s | top-{args.top_k} subspace iteration: {tt:.2f} s | speed-up {tf / tt:.1f}x | "
          f"max rel. eigenvalue difference {err:.1e}")
    for name, ker in (("ReLU NTK depth 2, b_std=0.3", arch), ("Laplace(1)", Laplace(1.0))):
        sp, tm = _timed(lambda: mercer_eigenvalues(ker, 3, 100))
        gram = k if ker is arch else ker(x)
        ev = full.eigenvalues if ker is arch else torch.linalg.eigvalsh(gram).flip(0)
        lam = sp.eigenvalues.repeat_interleave(sp.multiplicities.long()).sort(descending=True).values
        rows = []
        for m in (1, 4, 9, 16, 25):
            rows.append(f"M={m}: {float(ev[:m].sum() / args.n / lam[:m].sum() - 1):+.1e}")
        print(f"{name}: Funk-Hecke k<=100 in {tm * 1e3:.0f} ms ({sp.order} nodes, max est. error "
              f"{float(sp.error.max()):.1e}); Gram/n top-M sums vs Funk-Hecke (rel.): " + ", ".join(rows))


if __name__ == "__main__":
    main()
