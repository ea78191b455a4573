"""ntkit: the Neural Tangent Kernel toolkit for PyTorch.

One architecture description gives the exact infinite-width NNGP/NTK (``arch.kernel``) and the
finite network in NTK or standard parameterization (``arch.init``). On top of it: the empirical NTK
of any ``nn.Module``, training dynamics in function space, spectra and mean-field diagnostics, and
scikit-learn estimators.

Names from the higher layers are imported lazily (on first use), so ``import ntkit`` stays light and
the optional scikit-learn dependency is needed only by the estimators.
"""

from importlib import import_module

from ._validation import ConfigError, MemoryBudgetError
from .kernels import (ABRelu, Abs, Activation, Architecture, Cos, Dense, Elementwise, Erf, Exp, FanInSum, FanOut,
                      FiniteNetwork, Gaussian, Gelu, Identity, KernelFunction, Layer, LeakyRelu, Monomial, Parallel,
                      Polynomial, Rbf, Relu, Serial, Sign, Sin, from_config, mlp, residual, serial)
from .kernels import AvgPool, Conv, Flatten, GlobalAvgPool, LayerNorm
from .kernels import RNN, Sequences

__version__ = "0.1.0"

# public name -> submodule that defines it (imported on first access)
_LAZY = {
    **{name: "ntkit.kernels.classic" for name in ("Laplace", "GammaExponential", "RBF")},
    **{name: "ntkit.empirical" for name in (
        "empirical_ntk", "empirical_nngp", "KernelTracker", "monte_carlo_kernel")},
    **{name: "ntkit.dynamics" for name in (
        "gradient_descent_mse", "gradient_descent", "gradient_descent_mse_ensemble", "ensemble_from_architecture",
        "gp_inference", "linearize", "max_learning_rate", "MSEPredictor", "ODEPredictor", "EnsemblePredictor",
        "LinearizedModel", "kernel_regression")},
    **{name: "ntkit.features" for name in ("NTKRandomFeatures",)},
    **{name: "ntkit.features" for name in ("CNTKSketch", "NTKNystroem")},
    **{name: "ntkit.solvers" for name in ("kernel_ridge",)},
    **{name: "ntkit.spectra" for name in (
        "eigendecomposition", "condition_number", "effective_rank", "kernel_pca", "convergence_times",
        "target_projections", "mean_field", "phase_diagram", "critical_weight_variance", "depth_profile",
        "mercer_eigenvalues", "decay_exponent", "harmonic_multiplicity", "MeanField", "DepthProfile",
        "MercerSpectrum")},
    **{name: "ntkit.estimators" for name in (
        "NTKRegressor", "NTKClassifier", "NNGPRegressor", "NNGPClassifier",
        "NTKKernel", "NNGPKernel", "LaplaceKernel", "GammaExponentialKernel")},
    "store_kernel": "ntkit.store",
}

__all__ = [
    "ConfigError", "MemoryBudgetError",
    "ABRelu", "Abs", "Activation", "Architecture", "Cos", "Dense", "Elementwise", "Erf", "Exp", "FanInSum",
    "FanOut", "FiniteNetwork", "Gaussian", "Gelu", "Identity", "KernelFunction", "Layer", "LeakyRelu", "Monomial",
    "Parallel", "Polynomial", "Rbf", "Relu", "Serial", "Sign", "Sin", "from_config", "mlp", "residual", "serial",
    "Conv", "AvgPool", "GlobalAvgPool", "Flatten", "LayerNorm",
    "RNN", "Sequences",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ntkit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
