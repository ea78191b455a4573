"""Huang, Du & Xu (IJCAI 2021), "On the neural tangent kernel of deep networks with orthogonal
initialization": Gaussian and orthogonal initialization give the same NTK at large width and train
alike in the lazy regime; outside it (large learning rate, large depth) orthogonal nets train faster.

Paper's setup
    Deep fully-connected networks in the NTK parameterization with i.i.d. Gaussian or Haar-orthogonal
    weight matrices (same per-entry variance). Theory: both NTKs converge to the same limit and stay
    constant during training at large width; experiments (MNIST/CIFAR-10, tanh/ReLU) show no difference
    in training speed for small learning rates, and faster training with orthogonal weights for large
    learning rates and deep nets.

Ours
    * the same NTK: the seed mean of the empirical NTK (:func:`ntkit.empirical.monte_carlo_kernel`,
      ``init="gaussian"`` / ``"orthogonal"``) of a depth-3 erf network against the exact kernel
      (``arch.kernel``) on 6 digits; claim: every entry within 5 standard errors of the seeds (per
      init), and the two inits' means within 5 combined standard errors of each other;
    * NTK drift vs width: ||Theta_T - Theta_0||_F / ||Theta_0||_F after T GD steps at half the largest
      stable learning rate of the exact NTK, over widths; fitted power laws per init with standard
      errors; claims: both exponents below 0 (upper 4-SE bound), and equal within 4 combined SE;
    * training speed in the lazy regime (depth 2, width 1024, learning rate 0.5 eta_max, 30 steps): the
      paired mean of log(L_orth / L_gauss) over seeds is within 4 standard errors of 0 (no detectable
      difference; at finite width the Gaussian kernel's larger fluctuations slow the slow modes slightly,
      by Jensen's inequality, an effect that vanishes with width);
    * outside it (depth 16-20, width 64-128, learning rate 1.5 eta_max, beyond the lazy stability
      limit 2/lambda_max of the infinite-width NTK): orthogonal reaches the lower training loss in every
      seed (a diverged run counts as infinite loss); under "no difference" each seed is a fair coin, so
      all S seeds agreeing has probability 2^-S (S = 5 quick, 8 full).
    Data: scikit-learn's 8x8 digits (or MNIST with ``data=``), inputs centred and scaled to norm
    sqrt(d), one-hot targets, MSE. Activation erf at sigma_w^2 = pi/4, sigma_b = 0 (the critical point
    chi_1 = 1 of erf, where orthogonal weights give dynamical isometry; Pennington et al. 2017). Sizes are
    scaled down from the paper's for the 2-core CPU.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ...dynamics import max_learning_rate
from ...empirical import empirical_ntk, monte_carlo_kernel
from ...kernels import Erf, mlp
from ...report import Report, claim
from ..data import load_images
from ._common import fit_power_law, train_full_batch

NAME = "huang-orthogonal"
TITLE = "Huang, Du & Xu 2021: Gaussian vs orthogonal initialization -- same NTK, same lazy training, faster deep training"


def _data(data, n: int, seed: int):
    images, labels, name = load_images(data)
    idx = np.random.default_rng(seed).permutation(images.shape[0])[:n]
    x = torch.as_tensor(images[idx].reshape(n, -1), dtype=torch.float64)
    x = x - x.mean(0)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(x.shape[1])
    y = torch.nn.functional.one_hot(torch.as_tensor(labels[idx]), 10).to(torch.float64)
    return x, y, name


def _final_losses(arch, x, y, *, width, seeds, lr, steps, init):
    losses, curves = [], []
    rec = sorted(set(np.unique(np.geomspace(1, steps, 25).astype(int)).tolist() + [0]))
    for s in seeds:
        net = arch.init(width, seed=s, init=init, in_features=x.shape[1], out_dim=y.shape[1])
        with np.errstate(all="ignore"):
            out = train_full_batch(net, x, y, learning_rate=lr, steps=steps, record=rec)
        loss = np.asarray(out["loss"], float)
        loss[~np.isfinite(loss)] = np.inf
        losses.append(loss[-1])
        curves.append(loss)
    return np.asarray(losses), np.asarray(curves), np.asarray(rec)


def _drift_figure(widths, drift, steps, colors):
    """The NTK drift against width with fitted power laws (``drift``: init -> widths x seeds array)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fits = {}
    fig, ax = plt.subplots(figsize=(6, 4.4))
    w = np.asarray(widths, dtype=float)
    for init, d in drift.items():
        d = np.asarray(d, dtype=float)
        m = d.mean(1)
        se = d.std(1, ddof=1) / math.sqrt(d.shape[1])
        fits[init] = fit_power_law(widths, m, se)
        ax.errorbar(widths, m, yerr=se, fmt="o", color=colors[init], label=f"{init}, mean ± SE of {d.shape[1]} "
                    f"seeds; fit exponent {fits[init].exponent:.2f} ± {fits[init].stderr:.2f}")
        ax.loglog(widths, fits[init].predict(widths), "-", color=colors[init], alpha=0.6)
    ref = fits["gaussian"].predict(widths[0])
    ax.loglog(w, ref * (w / w[0]) ** -0.5, "k:", label=r"$n^{-1/2}$ (the bound)")
    ax.loglog(w, ref * (w / w[0]) ** -1.0, "k--", lw=0.8, label=r"$n^{-1}$")
    ax.set_xticks(list(widths))
    ax.set_xticklabels([str(int(v)) for v in widths])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("width n (log scale)")
    ax.set_ylabel(r"$\|\Theta_T - \Theta_0\|_F / \|\Theta_0\|_F$ (log scale)")
    ax.set_title(f"NTK drift after {steps} GD steps (depth 3, lr = 0.5 $\\eta_{{max}}$)", fontsize=10)
    ax.legend(fontsize=7.5)
    return fig, fits


def run(out=None, *, quick: bool = False, seed: int = 0, data=None, progress: bool = True) -> Report:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..._progress import progress as bar

    t0 = time.perf_counter()
    w_std = math.sqrt(math.pi / 4)  # erf at chi_1 = 1 (sigma_b = 0)
    act = Erf()
    rep = Report(TITLE, intro=(__doc__ or "").split("\n\n")[0].replace("\n", " "))
    results: dict = {"quick": quick, "seed": seed, "W_std": w_std}
    inits = ("gaussian", "orthogonal")
    colors = {"gaussian": "C0", "orthogonal": "C3"}

    # 1. the same NTK at large width ---------------------------------------------------------------
    x6, _, data_name = _data(data, 6, seed)
    arch3 = mlp(3, activation=act, W_std=w_std, b_std=0.0)
    exact = arch3.kernel(x6, get="ntk")
    n_mc, width_mc = (12, 256) if quick else (32, 1024)
    mc = {init: monte_carlo_kernel(arch3, x6, width=width_mc, seeds=range(seed, seed + n_mc), get="ntk", init=init)
          for init in inits}
    iu = torch.triu_indices(6, 6)
    zmax = {}
    for init in inits:
        z = ((mc[init].mean - exact) / mc[init].stderr)[iu[0], iu[1]]
        zmax[init] = float(z.abs().max())
        rep.add_claim(claim(f"{init} init: seed-mean empirical NTK equals the exact NTK (max |z| over entries)",
                            zmax[init], [0.0, 5.0], seeds=n_mc, width=width_mc))
    zd = ((mc["orthogonal"].mean - mc["gaussian"].mean)
          / torch.sqrt(mc["orthogonal"].stderr ** 2 + mc["gaussian"].stderr ** 2))[iu[0], iu[1]]
    rep.add_claim(claim("orthogonal and Gaussian seed-mean NTKs agree (max |z| of the difference)",
                        float(zd.abs().max()), [0.0, 5.0]))
    sd_ratio = float((mc["orthogonal"].stderr / mc["gaussian"].stderr)[iu[0], iu[1]].mean())
    results["same_ntk"] = {"width": width_mc, "seeds": n_mc, "max_z": zmax, "max_z_difference": float(zd.abs().max()),
                           "mean_stderr_ratio_orth_over_gauss": sd_ratio, "exact": exact,
                           "mean": {k: v.mean for k, v in mc.items()}, "stderr": {k: v.stderr for k, v in mc.items()}}
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    e = exact[iu[0], iu[1]].numpy()
    for k, init in enumerate(inits):
        ax.errorbar(e, mc[init].mean[iu[0], iu[1]].numpy(), yerr=mc[init].stderr[iu[0], iu[1]].numpy(), fmt="o",
                    ms=4, color=colors[init], label=f"{init} (mean of {n_mc} nets, width {width_mc})", alpha=0.8)
    lim = [e.min() * 0.95, e.max() * 1.05]
    ax.plot(lim, lim, "k--", label="y = x (exact NTK)")
    ax.set_xlabel(r"exact $\Theta(x, x')$")
    ax.set_ylabel(r"empirical $\Theta(x, x')$ at init")
    ax.set_title("same NTK limit (depth 3, erf)")
    ax.legend(fontsize=8)
    rep.section("Same NTK at large width", f"Entries of the NTK on 6 {data_name} inputs; error bars: standard "
                f"errors over seeds. Orthogonal/Gaussian seed spread ratio: {sd_ratio:.3f}.")
    rep.figure(fig, "same_ntk", "Seed-mean empirical NTK of both inits against the exact kernel.")

    # 2. NTK drift vs width ------------------------------------------------------------------------
    n_drift = 32
    xd, yd, _ = _data(data, n_drift, seed + 1)
    k_exact = arch3.kernel(xd, get="ntk")
    lr_d = 0.5 * max_learning_rate(k_exact, n_outputs=10)
    widths = [32, 64, 128, 256] if quick else [32, 64, 128, 256, 512]
    s_drift = 3 if quick else 5
    steps_d = 50 if quick else 100
    drift = {init: np.zeros((len(widths), s_drift)) for init in inits}
    for i, w in enumerate(bar(widths, total=len(widths), desc="huang drift", unit="width", enabled=progress)):
        for init in inits:
            for j in range(s_drift):
                net = arch3.init(w, seed=seed + 100 + j, init=init, in_features=xd.shape[1], out_dim=10)
                k0 = empirical_ntk(net, xd)
                train_full_batch(net, xd, yd, learning_rate=lr_d, steps=steps_d)
                k1 = empirical_ntk(net, xd)
                drift[init][i, j] = float((k1 - k0).norm() / k0.norm())
    fig, fits = _drift_figure(widths, drift, steps_d, colors)
    rep.section("NTK drift during training against width", "Both inits' kernels move less as the width grows, "
                "at the same rate.")
    rep.figure(fig, "ntk_drift", "Relative change of the empirical NTK over training; lines: fitted power laws.")
    for init in inits:
        f = fits[init]
        rep.add_claim(claim(f"{init}: NTK drift falls with width (fitted exponent + 4 SE < 0)",
                            f.exponent + 4 * f.stderr, [-math.inf, 0.0], exponent=f.exponent, stderr=f.stderr))
    dz = abs(fits["orthogonal"].exponent - fits["gaussian"].exponent) / math.hypot(fits["orthogonal"].stderr,
                                                                                 fits["gaussian"].stderr)
    rep.add_claim(claim("orthogonal and Gaussian drift exponents agree (|difference| / combined SE)", dz,
                        [0.0, 4.0]))
    results["drift"] = {"widths": widths, "steps": steps_d, "learning_rate": lr_d,
                        "values": drift, "exponent": {k: f.exponent for k, f in fits.items()},
                        "stderr": {k: f.stderr for k, f in fits.items()}}

    # 3. training speed inside and outside the lazy regime ----------------------------------------
    n_tr = 64 if quick else 128
    xt, yt, _ = _data(data, n_tr, seed + 2)
    regimes = {
        "lazy": dict(depth=2, width=1024, frac=0.5, steps=30, seeds=5 if quick else 8),
        "beyond lazy": dict(depth=16 if quick else 20, width=64 if quick else 128, frac=1.5,
                            steps=100 if quick else 200, seeds=5 if quick else 8),
    }
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    results["training"] = {}
    for ax, (rname, cfg) in zip(axes, regimes.items()):
        arch = mlp(cfg["depth"], activation=act, W_std=w_std, b_std=0.0)
        eta = cfg["frac"] * max_learning_rate(arch.kernel(xt, get="ntk"), n_outputs=10)
        seeds = range(seed + 200, seed + 200 + cfg["seeds"])
        res = {init: _final_losses(arch, xt, yt, width=cfg["width"], seeds=seeds, lr=eta, steps=cfg["steps"],
                                   init=init) for init in inits}
        for init in inits:
            _, curves, rec = res[init]
            for c in curves:
                ax.loglog(np.maximum(rec, 0.5), np.where(np.isfinite(c), c, np.nan), color=colors[init], alpha=0.5)
            ax.plot([], [], color=colors[init], label=f"{init} (one curve per seed, {cfg['seeds']} seeds)")
        start = max(float(res[i][1][:, 0].max()) for i in inits)
        low = min(float(np.min(c[np.isfinite(c)])) for i in inits for c in res[i][1] if np.isfinite(c).any())
        ax.set_ylim(low / 3, 100 * start)
        ax.set_xlabel("GD step (log scale; step 0 drawn at 0.5)")
        ax.set_ylabel("training loss (MSE; diverging runs leave the top)")
        ax.set_title(f"{rname}: depth {cfg['depth']}, width {cfg['width']}, lr = {cfg['frac']} $\\eta_{{max}}$")
        ax.legend()
        lg, lo = res["gaussian"][0], res["orthogonal"][0]
        results["training"][rname] = {**cfg, "learning_rate": eta, "final_loss": {"gaussian": lg, "orthogonal": lo}}
        if rname == "lazy":
            d = np.log(lo / lg)
            se_d = d.std(ddof=1) / math.sqrt(d.size)
            rep.add_claim(claim("lazy regime: no detectable difference in training speed (|mean log loss ratio, "
                                "orthogonal / Gaussian| in paired standard errors)", abs(d.mean()) / se_d, [0.0, 4.0],
                                mean_log_ratio=float(d.mean()), stderr=float(se_d)))
        else:
            wins = float(np.mean(lo < lg))
            rep.add_claim(claim(f"beyond the lazy regime orthogonal trains faster: share of seeds with the lower "
                                f"final loss (all {cfg['seeds']}: p = 2^-{cfg['seeds']} under no difference)",
                                wins, [1.0, 1.0], diverged_gaussian=int(np.sum(~np.isfinite(lg))),
                                diverged_orthogonal=int(np.sum(~np.isfinite(lo)))))
    rep.section("Training speed", "Training loss over GD steps for several seeds. Left: lazy regime; right: deep "
                "network at 1.5 times the largest learning rate that is stable for the infinite-width NTK "
                "(missing curves: runs that diverged).")
    rep.figure(fig, "training_speed", "Gaussian (blue) vs orthogonal (red) initialization.")
    results["wall_time_s"] = time.perf_counter() - t0
    rep.update(results)
    if out is not None:
        rep.save(Path(out))
    return rep
