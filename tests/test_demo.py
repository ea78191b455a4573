"""The demo end to end at reduced size: one self-contained HTML report with five decodable figures."""

import base64
import io
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

matplotlib = pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
import matplotlib.image as mpimg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))


def embedded_images(html_text: str) -> list:
    """Decode every <img> of the page; each must be an inline PNG (no network, no side files)."""
    parser = _Images()
    parser.feed(html_text)
    parser.close()
    images = []
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,"), src[:60]
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        images.append(mpimg.imread(io.BytesIO(png), format="png"))
    return images


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "ntkit", "demo", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    return out, proc


def test_demo_quick_writes_one_self_contained_report(quick_demo):
    out, proc = quick_demo
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "%|" not in proc.stderr  # no progress bar in a pipe
    last = proc.stdout.strip().splitlines()[-1]
    assert Path(last) == (out / "report.html").resolve()  # the report's path is the last line
    page = Path(last).read_text(encoding="utf-8")
    images = embedded_images(page)
    assert len(images) >= 5
    for img in images:
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert float(img[..., :3].std()) > 0.01  # not a blank canvas
    assert "http://" not in page and "https://" not in page  # nothing to fetch when viewing it
    for title in ("Finite networks converge", "Wide networks train", "spectrum", "Real digits", "Ensembles"):
        assert title in page


def test_demo_results_hold_the_measured_numbers(quick_demo):
    out, proc = quick_demo
    res = json.loads((out / "results.json").read_text())
    assert {"kernel_convergence", "dynamics", "spectrum", "accuracy", "ensemble", "timings_s"} <= set(res)
    kc = res["kernel_convergence"]
    # the error of a finite network's NTK shrinks with width (Jacot et al. Thm. 1), even at quick size
    assert kc["rel_error_mean"][-1] < kc["rel_error_mean"][0]
    assert -1.0 < kc["slope"] < -0.2
    # a wider network stays closer to the NTK prediction
    dev = res["dynamics"]["output_deviation"]
    assert dev[-1] < dev[0]
    accs = {r["method"]: r["test accuracy (%)"] for r in res["accuracy"]}
    assert accs["NTK, t = ∞"] > 60.0  # ten classes: chance is 10%
    assert len(res["claims"]) >= 5 and all({"claim", "measured", "expected", "holds"} <= set(c)
                                           for c in res["claims"])
    for name in ("kernel_vs_width", "training_dynamics", "spectrum", "accuracy", "ensembles"):
        assert (out / f"{name}.png").stat().st_size > 1000


def test_demo_reads_mnist_npz(tmp_path):
    """--mnist takes the MNIST slice shipped in tests/data (28x28 images) through the same code."""
    from ntkit.experiments.demo import DemoConfig, build_demo_report

    cfg = DemoConfig(n_train=40, n_test=40, n_probe=12, kernel_widths=(32, 128), kernel_seeds=2,
                     train_widths=(64,), steps=5, ensemble_width=32, ensemble_size=2, quick=True)
    res, rep = build_demo_report(cfg, mnist=ROOT / "tests/data/mnist_small/mnist_t10k_first256.npz", log=None)
    assert res["data"]["name"] == "MNIST" and res["data"]["d"] == 784
    assert rep.n_figures == 5


def test_demo_bad_mnist_path_is_one_line(tmp_path, capsys):
    from ntkit.cli import main

    assert main(["demo", "--quick", "--mnist", str(tmp_path / "no.npz"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0] and "--mnist" in err[0]
