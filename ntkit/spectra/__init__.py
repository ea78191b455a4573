"""Spectra of kernels and signal propagation: trainability and generalization diagnostics.

* :mod:`._spectral` -- eigenpairs (all, or top-k by subspace iteration), condition number, effective rank,
  kernel PCA, per-mode convergence times of the MSE flow, target projections (Jacot et al. 2018, Sec. 5).
* :mod:`.meanfield` -- q*, c*, chi_1, chi(c*), depth scales, phase diagrams (Schoenholz et al. 2017) and the
  condition number / mean predictor as functions of depth (Xiao, Pennington & Schoenholz 2020).
* :mod:`.mercer` -- Mercer eigenvalues of zonal kernels on the sphere by the Funk-Hecke formula and their
  power-law decay (Bietti & Mairal 2019; Geifman et al. 2020).

The classical Laplace, gamma-exponential and RBF kernels live in :mod:`ntkit.kernels.classic` and are
re-exported here for convenience.
"""

from ..kernels.classic import RBF, GammaExponential, Laplace
from ._spectral import (Spectrum, check_kernel_matrix, condition_number, convergence_times, effective_rank,
                        eigendecomposition, kernel_pca, target_projections)
from .meanfield import (DepthProfile, MeanField, critical_weight_variance, depth_profile, mean_field,
                        phase_diagram)
from .mercer import (DecayFit, MercerSpectrum, decay_exponent, harmonic_multiplicity, legendre_sphere,
                     mercer_eigenvalues, zonal_kernel)

__all__ = ["Spectrum", "check_kernel_matrix", "eigendecomposition", "condition_number", "effective_rank",
           "kernel_pca", "convergence_times", "target_projections",
           "MeanField", "mean_field", "phase_diagram", "critical_weight_variance", "DepthProfile", "depth_profile",
           "MercerSpectrum", "mercer_eigenvalues", "zonal_kernel", "harmonic_multiplicity", "legendre_sphere",
           "DecayFit", "decay_exponent",
           "Laplace", "GammaExponential", "RBF"]
