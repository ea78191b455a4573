"""Bottom layer of ntkit: architecture descriptions, their infinite-width kernels and finite networks."""

from .activations import (ABRelu, Abs, Activation, Cos, Elementwise, Erf, Exp, Gaussian, Gelu, LeakyRelu, Monomial,
                          Polynomial, Rbf, Relu, Sign, Sin)
from .architecture import Architecture, FiniteNetwork, mlp, residual, serial
from .base import KernelFunction
from .config import from_config, layer_from_config
from .conv import Conv, ConvModule
from .layers import Dense, DenseModule, FanInSum, FanOut, Identity, Layer, Parallel, Serial
from .normalization import LayerNorm
from .pooling import AvgPool, Flatten, GlobalAvgPool
from .recurrent import RNN, RNNModule, Sequences

__all__ = [
    "ABRelu", "Abs", "Activation", "Cos", "Elementwise", "Erf", "Exp", "Gaussian", "Gelu", "LeakyRelu",
    "Monomial", "Polynomial", "Rbf", "Relu", "Sign", "Sin",
    "Architecture", "FiniteNetwork", "mlp", "residual", "serial",
    "KernelFunction", "from_config", "layer_from_config",
    "Dense", "DenseModule", "FanInSum", "FanOut", "Identity", "Layer", "Parallel", "Serial",
    "Conv", "ConvModule", "AvgPool", "GlobalAvgPool", "Flatten", "LayerNorm",
    "RNN", "RNNModule", "Sequences",
]
