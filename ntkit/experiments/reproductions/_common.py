"""Pieces shared by the reproductions: power-law fits with standard errors, full-batch training."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = ["PowerLawFit", "fit_power_law", "train_full_batch", "train_ensemble_full_batch", "unit_circle",
           "bonferroni_t", "log_sd_stderr", "ratio_stderr", "uci_subset", "paired_difference"]


@dataclass(frozen=True)
class PowerLawFit:
    """``y ~ c * x**exponent`` fitted by least squares on log-log axes.

    ``stderr`` is the standard error of the exponent (from the residuals, or from the given
    per-point errors of y); ``predict(x)`` evaluates the fitted line.
    """

    exponent: float
    stderr: float
    prefactor: float
    n_points: int

    def predict(self, x) -> np.ndarray:
        return self.prefactor * np.asarray(x, dtype=float) ** self.exponent

    def interval(self, k: float = 2.0) -> tuple[float, float]:
        """``exponent +- k * stderr``."""
        return self.exponent - k * self.stderr, self.exponent + k * self.stderr


def fit_power_law(x: Sequence[float], y: Sequence[float], y_err: Sequence[float] | None = None) -> PowerLawFit:
    """Fit ``log y = a + b log x``; weighted by ``1 / (y_err / y)^2`` when ``y_err`` is given.

    With ``y_err`` the standard error of b comes from the propagated errors (delta method,
    sd(log y) ~ y_err / y); without, from the residual scatter (needs >= 3 points).
    """
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    n = lx.size
    if n < 2 or not (np.all(np.isfinite(lx)) and np.all(np.isfinite(ly))):
        raise ValueError(f"a power-law fit needs >= 2 positive finite points, got x={list(x)}, y={list(y)}")
    if y_err is not None:
        s = np.asarray(y_err, float) / np.asarray(y, float)
        w = 1.0 / np.maximum(s, 1e-300) ** 2
    else:
        w = np.ones(n)
    a_mat = np.stack([np.ones(n), lx], axis=1)
    wa = a_mat * w[:, None]
    cov = np.linalg.inv(a_mat.T @ wa)
    coef = cov @ (wa.T @ ly)
    if y_err is None:
        if n < 3:
            se = float("nan")
        else:
            resid = ly - a_mat @ coef
            se = math.sqrt(float(resid @ resid) / (n - 2) * cov[1, 1])
    else:
        se = math.sqrt(cov[1, 1])
    return PowerLawFit(float(coef[1]), se, float(math.exp(coef[0])), n)


def train_full_batch(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    learning_rate: float,
    steps: int,
    loss: str | Callable = "mse",
    record: Sequence[int] = (),
    x_eval: torch.Tensor | None = None,
    callback: Callable[[int, torch.nn.Module], None] | None = None,
) -> dict:
    """Full-batch gradient descent (plain SGD on the whole set), in place on ``model``.

    The MSE loss is ``0.5 * mean((f - y)^2)`` over all entries (``1/m`` normalisation of ntkit's
    dynamics, with the 1/2 of Jacot et al.), so GD with learning rate eta matches
    ``ntkit.dynamics.gradient_descent_mse(k, y, learning_rate=eta)`` at t = steps * eta.

    Returns ``{"steps": [...], "loss": [...], "f_train": [...], "f_eval": [...]}`` at the ``record``
    steps (0 = before training). ``callback(step, model)`` runs at every recorded step.
    """
    if isinstance(loss, str):
        if loss != "mse":
            raise ValueError(f"loss must be 'mse' or a callable, got {loss!r}")

        def loss_fn(f, t):
            return 0.5 * ((f - t) ** 2).mean()
    else:
        loss_fn = loss
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=learning_rate)
    record = sorted(set(int(s) for s in record))
    out: dict = {"steps": [], "loss": [], "f_train": [], "f_eval": []}

    def _record(step):
        with torch.no_grad():
            f = model(x)
            out["steps"].append(step)
            out["loss"].append(float(loss_fn(f, y)))
            out["f_train"].append(f.detach().clone())
            if x_eval is not None:
                out["f_eval"].append(model(x_eval).detach().clone())
        if callback is not None:
            callback(step, model)

    nxt = 0
    for step in range(steps + 1):
        if nxt < len(record) and record[nxt] == step:
            _record(step)
            nxt += 1
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return out


# ---------------------------------------------------------------------------------------------------
# helpers of the Jacot / Lee / Hanin-Nica reproductions
# ---------------------------------------------------------------------------------------------------
def unit_circle(angles: Sequence[float] | np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Points ``(cos g, sin g)`` on the unit circle, shape (len(angles), 2) (Jacot et al. 2018, Figs. 1-2)."""
    g = torch.as_tensor(np.asarray(angles, dtype=float), dtype=dtype)
    return torch.stack([torch.cos(g), torch.sin(g)], dim=1)


def bonferroni_t(n_tests: int, dof: int, alpha: float = 1e-3) -> float:
    """Two-sided Student-t quantile for ``n_tests`` simultaneous z-scores at family-wise level ``alpha``.

    A mean over S seeds with its standard error estimated from the same seeds is t-distributed with
    S - 1 degrees of freedom; the largest of ``n_tests`` such |t| exceeds this value with probability
    at most ``alpha`` (Bonferroni), whatever the correlation between the tests.
    """
    from scipy.stats import t as student_t

    return float(student_t.ppf(1.0 - alpha / (2.0 * max(int(n_tests), 1)), int(dof)))


def log_sd_stderr(n_seeds: int) -> float:
    """Standard error of log(sample standard deviation) from ``n_seeds`` Gaussian samples: 1/sqrt(2(S-1))."""
    return 1.0 / math.sqrt(2.0 * (int(n_seeds) - 1))


def ratio_stderr(a: float, sa: float, b: float, sb: float) -> float:
    """Standard error of a / b for independent a, b with standard errors sa, sb (delta method)."""
    return abs(a / b) * math.sqrt((sa / a) ** 2 + (sb / b) ** 2)


def train_ensemble_full_batch(
    models: Sequence[torch.nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    learning_rate: float,
    steps: int,
    record: Sequence[int] = (),
) -> dict:
    """:func:`train_full_batch` (MSE loss 0.5 mean (f - y)^2) of several independent networks of the same
    shape at once, in place: their parameters are stacked and the forward pass is ``vmap``-ed over them,
    so one step trains every copy (e.g. every seed) with one batched matrix product per layer.

    ``y`` is (n, k), shared, or (S, n, k), one target per network. Each network gets exactly the update
    it would get alone (the summed loss has block-diagonal gradients). Returns ``{"steps", "loss", "f_train"}``
    at the ``record`` steps, with loss (S,) and f_train (S, n, k) per record.
    """
    import copy

    from torch.func import functional_call, stack_module_state, vmap

    models = list(models)
    params, buffers = stack_module_state(models)
    trainable = [k for k, p in models[0].named_parameters() if p.requires_grad]
    base = copy.deepcopy(models[0]).to("meta")

    def f(p, b, xx):
        return functional_call(base, (p, b), (xx,))

    fv = vmap(f, in_dims=(0, 0, None))
    yy = y if y.ndim == 3 else y.unsqueeze(0)
    record = sorted(set(int(s) for s in record))
    out: dict = {"steps": [], "loss": [], "f_train": []}
    nxt = 0
    for step in range(steps + 1):
        if nxt < len(record) and record[nxt] == step:
            with torch.no_grad():
                fo = fv(params, buffers, x)
                out["steps"].append(step)
                out["loss"].append((0.5 * ((fo - yy) ** 2).mean(dim=(1, 2))).detach().clone())
                out["f_train"].append(fo.detach().clone())
            nxt += 1
        if step == steps:
            break
        fo = fv(params, buffers, x)
        loss = (0.5 * ((fo - yy) ** 2).mean(dim=(1, 2))).sum()
        grads = torch.autograd.grad(loss, [params[k] for k in trainable])
        with torch.no_grad():
            for k, g in zip(trainable, grads):
                params[k].sub_(g, alpha=learning_rate)
    with torch.no_grad():
        for i, m in enumerate(models):
            for k, p in m.named_parameters():
                p.copy_(params[k][i])
    return out


def uci_subset(root, max_samples: int | None = None) -> list[str]:
    """Names of the UCI data set folders under ``root`` with at most ``max_samples`` samples (all if None),
    read from each set's metadata (``n_patrons1``) without loading the data."""
    from pathlib import Path

    from ..uci import _read_meta, list_uci_datasets

    names = list_uci_datasets(root)
    if max_samples is None:
        return names
    return [n for n in names if int(_read_meta(Path(root) / n / f"{n}.txt").get("n_patrons1", 0)) <= max_samples]


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the paired differences ``a - b`` (SE 0 for fewer than 2 pairs)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
    return float(d.mean()), se


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (reports are written to files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
