"""Arora, Du, Li, Salakhutdinov, Wang & Yu (ICLR 2020), "Harnessing the power of infinitely wide deep nets
on small-data tasks": SVM on the NTK over the 90 UCI classification sets.

Paper's setup
    The 90 UCI sets of Fernandez-Delgado et al. (JMLR 2014) with at most 5000 samples; hyper-parameters
    chosen on the training/validation split of ``conxuntos.dat``, accuracy averaged over the 4 test folds
    of ``conxuntos_kfold.dat``. SVM on the ReLU NTK with L = 1..5 layers and L' fixed bottom layers
    reaches 81.95 % mean accuracy (Table 1), above the random forest (81.56 %), the best of the 179
    classifiers of Fernandez-Delgado et al., and above trained finite networks.

Ours
    The same protocol, :func:`ntkit.experiments.uci.run_uci` (grids in :mod:`ntkit.experiments.uci`): NTK,
    random forest and a trained finite ReLU network (scikit-learn MLP); the full run adds the Laplace,
    gamma-exponential and RBF SVMs. Quick: the sets under ``data`` (the three small sets shipped with the
    tests), 50-tree forest. Full: every set under ``data`` (all 90), 500-tree forest, one process -- about
    4500 s of CPU time on one core (the sum of the methods' times in the recorded run); ``python -m
    ntkit.experiments.uci --jobs 2`` runs the same protocol resumably in 2 worker processes (2274 s wall on an
    otherwise idle 2-core machine).

Claims
    * the NTK is not worse than the random forest or the trained network: the mean paired accuracy
      difference (NTK - other, over data sets) is above -4 standard errors;
    * (only when all 90 sets were run) the NTK's mean accuracy is within one standard error of the mean
      over data sets (std / sqrt(90), about 1.5 points) of the paper's 81.95 %.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from ...report import Report, claim
from ..uci import PAPER_TABLE1, default_methods, run_uci
from ._common import paired_difference, uci_subset

NAME = "arora-uci"
TITLE = "Arora et al. 2020: SVM on the NTK over the 90 UCI sets"


def run(out=None, *, quick: bool = False, seed: int = 0, data=None, progress: bool = True) -> Report:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if data is None:
        raise ValueError("arora-uci needs data=: the folder of UCI data set folders (NAME/NAME.txt, ...)")
    t0 = time.perf_counter()
    allm = default_methods(rf_trees=50 if quick else 500, seed=seed)
    keys = ("ntk", "rf", "mlp") if quick else ("ntk", "laplace", "gamma_exp", "rbf", "rf", "mlp")
    methods = {k: allm[k] for k in keys}
    names = uci_subset(data)
    if out is not None:
        uci_out = Path(out) / "uci"
    else:
        import tempfile

        uci_out = Path(tempfile.mkdtemp(prefix="ntkit-arora-"))
    summary = run_uci(data, uci_out, methods=methods, datasets=names, progress=progress)
    acc = summary["accuracy"]
    sets = sorted(acc)
    a = {m: np.array([acc[s][m] for s in sets]) * 100 for m in methods}
    rep = Report(TITLE, intro=(__doc__ or "").split("\n\n")[0].replace("\n", " "))
    rows = sorted(({"method": m, "mean accuracy (%)": summary["methods"][m]["mean"],
                    "Friedman rank": summary["methods"][m]["friedman_rank"], "P90 (%)": summary["methods"][m]["p90"],
                    "PMA (%)": summary["methods"][m]["pma"],
                    "paper (%)": PAPER_TABLE1.get(m, "–")} for m in methods),
                  key=lambda r: -r["mean accuracy (%)"])
    rep.section("Accuracy over the UCI sets", f"{len(sets)} data sets; ranks and percentages among the methods run "
                "here (the paper ranks among 180 classifiers).")
    rep.table(rows, caption="Summary (Arora et al. 2020, Table 1 statistics)", fmt="{:.4g}")
    label = {"rf": "random forest", "mlp": "trained ReLU network (MLP)"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), layout="constrained")
    for ax, other in zip(axes, ("rf", "mlp")):
        mean, se = paired_difference(a["ntk"], a[other])
        ax.plot(a[other], a["ntk"], "o", ms=4, label=f"{len(sets)} data sets (one point each); mean NTK - "
                f"other: {mean:+.2f} ± {se:.2f} points")
        lo = min(a[other].min(), a["ntk"].min()) - 2
        ax.plot([lo, 100], [lo, 100], "k--", lw=1, label="equal accuracy (y = x)")
        ax.set_xlabel(f"{label[other]} test accuracy (%)")
        ax.set_ylabel("NTK SVM test accuracy (%)")
        ax.set_title(f"NTK vs {label[other]}: above the diagonal = NTK better", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    rep.figure(fig, "uci_ntk_vs_baselines", "Per-data-set test accuracy (mean of the 4 test folds).")
    results: dict = {"quick": quick, "seed": seed, "datasets": sets, "methods": list(methods),
                     "summary": {m: summary["methods"][m] for m in methods}, "paper": PAPER_TABLE1}
    for other in ("rf", "mlp"):
        mean, se = paired_difference(a["ntk"], a[other])
        rep.add_claim(claim(f"NTK is not worse than {other} (mean paired difference, points, above -4 SE)", mean,
                            [-4 * se, math.inf], stderr_points=se, n_datasets=len(sets)))
    if len(sets) == 90:
        ntk_mean = float(a["ntk"].mean())
        se_mean = float(a["ntk"].std(ddof=1) / math.sqrt(len(sets)))
        p = PAPER_TABLE1["ntk"]
        rep.add_claim(claim("NTK mean accuracy over the 90 sets equals the paper's 81.95 % (within one SE of the "
                            "mean over data sets)", ntk_mean, [p - se_mean, p + se_mean], stderr=se_mean))
    results["wall_time_s"] = time.perf_counter() - t0
    rep.update(results)
    if out is not None:
        rep.save(Path(out))
    return rep
