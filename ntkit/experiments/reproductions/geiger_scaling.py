"""Geiger, Jacot, Spigler, Gabriel, Sagun, d'Ascoli, Biroli, Hongler & Wyart (J. Stat. Mech. 2020),
"Scaling description of generalization with number of parameters in deep learning"; Spigler et al.
(J. Phys. A 2019), "A jamming transition from under- to over-parametrization affects generalization in
deep learning".

Paper's setup
    MNIST parity (even vs odd digit, y = +-1), PCA to d = 10 components and whitened, inputs centred and
    scaled to norm sqrt(d); fully-connected ReLU networks (standard parameterization, orthogonal weights,
    zero biases at initialization) of fixed depth (5 hidden layers in most figures) and varying width h;
    the quadratic hinge loss L = (1/P) sum_mu 1/2 max(0, Delta_mu)^2, Delta_mu = 1 - y_mu f(x_mu),
    minimized full-batch until every constraint is satisfied (Delta_mu <= 0 for all mu) or a step limit
    (the authors' public code: Adam, learning rate 1e-4 halved every 10^5 steps down to 1e-6, float64, up
    to ~10^6 steps); N = number of weights. A sharp jamming transition at N*(P): below it a finite fraction
    of the P constraints stays unsatisfied (N_Delta / N jumps to O(0.1-1)), above it none; a stable jammed
    minimum has N_Delta >= C0 N unsatisfied constraints, so N* <= P / C0. The test error has a cusp at N*;
    averaging the output over an ensemble of initializations removes the cusp. For N >> N* the output
    fluctuates over initializations like ||f_N - fbar_N|| ~ N^{-1/4} (the NTK's fluctuations) and the test
    error approaches that of the ensemble like eps_N - epsbar_N ~ N^{-1/2}. P up to tens of thousands.

Ours (scaled to a shared 2-core CPU)
    The pool is the MNIST test set (``data=`` an MNIST folder or npz: 10 000 images in the full run; the
    quick run uses the 256-image npz shipped with the tests), PCA (fitted on the pool) to d = 10, whitened,
    centred, norm sqrt(10); the test set is every pool image not used for training (9 488 in the full run).
    Networks with 2 hidden ReLU layers of width h (N = 10 h + h^2 + h; around our N* ~ 90-140, nets with 5
    hidden layers would be 3-5 units wide), ``ntkit.mlp(2, h, parameterization="standard")`` with
    ``init="orthogonal"`` (W_std^2 = 2, zero biases), float32. Each seed is trained by full-batch Adam (Kingma & Ba; as the authors) on the
    quadratic hinge loss of f(w, x) - f(w_0, x) (the output at initialization subtracted, as in Geiger et
    al.'s lazy-training analysis, so that the O(1) random initial function does not mask the fluctuations
    of the trained one) with margin 1 + 10^-3 in the loss: with margin exactly 1 the last constraints
    approach Delta = 0 from above only exponentially and cross it by float rounding; the stopping test is
    the exact criterion Delta_mu <= 0 for all mu, checked at every step, and a net stops at the first step
    at which it holds ("satisfied"). The learning rate is 10^-3 min(1, 16 / h): Adam moves every weight by
    ~lr per step whatever the width, so with a fixed rate the wide nets' weights move by O(1) relative to
    their 1/sqrt(h) scale, they leave the lazy regime and ||f - fbar|| flattens (measured: local exponent
    -0.17 instead of -0.25 between h = 64 and 128); with lr ~ 1/h every width trains in ~2 000 steps. The
    rate of a net is halved whenever its loss falls by less than 5 % in 200 steps; after more than 4
    halvings with constraints left the net is "stalled" (a jammed minimum); at its step cap it is
    "budget" (not converged: never counted as satisfied). The cap is 20 000 steps for the narrow nets
    (h <= 24, the widths around N*) and 4 000 for the wide ones (2 000 for all in the quick run): just
    above N* the dynamics slows down critically, and with a 4 000-step cap for every width most nets near
    N* at P = 512 were cut off with a few constraints left, which smeared the jump and shifted N* up; the
    narrow nets are cheap (their steps cost mostly overhead) and a converged net leaves the batched stack,
    so only the slow ones pay. With 20 000 steps (the authors allow up to ~10^6) every net near N* ends
    satisfied or stalled. N* is where the fraction of satisfied seeds crosses 1/2 (interpolated on log
    N). P in {128, 256, 512} (quick: {32, 64, 128}), 10 seeds per (P, h) (the ensemble; the same 10
    initializations at every P) and 80 for the narrow widths in the full run (their single-net errors carry
    the cusp, a rise of ~0.02 in test error against a seed-to-seed spread of ~0.04, which 20 seeds measured at
    only 2 standard errors; the ensembles average the first 10 everywhere); widths 2 to 64 at every P and up to 128 at
    P = 256 (quick: 2 to 64), where the N >> N* fits are made. All nets of a width (every P, every seed)
    train as one stack of batched matrix products.
    Fluctuations: ||f_N - fbar_N|| is the root mean square over seeds and test points of f_s - fbar, with
    the mean square scaled by S / (S - 1) (unbiased for the infinite ensemble); ||fbar_N|| is debiased
    the same way (||fbar||^2 over S seeds exceeds ||E f||^2 by the variance / S). The N^-1/4 claim is on
    the ratio ||f_N - fbar_N|| / ||fbar_N||: the hinge loss fixes the margin, not the output's scale, and
    the scale of the trained function still carries the tail of its divergence at N* (||fbar_N|| falls
    by 18 % between N = 1376 and 17 792, 13 N* to 170 N*, at P = 256), which multiplies mean and
    fluctuations alike and steepens the raw ||f_N - fbar_N|| (full run: -0.32 +- 0.01, the ratio -0.23 +-
    0.01); Geiger et al.'s argument (the output's fluctuations come from the NTK's, delta Theta / Theta ~
    N^-1/4) is about the relative fluctuation, and both coincide once ||fbar_N|| has converged. The raw
    exponent is reported too.
    Standard errors: over seeds for single-net means; jackknife over seeds (each seed left out, the
    ensemble recomputed) for the ensemble error, the fluctuations and eps - epsbar; the exponents' from the
    weighted least-squares fit.

Claims (the quick run checks N* growing with P, the jump and the N^-1/4 fluctuations)
    * N*(P) grows with P (N*(512) / N*(128) > 1);
    * the jump: for every P, the median over seeds of N_Delta / N at the widest grid N below N* is >= 0.1
      (the issue's threshold; Spigler et al. find O(0.1-1));
    * N* < P for every P (a stricter form of N* <= P / C0);
    * the cusp, at P = 256, as Spigler et al.'s three phases (the error decays, rises to a cusp at N*,
      decays again): the single-net test error at its peak in [N*/2, 2 N*] exceeds both its minimum over
      the grid below the peak and below N*, and the error at the smallest grid N >= 4 N*, by >= 3
      standard errors each. The peak and the minimum are picked on the even-numbered seeds and the errors
      compared on the odd-numbered ones, so that picking the largest and the smallest of several noisy
      means does not inflate the rise (the right reference, not picked, uses every seed). With P <= 512
      the minimum of the first phase lies between N*/2 and N* (at P = 256: N = 60, N* = 105), not below
      N*/3 as a fixed reference would assume. The ensemble's error at the peak is no more than 3 jackknife SE above its
      error at the minimum (no cusp), and single nets err more than the ensemble there by >= 3 SE;
    * P = 256, N >= 10 N*: the fitted exponents of ||f_N - fbar_N|| / ||fbar_N|| and of eps_N - epsbar_N
      are within 3 standard errors of -1/4 and -1/2 (no allowance for pre-asymptotic curvature).
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
SATISFIED, STALLED, BUDGET = "satisfied", "stalled", "budget"
#: Adam learning rate LR * min(1, LR_WIDTH / h) for width h (see the module docstring)
LR, LR_WIDTH = 1e-3, 16
#: step cap of the narrow nets (the widths around N*, cheap to train; the wide nets keep ``max_steps``)
MAX_STEPS_NARROW = 20000
#: seeds of the narrow nets in the full run (their single-net test errors carry the cusp); ensembles use 10
N_SEEDS_NARROW = 80


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
    """Outputs (S, n) of the stacked nets on ``x``: (n, d) shared by all, or (S, n, d) one set per net."""
    h = x.expand(layers[0][0].shape[0], *x.shape) if x.dim() == 2 else x
    for i, (w, b) in enumerate(layers):
        h = torch.baddbmm(b[:, None, :], h, w.transpose(1, 2))
        if i < len(layers) - 1:
            h = torch.relu(h)
    return h[..., 0]


def train_hinge(layers, x, y, *, f0, mask=None, lr: float = 1e-3, max_steps: int = 4000, window: int = 200,
                rel_drop: float = 0.05, decay: float = 0.5, n_decays: int = 4, slack: float = 1e-3) -> dict:
    """Full-batch Adam on the quadratic hinge loss of ``f - f0``, every net of the stack at once.

    Each net s minimizes L_s = (1 / P_s) sum_mu 1/2 max(0, 1 + slack - y_mu (f_s - f0_s)(x_mu))^2 over
    its own P_s points and stops on its own: *satisfied* at the first step at which every constraint
    holds, Delta_mu = 1 - y_mu (f_s - f0_s)(x_mu) <= 0 for all mu (Spigler et al.'s criterion, checked
    on the weights themselves, not as a loss threshold; the loss's margin 1 + slack makes the constraints
    cross Delta = 0 in finite time instead of approaching it from above only exponentially); *stalled*
    when its learning rate, halved whenever its loss fell by less than ``rel_drop`` over ``window``
    steps, has been halved more than ``n_decays`` times with constraints left (a jammed minimum);
    *budget* when ``max_steps`` ran out first (not converged; never counted as satisfied). A stopped
    net leaves the batch, so its weights stay exactly where it stopped.

    Parameters
    ----------
    layers : list of (W (S, out, in), b (S, out))
        Stacked weights, updated in place.
    x : Tensor (P, d) shared, or (S, P, d) per net (padded; see ``mask``)
    y : Tensor (P,) or (S, P), labels +-1
    f0 : Tensor (S, P)
        Outputs at initialization, subtracted.
    mask : Tensor (S, P), optional
        1 for a net's own points, 0 for padding.

    Returns
    -------
    dict with ``n_delta`` (S,) unsatisfied constraints at the end, ``status`` (list of "satisfied",
    "stalled", "budget"), ``steps`` (S,) and ``loss`` (S,) at the end.
    """
    store = [t for wb in layers for t in wb]
    n_nets = store[0].shape[0]
    x = x.expand(n_nets, *x.shape) if x.dim() == 2 else x
    y = y.expand(n_nets, *y.shape) if y.dim() == 1 else y
    mask = torch.ones_like(y) if mask is None else mask.to(y.dtype)
    p_count = mask.sum(1)
    n_delta = np.zeros(n_nets, int)
    status = [BUDGET] * n_nets
    steps_done = np.full(n_nets, max_steps)
    final_loss = np.zeros(n_nets)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    act = torch.arange(n_nets)
    cur = [t.detach().clone().requires_grad_(True) for t in store]
    xa, ya, ma, pa, f0a = x, y, mask, p_count, f0
    m = [torch.zeros_like(t) for t in cur]
    v = [torch.zeros_like(t) for t in cur]
    lr_s = torch.full((n_nets,), float(lr), dtype=store[0].dtype)
    halvings = torch.zeros(n_nets, dtype=torch.long)
    ref = torch.full((n_nets,), math.inf, dtype=torch.float64)
    win_min = torch.full((n_nets,), math.inf, dtype=torch.float64)

    def _loss(params):
        f = _forward([(params[2 * i], params[2 * i + 1]) for i in range(len(params) // 2)], xa) - f0a
        margin = ya * f
        nd = ((margin < 1) & (ma > 0)).sum(1)
        return 0.5 * (torch.clamp(1 + slack - margin, min=0).pow(2) * ma).sum(1) / pa, nd

    for step in range(max_steps + 1):
        loss, nd = _loss(cur)
        ld = loss.detach().double()
        win_min = torch.minimum(win_min, ld)
        done = nd == 0
        if step > 0 and step % window == 0:
            slow = win_min > (1 - rel_drop) * ref
            lr_s = torch.where(slow, lr_s * decay, lr_s)
            halvings = halvings + slow.long()
            ref = torch.where(slow, torch.minimum(ref, win_min), win_min)
            win_min = torch.full_like(win_min, math.inf)
        stalled = (halvings > n_decays) & ~done
        stop = done | stalled | torch.full_like(done, step == max_steps)
        if bool(stop.any()):
            for j in torch.nonzero(stop).flatten().tolist():
                s = int(act[j])
                n_delta[s] = int(nd[j])
                status[s] = SATISFIED if bool(done[j]) else (STALLED if bool(stalled[j]) else BUDGET)
                steps_done[s] = step
                final_loss[s] = float(ld[j])
                for t, c in zip(store, cur):
                    t.data[s] = c.detach()[j]
            keep = ~stop
            if not bool(keep.any()):
                break
            act = act[keep]
            cur = [c.detach()[keep].clone().requires_grad_(True) for c in cur]
            m, v = [t[keep] for t in m], [t[keep] for t in v]
            lr_s, halvings, ref, win_min = lr_s[keep], halvings[keep], ref[keep], win_min[keep]
            xa, ya, ma, pa, f0a = x[act], y[act], mask[act], p_count[act], f0[act]
            loss, _ = _loss(cur)
        grads = torch.autograd.grad(loss.sum(), cur)
        k = step + 1
        with torch.no_grad():  # Adam (Kingma & Ba 2015) with one learning rate per net
            for c, g, mm, vv in zip(cur, grads, m, v):
                mm.mul_(beta1).add_(g, alpha=1 - beta1)
                vv.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (vv / (1 - beta2 ** k)).sqrt_().add_(eps)
                c.sub_((lr_s / (1 - beta1 ** k)).view(-1, *([1] * (c.dim() - 1))) * mm / denom)
    return {"n_delta": n_delta, "status": status, "steps": steps_done, "loss": final_loss}


def _jackknife(values: np.ndarray) -> float:
    """Standard error from leave-one-out values (jackknife): sqrt((S - 1) / S * sum (v_i - mean)^2)."""
    v = np.asarray(values, float)
    return float(math.sqrt((v.size - 1) / v.size * np.sum((v - v.mean()) ** 2)))


def ensemble_statistics(f: torch.Tensor, y: torch.Tensor) -> dict:
    """Single-net and ensemble statistics of test outputs ``f`` (S, n) with labels ``y`` (n,).

    ``fluct``: ||f_N - fbar_N||, the root mean square over seeds and test points of f_s - fbar (fbar the
    mean over the S seeds), with the mean square scaled by S / (S - 1) so that it is unbiased for the
    infinite ensemble's E ||f - E f||^2; ``fbar_norm``: ||E f||, from ||fbar||^2 minus its bias
    ||f - fbar||^2 / (S - 1) (the seeds' noise left in fbar); ``rel_fluct``: their ratio, the fluctuation
    relative to the ensemble's output scale; ``excess``: eps_N - epsbar_N, the seeds' mean test error minus
    the error of sign(fbar). Their standard errors are jackknife estimates over seeds (each seed left out in
    turn, fbar recomputed)."""
    s = f.shape[0]
    err = (torch.sign(f) != y).double().mean(1).numpy()

    def stats(idx):
        ff = f[idx].double()
        fb = ff.mean(0)
        k = len(idx)
        ms = float((ff - fb).pow(2).mean()) * k / (k - 1)  # unbiased for E ||f - E f||^2
        fl = math.sqrt(ms)
        fbn = math.sqrt(max(float(fb.pow(2).mean()) - ms / k, 0.0))  # E ||fbar||^2 = ||E f||^2 + var / k
        ee = float((torch.sign(fb) != y).double().mean())
        return fl, ee, float(err[idx].mean()) - ee, fbn, fl / max(fbn, 1e-12)

    fl, ee, ex, fbn, rel = stats(list(range(s)))
    loo = np.array([stats([j for j in range(s) if j != i]) for i in range(s)])
    return {"err": err, "err_ens": ee, "err_ens_se": _jackknife(loo[:, 1]), "fluct": fl,
            "fluct_se": _jackknife(loo[:, 0]), "excess": ex, "excess_se": _jackknife(loo[:, 2]),
            "fbar_norm": fbn, "fbar_norm_se": _jackknife(loo[:, 3]), "rel_fluct": rel,
            "rel_fluct_se": _jackknife(loo[:, 4])}


def locate_nstar(n_arr: np.ndarray, frac_sat: np.ndarray) -> float:
    """N*: where the fraction of seeds that satisfy every constraint crosses 1/2 for the last time
    (geometric interpolation between the two grid points around the crossing); nan if it never reaches
    1/2 or if it is already >= 1/2 at the smallest N (no jammed width on the grid)."""
    above = frac_sat >= 0.5
    if not above[-1]:
        return math.nan
    i = len(above) - 1
    while i > 0 and above[i - 1]:
        i -= 1
    if i == 0:
        return math.nan
    f0, f1 = frac_sat[i - 1], frac_sat[i]
    t = (0.5 - f0) / (f1 - f0)
    return float(math.exp(math.log(n_arr[i - 1]) + t * (math.log(n_arr[i]) - math.log(n_arr[i - 1]))))


def run(out=None, *, quick: bool = False, seed: int = 0, data=None, progress: bool = True) -> Report:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..._progress import progress as bar

    t0 = time.perf_counter()
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x_all, y_all, data_name = parity_pca_pool(data, seed)
        x_all, y_all = x_all.float(), y_all.float()
        n_pool = x_all.shape[0]
        if quick:
            ps, p_fit, max_steps, max_steps_narrow = [32, 64, 128], 128, 2000, 2000
            widths = {h: ps for h in [2, 3, 4, 5, 6, 8, 12, 24, 40, 64]}
            batch_up_to, n_seeds_narrow = 12, 10
        else:
            ps, p_fit, max_steps, max_steps_narrow = [128, 256, 512], 256, 4000, MAX_STEPS_NARROW
            widths = {h: ps for h in [2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 32, 64]}
            widths.update({h: [p_fit] for h in [45, 90, 128]})
            batch_up_to, n_seeds_narrow = 24, N_SEEDS_NARROW
        n_seeds = 10
        n_test = n_pool - max(ps)
        if n_test < 100:
            raise ValueError(f"the pool ({data_name}, {n_pool} images) is too small for P = {max(ps)} and a "
                             "test set of >= 100 images; pass a larger MNIST file with data=")
        x_te, y_te = x_all[-n_test:], y_all[-n_test:]
        res: dict = {}
        # one stack per width with every P (padded) for the narrow nets, whose steps cost mostly overhead;
        # one stack per (P, width) for the wide ones, where padding would cost real arithmetic
        groups = [(h, hp) if h <= batch_up_to else (h, [p]) for h, hps in sorted(widths.items())
                  for hp in [hps] for p in ([None] if h <= batch_up_to else hps)]
        for h, hp in bar(groups, total=len(groups), desc="geiger-scaling", unit="stack", enabled=progress):
            # every (P, seed) net of this width in one stack: the P sets padded to max(hp) and masked
            pm = max(hp)
            # the narrow nets get more seeds (the first n_seeds the same as every width's): their single-net
            # errors carry the cusp; ensembles always average the first n_seeds
            sh = n_seeds_narrow if h <= batch_up_to else n_seeds
            seeds_h = [seed * 1000 + s for s in range(sh)]
            layers = [(w.detach().float(), b.detach().float()) for w, b in _batched_init(h, seeds_h * len(hp))]
            xs = torch.zeros(len(hp) * sh, pm, D)
            ys = torch.ones(len(hp) * sh, pm)
            ms = torch.zeros(len(hp) * sh, pm)
            for i, p in enumerate(hp):
                xs[i * sh:(i + 1) * sh, :p] = x_all[:p]
                ys[i * sh:(i + 1) * sh, :p] = y_all[:p]
                ms[i * sh:(i + 1) * sh, :p] = 1.0
            with torch.no_grad():
                f0, f0_te = _forward(layers, xs), _forward(layers, x_te)
            cap = max_steps_narrow if h <= batch_up_to else max_steps
            tr = train_hinge(layers, xs, ys, f0=f0, mask=ms, max_steps=cap, lr=LR * min(1.0, LR_WIDTH / h))
            with torch.no_grad():
                f = _forward(layers, x_te) - f0_te  # (len(hp) * S, n_test)
            for i, p in enumerate(hp):
                sl = slice(i * sh, (i + 1) * sh)
                res[(p, h)] = {"N": n_weights(h), "n_delta": tr["n_delta"][sl], "status": tr["status"][sl],
                               "steps": tr["steps"][sl], "loss": tr["loss"][sl],
                               **ensemble_statistics(f[sl][:n_seeds], y_te),
                               "err": (torch.sign(f[sl]) != y_te).double().mean(1).numpy()}
    finally:
        torch.set_num_threads(n_threads)
    return _report(res, ps=ps, p_fit=p_fit, widths=widths, quick=quick, seed=seed, data_name=data_name, n_pool=n_pool,
                   n_test=n_test, n_seeds=n_seeds, max_steps=max_steps, t0=t0, out=out, plt=plt,
                   steps_cap={h: (max_steps_narrow if h <= batch_up_to else max_steps) for h in widths})


def report_from_results(results, out=None) -> Report:
    """Rebuild the report (figures, tables, claims) from a full or quick run's ``results.json`` (a path or
    the loaded dict) without training again, e.g. after a change to the figures."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(results, dict):
        results = json.loads(Path(results).read_text())

    def num(v):
        return float(v) if isinstance(v, str) else v

    res = {}
    for r in results["runs"]:
        r = {k: ([num(x) for x in v] if isinstance(v, list) and k != "status" else num(v)) for k, v in r.items()}
        for k in ("n_delta", "steps"):
            r[k] = np.asarray(r[k], int)
        for k in ("err", "loss"):
            r[k] = np.asarray(r[k], float)
        res[(int(r.pop("P")), int(r.pop("h")))] = r
    ps = [int(p) for p in results["P"]]
    widths: dict = {}
    for p, hs in results["widths"].items():
        for h in hs:
            widths.setdefault(int(h), []).append(int(p))
    steps_cap = {int(h): int(c) for h, c in results["steps_cap"].items()}
    return _report(res, ps=ps, p_fit=int(results["P_fit"]), widths=widths, quick=bool(results["quick"]),
                   seed=results["seed"], data_name=results["data"], n_pool=results["n_pool"],
                   n_test=results["n_test"], n_seeds=int(results["seeds"]), max_steps=int(results["max_steps"]),
                   t0=0.0, out=out, plt=plt, steps_cap=steps_cap, wall=float(results["wall_time_s"]))


def _scaling_fit(res, p, widths, nstar, key):
    """Power-law fit of ``key`` ('fluct' or 'excess') against N over the widths with N >= 10 N* (>= 4 N* if
    fewer than 3 such widths), weighted by the jackknife standard errors; None if < 3 usable points."""
    if not math.isfinite(nstar):
        return None, []
    for mult in (10.0, 4.0):
        hs = [h for h in widths if n_weights(h) >= mult * nstar and res[(p, h)][key] > 0]
        if len(hs) >= 3:
            n = np.array([n_weights(h) for h in hs], float)
            v = np.array([res[(p, h)][key] for h in hs])
            se = np.array([max(res[(p, h)][key + "_se"], 1e-12) for h in hs])
            return fit_power_law(n, v, se), hs
    return None, []


def _report(res, *, ps, p_fit, widths, quick, seed, data_name, n_pool, n_test, n_seeds, max_steps, t0, out, plt,
            steps_cap, wall=None):
    rep = Report(TITLE, intro=(__doc__ or "").split("\n\n")[0].replace("\n", " "))
    grid = {p: sorted(h for h in widths if p in widths[h]) for p in ps}
    narr = {p: np.array([n_weights(h) for h in grid[p]], float) for p in ps}

    def n_of(r):
        return len(r["status"])

    nstar, jump, summary = {}, {}, {}
    for p in ps:
        frac = np.array([res[(p, h)]["status"].count(SATISFIED) / n_of(res[(p, h)]) for h in grid[p]])
        nstar[p] = locate_nstar(narr[p], frac)
        below = [h for h in grid[p] if n_weights(h) < nstar[p]] if math.isfinite(nstar[p]) else []
        jump[p] = float(np.median(res[(p, below[-1])]["n_delta"]) / n_weights(below[-1])) if below else math.nan
    pl = p_fit
    # ---------------- figure 1: jamming, cusp, scaling
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    colors = {p: f"C{i}" for i, p in enumerate(ps)}
    ax = axes[0, 0]
    any_capped = False
    for p in ps:
        n_arr = narr[p]
        nd = np.array([np.mean(res[(p, h)]["n_delta"]) for h in grid[p]]) / n_arr
        nd_se = np.array([np.std(res[(p, h)]["n_delta"], ddof=1) / math.sqrt(n_of(res[(p, h)]))
                          for h in grid[p]]) / n_arr
        ax.errorbar(n_arr, nd, yerr=nd_se, fmt="o-", ms=4, color=colors[p], label=f"P = {p}")
        capped = np.array([res[(p, h)]["status"].count(BUDGET) > 0 for h in grid[p]])
        if capped.any():
            any_capped = True
            ax.plot(n_arr[capped], nd[capped], "o", ms=10, mfc="none", color=colors[p])
        if math.isfinite(nstar[p]):
            ax.axvline(nstar[p], color=colors[p], ls=":", lw=1.2)
    if any_capped:
        ax.plot([], [], "o", ms=10, mfc="none", color="gray", label="some seeds hit the step budget")
    ax.axhline(0.1, color="k", lw=0.8, ls="--", label="0.1 (the jump's threshold)")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("N (number of weights)")
    ax.set_ylabel(r"$N_\Delta / N$  (unsatisfied constraints per weight)")
    ax.set_title("jamming: constraints left at the end of training (dotted: N*)")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for p in ps:
        frac = np.array([res[(p, h)]["status"].count(SATISFIED) / n_of(res[(p, h)]) for h in grid[p]])
        ax.plot(narr[p] / p, frac, "o-", ms=4, color=colors[p], label=f"P = {p}: N*/P = {nstar[p] / p:.2f}")
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("N / P")
    ax.set_ylabel("fraction of the seeds with every constraint satisfied")
    ax.set_title("the transition collapses on N / P")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    for p in ps:
        if not math.isfinite(nstar[p]):
            continue
        n_arr = narr[p]
        e = np.array([res[(p, h)]["err"].mean() for h in grid[p]])
        se = np.array([res[(p, h)]["err"].std(ddof=1) / math.sqrt(n_of(res[(p, h)])) for h in grid[p]])
        ee = np.array([res[(p, h)]["err_ens"] for h in grid[p]])
        ees = np.array([res[(p, h)]["err_ens_se"] for h in grid[p]])
        ax.errorbar(n_arr / nstar[p], e, yerr=se, fmt="o-", ms=4, color=colors[p], label=f"single nets, P = {p}")
        ax.errorbar(n_arr / nstar[p], ee, yerr=ees, fmt="s--", ms=3, color=colors[p], alpha=0.6,
                    label=f"ensemble of {n_seeds}, P = {p}")
    ax.axvline(1.0, color="k", lw=1, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("N / N*")
    ax.set_ylabel(f"test error ({n_test} images)")
    ax.set_title("the cusp at N* (single nets) and its disappearance (ensemble)")
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1, 1]
    fits = {}
    ax.plot(narr[pl], [res[(pl, h)]["fbar_norm"] for h in grid[pl]], "x-", ms=4, lw=0.8, color="0.5",
            label=r"$\|\bar f_N\|$ (the ensemble output's scale)")
    for key, target, mk, col, lab in (("rel_fluct", -0.25, "o", "C0", r"$\|f_N - \bar f_N\| / \|\bar f_N\|$"),
                                      ("fluct", None, "^", "C2", r"$\|f_N - \bar f_N\|$ (not scale-corrected)"),
                                      ("excess", -0.5, "s", "C3", r"$\epsilon_N - \bar\epsilon_N$")):
        hollow = {"mfc": "none"} if target is None else {}
        v = np.array([res[(pl, h)][key] for h in grid[pl]])
        vse = np.array([res[(pl, h)][key + "_se"] for h in grid[pl]])
        ok = v > 0
        n_arr = narr[pl]
        ax.errorbar(n_arr[ok], v[ok], yerr=vse[ok], fmt=mk, ms=4, color=col, alpha=0.35, **hollow)
        fit, hs = _scaling_fit(res, pl, grid[pl], nstar[pl], key)
        if fit is None:
            continue
        fits[key] = (fit, hs)
        nb = np.array([n_weights(h) for h in hs], float)
        vb = np.array([res[(pl, h)][key] for h in hs])
        ax.errorbar(nb, vb, yerr=[res[(pl, h)][key + "_se"] for h in hs], fmt=mk, ms=5, color=col,
                    label=f"{lab}: fitted exponent {fit.exponent:.3f} ± {fit.stderr:.3f}", **hollow)
        ax.plot(nb, fit.predict(nb), "-" if target is not None else "--", color=col, lw=1.5 if target else 1.0)
        if target is None:
            continue
        ref = fit.predict(nb[0]) * (nb / nb[0]) ** target
        ax.plot(nb, ref, "k" + (":" if key == "rel_fluct" else "--"), lw=1.2,
                label=f"reference slope N^{'-1/4' if key == 'rel_fluct' else '-1/2'}")
    if math.isfinite(nstar[pl]):
        ax.axvline(nstar[pl], color="k", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N (number of weights)")
    ax.set_ylabel("output scale and fluctuation / excess test error")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 30)  # room for the legend above the data
    ax.set_title(f"P = {pl}: scaling for N >> N* (solid markers: fitted range; dotted line: N*)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    caps = sorted(set(steps_cap.values()))
    budget_text = ", ".join(f"{c} steps for widths {min(h for h in widths if steps_cap[h] == c)}-"
                            f"{max(h for h in widths if steps_cap[h] == c)}" for c in caps)
    rep.section("Jamming, the cusp and the scaling beyond it",
                f"Pool: {data_name} ({n_pool} images; test set: the {n_test} not used for training). "
                f"{n_seeds} seeds per (P, N) ({max(n_of(r) for r in res.values())} for the narrow widths, "
                f"whose first {n_seeds} make the ensembles); 2 hidden ReLU layers, widths {sorted(widths)}; "
                "full-batch Adam on the "
                f"quadratic hinge loss, each seed stopped at the first step where every constraint holds, or "
                f"when its loss stalled ('stalled', a jammed minimum), or at the step budget ('budget', not "
                f"converged; counted as not satisfied): {budget_text}.")
    rep.figure(fig, "geiger_scaling", "Top left: unsatisfied constraints per weight at the end of training "
               "(mean over seeds, error bars SE; symmetric-log axis, dashed: the jump's 0.1 threshold; circled, "
               "if any: runs that hit the step budget). Top right: fraction of "
               "seeds that satisfy every constraint against N/P; N* is where it crosses 1/2. Bottom left: test "
               "error of single nets (mean ± SE over seeds) and of the ensemble-averaged output (± jackknife SE) "
               f"against N/N*. Bottom right, at P = {pl}: the output's fluctuation over initializations relative to "
               "the ensemble's output scale (the claim), the same not divided by the scale (hollow), the scale "
               "itself (gray: it still falls beyond N*, the tail of its divergence there), and the excess test "
               "error of single nets over the ensemble (± jackknife SE), with power-law fits over N >= 10 N* and "
               "the predicted slopes.")
    # ---------------- figure 2: N* against P
    fig2, ax = plt.subplots(figsize=(4.6, 3.4))
    pv = np.array([p for p in ps if math.isfinite(nstar[p])], float)
    nv = np.array([nstar[p] for p in ps if math.isfinite(nstar[p])])
    slope = None
    if pv.size >= 2:
        ax.loglog(pv, nv, "o-", label="N*(P), measured")
        if pv.size >= 3:
            slope = fit_power_law(pv, nv)
            ax.loglog(pv, slope.predict(pv), "--", color="C0", alpha=0.6,
                      label=f"fit: N* ~ P^{slope.exponent:.2f} ± {slope.stderr:.2f}")
    ax.loglog(pv, pv, "k:", label="N = P")
    ax.set_xlabel("P (training points)")
    ax.set_ylabel("N*")
    ax.legend(fontsize=8)
    ax.set_title("jamming transition N*(P)")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for axis in (ax.xaxis, ax.yaxis):  # plain numbers: the range spans less than a decade
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xticks([float(p) for p in pv])
    lo, hi = ax.get_ylim()
    ax.set_yticks([t for t in (10, 20, 50, 100, 200, 300, 500, 1000, 2000, 5000) if lo <= t <= hi])
    fig2.tight_layout()
    rep.figure(fig2, "nstar_vs_p", "N* against P (N*: where half the seeds satisfy every constraint).")
    # ---------------- cusp statistics per P
    cusp = {}
    for p in ps:
        if not math.isfinite(nstar[p]):
            continue
        # the paper's three phases: the error decays, rises to a cusp at N*, decays again. The grid points
        # are chosen on half of the seeds (even) and the rise measured on the other half (odd), so that
        # picking the largest and the smallest of several noisy means does not inflate it
        win = [h for h in grid[p] if nstar[p] / 2 <= n_weights(h) <= 2 * nstar[p]]
        right = [h for h in grid[p] if n_weights(h) >= 4 * nstar[p]]
        if not (win and right):
            continue
        hp = max(win, key=lambda h: res[(p, h)]["err"][0::2].mean())
        left = [h for h in grid[p] if n_weights(h) < min(nstar[p], n_weights(hp))]  # before the peak, below N*
        if not left:
            continue
        hl = min(left, key=lambda h: res[(p, h)]["err"][0::2].mean())
        hr = right[0]

        def m_se(e):
            return float(e.mean()), float(e.std(ddof=1) / math.sqrt(e.size))

        (ep, sp), (el, sl), (er, sr) = (m_se(res[(p, hp)]["err"][1::2]), m_se(res[(p, hl)]["err"][1::2]),
                                        m_se(res[(p, hr)]["err"]))
        rp, rl = res[(p, hp)], res[(p, hl)]
        cusp[p] = {"h_peak": hp, "N_peak": n_weights(hp), "N_left": n_weights(hl), "N_right": n_weights(hr),
                   "err_peak": ep, "err_left": el, "err_right": er, "se_peak": sp, "se_left": sl, "se_right": sr,
                   "z_cusp": min((ep - el) / math.hypot(sp, sl), (ep - er) / math.hypot(sp, sr)),
                   "z_ens": ((rp["err_ens"] - rl["err_ens"])
                             / max(math.hypot(rp["err_ens_se"], rl["err_ens_se"]), 1e-12)),
                   "z_gap": rp["excess"] / max(rp["excess_se"], 1e-12),
                   "ens_peak": rp["err_ens"], "ens_left": rl["err_ens"]}
    rows = []
    for p in ps:
        rf, _ = _scaling_fit(res, p, grid[p], nstar[p], "rel_fluct")
        fl, _ = _scaling_fit(res, p, grid[p], nstar[p], "fluct")
        ex, _ = _scaling_fit(res, p, grid[p], nstar[p], "excess")
        rows.append({"P": p, "N*": nstar[p], "N*/P": nstar[p] / p, "median N_Delta/N below N*": jump[p],
                     "cusp peak N": cusp.get(p, {}).get("N_peak", math.nan),
                     "cusp z (single)": cusp.get(p, {}).get("z_cusp", math.nan),
                     "ensemble rise z": cusp.get(p, {}).get("z_ens", math.nan),
                     "||f-fbar||/||fbar|| exponent": rf.exponent if rf else math.nan,
                     "± SE  ": rf.stderr if rf else math.nan,
                     "||f-fbar|| exponent": fl.exponent if fl else math.nan, "± SE": fl.stderr if fl else math.nan,
                     "excess exponent": ex.exponent if ex else math.nan, "± SE ": ex.stderr if ex else math.nan})
    rep.table(rows, caption="Per P: N*, the jump, the cusp (z-scores in standard errors over seeds) and the "
              "fitted exponents (N >= 10 N*)", fmt="{:.3g}")
    rep.claims_table()
    run_rows = []
    for p in ps:
        for h in grid[p]:
            r = res[(p, h)]
            run_rows.append({"P": p, "h": h, "N": n_weights(h), "satisfied": r["status"].count(SATISFIED),
                             "stalled": r["status"].count(STALLED), "budget": r["status"].count(BUDGET),
                             "median steps": float(np.median(r["steps"])),
                             "N_Delta/N": float(np.mean(r["n_delta"])) / n_weights(h),
                             "test err": float(r["err"].mean()), "ensemble err": r["err_ens"],
                             "||f - fbar||": r["fluct"], "||fbar||": r["fbar_norm"]})
    rep.table(run_rows, caption="Every (P, width): how the seeds ended, and their test statistics", fmt="{:.4g}")
    # ---------------- claims
    if math.isfinite(nstar[max(ps)]) and math.isfinite(nstar[min(ps)]):
        rep.add_claim(claim(f"N* grows with P (N*(P = {max(ps)}) / N*(P = {min(ps)}))", nstar[max(ps)] / nstar[min(ps)],
                            [1.0 + 1e-9, math.inf]))
    else:
        rep.add_claim(claim("N* located for every P", math.nan, [1.0, math.inf]))
    for p in ps if not quick else [max(ps)]:
        rep.add_claim(claim(f"P = {p}: jump, median N_Delta / N at the widest N below N* (>= 0.1)", jump[p],
                            [0.1, math.inf], nstar=nstar[p]))
    if not quick:
        rep.add_claim(claim("N* < P for every P (max N*/P)", max(nstar[p] / p for p in ps), [0.0, 1.0]))
        c = cusp.get(pl)
        if c is None:
            rep.add_claim(claim(f"P = {pl}: cusp (needs grid points below N*, around N* and above 4 N*)",
                                math.nan, [3.0, math.inf]))
        else:
            rep.add_claim(claim(f"P = {pl}: single-net test error rises from its minimum before the peak "
                                f"(N = {c['N_left']}) "
                                f"to a peak near N* (N = {c['N_peak']}) and falls beyond (N = {c['N_right']}): "
                                "smaller z, in SE over seeds (points chosen on the even seeds, z on the odd)",
                                c["z_cusp"], [3.0, math.inf], **{k: v for k, v in c.items() if k != "z_cusp"}))
            rep.add_claim(claim(f"P = {pl}: the ensemble average has no cusp: its error at N = {c['N_peak']} minus "
                                f"at N = {c['N_left']} (in jackknife SE)", c["z_ens"], [-math.inf, 3.0]))
            rep.add_claim(claim(f"P = {pl}: at the cusp the ensemble errs less than single nets (in jackknife SE)",
                                c["z_gap"], [3.0, math.inf]))
    for key, target, text in [("rel_fluct", -0.25, "||f_N - fbar_N|| / ||fbar_N|| ~ N^-1/4")] + \
            ([] if quick else [("excess", -0.5, "eps_N - epsbar_N ~ N^-1/2")]):
        fit = fits.get(key)
        if fit is None:
            rep.add_claim(claim(f"P = {pl}: {text} (fit needs >= 3 widths with N >= 4 N* and a positive value)",
                                math.nan, [target - 0.1, target + 0.1]))
            continue
        fit, hs = fit
        tol = 3 * fit.stderr
        rep.add_claim(claim(f"P = {pl}, N >= {min(n_weights(h) for h in hs)}: {text} (fitted exponent, "
                            "within 3 SE)", fit.exponent, [target - tol, target + tol], stderr=fit.stderr,
                            widths=hs))
    wall = time.perf_counter() - t0 if wall is None else wall
    rep.update({"quick": quick, "seed": seed, "data": data_name, "n_pool": n_pool, "n_test": n_test, "P": ps,
                "widths": {str(p): grid[p] for p in ps}, "P_fit": pl, "max_steps": max_steps, "seeds": n_seeds,
                "steps_cap": {str(h): c for h, c in sorted(steps_cap.items())},
                "N_star": {str(p): nstar[p] for p in ps}, "jump": {str(p): jump[p] for p in ps},
                "N_star_slope": None if slope is None else {"exponent": slope.exponent, "stderr": slope.stderr},
                "cusp": {str(p): c for p, c in cusp.items()},
                "runs": [{"P": p, "h": h, **res[(p, h)]} for p in ps for h in grid[p]],
                "exponents": {k: {"exponent": f.exponent, "stderr": f.stderr, "widths": hs}
                              for k, (f, hs) in fits.items()},
                "wall_time_s": wall})
    if out is not None:
        rep.save(Path(out))
    return rep
