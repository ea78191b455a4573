"""Kernel ridge regression for large n (the t = inf limit of the NTK dynamics).

* :func:`kernel_ridge` - one entry point, ``solver="auto"|"cholesky"|"cg"|"nystrom"|"features"``.
* :func:`cholesky` (direct), :func:`conjugate_gradient` (exact, Nystrom-preconditioned CG with kernel
  blocks computed on the fly), :func:`falkon` (Nystrom KRR by FALKON, Rudi et al. 2017), :func:`feature_ridge`
  (ridge regression on explicit features, linear in n: the m x m normal equations, or matrix-free
  Nystrom-preconditioned CG for many features); :func:`choose_solver` is the "auto" rule.
"""

from ._feature_ridge import FEATURE_SOLVERS, FeatureRidgeInfo, choose_feature_solver
from ._solvers import (SOLVERS, FeatureRidgeSolution, KernelRidgeSolution, choose_solver, cholesky,
                       conjugate_gradient, default_centers, falkon, feature_ridge, kernel_ridge, pcg)

__all__ = ["SOLVERS", "kernel_ridge", "choose_solver", "cholesky", "conjugate_gradient", "falkon", "feature_ridge",
           "pcg", "default_centers", "KernelRidgeSolution", "FeatureRidgeSolution",
           "FEATURE_SOLVERS", "FeatureRidgeInfo", "choose_feature_solver"]
