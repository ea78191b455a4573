"""Jacot, Gabriel & Hongler (2018), Fig. 2: trained wide networks are samples of a Gaussian process.

Paper's setup
-------------
The network of Fig. 1 (depth L = 4, ReLU, NTK parameterization, beta = 0.1, n0 = 2), trained for 1000
gradient-descent steps (learning rate 1.0) on 4 points of the unit circle; the functions of trained
networks of widths n = 50 and n = 1000 on the whole circle, against the 10th, 50th and 90th percentiles of
the limiting Gaussian distribution of f_t (Sec. 5: the infinite-width output at time t is Gaussian, its
mean and covariance given by the NNGP and the NTK).

Ours
----
``ntkit.mlp(3, activation="relu", W_std=1, b_std=0.1)``; training inputs x = (cos g, sin g) at
g = -3pi/4, -pi/4, pi/4, 3pi/4 with the target x1 x2 (= +-1/2; the paper does not list its points),
loss (1/2N) sum (f - y)^2, 1000 steps at learning rate 1.0, all seeds of a width trained together (batched).
The limiting law is :func:`ntkit.dynamics.gradient_descent_mse_ensemble` with the exact NNGP and NTK
(``discrete=True``: gradient descent, not flow), whose mean and covariance at t = 1000 steps give the
quantiles. Widths 50 and 1000, 20 seeds each (the paper plots 10). ``--quick``: widths 50 and 400, 8 seeds, 300 steps
(compared with the GP at t = 300). Networks in float32, the GP in float64.

Claims (each can fail)
----------------------
* at the wide width, the seed mean of the trained functions matches the GP mean on the circle: z = (seed mean -
  GP mean) / (GP sd / sqrt(S)), max |z| below the Bonferroni normal quantile at 0.1 %; points where the GP sd is below 10 % of its maximum, next to the
  training points, are left out);
* at the wide width, the trained functions have the GP's covariance: at 4 test points between the training
  points, sum over seeds of the Mahalanobis distance r^T Sigma^-1 r is chi^2 with 4 S degrees of freedom
  (within its 0.05 % and 99.95 % quantiles);
* at both widths the networks fit the training points as the GP predicts (max training residual below
  0.05, the GP's mean residual being ~1e-3 or less; checked against it in the results).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from ...dynamics import gradient_descent_mse_ensemble
from ...kernels.architecture import mlp
from ...report import Report, claim
from ._common import train_ensemble_full_batch, unit_circle

NAME = "jacot-function"
TITLE = "Jacot et al. 2018, Fig. 2: trained networks against the limiting Gaussian process"

TRAIN_ANGLES = [-3 * math.pi / 4, -math.pi / 4, math.pi / 4, 3 * math.pi / 4]
CHECK_ANGLES = [-math.pi / 2, 0.0, math.pi / 2, math.pi]  # between the training points


def _config(quick: bool) -> dict:
    if quick:
        return dict(widths=[50, 400], seeds=8, steps=300, learning_rate=1.0, n_circle=61)
    return dict(widths=[50, 1000], seeds=20, steps=1000, learning_rate=1.0, n_circle=121)


def run(out: str | os.PathLike | None = None, *, quick: bool = False, seed: int = 0, data=None,
        progress: bool = True) -> Report:
    """Run the reproduction; returns the Report (saved to ``out`` when given). ``data`` is unused."""
    from scipy.stats import chi2, norm

    cfg = _config(quick)
    widths, n_seeds, steps, lr = cfg["widths"], cfg["seeds"], cfg["steps"], cfg["learning_rate"]
    arch = mlp(3, activation="relu", W_std=1.0, b_std=0.1)
    x_tr = unit_circle(TRAIN_ANGLES)
    y_tr = (x_tr[:, 0] * x_tr[:, 1])[:, None]
    angles = np.linspace(-math.pi, math.pi, cfg["n_circle"])
    x_te = torch.cat([unit_circle(angles), unit_circle(CHECK_ANGLES)])
    n_grid = len(angles)

    ktr = arch.kernel(x_tr, get=("nngp", "ntk"))
    kst = arch.kernel(x_te, x_tr, get=("nngp", "ntk"))
    kss = arch.kernel(x_te, get="nngp")
    gp = gradient_descent_mse_ensemble(y_tr, ktr.nngp, kst.nngp, kss, ntk_train_train=ktr.ntk,
                                       ntk_test_train=kst.ntk, learning_rate=lr, discrete=True).predict(steps)
    mu, cov = gp.mean[:, 0], gp.cov
    sd = torch.sqrt(torch.diagonal(cov).clamp_min(0))
    gp_train = gradient_descent_mse_ensemble(y_tr, ktr.nngp, ktr.nngp, ktr.nngp, ntk_train_train=ktr.ntk,
                                             ntk_test_train=ktr.ntk, learning_rate=lr, discrete=True).predict(steps)
    gp_train_resid = float((gp_train.mean - y_tr).abs().max())

    f_te, train_resid = {}, {}
    for w in widths:
        nets = [arch.init(w, seed=1000 * int(seed) + s, in_features=2, dtype=torch.float32)
                for s in range(n_seeds)]
        train_ensemble_full_batch(nets, x_tr.float(), y_tr.float(), learning_rate=lr, steps=steps)
        with torch.no_grad():
            f_te[w] = torch.stack([net(x_te.float())[:, 0] for net in nets]).double()  # (S, P)
            train_resid[w] = float(max((net(x_tr.float()).double() - y_tr).abs().max() for net in nets))

    stats = {}
    ci = slice(n_grid, None)
    cov_c = cov[ci, ci]
    chol = torch.linalg.cholesky(cov_c)
    # the z-test skips the circle points where the GP is nearly deterministic (next to the training points:
    # sd < 10 % of its maximum), where a relative comparison is all rounding and O(1/n) bias
    zmask = sd[:n_grid] >= 0.1 * float(sd[:n_grid].max())
    for w in widths:
        f = f_te[w]
        fz = f[:, :n_grid][:, zmask]
        # under the paper's claim f_t(x) ~ N(mu, sd^2): the seed mean has standard error sd / sqrt(S)
        z = (fz.mean(0) - mu[:n_grid][zmask]) / (sd[:n_grid][zmask] / math.sqrt(n_seeds))
        r = (f[:, ci] - mu[ci]).T  # (4, S)
        m = torch.linalg.solve_triangular(chol, r, upper=False)
        inside = ((f[:, :n_grid] >= mu[:n_grid] - 1.2816 * sd[:n_grid])
                  & (f[:, :n_grid] <= mu[:n_grid] + 1.2816 * sd[:n_grid])).double().mean()
        stats[w] = dict(max_z=float(z.abs().max()), mahalanobis=float((m**2).sum()), dof=int(r.numel()),
                        coverage_10_90=float(inside), train_residual=train_resid[w])
    wide = widths[-1]
    dof = stats[wide]["dof"]
    rep = Report(TITLE, intro=(
        f"Depth-4 ReLU networks (NTK parameterization, beta = 0.1) trained for {steps} GD steps (learning rate "
        f"{lr}) on 4 points of the unit circle, widths {widths}, {n_seeds} seeds each, against the exact "
        "limiting Gaussian process at the same time (ntkit.dynamics.gradient_descent_mse_ensemble)."))
    rep.add_claim(claim(f"width {wide}: seed mean matches the GP mean on the circle (max |z| with the GP's sd / sqrt(S), Bonferroni at 0.1 %)",
                        stats[wide]["max_z"], [0.0, float(norm.ppf(1 - 1e-3 / (2 * int(zmask.sum()))))],
                        points=int(zmask.sum())))
    rep.add_claim(claim(f"width {wide}: covariance of the trained functions is the GP's (sum of Mahalanobis "
                        f"distances ~ chi^2({dof}), 0.05 % / 99.95 % quantiles)", stats[wide]["mahalanobis"],
                        [float(chi2.ppf(5e-4, dof)), float(chi2.ppf(1 - 5e-4, dof))], dof=dof))
    for w in widths:
        rep.add_claim(claim(f"width {w}: networks fit the 4 training points (max |f - y|; GP mean residual "
                            f"{gp_train_resid:.1e})", stats[w]["train_residual"], [0.0, 0.05]))
    rep.section("Trained functions and the GP quantiles (the paper's Fig. 2)")
    rep.figure(_figure(angles, mu[:n_grid], sd[:n_grid], f_te, widths, n_grid), "fig2_functions",
               f"f(x(gamma)) of {n_seeds} networks per width after {steps} steps; black: 10 %, 50 %, 90 % quantiles "
               "of the limiting Gaussian; dots: training points.")
    rep.table([{"width": w, **stats[w]} for w in widths],
              caption="Per width: max |z| of the seed mean vs the GP mean, the Mahalanobis sum at 4 points between "
                      "the training points (chi^2 with dof degrees of freedom), the fraction of function values "
                      "inside the 10-90 % band (0.8 for the GP), and the largest training residual.")
    rep.update(config=cfg, train_angles=TRAIN_ANGLES, check_angles=CHECK_ANGLES, angles=angles,
               gp_mean=mu[:n_grid], gp_sd=sd[:n_grid], gp_train_residual=gp_train_resid,
               stats={str(w): v for w, v in stats.items()},
               functions={str(w): f_te[w][:, :n_grid] for w in widths})
    if out is not None:
        rep.save(out)
    return rep


def _figure(angles, mu, sd, f_te, widths, n_grid):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for w, col in zip(widths, ("tab:green", "tab:red")):
        for s in range(f_te[w].shape[0]):
            ax.plot(angles, f_te[w][s, :n_grid], color=col, lw=0.7, alpha=0.6, label=f"n = {w}" if s == 0 else None)
    for q, ls in ((-1.2816, "--"), (0.0, "-"), (1.2816, "--")):
        ax.plot(angles, mu + q * sd, color="k", lw=1.6, ls=ls,
                label={0.0: "n = inf: 50 %"}.get(q, "n = inf: 10 % / 90 %" if q > 0 else None))
    g = np.asarray(TRAIN_ANGLES)
    ax.plot(g, np.cos(g) * np.sin(g), "o", color="k", ms=6, mfc="white", label="training points")
    ax.set_xlabel("gamma  (x = (cos gamma, sin gamma))")
    ax.set_ylabel("f(x)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig
