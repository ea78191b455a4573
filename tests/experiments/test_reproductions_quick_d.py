"""Quick run of the Zandieh et al. / Han et al. reproduction (NTK sketch and random features vs the exact NTK):
every claim holds (Gram error ~ m^-1/2 within 3 fit standard errors, accuracy within 3 binomial standard
errors of the exact NTK at the largest m, features faster than the exact solve), results.json is valid."""

from __future__ import annotations

import json
import math

from ntkit.experiments import reproduce


def test_zandieh_sketch_quick_claims_hold(tmp_path, single_thread):
    mod = reproduce.load("zandieh-sketch")
    assert mod.NAME == "zandieh-sketch" and mod.TITLE and mod.__doc__ and "Paper" in mod.__doc__
    rep = mod.run(tmp_path, quick=True, seed=0, data=None, progress=False)
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "report.html").is_file() and (tmp_path / "report.html").stat().st_size > 1000
    assert (tmp_path / "gram_error.png").is_file() and (tmp_path / "accuracy_time.png").is_file()
    claims = res["claims"]
    assert len(claims) == len(rep.claims) == 8
    for c in claims:
        assert set(c) >= {"claim", "measured", "expected", "holds"}
        assert isinstance(c["holds"], bool) and math.isfinite(c["measured"])
        lo, hi = (-math.inf if e in ("-inf", None) else math.inf if e == "inf" else float(e) for e in c["expected"])
        assert (lo <= c["measured"] <= hi) == c["holds"], c
    failing = [f"{c['claim']} (measured {c['measured']}, expected {c['expected']})" for c in claims if not c["holds"]]
    assert not failing, "claims that do not hold:\n" + "\n".join(failing)
    # the numbers behind the claims are where the report says they are
    for name, g in res["gram_error"].items():
        assert len(g["mean"]) == len(g["m"]) and all(a > b for a, b in zip(g["mean"], g["mean"][2:])), name
    assert 0.9 < res["accuracy"]["exact"] <= 1.0
