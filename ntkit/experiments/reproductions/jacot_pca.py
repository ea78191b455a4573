"""Jacot, Gabriel & Hongler (2018), Fig. 3: kernel principal components of MNIST under the NTK, and the decay
of the training residual along one of them.

Paper's setup
-------------
512 MNIST digits (pixels in [0, 1]), the NTK of a ReLU network with beta = 0.1 ("depth 4"), computed from a
width-10 000 network; the eigenvalues of the non-centred Gram matrix divided by 512 are lambda1 = 0.0457,
lambda2 = 0.00108, lambda3 = 0.00078 (Sec. 6), and the batch in the plane of the 2nd and 3rd components
shows the digits (Fig. 3a).
Trained on a target along the second component with ||f*|| = 0.5, the residual's component g_t along it
decays as ||g_t|| = 0.5 exp(-lambda2 t) (Sec. 5, gradient flow of the cost (1/2N) sum (f - y)^2, time in
units where df/dt = -(1/N) Theta (f - y)), more closely at widths 100, 1000, 10 000 (Fig. 3b).

Conventions, and which reproduces their numbers
-----------------------------------------------
Jacot's Eq. (1) is ``alpha^{l+1} = W alpha^l / sqrt(n_l) + beta b`` with W, b ~ N(0, 1): weight variance 1,
not 2, and the input kernel x.x' / n0 with raw pixels (not inputs on the sphere of radius sqrt(n0)). That is
exactly ntkit's NTK parameterization with ``W_std = 1, b_std = 0.1`` and its x.x'/d input convention, so no
rescaling is needed. With **4 hidden layers** (5 weight matrices) the eigenvalues of Gram / 512 of random batches
of the MNIST test file come out at 0.0462, 0.00119, 0.00090 (batch-to-batch sd 0.0004, 0.00013, 0.00004); with 3
hidden layers lambda2 and lambda3 are ~1.6x the paper's: its "depth 4" counts hidden layers. He-style
W_std = sqrt(2) gives 0.52, 0.026, 0.022; inputs normalised to the unit sphere give 0.035, 8e-5, 5e-5 -- neither
matches. The batch must be random: the test file's first 5000 images (another population of writers, mean pixel
0.122 against 0.143) give lambda1 = 0.0445, the second 5000 0.0478.

Ours
----
``ntkit.mlp(4, activation="relu", W_std=1, b_std=0.1)``, exact (infinite-width) NTK of a random batch of N = 512
images of the given MNIST file (the test set here; the paper's batch is not specified, likely training digits),
eigenvalues of Gram / N. Batch-to-batch spread: the same eigenvalues over K random batches of N images (finite-
population corrected; bootstrap resamples of the batch when the file holds fewer than 2N images); we compare
their mean with the paper's single batch. The paper's eigenvalues come from one width-10 000 network; their
network-to-network spread is measured over ``fw_seeds`` networks at the widths ``fw_widths`` (where it falls like
width^-1/2) and scaled from the largest to 10 000. Residual dynamics: target y = 0.5 sqrt(N) v2
(v2 the second eigenvector of the exact Gram), networks trained by full-batch GD (learning rate 1 / lambda1,
t = steps x learning rate) on the centred output f - f_0 (target y + f_0(x), so that the residual starts as
y exactly, as in the paper's figure), 2 seeds per width. Widths 100, 300, 1000 (the paper's 10 000 costs
~100x a width-1000 network per step on this 2-core CPU). Without ``data`` the scikit-learn 8x8 digits are used
and the claims about the paper's eigenvalues are skipped (they are MNIST's). ``--quick``: the 256 images of
the test file, widths 64 and 256.

Claims (each can fail)
----------------------
* (MNIST only) lambda1, lambda2, lambda3 of Gram / N match the paper's within 3 standard deviations of the
  difference (the paper's one batch and one width-10 000 network, our mean over K batches);
* the deviation of |g_t| from 0.5 exp(-lambda2 t) over training is smaller at the largest width than at the
  smallest (difference of the seed means > 3 standard errors);
* at the largest width, lambda2 of the networks' own NTK at initialization is the exact lambda2 within 3
  finite-width standard errors (spread measured at width ``w_fw``, scaled like width^-1/2).
The fitted decay rates of |g_t| are reported next to lambda2 (faster at these widths: reaching 0.5 along a
direction of small eigenvalue moves the parameters by 0.5 / sqrt(lambda2), so the kernel moves by
O(1 / sqrt(n lambda2)); the paper's width 10 000 is needed to be lazy along it).
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
from ..data import load_images
from ._common import pyplot, train_ensemble_full_batch

NAME = "jacot-pca"
TITLE = "Jacot et al. 2018, Fig. 3: NTK principal components of MNIST and the decay along the second one"

PAPER = {"lambda": [0.0457, 0.00108, 0.00078], "n": 512, "width": 10000, "widths_fig3b": [100, 1000, 10000]}


def _config(quick: bool) -> dict:
    if quick:
        return dict(n=256, widths=[64, 256], seeds=2, t_max_lambda2=2.5, n_sets=6, fw_widths=[64, 128], fw_seeds=6)
    return dict(n=512, widths=[100, 300, 1000], seeds=2, t_max_lambda2=2.5, n_sets=10, fw_widths=[250, 1000],
                fw_seeds=10)


def _top3(k: torch.Tensor) -> np.ndarray:
    return torch.linalg.eigvalsh(k / k.shape[0]).flip(0)[:3].numpy()


def run(out: str | os.PathLike | None = None, *, quick: bool = False, seed: int = 0, data=None,
        progress: bool = True) -> Report:
    """Run the reproduction; returns the Report (saved to ``out`` when given).

    ``data``: an MNIST folder or .npz (:func:`ntkit.experiments.data.load_mnist`); default: scikit-learn's digits
    (then the comparison with the paper's eigenvalues is skipped).
    """
    cfg = _config(quick)
    n = cfg["n"]
    images, labels, source = load_images(data)
    pool = torch.tensor(images.reshape(len(images), -1), dtype=torch.float64)
    if pool.shape[0] < n:
        raise ValueError(f"jacot-pca needs at least {n} images, the data holds {pool.shape[0]}")
    gen = torch.Generator().manual_seed(int(seed))
    n_pool = pool.shape[0]
    # the paper's "batch of N = 512 digits": a random batch of the whole file (the MNIST test file's first and
    # second halves come from different writers, with mean pixel 0.122 and 0.143, and lambda1 differs by 7 %
    # between them: a batch of the first N images is not a random batch)
    idx0 = torch.randperm(n_pool, generator=gen)[:n] if n_pool >= 2 * n else torch.arange(n)
    x, lab = pool[idx0], np.asarray(labels)[idx0.numpy()]
    arch = mlp(4, activation="relu", W_std=1.0, b_std=0.1)
    k = arch.kernel(x, get="ntk")
    lam_all, vec = torch.linalg.eigh(k / n)
    lam_all, vec = lam_all.flip(0), vec.flip(1)
    lam = lam_all[:3].numpy()
    lam3h = _top3(mlp(3, activation="relu", W_std=1.0, b_std=0.1).kernel(x, get="ntk"))

    # batch-to-batch spread: further random batches of n images (finite-population corrected), else bootstrap
    # resamples of the batch; ours is the mean over the K batches, the paper's one batch
    sets = [lam]
    if n_pool >= 2 * n:
        for _ in range(cfg["n_sets"] - 1):
            sets.append(_top3(arch.kernel(pool[torch.randperm(n_pool, generator=gen)[:n]], get="ntk")))
        sd_samp = np.std(np.array(sets), axis=0, ddof=1) / math.sqrt(1.0 - n / n_pool)
        lam_est, k_eff = np.mean(np.array(sets), axis=0), len(sets)
        spread_kind = f"{len(sets)} random batches of {n} of the {n_pool} images"
    else:
        boot = []
        for _ in range(cfg["n_sets"]):
            idx = torch.randint(0, n, (n,), generator=gen)
            boot.append(_top3(k[idx][:, idx]))
        sd_samp = np.std(np.array(boot), axis=0, ddof=1)
        lam_est, k_eff = lam, 1
        spread_kind = f"{cfg['n_sets']} bootstrap resamples of the batch"

    # finite-width spread of one network's eigenvalues (the paper's come from one width-10 000 network):
    # measured over fw_seeds networks at each width of fw_widths, scaled from the largest like width^-1/2
    fw = {}
    for wf in cfg["fw_widths"]:
        fw[wf] = np.array([_top3(empirical_ntk(arch.init(wf, seed=5000 + s, in_features=x.shape[1],
                                                         dtype=torch.float32), x.float()).double())
                           for s in range(cfg["fw_seeds"])])
    w_fw = cfg["fw_widths"][-1]
    sd_fw_at = {wf: np.std(v, axis=0, ddof=1) for wf, v in fw.items()}
    sd_fw = sd_fw_at[w_fw] * math.sqrt(w_fw / PAPER["width"])
    w_a = cfg["fw_widths"][0]
    fw_exponent = (float(np.log(sd_fw_at[w_fw][0] / sd_fw_at[w_a][0]) / np.log(w_fw / w_a))
                   if w_a != w_fw else float("nan"))

    # residual along the second component
    v2 = vec[:, 1]
    y = (0.5 * math.sqrt(n) * v2)[:, None]
    lr = 1.0 / float(lam[0])
    steps = int(math.ceil(cfg["t_max_lambda2"] / (float(lam[1]) * lr)))
    rec = list(range(0, steps + 1, max(1, steps // 40)))
    traj, lam2_net = {}, {}
    for w in _progress(cfg["widths"], total=len(cfg["widths"]), desc=NAME, unit="width", enabled=progress):
        nets = [arch.init(w, seed=1000 * int(seed) + s, in_features=x.shape[1], dtype=torch.float32)
                for s in range(cfg["seeds"])]
        xf = x.float()
        with torch.no_grad():
            f0 = torch.stack([net(xf) for net in nets])  # (S, n, 1)
        lam2_net[w] = [float(_top3(empirical_ntk(net, xf).double())[1]) for net in nets]
        h = train_ensemble_full_batch(nets, xf, y.float() + f0, learning_rate=lr, steps=steps, record=rec)
        g = np.array([[float(((y.float()[None] + f0 - f)[s, :, 0].double() @ v2) / math.sqrt(n))
                       for s in range(cfg["seeds"])] for f in h["f_train"]])  # (T, S)
        traj[w] = np.abs(g)
        del nets
    t = np.array(rec, float) * lr
    theory = 0.5 * np.exp(-float(lam[1]) * t)
    dev = {w: np.max(np.abs(traj[w] - theory[:, None]), axis=0) for w in cfg["widths"]}  # (S,) per width
    rates = {w: np.array([-np.polyfit(t, np.log(traj[w][:, s]), 1)[0] for s in range(cfg["seeds"])])
             for w in cfg["widths"]}

    rep = Report(TITLE, intro=(
        f"Exact NTK of a ReLU network with 4 hidden layers (W_std = 1, beta = 0.1, Jacot's parameterization) on "
        f"a random batch of {n} {source} images; eigenvalues of Gram / {n}; residual along the second component for "
        f"networks of widths {cfg['widths']} ({cfg['seeds']} seeds), learning rate 1/lambda1 = {lr:.3g}, "
        f"{steps} steps (t = {steps * lr:.4g} = {cfg['t_max_lambda2']} / lambda2)."))
    # the paper's value is one batch and one network: its spread is sd_samp (batch) and sd_fw (width-10 000
    # network); ours is a mean over k_eff batches of the exact kernel
    comb = np.sqrt(sd_samp**2 * (1.0 + 1.0 / k_eff) + sd_fw**2)
    if source == "MNIST":
        for i in range(3):
            p = PAPER["lambda"][i]
            rep.add_claim(claim(f"lambda{i + 1} of Gram/N matches the paper's {p} (+-3 sd of the difference: batch "
                                f"{sd_samp[i]:.2g}, width-10 000 network {sd_fw[i]:.2g}, ours a mean over {k_eff})",
                                float(lam_est[i]), [p - 3 * comb[i], p + 3 * comb[i]], paper=p,
                                sd_sampling=float(sd_samp[i]), sd_width_10000=float(sd_fw[i]), batches=k_eff))
    w0, w1 = cfg["widths"][0], cfg["widths"][-1]
    s = cfg["seeds"]
    d0, d1 = float(dev[w0].mean()), float(dev[w1].mean())
    se_d = math.hypot(np.std(dev[w0], ddof=1), np.std(dev[w1], ddof=1)) / math.sqrt(s)
    rep.add_claim(claim(f"max_t | |g_t| - 0.5 exp(-lambda2 t) | is smaller at width {w1} than at {w0} "
                        "(difference of seed means; holds if > 3 s.e.)", d0 - d1, [3 * se_d, math.inf],
                        stderr=se_d, deviation={str(w0): d0, str(w1): d1}))
    # at initialization the networks' own lambda2 is the exact one, up to the finite-width spread
    sd_w1 = float(sd_fw_at[w_fw][1]) * math.sqrt(w_fw / w1)
    l2n = float(np.mean(lam2_net[w1]))
    tol = 3 * sd_w1 / math.sqrt(s)
    rep.add_claim(claim(f"width {w1}: lambda2 of the networks' initial NTK equals the exact lambda2 = {lam[1]:.4g} "
                        "(seed mean, +-3 sd / sqrt(S), sd of the width-w_fw networks scaled to this width)", l2n,
                        [float(lam[1]) - tol, float(lam[1]) + tol], lambda2=float(lam[1])))
    rep.text(f"Fitted decay rates of |g_t| (log-linear over the run): " + ", ".join(
        f"width {w}: {float(rates[w].mean()):.4g}" for w in cfg["widths"]) + f"; theory lambda2 = {lam[1]:.4g}. The deviation from 0.5 exp(-lambda2 t) shrinks with width (claim), but "
        "after t ~ 1/(3 lambda2) the decay stays faster than lambda2 at these widths: fitting 0.5 along a direction "
        "of eigenvalue lambda2 moves the parameters by ||dtheta|| = 0.5 / sqrt(lambda2) (~15 here, minimum-norm "
        "solution of the linearized model), so the kernel changes by O(15 / sqrt(n)) and grows along the target; "
        "the lazy regime needs n >> 1 / lambda2 ~ 1000 (the paper's largest width is 10 000).")

    rep.section("Eigenvalues of Gram / N")
    rows = [{"": "paper (one batch, width-10 000 network)", "lambda1": PAPER["lambda"][0],
             "lambda2": PAPER["lambda"][1], "lambda3": PAPER["lambda"][2]},
            {"": f"ours, exact NTK, mean over {k_eff} batch(es)", "lambda1": lam_est[0], "lambda2": lam_est[1],
             "lambda3": lam_est[2]},
            {"": "ours, exact NTK, the batch below", "lambda1": lam[0], "lambda2": lam[1], "lambda3": lam[2]},
            {"": f"batch-to-batch sd ({spread_kind})", "lambda1": sd_samp[0], "lambda2": sd_samp[1],
             "lambda3": sd_samp[2]}]
    rows += [{"": f"network-to-network sd, width {wf} ({cfg['fw_seeds']} networks)", "lambda1": v[0],
              "lambda2": v[1], "lambda3": v[2]} for wf, v in sd_fw_at.items()]
    rows += [{"": f"width-10 000 sd (width-{w_fw} sd x sqrt({w_fw} / 10 000))", "lambda1": sd_fw[0],
              "lambda2": sd_fw[1], "lambda3": sd_fw[2]},
             {"": "exact NTK, 3 hidden layers", "lambda1": lam3h[0], "lambda2": lam3h[1], "lambda3": lam3h[2]}]
    rep.table(rows, caption=f"Top eigenvalues of the non-centred NTK Gram matrix / {n} ({source}). The network-"
                            f"to-network sd of lambda1 falls like width^{fw_exponent:.2f} between widths "
                            f"{cfg['fw_widths'][0]} and {w_fw} (width^-1/2 expected).")
    rep.figure(_fig_pca(vec, lam_all, lab, n), "fig3a_pca",
               "The batch in the plane of the 2nd and 3rd NTK principal components (sqrt(N) v_i), by digit, as in "
               "the paper's Fig. 3a (the 1st, non-centred, component is nearly constant).")
    rep.section("Residual along the second component")
    rep.figure(_fig_decay(t, traj, theory, lam), "fig3b_decay",
               "|g_t|, the residual's component along the second principal component, for each width (two seeds), "
               "and 0.5 exp(-lambda2 t) (black, log scale).")
    rep.table([{"width": w, "max deviation": float(dev[w].mean()), "fitted rate": float(rates[w].mean()),
                "lambda2 of the nets' Theta_0": float(np.mean(lam2_net[w]))} for w in cfg["widths"]],
              caption=f"Per width (mean over seeds); exact lambda2 = {lam[1]:.5g}.")
    rep.update(config=cfg, data=source, lambdas=lam_all[:10].numpy(), lambdas_mean_batches=lam_est,
               lambdas_batches=np.array(sets) if k_eff > 1 else lam[None], lambdas_3_hidden=lam3h, paper=PAPER,
               sd_sampling=sd_samp, sd_width_10000=sd_fw, batch_indices=idx0.numpy(),
               sd_networks={str(wf): v for wf, v in sd_fw_at.items()}, fw_exponent=fw_exponent, learning_rate=lr, steps=steps, t=t,
               g={str(w): traj[w] for w in cfg["widths"]}, rates={str(w): rates[w] for w in cfg["widths"]},
               lambda2_networks={str(w): v for w, v in lam2_net.items()})
    if out is not None:
        rep.save(out)
    return rep


def _fig_pca(vec, lam, lab, n):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    p2, p3 = (vec[:, 1] * math.sqrt(n)).numpy(), (vec[:, 2] * math.sqrt(n)).numpy()
    sc = ax.scatter(p2, p3, c=lab, cmap="tab10", s=14, vmin=-0.5, vmax=9.5, alpha=0.85)
    fig.colorbar(sc, ax=ax, ticks=range(10), label="digit")
    ax.set_xlabel(f"PC 2 (lambda2 = {float(lam[1]):.3g})")
    ax.set_ylabel(f"PC 3 (lambda3 = {float(lam[2]):.3g})")
    ax.set_title("NTK kernel PCA of the batch (paper's Fig. 3a)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _fig_decay(t, traj, theory, lam):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    cols = ("tab:green", "tab:orange", "tab:red", "tab:purple")
    for (w, g), col in zip(traj.items(), cols):
        for s in range(g.shape[1]):
            ax.plot(t, g[:, s], color=col, lw=1, alpha=0.8, label=f"n = {w}" if s == 0 else None)
    ax.plot(t, theory, "k--", lw=1.5, label=f"0.5 exp(-lambda2 t), lambda2 = {float(lam[1]):.3g}")
    ax.set_yscale("log")
    ax.set_xlabel("t (steps x learning rate)")
    ax.set_ylabel("|g_t|")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return fig
