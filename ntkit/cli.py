"""Command line interface: ``python -m ntkit <command>`` (also installed as ``ntkit``).

Commands
--------
demo     exact infinite-width kernels of a ReLU net and how finite networks approach them
kernel   NNGP/NTK of an architecture config on inputs from .npy files, saved to .npz
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch


def _demo(args) -> int:
    import ntkit

    torch.manual_seed(0)
    n, d = args.n, args.d
    x = torch.randn(n, d, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(d)  # Sigma0(x, x) = |x|^2 / d = 1
    arch = ntkit.mlp(depth=args.depth, activation="relu", W_std=2**0.5, b_std=0.0, readout_W_std=1.0,
                     input_dim=d)
    print(f"ntkit {ntkit.__version__} demo: FC ReLU net, depth {args.depth}, NTK parameterization, "
          f"{n} points with |x|^2 = d in R^{d}")
    print(json.dumps(arch.to_config()))
    t0 = time.perf_counter()
    k = arch.kernel(x)
    print(f"\nexact infinite-width kernels ({time.perf_counter() - t0:.3f} s):")
    np.set_printoptions(precision=4, suppress=True, linewidth=120)
    print("NNGP[:4, :4] =\n", k.nngp[:4, :4].numpy())
    print("NTK[:4, :4] =\n", k.ntk[:4, :4].numpy())
    print(f"Theta(x, x) = {float(k.ntk[0, 0]):.6f}  (= the number of Dense layers, {args.depth + 1}, "
          "for sigma_w^2 = 2 hidden layers: Arora et al. 2019)")

    print("\nfinite networks vs infinite width (relative Frobenius error, mean over seeds)")
    print(f"{'width':>7} {'seeds':>6} {'NNGP err':>10} {'NTK err':>10}")
    from torch.func import functional_call, jacrev

    m = 64  # readout units: the NNGP is estimated from their outer products
    for width in args.widths:
        seeds = args.seeds
        nngp = torch.zeros(n, n, dtype=torch.float64)
        ntk = torch.zeros(n, n, dtype=torch.float64)
        for s in range(seeds):
            net = arch.init(width, seed=s, out_dim=m)
            with torch.no_grad():
                f = net(x)
            nngp += f @ f.T / (m * seeds)
            params = {k_: v.detach() for k_, v in net.named_parameters()}
            jac = jacrev(lambda p: functional_call(net, p, (x,))[:, 0])(params)
            j = torch.cat([v.reshape(n, -1) for v in jac.values()], dim=1)
            ntk += j @ j.T / seeds
        e1 = float((nngp - k.nngp).norm() / k.nngp.norm())
        e2 = float((ntk - k.ntk).norm() / k.ntk.norm())
        print(f"{width:>7} {seeds:>6} {e1:>10.4f} {e2:>10.4f}")
    print("\nThe NTK error falls like width^-1/2 (Jacot et al. 2018, Thm. 1); the NNGP column is limited by "
          f"the Monte Carlo error of {args.seeds} seeds x {m} readout units.")
    return 0


def _kernel(args) -> int:
    import ntkit

    arch = ntkit.from_config(args.config)
    x1 = np.load(args.x1)
    x2 = np.load(args.x2) if args.x2 else None
    get = tuple(args.get.split(","))
    t0 = time.perf_counter()
    k = arch.kernel(x1, x2, get, dtype=args.dtype)
    dt = time.perf_counter() - t0
    np.savez(args.out, **{name: getattr(k, name).cpu().numpy() for name in get})
    print(f"wrote {args.out}: {', '.join(f'{g} {tuple(getattr(k, g).shape)}' for g in get)} in {dt:.3f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ntkit", description="Neural Tangent Kernel toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="exact kernels of a ReLU net and finite nets approaching them")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--d", type=int, default=5)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024, 2048])
    p.add_argument("--seeds", type=int, default=4)
    p.set_defaults(func=_demo)
    p = sub.add_parser("kernel", help="NNGP/NTK of an architecture config on .npy inputs")
    p.add_argument("--config", required=True, help="architecture config (.json/.yaml)")
    p.add_argument("--x1", required=True, help=".npy file, (n1, d)")
    p.add_argument("--x2", help=".npy file, (n2, d); default x1")
    p.add_argument("--get", default="nngp,ntk")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--out", default="kernels.npz")
    p.set_defaults(func=_kernel)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
