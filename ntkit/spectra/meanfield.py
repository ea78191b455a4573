"""Signal propagation (mean-field) quantities of a deep fully-connected network, and their consequences
for the NTK with depth.

For ``depth`` x [Dense(W_std, b_std), phi] followed by a Dense readout (``ntkit.mlp``; sigma_w^2 = W_std^2,
sigma_b^2 = b_std^2, NTK parameterization), following Poole et al. (2016), Schoenholz et al. (2017, Eqs. 3-9)
and Xiao, Pennington & Schoenholz (ICML 2020, "Disentangling trainability and generalization in deep neural
networks", Sec. 3-4):

* length map q -> sigma_w^2 E[phi(sqrt(q) z)^2] + sigma_b^2 (Schoenholz et al., Eq. 3), fixed point q*;
* correlation map c -> (sigma_w^2 E[phi(u) phi(v)] + sigma_b^2) / q*, (u, v) ~ N(0, q* [[1, c], [c, 1]])
  (Eq. 5), whose stable fixed point is c* (c* = 1 in the ordered phase);
* chi_1 = sigma_w^2 E[phi'(sqrt(q*) z)^2] (Eq. 7), the slope of the correlation map at c = 1: ordered phase
  chi_1 < 1, chaotic chi_1 > 1, critical chi_1 = 1;
* chi(c*) = sigma_w^2 E[phi'(u) phi'(v)] at correlation c*, the slope of the correlation map at c*;
* depth scales xi_1 = -1 / log chi_1 and xi_* = -1 / log chi(c*) (Eq. 9: correlations approach c* like
  exp(-l / xi_*)).

All expectations come from the activation's own dual kernel (``act.dual``, closed form or quadrature), so
every ntkit activation works. Iterations are bounded: a diverging length map (q* = infinity) is reported as
NaN in a phase diagram, as a ValueError for a single point (:func:`mean_field`), and as an all-NaN
``MeanField`` with phase "undefined" in a depth profile (whose kernels are finite at every finite depth) --
never a hang.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from .._validation import ConfigError, as_float_tensor
from ..kernels._state import KernelState
from ..kernels.activations import Activation
from ..kernels.config import layer_from_config
from ..kernels.layers import Dense, KernelContext

__all__ = ["MeanField", "mean_field", "phase_diagram", "critical_weight_variance", "DepthProfile",
           "depth_profile"]

_Q_MAX = 1e12  # a length map beyond this is treated as diverging
_Q_ZERO = 1e-250  # a length map below this has converged to q* = 0
_Q_FLOOR = 1e-100  # the variance at which quantities are evaluated when q* = 0 (their q -> 0 limit)
_PHASES = {"ordered": -1.0, "critical": 0.0, "chaotic": 1.0}


class MeanField(NamedTuple):
    """Mean-field quantities at one (sigma_w^2, sigma_b^2); see the module docstring."""

    q_star: float
    c_star: float
    chi_1: float
    chi_c_star: float
    xi_1: float
    xi_star: float
    phase: str  # "ordered", "chaotic" or "critical"; "undefined" (all fields NaN) only in a DepthProfile


_UNDEFINED = MeanField(math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, "undefined")


def _act(activation: Any) -> Activation:
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        try:
            layer = layer_from_config({"layer": activation})
        except (ConfigError, ValueError, KeyError, TypeError):
            layer = None
        if isinstance(layer, Activation):
            return layer
    raise ConfigError(f"activation must be an ntkit activation layer (ntkit.Relu(), ntkit.Erf(), "
                      f"ntkit.Elementwise(torch.tanh), ...) or the name of a parameter-free one (relu, abs, gelu, "
                      f"sign), got {activation!r}")


def _fixed_point(f, x0: torch.Tensor, lo: float, hi: float, *, tol: float, max_iter: int, cap: float = math.inf,
                 zero: float = -math.inf):
    """Vectorized fixed-point iteration x <- f(x) with Aitken's delta-squared acceleration (Steffensen).

    Each sweep evaluates x1 = f(x), x2 = f(x1) on the unfinished entries; where the observed contraction ratio
    r = (x2 - x1) / (x1 - x) satisfies |r| < 1 the sequence converges geometrically and its limit is
    extrapolated as x2 + r (x2 - x1) / (1 - r) (clipped into [lo, hi], which only corrects rounding since the
    limit of a convergent sequence lies there); otherwise (neutral or diverging maps) plain iteration
    continues. Returns (x, status) with status 1 converged, 2 diverged (non-finite or beyond ``cap``), 0 not
    settled within ``max_iter`` sweeps. |f(x) - x| <= tol max(|f(x)|, 1e-300), or f(x) < ``zero``, is
    convergence.
    """
    x = x0.clone()
    status = torch.zeros(x.shape, dtype=torch.int8)
    for _ in range(max_iter):
        run = (status == 0).nonzero().squeeze(1)
        if run.numel() == 0:
            break
        xa = x[run]
        x1 = f(xa, run)
        x2 = f(x1.clamp(lo, hi), run)
        div = ~torch.isfinite(x1) | ~torch.isfinite(x2) | (x1 > cap) | (x2 > cap)
        conv = ~div & (((x1 - xa).abs() <= tol * x1.abs().clamp_min(1e-300)) | (x1 < zero))
        d1, d2 = x1 - xa, x2 - x1
        r = d2 / torch.where(d1 == 0, torch.ones_like(d1), d1)
        good = (d1 != 0) & torch.isfinite(r) & (r.abs() < 1 - 1e-9)
        xe = torch.where(good, x2 + r / (1 - r) * d2, x2)
        xnew = torch.where(conv, torch.where(x1 < zero, torch.zeros_like(x1), x1), xe.clamp(lo, hi))
        x[run] = torch.where(div, xa, xnew)
        st = torch.zeros(run.shape, dtype=torch.int8)
        st[conv] = 1
        st[div] = 2
        status[run] = st
    return x, status


def _core(act: Activation, w2: torch.Tensor, b2: torch.Tensor, *, q0: float = 1.0, max_iter: int = 5_000,
          tol: float = 1e-14, critical_tol: float = 1e-6, correlation: bool = True, chi_unsettled: bool = False):
    """Vectorized mean-field quantities over flat float64 tensors w2, b2.

    Returns a dict of tensors: q_star (NaN where the length map diverges or does not settle in ``max_iter``
    sweeps), c_star, chi_1, chi_c_star, phase (-1 / 0 / +1; all NaN where q_star is), and the status of the
    length iteration (1 converged, 2 diverged, 0 not settled). ``chi_unsettled``: also evaluate chi_1 at the
    last iterate where the length map did not settle (used by the bisection for the sign of chi_1 - 1).
    """
    m = w2.numel()
    q, status = _fixed_point(lambda qa, idx: w2[idx] * act.variance(qa) + b2[idx],
                             torch.full((m,), float(q0), dtype=torch.float64), 0.0, math.inf, tol=tol,
                             max_iter=max_iter, cap=_Q_MAX, zero=_Q_ZERO)
    ok = status == 1
    nan = torch.full((m,), math.nan, dtype=torch.float64)
    out = {"q_star": torch.where(ok, q, nan), "status": status}
    out.update({key: nan.clone() for key in ("c_star", "chi_1", "chi_c_star", "phase")})
    if chi_unsettled:
        unset = status == 0
        if bool(unset.any()):
            qu = q[unset].clamp_min(_Q_FLOOR)
            out["chi_1"][unset] = w2[unset] * act.dual(qu.clone(), qu, qu)[1]
    if not bool(ok.any()):
        return out
    qe = q[ok].clamp_min(_Q_FLOOR)
    w2o, b2o = w2[ok], b2[ok]
    chi1 = w2o * act.dual(qe.clone(), qe, qe)[1]
    one = torch.ones_like(chi1)
    phase = torch.where(chi1 < 1 - critical_tol, -one, torch.where(chi1 > 1 + critical_tol, one, 0 * one))
    out["chi_1"][ok], out["phase"][ok] = chi1, phase
    if not correlation:
        return out
    # the stable fixed point of the correlation map: 1 in the ordered phase (and, marginally, at criticality);
    # in the chaotic phase c = 1 is unstable and the iteration from c = 0 finds c* < 1
    c = one.clone()
    chaos = (phase > 0).nonzero().squeeze(1)
    if chaos.numel():
        qc, wc, bc = qe[chaos], w2o[chaos], b2o[chaos]

        def cmap(ca, idx):
            nngp, _ = act.dual(ca * qc[idx], qc[idx], qc[idx], derivative=False)
            return (wc[idx] * nngp + bc[idx]) / qc[idx]

        cc, _ = _fixed_point(cmap, torch.zeros_like(qc), -1.0, 1.0, tol=tol, max_iter=max_iter)
        c[chaos] = cc
    chic = w2o * act.dual(c * qe, qe, qe)[1]
    out["c_star"][ok], out["chi_c_star"][ok] = c, chic
    return out


def _depth_scale(chi: float) -> float:
    """-1 / log chi for 0 < chi < 1 (Schoenholz et al. 2017, Eq. 9); inf at chi >= 1 or chi = 0 limits."""
    if not (chi > 0 and chi < 1):
        return math.inf if chi >= 1 or chi != chi else 0.0
    return -1.0 / math.log(chi)


def mean_field(activation: Any, W_std: float, b_std: float | None = 0.0, *, q0: float = 1.0,
               max_iter: int = 5_000, critical_tol: float = 1e-6) -> MeanField:
    """Mean-field quantities of a deep FC network at (sigma_w = W_std, sigma_b = b_std).

    Parameters
    ----------
    activation : ntkit activation layer or name ("relu", ...)
    W_std, b_std : float
        Weight and bias standard deviations of every hidden Dense layer (``b_std=None``: no bias).
    q0 : float
        Starting pre-activation variance of the length-map iteration (the input's q^0).
    max_iter : int
        Bound on each fixed-point iteration.
    critical_tol : float
        |chi_1 - 1| below this is reported as "critical".

    Returns
    -------
    MeanField
        q_star, c_star, chi_1, chi_c_star, xi_1 = -1/log chi_1 (inf when chi_1 >= 1), xi_star =
        -1/log chi(c*), and the phase. When q* = 0 (e.g. ReLU with sigma_b = 0 and sigma_w^2 < 2) the
        quantities are their q -> 0 limits.

    Raises
    ------
    ValueError
        When the length map has no finite fixed point (q grows without bound with depth) or does not
        settle within ``max_iter`` iterations.
    """
    mf, st, w2, b2 = _mean_field_status(_act(activation), W_std, b_std, q0=q0, max_iter=max_iter,
                                        critical_tol=critical_tol)
    if st == 2:
        raise ValueError(f"the length map diverges at sigma_w^2 = {w2:.6g}, sigma_b^2 = {b2:.6g}: no finite q* "
                         "(the pre-activation variance grows without bound with depth); lower W_std")
    if st == 0:
        raise ValueError(f"the length map did not settle within max_iter={max_iter} iterations at sigma_w^2 = "
                         f"{w2:.6g}, sigma_b^2 = {b2:.6g} (a marginally diverging or extremely slow fixed point); "
                         "raise max_iter or move away from this point")
    return mf


def _mean_field_status(act: Activation, W_std: float, b_std: float | None, *, q0: float = 1.0,
                       max_iter: int = 5_000, critical_tol: float = 1e-6) -> tuple[MeanField, int, float, float]:
    """(MeanField, status of the length map (1 converged, 2 diverged, 0 not settled), sigma_w^2, sigma_b^2);
    the MeanField is ``_UNDEFINED`` (all NaN) unless the status is 1. Validates W_std > 0, b_std >= 0."""
    try:
        w_std, b_val = float(W_std), float(b_std or 0.0)
    except (TypeError, ValueError):
        raise ValueError(f"W_std and b_std must be numbers, got W_std={W_std!r}, b_std={b_std!r}") from None
    w2, b2 = w_std ** 2, b_val ** 2
    if not (math.isfinite(w2) and w_std > 0 and math.isfinite(b2) and b_val >= 0):
        raise ValueError(f"W_std must be > 0 and b_std >= 0 (finite), got W_std={W_std!r}, b_std={b_std!r}")
    r = _core(act, torch.tensor([w2], dtype=torch.float64), torch.tensor([b2], dtype=torch.float64), q0=q0,
              max_iter=max_iter, critical_tol=critical_tol)
    st = int(r["status"][0])
    if st != 1:
        return _UNDEFINED, st, w2, b2
    chi1, chic = float(r["chi_1"][0]), float(r["chi_c_star"][0])
    phase = {-1.0: "ordered", 0.0: "critical", 1.0: "chaotic"}[float(r["phase"][0])]
    return (MeanField(float(r["q_star"][0]), float(r["c_star"][0]), chi1, chic, _depth_scale(chi1),
                      _depth_scale(chic), phase), st, w2, b2)


def phase_diagram(activation: Any, weight_variances: Sequence[float], bias_variances: Sequence[float], *,
                  q0: float = 1.0, max_iter: int = 5_000) -> dict:
    """Mean-field quantities over a (sigma_w^2, sigma_b^2) grid, all grid points at once (vectorized).

    Parameters
    ----------
    activation : ntkit activation layer or name
    weight_variances, bias_variances : 1-d sequences of sigma_w^2 > 0 and sigma_b^2 >= 0 (floating; other
        shapes raise ValueError rather than being flattened)

    Returns
    -------
    dict of float64 tensors shaped ``(len(weight_variances), len(bias_variances))``
        ``q_star``, ``c_star``, ``chi_1``, ``chi_c_star`` and ``phase`` (-1 ordered, 0 critical, +1 chaotic).
        **NaN is the documented marker** of grid points where no finite fixed point q* was found (the
        length map diverges, or does not settle within ``max_iter`` iterations); every quantity is NaN there.
        The phase boundary is the contour chi_1 = 1 (Xiao et al. 2020, Fig. 1; Schoenholz et al. 2017, Fig. 1).
    """
    act = _act(activation)
    # a grid of variances is a list of numbers: integers are fine here (unlike data, where they hint at labels)
    wv, bv = (as_float_tensor(torch.as_tensor(np.asarray(v, dtype=np.float64)) if not isinstance(v, torch.Tensor)
                              else v.to(torch.float64), name, dtype=torch.float64, min_ndim=1)
              for v, name in ((weight_variances, "weight_variances"), (bias_variances, "bias_variances")))
    for name, v in (("weight_variances", wv), ("bias_variances", bv)):
        if v.ndim != 1:
            raise ValueError(f"{name} must be a 1-d sequence (the grid axis), got shape {tuple(v.shape)}; "
                             "pass the axis values, e.g. torch.linspace(0.5, 4.0, 50)")
    if bool((wv <= 0).any()) or bool((bv < 0).any()):
        raise ValueError(f"weight variances must be > 0 and bias variances >= 0; got min sigma_w^2 = "
                         f"{float(wv.min()):.4g}, min sigma_b^2 = {float(bv.min()):.4g}")
    w2, b2 = torch.meshgrid(wv, bv, indexing="ij")
    r = _core(act, w2.reshape(-1), b2.reshape(-1), q0=q0, max_iter=max_iter)
    shape = (wv.numel(), bv.numel())
    return {key: r[key].reshape(shape) for key in ("q_star", "c_star", "chi_1", "chi_c_star", "phase")}


def critical_weight_variance(activation: Any, bias_variance: float, lo: float = 0.1, hi: float = 10.0, *,
                             xtol: float = 1e-13, max_iter: int = 500) -> float:
    """The sigma_w^2 at which chi_1 = 1 for the given sigma_b^2: the order-to-chaos transition
    (Schoenholz et al. 2017, Sec. 3; Xiao et al. 2020, Fig. 1).

    Bisection on chi_1(sigma_w^2) - 1 over [lo, hi] (chi_1 increases with sigma_w^2 along the line) to a
    relative width ``xtol``. Points where the length map diverges count as chaotic-side; where it has not
    settled after ``max_iter`` accelerated sweeps (marginal growth next to the transition) chi_1 is evaluated
    at the last iterate.

    Raises
    ------
    ValueError
        If chi_1 - 1 does not change sign on [lo, hi].
    """
    act = _act(activation)
    b2 = float(bias_variance)
    if not (math.isfinite(b2) and b2 >= 0):
        raise ValueError(f"bias_variance must be a finite number >= 0, got {bias_variance!r}")
    if not (0 < lo < hi):
        raise ValueError(f"need 0 < lo < hi, got lo={lo!r}, hi={hi!r}")

    def f(w2: float) -> float:
        r = _core(act, torch.tensor([w2], dtype=torch.float64), torch.tensor([b2], dtype=torch.float64),
                  critical_tol=0.0, correlation=False, chi_unsettled=True, max_iter=max_iter)
        v = float(r["chi_1"][0])
        return math.inf if v != v else v - 1.0

    flo, fhi = f(lo), f(hi)
    if not (flo < 0 < fhi):
        raise ValueError(f"chi_1 - 1 does not change sign from - to + on sigma_w^2 in [{lo}, {hi}] "
                         f"({flo:.3g}, {fhi:.3g}); widen the bracket")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if hi - lo <= xtol * mid:
            break
        fm = f(mid)
        if fm == 0:
            return mid
        if fm < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# -------------------------------------------------------------------------------------------------
# kappa and the mean predictor as functions of depth (Xiao et al. 2020, Sec. 4)
# -------------------------------------------------------------------------------------------------
class DepthProfile(NamedTuple):
    """Result of :func:`depth_profile` (all tensors indexed like ``depths``).

    depths : (L,) int64 numbers of hidden layers
    condition_number : (L,) kappa = lambda_max / lambda_min of the train-train kernel (inf when singular)
    lambda_max, lambda_min : (L,) extreme eigenvalues of the train-train kernel
    mean_predictor : (L,) RMS over test points and outputs of Theta_test,train Theta^{-1} Y (None without
        ``x_test`` and ``y``): the mean prediction of the infinitely wide network trained to convergence
    mean_field : MeanField at (W_std, b_std). **When the length map has no finite fixed point q*** (it
        diverges, e.g. ReLU with sigma_w^2 > 2, or grows without settling, e.g. ReLU with sigma_w^2 = 2 and
        sigma_b > 0, where q grows linearly in depth) every float field is NaN and ``phase`` is "undefined";
        the kernels, kappa(l) and the mean predictor are still computed, as they are finite at every depth.
    predicted_log_kappa_slope : -log chi_1, the slope in l of log(l kappa(l)) in the ordered phase
        (kappa ~ 1 / (l chi_1^l)); NaN outside the ordered phase (so also without a fixed point)
    predicted_log_predictor_slope : log(chi(c*) / chi_1), the slope in l of log(mean_predictor / l) in
        the chaotic phase (mean predictor ~ l (chi(c*) / chi_1)^l); NaN outside the chaotic phase (so also
        without a fixed point)
    kernels : (L, n, n) train-train kernels (only with ``return_kernels=True``, else None)
    """

    depths: torch.Tensor
    condition_number: torch.Tensor
    lambda_max: torch.Tensor
    lambda_min: torch.Tensor
    mean_predictor: torch.Tensor | None
    mean_field: MeanField
    predicted_log_kappa_slope: float
    predicted_log_predictor_slope: float
    kernels: torch.Tensor | None


def depth_profile(activation: Any, W_std: float, b_std: float | None, depths: Sequence[int], x_train: Any,
                  x_test: Any = None, y: Any = None, *, get: str = "ntk", parameterization: str = "ntk",
                  return_kernels: bool = False, dtype: torch.dtype | None = None) -> DepthProfile:
    """Condition number and mean predictor of the exact kernel of ``ntkit.mlp(depth, activation=activation,
    W_std=W_std, b_std=b_std)`` for every depth in ``depths``, in one pass of the layer recursion.

    Xiao, Pennington & Schoenholz (ICML 2020, Sec. 4) show that for large depth l the NTK Theta^(l) of an FC
    network approaches a data-independent fixed point, and that the rate decides trainability and
    generalization:

    * ordered phase (chi_1 < 1): Theta^(l) = Theta* 11^T-like + O(l chi_1^l), so lambda_max = O(n) while
      lambda_min = O(l chi_1^l): kappa ~ 1 / (l chi_1^l) grows exponentially and gradient descent cannot train
      beyond depth ~ xi_1 = -1 / log chi_1;
    * chaotic phase (chi_1 > 1): the diagonal grows like chi_1^l and dominates, kappa -> 1 (trainable), but the
      data-dependent part of the mean predictor Theta_test,train Theta^{-1} Y decays like l (chi(c*)/chi_1)^l,
      so deep chaotic networks cannot generalize beyond depth ~ 1 / log(chi_1 / chi(c*)).

    The kernels are computed with ntkit's own layer rules (``Dense.apply_kernel``, ``act.apply_kernel``) on
    train and test points together, advancing one hidden layer at a time and applying the readout at each
    requested depth: one recursion of depth max(depths) instead of one kernel per depth.

    Parameters
    ----------
    activation : ntkit activation layer or name
    W_std, b_std : float
        Of every Dense layer, the readout included (``ntkit.mlp`` defaults).
    depths : sequence of int >= 0
        Numbers of hidden layers.
    x_train : (n, d) inputs
    x_test : (n_test, d) inputs, optional
    y : (n,) or (n, k) targets, optional (needed with ``x_test`` for the mean predictor). Center them
        (subtract the mean) to see the data-dependent part that Xiao et al. analyse.
    get : "ntk" or "nngp"
    parameterization : "ntk" (the standard parameterization's NTK depends on finite widths)
    return_kernels : bool
        Also return the (L, n, n) train-train kernels.
    dtype : default float64

    Returns
    -------
    DepthProfile
        Its mean-field fields and predicted slopes are NaN (phase "undefined") when the length map has no
        finite fixed point; everything else is computed (see :class:`DepthProfile`).

    Raises
    ------
    FloatingPointError
        If the kernel overflows (chaotic or unbounded growth over very many layers).
    """
    if get not in ("ntk", "nngp"):
        raise ValueError(f"get must be 'ntk' or 'nngp', got {get!r}")
    if parameterization != "ntk":
        raise ConfigError("depth_profile supports the NTK parameterization only (the standard-parameterization "
                          "NTK depends on the finite widths)")
    act = _act(activation)
    dt = torch.float64 if dtype is None else dtype
    xs = as_float_tensor(x_train, "x_train", dtype=dt)
    n = xs.shape[0]
    xs = xs.reshape(n, -1)
    xt = None
    if x_test is not None:
        xt = as_float_tensor(x_test, "x_test", dtype=dt, device=xs.device)
        xt = xt.reshape(xt.shape[0], -1)
        if xt.shape[1] != xs.shape[1]:
            raise ValueError(f"x_test has {xt.shape[1]} features but x_train has {xs.shape[1]}")
    yt = None
    if y is not None:
        yt = as_float_tensor(y, "y", dtype=dt, device=xs.device, min_ndim=1)
        yt = yt.reshape(yt.shape[0], -1)
        if yt.shape[0] != n:
            raise ValueError(f"y has {yt.shape[0]} rows but x_train has {n}")
    try:
        ds = [int(d) for d in depths]
    except (TypeError, ValueError):
        raise ValueError(f"depths must be a sequence of integers >= 0, got {depths!r}") from None
    if not ds or any(d < 0 or d != float(dd) for d, dd in zip(ds, depths)):
        raise ValueError(f"depths must be a non-empty sequence of integers >= 0, got {depths!r}")
    # the asymptotic (mean-field) predictions need a finite q*; the finite-depth kernels do not
    mf = _mean_field_status(act, W_std, b_std)[0]

    x_all = xs if xt is None else torch.cat([xs, xt])
    d = x_all.shape[1]
    xa = x_all / math.sqrt(d)
    g = xa @ xa.T
    var = (xa * xa).sum(1)
    g.diagonal().copy_(var)
    st = KernelState(nngp=g, ntk=0.0 if get == "ntk" else None, var1=var[:, None], var2=var[None, :], width=d,
                     gaussian=False)
    ctx = KernelContext("ntk")
    dense = Dense(None, W_std, b_std)
    wanted = sorted(set(ds))
    results: dict[int, torch.Tensor] = {}
    level = 0
    for target in wanted:
        while level < target:
            st = act.apply_kernel(dense.apply_kernel(st, ctx), ctx)
            level += 1
        out = dense.apply_kernel(st, ctx)
        k = out.ntk if get == "ntk" else out.nngp
        if not bool(torch.isfinite(k).all()):
            raise FloatingPointError(f"the {get} kernel overflowed at depth {target} (chi_1 = {mf.chi_1:.4g}, "
                                     f"mean-field phase {mf.phase}); use fewer layers")
        results[target] = (k + k.T) / 2

    kap, lmax, lmin, pred, kers = [], [], [], [], []
    for dep in ds:
        k = results[dep]
        ktt = k[:n, :n]
        vals, vecs = torch.linalg.eigh(ktt)
        lmax.append(vals[-1])
        lmin.append(vals[0])
        kap.append(vals[-1] / vals[0] if float(vals[0]) > 0 else torch.tensor(math.inf, dtype=dt))
        if xt is not None and yt is not None:
            inv = torch.where(vals > 0, 1.0 / vals.clamp_min(torch.finfo(dt).tiny), torch.zeros_like(vals))
            alpha = vecs @ (inv[:, None] * (vecs.T @ yt))
            f = k[n:, :n] @ alpha
            pred.append(f.pow(2).mean().sqrt())
        if return_kernels:
            kers.append(ktt)
    slope_k = -math.log(mf.chi_1) if mf.phase == "ordered" and mf.chi_1 > 0 else math.nan
    slope_p = (math.log(mf.chi_c_star / mf.chi_1) if mf.phase == "chaotic" and mf.chi_c_star > 0 else math.nan)
    return DepthProfile(torch.tensor(ds), torch.stack(kap), torch.stack(lmax), torch.stack(lmin),
                        torch.stack(pred) if pred else None, mf, slope_k, slope_p,
                        torch.stack(kers) if return_kernels else None)
