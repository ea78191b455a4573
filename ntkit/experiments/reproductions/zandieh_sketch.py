"""Zandieh, Han, Avron, Shoham, Kim & Shin (NeurIPS 2021), "Scaling Neural Tangent Kernels via Sketching and
Random Features", with Han, Avron, Shoham, Kim & Shin (2021), "Random Features for the Neural Tangent Kernel":
explicit feature maps whose inner products approximate the NTK, their accuracy and speed against the exact
kernel as the feature dimension m grows.

Paper's setup
    NTK Sketch (polynomial fits of the arc-cosine duals + PolySketch, Zandieh et al.) and NTK random features
    (arc-cosine features combined by TensorSRHT, Han et al.) for fully-connected ReLU networks. Their
    guarantees: a (1 +- eps) spectral approximation of the NTK Gram with m = O~(1 / eps^2) features, i.e.
    an error that falls like m^-1/2. Experiments: relative Gram-matrix error vs m on small data sets;
    linear regression on the features for classification (MNIST, CIFAR-10) and regression (UCI) tasks, where
    the features reach about the exact kernel's accuracy at a fraction of the time (abstract: a linear
    regressor on CNTK features matches the exact CNTK on CIFAR-10 with a 150x speedup), the exact solve being
    O(n^3) in time and O(n^2) in memory.

Ours
    The NTK of ``ntkit.mlp(1, W_std=sqrt 2, b_std=0.1)`` (one hidden ReLU layer, with biases) on flattened
    images (pixels in [0, 1]): scikit-learn's bundled 8x8 digits (quick) or the MNIST t10k set (``data=``,
    full; the 60 000-image training set and the exact solve at that n do not fit a shared 2-core machine).
    Feature maps :class:`ntkit.features.NTKRandomFeatures` and :class:`ntkit.features.NTKSketch` (degree 8),
    float32, for a grid of m. Sizes (``QUICK`` / ``FULL``): 1400 / 8000 training and 397 / 2000 test images,
    Gram error on 200 / 400 images over 16 / 12 seeds, m from 64 / 128 to 2048 / 4096.

    * Gram error: ||Phi Phi^T - K||_F / ||K||_F on a fixed subset of the images, mean and standard error
      over S seeds of the feature map; power law fitted with those errors (:func:`._common.fit_power_law`).
      Claim, per map: the exponent is within 3 standard errors of -1/2 (the sketch's deterministic
      polynomial-fit error, ``fit_error_`` ~ 0.016, sits below the sketching noise on this grid; on MNIST
      8000/2000 kernel ridge regression with the duals replaced by their degree-8 polynomials scores 97.75 %
      against the exact kernel's 97.50 %, so the sketch's accuracy gap at finite m is sketching variance, not
      the fit).
    * Accuracy: ridge regression (one-hot targets minus 0.1, arg-max), every method at its OWN ridge, as the
      paper compares them: lambda = r x mean diag K (exact) or r x mean ||phi(x)||^2 (features) with r tuned
      on ``RIDGE_GRID`` (10^-6 ... 1) by fitting the first 80 % of the training images and scoring the last
      20 % (validation accuracy, ties broken by the lower squared error), then refit on all training images
      and scored once on the test images. The test set plays no part in the choice. One eigendecomposition
      per method (of K_fit, of Phi^T Phi for m <= n_fit, of Phi Phi^T otherwise) makes the grid cheap.
      Claims: at the largest m, exact accuracy minus feature accuracy <= 3 binomial standard errors of a
      difference of two accuracies on n_test images (sqrt(2 p (1 - p) / n_test)); the gap at the largest m
      is below the gap at the smallest m.
    * Time: everything each method needs from the images to the test predictions (kernel or features, the
      ridge tuning, the refit, the predictions), measured in the same run at the largest n; claim: the exact
      regressor's time over the features' at m = ``m_time`` (128 quick, 1024 full) is > 1.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ...kernels import mlp
from ...features import NTKRandomFeatures, NTKSketch
from ...report import Report, claim
from ..._linalg import symmetric_eigh
from ..._progress import progress as progress_bar
from ..data import load_images
from ._common import fit_power_law

NAME = "zandieh-sketch"
TITLE = "Zandieh et al. 2021 / Han et al. 2021: NTK sketch and random features vs the exact NTK"

# ridge lambda = r x mean diag K (exact) or mean ||phi(x)||^2 (features), r tuned per method on the last
# val_fraction of the training images
RIDGE_GRID = [1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
QUICK = {"n_train": 1400, "n_test": 397, "n_err": 200, "seeds": 16, "ms": [64, 128, 256, 512, 1024, 2048],
         "m_time": 128, "val_fraction": 0.2, "ridge_grid": RIDGE_GRID}
FULL = {"n_train": 8000, "n_test": 2000, "n_err": 400, "seeds": 12, "ms": [128, 256, 512, 1024, 2048, 4096],
        "m_time": 1024, "val_fraction": 0.2, "ridge_grid": RIDGE_GRID}
MAPS = {"NTK random features (Han et al.)": lambda a, m, s: NTKRandomFeatures(a, m, random_state=s,
                                                                               dtype=torch.float32, progress=False),
        "NTK Sketch (Zandieh et al.)": lambda a, m, s: NTKSketch(a, m, random_state=s, dtype=torch.float32,
                                                                 progress=False)}


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _m_axis(ax, ms) -> None:
    """Log x axis labelled at the grid's m values only (matplotlib's minor labels overlap)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ms))
    ax.set_xticklabels([str(m) for m in ms])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("feature dimension m")


def _accuracy(pred: torch.Tensor, labels: np.ndarray) -> float:
    return float((pred.argmax(1).cpu().numpy() == labels).mean())


def _fmt_r(r: float) -> str:
    """1e-06 -> '1e-6', 0.0003 -> '3e-4', 1.0 -> '1'."""
    mant, exp = f"{r:.0e}".split("e")
    return mant if int(exp) == 0 else f"{mant}e{int(exp)}"


def _tie_note(name: str, tuned: dict, grid) -> str:
    """'<name>: r = ...' and, when several r share the best validation accuracy, which ones."""
    va = tuned["validation_accuracy"]
    tied = [r for r, a in zip(grid, va) if a == max(va)]
    note = f"{name}: r = {_fmt_r(tuned['r'])}"
    if len(tied) > 1:
        note += (f" (validation accuracy {100 * max(va):.2f} % for every r from {_fmt_r(tied[0])} to "
                 f"{_fmt_r(tied[-1])}: flat there, the squared error decides)")
    return note + "."


def _pick(pred_val: list, labels_val: np.ndarray, y_val: torch.Tensor) -> int:
    """Index of the best ridge on the validation split: highest accuracy, ties broken by the lower squared error."""
    keys = [(_accuracy(p, labels_val), -float(((p - y_val) ** 2).mean())) for p in pred_val]
    return max(range(len(keys)), key=lambda i: keys[i])


def _tune(a: torch.Tensor, k_val: torch.Tensor, rhs: torch.Tensor, labels_val: np.ndarray, grid, scale: float
          ) -> dict:
    """Ridge on the fit part for every lambda = r * scale of ``grid`` at the cost of one eigendecomposition
    a = U S U^T, scored on the validation part: validation predictions k_val U (S + lambda)^-1 U^T rhs. Kernel
    form: a = K_fit, k_val = K(val, fit), rhs = Y_fit; feature (primal) form: a = Phi^T Phi, k_val = Phi_val,
    rhs = Phi^T Y_fit. Returns the chosen r and lambda and the validation accuracy of every r."""
    w, u = symmetric_eigh(a.to(torch.float64))  # copies a view (K_fit of the exact Gram) and never writes to a
    w = w.clamp_min(0)
    uty = u.T @ rhs.to(torch.float64)
    kvu = k_val.to(torch.float64) @ u
    del u
    y_val = torch.as_tensor(np.eye(rhs.shape[1])[labels_val] - 0.1)
    preds = [kvu @ (uty / (w + r * scale)[:, None]) for r in grid]
    i = _pick(preds, labels_val, y_val)
    return {"r": grid[i], "lambda": grid[i] * scale, "accuracy": _accuracy(preds[i], labels_val),
            "validation_accuracy": [_accuracy(p, labels_val) for p in preds]}


def _features_tuned(fm, xtr, ytr, ltr, xte, n_fit: int, grid):
    """Ridge regression on features with its own lambda (r times the mean squared feature norm, the features'
    mean diag K) tuned like the exact solve's on the same validation split: the primal Phi^T Phi (m <= n) or
    the dual Phi Phi^T (m > n) is eigendecomposed once; then refit on all training rows and predict the test
    rows. Feature products in float64."""
    f = fm.transform(xtr).to(torch.float64)
    scale = float((f * f).sum(1).mean())
    ff, fv = f[:n_fit], f[n_fit:]
    if f.shape[1] <= n_fit:  # primal: validation predictions Phi_val (Phi^T Phi + lambda)^-1 Phi^T Y
        tuned = _tune(ff.T @ ff, fv, ff.T @ ytr[:n_fit].to(torch.float64), ltr[n_fit:], grid, scale)
    else:
        tuned = _tune(ff @ ff.T, fv @ ff.T, ytr[:n_fit], ltr[n_fit:], grid, scale)
    if f.shape[1] <= f.shape[0]:
        a = f.T @ f
        a.diagonal().add_(tuned["lambda"])
        coef = torch.cholesky_solve(f.T @ ytr.to(torch.float64), torch.linalg.cholesky(a))
    else:
        a = f @ f.T
        a.diagonal().add_(tuned["lambda"])
        coef = f.T @ torch.cholesky_solve(ytr.to(torch.float64), torch.linalg.cholesky(a))
    del f, ff, fv, a
    pred = fm.transform(xte).to(torch.float64) @ coef
    return pred, tuned


def run(out=None, *, quick: bool = False, seed: int = 0, data=None, progress: bool = True) -> Report:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = time.perf_counter()
    cfg = dict(QUICK if quick else FULL)
    images, labels, dname = load_images(data)
    n_train, n_test = cfg["n_train"], cfg["n_test"]
    if images.shape[0] < n_train + n_test:
        raise ValueError(f"{NAME} needs {n_train + n_test} images, {dname} holds {images.shape[0]}; "
                         "pass a larger data set or use quick=True")
    x = torch.as_tensor(images.reshape(len(images), -1), dtype=torch.float64)
    xtr, xte = x[:n_train], x[-n_test:]
    ltr, lte = labels[:n_train], labels[-n_test:]
    ytr = torch.as_tensor(np.eye(10)[ltr] - 0.1)
    arch = mlp(1, W_std=2 ** 0.5, b_std=0.1)
    ms, seeds = cfg["ms"], cfg["seeds"]
    rep = Report(TITLE, intro=(__doc__ or "").split("\n\n")[0].replace("\n", " "))
    results: dict = {"quick": quick, "seed": seed, "data": dname, "config": cfg}

    # 1. Gram error vs m ------------------------------------------------------------------------------
    xe = xtr[:cfg["n_err"]]
    k_exact = arch.kernel(xe, xe, get="ntk")
    k_norm = float(torch.linalg.norm(k_exact))
    err = {}
    fits = {}
    for name, make in MAPS.items():
        e = np.zeros((len(ms), seeds))
        for i, m in enumerate(progress_bar(ms, total=len(ms), desc=f"Gram error, {name.split(' (')[0]}",
                                           unit="m", enabled=progress)):
            for s in range(seeds):
                phi = make(arch, m, 1000 * seed + s).fit_transform(xe).double()
                e[i, s] = float(torch.linalg.norm(phi @ phi.T - k_exact)) / k_norm
        mean, se = e.mean(1), e.std(1, ddof=1) / math.sqrt(seeds)
        fit = fit_power_law(ms, mean, se)
        err[name], fits[name] = {"mean": mean, "stderr": se}, fit
        z = abs(fit.exponent + 0.5) / fit.stderr
        rep.add_claim(claim(f"{name}: relative Frobenius error of the Gram falls like m^-1/2 "
                            "(|fitted exponent + 1/2| in standard errors of the fit)", z, [0.0, 3.0],
                            exponent=fit.exponent, stderr=fit.stderr, n_seeds=seeds))
    results["gram_error"] = {nm: {"m": ms, **v, "exponent": fits[nm].exponent, "exponent_stderr": fits[nm].stderr}
                             for nm, v in err.items()}

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in MAPS:
        line = ax.errorbar(ms, err[name]["mean"], yerr=2 * err[name]["stderr"], fmt="o", ms=4, capsize=2,
                           label=f"{name}: exponent {fits[name].exponent:.3f} $\\pm$ {fits[name].stderr:.3f}")
        ax.plot(ms, fits[name].predict(ms), "-", color=line[0].get_color(), lw=1)
    ref = err[next(iter(MAPS))]["mean"][0] * (np.asarray(ms, float) / ms[0]) ** -0.5
    ax.plot(ms, ref, "k--", lw=1, label="$m^{-1/2}$")
    _m_axis(ax, ms)
    ax.set_yscale("log")
    ax.set_ylabel(r"$\|\Phi\Phi^T - K\|_F / \|K\|_F$")
    ax.set_title(f"Gram error, {cfg['n_err']} images, {seeds} seeds")
    ax.legend(fontsize=7)
    rep.section("Gram-matrix error vs feature dimension",
                f"{dname}, the first {cfg['n_err']} training images; mean over {seeds} seeds of the feature map, "
                "error bars 2 standard errors; lines: power laws fitted with those errors.")
    fig.tight_layout()
    rep.figure(fig, "gram_error", "Relative Frobenius error of the feature Gram against the exact NTK, log-log, "
               "with the m^-1/2 line.")
    plt.close(fig)

    # 2. Accuracy and time vs m at the full n, every method at its own ridge tuned on a validation split ------
    n_fit = n_train - int(round(cfg["val_fraction"] * n_train))
    grid = cfg["ridge_grid"]

    def exact():
        k = arch.kernel(xtr, xtr, get="ntk")
        tuned = _tune(k[:n_fit, :n_fit], k[n_fit:, :n_fit], ytr[:n_fit], ltr[n_fit:], grid,
                      float(k.diagonal().mean()))
        k.diagonal().add_(tuned["lambda"])
        coef = torch.cholesky_solve(ytr, torch.linalg.cholesky(k))
        del k
        pred = torch.cat([arch.kernel(xte[i:i + 500], xtr, get="ntk") @ coef for i in range(0, n_test, 500)])
        return pred, tuned
    (pred, tuned_exact), t_exact = _timed(exact)
    acc_exact = _accuracy(pred, lte)
    rows = [{"method": "exact NTK (Cholesky)", "m": "-", "ridge r": _fmt_r(tuned_exact["r"]),
             "validation accuracy (%)": 100 * tuned_exact["accuracy"], "test accuracy (%)": 100 * acc_exact,
             "time (s)": t_exact}]
    acc, tim, tuned = {}, {}, {}
    for name, make in MAPS.items():
        acc[name], tim[name], tuned[name] = [], [], []
        for m in progress_bar(ms, total=len(ms), desc=f"ridge, {name.split(' (')[0]}", unit="m", enabled=progress):
            def feat(m=m, make=make):
                fm = make(arch, m, 1000 * seed + 999).fit(xtr)
                return _features_tuned(fm, xtr, ytr, ltr, xte, n_fit, grid)
            (p, tn), t = _timed(feat)
            acc[name].append(_accuracy(p, lte))
            tim[name].append(t)
            tuned[name].append(tn)
            rows.append({"method": name, "m": m, "ridge r": _fmt_r(tn["r"]), "validation accuracy (%)": 100 * tn["accuracy"],
                         "test accuracy (%)": 100 * acc[name][-1], "time (s)": t})
    results["accuracy"] = {"exact": acc_exact, "n_train": n_train, "n_test": n_test, "n_fit": n_fit,
                           "ridge_grid": grid, "exact_tuning": tuned_exact,
                           **{nm: {"m": ms, "accuracy": acc[nm], "tuning": tuned[nm]} for nm in MAPS}}
    results["time_s"] = {"exact": t_exact, **{nm: {"m": ms, "time_s": tim[nm]} for nm in MAPS}}
    se_diff = math.sqrt(2 * acc_exact * (1 - acc_exact) / n_test)
    se_diff = max(se_diff, 1.0 / n_test)
    for name in MAPS:
        gap = acc_exact - acc[name][-1]
        rep.add_claim(claim(f"{name}: at m = {ms[-1]} the test accuracy is within 3 binomial standard errors "
                            "of the exact NTK's, each at its own ridge tuned on the validation split "
                            "(exact minus features, in standard errors)", gap / se_diff,
                            [-math.inf, 3.0], gap_points=100 * gap, stderr_points=100 * se_diff, n_test=n_test,
                            ridge_r_features=tuned[name][-1]["r"], ridge_r_exact=tuned_exact["r"]))
        rep.add_claim(claim(f"{name}: the accuracy gap to the exact NTK shrinks from m = {ms[0]} to m = {ms[-1]} "
                            "(gap at the largest m minus gap at the smallest, points)",
                            100 * (acc[name][0] - acc[name][-1]), [-math.inf, 0.0]))
        j = ms.index(cfg["m_time"])
        rep.add_claim(claim(f"{name}: at n = {n_train} the feature regressor with m = {cfg['m_time']} is faster than "
                            "the exact one, both including their ridge tuning (time ratio exact / features, same run)",
                            t_exact / tim[name][j], [1.0, math.inf], exact_s=t_exact, features_s=tim[name][j]))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in MAPS:
        axes[0].plot(ms, [100 * a for a in acc[name]], "o-", ms=4, label=name)
        axes[1].plot(ms, tim[name], "o-", ms=4, label=name)
    axes[0].axhline(100 * acc_exact, color="k", ls="--", label=f"exact NTK {100 * acc_exact:.2f} %")
    axes[0].axhspan(100 * (acc_exact - 3 * se_diff), 100 * acc_exact, color="0.85", label="3 binomial SE")
    axes[1].axhline(t_exact, color="k", ls="--", label=f"exact NTK {t_exact:.2f} s")
    for ax, yl in zip(axes, ("test accuracy (%)", "time: tuning + fit + predict (s)")):
        _m_axis(ax, ms)
        ax.set_ylabel(yl)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    axes[0].set_title(f"{dname}: {n_train} train / {n_test} test")
    axes[1].set_title("time, same run (1 process)")
    rep.section("Accuracy and time vs feature dimension",
                f"Ridge regression (one-hot targets minus 0.1, arg-max), every method at its own ridge, as in the "
                f"paper: lambda = r x mean diag K (exact) or r x mean squared feature norm (features), r tuned on "
                f"the grid {', '.join(_fmt_r(r) for r in grid)} by fitting the first {n_fit} training images and "
                f"scoring the other {n_train - n_fit} (highest validation accuracy, ties: lower squared error; one "
                f"eigendecomposition per method makes the grid cheap), then refit on all {n_train} and scored once "
                f"on the {n_test} test images. {_tie_note('Exact NTK', tuned_exact, grid)} Time: kernel or "
                "features, tuning, refit and test predictions of each method, in the same run.")
    fig.tight_layout()
    rep.figure(fig, "accuracy_time", "Test accuracy (exact NTK: dashed line, shaded: 3 binomial standard errors "
               "below it) and time of tuning + fit + predictions vs m.")
    plt.close(fig)
    rep.table(rows, caption="Accuracy and time, same run", fmt="{:.4g}")
    results["wall_time_s"] = time.perf_counter() - t0
    rep.update(results)
    if out is not None:
        rep.save(Path(out))
    return rep
