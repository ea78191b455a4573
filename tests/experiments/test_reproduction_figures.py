"""Figures of the reproductions that are drawn from results.json alone (re-rendering without a rerun)."""

from __future__ import annotations

import math

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from ntkit.experiments.reproductions import huang_orthogonal, malach_tangent  # noqa: E402


def test_huang_drift_figure_fits_the_power_law_it_draws():
    widths = [32, 64, 128, 256, 512]
    rng = np.random.default_rng(0)
    # drift = 3 n^-1 with 2 % multiplicative noise over 5 seeds: the fit must find -1 within its error bar
    drift = {init: [[3.0 / w * (1 + 0.02 * rng.standard_normal()) for _ in range(5)] for w in widths]
             for init in ("gaussian", "orthogonal")}
    fig, fits = huang_orthogonal._drift_figure(widths, drift, 100, {"gaussian": "C0", "orthogonal": "C3"})
    for f in fits.values():
        assert abs(f.exponent + 1.0) < 5 * f.stderr + 1e-3, (f.exponent, f.stderr)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("n^{-1/2}" in t for t in labels) and any("n^{-1}" in t for t in labels)
    assert sum("fit exponent" in t for t in labels) == 2
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(w) for w in widths]


def test_malach_figure_labels_every_size_inside_the_axes():
    rows = [{"m": m, "network": net, "exact NTK": 0.5 + e, "empirical NTK at init": 0.5 - e}
            for m, net, e in ((125, 0.49, 0.01), (250, 0.50, -0.02), (500, 0.52, 0.008), (1000, 0.98, -0.007),
                              (2000, 1.0, 0.003), (3000, 1.0, 0.02))]
    se = 0.5 / math.sqrt(1529)
    fig = malach_tangent._figure(rows, se, 30, 4)
    left, right = fig.axes[:2]
    for ax in (left, right):
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() is not None
    notes = [t for t in right.texts if t.get_text().startswith("m = ")]
    assert sorted(int(t.get_text()[4:]) for t in notes) == [r["m"] for r in rows]  # one label per size
    x0, x1 = right.get_xlim()
    y0, y1 = right.get_ylim()
    for t in notes:  # label positions (data coordinates) inside the panel: nothing clipped
        x, y = t.xyann
        assert x0 < x < x1 and y0 < y < y1, (t.get_text(), x, y)
    positions = {(round(t.xyann[0], 3), round(t.xyann[1], 5)) for t in notes}
    assert len(positions) == len(notes)  # no two labels on top of each other
