"""Explicit feature maps of the infinite-width kernels, for linear methods at large n.

* :class:`NTKRandomFeatures` - arc-cosine random features combined across layers by TensorSRHT
  (Han et al. 2021), NNGP or NTK of fully-connected ReLU networks, optional leverage-score sampling.
* :class:`NTKSketch` - non-negative polynomial fits of the arc-cosine duals and PolySketch (Zandieh et al. 2021).
* :class:`CNTKSketch` - per-position features of convolutional ReLU networks with global average pooling
  (CNTK-GAP / CNN-GP; Zandieh et al. 2021, CNTK sketch).
* :class:`NTKNystroem` - Nystrom features k(x, C) K_CC^{-1/2} of the exact kernel of any architecture with
  array inputs (data-dependent: the centers C are rows of the training set).

Transformers in the scikit-learn ``kernel_approximation`` style: ``fit`` / ``transform`` /
``fit_transform`` / ``iter_transform``; numpy in -> numpy out, torch in -> torch out.
``transform(X, scheduler="local" | address | Client)`` computes the same features as tasks on dask.distributed.
"""

from ._random_features import NTKRandomFeatures
from ._sketch_ntk import NTKSketch, arccos_polynomials
from ._cntk_sketch import CNTKSketch
from ._nystrom import NTKNystroem

__all__ = ["NTKRandomFeatures", "NTKSketch", "arccos_polynomials", "CNTKSketch", "NTKNystroem"]
