"""Transform time of NTKRandomFeatures for feature ridge at large m: rows consumed batch by batch
(``iter_transform``, as ``feature_ridge`` does), the NTK of ``ntkit.mlp(1, W_std=sqrt 2, b_std=0.1)``, d = 32
Gaussian inputs, float32, default batches. Prints the best of ``--repeat`` passes per m; run it on two trees
alternately to compare versions (the features are equal to 1e-15, tests/features).

    OMP_NUM_THREADS=1 PYTHONPATH=<tree> python benchmarks/bench_rf_transform.py --n 20000 --m 16384
"""

from __future__ import annotations

import argparse
import time

import torch

import ntkit
from ntkit.features import NTKRandomFeatures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--m", type=int, nargs="+", default=[16384])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(args.n, args.d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    arch = ntkit.mlp(1, W_std=2**0.5, b_std=0.1)
    for m in args.m:
        fm = NTKRandomFeatures(arch, m, random_state=0, dtype=torch.float32, progress=False).fit(x)
        best = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            for _, f in fm.iter_transform(x):
                pass
            best = min(best, time.perf_counter() - t)
        print(f"{ntkit.__file__}: n = {args.n}, m = {m}: {best:.2f} s (best of {args.repeat})", flush=True)


if __name__ == "__main__":
    main()
