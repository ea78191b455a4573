"""The infinite-width kernel state that flows through the layers of an architecture."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Union

import torch

__all__ = ["KernelState", "State"]


@dataclass(frozen=True)
class KernelState:
    """Kernels of the current activations for a block of input pairs.

    Attributes
    ----------
    nngp : Tensor
        Sigma(x, x') for the block: shape ``(b1, b2)`` (matrix mode) or ``(b,)`` (pairwise / diagonal
        mode, pairing row i of x1 with row i of x2).
    ntk : Tensor, float or None
        Theta(x, x') with the same shape as ``nngp``; ``0.0`` before any trainable layer; ``None``
        when the NTK is not requested (saves the work).
    var1, var2 : Tensor
        Sigma(x, x) for the rows of x1 and Sigma(x', x') for the rows of x2, shaped to broadcast
        against ``nngp``: ``(b1, 1)`` and ``(1, b2)`` in matrix mode, ``(b,)`` in pairwise mode.
    width : int or None
        Number of features of the current activations in the finite network (needed by the
        standard parameterization, whose NTK depends on the finite widths); None if unknown.
    gaussian : bool
        Whether the current activations are Gaussian pre-activations (the output of an affine
        layer, possibly summed over residual branches), which the activation dual kernels require.
    deps : frozenset
        The fan-outs whose input these activations are a function of without a Dense layer since
        (a Dense layer resets it).
    fresh : bool
        Whether the last layer was a Dense layer: the activations are zero-mean with weights of
        their own. ``FanInSum`` adds branch kernels only when every branch but one is fresh with
        empty ``deps`` -- then all cross terms E[f_i(x) f_j(x')] vanish; otherwise (x + relu(x), or
        two branches ending in ReLU, whose means do not vanish) the kernel of the sum needs cross
        terms, and it refuses rather than guess.
    """

    nngp: torch.Tensor
    ntk: Union[torch.Tensor, float, None]
    var1: torch.Tensor
    var2: torch.Tensor
    width: int | None
    gaussian: bool
    deps: frozenset = frozenset()
    fresh: bool = False

    def replace(self, **changes) -> "KernelState":
        return replace(self, **changes)


State = Union[KernelState, tuple]
