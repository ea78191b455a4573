"""Transform time of NTKSketch against NTKRandomFeatures at equal n_components, side by side in one run.

The NTK of ``ntkit.mlp(1, W_std=sqrt 2, b_std=0.1)`` on n rows of d = 784 inputs (uniform in [0, 1], the size
of flattened MNIST digits; the time does not depend on the values), float32, one batch per transform; the
best of ``--repeat`` transforms of each map, alternating, and the ratio sketch / random features.

    OMP_NUM_THREADS=1 python benchmarks/bench_sketch_speed.py --n 2000 --m 1024 4096
"""

from __future__ import annotations

import argparse
import time

import torch

import ntkit
from ntkit.features import NTKRandomFeatures, NTKSketch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--d", type=int, default=784)
    ap.add_argument("--m", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    x = torch.rand(args.n, args.d, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    arch = ntkit.mlp(1, W_std=2**0.5, b_std=0.1)
    print(f"n = {args.n}, d = {args.d}, torch threads {torch.get_num_threads()}")
    print("| m | random features (s) | NTK Sketch (s) | sketch / random features |")
    print("| --- | --- | --- | --- |")
    for m in args.m:
        maps = [cls(arch, m, random_state=0, dtype=torch.float32, progress=False, batch_size=args.n).fit(x)
                for cls in (NTKRandomFeatures, NTKSketch)]
        best = [float("inf")] * 2
        for _ in range(args.repeat + 1):  # the first round warms up
            for i, fm in enumerate(maps):
                t = time.perf_counter()
                fm.transform(x)
                best[i] = min(best[i], time.perf_counter() - t) if _ else best[i]
        print(f"| {m} | {best[0]:.3f} | {best[1]:.3f} | {best[1] / best[0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
