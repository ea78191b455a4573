"""Command line interface: ``python -m ntkit <command>`` (also installed as ``ntkit``).

Commands
--------
demo     exact infinite-width kernels of a ReLU net and how finite networks approach them
kernel   NNGP/NTK of an architecture config on inputs from .npy files, saved to .npz
predict  predictions of the infinitely wide net trained by gradient flow on MSE, at any times
uci      the UCI-90 benchmark protocol of Arora et al. 2020 (ntkit.experiments.uci)
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

    print("\nfinite networks vs infinite width: relative Frobenius error of one network's kernels, "
          "mean over seeds")
    print(f"{'width':>7} {'seeds':>6} {'NNGP err':>10} {'NTK err':>10}")
    from torch.func import functional_call, jacrev

    m = 2048  # readout units: the NNGP is estimated from their outer products
    for width in args.widths:
        seeds = args.seeds
        e1 = e2 = 0.0
        for s in range(seeds):
            net = arch.init(width, seed=s, out_dim=m)
            with torch.no_grad():
                f = net(x)
            nngp = f @ f.T / m
            params = {k_: v.detach() for k_, v in net.named_parameters()}
            jac = jacrev(lambda p: functional_call(net, p, (x,))[:, 0])(params)
            j = torch.cat([v.reshape(n, -1) for v in jac.values()], dim=1)
            e1 += float((nngp - k.nngp).norm() / k.nngp.norm()) / seeds
            e2 += float((j @ j.T - k.ntk).norm() / k.ntk.norm()) / seeds
        print(f"{width:>7} {seeds:>6} {e1:>10.4f} {e2:>10.4f}")
    print("\nOne network's kernels deviate from the infinite-width ones by O(width^-1/2) (Jacot et al. 2018, "
          "Thm. 1; Lee et al. 2018): 4x the width, half the error (the NNGP column levels off at the sampling "
          f"error of {m} readout units, ~{(2 / m) ** 0.5:.2f}).")
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


def _predict(args) -> int:
    import ntkit
    from ntkit.dynamics import gradient_descent_mse

    arch = ntkit.from_config(args.config)
    x_train, y_train, x_test = np.load(args.x_train), np.load(args.y_train), np.load(args.x_test)
    times = [float("inf") if t in ("inf", "infinity") else float(t) for t in args.times.split(",")]
    t0 = time.perf_counter()
    k = arch.kernel(x_train, get=args.kernel)
    k_test = arch.kernel(x_test, x_train, get=args.kernel)
    predictor = gradient_descent_mse(k, y_train, learning_rate=args.learning_rate, diag_reg=args.diag_reg)
    pred = predictor.predict(times, k_test)
    dt = time.perf_counter() - t0
    out = {"times": np.asarray(times), "test": pred.test.cpu().numpy(), "train": pred.train.cpu().numpy()}
    np.savez(args.out, **out)
    print(f"wrote {args.out}: {args.kernel} predictions on {len(x_test)} test points at {len(times)} times "
          f"({dt:.3f} s; loss normalised by y.size, learning rate {args.learning_rate})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "uci":  # hand every remaining option to the UCI runner's own parser
        from ntkit.experiments import uci

        return uci.main(argv[1:])
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
    p = sub.add_parser("predict", help="gradient-flow (MSE) predictions of the infinitely wide net")
    p.add_argument("--config", required=True, help="architecture config (.json/.yaml)")
    p.add_argument("--x-train", required=True, help=".npy, (n, d)")
    p.add_argument("--y-train", required=True, help=".npy, (n,) or (n, k)")
    p.add_argument("--x-test", required=True, help=".npy, (m, d)")
    p.add_argument("--times", default="inf", help="comma-separated times, 'inf' for kernel regression")
    p.add_argument("--kernel", default="ntk", choices=["ntk", "nngp"])
    p.add_argument("--learning-rate", type=float, default=1.0)
    p.add_argument("--diag-reg", type=float, default=0.0, help="relative diagonal regularizer")
    p.add_argument("--out", default="predictions.npz")
    p.set_defaults(func=_predict)
    sub.add_parser("uci", help="UCI-90 protocol of Arora et al. 2020 (see: ntkit uci --help)")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
