#!/usr/bin/env python3
"""Multiply-add counts of the empirical NTK of the benchmark models, per layer and per output form: torch.func's
Jacobian contraction, ntkit's structured routes as implemented, and the cheapest exact method this count knows
of (per layer the best of the routes below, ideal symmetry) -- arithmetic only, nothing timed.

n samples, k outputs, x2 = None (a symmetric kernel), kk = k^2 ("full") or k ("trace"). Per use of a layer:

* weight shared over L positions (Linear over tokens, convolution), patch d, output channels c:
  torch.func: n^2 kk d c (its einsum over all pairs; its Jacobian rows are the weight gradients of its
  backward passes, counted under passes);
  per-layer Jacobian: n k L d c (the rows J_a = sum_p g_ap (x) a_p) + s n^2 kk d c (their Gram matrix);
  position pairs: s (n^2 L^2 (d + k c) + n^2 kk L c ["full" only]).
  ntkit takes the route :func:`ntkit.empirical._rules.dense_route` picks; the minimum takes the cheaper one.
  Its bias: torch.func n^2 kk c; the others n k L c + s n^2 kk c.
* a Linear on one position: torch.func n^2 kk (d c + c); the others s n^2 (d + kk c) (a a^T and g g^T, the
  Hadamard product).
* an Embedding V x D on L tokens: torch.func n^2 kk V D (dense Jacobian rows); ntkit M kk D with M the
  (sample, token) row pairs of equal token (counted on the benchmark's own ids, all ordered pairs); the minimum
  half of that.
* a norm's affine weight and bias (c numbers each at L positions): torch.func 2 n^2 kk c; the others 2 (n k L c
  + s n^2 kk c) (per-sample gradients, their Gram matrix).

s is the fraction of a symmetric Gram matrix computed: ntkit's row chunks on and above the diagonal
(``_rules.sym_fraction``, 0.58 at n = 64; 1 for the per-layer Jacobian's "trace" Gram matrix, an n-row product
bound by reading its operands, computed whole), the minimum (n + 1) / (2 n).

Passes, F = forward multiply-adds per sample of the recorded layers (attention's score and value products,
2 L^2 E per layer, ~1 % of the transformer's F, and the element-wise layers are not counted):
torch.func n F + 2 n k F (a forward, and per output a backward that forms input cotangents and weight
gradients); ntkit n F + (k + 1) n F (one forward, k + 1 backward passes of cotangents only through its graph,
the last the row check); the minimum n F + n k F (one forward, k cotangent backwards; the weight gradients are
the routes' own work above).

    PYTHONPATH=. .venv/bin/python benchmarks/flops_empirical_models.py [--n 64] [--per-layer]
        [--measured bench.json]  (the --json of bench_empirical_models.py: adds the measured speed-up)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _empirical_models import build  # noqa: E402
from ntkit.empirical import _ntk as E  # noqa: E402
from ntkit.empirical import _rules as R  # noqa: E402
from ntkit.empirical._inputs import prepare_inputs  # noqa: E402

FORMS = ("full", "trace")


def embedding_matches(ids: torch.Tensor) -> int:
    """Ordered pairs of (sample, distinct token) rows with the same token: the rows ntkit's embedding term
    multiplies (per sample the cotangents of repeated tokens are summed first)."""
    counts = {}
    for row in ids.tolist():
        for t in set(row):
            counts[t] = counts.get(t, 0) + 1
    return sum(v * v for v in counts.values())


def table(name: str, n: int, k: int = 10):
    model, x = build(name, n)
    params = {nm: p.detach() for nm, p in model.named_parameters()}
    t = prepare_inputs(x[:1], "x1", dtype=torch.float32, device=None)
    fwd = E._Forward(model, params, None)
    with E._no_fast_path():
        _, calls, _ = E._probe(fwd, params, model, t)
    s_nt, s_min = R.sym_fraction(n), (n + 1) / (2 * n)
    rows, F = [], 0
    tot = {o: {"tf": 0.0, "nt": 0.0, "min": 0.0} for o in FORMS}
    for call in calls:
        if call.rule is None:
            continue
        w, f, _, m, L, c = R.feature_sizes(call, 1)
        F += f // 2
        cost, kind = {}, call.rule
        if call.rule in ("linear", "conv"):
            if L == 0:  # one position: the patch size from the layer's input
                d, c, L = R.patches(call.module, call.a[:1]).shape[2], w, 1
            else:
                d = m // c
        for out in FORMS:
            kk = k * k if out == "full" else k
            if call.rule == "embedding":
                vocab, dim = call.module.weight.shape
                pairs = embedding_matches(x)
                cost[out] = (n * n * kk * vocab * dim, pairs * kk * dim, pairs * kk * dim / 2, "token matches")
            elif call.rule in ("layernorm", "channelnorm"):
                c_ = call.module.weight.numel()
                Ln = w // c_
                nt = 2 * (n * k * Ln * c_ + s_nt * n * n * kk * c_)
                mn = 2 * (n * k * Ln * c_ + s_min * n * n * kk * c_)
                cost[out] = (2 * n * n * kk * c_, nt, mn, "per-sample gradients")
                kind = "norm"
            else:
                bias = call.b is not None
                if L == 1:
                    tf = n * n * kk * (d * c + (c if bias else 0))
                    cost[out] = (tf, s_nt * n * n * (d + kk * c), s_min * n * n * (d + kk * c), "one position")
                else:
                    extra = n * n * kk * L * c if out == "full" else 0
                    pos = n * n * L * L * (d + k * c) + extra
                    jac_form, gram = n * k * L * d * c, n * n * kk * d * c
                    route = R.dense_route(n, n, k, k, L, L, d, c, out, True)
                    s_gram = s_nt if out == "full" else 1.0  # contract_sym: whole for trace/diagonal
                    nt = s_nt * pos if route == "positions" else jac_form + s_gram * gram
                    mn = min(s_min * pos, jac_form + s_min * gram)
                    tf = gram
                    if bias:
                        tf += n * n * kk * c
                        nt += n * k * L * c + s_nt * n * n * kk * c
                        mn += n * k * L * c + s_min * n * n * kk * c
                    cost[out] = (tf, nt, mn, route)
            for key, val in zip(("tf", "nt", "min"), cost[out][:3]):
                tot[out][key] += val
        rows.append((call.w or "?", kind, L, cost))
    passes = {"tf": n * F + 2 * n * k * F, "nt": n * F + (k + 1) * n * F, "min": n * F + n * k * F}
    return rows, tot, passes, F


def measured_speedups(path: Path | None) -> dict:
    if path is None:
        return {}
    table = json.loads(path.read_text())["table"]
    return {(r["model"], r["output"]): r["speedup"] for r in table if r.get("budget_GB", 0) == max(
        q.get("budget_GB", 0) for q in table if q["model"] == r["model"] and q["output"] == r["output"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--models", nargs="+", default=["resnet18", "transformer"])
    ap.add_argument("--per-layer", action="store_true")
    ap.add_argument("--measured", type=Path, default=None, help="JSON written by bench_empirical_models.py --json")
    args = ap.parse_args()
    meas = measured_speedups(args.measured)
    summary = []
    for name in args.models:
        rows, tot, passes, F = table(name, args.n)
        print(f"\n{name}: F = {F / 1e6:.1f} M multiply-adds per sample forward, n = {args.n}, k = 10")
        if args.per_layer:
            print("| weight | rule | L | route | torch.func full / trace G | ntkit full / trace G | "
                  "minimum full / trace G |")
            print("|---|---|---|---|---|---|---|")
            for nm, kind, L, cost in rows:
                routes = " / ".join(dict.fromkeys(cost[o][3] for o in FORMS))
                cols = [" / ".join(f"{cost[o][i] / 1e9:.2f}" for o in FORMS) for i in range(3)]
                print(f"| {nm} | {kind} | {L} | {routes} | {cols[0]} | {cols[1]} | {cols[2]} |")
        print(f"passes: torch.func {passes['tf'] / 1e9:.0f} G, ntkit {passes['nt'] / 1e9:.0f} G, "
              f"minimum {passes['min'] / 1e9:.0f} G")
        for out in FORMS:
            t = {key: tot[out][key] + passes[key] for key in passes}
            summary.append((name, out, tot[out], t))
    print("\n| model | output | torch.func: layers + passes = total | minimum: layers + passes = total | "
          "ntkit: layers + passes = total | bound (torch.func / minimum) | ntkit by count | measured |")
    print("|---|---|---|---|---|---|---|---|")
    for name, out, layers, t in summary:
        passes = {key: t[key] - layers[key] for key in t}
        cells = [f"{layers[key] / 1e9:.0f} + {passes[key] / 1e9:.0f} = {t[key] / 1e9:.0f} G"
                 for key in ("tf", "min", "nt")]
        m = meas.get((name, out))
        print(f"| {name} | {out} | {cells[0]} | {cells[1]} | {cells[2]} | {t['tf'] / t['min']:.1f}x | "
              f"{t['tf'] / t['nt']:.1f}x | {'-' if m is None else f'{m:.1f}x'} |")


if __name__ == "__main__":
    main()
