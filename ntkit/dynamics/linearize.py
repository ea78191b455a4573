"""First-order Taylor expansion of a network in its parameters (Lee et al. 2019, Eq. (6)).

    f_lin(x; theta) = f(x; theta_0) + J(x; theta_0) (theta - theta_0)

computed with one forward-mode product (``torch.func.jvp``) per call: the Jacobian is never stored.
Gradient descent on f_lin follows the kernel dynamics of the empirical NTK J J^T exactly, which is what
:func:`ntkit.dynamics.gradient_descent_mse` predicts in closed form.

Train/eval mode: the linearization is that of the network *as used at inference*, i.e. of
``f(x; theta)`` with the network in eval mode (BatchNorm normalizes with its running statistics, dropout
is the identity). This makes f_lin a fixed, deterministic function of (x, theta) that is affine in theta:
no BatchNorm running statistics are ever updated and no dropout mask is drawn, whatever
``LinearizedModel.train()`` / ``.eval()`` say (those switch only the linearized module's own flag).
Linearizing a network that holds layers still in train mode whose train-mode function differs
(BatchNorm / InstanceNorm tracking running statistics, dropout with p > 0, RReLU, attention dropout)
raises a ``ValueError``: call ``model.eval()`` first, so that the function being linearized is stated
explicitly rather than silently changed.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, jvp

__all__ = ["LinearizedModel", "linearize"]


def _mode_dependent_layers(model: nn.Module) -> list[str]:
    """Names (and types) of submodules in train mode whose train-mode function differs from their eval-mode one."""
    from torch.nn.modules.batchnorm import _BatchNorm  # noqa: PLC0415
    from torch.nn.modules.dropout import _DropoutNd  # noqa: PLC0415
    from torch.nn.modules.instancenorm import _InstanceNorm  # noqa: PLC0415

    found = []
    for name, m in model.named_modules():
        if not m.training:
            differs = False
        elif isinstance(m, (_BatchNorm, _InstanceNorm)):
            differs = bool(m.track_running_stats)  # batch statistics in train mode, running ones in eval mode
        elif isinstance(m, _DropoutNd):
            differs = float(m.p) > 0
        elif isinstance(m, nn.RReLU):
            differs = True  # random slopes in train mode
        elif isinstance(m, nn.MultiheadAttention):
            differs = float(m.dropout) > 0
        else:
            differs = False
        if differs:
            found.append(f"'{name or '<root>'}' ({type(m).__name__})")
    return found


class LinearizedModel(nn.Module):
    """``f0(x) + J(x) (theta - theta0)``; its trainable parameters start at theta0 (see :func:`linearize`).

    ``self.base`` holds a frozen copy of the original network (parameters theta0, ``requires_grad=False``,
    buffers as at linearization), always in eval mode: :meth:`train` / :meth:`eval` set this module's
    ``training`` flag but never the base's, so the linearized function stays deterministic and no
    buffer (BatchNorm running statistics, ``num_batches_tracked``) is ever updated. The trainable copies
    are registered under the same names with dots replaced by "__". Parameters the original network did
    not train (``requires_grad=False``) stay fixed at theta0.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"linearize needs a torch.nn.Module, got {type(model).__name__}")
        layers = _mode_dependent_layers(model)  # checked per submodule: a train-mode layer in an eval model counts
        if layers:
            raise ValueError(
                "linearize() linearizes the network as used at inference (eval mode), but these layers are in "
                f"train mode and compute a different function there: {', '.join(layers)}. "
                "Call model.eval() before linearize(model) (BatchNorm then uses its running statistics, "
                "dropout is the identity).")
        base = copy.deepcopy(model)
        base.eval()
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

    def train(self, mode: bool = True) -> "LinearizedModel":
        """Set this module's ``training`` flag; the frozen base network stays in eval mode."""
        super().train(mode)
        self.base.eval()
        return self

    def params(self) -> dict[str, torch.Tensor]:
        """Current trainable parameters theta, keyed by the original names."""
        return {n: getattr(self, n.replace(".", "__")) for n in self._names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.base.eval()  # also if someone switched lin.base.train() directly: the function stays fixed
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
    product (memory of about two forward passes); train it with any torch optimizer.

    The function linearized is ``model`` in eval mode (see the module docstring): if ``model`` is in
    train mode and contains BatchNorm with running statistics, dropout (p > 0) or similar layers, a
    ``ValueError`` asks for ``model.eval()`` first. The result never updates buffers and is
    deterministic; ``lin.train()`` / ``lin.eval()`` do not change it. Example::

        lin = linearize(net)
        opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        loss = 0.5 * ((lin(x) - y) ** 2).mean(); loss.backward(); opt.step()
    """
    return LinearizedModel(model)
