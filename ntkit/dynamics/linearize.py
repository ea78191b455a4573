"""First-order Taylor expansion of a network in its parameters (Lee et al. 2019, Eq. (6)).

    f_lin(x; theta) = f(x; theta_0) + J(x; theta_0) (theta - theta_0)

computed with one forward-mode product (``torch.func.jvp``) per call: the Jacobian is never stored.
Gradient descent on f_lin follows the kernel dynamics of the empirical NTK J J^T exactly, which is what
:func:`ntkit.dynamics.gradient_descent_mse` predicts in closed form.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, jvp

__all__ = ["LinearizedModel", "linearize"]


class LinearizedModel(nn.Module):
    """``f0(x) + J(x) (theta - theta0)``; its trainable parameters start at theta0 (see :func:`linearize`).

    ``self.base`` holds a frozen copy of the original network (parameters theta0, ``requires_grad=False``);
    the trainable copies are registered under the same names with dots replaced by "__". Parameters
    the original network did not train (``requires_grad=False``) stay fixed at theta0.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"linearize needs a torch.nn.Module, got {type(model).__name__}")
        base = copy.deepcopy(model)
        self._names = []
        self._fixed = []
        for name, p in model.named_parameters():
            if p.requires_grad:
                self._names.append(name)
                self.register_parameter(name.replace(".", "__"), nn.Parameter(p.detach().clone()))
            else:
                self._fixed.append(name)
        if not self._names:
            raise ValueError("the model has no trainable parameters (all requires_grad=False)")
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base

    def params(self) -> dict[str, torch.Tensor]:
        """Current trainable parameters theta, keyed by the original names."""
        return {n: getattr(self, n.replace(".", "__")) for n in self._names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta0 = {n: p for n, p in self.base.named_parameters() if n in self._names}
        consts = {n: p for n, p in self.base.named_parameters() if n not in self._names}
        consts.update(dict(self.base.named_buffers()))
        theta = self.params()
        delta = {n: theta[n] - theta0[n] for n in self._names}

        def f(params):
            return functional_call(self.base, {**consts, **params}, (x,))

        out, tangent = jvp(f, (theta0,), (delta,))
        return out + tangent


def linearize(model: nn.Module) -> LinearizedModel:
    """The linearization of ``model`` around its current parameters (Lee et al. 2019, Eq. (6)).

    Returns an ``nn.Module`` computing f(x; theta0) + J(x; theta0)(theta - theta0) by a Jacobian-vector
    product (memory of about two forward passes); train it with any torch optimizer. Example::

        lin = linearize(net)
        opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        loss = 0.5 * ((lin(x) - y) ** 2).mean(); loss.backward(); opt.step()
    """
    return LinearizedModel(model)
