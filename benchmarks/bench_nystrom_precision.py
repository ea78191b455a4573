"""NTKNystroem in float32: which eigenvalue cut-off keeps the features faithful (MNIST digits).

The centers' kernel matrix K_CC = V diag(l) V^T is factored in float64; the transform computes k(x, C) in the
working dtype and multiplies by V diag(l^-1/2) V^T over the kept eigenvalues. This script compares, on 3000
MNIST digits (2000 centers, 500 other digits transformed), the float32 features against float64's for the
library's cut-off, max(m eps64, eps32) max(l), and for the cut-off of its first version, m eps32 max(l):
how many directions each keeps and how far the float32 features and their Gram matrix are from float64's.

    PYTHONPATH=$PWD python benchmarks/bench_nystrom_precision.py --mnist ../shared/data/mnist
"""

from __future__ import annotations

import argparse

import torch

import ntkit
from ntkit.experiments.data import load_mnist
from ntkit.features import NTKNystroem


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", default="../shared/data/mnist")
    p.add_argument("--centers", type=int, default=2000)
    args = p.parse_args()
    images, _ = load_mnist(args.mnist)
    x = torch.as_tensor(images.reshape(len(images), -1), dtype=torch.float64)
    arch = ntkit.mlp(1, W_std=2**0.5, b_std=0.1)
    m = args.centers
    ref = NTKNystroem(arch, m, random_state=0, progress=False).fit(x[:3000])
    f32 = NTKNystroem(arch, m, random_state=0, dtype=torch.float32, progress=False).fit(x[:3000])
    xt = x[5000:5500]
    p64 = ref.transform(xt)
    g64 = p64 @ p64.T
    lam, vec = torch.linalg.eigh(arch.kernel(ref.components_, get="ntk"))
    print(f"K_CC of {m} centers: eigenvalues {float(lam[0]):.3g} .. {float(lam[-1]):.3g} "
          f"(smallest / largest {float(lam[0] / lam[-1]):.2e})")
    k32 = arch.kernel(xt.float(), ref.components_.float(), get="ntk", dtype=torch.float32)
    old_cut = float(lam[-1]) * m * torch.finfo(torch.float32).eps
    keep = lam > old_cut
    old_norm = (vec * torch.where(keep, lam.clamp_min(old_cut).rsqrt(), torch.zeros_like(lam))) @ vec.T
    rows = [("library cut-off max(m eps64, eps32) max(l)", f32.rank_, f32.transform(xt).double()),
            ("first version's cut-off m eps32 max(l)", int(keep.sum()), (k32 @ old_norm.float()).double())]
    print(f"float64 features keep {ref.rank_} of {m} directions")
    for name, rank, p32 in rows:
        print(f"float32, {name}: keeps {rank} of {m}; features differ from float64's by "
              f"{float((p32 - p64).norm() / p64.norm()):.2e}, Gram matrices by "
              f"{float((p32 @ p32.T - g64).norm() / g64.norm()):.2e} (relative Frobenius)")


if __name__ == "__main__":
    main()
