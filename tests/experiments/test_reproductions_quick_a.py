"""Quick runs of the Jacot / Lee / Hanin-Nica reproductions: every claim holds, results.json is valid.

Each ``--quick`` run is the reproduction's own code at a smaller size; its claims carry tolerances from the
run's statistics (standard errors over seeds, fit standard errors), so these tests can fail when the
library's kernels, dynamics or empirical NTK are wrong.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ntkit.experiments import reproduce

MNIST_SMALL = Path(__file__).resolve().parents[1] / "data" / "mnist_small" / "mnist_t10k_first256.npz"

# name -> whether the reproduction reads MNIST (the quick run then gets the 256-image test file)
QUICK = {
    "jacot-kernel": False,
    "hanin-nica": False,
    "lee-linearization": False,
    "jacot-function": False,
    "jacot-pca": True,
}


def _check_results(out: Path, rep) -> dict:
    res = json.loads((out / "results.json").read_text())
    assert (out / "report.html").is_file()
    assert list(out.glob("*.png")), "no figure written"
    claims = res["claims"]
    assert claims and len(claims) == len(rep.claims)
    for c in claims:
        assert set(c) >= {"claim", "measured", "expected", "holds"}
        assert isinstance(c["claim"], str) and isinstance(c["holds"], bool)
        assert isinstance(c["measured"], float) and math.isfinite(c["measured"])
        exp = c["expected"]
        assert isinstance(exp, float) or (isinstance(exp, list) and len(exp) == 2), exp
    return res


@pytest.mark.parametrize("name", sorted(QUICK))
def test_quick_run_claims_hold(name, tmp_path, single_thread):
    mod = reproduce.load(name)
    assert mod.NAME == name and mod.TITLE and mod.__doc__ and "Paper" in mod.__doc__
    data = MNIST_SMALL if QUICK[name] else None
    rep = mod.run(tmp_path, quick=True, data=data, progress=False)
    res = _check_results(tmp_path, rep)
    failed = [c for c in res["claims"] if not c["holds"]]
    assert not failed, failed


def test_command_line_list(capsys):
    assert reproduce.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in QUICK:
        assert name in out


def test_command_line_quick_run(tmp_path):
    """``python -m ntkit.experiments.reproduce NAME --quick --out DIR`` writes the report and exits 0."""
    out = tmp_path / "jf"
    # one torch thread, as the in-process tests (several threads on a busy 2-core machine are much slower)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ntkit.experiments.reproduce", "jacot-function", "--quick",
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "claims hold" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["claims"] and all(c["holds"] for c in res["claims"])
    assert (out / "report.html").is_file() and (out / "fig2_functions.png").is_file()
