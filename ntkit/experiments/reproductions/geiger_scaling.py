"""Geiger, Jacot, Spigler, Gabriel, Sagun, d'Ascoli, Biroli, Hongler & Wyart (J. Stat. Mech. 2020),
"Scaling description of generalization with number of parameters in deep learning"; Spigler et al.
(J. Phys. A 2019), "A jamming transition from under- to over-parametrization affects generalization in
deep learning".

Paper's setup
    MNIST parity (even vs odd digit, y = +-1), PCA to d = 10 components and whitened, inputs centred and
    scaled to norm sqrt(d); fully-connected ReLU networks (standard parameterization, orthogonal weights,
    zero biases) of fixed depth and varying width h; the quadratic hinge loss
    L = (1/P) sum_i 1/2 max(0, 1 - y_i f(x_i))^2 minimized to convergence (full batch); N = number of
    weights. A sharp jamming transition at N*(P): below it a finite fraction of the P constraints
    y_i f(x_i) >= 1 stays unsatisfied (N_Delta / N jumps to ~0.1 or more), above it none. The test error
    has a cusp at N*; averaging the output over an ensemble of initializations removes the cusp. For
    N >> N* the output fluctuates over initializations like ||f_N - fbar_N|| ~ N^{-1/4} and the test
    error approaches that of the ensemble like eps_N - epsbar_N ~ N^{-1/2}; N* grows linearly with P
    (N* < c P).

Ours
    The pool is the MNIST test set (``data=`` an MNIST folder or npz: 10 000 images in the full run; the
    quick run uses the 256-image npz shipped with the tests, or scikit-learn's 8x8 digits without
    ``data``), PCA (fitted on the pool) to d = 10, whitened, centred, scaled to norm sqrt(10). Networks
    with 2 hidden ReLU layers of width h (N = 10 h + h^2 + h weights; the paper uses 5 hidden layers,
    fewer here for the 2-core CPU), built by ``ntkit.mlp(2, h, parameterization="standard")`` with
    ``init="orthogonal"`` (W_std^2 = 2, zero trainable biases), trained by full-batch gradient descent
    with momentum 0.9 and learning rate 2 / h (the standard-parameterization NTK grows like h, so this
    keeps the step fixed on the kernel's scale; Adam, whose per-weight normalization takes wide nets out
    of the kernel regime, showed no N^-1/4 decay at our sizes) on the quadratic hinge loss of
    f(w, x) - f(w_0, x) (the output at initialization subtracted, as in Geiger et al.'s lazy-training
    analysis, so that the O(1) random initial function does not mask the fluctuations of the trained
    one) until every constraint is satisfied (loss exactly 0) or the step budget (1 500 quick / 3 000
    full) is spent. All seeds of one
    (P, h) train at once as a batched network. P in {16, 48, 128} (quick) / {64, 128, 256} (full; the
    paper goes to 50 000), 10 seeds per (P, h) (the ensemble), the test error on the rest of the pool
    (at most 2 000 images).

Claims (the quick run checks N* growing with P, the cusp, and the N^-1/4 fluctuations; the full run
also the jump, N* < P and the N^-1/2 excess error, which need converged under-parameterized runs and a
test set of thousands)
    * N*(P) grows with P;
    * jamming: for every P, the mean fraction N_Delta / N of unsatisfied constraints per weight at the
      widest width that does not fit is >= 0.1 while at N* no seed's median leaves constraints (the jump);
    * N* < P for every P (Spigler et al.: N* grows linearly in P, below the number of constraints);
    * the cusp: at the largest P, the single-network test error at N* exceeds the ensemble's by more than
      4 standard errors (seeds), and the ensemble's error at N* is no larger than at the widest net
      below N* plus 4 standard errors (no cusp);
    * for N >= 4 N* at the largest P: the fitted exponents of ||f_N - fbar_N|| (RMS over test points) and
      of eps_N - epsbar_N against N, with standard errors from the seeds, are within 3 standard errors
      (plus 0.1, the pre-asymptotic allowance for the N range available here) of -1/4 and -1/2.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ...kernels import mlp
from ...report import Report, claim
from ..data import load_images
from ._common import fit_power_law

NAME = "geiger-scaling"
TITLE = "Geiger et al. 2020 / Spigler et al. 2019: jamming, the cusp at N* and the N^-1/4, N^-1/2 scaling"

D = 10


def parity_pca_pool(data, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The pool: images -> PCA (fitted on the pool) to d = 10, whitened, centred, norm sqrt(d); labels
    +1 for even digits, -1 for odd. Returns (x (n, 10), y (n,), name), shuffled with ``seed``."""
    images, labels, name = load_images(data)
    x = torch.as_tensor(images.reshape(images.shape[0], -1), dtype=torch.float64)
    x = x - x.mean(0)
    cov = x.T @ x / x.shape[0]
    vals, vecs = torch.linalg.eigh(cov)
    top = vecs[:, -D:].flip(1)
    z = x @ top / vals[-D:].flip(0).clamp_min(1e-12).sqrt()
    z = z - z.mean(0)
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(D)
    y = torch.where(torch.as_tensor(labels) % 2 == 0, 1.0, -1.0).to(torch.float64)
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(z.shape[0]))
    return z[perm], y[perm], name


def n_weights(h: int, depth: int = 2) -> int:
    return D * h + (depth - 1) * h * h + h


def _batched_init(h: int, seeds, depth: int = 2):
    """Weights and biases of ``len(seeds)`` orthogonally initialized standard-parameterization nets, stacked."""
    arch = mlp(depth, h, W_std=math.sqrt(2.0), b_std=0.0, parameterization="standard")
    nets = [arch.init(h, seed=int(s), init="orthogonal", in_features=D) for s in seeds]
    layers = []
    mods = [[m for m in net.modules() if hasattr(m, "weight_scale")] for net in nets]
    for j in range(len(mods[0])):
        if any(mods[i][j].weight_scale != 1.0 for i in range(len(nets))):
            raise AssertionError("standard parameterization has unit weight multipliers")
        w = torch.stack([mods[i][j].weight.detach() for i in range(len(nets))]).clone().requires_grad_(True)
        b = torch.stack([mods[i][j].bias.detach() for i in range(len(nets))]).clone().requires_grad_(True)
        layers.append((w, b))
    return layers


def _forward(layers, x):
    h = x.expand(layers[0][0].shape[0], *x.shape)
    for i, (w, b) in enumerate(layers):
        h = torch.baddbmm(b[:, None, :], h, w.transpose(1, 2))
        if i < len(layers) - 1:
            h = torch.relu(h)
    return h[..., 0]


def train_hinge(layers, x, y, *, steps: int, lr: float, momentum: float = 0.9, f0=None):
    """Full-batch gradient descent with heavy-ball momentum on the quadratic hinge loss of ``f - f0``,
    all seeds at once; stops when every seed fits. Returns the number of unsatisfied constraints per seed."""
    params = [p for wb in layers for p in wb]
    f0 = 0.0 if f0 is None else f0
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    p = x.shape[0]
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        f = _forward(layers, x) - f0
        gap = torch.clamp(1 - y * f, min=0)
        if not bool((gap > 0).any()):
            break
        (0.5 * gap.pow(2).sum() / p).backward()
        opt.step()
    with torch.no_grad():
        f = _forward(layers, x) - f0
        return (y * f < 1).sum(1).numpy()


def run(out=None, *, quick: bool = False, seed: int = 0, data=None, progress: bool = True) -> Report:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..._progress import progress as bar

    t0 = time.perf_counter()
    x_all, y_all, data_name = parity_pca_pool(data, seed)
    n_pool = x_all.shape[0]
    if quick:
        ps, widths, steps = [16, 48, 128], [2, 3, 4, 6, 8, 11, 16, 24, 32, 48, 64], 1500
    else:
        ps, widths, steps = [64, 128, 256], [3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 45, 64, 90, 128], 3000
    n_seeds = 10
    n_test = min(2000, n_pool - max(ps))
    if n_test < 100:
        raise ValueError(f"the pool ({data_name}, {n_pool} images) is too small for P = {max(ps)} and a test set")
    x_te, y_te = x_all[-n_test:], y_all[-n_test:]
    seeds = [seed * 1000 + s for s in range(n_seeds)]
    res: dict = {}
    jobs = [(p, h) for p in ps for h in widths]
    for p, h in bar(jobs, total=len(jobs), desc="geiger-scaling", unit="net", enabled=progress):
        x, y = x_all[:p], y_all[:p]
        layers = _batched_init(h, seeds)
        with torch.no_grad():
            f0, f0_te = _forward(layers, x), _forward(layers, x_te)
        n_delta = train_hinge(layers, x, y, steps=steps, lr=2.0 / h, f0=f0)
        with torch.no_grad():
            f = _forward(layers, x_te) - f0_te  # (S, n_test)
        fbar = f.mean(0)
        err = (torch.sign(f) != y_te).double().mean(1).numpy()
        err_ens = float((torch.sign(fbar) != y_te).double().mean())
        fluct = (f - fbar).pow(2).mean(1).sqrt().numpy()
        res[(p, h)] = {"N": n_weights(h), "n_delta": n_delta, "err": err, "err_ens": err_ens, "fluct": fluct,
                       "fbar_norm": float(fbar.pow(2).mean().sqrt())}
    rep = Report(TITLE, intro=(__doc__ or "").split("\n\n")[0].replace("\n", " "))
    n_arr = np.array([n_weights(h) for h in widths], float)
    nstar, jump = {}, {}
    for p in ps:
        med = np.array([np.median(res[(p, h)]["n_delta"]) for h in widths])
        # N*: the smallest N from which on every wider net fits (median over seeds)
        idx = None
        for i in range(len(widths)):
            if np.all(med[i:] == 0):
                idx = i
                break
        nstar[p] = float(n_arr[idx]) if idx is not None else math.nan
        jump[p] = (float(np.mean(res[(p, widths[idx - 1])]["n_delta"]) / n_arr[idx - 1])
                   if idx is not None and idx > 0 else math.nan)
    # figures: jamming
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for p in ps:
        nd = np.array([np.mean(res[(p, h)]["n_delta"]) for h in widths])
        ax.semilogx(n_arr, nd / n_arr, "o-", ms=3, label=f"P = {p}, N* = {nstar[p]:.0f}")
        if math.isfinite(nstar[p]):
            ax.axvline(nstar[p], color=ax.lines[-1].get_color(), ls=":", lw=1)
    ax.set_xlabel("N (number of weights)")
    ax.set_ylabel(r"$N_\Delta / N$ (unsatisfied constraints per weight)")
    ax.set_title("jamming transition")
    ax.legend(fontsize=8)
    pl = max(ps)
    ax = axes[1]
    for p in ps:
        e = np.array([res[(p, h)]["err"].mean() for h in widths])
        se = np.array([res[(p, h)]["err"].std(ddof=1) / math.sqrt(n_seeds) for h in widths])
        ee = np.array([res[(p, h)]["err_ens"] for h in widths])
        line = ax.errorbar(n_arr / nstar[p], e, yerr=se, fmt="o-", ms=3, label=f"single nets, P = {p}")
        ax.plot(n_arr / nstar[p], ee, "s--", ms=3, color=line[0].get_color(), alpha=0.7,
                label=f"ensemble of {n_seeds}, P = {p}")
    ax.axvline(1.0, color="k", lw=1, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("N / N*")
    ax.set_ylabel("test error")
    ax.set_title(f"cusp at N* and its disappearance ({data_name})")
    ax.legend(fontsize=7)
    ax = axes[2]
    big = [h for h in widths if n_weights(h) >= 4 * nstar[pl]] if math.isfinite(nstar[pl]) else []
    fits = {}
    if len(big) >= 3:
        nb = np.array([n_weights(h) for h in big], float)
        fl = np.array([res[(pl, h)]["fluct"].mean() for h in big])
        fl_se = np.array([res[(pl, h)]["fluct"].std(ddof=1) / math.sqrt(n_seeds) for h in big])
        de = np.array([res[(pl, h)]["err"].mean() - res[(pl, h)]["err_ens"] for h in big])
        de_se = np.array([res[(pl, h)]["err"].std(ddof=1) / math.sqrt(n_seeds) for h in big])
        fits["fluct"] = fit_power_law(nb, fl, fl_se)
        ax.errorbar(nb, fl, yerr=fl_se, fmt="o", label=r"$\|f_N - \bar f_N\|$: exponent "
                    f"{fits['fluct'].exponent:.2f} ± {fits['fluct'].stderr:.2f}")
        ax.loglog(nb, fits["fluct"].predict(nb), "-", color="C0")
        ax.loglog(nb, fl[0] * (nb / nb[0]) ** -0.25, "k:", label=r"$N^{-1/4}$")
        if np.all(de > 0):
            fits["err"] = fit_power_law(nb, de, de_se)
            ax.errorbar(nb, de, yerr=de_se, fmt="s", color="C3", label=r"$\epsilon_N - \bar\epsilon_N$: exponent "
                        f"{fits['err'].exponent:.2f} ± {fits['err'].stderr:.2f}")
            ax.loglog(nb, fits["err"].predict(nb), "-", color="C3")
            ax.loglog(nb, de[0] * (nb / nb[0]) ** -0.5, "k--", label=r"$N^{-1/2}$")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N (number of weights)")
    ax.set_ylabel("fluctuation / excess error")
    ax.set_title(f"N >= 4 N*, P = {pl}")
    ax.legend(fontsize=7)
    rep.section("Jamming, the cusp and the scaling beyond it",
                f"Pool: {data_name} ({n_pool} images; test set: {n_test}). {n_seeds} seeds per (P, N); "
                f"2 hidden ReLU layers, widths {widths}.")
    rep.figure(fig, "geiger_scaling", "Left: unsatisfied constraints per weight against N. Middle: test error of "
               "single networks (mean over seeds, error bars: SE) and of the ensemble-averaged output against "
               "N / N*. Right: output fluctuations and excess test error for N >= 4 N*.")
    rep.table([{"P": p, "N*": nstar[p], "N*/P": nstar[p] / p, "N_Delta/N below N*": jump[p]} for p in ps],
              caption="Jamming transition", fmt="{:.4g}")
    rep.add_claim(claim(f"N* grows with P (N*(P = {pl}) / N*(P = {min(ps)}))", nstar[pl] / nstar[min(ps)],
                        [1.01, math.inf]))
    if not quick:  # these need converged under-parameterized runs and a large test set: full size only
        for p in ps:
            rep.add_claim(claim(f"P = {p}: jump of N_Delta / N just below N* (>= 0.1)", jump[p], [0.1, math.inf],
                                nstar=nstar[p]))
        rep.add_claim(claim("N* < P for every P (max N*/P)", max(nstar[p] / p for p in ps), [0.0, 1.0]))
    # the cusp at the largest P
    if math.isfinite(nstar[pl]):
        hs = widths[[n_weights(h) for h in widths].index(int(nstar[pl]))]
        r = res[(pl, hs)]
        se_s = float(r["err"].std(ddof=1) / math.sqrt(n_seeds))
        rep.add_claim(claim(f"P = {pl}: at N* single nets err more than the ensemble (difference in SE)",
                            (r["err"].mean() - r["err_ens"]) / max(se_s, 1e-12), [4.0, math.inf],
                            err=float(r["err"].mean()), err_ensemble=r["err_ens"]))
        i = widths.index(hs)
        if i > 0:
            below = res[(pl, widths[i - 1])]
            se_b = float(below["err"].std(ddof=1) / math.sqrt(n_seeds))
            rep.add_claim(claim(f"P = {pl}: no cusp for the ensemble (err_ens(N*) - err_ens(below N*), in SE)",
                                (r["err_ens"] - below["err_ens"]) / max(se_b, 1e-12), [-math.inf, 4.0]))
    scal = [("fluct", -0.25, "||f_N - fbar_N|| ~ N^-1/4")] + ([] if quick else [("err", -0.5, "eps_N - epsbar_N ~ N^-1/2")])
    for key, target, text in scal:
        f = fits.get(key)
        if f is None:
            rep.add_claim(claim(f"P = {pl}: {text} (fit needs >= 3 widths with N >= 4 N* and a positive excess)",
                                math.nan, [target - 0.1, target + 0.1]))
            continue
        tol = 3 * f.stderr + 0.1
        rep.add_claim(claim(f"P = {pl}, N >= 4 N*: {text} (fitted exponent)", f.exponent, [target - tol, target + tol],
                            stderr=f.stderr))
    rep.update({"quick": quick, "seed": seed, "data": data_name, "n_pool": n_pool, "n_test": n_test, "P": ps,
                "widths": widths, "N": n_arr, "steps": steps, "seeds": n_seeds, "N_star": {str(p): nstar[p] for p in ps},
                "jump": {str(p): jump[p] for p in ps},
                "runs": [{"P": p, "h": h, **{k: v for k, v in res[(p, h)].items()}} for p, h in jobs],
                "exponents": {k: {"exponent": f.exponent, "stderr": f.stderr} for k, f in fits.items()},
                "wall_time_s": time.perf_counter() - t0})
    if out is not None:
        rep.save(Path(out))
    return rep
