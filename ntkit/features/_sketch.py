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

__all__ = ["fwht", "TensorSRHT", "BlockSRHT"]


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
        return torch.index_select(fwht(_signed_padded(x, self.signs, self.pad)), 1, self.rows)


def _signed_padded(x: torch.Tensor, signs: torch.Tensor, pad: int) -> torch.Tensor:
    """``x * signs`` zero-padded to ``pad`` columns, in one pass (only the padding is zero-filled)."""
    dim = x.shape[1]
    if pad == dim:
        return x * signs
    y = x.new_empty((x.shape[0], pad))
    y[:, dim:].zero_()
    torch.mul(x, signs, out=y[:, :dim])
    return y


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


class BlockSRHT:
    """An SRHT of the concatenation [z_0, ..., z_{k-1}] of k blocks of width ``dim``, one block at a time.

    Each block is zero-padded to B = 2^ceil(log2 dim) and the blocks to K = 2^ceil(log2 k), so that the
    Sylvester-Hadamard matrix of the padded concatenation factors as H_KB = H_K (x) H_B and its row r = a B + b is

        (H D z)_r = sum_j H_K[a, j] (H_B D_j z_j)_b,

    i.e. the sketch is a sum over blocks of B-point transforms sampled at the same columns b and signed by
    H_K[a, j]: k transforms of length B instead of one of length K B, none spent on the zero blocks, and
    blocks may arrive one by one and be weighted differently for several outputs (the NTK Sketch mixes the same
    PolySketch degrees with the coefficients of two polynomials). Zero padding inside the vector does not change
    the transform's distribution: this is an SRHT of z (unnormalized, like ``_SRHT``: E[<S z, S z'>] = m <z, z'>).
    """

    def __init__(self, k: int, dim: int, m: int, gen: torch.Generator):
        self.k, self.dim = int(k), int(dim)
        self.block = _next_pow2(self.dim)
        n_blocks = _next_pow2(self.k)
        self.signs = (torch.randint(0, 2, (self.k, self.dim), generator=gen, dtype=torch.int64) * 2 - 1).to(
            torch.float64)
        self.rows = rows = torch.randint(0, n_blocks * self.block, (int(m),), generator=gen, dtype=torch.int64)
        self.cols = rows % self.block
        # block_signs[j, r] = H_K[a_r, j]: the Sylvester entry is (-1)^popcount(a_r & j)
        a = rows // self.block
        self.block_signs = torch.stack([1.0 - 2.0 * _parity(a & j) for j in range(self.k)]).to(torch.float64)
        self.m = int(m)

    def to(self, dtype, device) -> "BlockSRHT":
        self.signs = self.signs.to(dtype=dtype, device=device)
        self.block_signs = self.block_signs.to(dtype=dtype, device=device)
        self.cols = self.cols.to(device=device)
        return self

    def part(self, j: int, z: torch.Tensor) -> torch.Tensor:
        """Block j's term of the sketch, (n, dim) -> (n, m); the sketch of z is the sum of the k terms."""
        y = fwht(_signed_padded(z, self.signs[j], self.block))
        return torch.index_select(y, 1, self.cols).mul_(self.block_signs[j])


def _parity(v: torch.Tensor) -> torch.Tensor:
    """Parity of the number of set bits of each (non-negative) integer of ``v``, as 0./1. floats."""
    out = torch.zeros_like(v)
    while bool((v > 0).any()):
        out ^= v & 1
        v = v >> 1
    return out.to(torch.float64)
