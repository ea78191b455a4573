"""Mean-field quantities, phase diagrams and the depth profile of kappa / the mean predictor.

References: Poole et al. 2016; Schoenholz et al. 2017 (q*, c*, chi_1, xi); Xiao, Pennington & Schoenholz 2020
(kappa ~ 1/(l chi_1^l) in the ordered phase, mean predictor ~ l (chi(c*)/chi_1)^l in the chaotic phase).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.special import roots_hermitenorm

import ntkit
from ntkit.spectra import critical_weight_variance, depth_profile, mean_field, phase_diagram

pytestmark = pytest.mark.usefixtures("single_thread")


# ---- an independent mean-field implementation: numpy Gauss-Hermite, written here -------------------------
_Z, _W = roots_hermitenorm(200)
_W = _W / math.sqrt(2 * math.pi)  # E[f(z)], z ~ N(0, 1)


def _erf_np(x):
    from scipy.special import erf
    return erf(x)


def _q_star_np(w2, b2, q=1.0):
    for _ in range(100_000):
        qn = w2 * np.sum(_W * _erf_np(math.sqrt(q) * _Z) ** 2) + b2
        if abs(qn - q) < 1e-15 * qn:
            return qn
        q = qn
    raise RuntimeError("no convergence")


def _chi1_np(w2, b2):
    q = _q_star_np(w2, b2)
    dphi = 2 / math.sqrt(math.pi) * np.exp(-q * _Z**2)  # erf'(sqrt(q) z)
    return w2 * np.sum(_W * dphi**2)


def test_relu_critical_at_two():
    # ReLU, sigma_b = 0: chi_1 = sigma_w^2 / 2, so the transition is at sigma_w^2 = 2 (He et al. 2015 init)
    assert critical_weight_variance(ntkit.Relu(), 0.0, lo=0.5, hi=4.0) == pytest.approx(2.0, abs=1e-9)
    for w2 in (1.0, 1.5, 1.9):
        mf = mean_field(ntkit.Relu(), math.sqrt(w2), 0.0)
        assert mf.chi_1 == pytest.approx(w2 / 2, rel=1e-12)
        assert mf.phase == "ordered" and mf.c_star == 1.0
        assert mf.xi_1 == pytest.approx(-1 / math.log(w2 / 2), rel=1e-12)
    assert mean_field(ntkit.Relu(), math.sqrt(2.0), 0.0).phase == "critical"


def test_erf_critical_point_independent_quadrature():
    # Xiao et al. 2020 (Fig. 1) / Schoenholz et al. 2017: erf with sigma_b^2 = 0.18 is critical at sigma_w^2 ~ 1.75
    ours = critical_weight_variance(ntkit.Erf(), 0.18)
    ref = brentq(lambda w2: _chi1_np(w2, 0.18) - 1.0, 1.0, 3.0, xtol=1e-14, rtol=1e-14)
    assert ours == pytest.approx(ref, rel=1e-8)
    assert ours == pytest.approx(1.748, abs=2e-3)
    # the same through the generic quadrature activation (Hermite series of torch.erf)
    assert critical_weight_variance(ntkit.Elementwise(torch.erf), 0.18) == pytest.approx(ref, rel=1e-8)


@pytest.mark.parametrize("w2,b2", [(1.2, 0.18), (2.5, 0.18), (1.748, 0.18), (0.5, 0.0)])
def test_chi1_quadrature_vs_closed_form(w2, b2):
    closed = mean_field(ntkit.Erf(), math.sqrt(w2), math.sqrt(b2))
    quad = mean_field(ntkit.Elementwise(torch.erf), math.sqrt(w2), math.sqrt(b2))
    assert quad.chi_1 == pytest.approx(closed.chi_1, rel=1e-8)
    assert quad.q_star == pytest.approx(closed.q_star, rel=1e-8, abs=1e-12)
    if b2 > 0:  # the numpy reference (q* > 0)
        assert closed.chi_1 == pytest.approx(_chi1_np(w2, b2), rel=1e-10)
    assert quad.c_star == pytest.approx(closed.c_star, abs=1e-8)
    assert quad.chi_c_star == pytest.approx(closed.chi_c_star, rel=1e-7)


def test_chaotic_c_star_is_a_stable_fixed_point():
    mf = mean_field(ntkit.Erf(), math.sqrt(2.5), math.sqrt(0.18))
    assert mf.phase == "chaotic" and mf.chi_1 > 1 and 0 < mf.c_star < 1
    # fixed point of the correlation map, evaluated here with a 2-d Gauss-Hermite rule
    q, c = mf.q_star, mf.c_star
    z1, z2 = np.meshgrid(_Z, _Z, indexing="ij")
    ww = np.outer(_W, _W)
    u = math.sqrt(q) * z1
    v = math.sqrt(q) * (c * z1 + math.sqrt(1 - c * c) * z2)
    cmap = (2.5 * np.sum(ww * _erf_np(u) * _erf_np(v)) + 0.18) / q
    assert cmap == pytest.approx(c, abs=1e-9)
    slope = 2.5 * np.sum(ww * 4 / math.pi * np.exp(-u**2 - v**2))
    assert mf.chi_c_star == pytest.approx(slope, rel=1e-8) and slope < 1  # stable
    assert mf.xi_star == pytest.approx(-1 / math.log(slope), rel=1e-7)


def test_phase_diagram_marks_diverging_points_with_nan_without_hanging():
    t0 = time.perf_counter()
    pd = phase_diagram(ntkit.Relu(), [1.0, 1.9, 2.0, 2.5, 4.0], [0.0, 0.1])
    assert time.perf_counter() - t0 < 20
    ph, q = pd["phase"], pd["q_star"]
    assert ph.shape == (5, 2)
    # ReLU: sigma_w^2 > 2 -> q grows without bound; sigma_w^2 = 2 with bias -> q grows linearly
    assert torch.isnan(q[3:]).all() and torch.isnan(ph[3:]).all() and torch.isnan(q[2, 1])
    assert (ph[:2] == -1).all() and ph[2, 0] == 0
    assert q[0, 1] == pytest.approx(0.1 / (1 - 0.5), rel=1e-12)  # q* = sigma_b^2 / (1 - sigma_w^2 / 2)
    with pytest.raises(ValueError, match="diverges"):
        mean_field(ntkit.Relu(), 2.0, 0.1)
    # erf grid: the phase boundary lies where chi_1 crosses 1, consistent with the bisection
    wv = torch.linspace(1.0, 2.5, 16)
    pe = phase_diagram(ntkit.Erf(), wv, [0.18])
    crit = critical_weight_variance(ntkit.Erf(), 0.18)
    assert torch.equal(pe["phase"][:, 0] > 0, wv.double() > crit)


def test_bad_inputs():
    with pytest.raises(ValueError):
        mean_field(ntkit.Relu(), -1.0, 0.0)
    with pytest.raises(ValueError):
        mean_field("not-an-activation", 1.0, 0.0)
    with pytest.raises(ValueError):
        phase_diagram(ntkit.Relu(), [0.0, 1.0], [0.0])
    with pytest.raises(ValueError, match="change sign"):
        critical_weight_variance(ntkit.Relu(), 0.0, lo=0.5, hi=1.5)
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError):
        depth_profile(ntkit.Relu(), 1.0, 0.1, [1, -2], x)


def _data(n, n_test, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + n_test, d, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(d)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    return x[:n], x[n:], y - y.mean()


def test_depth_profile_kernels_are_the_architecture_kernels():
    x, _, _ = _data(8, 0)  # n < d: the depth-0 (linear) kernel is non-singular
    prof = depth_profile(ntkit.Erf(), 1.1, 0.3, [3, 0, 7], x, return_kernels=True)
    for i, dep in enumerate((3, 0, 7)):
        ref = ntkit.mlp(depth=dep, activation=ntkit.Erf(), W_std=1.1, b_std=0.3).kernel(x, get="ntk")
        torch.testing.assert_close(prof.kernels[i], ref, rtol=1e-13, atol=1e-14)
        ev = torch.linalg.eigvalsh(ref)
        assert float(prof.condition_number[i]) == pytest.approx(float(ev[-1] / ev[0]), rel=1e-10)


def test_kappa_grows_at_the_mean_field_rate_in_the_ordered_phase():
    # Xiao et al. 2020, Sec. 4: kappa(l) ~ C / (l chi_1^l), so log(l kappa(l)) has slope -log chi_1 in l.
    # Tolerance 1%: the prediction is asymptotic; the next correction to log(l kappa) is O(1/l) (the O(chi_1^l)
    # term next to the O(l chi_1^l) one), whose effect on a fitted slope over l in [30, 80] is O(1/l^2) ~ 1e-3
    # relative; measured agreement 0.1%. A wrong rate (e.g. slope -log chi_1 without the l factor, off by 1/l
    # ~ 2%) or the NNGP's chi_1 confusion would fail.
    x, _, _ = _data(30, 0)
    depths = list(range(30, 81, 2))
    prof = depth_profile(ntkit.Erf(), math.sqrt(1.2), math.sqrt(0.18), depths, x)
    assert prof.mean_field.phase == "ordered"
    ls = prof.depths.double().numpy()
    lk = np.log(prof.condition_number.numpy() * ls)
    slope = np.polyfit(ls, lk, 1)[0]
    pred = prof.predicted_log_kappa_slope
    assert pred == pytest.approx(-math.log(prof.mean_field.chi_1))
    assert slope == pytest.approx(pred, rel=1e-2)
    assert bool((prof.condition_number[1:] > prof.condition_number[:-1]).all())


def test_kappa_tends_to_one_and_predictor_decays_in_the_chaotic_phase():
    # chaotic phase: kappa -> 1 and the (data-dependent) mean predictor ~ l (chi(c*)/chi_1)^l (Xiao et al. 2020).
    # Tolerance 3% on the slope: measured 1% at l in [30, 80]; the correction is again O(1/l^2) relative.
    x, xt, y = _data(30, 15)
    depths = list(range(30, 81, 2))
    prof = depth_profile(ntkit.Erf(), math.sqrt(2.5), math.sqrt(0.18), depths, x, xt, y)
    mf = prof.mean_field
    assert mf.phase == "chaotic"
    kap = prof.condition_number
    assert float(kap[-1]) < 1 + 1e-4 and bool((kap[1:] <= kap[:-1] + 1e-12).all())
    ls = prof.depths.double().numpy()
    slope = np.polyfit(ls, np.log(prof.mean_predictor.numpy() / ls), 1)[0]
    assert prof.predicted_log_predictor_slope == pytest.approx(math.log(mf.chi_c_star / mf.chi_1))
    assert slope == pytest.approx(prof.predicted_log_predictor_slope, rel=3e-2)


def _assert_undefined(mf):
    assert mf.phase == "undefined"
    assert all(math.isnan(v) for v in mf[:6])


def test_depth_profile_readme_example_without_a_fixed_point():
    # Regression: the README call. ReLU at sigma_w^2 = 2 with a bias has no finite q* (q grows by sigma_b^2 per
    # layer), so mean_field raised "did not settle"; the finite-depth kernels, kappa(l) and the mean predictor
    # are well defined and must be computed, with the mean-field fields and predicted slopes NaN.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 5, generator=g, dtype=torch.float64)
    xt = torch.randn(5, 5, generator=g, dtype=torch.float64)
    y = torch.randn(20, generator=g, dtype=torch.float64)
    prof = depth_profile("relu", 2**0.5, 0.1, range(1, 100), x, xt, y)
    _assert_undefined(prof.mean_field)
    assert math.isnan(prof.predicted_log_kappa_slope) and math.isnan(prof.predicted_log_predictor_slope)
    assert prof.depths.tolist() == list(range(1, 100))
    for v in (prof.condition_number, prof.lambda_max, prof.lambda_min, prof.mean_predictor):
        assert v.shape == (99,) and bool(torch.isfinite(v).all())
    assert bool((prof.condition_number >= 1).all())
    with pytest.raises(ValueError, match="did not settle"):  # the single-point API still refuses (documented)
        mean_field("relu", 2**0.5, 0.1, max_iter=200)


def test_depth_profile_in_the_diverging_phase_matches_the_architecture_kernels():
    # ReLU with sigma_w^2 = 4: q* = infinity (q doubles per layer), yet each finite-depth kernel is finite; checked
    # against ntkit.mlp(...).kernel and a direct solve of the mean predictor Theta_st Theta_tt^{-1} y.
    x, xt, y = _data(8, 4)
    depths = [1, 7, 30]
    prof = depth_profile(ntkit.Relu(), 2.0, 0.1, depths, x, xt, y, return_kernels=True)
    _assert_undefined(prof.mean_field)
    assert math.isnan(prof.predicted_log_kappa_slope) and math.isnan(prof.predicted_log_predictor_slope)
    for i, dep in enumerate(depths):
        arch = ntkit.mlp(depth=dep, activation=ntkit.Relu(), W_std=2.0, b_std=0.1)
        k_tt = arch.kernel(x, get="ntk")
        torch.testing.assert_close(prof.kernels[i], k_tt, rtol=1e-12, atol=0)
        f = arch.kernel(xt, x, get="ntk") @ torch.linalg.solve(k_tt, y)
        assert float(prof.mean_predictor[i]) == pytest.approx(float(f.pow(2).mean().sqrt()), rel=1e-8)
    with pytest.raises(ValueError, match="diverges"):
        mean_field(ntkit.Relu(), 2.0, 0.1)


def test_phase_diagram_requires_1d_axes():
    # Regression: a 2-d weight_variances was silently flattened into a 2-row grid.
    with pytest.raises(ValueError, match=r"weight_variances must be a 1-d sequence.*\(1, 2\)"):
        phase_diagram("relu", [[1.0, 2.0]], [0.0])
    with pytest.raises(ValueError, match="bias_variances must be a 1-d"):
        phase_diagram("relu", [1.0], torch.zeros(2, 2, dtype=torch.float64))
    assert phase_diagram("relu", [1.0, 1.5], [0.0])["q_star"].shape == (2, 1)


def test_phase_diagram_accepts_integer_grids():
    pd = phase_diagram(ntkit.Relu(), [1, 2], [0])
    assert pd["phase"][0, 0] == -1 and pd["phase"][1, 0] == 0
