"""Randomized sketches of tensor products: the fast Walsh-Hadamard transform and TensorSRHT.

TensorSRHT (Ahle et al. 2020; Han et al. 2021, Sec. 3.2): for u in R^p and v in R^q,

    S(u (x) v) = (1 / sqrt(m)) (P1 H D1 u) * (P2 H D2 v)          (elementwise product, length m)

with H the unnormalized +-1 Hadamard matrix (after zero-padding to a power of two), D1, D2 diagonal
matrices of independent random signs and P1, P2 independent uniform row samplers. For every pair of
inputs E[<S(u (x) v), S(u' (x) v')>] = <u, u'> <v, v'>: the sketch is unbiased, and its cost per
vector is O((p + q) log(p + q) + m) instead of the O(p q) of the explicit tensor product.
"""

from __future__ import annotations

import math

import torch

__all__ = ["fwht", "TensorSRHT"]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


_HADAMARD: dict = {}


def _hadamard(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The unnormalized k x k Sylvester-Hadamard matrix (k a power of two), cached per dtype and device."""
    key = (k, dtype, str(device))
    h = _HADAMARD.get(key)
    if h is None:
        h = torch.ones((1, 1), dtype=torch.float64)
        while h.shape[0] < k:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        h = _HADAMARD[key] = h.to(dtype=dtype, device=device)
    return h


def fwht(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform along the last axis (its length a power of two).

    H_p is the Kronecker product H_k1 (x) H_k2 (x) ... of Hadamard blocks of size k <= ``block``, applied
    one factor axis at a time as a matrix product: O(p * block * log_block(p)) multiply-adds per row in a
    few BLAS calls, much faster in practice than log2(p) elementwise butterfly passes.
    """
    n, p = x.shape[0], x.shape[-1]
    if p & (p - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {p}")
    y = x.reshape(n, p)
    right = 1
    while right < p:
        k = min(block, p // right)
        h = _hadamard(k, x.dtype, x.device)
        if right == 1:
            y = y.reshape(-1, k) @ h
        else:
            y = torch.matmul(h, y.reshape(-1, k, right))  # h is symmetric
        right *= k
    return y.reshape(n, p)


class _SRHT:
    """One factor of a TensorSRHT: x -> (P H D x)[rows], unnormalized, for inputs of dimension ``dim``."""

    def __init__(self, dim: int, m: int, gen: torch.Generator):
        self.dim = int(dim)
        self.pad = _next_pow2(self.dim)
        self.signs = (torch.randint(0, 2, (self.dim,), generator=gen, dtype=torch.int64) * 2 - 1).to(torch.float64)
        self.rows = torch.randint(0, self.pad, (int(m),), generator=gen, dtype=torch.int64)

    def to(self, dtype, device):
        self.signs = self.signs.to(dtype=dtype, device=device)
        self.rows = self.rows.to(device=device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad != self.dim:  # signs and zero padding in one pass
            y = x.new_zeros((x.shape[0], self.pad))
            torch.mul(x, self.signs, out=y[:, :self.dim])
        else:
            y = x * self.signs
        return fwht(y)[:, self.rows]


class TensorSRHT:
    """Unbiased sketch of u (x) v for batches ``u`` (n, p), ``v`` (n, q) into (n, m) (module docstring)."""

    def __init__(self, p: int, q: int, m: int, gen: torch.Generator):
        self.m = int(m)
        self.left = _SRHT(p, m, gen)
        self.right = _SRHT(q, m, gen)

    def to(self, dtype, device) -> "TensorSRHT":
        self.left.to(dtype, device)
        self.right.to(dtype, device)
        return self

    def __call__(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.left(u).mul_(self.right(v)).mul_(1.0 / math.sqrt(self.m))
