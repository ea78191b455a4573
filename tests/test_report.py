"""ntkit.report: self-contained pages, JSON-able results, claims, and re-rendering from a folder."""

import base64
import io
import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
import matplotlib.image as mpimg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ntkit.report import Report, ReportError, claim, to_jsonable  # noqa: E402


def _fig(seed=0):
    fig = Figure(figsize=(3, 2))
    ax = fig.subplots()
    ax.plot(np.random.default_rng(seed).standard_normal(10))
    ax.set_xlabel("x (units)")
    return fig


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.h2, self._in_h2 = [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.h2.append(data)
            self._in_h2 = False


def _parse(path):
    p = _Collect()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_to_jsonable_converts_tensors_arrays_and_non_finite():
    out = to_jsonable({"t": torch.tensor([1.0, float("inf")]), "a": np.arange(3), 1: (np.float32(0.5), None),
                       "n": float("nan"), "b": np.bool_(True)})
    assert out == {"t": [1.0, "inf"], "a": [0, 1, 2], "1": [0.5, None], "n": "nan", "b": True}
    json.dumps(out, allow_nan=False)
    with pytest.raises(ReportError, match="cannot store"):
        to_jsonable({"x": object()})


def test_claim_decides_intervals_and_tolerances():
    assert claim("slope", -0.48, [-0.6, -0.4])["holds"]
    assert not claim("slope", -0.3, [-0.6, -0.4])["holds"]
    assert claim("value", 1.04, 1.0, rtol=0.05)["holds"] and not claim("value", 1.06, 1.0, rtol=0.05)["holds"]
    assert not claim("nan never holds", math.nan, [-1, 1])["holds"]
    with pytest.raises(ReportError):
        claim("needs rtol", 1.0, 1.0)
    with pytest.raises(ReportError):
        claim("bad interval", 0.0, [1.0, -1.0])


def test_save_writes_page_json_and_pngs(tmp_path):
    rep = Report("T <&>", intro="intro text")
    rep.section("One", "first paragraph\n\nsecond paragraph").figure(_fig(), "f1", "caption 1")
    rep.table([{"method": "a", "acc": 0.91234}], caption="tab")
    rep.add_claim(claim("c", 0.5, [0, 1], stderr=0.1)).update({"x": torch.tensor(2.0)})
    path = rep.save(tmp_path / "out")
    page = path.read_text()
    assert "T &lt;&amp;&gt;" in page and "<p>second paragraph</p>" in page and "0.9123" in page
    parsed = _parse(path)
    assert len(parsed.imgs) == 1
    img = mpimg.imread(io.BytesIO(base64.b64decode(parsed.imgs[0].split(",", 1)[1])), format="png")
    assert img.shape[0] > 50
    res = json.loads((tmp_path / "out/results.json").read_text())
    assert res["x"] == 2.0 and res["claims"][0]["stderr"] == 0.1 and res["report"]["title"] == "T <&>"
    assert (tmp_path / "out/f1.png").read_bytes()[:4] == b"\x89PNG"
    assert "Claims" in page  # claims table appended when not placed


def test_figure_errors_are_clear(tmp_path):
    rep = Report("t")
    with pytest.raises(ReportError, match="matplotlib Figure"):
        rep.figure("not a figure", "x")
    with pytest.raises(ReportError, match="plain file stem"):
        rep.figure(_fig(), "../x")
    rep.figure(_fig(), "x")
    with pytest.raises(ReportError, match="already"):
        rep.figure(_fig(), "x")
    with pytest.raises(ReportError, match="not a PNG"):
        rep.image(b"GIF89a...", "y")
    (tmp_path / "file").write_text("")
    with pytest.raises(ReportError, match="not a folder"):
        rep.save(tmp_path / "file")


def test_pyplot_figures_are_closed_and_plain_figures_work():
    import matplotlib.pyplot as plt

    fig = plt.figure()
    fig.gca().plot([0, 1])
    n = len(plt.get_fignums())
    Report("t").figure(fig, "p")
    assert len(plt.get_fignums()) == n - 1


def test_from_folder_rerenders_the_same_page(tmp_path):
    rep = Report("Title", intro="Intro.")
    rep.section("S1", "text one").figure(_fig(1), "a", "cap a").table([[1, 2.5]], columns=["i", "v"])
    rep.add_claim(claim("c1", 1.0, [0, 2])).claims_table().section("S2", "text two").figure(_fig(2), "b", "cap b")
    rep.update(value=3)
    rep.save(tmp_path)
    again = Report.from_folder(tmp_path)
    assert again.title == "Title" and again.n_figures == 2 and len(again.claims) == 1
    p1, p2 = _parse(tmp_path / "report.html"), None
    (tmp_path / "copy").mkdir()
    again.save(tmp_path / "copy")
    p2 = _parse(tmp_path / "copy/report.html")
    assert p1.h2 == p2.h2 == ["S1", "S2"]
    assert p1.imgs == p2.imgs  # byte-identical figures
    assert json.loads((tmp_path / "copy/results.json").read_text())["value"] == 3


def test_from_folder_builds_a_generic_page_for_foreign_results(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"accuracy": 0.9, "nested": {"k": [1, 2]}, "claims": [
        {"claim": "x", "measured": 1, "expected": [0, 2], "holds": True}]}))
    _fig().savefig(tmp_path / "loss_curve.png")
    rep = Report.from_folder(tmp_path / "results.json", title="Foreign")
    page = rep.to_html()
    assert rep.n_figures == 1 and "nested.k" in page and "loss curve" in page and len(rep.claims) == 1
    with pytest.raises(ReportError, match="no results.json"):
        Report.from_folder(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/results.json").write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        Report.from_folder(tmp_path / "bad")
