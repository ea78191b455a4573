#!/usr/bin/env python3
"""Empirical NTK of real models: ntkit ``auto`` vs torch.func's Jacobian contraction (time, peak memory).

Models (float32, random init, eval mode, k = 10 outputs, n = 64 inputs, torch.manual_seed(0)):

* ResNet-18, CIFAR-style (3x3 stride-1 stem without max-pooling, BasicBlocks [2, 2, 2, 2] with 64-512 channels,
  1x1 projection shortcuts with BatchNorm, global average pooling, Linear(512, 10); 11.2 M parameters; the
  standard network, written out here because torchvision does not install beside this torch), inputs
  N(0, 1) of 3 x 32 x 32.
* Transformer encoder on token ids: Embedding(10 000, 256), 4 nn.TransformerEncoderLayer(256, 4 heads,
  feed-forward 1024, dropout 0, batch_first, GELU), mean over the 64 tokens, Linear(256, 10); 5.7 M parameters;
  ids uniform in [0, 10 000).

Both kernels: output="trace" (n x n) and output="full" (n x n x 10 x 10), x2 = None.

Each measurement runs in a fresh subprocess (clean peak RSS): peak memory = the process's peak resident set
size minus its size after building model and inputs (ru_maxrss). The torch.func baseline is the tutorial's
Jacobian contraction, vmap(jacrev) per sample, einsum of the flattened Jacobians; its Jacobians
(2 n k P numbers, ~57 GB for ResNet-18) do not fit, so it is timed on n_s = 4 and 8 inputs and extrapolated:
time a n + b n^2 (Jacobians linear in n, contraction quadratic) fitted through the two points, memory
linear in n through the two points. ntkit runs on all 64 inputs under memory_budget (default 4 GB).

    .venv/bin/python benchmarks/bench_empirical_models.py [--budget-gb 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r'''
import json, resource, sys, time
import torch
from torch import nn
sys.path.insert(0, sys.argv[5])
model_name, method, n, output, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[6])
torch.manual_seed(0)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet18(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        h = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(h.mean((2, 3)))


class Encoder(nn.Module):
    def __init__(self, vocab=10000, d=256, heads=4, layers=4, classes=10):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids)).mean(1))


if model_name == "resnet18":
    model = ResNet18().eval()
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
else:
    model = Encoder().eval()
    x = torch.randint(0, 10000, (n, 64), generator=torch.Generator().manual_seed(0))
params = {k: v.detach() for k, v in model.named_parameters()}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
est = None

if method == "torchfunc":
    from torch.func import functional_call, jacrev, vmap

    def f_single(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    def run():
        j1 = vmap(jacrev(f_single), (None, 0))(params, x)
        j1 = [j.flatten(2) for j in j1.values()]
        j2 = vmap(jacrev(f_single), (None, 0))(params, x)
        j2 = [j.flatten(2) for j in j2.values()]
        if output == "trace":
            return torch.stack([torch.einsum("Naf,Maf->NM", a, b) for a, b in zip(j1, j2)]).sum(0) / 10
        return torch.stack([torch.einsum("Naf,Mbf->NMab", a, b) for a, b in zip(j1, j2)]).sum(0)
else:
    import ntkit.empirical._ntk as E
    from ntkit.empirical import empirical_ntk

    def run():
        return empirical_ntk(model, x, output=output, memory_budget=budget, progress=False)
    # the estimate ntkit budgeted with: log the block sizes it chose
    orig = E.peak_memory_estimate
    seen = []

    def spy(*a, **kw):
        r = orig(*a, **kw)
        seen.append((a[0], r))
        return r
    E.peak_memory_estimate = spy

t0 = time.perf_counter()
with torch.no_grad() if False else torch.enable_grad():
    out = run()
dt = time.perf_counter() - t0
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
res = {"model": model_name, "method": method, "n": n, "output": output, "seconds": dt, "peak_bytes": peak,
       "n_params": sum(p.numel() for p in params.values()), "shape": list(out.shape),
       "checksum": float(out.double().abs().sum())}
if method == "ntkit":
    res["estimate_bytes"] = seen[-1][1] + out.numel() * out.element_size()  # last check: the chosen block
print(json.dumps(res))
'''


def run(model, method, n, output, budget):
    proc = subprocess.run([sys.executable, "-c", WORKER, model, method, str(n), output, str(ROOT), str(budget)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"model": model, "method": method, "n": n, "output": output, "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-gb", type=float, default=4.0, help="ntkit's memory_budget in GB")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--subset", type=int, nargs=2, default=(4, 8), help="baseline sizes to extrapolate from")
    ap.add_argument("--models", nargs="+", default=["resnet18", "transformer"])
    ap.add_argument("--outputs", nargs="+", default=["trace", "full"])
    ap.add_argument("--json", type=Path, default=None, help="write all measurements here")
    args = ap.parse_args()
    budget = args.budget_gb * 1e9
    rows, table = [], []
    for model in args.models:
        for output in args.outputs:
            ours = run(model, "ntkit", args.n, output, budget)
            print(json.dumps(ours), flush=True)
            pts = [run(model, "torchfunc", s, output, budget) for s in args.subset]
            for p in pts:
                print(json.dumps(p), flush=True)
            rows += [ours] + pts
            if any("error" in p for p in pts + [ours]):
                continue
            (n1, t1, m1), (n2, t2, m2) = [(p["n"], p["seconds"], p["peak_bytes"]) for p in pts]
            # t = a n + b n^2 through both points; memory linear in n
            b = (t2 / n2 - t1 / n1) / (n2 - n1)
            a = t1 / n1 - b * n1
            n = args.n
            t_ext = max(a * n + b * n * n, t2 * n / n2)
            m_ext = m1 + (m2 - m1) * (n - n1) / (n2 - n1)
            table.append({"model": model, "output": output, "ntkit_s": ours["seconds"],
                          "ntkit_peak_GB": ours["peak_bytes"] / 1e9,
                          "ntkit_estimate_GB": (ours.get("estimate_bytes") or 0) / 1e9,
                          "torchfunc_s_extrapolated": t_ext, "torchfunc_peak_GB_extrapolated": m_ext / 1e9,
                          "speedup": t_ext / ours["seconds"], "memory_ratio": m_ext / max(ours["peak_bytes"], 1)})
    print()
    print("| model | output | ntkit s | ntkit peak GB (estimate) | torch.func s (extrap.) | torch.func peak GB "
          "(extrap.) | speed-up | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['model']} | {r['output']} | {r['ntkit_s']:.1f} | {r['ntkit_peak_GB']:.2f} "
              f"({r['ntkit_estimate_GB']:.2f}) | {r['torchfunc_s_extrapolated']:.0f} | "
              f"{r['torchfunc_peak_GB_extrapolated']:.1f} | {r['speedup']:.1f}x | {r['memory_ratio']:.1f}x |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "table": table}, indent=1))


if __name__ == "__main__":
    main()
