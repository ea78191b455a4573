"""Finite-width corrections of the NTK at initialization, measured over seeds and fitted with standard errors.

Two laws, both at initialization in the NTK parameterization:

* Fluctuations (Jacot et al. 2018, Thm. 1; Hanin & Nica 2020): the seed-to-seed standard deviation of the
  empirical NTK, relative to the exact limit, falls like ``width^-1/2`` at fixed depth (Geiger et al. 2020
  write the same as N^-1/4 in the number of parameters N ~ width^2).
* Second moment (Hanin & Nica 2020, Thm. 1): for a ReLU network of depth d and width n, the on-diagonal
  kernel K = Theta(x, x) of the weights has E[K^2] / E[K]^2 ~ exp(5 d / n) -- the fluctuations are governed
  by d / n, not by the width alone.

:func:`width_scaling` samples ``architecture.init(width, seed=s)`` over seeds at several widths and returns
both, with standard errors by the jackknife over seeds (no distributional assumption) and weighted
least-squares fits whose slope standard errors come from those errors.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import torch

from .._progress import progress as _progress
from .._validation import as_float_tensor
from .tracking import monte_carlo_kernel

__all__ = ["LineFit", "WidthScaling", "width_scaling", "fit_line", "jackknife"]


class LineFit(NamedTuple):
    """``y = intercept + slope * x`` by weighted least squares, with standard errors of both."""

    slope: float
    stderr: float
    intercept: float
    intercept_stderr: float
    chi2_per_dof: float

    def predict(self, x: Any) -> np.ndarray:
        return self.intercept + self.slope * np.asarray(x, dtype=float)


class WidthScaling(NamedTuple):
    """What :func:`width_scaling` measured (arrays have one entry per width).

    widths : (W,) hidden widths
    depth : number of hidden Dense layers (d of Hanin & Nica)
    seeds : number of initializations per width
    exact : (n, n) exact infinite-width NTK of the inputs
    fluctuation : relative seed spread ``||sd_s Theta_s||_F / ||Theta_inf||_F``
    fluctuation_stderr : its jackknife standard error
    fluctuation_fit : fit of ``log fluctuation`` vs ``log width``; slope ~ -1/2
    bias : ``||mean_s Theta_s - Theta_inf||_F / ||Theta_inf||_F`` (seed noise plus the O(1/width) bias)
    moment_ratio : ``E[K^2] / E[K]^2`` of the diagonal ``K = Theta(x, x)`` (geometric mean over the inputs)
    moment_ratio_stderr : its jackknife standard error
    moment_fit : fit of ``log moment_ratio`` vs ``depth / width``; slope ~ 5 for ReLU weights (Hanin & Nica)
    """

    widths: np.ndarray
    depth: int
    seeds: int
    exact: torch.Tensor
    fluctuation: np.ndarray
    fluctuation_stderr: np.ndarray
    fluctuation_fit: LineFit
    bias: np.ndarray
    moment_ratio: np.ndarray
    moment_ratio_stderr: np.ndarray
    moment_fit: LineFit


def fit_line(x: Sequence[float], y: Sequence[float], y_err: Sequence[float] | None = None) -> LineFit:
    """Weighted least-squares line ``y = a + b x`` (weights ``1 / y_err^2``; equal weights without).

    Standard errors: from ``y_err`` (scaled up by sqrt(chi^2 / dof) when the points scatter more than their
    errors allow, Birge's ratio), or from the residuals when no errors are given (needs >= 3 points).
    """
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    n = xa.size
    if n < 2 or xa.shape != ya.shape or not (np.all(np.isfinite(xa)) and np.all(np.isfinite(ya))):
        raise ValueError(f"a line fit needs >= 2 finite (x, y) pairs of equal length, got x={xa}, y={ya}")
    w = np.ones(n) if y_err is None else 1.0 / np.maximum(np.asarray(y_err, float), 1e-300) ** 2
    a = np.stack([np.ones(n), xa], axis=1)
    cov = np.linalg.inv(a.T @ (a * w[:, None]))
    coef = cov @ (a.T @ (w * ya))
    resid = ya - a @ coef
    dof = n - 2
    chi2 = float((w * resid**2).sum()) / dof if dof > 0 else float("nan")
    if y_err is None:
        scale = chi2 if dof > 0 else float("nan")
    else:
        scale = max(1.0, chi2) if dof > 0 else 1.0
    se = np.sqrt(np.diag(cov) * scale)
    return LineFit(float(coef[1]), float(se[1]), float(coef[0]), float(se[0]), chi2)


def jackknife(samples: torch.Tensor, statistic) -> tuple[float, float]:
    """``statistic(samples)`` and its leave-one-out jackknife standard error over the first axis (seeds)."""
    s = samples.shape[0]
    if s < 2:
        raise ValueError("the jackknife needs at least 2 samples")
    full = float(statistic(samples))
    idx = torch.arange(s)
    loo = np.array([float(statistic(samples[idx != i])) for i in range(s)])
    se = math.sqrt((s - 1) / s * float(((loo - loo.mean()) ** 2).sum()))
    return full, se


def _log_fluctuation(exact_norm: float):
    def stat(k: torch.Tensor) -> float:
        return math.log(float(k.std(0).norm()) / exact_norm)
    return stat


def _log_moment_ratio(diag: torch.Tensor) -> float:
    """mean over inputs of log(E_s[K^2] / E_s[K]^2); ``diag`` is (S, n)."""
    return float((torch.log((diag**2).mean(0)) - 2 * torch.log(diag.mean(0))).mean())


def width_scaling(architecture, x: Any, widths: Iterable[int], seeds: int | Iterable[int] = 32, *,
                  init: str = "gaussian", dtype: torch.dtype = torch.float64, progress: bool = False,
                  **ntk_options) -> WidthScaling:
    """Seed-to-seed fluctuations and the second moment of the empirical NTK at initialization vs width.

    For each width, samples the empirical NTK Theta_s(x, x') of ``architecture.init(width, seed=s)`` over
    the seeds (:func:`ntkit.empirical.monte_carlo_kernel`) and measures

    * the relative spread ``||sd_s Theta_s||_F / ||Theta_inf||_F``, fitted against width on log-log axes
      (Jacot et al. 2018, Thm. 1: slope -1/2; Geiger et al. 2020: N^-1/4 in the number of parameters);
    * the relative second moment of the diagonal, ``E[K^2] / E[K]^2`` with ``K = Theta(x, x)``, fitted as
      ``log ratio = a + b * depth / width`` (Hanin & Nica 2020, Thm. 1: ``exp(5 d / n)`` for ReLU networks,
      weights only, i.e. ``b_std=None``; with biases or other activations the constant differs).

    Standard errors are the jackknife over seeds; fit standard errors come from them (see :func:`fit_line`).

    Parameters
    ----------
    architecture : ntkit.Architecture
        Its hidden Dense layers (``depth`` = their number) get the widths; NTK parameterization expected
        (in the standard one the limit itself depends on the width).
    x : array (n, d)
        Inputs; the diagonal statistics average over them, the spread uses the whole n x n kernel.
    widths : iterable of int
        At least two (three for residual-based errors).
    seeds : int or iterable of int
        Initializations per width (int: ``range(seeds)``), at least 3.
    init : {"gaussian", "orthogonal"}
    dtype : torch dtype of the networks (default float64)
    progress : bool
        A progress bar over widths.
    **ntk_options : passed to :func:`ntkit.empirical.empirical_ntk`.

    Returns
    -------
    WidthScaling

    Examples
    --------
    >>> import ntkit, torch
    >>> arch = ntkit.mlp(3, activation="relu", W_std=2**0.5, b_std=None)
    >>> ws = ntkit.empirical.width_scaling(arch, torch.randn(4, 8), [16, 32, 64], seeds=20)  # doctest: +SKIP
    >>> ws.fluctuation_fit.slope, ws.fluctuation_fit.stderr                            # doctest: +SKIP
    (-0.5..., 0.0...)
    """
    if getattr(architecture, "parameterization", "ntk") != "ntk":
        raise ValueError("width_scaling compares finite networks with their width-independent limit, which "
                         "needs the NTK parameterization; build the architecture with parameterization='ntk'")
    ws = [int(w) for w in widths]
    if len(ws) < 2 or any(w < 1 for w in ws) or len(set(ws)) != len(ws):
        raise ValueError(f"widths must be at least two distinct positive integers, got {ws}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if len(seed_list) < 3:
        raise ValueError(f"width_scaling needs at least 3 seeds for jackknife errors, got {len(seed_list)}")
    xt = as_float_tensor(x, "x", dtype=dtype, min_ndim=2)
    depth = len(architecture.body.dense_layers()) - 1
    if depth < 1:
        raise ValueError("the architecture has no hidden Dense layer; width_scaling varies hidden widths")
    exact = architecture.kernel(xt, get="ntk", dtype=dtype)
    exact_norm = float(exact.norm())
    if not exact_norm > 0:
        raise ValueError("the exact NTK of these inputs is zero; nothing to compare the fluctuations with")
    fl, fl_se, bias, mr, mr_se = [], [], [], [], []
    for w in _progress(ws, total=len(ws), desc="width_scaling", unit="width", enabled=progress):
        mc = monte_carlo_kernel(architecture, xt, width=w, seeds=seed_list, get="ntk", init=init, dtype=dtype,
                                **ntk_options)
        k = mc.samples
        lf, lf_se = jackknife(k, _log_fluctuation(exact_norm))
        diag = torch.diagonal(k, dim1=1, dim2=2)
        lm, lm_se = jackknife(diag, _log_moment_ratio)
        fl.append(math.exp(lf))
        fl_se.append(math.exp(lf) * lf_se)
        mr.append(math.exp(lm))
        mr_se.append(math.exp(lm) * lm_se)
        bias.append(float((mc.mean - exact).norm()) / exact_norm)
    fl, fl_se, mr, mr_se = map(np.asarray, (fl, fl_se, mr, mr_se))
    warr = np.asarray(ws, float)
    fluct_fit = fit_line(np.log(warr), np.log(fl), fl_se / fl)
    moment_fit = fit_line(depth / warr, np.log(mr), mr_se / mr)
    return WidthScaling(warr.astype(int), depth, len(seed_list), exact, fl, fl_se, fluct_fit, np.asarray(bias),
                        mr, mr_se, moment_fit)
