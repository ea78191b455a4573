"""scikit-learn estimators and kernels built on the infinite-width NTK / NNGP (needs scikit-learn).

* :class:`NTKRegressor`, :class:`NNGPRegressor`: kernel regression / gradient-flow prediction at time t.
* :class:`NTKClassifier`, :class:`NNGPClassifier`: SVM on the kernel, or kernel regression on one-hot targets.
* :class:`NTKKernel`, :class:`NNGPKernel`, :class:`LaplaceKernel`, :class:`GammaExponentialKernel`:
  ``sklearn.gaussian_process.kernels.Kernel`` objects (also callables for ``SVC(kernel=...)``).

All estimators take ``kernel="ntk"|"nngp"|"laplace"|"gamma_exponential"|"rbf"``.
"""

from ._estimators import NNGPClassifier, NNGPRegressor, NTKClassifier, NTKRegressor
from ._kernels import KERNELS, make_kernel_function
from .gp_kernels import GammaExponentialKernel, LaplaceKernel, NNGPKernel, NTKKernel

__all__ = [
    "NTKRegressor", "NTKClassifier", "NNGPRegressor", "NNGPClassifier",
    "NTKKernel", "NNGPKernel", "LaplaceKernel", "GammaExponentialKernel",
    "KERNELS", "make_kernel_function",
]
