"""UCI-90 benchmark of Arora et al. (2020): NTK-SVM vs Laplace / gamma-exponential / RBF SVMs,
random forest and a trained finite MLP, all under the same protocol (hyper-parameters chosen on the
train/validation split of conxuntos.dat, then mean 4-fold test accuracy).

Usage (from the repository root; resumable, one JSON per data set in --out)::

    nohup .venv/bin/python benchmarks/bench_uci.py --jobs 2 > benchmarks/out/uci/run.log 2>&1 &

Writes ``--out``/summary.{json,md} and ``--out``/bench.json (wall time, command, paper comparison).
Grids: see :mod:`ntkit.experiments.uci`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ntkit.experiments.uci import PAPER_TABLE1, default_methods, run_uci, summary_markdown  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "uci"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "uci"))
    p.add_argument("--methods", default="ntk,laplace,gamma_exp,rbf,rf,mlp")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    allm = default_methods()
    methods = {k: allm[k] for k in a.methods.split(",")}
    t0 = time.perf_counter()
    summary = run_uci(a.data, a.out, methods=methods, jobs=a.jobs, torch_threads=a.threads)
    wall = time.perf_counter() - t0
    s = summary["methods"]
    checks = {}
    if "ntk" in s:
        checks["ntk_mean"] = s["ntk"]["mean"]
        checks["paper_ntk_mean"] = PAPER_TABLE1["ntk"]
        checks["within_1.5_of_paper"] = abs(s["ntk"]["mean"] - PAPER_TABLE1["ntk"]) <= 1.5
        for other in ("rf", "mlp"):
            if other in s:
                checks[f"ntk_ge_{other}"] = s["ntk"]["mean"] >= s[other]["mean"]
    info = {"wall_s": wall, "command": " ".join(sys.argv), "jobs": a.jobs, "threads": a.threads,
            "machine": platform.platform(), "n_datasets": summary["n_datasets"], "checks": checks}
    Path(a.out, "bench.json").write_text(json.dumps(info, indent=1))
    print(summary_markdown(summary))
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
