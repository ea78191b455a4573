"""Quick runs of the reproductions of Xiao et al., Huang et al., Malach et al., Geifman et al., Arora et al.
and Geiger et al.: every claim of each run must hold; results.json and report.html are written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ntkit.experiments import reproduce

DATA = Path(__file__).resolve().parents[1] / "data"
#: reproduction -> data argument of its quick run (small files shipped in tests/data)
QUICK = {
    "xiao-phase": None,
    "huang-orthogonal": None,
    "malach-tangent": None,
    "geifman-laplace": DATA / "uci",
    "arora-uci": DATA / "uci",
    "geiger-scaling": DATA / "mnist_small" / "mnist_t10k_first256.npz",
}


def _check_results(out: Path, rep) -> None:
    res = json.loads((out / "results.json").read_text())
    assert (out / "report.html").is_file() and (out / "report.html").stat().st_size > 1000
    claims = res["claims"]
    assert claims, "a reproduction must check at least one claim"
    for c in claims:
        assert set(c) >= {"claim", "measured", "expected", "holds"}
        assert isinstance(c["holds"], bool)
        exp = c["expected"]
        assert isinstance(exp, (int, float)) or (isinstance(exp, list) and len(exp) == 2)
        if isinstance(exp, list):
            lo = -math.inf if exp[0] == "-inf" else exp[0]
            hi = math.inf if exp[1] == "inf" else exp[1]
            m = c["measured"]
            if isinstance(m, (int, float)) and not c.get("decided_by"):
                assert (lo <= m <= hi) == c["holds"], c
    failing = [c["claim"] + f" (measured {c['measured']}, expected {c['expected']})" for c in claims if not c["holds"]]
    assert not failing, "claims that do not hold:\n" + "\n".join(failing)
    assert rep.all_claims_hold
    assert list(out.glob("*.png")), "a reproduction draws at least one figure"


@pytest.mark.parametrize("name", list(QUICK))
def test_quick_run_claims_hold(name, tmp_path, single_thread):
    try:
        mod = reproduce.load(name)
    except ValueError as exc:  # not written yet in this version
        pytest.skip(str(exc))
    data = QUICK[name]
    rep = mod.run(tmp_path, quick=True, seed=0, data=None if data is None else str(data), progress=False)
    assert mod.NAME == name and mod.TITLE and mod.__doc__ and "Paper" in mod.__doc__
    _check_results(tmp_path, rep)
