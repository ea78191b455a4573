"""Empirical (finite-width) NTK and NNGP of any ``torch.nn.Module``, and their evolution in training."""

from ._ntk import IMPLEMENTATIONS, OUTPUTS, empirical_nngp, empirical_ntk, peak_memory_estimate
from .tracking import KernelTracker, MonteCarloKernel, monte_carlo_kernel

__all__ = ["empirical_ntk", "empirical_nngp", "IMPLEMENTATIONS", "OUTPUTS", "peak_memory_estimate",
           "KernelTracker", "monte_carlo_kernel", "MonteCarloKernel"]
from .scaling import LineFit, WidthScaling, width_scaling  # noqa: E402
__all__ += ["width_scaling", "WidthScaling", "LineFit"]
