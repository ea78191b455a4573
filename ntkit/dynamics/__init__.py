"""Training dynamics in function space (Jacot et al. 2018; Lee et al. 2019).

* :func:`gradient_descent_mse` - closed-form MSE gradient flow / gradient descent (+ momentum), any time,
  t = inf as kernel regression; :meth:`MSEPredictor.eigen_view` for the per-eigendirection picture.
* :func:`gradient_descent` - any differentiable loss (cross-entropy, quadratic hinge, logistic, callable)
  by integrating the function-space ODE (Dormand-Prince), optional heavy-ball momentum.
* :func:`gradient_descent_mse_ensemble`, :func:`ensemble_from_architecture` - NTK-GP / NNGP mean and
  covariance of an infinite ensemble at time t; :func:`gp_inference` - exact GP posterior.
* :func:`linearize` - a network's first-order Taylor expansion in its parameters, as a module.
* :func:`max_learning_rate` - the largest stable gradient-descent step for MSE.
* :func:`kernel_regression` - the t = inf predictions at large n (CG, FALKON, random features; ntkit.solvers).

Loss normalization: L = (1/m) sum_ij l(f_ij, y_ij); by default m = y.size (as neural-tangents), so
MSE gradient flow is df/dt = -(eta / m) K (f - y). Other choices via ``loss_normalization``.
"""

from .ensemble import (EnsemblePredictor, GaussianPrediction, ensemble_from_architecture, gp_inference,
                       gradient_descent_mse_ensemble)
from .large import kernel_regression
from .linearize import LinearizedModel, linearize
from .mse import EigenView, MSEPredictor, Prediction, gradient_descent_mse, max_learning_rate
from .ode import LOSSES, ODEPredictor, gradient_descent

__all__ = [
    "gradient_descent_mse",
    "MSEPredictor",
    "Prediction",
    "EigenView",
    "max_learning_rate",
    "gradient_descent",
    "ODEPredictor",
    "LOSSES",
    "gradient_descent_mse_ensemble",
    "ensemble_from_architecture",
    "EnsemblePredictor",
    "GaussianPrediction",
    "gp_inference",
    "linearize",
    "LinearizedModel",
    "kernel_regression",
]
