"""Hanin & Nica (2020), "Finite depth and width corrections to the neural tangent kernel": the NTK of a ReLU
network at initialization fluctuates on the scale set by depth / width.

Paper's setup
-------------
Fully-connected ReLU networks of depth d (hidden layers) and width n, He-initialized Gaussian weights, no
biases. Theorem 1: for the on-diagonal NTK K = Theta(x, x) (gradient with respect to the weights),
E[K^2] / E[K]^2 ~ exp(5 beta), beta = sum_j 1/n_j = d/n -- so the NTK stays random when depth and width
grow together; at fixed depth its fluctuations vanish like n^-1/2 (Jacot et al. 2018; Geiger et al. 2020:
N^-1/4 in the number of parameters). The "5" is 6 - 1: E[relu(z)^4] / E[relu(z)^2]^2 = 6 for Gaussian z,
so each layer of n units multiplies the relative second moment of a forward (or backward) norm by 1 + 5/n.

Ours
----
``ntkit.mlp(d, activation="relu", W_std=sqrt(2), b_std=None)`` (NTK parameterization; the ratio does not
depend on it), Monte Carlo over seeds with :func:`ntkit.empirical.width_scaling` (jackknife standard
errors), on one input of dimension 10, over a grid of depths d in {2, 4, 8} and widths n in {16, ..., 128}
with d/n <= 1/8. The grid stops there because the Monte Carlo estimate of E[K^2] needs E[K^4], whose
relative size grows like (1 + 22/n)^d (E[relu^8] / E[relu^4]^2 = 23.3): beyond d/n ~ 1/8 a few hundred seeds
give a biased, heavy-tailed estimate of the ratio (the paper's statement is about moments, not samples). Two kernels per network: the full weights-only NTK, and the NTK of the readout
weights alone, ``(2/n) |h_d(x)|^2``, a single path term whose ratio is exactly (1 + 5/n)^d -> exp(5 d/n)
(product over layers of the per-layer factor above). The full kernel sums d + 1 such layer terms whose
fluctuations are only partly correlated, and its ratio grows more slowly (fitted exponent below 5 on this
grid). The fluctuation law is measured separately at fixed depth 3 with biases (b_std = 0.1), widths 64 to
1024, four inputs. ``--quick``: depths {2, 4}, widths up to 64, 80 seeds.

Claims (each can fail)
----------------------
* readout-weight kernel: the measured E[K^2]/E[K]^2 agree with (1 + 5/n)^d at every grid point (max |z| below
  the Bonferroni normal quantile at 0.1 %), and its fitted exponent in d/n matches, within 3 standard errors,
  the exponent of the same fit to the exact values (which tends to 5 as n grows);
* full weights-only NTK: log E[K^2]/E[K]^2 is a function of d/n: the depths collapse onto one line
  (chi^2 of the pooled weighted fit below its 99.9 % quantile), with a positive fitted exponent;
* at fixed depth the seed spread of Theta_0 falls like width^-1/2 (fitted exponent within 3 s.e.).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from ..._progress import progress as _progress
from ...empirical.scaling import fit_line, width_scaling
from ...kernels.architecture import mlp
from ...report import Report, claim

NAME = "hanin-nica"
TITLE = "Hanin & Nica 2020: NTK fluctuations at initialization scale with depth / width"


def _config(quick: bool) -> dict:
    if quick:
        return dict(depths=[2, 4], widths=[16, 32, 64], max_beta=0.125, seeds=80, in_dim=10,
                    fluct_widths=[32, 64, 128, 256], fluct_seeds=16)
    return dict(depths=[2, 4, 8], widths=[16, 32, 64, 128], max_beta=0.125, seeds=400, in_dim=10,
                fluct_widths=[64, 128, 256, 512, 1024], fluct_seeds=40)


def run(out: str | os.PathLike | None = None, *, quick: bool = False, seed: int = 0, data=None,
        progress: bool = True) -> Report:
    """Run the reproduction; returns the Report (saved to ``out`` when given). ``data`` is unused."""
    from scipy.stats import chi2, norm

    cfg = _config(quick)
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(1, cfg["in_dim"], generator=gen, dtype=torch.float64)
    seeds = [1000 * int(seed) + s for s in range(cfg["seeds"])]
    rows, full, readout = [], {}, {}
    for d in _progress(cfg["depths"], total=len(cfg["depths"]), desc=NAME, unit="depth", enabled=progress):
        arch = mlp(d, activation="relu", W_std=2**0.5, b_std=None)
        widths = [n for n in cfg["widths"] if d / n <= cfg["max_beta"]]
        full[d] = width_scaling(arch, x, widths, seeds, implementation="jacobian")
        readout[d] = width_scaling(arch, x, widths, seeds, params=[f"body.{2 * d}.weight"],
                                   implementation="jacobian")
        for i, n in enumerate(widths):
            rows.append({"depth": d, "width": n, "d/n": d / n,
                         "ratio (full)": full[d].moment_ratio[i], "s.e. (full)": full[d].moment_ratio_stderr[i],
                         "ratio (readout)": readout[d].moment_ratio[i],
                         "s.e. (readout)": readout[d].moment_ratio_stderr[i],
                         "(1+5/n)^d": (1 + 5 / n) ** d, "exp(5d/n)": math.exp(5 * d / n)})
    beta = np.array([r["d/n"] for r in rows])
    exact_ro = np.array([r["(1+5/n)^d"] for r in rows])

    def pooled(key):
        r = np.array([row[f"ratio ({key})"] for row in rows])
        se = np.array([row[f"s.e. ({key})"] for row in rows])
        return r, se, fit_line(beta, np.log(r), se / r)

    r_full, se_full, fit_full = pooled("full")
    r_ro, se_ro, fit_ro = pooled("readout")
    fit_exact = fit_line(beta, np.log(exact_ro))
    z_ro = np.abs(r_ro - exact_ro) / se_ro
    z_lim = float(norm.ppf(1 - 1e-3 / (2 * len(rows))))
    dof = len(rows) - 2
    chi2_full = fit_full.chi2_per_dof * dof
    chi2_lim = float(chi2.ppf(0.999, dof))

    # fluctuations at fixed depth (with biases, several inputs)
    arch3 = mlp(3, activation="relu", W_std=2**0.5, b_std=0.1)
    xf = torch.randn(4, cfg["in_dim"], generator=gen, dtype=torch.float64)
    fl = width_scaling(arch3, xf, cfg["fluct_widths"], [1000 * int(seed) + s for s in range(cfg["fluct_seeds"])],
                       progress=progress, implementation="jacobian")

    rep = Report(TITLE, intro=(
        f"ReLU networks without biases (He initialization), depths {cfg['depths']} and widths {cfg['widths']}, "
        f"{cfg['seeds']} initializations per (d, n); on-diagonal NTK K = Theta(x, x). Fluctuations at fixed depth "
        f"3: widths {cfg['fluct_widths']}, {cfg['fluct_seeds']} seeds. All through "
        "ntkit.empirical.width_scaling."))
    rep.add_claim(claim("readout-weight kernel: E[K^2]/E[K]^2 = (1 + 5/n)^d at every (d, n) (max |z|, Bonferroni "
                        "normal quantile at 0.1 %)", float(z_ro.max()), [0.0, z_lim], n_points=len(rows)))
    ro_tol = 3 * math.hypot(fit_ro.stderr, 0.0)
    rep.add_claim(claim("readout-weight kernel: fitted exponent of log ratio vs d/n matches the exact law's "
                        f"(+-3 s.e.; exact fit {fit_exact.slope:.3f}, -> 5 as n -> inf)", fit_ro.slope,
                        [fit_exact.slope - ro_tol, fit_exact.slope + ro_tol], stderr=fit_ro.stderr,
                        exact_law_exponent=fit_exact.slope, hanin_nica=5.0))
    rep.add_claim(claim("full weights-only NTK: the depths collapse onto one line in d/n (chi^2 of the pooled "
                        f"fit <= 99.9 % quantile, {dof} dof)", chi2_full, [0.0, chi2_lim], dof=dof))
    rep.add_claim(claim("full weights-only NTK: log E[K^2]/E[K]^2 grows with d/n (fitted exponent - 3 s.e. > 0)",
                        fit_full.slope, [3 * fit_full.stderr, math.inf], stderr=fit_full.stderr, hanin_nica=5.0))
    f = fl.fluctuation_fit
    rep.add_claim(claim("depth 3: seed spread of Theta_0 falls like width^-1/2 (fitted exponent, +-3 s.e.)",
                        f.slope, [-0.5 - 3 * f.stderr, -0.5 + 3 * f.stderr], stderr=f.stderr))

    rep.section("E[K^2] / E[K]^2 vs d/n")
    rep.figure(_figure_moments(rows, fit_full, fit_ro, cfg), "moment_ratio",
               "Relative second moment of the on-diagonal NTK vs d/n (log scale), full weights-only kernel and "
               "readout-weight kernel, with the weighted fits, exp(5 d/n) (Hanin & Nica) and the exact (1+5/n)^d "
               "of the readout term.")
    rep.text(f"Fitted exponents (log ratio = a + b d/n): full NTK b = {fit_full.slope:.3f} +- {fit_full.stderr:.3f} "
             f"(a = {fit_full.intercept:.3f}); readout term b = {fit_ro.slope:.3f} +- {fit_ro.stderr:.3f} (exact law "
             f"on this grid: {fit_exact.slope:.3f}; Hanin & Nica: 5). The full kernel is a sum of d + 1 layer terms, "
             "each with ratio ~ exp(5 d/n), whose fluctuations are only partly correlated: its ratio grows more "
             "slowly than exp(5 d/n) on this grid.")
    rep.table(rows, caption="Per (depth, width): E[K^2]/E[K]^2 with jackknife standard errors.")
    rep.section("Fluctuations at fixed depth")
    rep.figure(_figure_fluct(fl), "fluctuation",
               "Relative seed spread ||sd Theta_0||_F / ||Theta_inf||_F vs width at depth 3 (log-log), fit and "
               "width^-1/2.")
    rep.text(f"Fitted exponent {f.slope:.3f} +- {f.stderr:.3f} (theory -1/2, i.e. N^-1/4 in the number of "
             "parameters).")
    rep.update(config=cfg, grid=rows,
               fit_full={"exponent": fit_full.slope, "stderr": fit_full.stderr, "intercept": fit_full.intercept},
               fit_readout={"exponent": fit_ro.slope, "stderr": fit_ro.stderr, "intercept": fit_ro.intercept},
               exact_readout_exponent=fit_exact.slope,
               fluctuation={"widths": fl.widths, "relative_spread": fl.fluctuation,
                            "stderr": fl.fluctuation_stderr, "exponent": f.slope, "exponent_stderr": f.stderr,
                            "bias": fl.bias})
    if out is not None:
        rep.save(out)
    return rep


def _figure_moments(rows, fit_full, fit_ro, cfg):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = dict(zip(cfg["depths"], "osD^v"))
    for d in cfg["depths"]:
        rr = [r for r in rows if r["depth"] == d]
        b = [r["d/n"] for r in rr]
        ax.errorbar(b, [r["ratio (full)"] for r in rr], yerr=[r["s.e. (full)"] for r in rr], fmt=markers[d],
                    color="tab:blue", label=f"full NTK, d = {d}")
        ax.errorbar(b, [r["ratio (readout)"] for r in rr], yerr=[r["s.e. (readout)"] for r in rr],
                    fmt=markers[d], mfc="none", color="tab:red", label=f"readout weights, d = {d}")
    bb = np.linspace(0, max(r["d/n"] for r in rows) * 1.05, 100)
    ax.plot(bb, np.exp(5 * bb), "k--", lw=1, label="exp(5 d/n) (Hanin & Nica)")
    ax.plot(bb, np.exp(fit_full.predict(bb)), color="tab:blue", lw=1, label=f"fit, b = {fit_full.slope:.2f}")
    ax.plot(bb, np.exp(fit_ro.predict(bb)), color="tab:red", lw=1, label=f"fit, b = {fit_ro.slope:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("d / n  (depth / width)")
    ax.set_ylabel("E[K^2] / E[K]^2")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    return fig


def _figure_fluct(fl):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    w = fl.widths.astype(float)
    ax.errorbar(w, fl.fluctuation, yerr=fl.fluctuation_stderr, fmt="o", label="measured")
    ax.plot(w, np.exp(fl.fluctuation_fit.predict(np.log(w))), lw=1,
            label=f"fit: n^{fl.fluctuation_fit.slope:.2f}+-{fl.fluctuation_fit.stderr:.2f}")
    ax.plot(w, fl.fluctuation[0] * (w / w[0]) ** -0.5, "k--", lw=1, label="theory n^-1/2")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("width n")
    ax.set_ylabel("||sd Theta_0|| / ||Theta_inf||")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return fig
