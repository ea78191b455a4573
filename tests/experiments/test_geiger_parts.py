"""Pieces of the geiger-scaling reproduction: the batched hinge trainer's stopping rule and independence of
the stacked nets, N* from the satisfied fraction, and the jackknife ensemble statistics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ntkit.experiments.reproductions import geiger_scaling as g


def _data(p, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(p, g.D, generator=gen)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(g.D)
    y = torch.where(torch.randn(p, generator=gen) > 0, 1.0, -1.0)
    return x, y


def _nets(h, seeds):
    return [(w.detach().float(), b.detach().float()) for w, b in g._batched_init(h, seeds)]


def test_stopping_rule_and_independence(single_thread):
    """A 'satisfied' net satisfies every constraint exactly at its returned weights; a wide net fits, a width-1
    net on 48 random labels cannot (N = 12 < 48 constraints); each net of a stack ends exactly where it ends
    when trained alone (stopped nets leave the batch, so the others do not move them)."""
    x, y = _data(48)
    xs = torch.stack([x, x, x])
    ys = torch.stack([y, y, y])
    ms = torch.ones(3, 48)
    ms[2, 24:] = 0  # the third net sees only its first 24 points
    layers = _nets(32, [1, 2, 3])
    with torch.no_grad():
        f0 = g._forward(layers, xs)
    tr = g.train_hinge(layers, xs, ys, f0=f0, mask=ms, max_steps=3000)
    assert tr["status"] == [g.SATISFIED] * 3, tr
    with torch.no_grad():
        margin = ys * (g._forward(layers, xs) - f0)
    assert bool((margin[:2] >= 1).all()) and bool((margin[2, :24] >= 1).all())
    assert tr["steps"][2] < tr["steps"][0]  # fewer constraints, fitted sooner
    # alone: the same net, the same data, the same steps
    for s in range(3):
        alone = _nets(32, [s + 1])
        p = 48 if s < 2 else 24
        with torch.no_grad():
            f0a = g._forward(alone, x[:p])
        tra = g.train_hinge(alone, x[:p], y[:p], f0=f0a, max_steps=3000)
        assert tra["steps"][0] == tr["steps"][s]
        for (wa, ba), (w, b) in zip(alone, layers):
            torch.testing.assert_close(wa[0], w[s], rtol=1e-4, atol=1e-5)
    narrow = _nets(1, [0, 1])
    with torch.no_grad():
        f0n = g._forward(narrow, x)
    trn = g.train_hinge(narrow, x, y, f0=f0n, max_steps=3000)
    assert all(s != g.SATISFIED for s in trn["status"]) and (trn["n_delta"] > 0).all()
    with torch.no_grad():
        assert ((y * (g._forward(narrow, x) - f0n) < 1).sum(1).numpy() == trn["n_delta"]).all()


def test_locate_nstar():
    n = np.array([10.0, 20.0, 40.0, 80.0])
    assert g.locate_nstar(n, np.array([0.0, 0.2, 0.8, 1.0])) == pytest.approx(20 * 2 ** 0.5)
    assert g.locate_nstar(n, np.array([0.0, 0.6, 0.4, 1.0])) == pytest.approx(40 * 2 ** (1 / 6))  # the last crossing
    assert math.isnan(g.locate_nstar(n, np.array([0.6, 0.7, 0.8, 1.0])))  # no jammed width on the grid
    assert math.isnan(g.locate_nstar(n, np.array([0.0, 0.1, 0.2, 0.4])))  # never reaches 1/2


def test_ensemble_statistics_against_brute_force():
    gen = torch.Generator().manual_seed(3)
    s, n = 8, 500
    y = torch.where(torch.randn(n, generator=gen) > 0, 1.0, -1.0)
    f = 0.8 * y + 0.7 * torch.randn(s, n, generator=gen)
    st = g.ensemble_statistics(f, y)
    fb = f.double().mean(0)
    ms = np.mean([float((f[i].double() - fb).pow(2).mean()) for i in range(s)]) * s / (s - 1)
    assert st["fluct"] == pytest.approx(math.sqrt(ms), rel=1e-6)
    assert st["fbar_norm"] == pytest.approx(math.sqrt(float(fb.pow(2).mean()) - ms / s), rel=1e-6)
    assert st["rel_fluct"] == pytest.approx(st["fluct"] / st["fbar_norm"], rel=1e-9)
    # i.i.d. noise of sd 0.7 around 0.8 y: ||f - fbar|| estimates 0.7 (the S / (S - 1) correction), ||E f|| = 0.8
    # (the uncorrected ||fbar|| would be sqrt(0.64 + 0.49 / 8) = 0.837), each within 5 jackknife SE
    assert abs(st["fluct"] - 0.7) < 5 * st["fluct_se"] + 0.005
    assert abs(st["fbar_norm"] - 0.8) < 5 * st["fbar_norm_se"] + 0.005
    assert abs(st["rel_fluct"] - 0.875) < 5 * st["rel_fluct_se"] + 0.005
    err = [float((torch.sign(f[i]) != y).double().mean()) for i in range(s)]
    assert st["err"] == pytest.approx(err)
    ens = float((torch.sign(fb) != y).double().mean())
    assert st["excess"] == pytest.approx(np.mean(err) - ens)
    loo = [float((torch.sign(f[[j for j in range(s) if j != i]].mean(0)) != y).double().mean()) for i in range(s)]
    se = math.sqrt((s - 1) / s * np.sum((np.array(loo) - np.mean(loo)) ** 2))
    assert st["err_ens_se"] == pytest.approx(se)


def test_ensemble_norm_is_debiased():
    """||E f|| from S seeds: the seeds' noise inflates ||fbar||^2 by var / S; the estimate removes it. With
    20 000 points the check separates the debiased 0.8 from the biased sqrt(0.64 + 0.49 / 8) = 0.837."""
    gen = torch.Generator().manual_seed(5)
    s, n = 8, 20000
    y = torch.where(torch.randn(n, generator=gen) > 0, 1.0, -1.0)
    st = g.ensemble_statistics(0.8 * y + 0.7 * torch.randn(s, n, generator=gen), y)
    assert 5 * st["fbar_norm_se"] < 0.837 - 0.8  # the test can tell the two apart
    assert abs(st["fbar_norm"] - 0.8) < 5 * st["fbar_norm_se"]
    assert abs(st["fluct"] - 0.7) < 5 * st["fluct_se"]


def _synthetic_results(cusp: bool = True):
    """A results.json of a full-sized run with known answers: N* between h = 2 and 3, 4 and 5, 5 and 6 at
    P = 64, 128, 256 (a stalled net leaves half its constraints); ||f - fbar|| / ||fbar|| = 2 N^-1/4 and
    eps - epsbar = 0.5 N^-1/2 with 2 % noise; single-net errors 0.22 deep in the jammed phase, a dip to
    0.20 just below N*, a cusp of 0.24 just above it and 0.15 beyond (flat 0.2 with ``cusp=False``), 20
    seeds for h <= 12 and 10 beyond; the widths listed out of order, as a grid extended at one P is."""
    rng = np.random.default_rng(0)
    ps = [64, 128, 256]
    widths = {str(p): [2, 3, 4, 5, 6, 8, 12, 24, 40, 64] + ([16] if p == 128 else []) for p in ps}
    runs = []
    for p in ps:
        t = {64: 3, 128: 5, 256: 6}[p]
        for h in widths[str(p)]:
            n, s = g.n_weights(h), (20 if h <= 12 else 10)
            sat = h >= t
            rel = 2 * n ** -0.25 * (1 + 0.02 * rng.standard_normal())
            exc = 0.5 * n ** -0.5 * (1 + 0.02 * rng.standard_normal())
            e = (0.22 if h < t - 1 else 0.20 if h == t - 1 else 0.24 if h == t else 0.15) if cusp else 0.2
            runs.append({"P": p, "h": h, "N": n, "n_delta": [0 if sat else n // 2] * s,
                         "status": [g.SATISFIED if sat else g.STALLED] * s, "steps": [1000] * s, "loss": [0.0] * s,
                         "err": list(e + 0.005 * rng.standard_normal(s)), "err_ens": 0.14, "err_ens_se": 0.005,
                         "fluct": rel * 1.5, "fluct_se": 0.02 * rel * 1.5, "fbar_norm": 1.5, "fbar_norm_se": 0.01,
                         "rel_fluct": rel, "rel_fluct_se": 0.02 * rel, "excess": exc, "excess_se": 0.02 * exc})
    return {"quick": False, "seed": 0, "data": "synthetic", "n_pool": 1000, "n_test": 744, "P": ps,
            "widths": widths, "P_fit": 128, "max_steps": 4000, "seeds": 10,
            "steps_cap": {str(h): 20000 if h <= 12 else 4000 for h in sorted({h for v in widths.values() for h in v})},
            "wall_time_s": 12.5, "runs": runs}


def test_report_from_results_refits_and_draws_sorted_lines(tmp_path):
    """Re-rendering from results.json finds the planted N*, exponents and cusp (rise from the dip below N*
    to the peak above it, positions picked on the even seeds), keeps the wall time, and orders every per-P
    series by width (an out-of-order width list used to draw zigzag lines); without the planted cusp the
    cusp claim fails."""
    rep = g.report_from_results(_synthetic_results(), out=tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["wall_time_s"] == 12.5
    assert g.n_weights(4) < res["N_star"]["128"] < g.n_weights(5)
    fit = res["exponents"]["rel_fluct"]
    assert abs(fit["exponent"] + 0.25) < 4 * fit["stderr"] and fit["stderr"] < 0.05
    assert all(c["holds"] for c in res["claims"]), [c for c in res["claims"] if not c["holds"]]
    assert len(res["claims"]) == 10
    c = res["cusp"]["128"]
    assert (c["N_left"], c["N_peak"]) == (g.n_weights(4), g.n_weights(5))
    assert c["err_left"] == pytest.approx(0.20, abs=0.01) and c["se_peak"] < 0.003
    # every per-P series (figure lines, tables) follows the grid in increasing N
    assert res["widths"]["128"] == sorted(res["widths"]["128"]) and 16 in res["widths"]["128"]
    assert [r["h"] for r in res["runs"] if r["P"] == 128] == sorted(res["widths"]["128"])
    assert rep.n_figures == 2
    rep2 = g.report_from_results(_synthetic_results(cusp=False))
    failed = [c["claim"] for c in rep2.claims if not c["holds"]]
    assert len(failed) == 1 and "rises from its minimum before the peak" in failed[0], failed
