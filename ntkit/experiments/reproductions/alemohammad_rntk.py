"""Alemohammad, Wang, Balestriero & Baraniuk (ICLR 2021), "The Recurrent Neural Tangent Kernel": the RNTK
compares sequences of different lengths directly, and classifies them at least as well as the NTK of an MLP
fed padded sequences.

Paper's setup
    The RNTK is the NTK of an Elman RNN h_t = phi(W h_{t-1} + U x_t + b) with weights shared across time and
    the readout f = V h_T, in the limit of infinite width (Thm. 1). Its defining practical property is that it
    takes sequences of different lengths without padding or resampling; the paper characterises how it weights
    the time steps (recent steps weigh more for a contractive recurrence) and compares SVMs on the RNTK with
    SVMs on the NTK of MLPs and on other kernels on a synthetic sinusoid task and 56 UCR time-series data sets,
    the RNTK ranking first on average.

Ours
    ``ntkit.RNN(ReLU, U_std = 1, b_std = 0.1)`` + ``Dense``, readout "last" (the paper's f = V h_T) or "mean"
    (average pooling over time, the variant of the authors' follow-up, arXiv:2012.04859); readout, W_std in
    {1, sqrt 2} (quick) / {0.5, 1, sqrt 2} (full) and the SVM's C in {0.1, 1, 10, 100, 1000} chosen by
    3-fold stratified cross-validation on the training set ("RNTK-SVM"); "RNTK-SVM last only" restricts the
    choice to the paper's last-state readout. Kernels are normalised to unit diagonal. Baseline: the NTK of
    a one-hidden-layer ReLU MLP (W_std sqrt 2, b_std 0.1) on the zero-padded, flattened sequences ("padded
    NTK") and on the sequences linearly resampled to the median training length ("resampled NTK"), same SVM
    selection. Data sets (variable lengths only, the paper's point):

    * ``sines`` (generated here): two classes of noisy sinusoids (frequency 0.08 vs 0.14 cycles per step,
      random phase and amplitude, 2 channels: the sine and a noisy cosine), lengths uniform in [12, 40];
      quick 60 train / 100 test, full 200 / 400;
    * ``data=`` the small JapaneseVowels slice shipped with the tests (8 sequences, 4 speakers; leave-one-out
      SVM with C = 10 on the first kernel of the grid: last readout, W_std 1 (quick) / 0.5 (full));
    * full run: aeon's bundled JapaneseVowels and PickupGestureWiimoteZ (published splits; aeon is an
      optional dependency, only imported here).

    The paper's 56 fixed-length UCR sets and its GPU-scale grid are not rerun (2-core CPU); the benchmark
    ``benchmarks/bench_rntk.py`` covers more sets with DTW-1NN.

Claims
    * the RNTK Gram matrix of sequences of different lengths is finite, symmetric and PSD (smallest eigenvalue
      >= -1e-9 times the largest);
    * on every variable-length set, the RNTK-SVM accuracy >= padded-NTK accuracy - 2 standard errors of the
      difference of two binomial proportions (sqrt(p1 q1 / n + p2 q2 / n));
    * time weighting (paper, Sec. 4): with the "last" readout, the normalised kernel between a
      sequence and its copy with the first s steps dropped is higher than with the last s steps dropped,
      for every s tested and W_std in {1, sqrt 2} (mean over 20 random sequences);
    * the finite RNN twin (width 512, S seeds) agrees with the exact RNTK on a few pairs of different lengths:
      max |mean - exact| / (t * SE + T_max / n * max|K|) <= 1, t the Bonferroni Student-t quantile at
      family-wise level 1e-3 over the entries, SE from the seeds, T_max / n the O(1/width) bias allowance.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ...kernels import RNN, Dense, Relu, mlp, serial
from ...report import Report, claim
from ._common import bonferroni_t

NAME = "alemohammad-rntk"
TITLE = "Alemohammad et al. 2021: the recurrent NTK on variable-length sequences vs the NTK of padded inputs"

C_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0)
#: bytes of working memory of one RNTK call (the "mean" grids of long sequences are tiled under it)
MEMORY_BUDGET = 5e8


def rntk_arch(W_std: float = 1.0, readout: str = "last"):
    """RNN(ReLU, U_std 1, b_std 0.1) + Dense readout: the recurrent architecture of this reproduction."""
    return serial(RNN(W_std=W_std, U_std=1.0, b_std=0.1, activation=Relu(), readout=readout),
                  Dense(1, W_std=1.0, b_std=0.0))


def make_sines(n: int, rng: np.random.Generator, lengths=(12, 40)):
    """``n`` two-channel noisy sinusoids of random length, phase and amplitude; label 0 / 1 = slow / fast."""
    seqs, labels = [], []
    for i in range(n):
        c = i % 2
        t = np.arange(int(rng.integers(lengths[0], lengths[1] + 1)))
        f = (0.08, 0.14)[c] * (1 + 0.1 * rng.standard_normal())
        ph, a = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.5)
        s = np.stack([a * np.sin(2 * np.pi * f * t + ph), np.cos(2 * np.pi * f * t + ph)], 1)
        seqs.append(s + 0.3 * rng.standard_normal(s.shape))
        labels.append(c)
    return seqs, np.asarray(labels)


def _load_npz(path):
    z = np.load(path)
    seqs = [np.asarray(z["values"][i, : int(z["lengths"][i])], dtype=np.float64) for i in range(len(z["lengths"]))]
    return seqs, np.asarray(z["labels"])


def _load_aeon(name):
    try:
        from aeon.datasets import load_classification
    except ImportError:
        raise ImportError("the full alemohammad-rntk run reads aeon's bundled data sets; install aeon, or run "
                          "with --quick") from None
    out = []
    for split in ("train", "test"):
        x, y = load_classification(name, split=split)
        out.append(([np.asarray(s, dtype=np.float64).T for s in x], np.asarray(y)))
    return out


def _standardise(train, test):
    cat = np.concatenate(train, 0)
    mu, sd = cat.mean(0), cat.std(0) + 1e-12
    return [(s - mu) / sd for s in train], [(s - mu) / sd for s in test]


def _unit_diag(k):
    k = np.asarray(k, dtype=np.float64)
    d = np.sqrt(np.clip(np.diag(k), 1e-300, None))
    return k / np.outer(d, d)


def _pad(seqs, length):
    out = np.zeros((len(seqs), length, seqs[0].shape[1]))
    for i, s in enumerate(seqs):
        out[i, : min(len(s), length)] = s[:length]
    return out.reshape(len(seqs), -1)


def _resample(seqs, length):
    out = []
    for s in seqs:
        t_old, t_new = np.linspace(0, 1, len(s)), np.linspace(0, 1, length)
        out.append(np.stack([np.interp(t_new, t_old, s[:, c]) for c in range(s.shape[1])], 1).reshape(-1))
    return np.stack(out)


def select_svm_by_cv(kernels: dict, y, n_train):
    """(cv accuracy, key, C) by stratified CV on the training block of each (n_all, n_all) kernel."""
    from sklearn.model_selection import StratifiedKFold
    from sklearn.svm import SVC

    folds = max(2, min(3, int(np.unique(y, return_counts=True)[1].min())))
    skf = StratifiedKFold(folds, shuffle=True, random_state=0)
    best = (-1.0, None, None)
    for key, k in kernels.items():
        ktt = k[:n_train, :n_train]
        for c in C_GRID:
            accs = []
            for tr, va in skf.split(np.zeros(n_train), y):
                clf = SVC(kernel="precomputed", C=c).fit(ktt[np.ix_(tr, tr)], y[tr])
                accs.append(float((clf.predict(ktt[np.ix_(va, tr)]) == y[va]).mean()))
            if np.mean(accs) > best[0]:
                best = (float(np.mean(accs)), key, c)
    return best


def _svm_accuracy(kernels: dict, y_tr, y_te) -> tuple[float, str, str]:
    """(test accuracy, description, kernel key) of the CV-selected SVM; with no test set (y_te None):
    leave-one-out with the first kernel, C = 10."""
    from sklearn.svm import SVC

    if y_te is None:
        key = next(iter(kernels))
        k, n = kernels[key], len(y_tr)
        hits = []
        for i in range(n):
            tr = np.array([j for j in range(n) if j != i])
            clf = SVC(kernel="precomputed", C=10.0).fit(k[np.ix_(tr, tr)], y_tr[tr])
            hits.append(clf.predict(k[np.ix_([i], tr)])[0] == y_tr[i])
        return float(np.mean(hits)), f"{key}, C 10 (leave-one-out)", key
    n_tr = len(y_tr)
    _, key, c = select_svm_by_cv(kernels, y_tr, n_tr)
    k = kernels[key]
    clf = SVC(kernel="precomputed", C=c).fit(k[:n_tr, :n_tr], y_tr)
    return float((clf.predict(k[n_tr:, :n_tr]) == y_te).mean()), f"{key}, C {c:g}", key


def _empirical(net, seqs):
    """NTK of output 0 of one finite network by autograd, one backward pass per sequence."""
    params = [p for p in net.parameters() if p.requires_grad]
    f = net(seqs)
    rows = []
    for i in range(len(seqs)):
        grads = torch.autograd.grad(f[i, 0], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]))
    j = torch.stack(rows)
    return (j @ j.T).detach()


def run(out=None, *, quick: bool = False, seed: int = 0, data=None, progress: bool = True) -> Report:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..._progress import progress as bar

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    w_grid = [1.0, math.sqrt(2)] if quick else [0.5, 1.0, math.sqrt(2)]
    mlp_arch = mlp(1, W_std=math.sqrt(2), b_std=0.1)

    sets = {}
    n_tr, n_te = (60, 100) if quick else (200, 400)
    s_tr, y_tr = make_sines(n_tr, rng)
    s_te, y_te = make_sines(n_te, rng)
    sets["sines"] = (s_tr, y_tr, s_te, y_te)
    if data is not None:
        s, y = _load_npz(data)
        sets["JapaneseVowels (8-sequence slice)"] = (s, y, None, None)
    if not quick:
        for name in ("JapaneseVowels", "PickupGestureWiimoteZ"):
            (a, ya), (b, yb) = _load_aeon(name)
            sets[name] = (a, ya, b, yb)

    rows, heat = [], None
    for name, (s_tr, y_tr, s_te, y_te) in bar(sets.items(), total=len(sets), desc=NAME, unit="set",
                                               enabled=progress):
        if s_te is not None:
            s_tr, s_te = _standardise(s_tr, s_te)
        allseq = list(s_tr) + ([] if s_te is None else list(s_te))
        lens = [len(s) for s in allseq]
        tk = time.perf_counter()
        k_rntk = {f"{ro}, W_std {w:.3g}": rntk_arch(w, ro).kernel([torch.from_numpy(s) for s in allseq],
                                                                  get="ntk", memory_budget=MEMORY_BUDGET).numpy()
                  for ro in ("last", "mean") for w in w_grid}
        t_rntk = time.perf_counter() - tk
        finite = all(bool(np.isfinite(k).all()) for k in k_rntk.values())
        psd = min(float(ev.min() / ev.max()) for ev in
                  (np.linalg.eigvalsh(0.5 * (k + k.T)) for k in k_rntk.values())) if finite else -float("inf")
        sym = max(float(np.abs(k - k.T).max() / np.abs(k).max()) for k in k_rntk.values())
        t_max = max(len(s) for s in s_tr)
        t_med = int(np.median([len(s) for s in s_tr]))
        k_pad = _unit_diag(mlp_arch.kernel(torch.from_numpy(_pad(allseq, t_max)), get="ntk").numpy())
        k_res = _unit_diag(mlp_arch.kernel(torch.from_numpy(_resample(allseq, t_med)), get="ntk").numpy())
        k_r = {key: _unit_diag(v) for key, v in k_rntk.items()}
        acc_r, sel_r, key_r = _svm_accuracy(k_r, y_tr, y_te)
        acc_l, _, _ = _svm_accuracy({k: v for k, v in k_r.items() if k.startswith("last")}, y_tr, y_te)
        acc_p, _, _ = _svm_accuracy({"padded": k_pad}, y_tr, y_te)
        acc_s, _, _ = _svm_accuracy({"resampled": k_res}, y_tr, y_te)
        n_eval = len(y_tr) if y_te is None else len(y_te)
        se = math.sqrt((acc_r * (1 - acc_r) + acc_p * (1 - acc_p)) / n_eval)
        rows.append({"data set": name, "n eval": n_eval, "lengths": f"{min(lens)}-{max(lens)}",
                     "RNTK-SVM": acc_r, "RNTK-SVM last only": acc_l, "NTK padded": acc_p, "NTK resampled": acc_s, "RNTK selected": sel_r,
                     "se_diff": se, "psd_min_over_max": psd, "finite": finite, "asymmetry": sym,
                     "rntk_kernel_s": t_rntk})
        if heat is None and y_te is not None:
            k0 = k_r[key_r]
            order = np.argsort(y_tr, kind="stable")
            heat = (f"{name}, {key_r}", k0[np.ix_(order, order)], np.asarray(y_tr)[order])

    # time weighting: drop the first s steps vs the last s steps
    shifts = [2, 4, 8, 12]
    w_time = (1.0, math.sqrt(2))
    n_rand, length, d = 20, 30, 2
    g = torch.Generator().manual_seed(seed + 1)
    base = [torch.randn(length, d, generator=g, dtype=torch.float64) for _ in range(n_rand)]
    rho_head = {w: [] for w in w_time}
    rho_tail = {w: [] for w in w_time}
    for w in w_time:
        arch1 = rntk_arch(w)
        for s in shifts:
            h, tl = [], []
            for x in base:
                k = arch1.kernel([x, x[s:], x[:-s]], get="ntk")
                h.append(float(k[0, 1] / torch.sqrt(k[0, 0] * k[1, 1])))
                tl.append(float(k[0, 2] / torch.sqrt(k[0, 0] * k[2, 2])))
            rho_head[w].append(float(np.mean(h)))
            rho_tail[w].append(float(np.mean(tl)))

    # Monte Carlo: finite twin vs exact
    width, n_seeds = 512, (10 if quick else 24)
    mc_arch = serial(RNN(W_std=1.0, U_std=1.0, b_std=0.1, activation=Relu(), readout="last"),
                     Dense(1, W_std=1.0, b_std=0.0))
    g = torch.Generator().manual_seed(seed + 2)
    mc_seqs = [torch.randn(t, d, generator=g, dtype=torch.float64) for t in (3, 5, 7, 4)]
    exact = mc_arch.kernel(mc_seqs, get="ntk")
    samples = torch.stack([_empirical(mc_arch.init(width, seed=seed + 100 + s, in_features=d, out_dim=1).double(),
                                      mc_seqs) for s in range(n_seeds)])
    mean, sem = samples.mean(0), samples.std(0) / math.sqrt(n_seeds)
    iu = torch.triu_indices(len(mc_seqs), len(mc_seqs))
    n_ent = iu.shape[1]
    tq = bonferroni_t(n_ent, n_seeds - 1)
    bias = max(len(s) for s in mc_seqs) / width * float(exact.abs().max())
    ratio = ((mean - exact).abs() / (tq * sem + bias))[iu[0], iu[1]]
    z = ((mean - exact) / sem)[iu[0], iu[1]]

    # ---------------- report ----------------
    rep = Report(TITLE, intro=(__doc__ or "").split("\n\n")[0].replace("\n", " "))
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    meth = ("RNTK-SVM", "RNTK-SVM last only", "NTK padded", "NTK resampled")
    xs = np.arange(len(rows))
    for i, m in enumerate(meth):
        vals = [r[m] for r in rows]
        ax.bar(xs + (i - 1.5) * 0.2, vals, 0.2, label=m)
    ax.errorbar(xs - 0.3, [r["RNTK-SVM"] for r in rows],
                yerr=[math.sqrt(r["RNTK-SVM"] * (1 - r["RNTK-SVM"]) / r["n eval"]) for r in rows],
                fmt="none", ecolor="k", capsize=3)
    ax.set_xticks(xs)
    ax.set_xticklabels([r["data set"].replace(" (", "\n(") for r in rows], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.set_title("SVM accuracy on variable-length sequences")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4)
    fig.tight_layout()
    rep.section("Classification of variable-length sequences",
                "SVM on the normalised RNTK of the raw sequences vs the NTK of a ReLU MLP on zero-padded / "
                "resampled sequences (C, and W_std in the full run, by 3-fold CV on the training set).")
    rep.figure(fig, "accuracy", "Test accuracy per data set and method (error bar: binomial SE of the RNTK).")
    rep.table([{k: v for k, v in r.items() if k in ("data set", "n eval", "lengths", *meth, "RNTK selected")}
               for r in rows], fmt="{:.4g}",
              caption="Test accuracy per data set" + ("; leave-one-out on the 8-sequence slice"
                                                      if any("slice" in r["data set"] for r in rows) else ""))
    if heat is not None:
        fig, ax = plt.subplots(figsize=(5, 4.4))
        im = ax.imshow(heat[1], cmap="viridis")
        bounds = np.nonzero(np.diff(np.unique(heat[2], return_inverse=True)[1]))[0]
        for b in bounds:
            ax.axhline(b + 0.5, color="w", lw=1)
            ax.axvline(b + 0.5, color="w", lw=1)
        fig.colorbar(im, ax=ax, label="normalised RNTK (unit diagonal)")
        ax.set_xlabel("training sequence (sorted by class)")
        ax.set_ylabel("training sequence (sorted by class)")
        ax.set_title(f"RNTK ({heat[0]}), train set by class", fontsize=9)
        rep.figure(fig, "kernel_heatmap", "RNTK (unit diagonal) of the training sequences sorted by class; "
                   "white lines separate the classes.")
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.6), layout="constrained")
    ax = axes[0]
    for w, col in zip(w_time, ("C0", "C1")):
        ax.plot(shifts, rho_head[w], "o-", color=col, label=f"W_std {w:.3g}: first s steps dropped")
        ax.plot(shifts, rho_tail[w], "s--", color=col, label=f"W_std {w:.3g}: last s steps dropped")
    ax.set_xlabel("steps dropped s")
    ax.set_ylabel("normalised RNTK with the full sequence")
    ax.set_title(f"time weighting (last readout, length {length}, mean of {n_rand} sequences)", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax = axes[1]
    ex = exact[iu[0], iu[1]].numpy()
    ax.errorbar(ex, mean[iu[0], iu[1]].numpy(), yerr=2 * sem[iu[0], iu[1]].numpy(), fmt="o",
                label="Gram-matrix entries (± 2 SE)")
    lim = [ex.min() * 0.95, ex.max() * 1.05]
    ax.plot(lim, lim, "k--", lw=0.8, label="y = x (agreement)")
    ax.set_xlabel("exact RNTK (entry of the Gram matrix)")
    ax.set_ylabel(f"empirical NTK of the finite RNN, mean of {n_seeds} seeds (±2 SE)", fontsize=9)
    ax.set_title(f"finite RNN (width {width}) vs exact RNTK; lengths {', '.join(str(len(s)) for s in mc_seqs)}",
                 fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    rep.section("Time weighting and the finite network",
                "Left: the last-state RNTK is dominated by the recent steps. Right: the empirical NTK of the "
                "finite RNN against the exact RNTK, pairs of sequences of different lengths.")
    rep.figure(fig, "time_and_mc", "Time weighting of the RNTK; Monte Carlo check of the finite twin.")

    worst_psd = min(r["psd_min_over_max"] for r in rows)
    rep.add_claim(claim("the RNTK Gram matrices of sequences of different lengths are PSD (min over sets of "
                        "smallest / largest eigenvalue)", worst_psd, [-1e-9, 1.0],
                        finite=all(r["finite"] for r in rows), max_asymmetry=max(r["asymmetry"] for r in rows)))
    rep.add_claim(claim("the RNTK Gram matrices are finite and symmetric (max relative asymmetry)",
                        max(r["asymmetry"] for r in rows) if all(r["finite"] for r in rows) else float("inf"),
                        [0.0, 1e-12]))
    for r in rows:
        diff = r["RNTK-SVM"] - r["NTK padded"]
        rep.add_claim(claim(f"{r['data set']}: RNTK-SVM accuracy - padded-NTK accuracy, in standard errors of "
                            f"the difference (>= -2)", diff / max(r["se_diff"], 1e-12) if r["se_diff"] > 0
                            else (0.0 if diff >= 0 else -float("inf")), [-2.0, float("inf")],
                            rntk=r["RNTK-SVM"], padded=r["NTK padded"], se=r["se_diff"]))
    gap = min(h - t for w in w_time for h, t in zip(rho_head[w], rho_tail[w]))
    rep.add_claim(claim("time weighting: dropping the first s steps changes the last-state RNTK less than "
                        "dropping the last s steps (min over s of the difference of normalised kernels)",
                        gap, [0.0, float("inf")], shifts=shifts, W_std=list(w_time)))
    rep.add_claim(claim(f"finite RNN (width {width}) vs exact RNTK: max |mean - exact| / (t * SE + T/n * max K)",
                        float(ratio.max()), [0.0, 1.0], t=tq, n_seeds=n_seeds, max_abs_z=float(z.abs().max())))
    rep.update({"quick": quick, "seed": seed, "rows": rows, "shifts": shifts,
                "rho_head": {f"{w:.4g}": v for w, v in rho_head.items()},
                "rho_tail": {f"{w:.4g}": v for w, v in rho_tail.items()}, "mc": {"width": width, "n_seeds": n_seeds, "z": z.tolist(),
                                             "lengths": [len(s) for s in mc_seqs], "exact": ex.tolist(),
                                             "mean": mean[iu[0], iu[1]].tolist(),
                                             "stderr": sem[iu[0], iu[1]].tolist()},
                "wall_time_s": time.perf_counter() - t0})
    if out is not None:
        rep.save(Path(out))
    return rep
