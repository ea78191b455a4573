"""Layer normalisation over the channel (feature) axis: exact kernel rule and finite layer side by side."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._validation import ConfigError
from .layers import Layer

__all__ = ["LayerNorm"]


@dataclass(frozen=True)
class LayerNorm(Layer):
    """(z - mean_c z) / sqrt(var_c z + eps) over the channels, per sample and per position (no affine).

    Only defined here directly on centred Gaussian pre-activations (after a Dense or Conv layer, or a
    residual sum of them): then at infinite width mean_c z -> 0 and var_c z -> q(x, p), so (Novak et al.
    2020, neural-tangents ``stax.LayerNorm``; Xiao et al. 2020, App. C)

        Sigma' = Sigma / sqrt((q1 + eps)(q2 + eps)),    Theta' = Theta / sqrt((q1 + eps)(q2 + eps))

    with q1, q2 the variances at the two positions; the output is again a Gaussian pre-activation.
    """

    eps: float = 1e-12
    layer_name = "layer_norm"

    def __post_init__(self):
        try:
            eps = float(self.eps)
        except (TypeError, ValueError):
            raise ConfigError(f"layer_norm eps must be a number, got {self.eps!r}") from None
        if not eps >= 0:
            raise ConfigError(f"layer_norm eps must be >= 0, got {self.eps!r}")
        object.__setattr__(self, "eps", eps)

    def apply_kernel(self, k, ctx):
        if isinstance(k, tuple):
            raise ConfigError("layer_norm applied to unmerged branches; close them with fanin_sum first")
        if not k.gaussian:
            raise ConfigError("layer_norm is supported directly after a dense or conv layer (centred Gaussian "
                              "pre-activations); after an activation its mean subtraction does not vanish and "
                              "the kernel would need terms ntkit does not compute")
        q1, q2 = k.marginals()
        r1, r2 = torch.rsqrt(q1 + self.eps), torch.rsqrt(q2 + self.eps)
        nngp = k.nngp * r1 * r2
        ntk = k.ntk * r1 * r2 if isinstance(k.ntk, torch.Tensor) else k.ntk
        def norm(v):
            a, b = k.self_marginals(v) if k.pixel_pairs else (v, v)
            return v * torch.rsqrt(a + self.eps) * torch.rsqrt(b + self.eps)

        return k.update(nngp, ntk, norm)

    def build_module(self, in_features, ctx):
        return _LayerNormModule(self.eps), in_features

    def to_config(self):
        return {"layer": "layer_norm", "eps": self.eps}


class _LayerNormModule(nn.Module):
    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        dim = 1 if x.ndim > 2 else -1  # channels of (n, C, *size), features of (n, d)
        z = x - x.mean(dim=dim, keepdim=True)
        return z * torch.rsqrt(z.pow(2).mean(dim=dim, keepdim=True) + self.eps)
