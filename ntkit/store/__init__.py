"""Out-of-core exact kernels: Gram matrices too large for memory, computed tile by tile into zarr.

``store_kernel(kernel, x1, x2=None, *, path, ...)`` writes the kernel matrix of any
:class:`~ntkit.KernelFunction` (``arch.kernel_fn("ntk")``, ``ntkit.Laplace(...)``) into a zarr store on
disk, in process or as tasks on a ``dask.distributed`` cluster. A manifest next to the array records
what the store holds (inputs' hashes, kernel config, dtype, tile grid) and which tiles are done, so
a crashed run resumes with the missing tiles only and a store is never mixed with other inputs.
Needs the optional ``zarr>=3`` (and ``distributed`` for ``scheduler=``).
"""

from ._store import MANIFEST_NAME, StoreError, store_kernel

__all__ = ["store_kernel", "StoreError", "MANIFEST_NAME"]
