"""Xiao, Pennington & Schoenholz (ICML 2020), "Disentangling trainability and generalization in deep
neural networks": the order-to-chaos phase diagram of erf networks, the condition number and mean
predictor of the NTK against depth, and where infinitely wide networks trained by gradient descent
stop generalizing.

Paper's setup
    Fully-connected erf networks, NTK parameterization, sigma_w^2 / sigma_b^2 the weight / bias
    variances. Mean-field theory (Poole et al. 2016; Schoenholz et al. 2017) gives chi_1 =
    sigma_w^2 E[phi'(z)^2] at the fixed point q*; chi_1 = 1 is the order-to-chaos line (for erf:
    sigma_b^2 = 0.05, 0.10, 0.18, 0.20 -> sigma_w^2 ~ 1.376, 1.552, 1.748, 1.788). In the ordered phase
    the NTK's condition number grows like kappa(l) ~ 1 / (l chi_1^l) (depth scale xi_1 = -1/log chi_1):
    deep nets cannot be trained in finite time. In the chaotic phase kappa -> 1 (trainable) but the
    data-dependent part of the mean predictor Theta_test,train Theta^-1 Y decays like l (chi(c*)/chi_1)^l
    (and its share against the label-independent constant part like chi(c*)^l, depth scale xi_* =
    -1/log chi(c*)): deep chaotic nets memorize but do not generalize. The paper's Fig. 1/3 show the test
    accuracy of infinite-width networks trained by GD over (sigma_w^2, depth), with the lines at
    multiples of xi_1 (ordered) and xi_* (chaotic) bounding the region that generalizes.

Ours
    * the critical sigma_w^2 of the four sigma_b^2 above by bisection on chi_1 = 1
      (:func:`ntkit.spectra.critical_weight_variance`), and the chi_1 heat map with its chi_1 = 1 contour
      (:func:`ntkit.spectra.phase_diagram`);
    * kappa(l) and the mean predictor (labels centred over the training set) of the exact erf NTK
      (:func:`ntkit.spectra.depth_profile`) at one ordered and one chaotic point, with the slopes of
      log(l kappa) and log(mean predictor / l) against l fitted over the deep half of the depths and
      compared with -log chi_1 and log(chi(c*)/chi_1);
    * test accuracy of the infinite-width network trained by full-batch GD on the MSE loss for T steps at
      half the largest stable learning rate (:func:`ntkit.dynamics.gradient_descent_mse`, closed form,
      one-hot targets, float64), over a (sigma_w^2, depth) grid at sigma_b^2 = 0.1, with the lines
      8 xi_1 and 8 xi_* drawn. Data: MNIST when ``data`` is given (the full run uses 400 training and
      400 test images of the MNIST test set -- the paper uses larger sets; 2-core budget), otherwise
      scikit-learn's 8x8 digits (quick: 200 + 300). Inputs are centred by the training mean and scaled
      to norm sqrt(d), so q^0 = 1.

Claims
    * the four critical sigma_w^2 equal the paper's to its three decimals (|difference| <= 5e-4);
    * the fitted slopes match the mean-field predictions within three times the drift of the local
      slope between the two halves of the fitted range (the pre-asymptotic correction; floor 1 %);
    * every grid cell deeper than 16 xi (twice the drawn 8 xi line) is at chance: its accuracy is at most
      the majority-class share of the test set plus 4 binomial standard errors (fraction of such cells
      >= 0.9). The depth at which accuracy collapses is a multiple of xi whose factor depends on T, the
      training-set size and the precision (ordered phase: modes with lambda < lambda_max / T are not
      learned, so the collapse sits near xi_1 log T); the report lists the measured factor per column;
    * every grid cell shallower than xi (with depth <= 8 when xi is infinite) generalizes: its accuracy
      exceeds chance by more than 10 binomial standard errors (fraction >= 0.9).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ...dynamics import gradient_descent_mse, max_learning_rate
from ...kernels import Erf
from ...report import Report, claim
from ...spectra import critical_weight_variance, depth_profile, mean_field, phase_diagram
from ..data import load_images

NAME = "xiao-phase"
TITLE = "Xiao et al. 2020: erf order-chaos phase diagram, NTK conditioning and generalization vs depth"

#: Xiao et al. 2020 (erf): sigma_b^2 -> sigma_w^2 on the order-to-chaos line, as quoted (3 decimals)
PAPER_CRITICAL = {0.05: 1.376, 0.10: 1.552, 0.18: 1.748, 0.20: 1.788}


def _images(data, n_train: int, n_test: int, seed: int):
    images, labels, name = load_images(data)
    n = n_train + n_test
    if images.shape[0] < n:
        raise ValueError(f"{name} holds {images.shape[0]} images; need {n} (n_train + n_test)")
    idx = np.random.default_rng(seed).permutation(images.shape[0])[:n]
    x = torch.as_tensor(images[idx].reshape(n, -1), dtype=torch.float64)
    x = x - x[:n_train].mean(0)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(x.shape[1])
    return x, torch.as_tensor(labels[idx]), name


def _local_slope_fit(depths: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """Slope of ``values`` against depth over the deep half, and the drift of the slope between the two
    halves of that range (estimate of the pre-asymptotic error)."""
    half = len(depths) // 2
    d, v = depths[half:], values[half:]
    slope = float(np.polyfit(d, v, 1)[0])
    m = len(d) // 2
    s1 = float(np.polyfit(d[: m + 1], v[: m + 1], 1)[0])
    s2 = float(np.polyfit(d[m:], v[m:], 1)[0])
    return slope, abs(s2 - s1)


def run(out=None, *, quick: bool = False, seed: int = 0, data=None, progress: bool = True) -> Report:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..._progress import progress as bar

    t_start = time.perf_counter()
    act = Erf()
    n_train, n_test = (150, 200) if quick else (400, 400)
    w2_grid = np.linspace(0.6, 4.0, 6 if quick else 12)
    depths = [1, 2, 4, 8, 16, 24, 32, 48, 64] if quick else \
        [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 80, 100]
    b2_acc = 0.10
    t_train = 1e4  # GD steps at half the largest stable learning rate

    rep = Report(TITLE, intro=(__doc__ or "").split("\n\n")[0].replace("\n", " "))
    results: dict = {"quick": quick, "seed": seed}

    # 1. the order-to-chaos line ----------------------------------------------------------------------
    crit = {b2: critical_weight_variance(act, b2) for b2 in PAPER_CRITICAL}
    results["critical_weight_variance"] = {str(k): v for k, v in crit.items()}
    wv = np.linspace(0.5, 4.0, 36 if quick else 71)
    bv = np.linspace(0.0, 0.4, 21 if quick else 41)
    pd = phase_diagram(act, wv, bv)
    chi1 = pd["chi_1"].numpy()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    im = ax.pcolormesh(wv, bv, np.log(chi1.T), cmap="RdBu_r", vmin=-1.5, vmax=1.5, shading="auto")
    ax.contour(wv, bv, chi1.T, levels=[1.0], colors="k", linewidths=1.5)
    ax.plot(list(crit.values()), list(crit.keys()), "o", color="gold", mec="k", label="ours (bisection)")
    ax.plot(list(PAPER_CRITICAL.values()), list(PAPER_CRITICAL.keys()), "x", color="k", ms=9,
            label="Xiao et al. 2020")
    ax.set_xlabel(r"$\sigma_w^2$")
    ax.set_ylabel(r"$\sigma_b^2$")
    ax.set_title(r"erf: $\log\chi_1$ (ordered < 0 < chaotic); black line $\chi_1 = 1$")
    fig.colorbar(im, ax=ax, label=r"$\log\chi_1$")
    ax.legend(loc="upper left", fontsize=8)
    rep.section("Order-to-chaos line", "chi_1 = 1 separates the ordered phase (left) from the chaotic phase "
                "(right). Dots: our bisection; crosses: the paper's values.")
    rep.figure(fig, "phase_diagram", "log chi_1 over (sigma_w^2, sigma_b^2) for erf with the chi_1 = 1 contour.")
    rep.table([{"sigma_b^2": b2, "sigma_w^2 (ours)": crit[b2], "sigma_w^2 (paper)": p,
                "difference": crit[b2] - p} for b2, p in PAPER_CRITICAL.items()],
              caption="Critical weight variance (chi_1 = 1)", fmt="{:.5g}")
    for b2, p in PAPER_CRITICAL.items():
        rep.add_claim(claim(f"critical sigma_w^2 at sigma_b^2 = {b2} equals the paper's {p} to its 3 decimals",
                            crit[b2], [p - 5e-4, p + 5e-4]))

    # 2. condition number and mean predictor against depth -------------------------------------------
    x, labels, data_name = _images(data, n_train, n_test, seed)
    y = torch.nn.functional.one_hot(labels, 10).to(torch.float64)
    n_prof = min(n_train, 200)
    xp, xq = x[:n_prof], x[n_train:n_train + n_prof]
    yc = y[:n_prof] - y[:n_prof].mean(0)
    prof_depths = list(range(1, 41, 3)) if quick else list(range(1, 61))
    points = {"ordered": (1.2, 0.10), "chaotic": (3.0, 0.10)}
    profiles = {}
    for name, (w2, b2) in points.items():
        dp = depth_profile(act, math.sqrt(w2), math.sqrt(b2), prof_depths, xp, xq, yc)
        profiles[name] = dp
    ds = np.asarray(prof_depths, float)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    dpo, dpc = profiles["ordered"], profiles["chaotic"]
    log_lk = np.log(ds * dpo.condition_number.numpy())
    slope_k, drift_k = _local_slope_fit(ds, log_lk)
    pred_k = dpo.predicted_log_kappa_slope
    log_pl = np.log(dpc.mean_predictor.numpy() / ds)
    slope_p, drift_p = _local_slope_fit(ds, log_pl)
    pred_p = dpc.predicted_log_predictor_slope
    ax = axes[0]
    ax.semilogy(ds, dpo.condition_number.numpy(), "o-", ms=3, label=r"$\kappa$ (exact NTK)")
    ref = ds[-1]
    ax.semilogy(ds, dpo.condition_number.numpy()[-1] * ref / ds * np.exp(pred_k * (ds - ref)), "k--",
                label=r"theory $\propto 1/(l\,\chi_1^l)$")
    ax.set_xlabel("depth l (hidden layers)")
    ax.set_ylabel(r"condition number $\kappa$")
    ax.set_title(f"ordered: $\\sigma_w^2$={points['ordered'][0]}, $\\sigma_b^2$={points['ordered'][1]}, "
                 f"$\\xi_1$={dpo.mean_field.xi_1:.2f}")
    ax.legend()
    ax = axes[1]
    ax.semilogy(ds, dpc.mean_predictor.numpy(), "o-", ms=3, label="mean predictor (RMS, test)")
    ax.semilogy(ds, dpc.mean_predictor.numpy()[-1] * ds / ref * np.exp(pred_p * (ds - ref)), "k--",
                label=r"theory $\propto l\,(\chi_{c^*}/\chi_1)^l$")
    ax.set_xlabel("depth l (hidden layers)")
    ax.set_ylabel(r"$\|\Theta_{test,train}\Theta^{-1}Y\|_{rms}$")
    ax.set_title(f"chaotic: $\\sigma_w^2$={points['chaotic'][0]}, $\\sigma_b^2$={points['chaotic'][1]}")
    ax.legend()
    rep.section("Condition number and mean predictor against depth",
                f"Exact erf NTK on {n_prof} training and {n_prof} test inputs of {data_name}; labels centred. "
                "Dashed: the mean-field asymptotics anchored at the deepest point.")
    rep.figure(fig, "depth_profiles", "Left: kappa in the ordered phase; right: the mean predictor in the "
               "chaotic phase.")
    tol_k = max(3 * drift_k, 0.01 * abs(pred_k))
    tol_p = max(3 * drift_p, 0.01 * abs(pred_p))
    rep.add_claim(claim("ordered phase: slope of log(l kappa(l)) vs l equals -log chi_1", slope_k,
                        [pred_k - tol_k, pred_k + tol_k], predicted=pred_k, drift=drift_k))
    rep.add_claim(claim("chaotic phase: slope of log(mean predictor / l) vs l equals log(chi(c*)/chi_1)", slope_p,
                        [pred_p - tol_p, pred_p + tol_p], predicted=pred_p, drift=drift_p))
    results["depth_profile"] = {
        name: {"sigma_w2": points[name][0], "sigma_b2": points[name][1], "depths": prof_depths,
               "condition_number": profiles[name].condition_number.numpy(),
               "mean_predictor": profiles[name].mean_predictor.numpy(),
               "mean_field": profiles[name].mean_field._asdict()} for name in points}
    results["slopes"] = {"log_l_kappa": {"fitted": slope_k, "predicted": pred_k, "drift": drift_k},
                         "log_predictor_over_l": {"fitted": slope_p, "predicted": pred_p, "drift": drift_p}}

    # 3. GD test accuracy over (sigma_w^2, depth) ----------------------------------------------------
    ytr, lte = y[:n_train], labels[n_train:]
    acc = np.zeros((len(w2_grid), len(depths)))
    xi = np.zeros(len(w2_grid))
    phases = []
    for i, w2 in enumerate(bar(w2_grid, total=len(w2_grid), desc="xiao-phase GD grid", unit="sigma_w^2",
                               enabled=progress)):
        mf = mean_field(act, math.sqrt(w2), math.sqrt(b2_acc))
        phases.append(mf.phase)
        xi[i] = mf.xi_1 if mf.phase == "ordered" else mf.xi_star
        dp = depth_profile(act, math.sqrt(w2), math.sqrt(b2_acc), depths, x, return_kernels=True)
        for j in range(len(depths)):
            k = dp.kernels[j]
            ktt, kst = k[:n_train, :n_train], k[n_train:, :n_train]
            lr = 0.5 * max_learning_rate(ktt, n_outputs=10)
            pred = gradient_descent_mse(ktt, ytr, learning_rate=lr, discrete=True)
            f = pred.predict(t_train, k_test_train=kst).test
            acc[i, j] = float((f.argmax(1) == lte).double().mean())
        del dp
    counts = torch.bincount(lte, minlength=10).double()
    chance = float(counts.max() / n_test)
    se = math.sqrt(chance * (1 - chance) / n_test)
    dgrid = np.asarray(depths, float)[None, :]
    deep = dgrid > 16 * xi[:, None]
    shallow = dgrid <= np.where(np.isfinite(xi), xi, 8.0)[:, None]
    at_chance = acc <= chance + 4 * se
    learns = acc > chance + 10 * se
    frac_deep = float(at_chance[deep].mean()) if deep.any() else float("nan")
    frac_shallow = float(learns[shallow].mean()) if shallow.any() else float("nan")
    crit_acc = critical_weight_variance(act, b2_acc)
    collapse = []
    for i in range(len(w2_grid)):
        half = 0.5 * (acc[i].max() + chance)
        below = np.nonzero(acc[i] < half)[0]
        lc = math.nan
        if below.size and below[0] > 0:
            j = below[0]
            a0, a1 = acc[i, j - 1], acc[i, j]
            u = (a0 - half) / (a0 - a1)
            lc = float(math.exp((1 - u) * math.log(depths[j - 1]) + u * math.log(depths[j])))
        collapse.append({"sigma_w^2": w2_grid[i], "phase": phases[i], "xi": xi[i], "collapse depth": lc,
                         "collapse depth / xi": lc / xi[i] if math.isfinite(xi[i]) else math.nan})

    fig, ax = plt.subplots(figsize=(7, 4.6))
    im = ax.pcolormesh(w2_grid, np.arange(len(depths)), acc.T, cmap="viridis", vmin=0, vmax=1, shading="nearest")
    fig.colorbar(im, ax=ax, label="test accuracy")
    wfine = np.linspace(w2_grid[0], w2_grid[-1], 60 if quick else 200)
    xifine = []
    for w2 in wfine:
        mf = mean_field(act, math.sqrt(w2), math.sqrt(b2_acc))
        xifine.append(mf.xi_1 if mf.phase == "ordered" else mf.xi_star)
    xifine = np.asarray(xifine)
    log_axis = np.interp(np.log(np.clip(8 * xifine, depths[0], depths[-1] * 4)), np.log(depths),
                         np.arange(len(depths)), right=len(depths) - 1 + 1)
    ax.plot(wfine, np.where(8 * xifine <= depths[-1], log_axis, np.nan), "w--", lw=2, label=r"$8\xi$")
    log_axis1 = np.interp(np.log(np.clip(xifine, depths[0], depths[-1] * 4)), np.log(depths), np.arange(len(depths)))
    ax.plot(wfine, np.where(xifine <= depths[-1], log_axis1, np.nan), "w:", lw=1.5, label=r"$\xi$")
    ax.axvline(crit_acc, color="r", lw=1, label=r"$\chi_1 = 1$")
    ax.set_yticks(np.arange(len(depths)))
    ax.set_yticklabels([str(d) for d in depths], fontsize=7)
    ax.set_xlabel(r"$\sigma_w^2$ ($\sigma_b^2$ = %.2f)" % b2_acc)
    ax.set_ylabel("depth (hidden layers)")
    ax.set_title(f"infinite-width GD, T = {t_train:.0e} steps, {data_name}")
    ax.legend(loc="upper right", fontsize=8, facecolor="gray")
    rep.section("Where infinitely wide networks generalize",
                f"Test accuracy of the exact erf NTK trained by gradient descent ({n_train} training and {n_test} "
                f"test images of {data_name}, one-hot MSE, T = {t_train:.0e} steps at half the largest stable "
                f"learning rate). Lines: xi and 8 xi, with xi = xi_1 in the ordered phase and xi_* = "
                f"-1/log chi(c*) in the chaotic one. Chance (majority class): {chance:.3f} +- {se:.3f}.")
    rep.figure(fig, "accuracy_phase", "Test accuracy over (sigma_w^2, depth) with the depth scales.")
    rep.table(collapse, caption="Depth at which the accuracy falls half-way from its best to chance (log-linear "
              "interpolation; NaN: not inside the grid), in units of xi", fmt="{:.3g}")
    rep.add_claim(claim("cells deeper than 16 xi are at chance (fraction with acc <= chance + 4 SE)", frac_deep,
                        [0.9, 1.0], n_cells=int(deep.sum()), chance=chance, se=se))
    rep.add_claim(claim("cells shallower than xi generalize (fraction with acc > chance + 10 SE)", frac_shallow,
                        [0.9, 1.0], n_cells=int(shallow.sum())))
    results["accuracy_grid"] = {"sigma_w2": w2_grid, "sigma_b2": b2_acc, "depths": depths, "accuracy": acc,
                                "xi": xi, "phase": phases, "chance": chance, "chance_se": se,
                                "n_train": n_train, "n_test": n_test, "data": data_name, "steps": t_train,
                                "collapse": collapse}
    results["wall_time_s"] = time.perf_counter() - t_start
    rep.update(results)
    if out is not None:
        rep.save(Path(out))
    return rep
