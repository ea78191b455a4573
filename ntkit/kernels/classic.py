"""Classical stationary kernels with ntkit's kernel interface: Laplace, gamma-exponential, RBF.

Geifman et al. (NeurIPS 2020) show that on the hypersphere the Laplace kernel exp(-c ||x - y||) and the
FC ReLU NTK share eigenfunctions and eigenvalue decay (the same RKHS), and that gamma-exponential kernels
exp(-c ||x - y||^gamma) perform almost identically on real data. These classes are
:class:`~ntkit.KernelFunction` objects, so dynamics, spectra, estimators and benchmarks accept them
wherever they accept ``arch.kernel_fn("ntk")``.

Convention (Rasmussen & Williams 2006, Eq. 4.18): k(x, y) = exp(-(||x - y|| / length_scale)^gamma),
0 < gamma <= 2; gamma = 1 is the Laplace kernel, and the RBF kernel is exp(-||x - y||^2 / (2 l^2)).
"""

from __future__ import annotations

import math

import torch

from .._validation import ConfigError
from .base import KernelFunction

__all__ = ["GammaExponential", "Laplace", "RBF", "pairwise_distances"]


def pairwise_distances(x1: torch.Tensor, x2: torch.Tensor, same: bool = False, block: int = 2048) -> torch.Tensor:
    """Euclidean distances ||x1_i - x2_j||, blockwise; exactly 0 on the diagonal when ``same``.

    The expansion ||a||^2 + ||b||^2 - 2 a.b is fast but loses accuracy for nearly equal points, where its
    rounding can even be negative; it is clamped at 0, and for ``same`` the diagonal is set to 0 exactly.
    """
    a = x1.reshape(x1.shape[0], -1)
    b = x2.reshape(x2.shape[0], -1)
    na, nb = (a * a).sum(1), (b * b).sum(1)
    out = torch.empty((a.shape[0], b.shape[0]), dtype=a.dtype, device=a.device)
    for i0 in range(0, a.shape[0], block):
        sq = na[i0:i0 + block, None] + nb[None, :] - 2.0 * (a[i0:i0 + block] @ b.T)
        out[i0:i0 + block] = sq.clamp_min_(0.0).sqrt_()
    if same:  # a matmul's result is not bitwise symmetric: make the distance matrix exactly symmetric
        out = (out + out.T).mul_(0.5)
        out.fill_diagonal_(0.0)
    return out


def _check_positive(value, name):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
    return v


class GammaExponential(KernelFunction):
    """k(x, y) = exp(-(||x - y|| / length_scale)^gamma), 0 < gamma <= 2 (positive definite in any
    dimension exactly for gamma in (0, 2]: Schoenberg 1938).

    Parameters
    ----------
    length_scale : float > 0
    gamma : float in (0, 2]
    """

    name = "gamma_exponential"

    def __init__(self, length_scale: float = 1.0, gamma: float = 1.0):
        self.length_scale = _check_positive(length_scale, "length_scale")
        g = _check_positive(gamma, "gamma")
        if g > 2:
            raise ConfigError(f"gamma must lie in (0, 2] (the kernel is not positive definite for gamma > 2), "
                              f"got {gamma!r}")
        self.gamma = g

    def _from_distance(self, r: torch.Tensor) -> torch.Tensor:
        r = r / self.length_scale
        return torch.exp(-(r if self.gamma == 1.0 else r.pow(self.gamma)))

    def _matrix(self, x1, x2, same):
        return self._from_distance(pairwise_distances(x1, x2, same))

    def _diagonal(self, x1, x2):
        a, b = x1.reshape(x1.shape[0], -1), x2.reshape(x2.shape[0], -1)
        return self._from_distance((a - b).norm(dim=1))

    def to_config(self):
        return {"kernel": self.name, "length_scale": self.length_scale, "gamma": self.gamma}


class Laplace(GammaExponential):
    """k(x, y) = exp(-||x - y|| / length_scale) (gamma-exponential with gamma = 1)."""

    name = "laplace"

    def __init__(self, length_scale: float = 1.0):
        super().__init__(length_scale, 1.0)

    def to_config(self):
        return {"kernel": self.name, "length_scale": self.length_scale}


class RBF(GammaExponential):
    """k(x, y) = exp(-||x - y||^2 / (2 length_scale^2)) (Rasmussen & Williams 2006, Eq. 4.9)."""

    name = "rbf"

    def __init__(self, length_scale: float = 1.0):
        super().__init__(length_scale * math.sqrt(2.0), 2.0)
        self.rbf_length_scale = float(length_scale)

    def to_config(self):
        return {"kernel": self.name, "length_scale": self.rbf_length_scale}
