"""The empirical NTK during training, and its Monte Carlo average over initializations."""

from __future__ import annotations

import math
from collections import namedtuple
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .._validation import as_float_tensor
from ..kernels.recurrent import as_sequences, is_sequence_architecture
from ._inputs import sequence_pair
from ._ntk import empirical_nngp, empirical_ntk

__all__ = ["KernelTracker", "monte_carlo_kernel", "MonteCarloKernel"]

MonteCarloKernel = namedtuple("MonteCarloKernel", ["mean", "stderr", "samples"])


class KernelTracker:
    """Record the empirical NTK Theta_t of ``model`` on a fixed probe batch during any training loop.

    Call :meth:`record` (or the tracker itself) with the step number where you want a measurement;
    with ``every=N`` the call records only on multiples of N (so it can sit in the loop unconditionally).
    For each record: the kernel, its relative drift ||Theta_t - Theta_0||_F / ||Theta_0||_F (Jacot et
    al. 2018: O(1/sqrt(width)) in the NTK parameterization) and, when an analytic limit is known, the
    relative distance and the alignment <Theta_t, Theta_inf>_F / (||Theta_t|| ||Theta_inf||) to it.

    Parameters
    ----------
    model : nn.Module
    probe : tensor (n, ...), the probe batch
    every : int, optional
    limit : tensor (n, n) or "auto", optional
        The infinite-width NTK to compare with; ``"auto"`` uses ``model.architecture.kernel`` when the
        model came from :meth:`ntkit.Architecture.init` (at the model's widths).
    **ntk_options : passed to :func:`empirical_ntk` (implementation, params, output is "trace")

    Examples
    --------
    >>> tracker = KernelTracker(model, x[:32], every=10)            # doctest: +SKIP
    >>> for step in range(1000):                                   # doctest: +SKIP
    ...     tracker(step); loss = ...; loss.backward(); opt.step()
    >>> tracker.history["drift"]                                   # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, probe: Any, *, every: int | None = None, limit: Any = "auto",
                 **ntk_options):
        if every is not None and (int(every) != every or every < 1):
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.model, self.probe, self.every = model, probe, every
        self.ntk_options = {k: v for k, v in ntk_options.items() if k != "output"}
        if isinstance(limit, str) and limit == "auto":
            arch = getattr(model, "architecture", None)
            first = next(iter(model.parameters()))
            limit = None if arch is None else arch.kernel(torch.as_tensor(probe).reshape(len(probe), -1),
                                                          get="ntk", dtype=first.dtype)
        self.limit = None if limit is None else torch.as_tensor(limit)
        self.steps: list[int] = []
        self.kernels: list[torch.Tensor] = []

    def __call__(self, step: int) -> torch.Tensor | None:
        if self.every is not None and step % self.every != 0:
            return None
        return self.record(step)

    def record(self, step: int) -> torch.Tensor:
        theta = empirical_ntk(self.model, self.probe, output="trace", **self.ntk_options).detach()
        self.steps.append(int(step))
        self.kernels.append(theta)
        return theta

    @property
    def history(self) -> dict[str, list[float]]:
        """steps, drift, and (with a limit) distance_to_limit and alignment_with_limit."""
        if not self.kernels:
            return {"steps": [], "drift": []}
        k0 = self.kernels[0]
        out: dict[str, list[float]] = {"steps": list(self.steps),
                                       "drift": [float((k - k0).norm() / k0.norm()) for k in self.kernels]}
        if self.limit is not None:
            lim = self.limit.to(k0)
            out["distance_to_limit"] = [float((k - lim).norm() / lim.norm()) for k in self.kernels]
            out["alignment_with_limit"] = [float((k * lim).sum() / (k.norm() * lim.norm())) for k in self.kernels]
        return out


def monte_carlo_kernel(architecture, x1: Any, x2: Any = None, *, width: int | Sequence[int], seeds: int | Iterable[int] = 32,
                       get: str | Sequence[str] = ("nngp", "ntk"), init: str = "gaussian", out_dim: int = 1,
                       dtype: torch.dtype = torch.float64, **ntk_options):
    """Mean and standard error of the empirical NNGP/NTK over random initializations of the finite twin
    ``architecture.init(width, seed=s)`` (the counterpart of neural-tangents' monte_carlo_kernel_fn).

    The NNGP sample of one network is f(x1) f(x2)^T averaged over its ``out_dim`` readout units; the NTK
    sample is the trace-mean empirical NTK. ``stderr`` = sample std / sqrt(number of seeds) per entry
    (CLT), so |mean - exact| / stderr is approximately standard normal when width is large. Inputs as for
    ``architecture.kernel``: flat rows, images, or -- for a recurrent architecture -- lists of (T_i, d)
    sequences of different lengths (or an (n, T, d) tensor).

    Returns a :class:`MonteCarloKernel` (mean, stderr, samples) for a single ``get`` name, or a
    dict name -> MonteCarloKernel for a tuple.
    """
    names = (get,) if isinstance(get, str) else tuple(get)
    bad = [n for n in names if n not in ("nngp", "ntk")]
    if bad or not names:
        raise ValueError(f"get must be 'nngp', 'ntk' or a tuple of them, got {get!r}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if len(seed_list) < 2:
        raise ValueError("monte_carlo_kernel needs at least 2 seeds to estimate a standard error")
    if is_sequence_architecture(architecture.layers):  # (T_i, d) sequences of any lengths, or (n, T, d)
        x1t, x2t = sequence_pair(as_sequences(x1, "x1", dtype=dtype), None if x2 is None else
                                 as_sequences(x2, "x2", dtype=dtype), dtype=dtype, device=None)
        in_features = int(x1t.values.shape[-1])
    else:
        x1t = as_float_tensor(x1, "x1", dtype=dtype, min_ndim=1)
        x2t = None if x2 is None else as_float_tensor(x2, "x2", dtype=dtype, min_ndim=1)
        in_features = tuple(x1t.shape[1:]) if x1t.ndim > 2 else int(math.prod(x1t.shape[1:]))
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for s in seed_list:
        net = architecture.init(width, seed=s, init=init, out_dim=out_dim, dtype=dtype, in_features=in_features)
        if "nngp" in names:
            samples["nngp"].append(empirical_nngp(net, x1t, x2t))
        if "ntk" in names:
            samples["ntk"].append(empirical_ntk(net, x1t, x2t, output="trace", **ntk_options))
    out = {}
    for n in names:
        stack = torch.stack(samples[n])
        out[n] = MonteCarloKernel(stack.mean(0), stack.std(0) / math.sqrt(len(seed_list)), stack)
    return out[names[0]] if isinstance(get, str) else out
