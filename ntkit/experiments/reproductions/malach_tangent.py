"""Malach, Kamath, Abbe & Srebro (ICML 2021), "Quantifying the benefit of using differentiable learning
over tangent kernels"; Daniely & Malach (NeurIPS 2020), "Learning parities with neural networks": a
task that gradient descent on a two-layer network learns while its tangent kernel cannot.

Paper's setup
    k-sparse parities y = prod_{i in S} x_i on x in {-1, 1}^n under a distribution that mixes the
    uniform distribution with one in which the k relevant bits are fixed to +1 (Daniely & Malach 2020):
    the second component makes the relevant coordinates correlate with the label, so gradient descent on
    a two-layer ReLU network finds them and then fits the parity; any kernel method -- the NTK at
    initialization included -- needs a number of samples growing like n^k to do better than chance on the
    uniform component. Malach et al. (2021) show more generally that GD can beat its own tangent kernel
    by a large margin, and relate the edge of the tangent kernel over chance to what GD can reach.

Ours
    n = 30 bits, k = 4 relevant ones, mixture weight 1/2. The network: ``ntkit.mlp(1, width=64)`` in the
    standard parameterization (ReLU, W_std = sqrt(2), b_std = 0.1), full-batch Adam (lr 1e-2, L2 1e-2)
    on the hinge loss for 400 steps. The kernels: the exact NTK of the same description (NTK
    parameterization) and the empirical NTK of the network at initialization
    (:func:`ntkit.empirical_ntk`), both as kernel ridge regression on the +-1 labels
    (:func:`ntkit.gradient_descent_mse` at t = inf, ridge 1e-4 of the mean diagonal). Accuracy is
    measured on the uniform component of a fresh test sample (where the labels are balanced and the
    relevant bits are not marked), for training-set sizes m up to 2000 (quick) / 3000 (full), 1 / 2
    network seeds. The paper's theory is asymptotic; these sizes are ours (2-core CPU).

Claims
    * at the largest m the network learns the parity: accuracy on the uniform component >= 0.9;
    * at every m the exact NTK and the empirical NTK at init stay at chance on the uniform component:
      |accuracy - 1/2| <= 4 binomial standard errors (0.5 / sqrt(n_test_uniform)).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ...dynamics import gradient_descent_mse
from ...empirical import empirical_ntk
from ...kernels import mlp
from ...report import Report, claim

NAME = "malach-tangent"
TITLE = "Malach et al. 2021 / Daniely & Malach 2020: GD learns a sparse parity, its tangent kernel does not"


def sample_parity(m: int, n: int, k: int, gen: torch.Generator, mix: float = 0.5):
    """``m`` samples of the k-sparse parity on {-1, 1}^n (relevant bits 0..k-1) under the mixture of
    the uniform distribution (weight 1 - mix) and the one with the relevant bits set to +1 (weight mix).

    Returns (x, y, marked) with ``marked`` True for samples of the second component.
    """
    x = torch.randint(0, 2, (m, n), generator=gen).to(torch.float64) * 2 - 1
    marked = torch.rand(m, generator=gen, dtype=torch.float64) < mix
    x[marked, :k] = 1.0
    return x, x[:, :k].prod(1), marked


def _kernel_accuracy(k_tt, k_st, y, y_test, uniform):
    reg = 1e-4
    pred = gradient_descent_mse(k_tt, y, diag_reg=reg).predict(float("inf"), k_test_train=k_st).test.reshape(-1)
    return float((pred.sign() == y_test)[uniform].double().mean())


def _figure(rows: list[dict], se: float, n: int, k: int):
    """Accuracy vs m, and the kernels' edge over chance vs the network's accuracy (rows of ``results.json``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sizes = [r["m"] for r in rows]
    ms = np.asarray(sizes)
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.3), layout="constrained")
    ax = axes[0]
    ax.semilogx(ms, [r["network"] for r in rows], "o-", label="two-layer network (GD/Adam)")
    ax.semilogx(ms, [r["exact NTK"] for r in rows], "s-", label="exact NTK (kernel regression)")
    ax.semilogx(ms, [r["empirical NTK at init"] for r in rows], "^-", label="empirical NTK at init")
    ax.axhspan(0.5 - 4 * se, 0.5 + 4 * se, color="gray", alpha=0.3, label="chance ± 4 SE")
    ax.axhline(0.5, color="k", lw=0.8)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(m) for m in sizes])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("training samples m (log scale)")
    ax.set_ylabel("test accuracy (uniform component)")
    ax.set_title(f"{k}-sparse parity on n = {n} bits")
    ax.set_ylim(0.35, 1.03)
    ax.legend(fontsize=8)
    ax = axes[1]
    for key, mk, c in (("exact NTK", "s", "C1"), ("empirical NTK at init", "^", "C2")):
        ax.plot([r["network"] for r in rows], [r[key] - 0.5 for r in rows], mk, color=c, ms=6, label=key)
    placed: list[float] = []
    for r in rows:  # one label per m; labels of points at about the same network accuracy are stacked
        j = sum(abs(r["network"] - x0) < 0.05 for x0 in placed)
        placed.append(r["network"])
        xt = r["network"] + (0.08 if r["network"] < 0.75 else -0.08)
        ax.annotate(f"m = {r['m']}", (r["network"], max(r["exact NTK"], r["empirical NTK at init"]) - 0.5),
                    xytext=(xt, (5.2 + 1.4 * j) * se), fontsize=8, ha="center", va="bottom",
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5", "shrinkA": 1, "shrinkB": 4})
    ax.axhspan(-4 * se, 4 * se, color="gray", alpha=0.3, label="chance ± 4 SE")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlim(0.4, 1.1)
    edges = [r[key] - 0.5 for r in rows for key in ("exact NTK", "empirical NTK at init")]
    ax.set_ylim(min(-5.5 * se, min(edges) - se), max(9.5 * se, max(edges) + 6 * se))
    ax.set_xlabel("network test accuracy at the same m (uniform component)")
    ax.set_ylabel("kernel's edge over chance (accuracy - 1/2)")
    ax.set_title("tangent kernels' edge vs what GD reaches")
    ax.legend(fontsize=8, loc="lower left")
    return fig


def run(out=None, *, quick: bool = False, seed: int = 0, data=None, progress: bool = True) -> Report:
    from ..._progress import progress as bar

    t0 = time.perf_counter()
    n, k, width = 30, 4, 64
    sizes = [250, 500, 1000, 2000] if quick else [125, 250, 500, 1000, 2000, 3000]
    n_test = 2000 if quick else 3000
    n_seeds = 1 if quick else 2
    steps, lr, wd = 400, 1e-2, 1e-2
    arch = mlp(1, width, W_std=math.sqrt(2), b_std=0.1, parameterization="standard")
    exact_arch = mlp(1, W_std=math.sqrt(2), b_std=0.1)
    gen = torch.Generator().manual_seed(seed)
    x_te, y_te, marked_te = sample_parity(n_test, n, k, gen)
    uni = ~marked_te
    n_uni = int(uni.sum())
    se = 0.5 / math.sqrt(n_uni)
    rows = []
    for m in bar(sizes, total=len(sizes), desc="malach-tangent", unit="size", enabled=progress):
        x, y, _ = sample_parity(m, n, k, gen)
        acc_net, acc_emp = [], []
        for s in range(n_seeds):
            net = arch.init(seed=seed + s, in_features=n)
            k_tt = empirical_ntk(net, x)
            k_st = empirical_ntk(net, x_te, x)
            acc_emp.append(_kernel_accuracy(k_tt, k_st, y, y_te, uni))
            opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=wd)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                torch.clamp(1 - y * net(x).reshape(-1), min=0).mean().backward()
                opt.step()
            with torch.no_grad():
                p = net(x_te).reshape(-1).sign()
            acc_net.append(float((p == y_te)[uni].double().mean()))
        acc_exact = _kernel_accuracy(exact_arch.kernel(x, get="ntk"), exact_arch.kernel(x_te, x, get="ntk"), y,
                                     y_te, uni)
        rows.append({"m": m, "network": float(np.mean(acc_net)), "network_seeds": acc_net,
                     "exact NTK": acc_exact, "empirical NTK at init": float(np.mean(acc_emp)),
                     "empirical_seeds": acc_emp})
    rep = Report(TITLE, intro=(__doc__ or "").split("\n\n")[0].replace("\n", " "))
    fig = _figure(rows, se, n, k)
    rep.section("Sparse parity: network vs its tangent kernel",
                f"{n_uni} uniform-component test points (binomial SE at chance {se:.4f}); network accuracy is the "
                f"mean over {n_seeds} seed(s).")
    rep.figure(fig, "parity", "Left: accuracy against the training-set size. Right: the kernels' edge over chance "
               "against the network's accuracy at the same sample size.")
    rep.table([{k2: v for k2, v in r.items() if not k2.endswith("seeds")} for r in rows],
              caption="Accuracy on the uniform component", fmt="{:.4g}")
    last = rows[-1]
    rep.add_claim(claim(f"the network learns the parity at m = {last['m']} (uniform-component accuracy)",
                        last["network"], [0.9, 1.0], seeds=last["network_seeds"]))
    worst_exact = max(abs(r["exact NTK"] - 0.5) for r in rows)
    worst_emp = max(abs(r["empirical NTK at init"] - 0.5) for r in rows)
    rep.add_claim(claim("the exact NTK stays at chance at every m (max |accuracy - 1/2| in SE)", worst_exact / se,
                        [0.0, 4.0], se=se))
    rep.add_claim(claim("the empirical NTK at init stays at chance at every m (max |accuracy - 1/2| in SE)",
                        worst_emp / se, [0.0, 4.0], se=se))
    rep.update({"quick": quick, "seed": seed, "n": n, "k": k, "width": width, "n_test_uniform": n_uni,
                "chance_se": se, "rows": rows, "wall_time_s": time.perf_counter() - t0})
    if out is not None:
        rep.save(Path(out))
    return rep
