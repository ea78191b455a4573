"""ntkit: the Neural Tangent Kernel toolkit for PyTorch.

One architecture description gives the exact infinite-width NNGP/NTK (``arch.kernel``) and the
finite network in NTK or standard parameterization (``arch.init``).
"""

from ._validation import ConfigError, MemoryBudgetError
from .kernels import (ABRelu, Abs, Activation, Architecture, Cos, Dense, Elementwise, Erf, Exp, FanInSum, FanOut,
                      FiniteNetwork, Gaussian, Gelu, Identity, KernelFunction, Layer, LeakyRelu, Monomial, Parallel,
                      Polynomial, Rbf, Relu, Serial, Sign, Sin, from_config, mlp, residual, serial)

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "MemoryBudgetError",
    "ABRelu", "Abs", "Activation", "Architecture", "Cos", "Dense", "Elementwise", "Erf", "Exp", "FanInSum",
    "FanOut", "FiniteNetwork", "Gaussian", "Gelu", "Identity", "KernelFunction", "Layer", "LeakyRelu", "Monomial",
    "Parallel", "Polynomial", "Rbf", "Relu", "Serial", "Sign", "Sin", "from_config", "mlp", "residual", "serial",
]
