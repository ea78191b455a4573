"""NTK Sketch (Zandieh, Han, Avron, Shoham, Kim and Shin, NeurIPS 2021): polynomial fits of the arc-cosine
duals and PolySketch, layer by layer."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from ._plan import DenseOp
from ._random_features import NTKRandomFeatures
from ._sketch import BlockSRHT, TensorSRHT, _SRHT

__all__ = ["NTKSketch", "arccos_polynomials"]


@lru_cache(maxsize=None)
def arccos_polynomials(a: float, b: float, degree: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Non-negative polynomial fits of the normalized duals of phi(z) = a min(z, 0) + b max(z, 0).

    With rho the correlation, theta = arccos(rho), k = (a - b)^2 / (2 pi), D(rho) = (a^2 + b^2)/2 - k theta:
    E[phi(u) phi(v)] / sqrt(q q') = F(rho) = k sqrt(1 - rho^2) + D(rho) rho and E[phi'(u) phi'(v)] = D(rho)
    (Cho & Saul 2009). Both have Maclaurin series with non-negative coefficients (D = (a+b)^2/4 +
    k arcsin(rho), F' = D), so they are kernels of the form sum_j c_j <u, u'>^j. As in Zandieh et al. (2021,
    Sec. 4.1) a degree-``degree`` polynomial with c_j >= 0 is fitted on [-1, 1] (non-negative least squares
    on Chebyshev points, exact at rho = 1 up to the fit). Returns (c, e, max error of F, max error of D).
    """
    from scipy.optimize import nnls

    theta = np.linspace(0.0, math.pi, 4001)
    rho = np.cos(theta)
    k = (a - b) ** 2 / (2 * math.pi)
    dfun = (a * a + b * b) / 2 - k * theta
    ffun = k * np.sin(theta) + dfun * rho
    vander = rho[:, None] ** np.arange(degree + 1)[None, :]
    w = np.ones_like(rho)
    w[0] = 100.0  # rho = 1: the diagonal of the kernel
    out = []
    for target in (ffun, dfun):
        coef, _ = nnls(vander * w[:, None], target * w)
        out.append(coef)
    c, e = out
    return c, e, float(np.abs(vander @ c - ffun).max()), float(np.abs(vander @ e - dfun).max())


class NTKSketch(NTKRandomFeatures):
    """NTK Sketch: features of the NTK/NNGP of ReLU networks by polynomial sketches (Zandieh et al. 2021).

    Each activation's dual is replaced by its non-negative polynomial fit F(rho) ~ sum_j c_j rho^j,
    D(rho) ~ sum_j e_j rho^j (:func:`arccos_polynomials`); a kernel sum_j c_j <u, u'>^j of unit vectors u
    has the features [sqrt(c_0), S(sqrt(c_1) P_1(u), ..., sqrt(c_p) P_p(u))] with P_j a PolySketch of
    u^(x)j (P_1 an SRHT, P_j = TensorSRHT(P_{j-1}, u); Ahle et al. 2020), unbiased for <u, u'>^j, and S one
    SRHT of the concatenation of the degrees with non-zero coefficients (Zandieh et al. 2021, Alg. 1): every
    degree is sketched at the full width and S spends the output features where the coefficients are, so
    zero coefficients cost nothing and the variance does not grow with ``degree``. (Splitting the features
    evenly across the degrees instead, as an earlier version did, wasted most of them on degrees with tiny or
    zero coefficients: its Gram error was ~25% above the random features'; with S it is below.) The layers
    are combined as in :class:`NTKRandomFeatures` (Dense: concatenation; Theta * Sigma_dot: TensorSRHT).
    S is applied block by block (:class:`~ntkit.features._sketch.BlockSRHT`: with every degree zero-padded to a
    power of two, the Hadamard matrix of the concatenation is H_K (x) H_B), so one transform per degree serves
    both polynomials (NNGP and derivative) and none is spent on padding: 2-3x faster than one SRHT of the
    concatenation per polynomial, with the same distribution.
    Inputs of every activation are normalized by the exact per-sample variance q(x) (known in closed form
    along the diagonal: Dense q -> W_std^2 q + b_std^2, activation q -> (a^2 + b^2)/2 q), so biases are
    supported at any depth; Zandieh et al. assume unit-norm inputs and no biases.

    Deterministic approximation error (the polynomial fit, max error ``fit_error_``) plus sketching noise
    O(1/sqrt(n_components)), unbiased for the polynomial kernel with one hidden layer; no Gaussian weight
    matrices, so the cost per input is O(degree * (n_components + d) * log) per activation.

    Parameters
    ----------
    architecture, n_components, kernel, random_state, dtype, device, memory_budget, batch_size, progress
        As :class:`NTKRandomFeatures` (same supported layers).
    degree : int, default 8
        Degree of the polynomial fits.
    """

    def __init__(self, architecture: Any, n_components: int = 1024, *, kernel: str = "ntk",
                 random_state: Any = None, degree: int = 8, dtype: Any = None, device: Any = None,
                 memory_budget: float | None = None, batch_size: int | None = None, progress: bool = True):
        super().__init__(architecture, n_components, kernel=kernel, random_state=random_state, sampling="gaussian",
                         dtype=dtype, device=device, memory_budget=memory_budget, batch_size=batch_size,
                         progress=progress)
        self.degree = degree

    def _fit(self, d: int, gen: torch.Generator) -> None:
        if isinstance(self.degree, bool) or int(self.degree) != self.degree or not 1 <= self.degree <= 32:
            raise ValueError(f"degree must be an integer in [1, 32], got {self.degree!r}")
        p = int(self.degree)
        super()._fit(d, gen)  # reads the architecture, allocates widths (m1, ms); its Gaussian draws are unused
        m1, ms = self.widths_["arccos1"], self.widths_["sketch"] or 1
        mp = max(1, m1 - 1)  # width of every PolySketch degree, and of the mixed output (plus the constant)
        ntk = self.kernel == "ntk"
        params: list = []
        s, t = d, None
        self._max_dim = d
        self.fit_error_ = 0.0
        for op in self.ops_:
            if isinstance(op, DenseOp):
                s = s + (1 if op.b_std > 0 else 0)
                if ntk and op.trainable:
                    t = s + (t or 0)
                params.append(None)
                continue
            c, e, err_f, err_d = arccos_polynomials(op.a, op.b, p)
            self.fit_error_ = max(self.fit_error_, err_f, err_d if ntk else 0.0)
            # the degrees that carry weight: zero coefficients get no features (a fit of degree 8 of the
            # ReLU duals has several)
            used = tuple(j for j in range(1, p + 1) if c[j] > 0 or (ntk and t is not None and e[j] > 0))
            top = max(used, default=0)
            first = _SRHT(s, mp, gen) if top else None
            chain = [TensorSRHT(mp, s, mp, gen) for _ in range(top - 1)]
            mix = BlockSRHT(len(used), mp, mp, gen) if used else None
            sk = TensorSRHT(t, 1 + mp, ms, gen) if (ntk and t is not None) else None
            params.append((torch.as_tensor(c), torch.as_tensor(e), used, first, chain, mix, sk))
            # u, a PolySketch degree and its padded transforms, the mix's term and its two sums, the readout sketch
            self._max_dim = max(self._max_dim, 2 * s + 10 * mp + 4 * ms + 2 * (t or 0))
            s, t = 1 + mp, (ms if t is not None else None)
        self.n_components_ = t if ntk else s
        self.widths_ = {"per_degree": mp, "degree": p, "sketch": ms if ntk else 0}
        self._params64 = params
        self._params = None
        self._params_key = None

    def _convert(self, layer_params, dtype, device):
        c, e, used, first, chain, mix, sk = layer_params

        def conv(o):
            return None if o is None else o.to(dtype, device)

        return (c.to(dtype=dtype, device=device), e.to(dtype=dtype, device=device), used, conv(first),
                [tk.to(dtype, device) for tk in chain], conv(mix), conv(sk))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        ntk = self.kernel == "ntk"
        d = x.shape[1]
        s = x * (1.0 / math.sqrt(d))
        q = (s * s).sum(1)
        t = None
        for op, prm in zip(self.ops_, self._params):
            if isinstance(op, DenseOp):
                s = s * op.W_std if op.W_std != 1.0 else s
                q = q * op.W_std**2 + op.b_std**2
                if op.b_std > 0:
                    s = torch.cat([s, s.new_full((s.shape[0], 1), op.b_std)], dim=1)
                if ntk:
                    if op.trainable:
                        t = s if t is None else torch.cat([s, t * op.W_std], dim=1)
                    elif t is not None:
                        t = t * op.W_std
                continue
            c, e, used, first, chain, mix, sk = prm
            norm = s.norm(dim=1, keepdim=True)
            u = s / torch.where(norm > 0, norm, torch.ones_like(norm))
            ones = u.new_ones((u.shape[0], 1))
            sq = torch.sqrt(q)[:, None]
            need_e = ntk and t is not None
            mixed = {}  # S(sqrt(coef_j) P_j(u), j used) for coef = c (and e), accumulated degree by degree
            if first is not None:
                wts = {"c": c.sqrt().tolist(), "e": e.sqrt().tolist() if need_e else None}
                pj = first(u) * (1.0 / math.sqrt(first.rows.shape[0]))
                for j in range(1, used[-1] + 1):
                    if j > 1:
                        pj = chain[j - 2](pj, u)
                    if j not in used:
                        continue
                    term = mix.part(used.index(j), pj)
                    for key, w in wts.items():
                        if w is not None and w[j] > 0:
                            if key in mixed:
                                mixed[key].add_(term, alpha=w[j])
                            else:
                                mixed[key] = term * w[j]

            def combine(coef, key):  # [sqrt(coef_0), S(sqrt(coef_j) P_j(u), j used)]: unbiased for sum_j coef_j rho^j
                if key not in mixed:
                    if mix is None:
                        return ones * coef[0].sqrt()
                    mixed[key] = u.new_zeros((u.shape[0], mix.m))
                return torch.cat([ones * coef[0].sqrt(), mixed.pop(key).mul_(1.0 / math.sqrt(mix.m))], dim=1)

            if ntk and t is not None:
                t = sk(t, combine(e, "e"))
            s = combine(c, "c") * sq
            q = q * ((op.a**2 + op.b**2) / 2)
        return t if ntk else s
