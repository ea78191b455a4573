#!/usr/bin/env python3
"""Multiply-add counts of the empirical NTK of the benchmark models, per layer: ntkit's structured routes
(the per-layer choice of ``auto``) against torch.func's Jacobian contraction (arithmetic only, nothing timed).

For each weight-sharing layer (positions L, patch size d, output channels c) at n samples, k outputs, x2 = None:

* torch.func contraction: n^2 k^2 d c ("full") or n^2 k d c ("trace"): every pair, no symmetry;
* ntkit "jacobian" route: n k L d c to form the per-layer Jacobian rows from the captured inputs and
  cotangents, then half of the n^2 k^2 d c (n^2 k d c) Gram matrix (symmetry);
* ntkit "positions" route: n^2 L^2 (d + k c) + n^2 k^2 L c (n^2 k L c for "trace"), half of it by symmetry is
  not counted (rows chunks above the diagonal only: ~0.58 of it at n = 64).

Layers at one position (Linear on a vector): n^2 (d + k^2 c); the embedding: the matching token pairs; norm
affine parameters: their per-sample gradients. Passes: torch.func runs one forward and k backward passes
per sample that also form the weight gradients (~ n F + 2 n k F); ntkit one forward of k + 1 copies and one
backward pass without weight gradients (~ (k + 1) n F + n k F); F = forward multiply-adds per sample.

    PYTHONPATH=. .venv/bin/python benchmarks/flops_empirical_models.py [--n 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _empirical_models import build  # noqa: E402
from ntkit.empirical import _ntk as E  # noqa: E402
from ntkit.empirical import _rules as R  # noqa: E402
from ntkit.empirical._inputs import prepare_inputs  # noqa: E402


def table(name: str, n: int, k: int = 10):
    model, x = build(name, 2)
    params = {nm: p.detach() for nm, p in model.named_parameters()}
    t = prepare_inputs(x, "x1", dtype=torch.float32, device=None)
    fwd = E._Forward(model, params, None)
    with E._no_fast_path():
        _, calls, _ = E._probe(fwd, params, model, t[:1])
    rows, flops = [], 0
    tot = {"full": [0.0, 0.0], "trace": [0.0, 0.0]}
    vocab_tokens = None
    for call in calls:
        if call.rule is None:
            continue
        w, f, i, m, L, c = R.feature_sizes(call, 1)
        flops += f // 2
        nparam = call.module.weight.numel() if call.module is not None else params[call.w].numel()
        if call.rule == "embedding":
            vocab, dim = call.module.weight.shape
            tokens = x.shape[1]
            matches = (n * tokens) ** 2 / vocab + n * tokens  # expected equal-id pairs, uniform ids
            for out in tot:
                kk = k * k if out == "full" else k
                tf, nt = n * n * kk * vocab * dim, matches * kk * dim / 2
                tot[out][0] += tf
                tot[out][1] += nt
            rows.append((call.w, "embedding", tokens, vocab, dim, "token matches",
                         n * n * k * k * vocab * dim, matches * k * k * dim / 2))
            continue
        if call.rule not in ("linear", "conv"):
            for out in tot:
                kk = k * k if out == "full" else k
                tot[out][0] += n * n * kk * nparam
                tot[out][1] += n * n * kk * nparam / 2
            continue
        if L == 0:  # one position
            pa = R.patches(call.module, call.a[:1])
            d, c, L = pa.shape[2], w, 1
        else:
            d = m // c
        res = {}
        for out in tot:
            kk = k * k if out == "full" else k
            tf = n * n * kk * d * c
            if L == 1:
                route, nt = "one position", n * n * (d + kk * c) / 2
            else:
                route = R.dense_route(n, n, k, k, L, L, d, c, out, True)
                nt = R.dense_cost(route, n, n, k, k, L, L, d, c, out, True)
            tot[out][0] += tf
            tot[out][1] += nt
            res[out] = (route, tf, nt)
        rows.append((call.w or "?", call.rule, L, d, c, res["full"][0] + " / " + res["trace"][0],
                     res["full"][1], res["full"][2]))
    passes_tf = n * flops + 2 * n * k * flops
    passes_nt = (k + 1) * n * flops + n * k * flops
    return rows, tot, passes_tf, passes_nt, flops


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--models", nargs="+", default=["resnet18", "transformer"])
    ap.add_argument("--per-layer", action="store_true")
    args = ap.parse_args()
    for name in args.models:
        rows, tot, ptf, pnt, f = table(name, args.n)
        print(f"\n{name}: F = {f / 1e6:.1f} M multiply-adds per sample forward")
        if args.per_layer:
            print("| weight | rule | L | d | c | ntkit route (full / trace) | torch.func full GMAC | ntkit full GMAC |")
            print("|---|---|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6] / 1e9:.2f} | {r[7] / 1e9:.2f} |")
        print("| output | torch.func contraction | ntkit contraction | torch.func passes | ntkit passes | "
              "torch.func total | ntkit total | ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for out, (tf, nt) in tot.items():
            print(f"| {out} | {tf / 1e9:.0f} G | {nt / 1e9:.0f} G | {ptf / 1e9:.0f} G | {pnt / 1e9:.0f} G | "
                  f"{(tf + ptf) / 1e9:.0f} G | {(nt + pnt) / 1e9:.0f} G | {(tf + ptf) / (nt + pnt):.1f}x |")


if __name__ == "__main__":
    main()
