"""Lee et al. (2019), "Wide neural networks of any depth evolve as linear models under gradient descent".

Paper's setup
-------------
Fully-connected (and convolutional) networks in the NTK parameterization, trained by full-batch gradient
descent on MSE (CIFAR-10 subsets): the trained network, its first-order Taylor expansion in the parameters
(the linearized network, Eq. (6)) and the closed-form prediction with the exact NTK (Eq. (9)) agree better
as the width n grows (Thm. 2.1: sup_t ||f_t - f_t^lin|| = O(n^-1/2)); gradient descent is stable below
eta_crit = 2 m / lambda_max(Theta) and leaves the linear regime above it (Sec. 2.4, Fig. 4). The relative
change of the NTK over training is bounded by O(n^-1/2) (Thm. 2.1); Dyer & Gur-Ari (2020) and Geiger et al.
(2020) argue it is O(1/n) for smooth activations.

Ours
----
Two-hidden-layer networks ``ntkit.mlp(2, activation=relu or erf, W_std=sqrt(2) (relu) / 1 (erf), b_std=0.1)``
on a small image task (MNIST when ``data=`` is given, else scikit-learn's bundled 8x8 digits): inputs
flattened and scaled to norm sqrt(d), target +1 / -1 for even / odd digits, N training and N test images.
Learning rate 0.5 eta_crit of the exact NTK (:func:`ntkit.dynamics.max_learning_rate`), T full-batch steps,
several seeds per width (trained together, batched). The linearized network's outputs are the closed-form
kernel gradient descent with its own initial NTK Theta_0 and initial outputs f_0
(:func:`ntkit.dynamics.gradient_descent_mse`, ``discrete=True``) -- exact for a model linear in its
parameters, and checked here against :func:`ntkit.dynamics.linearize` trained step by step; the NTK
prediction is the same with the exact Theta_inf. Widths up to 1024 (CPU budget; the paper goes to 10^4).
``--quick``: fewer widths, seeds, images and steps.

Claims (each can fail)
----------------------
* ``linearize`` trained by GD equals the closed-form kernel dynamics with Theta_0 (relative difference < 1e-6);
* network vs linearization: the relative test-output difference after T steps falls with width at least like
  n^-1/2 (fitted exponent <= -1/2 + 3 s.e.);
* linearization vs NTK prediction: falls like n^-1/2 (the fluctuation of Theta_0; exponent within 3 s.e.);
* at the largest width, GD at 0.9 eta_crit (of the network's own Theta_0) converges (final loss < 1/2 initial)
  and at 1.1 eta_crit leaves the linear regime (the loss first grows above its initial value);
* the relative NTK change ||Theta_T - Theta_0|| / ||Theta_0|| vanishes with width for ReLU and for erf
  (fitted exponent + 3 s.e. < 0); which of n^-1/2 and n^-1 each follows is reported with the fits.
"""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import torch

from ..._progress import progress as _progress
from ...dynamics import gradient_descent_mse, linearize, max_learning_rate
from ...empirical import empirical_ntk
from ...kernels.activations import Erf
from ...kernels.architecture import mlp
from ...report import Report, claim
from ..data import load_images
from ._common import fit_power_law, pyplot, train_ensemble_full_batch, train_full_batch

NAME = "lee-linearization"
TITLE = "Lee et al. 2019: wide networks evolve as their linearization; NTK change vs width (ReLU, erf)"


def _config(quick: bool) -> dict:
    if quick:
        return dict(widths=[32, 64, 128, 256], seeds=3, n=24, steps=60, lr_factor=0.5, lr_steps=30)
    return dict(widths=[64, 128, 256, 512, 1024], seeds=4, n=64, steps=200, lr_factor=0.5, lr_steps=60)


def _arch(act: str):
    if act == "relu":
        return mlp(2, activation="relu", W_std=2**0.5, b_std=0.1)
    return mlp(2, activation=Erf(), W_std=1.0, b_std=0.1)


def _rel(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - b).norm() / ref.norm())


def run(out: str | os.PathLike | None = None, *, quick: bool = False, seed: int = 0, data=None,
        progress: bool = True) -> Report:
    """Run the reproduction; returns the Report (saved to ``out`` when given).

    ``data``: an MNIST folder or .npz (see :func:`ntkit.experiments.data.load_mnist`); default: scikit-learn's
    bundled digits.
    """
    cfg = _config(quick)
    n, steps, widths, n_seeds = cfg["n"], cfg["steps"], cfg["widths"], cfg["seeds"]
    images, labels, source = load_images(data, n=2 * n)
    x = torch.tensor(images.reshape(2 * n, -1), dtype=torch.float64)
    d = x.shape[1]
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(d)
    y = torch.tensor(np.where(labels % 2 == 0, 1.0, -1.0), dtype=torch.float64)[:, None]
    tr, te = slice(0, n), slice(n, 2 * n)
    res: dict = {"relu": {}, "erf": {}}
    curves = {}
    jobs = [(a, w) for a in ("relu", "erf") for w in widths]
    lr = {}
    for act, w in _progress(jobs, total=len(jobs), desc=NAME, unit="width", enabled=progress):
        arch = _arch(act)
        if act not in lr:
            k_inf = arch.kernel(x, get="ntk")
            lr[act] = (cfg["lr_factor"] * max_learning_rate(k_inf[tr, tr]), k_inf)
        eta, k_inf = lr[act]
        nets = [arch.init(w, seed=1000 * int(seed) + s, in_features=d, dtype=torch.float32) for s in range(n_seeds)]
        xf = x.float()
        with torch.no_grad():
            f0 = [net(xf).double() for net in nets]
        th0 = [empirical_ntk(net, xf).double() for net in nets]
        hist = train_ensemble_full_batch(nets, xf[tr], y[tr].float(), learning_rate=eta, steps=steps,
                                         record=range(0, steps + 1, max(1, steps // 25)))
        with torch.no_grad():
            fT = [net(xf).double() for net in nets]
        thT = [empirical_ntk(net, xf).double() for net in nets]
        e_lin, e_ntk, drift = [], [], []
        for s in range(n_seeds):
            lin = gradient_descent_mse(th0[s][tr, tr], y[tr], learning_rate=eta, discrete=True)
            p_lin = lin.predict(steps, th0[s][te, tr], f0[s][tr], f0[s][te]).test
            ntk = gradient_descent_mse(k_inf[tr, tr], y[tr], learning_rate=eta, discrete=True)
            p_ntk = ntk.predict(steps, k_inf[te, tr], f0[s][tr], f0[s][te]).test
            e_lin.append(_rel(fT[s][te], p_lin, p_lin - f0[s][te]))
            e_ntk.append(_rel(p_lin, p_ntk, p_ntk - f0[s][te]))
            drift.append(_rel(thT[s], th0[s], th0[s]))
            if s == 0 and act == "relu" and w in (widths[0], widths[-1]):
                ts = hist["steps"]
                loss_lin = ((lin.predict(ts, None, f0[s][tr]).train - y[tr]) ** 2).mean(dim=(1, 2)) / 2
                loss_ntk = ((ntk.predict(ts, None, f0[s][tr]).train - y[tr]) ** 2).mean(dim=(1, 2)) / 2
                curves[w] = dict(steps=ts, net=[float(v[0]) for v in hist["loss"]], lin=loss_lin, ntk=loss_ntk)
        res[act][w] = {k: (float(np.mean(v)), float(np.std(v, ddof=1) / math.sqrt(n_seeds)))
                       for k, v in (("net_vs_lin", e_lin), ("lin_vs_ntk", e_ntk), ("drift", drift))}
        if act == "relu" and w == widths[-1]:
            widest = (copy.deepcopy(nets[0]), th0[0])
        del nets

    # linearize() trained step by step against the closed form (float64, small width, a few steps)
    arch = _arch("relu")
    net64 = arch.init(widths[0], seed=12345, in_features=d)
    lin_mod = linearize(net64)
    k0 = empirical_ntk(net64, x)
    with torch.no_grad():
        f00 = net64(x)
    eta_r = lr["relu"][0]
    train_full_batch(lin_mod, x[tr], y[tr], learning_rate=eta_r, steps=10)
    with torch.no_grad():
        f_mod = lin_mod(x[te])
    f_cf = gradient_descent_mse(k0[tr, tr], y[tr], learning_rate=eta_r, discrete=True).predict(
        10, k0[te, tr], f00[tr], f00[te]).test
    lin_check = _rel(f_mod, f_cf, f_cf - f00[te])

    # learning rate just below / above eta_crit of the widest network's own Theta_0 (by reinitialising it)
    base_net, th_w = widest
    eta_c = max_learning_rate(th_w[tr, tr])
    lr_loss = {}
    for fac in (0.9, 1.1):
        nets = [arch.init(widths[-1], seed=1000 * int(seed), in_features=d, dtype=torch.float32)]
        h = train_ensemble_full_batch(nets, x[tr].float(), y[tr].float(), learning_rate=fac * eta_c,
                                      steps=cfg["lr_steps"], record=range(cfg["lr_steps"] + 1))
        lr_loss[fac] = [float(v[0]) for v in h["loss"]]

    fits = {}
    for act in ("relu", "erf"):
        for key in ("net_vs_lin", "lin_vs_ntk", "drift"):
            m = [res[act][w][key][0] for w in widths]
            se = [res[act][w][key][1] for w in widths]
            fits[(act, key)] = fit_power_law(widths, m, se)

    rep = Report(TITLE, intro=(
        f"Two-hidden-layer networks (NTK parameterization) on {n} {source} images (+ {n} test), targets +-1 by "
        f"digit parity, full-batch GD for {steps} steps at 0.5 eta_crit, widths {widths}, {n_seeds} seeds per "
        "width."))
    rep.add_claim(claim("linearize() trained by GD equals the closed-form kernel dynamics with Theta_0 "
                        "(relative difference)", lin_check, [0.0, 1e-6]))
    f = fits[("relu", "net_vs_lin")]
    rep.add_claim(claim("ReLU: network vs its linearization (relative test-output difference) falls at least like "
                        "n^-1/2 (fitted exponent <= -1/2 + 3 s.e.)", f.exponent, [-math.inf, -0.5 + 3 * f.stderr],
                        stderr=f.stderr))
    f = fits[("relu", "lin_vs_ntk")]
    rep.add_claim(claim("ReLU: linearization vs NTK prediction falls like n^-1/2 (fitted exponent, +-3 s.e.)",
                        f.exponent, [-0.5 - 3 * f.stderr, -0.5 + 3 * f.stderr], stderr=f.stderr))
    l9, l11 = lr_loss[0.9], lr_loss[1.1]
    rep.add_claim(claim(f"width {widths[-1]}: GD at 0.9 eta_crit converges (final / initial loss)", l9[-1] / l9[0],
                        [0.0, 0.5], eta_crit=eta_c))
    rep.add_claim(claim(f"width {widths[-1]}: GD at 1.1 eta_crit leaves the linear regime (max / initial loss)",
                        max(l11) / l11[0], [1.0, math.inf], eta_crit=eta_c))
    for act in ("relu", "erf"):
        f = fits[(act, "drift")]
        rep.add_claim(claim(f"{act}: relative NTK change over training vanishes with width (fitted exponent + 3 s.e. "
                            "< 0)", f.exponent, [-math.inf, -3 * f.stderr], stderr=f.stderr,
                            nearest_rate=_nearest(f.exponent)))

    rep.section("Network, linearization and NTK prediction during training")
    rep.figure(_fig_curves(curves), "training_curves",
               "Training loss of a ReLU network (solid), its linearization (dashed) and the NTK prediction (dotted), "
               "narrowest and widest width (one seed).")
    rep.figure(_fig_errors(widths, res, fits), "errors_vs_width",
               "Relative test-output differences after training vs width (log-log), ReLU, with fits and n^-1/2.")
    rep.section("Learning rate")
    rep.figure(_fig_lr(lr_loss, eta_c), "learning_rate",
               f"Training loss at 0.9 and 1.1 eta_crit = 2 m / lambda_max(Theta_0) = {eta_c:.3g}, width {widths[-1]} "
               "(log scale).")
    rep.section("Relative NTK change vs width: ReLU and erf")
    rep.figure(_fig_drift(widths, res, fits), "ntk_change",
               "||Theta_T - Theta_0|| / ||Theta_0|| vs width (log-log), fits, and the n^-1/2 and n^-1 references.")
    rep.text(_rate_text(fits))
    rep.table([{"activation": a, "width": w, **{k: v[0] for k, v in res[a][w].items()},
                **{f"{k} s.e.": v[1] for k, v in res[a][w].items()}} for a in ("relu", "erf") for w in widths],
              caption="Per activation and width: means over seeds and their standard errors.")
    rep.update(config=cfg, data=source, learning_rate={a: v[0] for a, v in lr.items()}, eta_crit_widest=eta_c,
               per_width={a: {str(w): v for w, v in res[a].items()} for a in res},
               fits={f"{a}/{k}": {"exponent": f.exponent, "stderr": f.stderr} for (a, k), f in fits.items()},
               lr_loss={str(k): v for k, v in lr_loss.items()}, linearize_check=lin_check,
               curves={str(w): c for w, c in curves.items()})
    if out is not None:
        rep.save(out)
    return rep


def _rate_text(fits) -> str:
    """The fitted NTK-change exponents and their distances, in standard errors, from -1/2 and -1."""
    txt = []
    for act in ("relu", "erf"):
        f = fits[(act, "drift")]
        txt.append(f"{act}: exponent {f.exponent:.3f} ± {f.stderr:.3f} ({abs(f.exponent + 0.5) / f.stderr:.1f} SE "
                   f"from -1/2, {abs(f.exponent + 1) / f.stderr:.1f} SE from -1; closer to {_nearest(f.exponent)})")
    return "Fitted exponents of the relative NTK change: " + "; ".join(txt) + "."


def _nearest(b: float) -> str:
    return "n^-1/2" if abs(b + 0.5) <= abs(b + 1.0) else "n^-1"


def _width_ticks(ax, widths) -> None:
    """Ticks at the measured widths, written as plain integers (not 3 x 10^1)."""
    import matplotlib.ticker

    ax.set_xticks(list(widths))
    ax.set_xticklabels([str(int(v)) for v in widths])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _fig_curves(curves):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (w, c), col in zip(sorted(curves.items()), ("tab:green", "tab:red")):
        ax.plot(c["steps"], c["net"], "-", color=col, label=f"network, n = {w}")
        ax.plot(c["steps"], np.asarray(c["lin"]), "--", color=col, label=f"linearization, n = {w}")
        ax.plot(c["steps"], np.asarray(c["ntk"]), ":", color=col, lw=2, label=f"NTK prediction ($f_0$ of n = {w})")
    ax.set_yscale("log")
    ax.set_xlabel("gradient-descent step")
    ax.set_ylabel("training loss (MSE / 2, log scale)")
    ax.set_title("ReLU, one seed: network, linearization, NTK prediction", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _fig_errors(widths, res, fits):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    w = np.asarray(widths, float)
    for key, lab, col in (("net_vs_lin", "network vs linearization", "tab:blue"),
                          ("lin_vs_ntk", "linearization vs NTK", "tab:orange")):
        m = [res["relu"][x][key][0] for x in widths]
        ax.errorbar(w, m, yerr=[res["relu"][x][key][1] for x in widths], fmt="o", color=col, label=lab)
        f = fits[("relu", key)]
        ax.plot(w, f.predict(w), color=col, lw=1, label=f"{lab}, fit: exponent {f.exponent:.2f} ± {f.stderr:.2f}")
    m0 = res["relu"][widths[0]]["lin_vs_ntk"][0]
    ax.plot(w, m0 * (w / w[0]) ** -0.5, "k--", lw=1, label=r"$n^{-1/2}$ (Lee et al., Thm. 2.1)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _width_ticks(ax, w)
    ax.set_xlabel("width n (log scale)")
    ax.set_ylabel("relative test-output difference (log scale)")
    ax.set_title("ReLU: after training, mean ± SE over seeds", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax.grid(alpha=0.3, which="both")
    return fig


def _fig_lr(lr_loss, eta_c):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for fac, col in ((0.9, "tab:blue"), (1.1, "tab:red")):
        ax.plot(lr_loss[fac], color=col, label=rf"$\eta$ = {fac} $\eta_{{crit}}$ = {fac * eta_c:.3g}")
    ax.set_yscale("log")
    ax.set_xlabel("gradient-descent step")
    ax.set_ylabel("training loss (MSE / 2, log scale)")
    ax.set_title(r"widest ReLU network: below and above $\eta_{crit} = 2m/\lambda_{max}(\Theta_0)$", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _fig_drift(widths, res, fits):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    w = np.asarray(widths, float)
    for act, col in (("relu", "tab:blue"), ("erf", "tab:purple")):
        m = [res[act][x]["drift"][0] for x in widths]
        ax.errorbar(w, m, yerr=[res[act][x]["drift"][1] for x in widths], fmt="o", color=col, label=act)
        f = fits[(act, "drift")]
        ax.plot(w, f.predict(w), color=col, lw=1, label=f"{act} fit: exponent {f.exponent:.2f} ± {f.stderr:.2f}")
        if act == "relu":
            ax.plot(w, m[0] * (w / w[0]) ** -0.5, "k--", lw=1, label=r"$n^{-1/2}$ (Lee et al. bound)")
            ax.plot(w, m[0] * (w / w[0]) ** -1.0, "k:", lw=1, label=r"$n^{-1}$ (Dyer & Gur-Ari; Geiger et al.)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _width_ticks(ax, w)
    ax.set_xlabel("width n (log scale)")
    ax.set_ylabel(r"$\|\Theta_T - \Theta_0\|_F / \|\Theta_0\|_F$ (log scale)")
    ax.set_title("relative NTK change over training, mean ± SE over seeds", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax.grid(alpha=0.3, which="both")
    return fig
