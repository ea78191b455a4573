"""Is the NTK Sketch's accuracy gap its polynomial fit? Kernel ridge regression on MNIST with the exact NTK of
``ntkit.mlp(1, W_std=sqrt 2, b_std=0.1)`` vs the same NTK with the ReLU duals replaced by the sketch's
non-negative polynomial fits (``ntkit.features.arccos_polynomials``): the m -> infinity limit of NTKSketch.

    python benchmarks/bench_sketch_fit.py --mnist ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

import ntkit
from ntkit.experiments.data import load_images
from ntkit.features import arccos_polynomials


def ntk_one_layer(a, b, F, D, w2=2.0, b2=0.01):
    """NTK of one hidden layer from the duals F (NNGP) and D (derivative) of the correlation (Jacot et al. 2018)."""
    d = a.shape[1]
    s = w2 * (a @ b.T) / d + b2
    qa, qb = w2 * (a * a).sum(1) / d + b2, w2 * (b * b).sum(1) / d + b2
    sq = torch.sqrt(qa[:, None] * qb[None, :])
    rho = (s / sq).clamp(-1, 1)
    return w2 * sq * F(rho) + b2 + w2 * s * D(rho)


def relu_F(rho):
    th = torch.arccos(rho)
    return (torch.sin(th) + (math.pi - th) * rho) / (2 * math.pi)


def relu_D(rho):
    return (math.pi - torch.arccos(rho)) / (2 * math.pi)


def poly(c):
    return lambda rho: sum(float(cj) * rho**j for j, cj in enumerate(c))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", default="../shared/data/mnist")
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--diag-reg", type=float, default=1e-2)
    p.add_argument("--degrees", type=int, nargs="*", default=[2, 4, 8])
    args = p.parse_args()
    torch.set_num_threads(1)
    images, labels, _ = load_images(args.mnist)
    x = torch.as_tensor(images.reshape(len(images), -1), dtype=torch.float64)
    xtr, xte = x[:args.n_train], x[-args.n_test:]
    ltr, lte = labels[:args.n_train], labels[-args.n_test:]
    ytr = torch.as_tensor(np.eye(10)[ltr] - 0.1)
    arch = ntkit.mlp(1, W_std=2**0.5, b_std=0.1)
    ref = arch.kernel(xtr[:200], xtr[:200], get="ntk")
    err = float((ntk_one_layer(xtr[:200], xtr[:200], relu_F, relu_D) - ref).abs().max() / ref.abs().max())
    assert err < 1e-6, f"the closed form does not reproduce arch.kernel ({err})"

    def accuracy(F, D):
        k = ntk_one_layer(xtr, xtr, F, D)
        k.diagonal().add_(args.diag_reg * float(k.diagonal().mean()))
        alpha = torch.cholesky_solve(ytr, torch.linalg.cholesky(k))
        return float(((ntk_one_layer(xte, xtr, F, D) @ alpha).argmax(1).numpy() == lte).mean())

    print(f"exact NTK: accuracy {accuracy(relu_F, relu_D):.4f}", flush=True)
    xe = xtr[:400]
    ke = ntk_one_layer(xe, xe, relu_F, relu_D)
    for deg in args.degrees:
        c, e, err_f, err_d = arccos_polynomials(0.0, 1.0, deg)
        kp = ntk_one_layer(xe, xe, poly(c), poly(e))
        gram = float(torch.linalg.norm(kp - ke) / torch.linalg.norm(ke))
        print(f"degree {deg}: accuracy {accuracy(poly(c), poly(e)):.4f}, Gram difference {gram:.4f} (400 images), "
              f"max fit error F {err_f:.4f} D {err_d:.4f}", flush=True)


if __name__ == "__main__":
    main()
