#!/usr/bin/env python3
"""Empirical NTK: ntkit's implementations vs the two torch.func tutorial methods vs neural-tangents.

Models (float32, one output): MLP 784-512-512-512-1 (ReLU) on n = 256 inputs of dimension 784, and a
small CNN (Conv(1->16, 3x3) ReLU MaxPool(2) Conv(16->32, 3x3) ReLU MaxPool(2) Flatten Linear(32*5*5 -> 1))
on n = 256 MNIST-sized inputs (1 x 28 x 28). Inputs: np.random.default_rng(0).standard_normal.

Each method runs in a fresh subprocess: one warm-up call, then the median of 3 calls (1 call when the
warm-up took over 10 s); peak memory is the process's peak resident set size minus its size after
building model and inputs (ru_maxrss), so it covers every allocation the method makes. The tutorial's
NTK-vector-product method vmaps over all n1 x n2 input pairs at once (~100 GB here), so it is timed on
the first 16 rows of x1 against all 256 inputs and scaled by 16 (its cost is linear in n1; its memory
is that of the 16-row slice); the hand-written layerwise (a a^T)(g g^T) product is the floor. neural-tangents' three implementations (same MLP) run in its
own venv through ../shared/tools/neural_tangents/bench.py in the same run.

    .venv/bin/python benchmarks/bench_empirical.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NT_DIR = ROOT.parent / "shared" / "tools" / "neural_tangents"

WORKER = r'''
import json, resource, statistics, sys, time
import numpy as np, torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap
model_name, method = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
if model_name == "mlp":
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512),
                          nn.ReLU(), nn.Linear(512, 1))
    x = torch.as_tensor(np.random.default_rng(0).standard_normal((256, 784)), dtype=torch.float32)
else:
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 5 * 5, 1))
    x = torch.as_tensor(np.random.default_rng(0).standard_normal((256, 1, 28, 28)), dtype=torch.float32)
params = {k: v.detach() for k, v in model.named_parameters()}

def f_single(p, xi):
    return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

def tutorial_jacobian(x1, x2):  # torch.func tutorial: empirical_ntk_jacobian_contraction
    j1 = vmap(jacrev(f_single), (None, 0))(params, x1)
    j1 = [j.flatten(2) for j in j1.values()]
    j2 = vmap(jacrev(f_single), (None, 0))(params, x2)
    j2 = [j.flatten(2) for j in j2.values()]
    return torch.stack([torch.einsum("Naf,Mbf->NMab", a, b) for a, b in zip(j1, j2)]).sum(0)

def tutorial_ntk_vp(x1, x2, rows=4):  # torch.func tutorial: empirical_ntk_ntk_vps, over chunks of x1 rows
    # (the tutorial vmaps over all n1 x n2 pairs at once, which needs ~100 GB here; chunks of `rows` rows
    # keep its arithmetic and bring its memory within the machine)
    return torch.cat([tutorial_ntk_vp_pairs(x1[i:i + rows], x2) for i in range(0, x1.shape[0], rows)])

def tutorial_ntk_vp_pairs(x1, x2):
    def get_ntk(a, b):
        def fa(p): return f_single(p, a)
        def fb(p): return f_single(p, b)
        out, vjp_fn = vjp(fb, params)
        def get_ntk_slice(vec):
            (vjps,) = vjp_fn(vec)
            _, jvps = jvp(fa, (params,), (vjps,))
            return jvps
        basis = torch.eye(out.numel(), dtype=out.dtype).view(out.numel(), -1)
        return vmap(get_ntk_slice)(basis)
    return vmap(vmap(get_ntk, (None, 0)), (0, None))(x1, x2)

def handwritten_layerwise(x):  # the floor: sum over Linear layers of (a a^T) * (g g^T) (+ g g^T for biases)
    acts, outs = [], []

    def hook(m, i, o):
        acts.append(i[0])
        outs.append(o)

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    out = model(x)
    for h in hooks:
        h.remove()
    gs = torch.autograd.grad(out.sum(), outs)
    theta = 0
    for a, g in zip(acts, gs):
        theta = theta + (a @ a.T + 1.0) * (g @ g.T)
    return theta

if method.startswith("ntkit_"):
    from ntkit.empirical import empirical_ntk
    impl = method[len("ntkit_"):]
    run = lambda: empirical_ntk(model, x, implementation=impl)
elif method == "handwritten_layerwise":
    run = lambda: handwritten_layerwise(x)
elif method == "torch.func_jacobian":
    run = lambda: tutorial_jacobian(x, x)
else:  # per-pair cost: timed on the first ROWS rows against all 256, scaled by 256 / ROWS
    ROWS = 16
    run = lambda: tutorial_ntk_vp(x[:ROWS], x)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter(); out = run(); warm = time.perf_counter() - t0
times = []
for _ in range(3 if warm < 10 else 1):  # slow methods: one timed call after the warm-up
    t0 = time.perf_counter(); out = run(); times.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
if method == "torch.func_ntk_vp":
    times = [t * 256 / ROWS for t in times]
    out = torch.cat([out.reshape(ROWS, 256), torch.zeros(256 - ROWS, 256)])  # checksum covers the timed rows
val = out.reshape(256, 256).double()
print(json.dumps({"model": model_name, "method": method, "seconds": statistics.median(times), "all": times,
                  "extrapolated": method == "torch.func_ntk_vp",
                  "peak_mib": peak / 1024, "checksum": float(val.sum()), "diag0": float(val[0, 0])}))
'''


def run_worker(model, method):
    out = subprocess.run([sys.executable, "-c", WORKER, model, method], capture_output=True, text=True,
                         cwd=ROOT, timeout=900)
    if out.returncode != 0:
        return {"model": model, "method": method, "error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_nt():
    try:
        py = subprocess.run(["bash", str(NT_DIR / "setup.sh")], capture_output=True, text=True,
                            check=True).stdout.strip().splitlines()[-1]
        out = subprocess.run([py, str(NT_DIR / "bench.py"), "--empirical"], capture_output=True, text=True,
                             check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=900)
        return [json.loads(line) for line in out.stdout.strip().splitlines() if line.startswith("{")]
    except Exception as exc:  # pragma: no cover
        print(f"# neural-tangents unavailable: {exc}", file=sys.stderr)
        return []


def main():
    methods = ["ntkit_structured", "ntkit_auto", "ntkit_jacobian", "ntkit_ntk_vector", "torch.func_jacobian",
               "torch.func_ntk_vp", "handwritten_layerwise"]
    rows = []
    for model in ("mlp", "cnn"):
        for m in methods:
            if m == "handwritten_layerwise" and model != "mlp":
                continue
            r = run_worker(model, m)
            print(json.dumps(r), flush=True)
            rows.append(r)
    nt = run_nt()
    names = {1: "neural-tangents jacobian", 2: "neural-tangents ntk_vp", 3: "neural-tangents structured"}
    for r in nt:
        row = {"model": "mlp", "method": names[r["implementation"]], "seconds": r["seconds"], "all": r["all_seconds"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| model | method | median s | peak MiB | speed-up vs torch.func jacobian |")
    print("| --- | --- | ---: | ---: | ---: |")
    for model in ("mlp", "cnn"):
        base = next((r["seconds"] for r in rows if r["model"] == model and r["method"] == "torch.func_jacobian"
                     and "seconds" in r), float("nan"))
        for r in rows:
            if r["model"] != model:
                continue
            if "error" in r:
                print(f"| {model} | {r['method']} | error: {r['error'][:60]} | | |")
                continue
            peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-"
            note = " (rows 0-15 timed, x16)" if r.get("extrapolated") else ""
            print(f"| {model} | {r['method']}{note} | {r['seconds']:.4f} | {peak} | {base / r['seconds']:.1f}x |")
    # agreement between implementations
    for model in ("mlp", "cnn"):
        sums = [r["checksum"] for r in rows if r["model"] == model and "checksum" in r and not r.get("extrapolated")]
        if sums:
            print(f"# {model}: checksums of all torch methods agree to {max(sums) - min(sums):.3g} "
                  f"(relative {(max(sums) - min(sums)) / abs(sums[0]):.2g})")


if __name__ == "__main__":
    main()
