#!/usr/bin/env python3
"""Empirical NTK of real models: ntkit ``auto`` vs torch.func's Jacobian contraction (time, peak memory).

Models (``benchmarks/_empirical_models.py``; float32, random init, eval mode, k = 10 outputs, n inputs,
torch.manual_seed(0)), x2 = None, output="trace" (n x n) and output="full" (n x n x 10 x 10):

* ``resnet18``: torchvision's ResNet-18 written out (7x7 stride-2 stem, max-pooling, BasicBlocks [2, 2, 2, 2],
  fc(512, 10); 11.2 M parameters) on N(0, 1) inputs of 3 x 32 x 32 -- torchvision does not install beside this
  torch. ``resnet18-cifar`` (3x3 stride-1 stem, no max-pooling) on request.
* ``transformer``: Embedding(10 000, 256), 4 nn.TransformerEncoderLayer(256, 4 heads, feed-forward 1024, GELU,
  batch first), mean over the 64 tokens, Linear(256, 10); 5.7 M parameters; ids uniform in [0, 10 000).

ntkit runs on all n inputs under ``memory_budget`` in a fresh process: time, and peak memory = the process's
peak resident set minus its size after building model and inputs (ru_maxrss).

The torch.func baseline is the tutorial's Jacobian contraction: J = vmap(jacrev(f_single)) over the samples,
then einsum('Naf,Mbf->NMab') ("full") or einsum('Naf,Maf->NM') / k ("trace") of the flattened Jacobians. At
n = 64 its Jacobian (n k P numbers: 29 GB for ResNet-18) does not fit this machine, so its time is assembled
from two measurements, each at the full problem's shape, in a way that can only favour torch.func:

* Jacobian: vmap(jacrev) of ``--jac-block`` samples and, separately, a loop of jacrev (vectorised over the k
  outputs) over the same samples, both timed; the faster, times n / block (the cost is linear in n; the
  Jacobian is computed once, as if x2's Jacobian were x1's, and never recomputed for blocking);
* contraction: the einsum on a random (n, k, f) slice of f = ``--chunk`` parameter columns, timed, times P / f
  (the contraction is linear in P: this is the einsum of the full n = 64 Jacobian without ever holding it, at
  the full GEMM shape, so no small-n extrapolation of its n^2 cost is involved; torch.func's einsum computes
  all n^2 pairs, it does not exploit the symmetry of x2 = None, which ntkit does).

torch.func's memory is reported as its Jacobian alone, n k P x 4 bytes (one Jacobian reused for both sides).

``--budgets-gb`` adds ntkit at further memory budgets (time and peak vs ``memory_budget``), each against the
same baseline. The load average (1 minute) is recorded before and after each measurement.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_empirical_models.py [--budget-gb 4] [--n 64]
        [--budgets-gb 0.5 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r'''
import json, resource, sys, time
import torch
sys.path.insert(0, sys.argv[5]); sys.path.insert(0, sys.argv[5] + "/benchmarks")
from _empirical_models import build
model_name, method, n, output, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[6])
extra = int(sys.argv[7])
model, x = build(model_name, n)
params = {k: v.detach() for k, v in model.named_parameters()}
P = sum(p.numel() for p in params.values())
k = 10
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
res = {"model": model_name, "method": method, "n": n, "output": output, "n_params": P}
if method == "tf_jacobian":  # vmap(jacrev) on `extra` samples, per-sample time
    from torch.func import functional_call, jacrev, vmap

    def f_single(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)
    xb = x[:extra]
    t0 = time.perf_counter()
    j = vmap(jacrev(f_single), (None, 0))(params, xb)
    j = [t.flatten(2) for t in j.values()]
    dt_vmap = time.perf_counter() - t0
    del j
    t0 = time.perf_counter()
    for i in range(extra):  # one jacrev (vectorised over the k outputs) per sample: faster for some models
        j = jacrev(f_single)(params, xb[i])
        j = [t.flatten(1) for t in j.values()]
        del j
    dt_loop = time.perf_counter() - t0
    dt = min(dt_vmap, dt_loop)
    res.update(block=extra, seconds=dt, per_sample=dt / extra, vmap_seconds=dt_vmap, loop_seconds=dt_loop)
elif method == "tf_contract":  # the einsum at the full (n, k, f) shape on f = extra parameter columns
    g = torch.Generator().manual_seed(0)
    j = torch.randn(n, k, extra, generator=g)
    j2 = torch.randn(n, k, extra, generator=g)
    spec = "Naf,Mbf->NMab" if output == "full" else "Naf,Maf->NM"
    torch.einsum(spec, j[:2, :, :1000], j2[:2, :, :1000])  # warm-up
    t0 = time.perf_counter()
    out = torch.einsum(spec, j, j2)
    dt = time.perf_counter() - t0
    res.update(chunk=extra, seconds=dt, per_param=dt / extra)
else:
    import ntkit.empirical._ntk as E
    from ntkit.empirical import empirical_ntk
    seen, routes = [], []
    orig = E.peak_memory_estimate

    def spy(*a, **kw):
        r = orig(*a, **kw)
        seen.append(r)
        return r
    E.peak_memory_estimate = spy
    E._ROUTE_LOG = routes
    t0 = time.perf_counter()
    out = empirical_ntk(model, x, output=output, memory_budget=budget, progress=False)
    dt = time.perf_counter() - t0
    r = {}
    for block in routes:
        for nm, route in block.items():
            r[route] = r.get(route, 0) + 1
    res.update(seconds=dt, estimate_bytes=seen[-1] + out.numel() * out.element_size(), routes=r,
               checksum=float(out.double().abs().sum()))
res["peak_bytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
print(json.dumps(res))
'''


def run(model, method, n, output, budget, extra=0):
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", WORKER, model, method, str(n), output, str(ROOT), str(budget),
                           str(extra)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"model": model, "method": method, "n": n, "output": output, "error": proc.stderr[-2000:]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(budget=budget, load=(round(load, 1), round(os.getloadavg()[0], 1)))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-gb", type=float, default=4.0, help="ntkit's memory_budget in GB")
    ap.add_argument("--budgets-gb", type=float, nargs="*", default=[], help="further budgets for ntkit (GB)")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--jac-block", type=int, default=4, help="samples per timed torch.func Jacobian")
    ap.add_argument("--chunk", type=int, default=250_000, help="parameter columns of the timed contraction")
    ap.add_argument("--models", nargs="+", default=["resnet18", "transformer"])
    ap.add_argument("--outputs", nargs="+", default=["trace", "full"])
    ap.add_argument("--json", type=Path, default=None, help="write all measurements here")
    args = ap.parse_args()
    budget = args.budget_gb * 1e9
    rows, table = [], []
    k = 10
    for model in args.models:
        jac = run(model, "tf_jacobian", args.n, "full", budget, args.jac_block)
        print(json.dumps(jac), flush=True)
        rows.append(jac)
        for output in args.outputs:
            ours = run(model, "ntkit", args.n, output, budget)
            print(json.dumps(ours), flush=True)
            con = run(model, "tf_contract", args.n, output, budget, args.chunk)
            print(json.dumps(con), flush=True)
            rows += [ours, con]
            more = []
            for b in args.budgets_gb:
                more.append(run(model, "ntkit", args.n, output, b * 1e9))
                print(json.dumps(more[-1]), flush=True)
            rows += more
            if any("error" in p for p in (jac, con)):
                continue
            p = jac["n_params"]
            t_jac, t_con = jac["per_sample"] * args.n, con["per_param"] * p
            t_tf = t_jac + t_con
            m_tf = args.n * k * p * 4
            for r in [ours] + more:
                if "error" in r:
                    continue
                table.append({"model": model, "output": output, "budget_GB": r["budget"] / 1e9,
                              "ntkit_s": r["seconds"], "ntkit_peak_GB": r["peak_bytes"] / 1e9,
                              "ntkit_estimate_GB": r["estimate_bytes"] / 1e9, "routes": r.get("routes"),
                              "tf_jacobian_s": t_jac, "tf_contract_s": t_con, "tf_s": t_tf, "tf_GB": m_tf / 1e9,
                              "speedup": t_tf / r["seconds"], "memory_ratio": m_tf / max(r["peak_bytes"], 1),
                              "load": r["load"]})
    print()
    print("| model | output | budget GB | ntkit s | ntkit peak GB (estimate) | torch.func s: Jacobian + contraction "
          "= total | torch.func GB (Jacobian) | speed-up | memory ratio | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['model']} | {r['output']} | {r['budget_GB']:g} | {r['ntkit_s']:.1f} | {r['ntkit_peak_GB']:.2f} "
              f"({r['ntkit_estimate_GB']:.2f}) | {r['tf_jacobian_s']:.0f} + {r['tf_contract_s']:.0f} = "
              f"{r['tf_s']:.0f} | {r['tf_GB']:.1f} | {r['speedup']:.1f}x | {r['memory_ratio']:.1f}x | "
              f"{r['load'][0]}-{r['load'][1]} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "table": table}, indent=1))


if __name__ == "__main__":
    main()
