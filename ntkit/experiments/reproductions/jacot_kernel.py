"""Jacot, Gabriel & Hongler (2018), Fig. 1: the NTK of a wide network is deterministic at initialization and
stays (nearly) constant during training.

Paper's setup
-------------
Fully-connected ReLU network of depth L = 4 (3 hidden layers), NTK parameterization (their Eq. (1):
``alpha^{l+1} = W alpha^l / sqrt(n_l) + beta b``, W, b ~ N(0, 1)), beta = 0.1, input dimension n0 = 2.
Theta(x0, x) with x0 = (1, 0) and x = (cos g, sin g) on the unit circle, for 10 random initializations at
widths n = 500 and n = 10 000, at t = 0 and after 200 steps of gradient descent (learning rate 1.0) on
the regression target f*(x) = x1 x2 with Gaussian inputs. Their observations: the kernels of different
initializations agree better at the larger width, and training moves (and inflates) the kernel less at
the larger width; both converge to the deterministic limit Theta_inf (Theorems 1 and 2).

Ours
----
The same network in ntkit's NTK parameterization, which is theirs (``W_std = 1``, ``b_std = beta``, input
kernel x.x'/n0): ``ntkit.mlp(3, activation="relu", W_std=1, b_std=0.1)``. 10 seeds per width, 200 full-batch
GD steps (all seeds of a width trained at once, batched) with learning rate 1.0 on the loss (1/2N) sum (f - y)^2 (Jacot's cost) with N = 20 standard
Gaussian training inputs (the paper does not give N). Widths 500, 1000, 2000: the paper's 10 000 is
scaled down to 2000 because a width-10 000 step costs ~25x a width-2000 step on a 2-core CPU (10 seeds x
200 steps would take hours); the middle width adds a third point to the fit of the spread's exponent.
``--quick``: widths 64, 128, 256, fewer circle points. Networks run in float32 (their kernels' rounding,
~1e-6, is far below the seed-to-seed spread), the exact kernel in float64.

Claims (each can fail; tolerances from the run's statistics)
-----------------------------------------------------------
* at t = 0 and every width, the mean over seeds matches the exact Theta_inf(x0, x): the largest |z| over
  the circle (z = (mean - exact) / standard error over seeds) is below the Bonferroni-corrected
  Student-t quantile at family-wise level 0.1 %;
* the seed spread of Theta_0 falls like width^-1/2: fitted exponent within 3 standard errors of -1/2
  (errors of the log-sd from the number of seeds);
* training moves the kernel less at the largest width than at the smallest (ratio of mean relative drifts
  + 3 standard errors < 1), and inflates it less (difference of mean relative inflations > 3 standard errors).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from ..._progress import progress as _progress
from ...empirical import empirical_ntk
from ...kernels.architecture import mlp
from ...report import Report, claim
from ._common import (bonferroni_t, fit_power_law, log_sd_stderr, ratio_stderr, train_ensemble_full_batch,
                      unit_circle)

NAME = "jacot-kernel"
TITLE = "Jacot et al. 2018, Fig. 1: convergence of the NTK at initialization and during training"

PAPER = {"widths": [500, 10000], "seeds": 10, "depth_L": 4, "beta": 0.1, "steps": 200, "learning_rate": 1.0}


def _config(quick: bool) -> dict:
    if quick:
        return dict(widths=[64, 128, 256], seeds=10, n_circle=33, n_train=20, steps=200, learning_rate=1.0)
    return dict(widths=[500, 1000, 2000], seeds=10, n_circle=73, n_train=20, steps=200, learning_rate=1.0)


def run(out: str | os.PathLike | None = None, *, quick: bool = False, seed: int = 0, data=None,
        progress: bool = True) -> Report:
    """Run the reproduction; returns the :class:`~ntkit.report.Report` (saved to ``out`` when given).

    ``data`` is unused (the inputs are synthetic, as in the paper).
    """
    cfg = _config(quick)
    widths, n_seeds, steps, lr = cfg["widths"], cfg["seeds"], cfg["steps"], cfg["learning_rate"]
    arch = mlp(3, activation="relu", W_std=1.0, b_std=0.1)
    angles = np.linspace(-math.pi, math.pi, cfg["n_circle"])
    x_circle = unit_circle(angles)
    x0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    exact = arch.kernel(x0, x_circle, get="ntk")[0]  # (P,)
    gen = torch.Generator().manual_seed(int(seed))
    x_train = torch.randn(cfg["n_train"], 2, generator=gen, dtype=torch.float64)
    y_train = (x_train[:, 0] * x_train[:, 1])[:, None]
    f32 = dict(dtype=torch.float32)

    def ntk_rows(nets):
        return torch.stack([empirical_ntk(n, x0.float(), x_circle.float())[0].double() for n in nets])

    theta = {}  # width -> (2, S, P): t = 0 and t = steps
    for w in _progress(widths, total=len(widths), desc=NAME, unit="width", enabled=progress):
        nets = [arch.init(w, seed=1000 * int(seed) + s, in_features=2, **f32) for s in range(n_seeds)]
        t0 = ntk_rows(nets)
        train_ensemble_full_batch(nets, x_train.float(), y_train.float(), learning_rate=lr, steps=steps)
        theta[w] = torch.stack([t0, ntk_rows(nets)])
        del nets

    rows, per_width = [], {}
    for w in widths:
        th0, th1 = theta[w][0], theta[w][1]  # (S, P)
        mean0, se0 = th0.mean(0), th0.std(0) / math.sqrt(n_seeds)
        z = ((mean0 - exact) / se0).abs()
        spread = float(th0.std(0).norm() / exact.norm())
        drift = ((th1 - th0).norm(dim=1) / th0.norm(dim=1)).numpy()
        inflation = ((th1 - th0).mean(1) / th0.mean(1)).numpy()
        per_width[w] = dict(max_z=float(z.max()), spread=spread, drift=float(drift.mean()),
                            drift_se=float(drift.std(ddof=1) / math.sqrt(n_seeds)),
                            inflation=float(inflation.mean()),
                            inflation_se=float(inflation.std(ddof=1) / math.sqrt(n_seeds)),
                            rel_error_of_mean=float((mean0 - exact).norm() / exact.norm()))
        rows.append({"width": w, **per_width[w]})

    z_max = bonferroni_t(len(angles), n_seeds - 1, alpha=1e-3)
    s_log = log_sd_stderr(n_seeds)
    spreads = [per_width[w]["spread"] for w in widths]
    fit_spread = fit_power_law(widths, spreads, [s * s_log for s in spreads])
    drifts = [per_width[w]["drift"] for w in widths]
    fit_drift = fit_power_law(widths, drifts, [per_width[w]["drift_se"] for w in widths])
    lo, hi = per_width[widths[0]], per_width[widths[-1]]
    ratio = hi["drift"] / lo["drift"]
    ratio_se = ratio_stderr(hi["drift"], hi["drift_se"], lo["drift"], lo["drift_se"])
    dinf = lo["inflation"] - hi["inflation"]
    dinf_se = math.hypot(lo["inflation_se"], hi["inflation_se"])

    rep = Report(TITLE, intro=(
        f"Theta(x0, x) for x0 = (1, 0) and x on the unit circle, for a depth-4 ReLU network (3 hidden layers, "
        f"NTK parameterization, beta = 0.1), {n_seeds} initializations per width, at t = 0 and after {steps} "
        f"gradient-descent steps (learning rate {lr}) on f*(x) = x1 x2 ({cfg['n_train']} Gaussian inputs). "
        f"Widths {widths} (paper: {PAPER['widths']}; the largest is scaled down on this CPU, see the module "
        "docstring)."))
    for w in widths:
        rep.add_claim(claim(f"t = 0, width {w}: the seed mean matches the exact NTK (max |z| over "
                            f"{len(angles)} circle points, Bonferroni t-quantile at 0.1 %)",
                            per_width[w]["max_z"], [0.0, z_max], n_seeds=n_seeds))
    rep.add_claim(claim("seed spread of Theta_0 falls like width^-1/2 (fitted exponent, +-3 s.e.)",
                        fit_spread.exponent, list(np.array([-0.5, -0.5]) + 3 * fit_spread.stderr * np.array([-1, 1])),
                        stderr=fit_spread.stderr))
    rep.add_claim(claim(f"training moves the kernel less at width {widths[-1]} than at {widths[0]} "
                        "(ratio of mean relative drifts; holds if ratio + 3 s.e. < 1)",
                        ratio, [0.0, 1.0], holds=ratio + 3 * ratio_se < 1.0, stderr=ratio_se))
    rep.add_claim(claim(f"training inflates the kernel less at width {widths[-1]} than at {widths[0]} "
                        "(difference of mean relative inflations; holds if > 3 s.e.)",
                        dinf, [3 * dinf_se, math.inf], stderr=dinf_se))

    rep.section("Kernels on the circle (the paper's Fig. 1)")
    rep.figure(_figure_kernels(angles, exact, theta, widths, steps), "fig1_kernels",
               f"Theta(x0, x(gamma)) of {n_seeds} networks per width at t = 0 (solid) and t = {steps} (dashed), "
               "and the exact limit Theta_inf (black).")
    rep.section("Spread and drift vs width")
    rep.figure(_figure_scaling(widths, spreads, s_log, fit_spread, drifts, per_width, fit_drift), "scaling",
               "Relative seed spread of Theta_0 and relative drift ||Theta_T - Theta_0|| / ||Theta_0|| vs width "
               "(log-log), with the fitted power laws and the width^-1/2 reference.")
    rep.table(rows, caption="Per width: max |z| of the seed mean vs the exact kernel, relative spread, mean "
                            "relative drift and inflation (with standard errors over seeds).")
    rep.text(f"Fitted exponents: spread {fit_spread.exponent:.3f} +- {fit_spread.stderr:.3f} (theory -1/2); "
             f"drift {fit_drift.exponent:.3f} +- {fit_drift.stderr:.3f}.")
    rep.update(config=cfg, paper=PAPER, angles=angles, exact=exact,
               theta_t0={str(w): theta[w][0] for w in widths}, theta_T={str(w): theta[w][1] for w in widths},
               per_width={str(w): v for w, v in per_width.items()},
               spread_fit={"exponent": fit_spread.exponent, "stderr": fit_spread.stderr},
               drift_fit={"exponent": fit_drift.exponent, "stderr": fit_drift.stderr})
    if out is not None:
        rep.save(out)
    return rep


def _figure_kernels(angles, exact, theta, widths, steps):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = {widths[0]: "tab:green", widths[-1]: "tab:red"}
    for w in (widths[0], widths[-1]):
        for s in range(theta[w].shape[1]):
            kw = dict(color=colors[w], lw=0.8, alpha=0.7)
            ax.plot(angles, theta[w][0, s], ls="-", label=f"n = {w}, t = 0" if s == 0 else None, **kw)
            ax.plot(angles, theta[w][1, s], ls="--", label=f"n = {w}, t = {steps}" if s == 0 else None, **kw)
    ax.plot(angles, exact, color="k", lw=2.0, label="n = inf (exact)")
    ax.set_xlabel("gamma  (x = (cos gamma, sin gamma))")
    ax.set_ylabel("Theta(x0, x)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _figure_scaling(widths, spreads, s_log, fit_spread, drifts, per_width, fit_drift):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    w = np.asarray(widths, float)
    ax.errorbar(w, spreads, yerr=np.asarray(spreads) * s_log, fmt="o", color="tab:blue",
                label="seed spread of Theta_0")
    ax.plot(w, fit_spread.predict(w), color="tab:blue", lw=1,
            label=f"fit: n^{fit_spread.exponent:.2f}+-{fit_spread.stderr:.2f}")
    ax.errorbar(w, drifts, yerr=[per_width[x]["drift_se"] for x in widths], fmt="s", color="tab:orange",
                label="drift ||Theta_T - Theta_0|| / ||Theta_0||")
    ax.plot(w, fit_drift.predict(w), color="tab:orange", lw=1,
            label=f"fit: n^{fit_drift.exponent:.2f}+-{fit_drift.stderr:.2f}")
    ax.plot(w, spreads[0] * (w / w[0]) ** -0.5, "k--", lw=1, label="theory n^-1/2")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("width n")
    ax.set_ylabel("relative size")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return fig
