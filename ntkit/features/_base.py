"""The transformer protocol shared by ntkit's feature maps (scikit-learn's kernel_approximation style).

``fit(X)`` draws the random matrices (it only reads the number of features of ``X``), ``transform(X)``
maps rows to features in batches under a memory budget, ``iter_transform(X)`` yields the batches one at a
time so that consumers (ridge regression on features) never hold all features of an unbounded ``n``.
numpy in -> numpy out, torch in -> torch out on the input's device; float64 unless ``dtype`` says otherwise.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Iterator

import numpy as np
import torch

from .._progress import progress
from .._validation import (ConfigError, as_float_tensor, available_memory_bytes, check_memory, format_bytes,
                           resolve_dtype)

__all__ = ["FeatureMap", "check_n_components", "make_generator", "clip_rows", "pick_rows"]

# Default working memory for one transform batch when no memory_budget is given: a quarter of what is
# free, at most 1 GiB (the features of a batch and its temporaries, not the output).
_DEFAULT_WORK_BYTES = 1024**3


def check_n_components(n_components: Any) -> int:
    """A positive integer number of features, or a ValueError that says so."""
    if isinstance(n_components, bool) or not isinstance(n_components, numbers.Integral) or n_components < 1:
        raise ValueError(f"n_components must be a positive integer (the number of features), got {n_components!r}")
    return int(n_components)


def make_generator(random_state: Any) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from an int, a ``numpy.random.Generator``/``RandomState`` or None."""
    gen = torch.Generator(device="cpu")
    if random_state is None:
        seed = int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0] >> 1)
    elif isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        if random_state < 0:
            raise ValueError(f"random_state must be a non-negative integer, got {random_state!r}")
        seed = int(random_state)
    elif isinstance(random_state, np.random.RandomState):
        seed = int(random_state.randint(0, 2**31 - 1))
    elif isinstance(random_state, np.random.Generator):
        seed = int(random_state.integers(0, 2**62))
    elif isinstance(random_state, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=random_state))
    else:
        raise TypeError(f"random_state must be None, an int or a numpy/torch generator, got {random_state!r}")
    gen.manual_seed(seed)
    return gen


def clip_rows(m: int, n: int, name: str, rows: str, stacklevel: int = 3) -> int:
    """min(m, n) for ``m`` rows (centers) to draw from ``n``; more than there are uses all of them and says so
    with a RuntimeWarning, as scikit-learn's Nystroem does (``name``, ``rows``: the words of the warning)."""
    if m > n:
        warnings.warn(f"{name}={m} is more than the {n} {rows}; using all {n} as centers", RuntimeWarning,
                      stacklevel=stacklevel)
        return n
    return m


def pick_rows(n: int, m: int, random_state: Any) -> torch.Tensor:
    """Indices (CPU) of ``m <= n`` rows drawn uniformly without replacement (all rows in order when m = n)."""
    if m == n:
        return torch.arange(n)
    return torch.randperm(n, generator=make_generator(random_state))[:m]


class FeatureMap:
    """Base class: validation, batching, numpy/torch conversion. Subclasses implement ``_fit`` and
    ``_features`` (a validated (b, d) tensor in the working dtype/device -> (b, n_components_))."""

    n_components: int
    dtype: Any
    device: Any
    memory_budget: Any
    batch_size: Any
    progress: Any

    # -- subclass hooks ---------------------------------------------------------------------------
    def _fit(self, n_features: int, gen: torch.Generator) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _row_bytes(self) -> int:
        """Bytes of temporaries per input row during ``_features`` (an upper bound)."""
        raise NotImplementedError  # pragma: no cover

    # -- protocol ---------------------------------------------------------------------------------
    def fit(self, X: Any, y: Any = None) -> "FeatureMap":
        """Draw the random feature map for inputs with the features of ``X`` (only its shape is read).

        ``X`` may also be an int: the number of input features.
        """
        if isinstance(X, numbers.Integral) and not isinstance(X, bool):
            d = int(X)
            if d < 1:
                raise ValueError(f"the number of input features must be positive, got {X!r}")
        else:
            t = as_float_tensor(X, "X", dtype=None, check_finite=False)
            d = int(math.prod(t.shape[1:]))
        check_n_components(self.n_components)
        self.dtype_ = resolve_dtype(self.dtype)
        self.n_features_in_ = d
        self._fit(d, make_generator(getattr(self, "random_state", None)))
        return self

    def fit_transform(self, X: Any, y: Any = None, *, scheduler: Any = None) -> Any:
        """``fit(X).transform(X, scheduler=scheduler)``."""
        return self.fit(X).transform(X, scheduler=scheduler)

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_features_in_"):
            raise RuntimeError(f"This {type(self).__name__} instance is not fitted yet; call fit(X) first.")

    def _prepare(self, X: Any) -> tuple[torch.Tensor, bool]:
        self._check_fitted()
        numpy_in = not isinstance(X, torch.Tensor)
        dev = self.device if self.device is not None else (None if numpy_in else X.device)
        t = as_float_tensor(X, "X", dtype=self.dtype_, device=dev)
        t = t.reshape(t.shape[0], -1)
        if t.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {t.shape[1]} features, but {type(self).__name__} was fitted with "
                             f"{self.n_features_in_}")
        self._to(t.dtype, t.device)
        return t, numpy_in

    def _to(self, dtype: torch.dtype, device: torch.device) -> None:
        """Move the per-layer random matrices (``_params64``, float64 on the CPU) to ``device`` in ``dtype``;
        cached in ``_params`` until another dtype or device is asked for."""
        key = (dtype, str(device))
        if self._params_key == key:
            return
        self._params = [None if p is None else self._convert(p, dtype, device) for p in self._params64]
        self._params_key = key

    def _convert(self, layer_params: tuple, dtype: torch.dtype, device: torch.device) -> tuple:
        """One layer's random matrices in ``dtype`` on ``device``."""
        raise NotImplementedError  # pragma: no cover

    def _batch_rows(self, n: int, item: int, device: torch.device) -> int:
        if self.batch_size is not None:
            if isinstance(self.batch_size, bool) or int(self.batch_size) != self.batch_size or self.batch_size < 1:
                raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
            return int(self.batch_size)
        work = self.memory_budget
        if work is None:
            work = min(_DEFAULT_WORK_BYTES, 0.25 * available_memory_bytes(device))
        per_row = self._row_bytes() * item
        rows = int(work // max(per_row, 1))
        if rows < 1:
            raise ValueError(f"one input row needs {format_bytes(per_row)} of working memory, more than the "
                             f"memory_budget of {format_bytes(work)}; raise memory_budget or lower n_components")
        return max(1, min(n, rows))

    def iter_transform(self, X: Any) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, features)`` for consecutive row batches of ``X`` (torch tensors, working dtype).

        Only one batch of features is alive at a time, so ``n`` is bounded by nothing but time.
        """
        t, _ = self._prepare(X)
        n = t.shape[0]
        rows = self._batch_rows(n, t.element_size(), t.device)
        starts = range(0, n, rows)
        with torch.no_grad():
            for i in progress(starts, total=len(starts), desc=type(self).__name__, unit="batch",
                              enabled=self.progress if len(starts) > 1 else False):
                yield i, self._features(t[i:i + rows])

    def transform(self, X: Any, *, scheduler: Any = None) -> Any:
        """Features of the rows of ``X``: (n, n_components_), numpy for numpy input, torch for torch input.

        Computed in batches of rows (``batch_size``, or as many as ``memory_budget`` -- bytes of working
        memory per batch -- allows); the output itself must fit in the free memory -- for larger ``n``
        consume :meth:`iter_transform` batch by batch.

        ``scheduler`` (as in :func:`ntkit.store_kernel`): None computes in this process; ``"local"``
        starts a ``dask.distributed`` LocalCluster on the loopback interface for the call; a scheduler
        address (``"tcp://host:8786"``) or a ``distributed.Client`` uses that cluster. The fitted map is
        sent to the workers once and chunks of rows (>= ~100 ms of work each) are tasks; the features
        are those of the in-process transform (same random matrices; computed on the workers' CPUs, so
        a CUDA input gets CPU-computed features back on its device). An unreachable address raises a
        ConnectionError within ``distributed.comm.timeouts.connect``.
        """
        if scheduler is not None:
            from .._dask import check_scheduler
            from ._dask import dask_transform

            check_scheduler(scheduler)
            return dask_transform(self, X, scheduler)
        t, numpy_in = self._prepare(X)
        n, m = t.shape[0], self.n_components_
        # memory_budget bounds the work per batch; the output itself must fit in what is free
        check_memory(n * m * t.element_size(), 0.9 * available_memory_bytes(t.device),
                     f"the ({n}, {m}) feature matrix in {t.dtype}",
                     "transform X in pieces, or consume iter_transform(X) batch by batch (as the ridge solver does)")
        out = torch.empty((n, m), dtype=t.dtype, device=t.device)
        for i, f in self.iter_transform(t):
            out[i:i + f.shape[0]] = f
        return out.cpu().numpy() if numpy_in else out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_components={self.n_components!r}, kernel={getattr(self, 'kernel', None)!r})"


def _unsupported(layer: Any, supported: str) -> ConfigError:
    name = getattr(layer, "layer_name", type(layer).__name__)
    return ConfigError(f"layer {name!r} ({layer!r}) is not supported by this feature map; supported: {supported}")
