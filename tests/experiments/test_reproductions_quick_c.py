"""Quick run of the reproduction of Alemohammad et al. (the recurrent NTK on variable-length sequences): every
claim must hold; results.json, report.html and the figures are written."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from ntkit.experiments import reproduce

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[0] / "data" / "sequences" / "japanese_vowels_small.npz"

_spec = importlib.util.spec_from_file_location("_quick_b", HERE / "test_reproductions_quick_b.py")
_quick_b = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_quick_b)
_check_results = _quick_b._check_results  # the shared checks of results.json / report.html / claims


def test_alemohammad_rntk_quick(tmp_path, single_thread):
    mod = reproduce.load("alemohammad-rntk")
    t0 = time.perf_counter()
    rep = mod.run(tmp_path, quick=True, seed=0, data=str(DATA), progress=False)
    wall = time.perf_counter() - t0
    assert mod.NAME == "alemohammad-rntk" and mod.TITLE and "Paper" in mod.__doc__
    _check_results(tmp_path, rep)
    res = json.loads((tmp_path / "results.json").read_text())
    names = [r["data set"] for r in res["rows"]]
    assert names[0] == "sines" and any("JapaneseVowels" in n for n in names)
    for r in res["rows"]:
        for key in ("RNTK-SVM", "RNTK-SVM last only", "NTK padded", "NTK resampled"):
            assert 0.0 <= r[key] <= 1.0
    # one comparison claim per data set, plus the PSD, symmetry, time-weighting and Monte Carlo claims
    assert len(res["claims"]) == len(names) + 4
    assert {p.name for p in tmp_path.glob("*.png")} >= {"accuracy.png", "kernel_heatmap.png", "time_and_mc.png"}
    assert wall < 120, f"quick run took {wall:.0f} s"
