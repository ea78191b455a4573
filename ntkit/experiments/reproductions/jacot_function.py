"""Jacot, Gabriel & Hongler (2018), Fig. 2: trained wide networks are samples of a Gaussian process.

Paper's setup
-------------
The network of Fig. 1 (depth L = 4, ReLU, NTK parameterization, beta = 0.1, n0 = 2), trained for 1000
gradient-descent steps (learning rate 1.0) on 4 points of the unit circle; the functions of 10 trained
networks of widths n = 50 and n = 1000 on the whole circle, against the 10th, 50th and 90th percentiles of
the t = infinity limiting Gaussian distribution of f_t (Sec. 5: the infinite-width output at time t is
Gaussian, its mean and covariance given by the NNGP and the NTK; the paper approximates both kernels with a
width-10 000 network). Its claim: the networks' "mean and variance appear to be close to those of the
limiting distribution", already at n = 50.

Ours
----
``ntkit.mlp(3, activation="relu", W_std=1, b_std=0.1)``; training inputs x = (cos g, sin g) at
g = -3pi/4, -pi/4, pi/4, 3pi/4 with the target x1 x2 (= +-1/2; the paper does not list its points),
loss (1/2N) sum (f - y)^2, 300 steps at learning rate 1.0 (the paper: 1000; training has converged by 300 and
1000 steps of the width-1000 networks take over an hour on this shared 2-core CPU), all seeds of a width trained
together (batched). The limiting law is :func:`ntkit.dynamics.gradient_descent_mse_ensemble` with the exact NNGP
and NTK (``discrete=True``: gradient descent, not flow) at the same t; the slowest mode has decayed by
(1 - 0.040)^300 = 4e-6 there, so this is the paper's t = infinity. Every network is also compared with its
own linearization f_lin,t = f_0 + Theta_0(x, X) Theta_0^-1 (I - (I - eta Theta_0 / N)^t) (y - f_0(X))
(Theta_0 its empirical NTK at initialization, :func:`ntkit.dynamics.gradient_descent_mse`), which splits the
difference between the networks' mean and the GP mean into a kernel part (f_lin - GP: the fluctuation of
Theta_0, O(1/n) in the mean) and a training part (f - f_lin: the kernel moving during training).
Widths 50, 250 and 1000 with 100, 40 and 20 seeds (the figure shows 10 per width, as the paper). ``--quick``:
widths 50 and 400, 100 and 8 seeds. Networks in float32, the
GP and the linearizations in float64.

What we find
------------
The networks' covariance is the GP's, and their linearizations' mean is the GP mean; but the trained networks'
mean is pulled towards the targets next to the training points, by B = 0.016, 0.013, 0.007 (widths 50, 250,
1000; B is the signed deviation of f - f_lin towards the nearest target, averaged over the circle), 0.6-0.7
GP standard deviations at 0.05 rad from a training point. With 20 seeds this finite-width effect is resolved
(max |z| ~ 5 at width 1000), which the paper's 10 curves per width could not show. It falls slowly with width
(~ n^-0.3 between 50 and 1000; the ReLU network-vs-linearization gap of lee-linearization falls like n^-0.67),
so the claim is made about it rather than about a zero difference.

Claims (each can fail)
----------------------
* at the widest width, the seed mean of the linearized networks is the GP mean on the circle: max |t| (t = seed
  mean difference / its standard error from the seeds) below the Bonferroni Student-t quantile at 0.1 %
  (points where the GP sd is below 10 % of its maximum, next to the training points, are left out);
* at the widest width, the trained functions have the GP's covariance: at 4 test points between the training
  points, sum over seeds of the Mahalanobis distance r^T Sigma^-1 r is chi^2 with 4 S degrees of freedom
  (within its 0.05 % and 99.95 % quantiles);
* the training part of the bias shrinks with width: B(narrowest) - B(widest) > 3 standard errors (from the
  seeds);
* at every width the networks fit the training points as the GP predicts (max training residual below
  0.05, the GP's mean residual being ~1e-3 or less; checked against it in the results).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from ..._progress import progress as _progress
from ...dynamics import gradient_descent_mse, gradient_descent_mse_ensemble
from ...empirical import empirical_ntk
from ...kernels.architecture import mlp
from ...report import Report, claim
from ._common import bonferroni_t, fit_power_law, pyplot, train_ensemble_full_batch, unit_circle

NAME = "jacot-function"
TITLE = "Jacot et al. 2018, Fig. 2: trained networks against the limiting Gaussian process"

TRAIN_ANGLES = [-3 * math.pi / 4, -math.pi / 4, math.pi / 4, 3 * math.pi / 4]
CHECK_ANGLES = [-math.pi / 2, 0.0, math.pi / 2, math.pi]  # between the training points


def _config(quick: bool) -> dict:
    # n_circle - 1 divisible by 8: the training points and the midpoints between them lie on the grid
    if quick:
        return dict(widths=[50, 400], seeds=[100, 8], steps=300, learning_rate=1.0, n_circle=65, n_plot=10)
    # 300 steps, not the paper's 1000: training has converged by then (the slowest mode has decayed by
    # (1 - 0.040)^300 = 4e-6; the GP means at t = 300 and t = 1000 differ by 2e-6), and 1000 steps of the
    # 20 width-1000 networks take over an hour on a shared 2-core CPU
    return dict(widths=[50, 250, 1000], seeds=[100, 40, 20], steps=300, learning_rate=1.0, n_circle=121,
                n_plot=10)


def _side(angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each angle to the nearest training point, and the sign of that point's target (0 at the
    training points and at the midpoints between them, where the sign is undefined)."""
    g = np.asarray(TRAIN_ANGLES)
    d = np.abs((angles[:, None] - g[None, :] + math.pi) % (2 * math.pi) - math.pi)
    dist = d.min(1)
    sign = np.sign(np.cos(g) * np.sin(g))[d.argmin(1)]
    sign = np.where((dist > 1e-9) & (dist < math.pi / 4 - 1e-9), sign, 0.0)
    return dist, sign


def run(out: str | os.PathLike | None = None, *, quick: bool = False, seed: int = 0, data=None,
        progress: bool = True) -> Report:
    """Run the reproduction; returns the Report (saved to ``out`` when given). ``data`` is unused."""
    from scipy.stats import chi2, norm

    cfg = _config(quick)
    widths, seeds, steps, lr = cfg["widths"], cfg["seeds"], cfg["steps"], cfg["learning_rate"]
    arch = mlp(3, activation="relu", W_std=1.0, b_std=0.1)
    x_tr = unit_circle(TRAIN_ANGLES)
    y_tr = (x_tr[:, 0] * x_tr[:, 1])[:, None]
    angles = np.linspace(-math.pi, math.pi, cfg["n_circle"])
    x_te = torch.cat([unit_circle(angles), unit_circle(CHECK_ANGLES)])
    n_grid = len(angles)
    dist, sign = _side(angles)

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
    slowest = float(torch.linalg.eigvalsh(ktr.ntk)[0]) * lr / len(TRAIN_ANGLES)

    f_te, f_lin, train_resid = {}, {}, {}
    for w, n_seeds in _progress(list(zip(widths, seeds)), total=len(widths), desc=NAME, unit="width",
                                enabled=progress):
        nets = [arch.init(w, seed=1000 * int(seed) + s, in_features=2, dtype=torch.float32)
                for s in range(n_seeds)]
        lins = []
        for net in nets:  # each network's own linearization at time t, in float64, before training
            n64 = arch.init(w, seed=0, in_features=2, dtype=torch.float64)
            n64.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
            with torch.no_grad():
                f0_tr, f0_te = n64(x_tr), n64(x_te)
            pred = gradient_descent_mse(empirical_ntk(n64, x_tr), y_tr, learning_rate=lr, discrete=True).predict(
                steps, k_test_train=empirical_ntk(n64, x_te, x_tr), f0_train=f0_tr, f0_test=f0_te)
            lins.append(pred.test[:, 0])
        f_lin[w] = torch.stack(lins)
        train_ensemble_full_batch(nets, x_tr.float(), y_tr.float(), learning_rate=lr, steps=steps)
        with torch.no_grad():
            f_te[w] = torch.stack([net(x_te.float())[:, 0] for net in nets]).double()  # (S, P)
            train_resid[w] = float(max((net(x_tr.float()).double() - y_tr).abs().max() for net in nets))
        del nets

    stats = {}
    ci = slice(n_grid, None)
    cov_c = cov[ci, ci]
    chol = torch.linalg.cholesky(cov_c)
    # the z/t-tests skip the circle points where the GP is nearly deterministic (next to the training points:
    # sd < 10 % of its maximum), where a relative comparison is all rounding
    zmask = (sd[:n_grid] >= 0.1 * float(sd[:n_grid].max())).numpy()
    mu_g, sd_g = mu[:n_grid].numpy(), sd[:n_grid].numpy()
    sgn_w = sign / np.abs(sign).sum()
    near = (dist > 1e-9) & (dist <= dist[dist > 1e-9].min() + 1e-9)  # the grid points next to the training points
    for w, n_seeds in zip(widths, seeds):
        f, fl = f_te[w][:, :n_grid].numpy(), f_lin[w][:, :n_grid].numpy()
        sq = math.sqrt(n_seeds)
        # the paper's comparison: seed mean of the trained networks vs the GP mean, z with the GP's sd / sqrt(S)
        z_gp = (f.mean(0) - mu_g)[zmask] / (sd_g[zmask] / sq)
        # the kernel part: linearized networks vs the GP, t with the seeds' own standard error
        t_lin = (fl.mean(0) - mu_g)[zmask] / (fl.std(0, ddof=1)[zmask] / sq)
        # the training part: B_s = signed deviation of f - f_lin towards the nearest target, averaged
        b = (f - fl) @ sgn_w
        r = (f_te[w][:, ci] - mu[ci]).T  # (4, S)
        m = torch.linalg.solve_triangular(chol, r, upper=False)
        inside = ((f >= mu_g - 1.2816 * sd_g) & (f <= mu_g + 1.2816 * sd_g)).mean()
        stats[w] = dict(seeds=n_seeds, max_z_trained_vs_gp=float(np.abs(z_gp).max()),
                        max_t_linearized_vs_gp=float(np.abs(t_lin).max()),
                        bias_B=float(b.mean()), bias_B_stderr=float(b.std(ddof=1) / sq),
                        bias_next_to_training_points_in_gp_sd=float(((f.mean(0) - mu_g) * sign)[near].mean()
                                                                   / sd_g[near].mean()),
                        rms_f_minus_flin=float(np.sqrt(((f - fl) ** 2).mean())),
                        mahalanobis=float((m**2).sum()), dof=int(r.numel()), coverage_10_90=float(inside),
                        train_residual=train_resid[w])
    wide, narrow = widths[-1], widths[0]
    dof = stats[wide]["dof"]
    n_z = int(zmask.sum())
    rep = Report(TITLE, intro=(
        f"Depth-4 ReLU networks (NTK parameterization, beta = 0.1) trained for {steps} GD steps (learning rate "
        f"{lr}) on 4 points of the unit circle, widths {widths} with {seeds} seeds, against the exact "
        f"limiting Gaussian process at the same time (ntkit.dynamics.gradient_descent_mse_ensemble; the slowest "
        f"mode has decayed by (1 - {slowest:.3f})^{steps} = {(1 - slowest) ** steps:.1e}, so this is the paper's "
        "t = infinity), and each network against its own linearization at initialization."))
    rep.add_claim(claim(f"width {wide}: the linearized networks' seed mean is the GP mean on the circle (max |t| "
                        f"over {n_z} points, Bonferroni Student-t at 0.1 %, {seeds[-1] - 1} dof)",
                        stats[wide]["max_t_linearized_vs_gp"], [0.0, bonferroni_t(n_z, seeds[-1] - 1)],
                        points=n_z))
    rep.add_claim(claim(f"width {wide}: covariance of the trained functions is the GP's (sum of Mahalanobis "
                        f"distances ~ chi^2({dof}), 0.05 % / 99.95 % quantiles)", stats[wide]["mahalanobis"],
                        [float(chi2.ppf(5e-4, dof)), float(chi2.ppf(1 - 5e-4, dof))], dof=dof))
    d_b = stats[narrow]["bias_B"] - stats[wide]["bias_B"]
    se_b = math.hypot(stats[narrow]["bias_B_stderr"], stats[wide]["bias_B_stderr"])
    rep.add_claim(claim(f"the trained networks' pull towards the targets beyond their linearization, B, is smaller "
                        f"at width {wide} than at {narrow} (B({narrow}) - B({wide}); holds if > 3 s.e.)", d_b,
                        [3 * se_b, math.inf], stderr=se_b,
                        B={str(w): stats[w]["bias_B"] for w in widths}))
    for w in widths:
        rep.add_claim(claim(f"width {w}: networks fit the 4 training points (max |f - y|; GP mean residual "
                            f"{gp_train_resid:.1e})", stats[w]["train_residual"], [0.0, 0.05]))
    fit = (fit_power_law(widths, [stats[w]["bias_B"] for w in widths],
                         [stats[w]["bias_B_stderr"] for w in widths])
           if all(stats[w]["bias_B"] > 0 for w in widths) else None)
    rep.text(
        f"The paper's comparison, seed mean of the trained networks against the GP mean with z = difference / "
        f"(GP sd / sqrt(S)): max |z| = " + ", ".join(f"{stats[w]['max_z_trained_vs_gp']:.1f} (width {w})"
                                                   for w in widths)
        + f", against a Bonferroni bound of {norm.ppf(1 - 1e-3 / (2 * n_z)):.2f} for a zero difference. The "
        "difference is not the GP's (their linearizations' mean is the GP mean, first claim) but the training: "
        "the networks move beyond their linearization towards the targets next to the training points, by B = "
        + ", ".join(f"{stats[w]['bias_B']:.4f} +- {stats[w]['bias_B_stderr']:.4f} (width {w})" for w in widths)
        + (f" (B ~ width^{fit.exponent:.2f} +- {fit.stderr:.2f})" if fit is not None else "")
        + f"; next to a training point this is {stats[wide]['bias_next_to_training_points_in_gp_sd']:.2f} GP "
        f"standard deviations at width {wide}. A finite-width effect of ReLU networks that falls slowly with "
        "width: resolved by our seeds, below what the paper's 10 curves per width could show.")
    rep.section("Trained functions and the GP quantiles (the paper's Fig. 2)")
    shown = [narrow, wide]
    rep.figure(_figure(angles, mu_g, sd_g, f_te, shown, n_grid, cfg["n_plot"]), "fig2_functions",
               f"f(x(gamma)) of {cfg['n_plot']} networks per width after {steps} steps (left: width {narrow}, right: "
               f"width {wide}); black: 10 %, 50 %, 90 % quantiles of the limiting Gaussian (grey band: 10-90 %); "
               "dots: training points.")
    rep.section("Where the networks' mean leaves the GP mean")
    rep.figure(_figure_bias(angles, dist, sign, mu_g, sd_g, f_te, f_lin, widths, n_grid), "fig_bias",
               "Seed mean of the deviation towards the nearest training target, against the distance to that point "
               "(the 8 half-arcs between training points and midpoints folded together; error bars: 2 standard "
               "errors from the seeds). Left: trained networks minus their own linearization, per width; right: "
               f"at width {wide}, trained minus GP and linearized minus GP, in units of the GP's sd.")
    short = dict(seeds="seeds", max_z_trained_vs_gp="max|z| trained-GP", max_t_linearized_vs_gp="max|t| lin-GP",
                 bias_B="B", bias_B_stderr="s.e. B", bias_next_to_training_points_in_gp_sd="next to x_i / GP sd",
                 rms_f_minus_flin="rms f-f_lin", mahalanobis="Mahalanobis", dof="dof",
                 coverage_10_90="in 10-90 %", train_residual="train resid.")
    rep.table([{"width": w, **{short[k]: v for k, v in stats[w].items()}} for w in widths],
              caption="Per width: max |z| of the trained seed mean vs the GP mean (GP sd / sqrt(S)); max |t| of the "
                      "linearized networks' mean vs the GP mean (seeds' standard error); B and its standard error; "
                      "the trained mean's deviation next to the training points in GP sd; rms of f - f_lin; the "
                      "Mahalanobis sum at 4 points between the training points (chi^2 with dof degrees of freedom); "
                      "the fraction of function values inside the 10-90 % band (0.8 for the GP); the largest "
                      "training residual.")
    rep.update(config=cfg, train_angles=TRAIN_ANGLES, check_angles=CHECK_ANGLES, angles=angles,
               gp_mean=mu_g, gp_sd=sd_g, gp_train_residual=gp_train_resid, slowest_mode_rate=slowest,
               stats={str(w): v for w, v in stats.items()},
               bias_fit=None if fit is None else dict(exponent=fit.exponent, stderr=fit.stderr),
               functions={str(w): f_te[w][:, :n_grid] for w in widths},
               linearized={str(w): f_lin[w][:, :n_grid] for w in widths})
    if out is not None:
        rep.save(out)
    return rep


def _figure(angles, mu, sd, f_te, widths, n_grid, n_plot):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(widths), figsize=(11, 4.2), sharey=True)
    g = np.asarray(TRAIN_ANGLES)
    for ax, w, col in zip(np.atleast_1d(axes), widths, ("tab:green", "tab:red", "tab:blue")):
        ax.fill_between(angles, mu - 1.2816 * sd, mu + 1.2816 * sd, color="0.85", lw=0)
        for s in range(min(n_plot, f_te[w].shape[0])):
            ax.plot(angles, f_te[w][s, :n_grid], color=col, lw=0.8, alpha=0.75, label=f"n = {w}" if s == 0 else None)
        for q, ls in ((-1.2816, "--"), (0.0, "-"), (1.2816, "--")):
            ax.plot(angles, mu + q * sd, color="k", lw=1.3, ls=ls,
                    label={0.0: "n = inf: 50 %"}.get(q, "n = inf: 10 % / 90 %" if q > 0 else None))
        ax.plot(g, np.cos(g) * np.sin(g), "o", color="k", ms=6, mfc="white", zorder=5, label="training points")
        ax.set_title(f"width n = {w}", fontsize=10)
        ax.set_xlabel("gamma  (x = (cos gamma, sin gamma))")
        ax.set_xticks([-math.pi, -math.pi / 2, 0, math.pi / 2, math.pi], ["-pi", "-pi/2", "0", "pi/2", "pi"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    np.atleast_1d(axes)[0].set_ylabel("f(x)")
    fig.tight_layout()
    return fig


def _fold(a, dist, sign):
    """Seed-wise average of sign * a over the grid points at each distance; returns (distances, (S, D))."""
    keep = sign != 0
    ds = np.unique(np.round(dist[keep], 9))
    cols = [(sign * a)[:, keep & (np.abs(dist - d) < 1e-8)].mean(1) for d in ds]
    return ds, np.stack(cols, 1)


def _figure_bias(angles, dist, sign, mu, sd, f_te, f_lin, widths, n_grid):
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.0))
    cols = ("tab:green", "tab:orange", "tab:red", "tab:blue")
    for w, col in zip(widths, cols):
        f, fl = f_te[w][:, :n_grid].numpy(), f_lin[w][:, :n_grid].numpy()
        ds, b = _fold(f - fl, dist, sign)
        se = b.std(0, ddof=1) / math.sqrt(b.shape[0])
        a1.errorbar(ds, b.mean(0), yerr=2 * se, color=col, marker="o", ms=3, lw=1, capsize=2, label=f"n = {w}")
    a1.axhline(0, color="k", lw=0.8)
    a1.set_xlabel("distance to the nearest training point (rad)")
    a1.set_ylabel("sign(y) x seed mean of (f - f_lin)")
    a1.set_title("trained network minus its linearization", fontsize=10)
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    w = widths[-1]
    f, fl = f_te[w][:, :n_grid].numpy(), f_lin[w][:, :n_grid].numpy()
    _, sdf = _fold(sd[None], dist, np.abs(sign))
    for a, lab, col in ((f - mu, "trained - GP mean", "tab:red"), (fl - mu, "linearized - GP mean", "tab:gray")):
        ds, b = _fold(a, dist, sign)
        se = b.std(0, ddof=1) / math.sqrt(b.shape[0])
        a2.errorbar(ds, b.mean(0) / sdf[0], yerr=2 * se / sdf[0], color=col, marker="o", ms=3, lw=1, capsize=2,
                    label=lab)
    a2.axhline(0, color="k", lw=0.8)
    a2.set_xlabel("distance to the nearest training point (rad)")
    a2.set_ylabel("sign(y) x seed mean / GP sd")
    a2.set_title(f"width {w}: seed mean against the GP mean", fontsize=10)
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    return fig
