"""Training dynamics for any differentiable loss by integrating the function-space ODE.

Gradient flow of L(f) = (1/m) sum_ij l(f_ij, y_ij) on a linearized / infinitely wide network moves the
training and test outputs by the kernel (Jacot et al. 2018, Eq. (3); Lee et al. 2019, Eq. (5)):

    d f_train/dt = -eta K   dL/df_train,        d f_test/dt = -eta K*  dL/df_train.

With heavy-ball momentum beta (Polyak 1964; continuum limit of torch.optim.SGD(momentum=beta) with t in
steps, Qian 1999) the flow is second order, starting at rest:

    f'' + (1 - beta) f' = -eta [K; K*] dL/df_train.

The ODE is integrated by an embedded Dormand-Prince 5(4) Runge-Kutta pair with error control
(Dormand & Prince 1980; Hairer, Norsett & Wanner, Solving ODEs I, Sec. II.5), in torch.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ._common import (TrainedTargets, check_rate, normalization_constant, regularize, resolve_kernel, targets, times,
                      to_tensor)
from .mse import Prediction

__all__ = ["ODEPredictor", "gradient_descent", "LOSSES", "dormand_prince"]

LOSSES = ("mse", "cross_entropy", "hinge", "logistic")


def _loss_grad(name: str, m: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """dL/df for the built-in losses, L = (1/m) sum of the per-entry (or per-sample for CE) loss."""
    if name == "mse":  # l = (f - y)^2 / 2
        return lambda f, y: (f - y) / m
    if name == "hinge":  # quadratic hinge l = max(0, 1 - y f)^2 / 2 (Geiger et al. 2020), y in {-1, +1}
        return lambda f, y: -y * torch.clamp(1 - y * f, min=0) / m
    if name == "logistic":  # l = log(1 + exp(-y f)), y in {-1, +1}
        return lambda f, y: -y * torch.sigmoid(-y * f) / m
    if name == "cross_entropy":  # l_i = -sum_j y_ij log softmax(f_i)_j, rows of y are probabilities
        return lambda f, y: (torch.softmax(f, dim=1) * y.sum(1, keepdim=True) - y) / m
    raise ValueError(f"loss must be one of {LOSSES} or a callable loss(f, y) -> scalar, got {name!r}")


def loss_value(name: str, f: torch.Tensor, y: torch.Tensor, m: float) -> torch.Tensor:
    """The built-in loss L(f) (used by tests and for monitoring)."""
    if name == "mse":
        return 0.5 * ((f - y) ** 2).sum() / m
    if name == "hinge":
        return 0.5 * (torch.clamp(1 - y * f, min=0) ** 2).sum() / m
    if name == "logistic":
        return torch.nn.functional.softplus(-y * f).sum() / m
    if name == "cross_entropy":
        return -(y * torch.log_softmax(f, dim=1)).sum() / m
    raise ValueError(f"unknown loss {name!r}")


# Dormand-Prince 5(4) tableau
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b - b4 for b, b4 in zip(_B, _B4))


def dormand_prince(rhs: Callable[[float, torch.Tensor], torch.Tensor], y0: torch.Tensor, t_out: list[float], *,
                   rtol: float = 1e-8, atol: float = 1e-10, max_steps: int = 1_000_000) -> list[torch.Tensor]:
    """Integrate y' = rhs(t, y) from t=0 and return y at the sorted times ``t_out`` (adaptive DOPRI5).

    The step lands exactly on each output time. Error norm: RMS of err / (atol + rtol * max(|y|, |y_new|)).
    """
    t, y = 0.0, y0
    k1 = rhs(t, y)
    scale = atol + rtol * y.abs()
    d0 = float(torch.sqrt(torch.mean((y / scale) ** 2)))
    d1 = float(torch.sqrt(torch.mean((k1 / scale) ** 2)))
    h = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    out, steps = [], 0
    for t_target in t_out:
        while t < t_target:
            h = min(h, t_target - t)
            ks = [k1]
            for i in range(1, 7):
                yi = y + h * sum(a * k for a, k in zip(_A[i], ks) if a != 0.0)
                ks.append(rhs(t + _C[i] * h, yi))
            y_new = y + h * sum(b * k for b, k in zip(_B, ks) if b != 0.0)  # equals yi of stage 7 (FSAL)
            err = h * sum(e * k for e, k in zip(_E, ks) if e != 0.0)
            sc = atol + rtol * torch.maximum(y.abs(), y_new.abs())
            en = float(torch.sqrt(torch.mean((err / sc) ** 2)))
            if not math.isfinite(en):
                h *= 0.2
                if h < 1e-300:
                    raise FloatingPointError("the ODE solution is not finite (diverging dynamics?)")
                continue
            if en <= 1.0:
                t = t + h if t_target - t - h > 1e-14 * max(1.0, abs(t_target)) else t_target
                y, k1 = y_new, ks[6]
            h *= min(5.0, max(0.2, 0.9 * en ** (-0.2) if en > 0 else 5.0))
            steps += 1
            if steps > max_steps:
                raise RuntimeError(f"ODE integration needed more than {max_steps} steps before t={t_target}; "
                                   "loosen rtol/atol or ask for an earlier time.")
        out.append(y)
    return out


class ODEPredictor(TrainedTargets):
    """Function-space training dynamics for a general loss (see :func:`gradient_descent`)."""

    def __init__(self, loss: str | Callable, k_train_train: Any, y_train: Any, *, learning_rate: float = 1.0,
                 momentum: float | None = None, diag_reg: float = 0.0, diag_reg_absolute_scale: bool = False,
                 loss_normalization: Any = None, x_train: Any = None, rtol: float = 1e-9, atol: float = 1e-12,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        k, self.kernel_fn = resolve_kernel(k_train_train, x_train, "k_train_train", dtype=dtype, device=device)
        if dtype is None and k.dtype != torch.float32:
            k = k.to(torch.float64)
        self.x_train = x_train
        self.dtype, self.device, self.n = k.dtype, k.device, k.shape[0]
        self.y_train, self._y_1d = targets(y_train, self.n, dtype=k.dtype, device=k.device)
        self.k_train_train, self.diag_reg = regularize(k, diag_reg, diag_reg_absolute_scale)
        self.learning_rate = check_rate(learning_rate, "learning_rate")
        if momentum is not None:
            momentum = check_rate(momentum, "momentum", allow_zero=True)
            if momentum >= 1:
                raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.rtol, self.atol = check_rate(rtol, "rtol"), check_rate(atol, "atol")
        if callable(loss):
            if loss_normalization is not None:
                raise ValueError("a callable loss returns the full (normalized) loss L(f, y); "
                                 "leave loss_normalization=None.")
            self.loss = loss
            self._grad = self._autograd(loss)
            self.m = 1.0
        else:
            if loss not in LOSSES:
                raise ValueError(f"loss must be one of {LOSSES} or a callable loss(f, y) -> scalar, got {loss!r}")
            self.loss = loss
            if loss_normalization is None:
                loss_normalization = "sample_mean" if loss == "cross_entropy" else "mean"
            self.m = normalization_constant(loss_normalization, self.n, self.y_train.shape[1])
            self._grad = _loss_grad(loss, self.m)
            if loss in ("hinge", "logistic") and not bool((self.y_train.abs() == 1).all()):
                raise ValueError(f"the {loss} loss needs labels in {{-1, +1}}; got values such as "
                                 f"{float(self.y_train[(self.y_train.abs() != 1)][0])}.")
            if loss == "cross_entropy" and bool((self.y_train < 0).any()):
                raise ValueError("cross_entropy needs non-negative targets (one-hot or probability rows).")

    @staticmethod
    def _autograd(loss):
        def grad(f, y):
            with torch.enable_grad():
                f = f.detach().requires_grad_(True)
                val = loss(f, y)
                if not isinstance(val, torch.Tensor) or val.numel() != 1:
                    raise ValueError("a callable loss must return a scalar tensor L(f, y)")
                (g,) = torch.autograd.grad(val.reshape(()), f)
            return g
        return grad

    def predict(self, t: Any, k_test_train: Any = None, f0_train: Any = None, f0_test: Any = None, *,
                x_test: Any = None) -> Prediction:
        """Train and test predictions at the times ``t`` (>= 0, finite; any order).

        Parameters as in :meth:`ntkit.dynamics.MSEPredictor.predict`; ``f0_*`` default to 0.
        """
        tt, scalar = times(t, dtype=self.dtype, device=self.device)
        if bool(torch.isinf(tt).any()):
            raise ValueError("t = inf is not available for a general loss (it may have no limit, e.g. "
                             "cross-entropy on separable data); use gradient_descent_mse for the MSE limit.")
        if x_test is not None:
            if self.kernel_fn is None:
                raise ValueError("x_test needs a predictor built from a kernel function")
            k_test_train = self.kernel_fn(x_test, self.x_train)
        n, k = self.n, self.y_train.shape[1]
        f0 = self._f0(f0_train, n, "f0_train")
        if k_test_train is not None:
            ks = to_tensor(k_test_train, "k_test_train", dtype=self.dtype, device=self.device)
            if ks.shape[1] != n:
                raise ValueError(f"k_test_train has shape {tuple(ks.shape)}; second dimension must be {n}")
            kall = torch.cat([self.k_train_train, ks], 0)
            z0 = torch.cat([f0, self._f0(f0_test, ks.shape[0], "f0_test")], 0)
        else:
            kall, z0 = self.k_train_train, f0
        y, eta, grad = self.y_train, self.learning_rate, self._grad
        if self.momentum is None:
            def rhs(_t, z):
                return -eta * kall @ grad(z[:n], y)
            state0 = z0
        else:
            fr = 1 - self.momentum
            nz = z0.shape[0]

            def rhs(_t, s):
                z, v = s[:nz], s[nz:]
                return torch.cat([v, -fr * v - eta * kall @ grad(z[:n], y)], 0)
            state0 = torch.cat([z0, torch.zeros_like(z0)], 0)
        order = torch.argsort(tt)
        sol = dormand_prince(rhs, state0, tt[order].tolist(), rtol=self.rtol, atol=self.atol)
        res = torch.empty((len(sol),) + tuple(z0.shape), dtype=self.dtype, device=self.device)
        for j, i in enumerate(order.tolist()):
            res[i] = sol[j][: z0.shape[0]]
        train, test = res[:, :n], (res[:, n:] if k_test_train is not None else None)
        return Prediction(self._shape(train, scalar), None if test is None else self._shape(test, scalar))


def gradient_descent(loss: str | Callable, k_train_train: Any, y_train: Any, *, learning_rate: float = 1.0,
                     momentum: float | None = None, diag_reg: float = 0.0, diag_reg_absolute_scale: bool = False,
                     loss_normalization: Any = None, x_train: Any = None, rtol: float = 1e-9, atol: float = 1e-12,
                     dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> ODEPredictor:
    """Function-space gradient flow for a general loss, by adaptive Runge-Kutta integration.

    Parameters
    ----------
    loss : "mse" | "cross_entropy" | "hinge" | "logistic" | callable
        Built-ins (L = (1/m) sum of per-entry losses; per-sample for cross-entropy):
        mse (f - y)^2 / 2; quadratic hinge max(0, 1 - y f)^2 / 2 (Geiger et al. 2020) and logistic
        log(1 + exp(-y f)) with y in {-1, +1}; cross_entropy -sum_j y_j log softmax(f)_j with y rows
        one-hot / probabilities. A callable ``loss(f, y) -> scalar`` is the whole loss L; its gradient
        is taken by autograd.
    k_train_train, y_train, learning_rate, diag_reg, diag_reg_absolute_scale, x_train : as in
        :func:`ntkit.dynamics.gradient_descent_mse`.
    momentum : float in [0, 1), optional
        Heavy-ball ODE f'' + (1 - beta) f' = -eta K dL/df, t in steps (see module docstring).
    loss_normalization : "mean" | "sample_mean" | "sum" | float, optional
        m; default "mean" (m = n k) for mse/hinge/logistic, "sample_mean" (m = n) for cross_entropy.
    rtol, atol : tolerances of the Dormand-Prince error control.

    Returns
    -------
    ODEPredictor with ``.predict(t, k_test_train=None, f0_train=None, f0_test=None)``.
    """
    return ODEPredictor(loss, k_train_train, y_train, learning_rate=learning_rate, momentum=momentum,
                        diag_reg=diag_reg, diag_reg_absolute_scale=diag_reg_absolute_scale,
                        loss_normalization=loss_normalization, x_train=x_train, rtol=rtol, atol=atol,
                        dtype=dtype, device=device)
