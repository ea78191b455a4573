"""Model inputs of any structure for the empirical NTK: a tensor, a tuple of positional arguments, a dict of
keyword arguments, nested tuples/lists/dicts of tensors; floating or integer (token ids) leaves.

A batch is held as the tuple of its *batched* tensor leaves, each moved so that its batch axis comes first,
plus everything needed to rebuild the call (the nesting, the unbatched leaves, each leaf's batch axis).
Slicing, concatenating and vmapping act on all batched leaves together, so x1 and x2 are sliced and blocked
consistently across leaves.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._validation import check_finite_rows
from ..kernels.recurrent import Sequences, as_sequences

__all__ = ["Inputs", "prepare_inputs", "check_pair_inputs", "sequence_pair"]


class _Leaf:
    """Placeholder for the i-th batched tensor leaf in the nesting."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def _flatten(obj, dims, path: str, leaves: list, leaf_dims: list, name: str):
    """Replace every batched tensor leaf by a placeholder; return the skeleton."""
    if isinstance(obj, dict):
        if dims is not None and not isinstance(dims, (int, dict)):
            raise ValueError(f"batch_dim{path} must be an int, None or a dict like {name}{path}")
        out = {}
        for key, val in obj.items():
            sub = dims.get(key, 0) if isinstance(dims, dict) else dims
            out[key] = _flatten(val, sub, f"{path}[{key!r}]", leaves, leaf_dims, name)
        return out
    if isinstance(obj, (tuple, list)):
        if isinstance(dims, (tuple, list)) and len(dims) != len(obj):
            raise ValueError(f"batch_dim{path} has {len(dims)} entries but {name}{path} has {len(obj)}")
        if dims is not None and not isinstance(dims, (int, tuple, list)):
            raise ValueError(f"batch_dim{path} must be an int, None or a sequence like {name}{path}")
        items = [_flatten(v, dims[i] if isinstance(dims, (tuple, list)) else dims, f"{path}[{i}]", leaves,
                          leaf_dims, name) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return type(obj)(*items) if hasattr(type(obj), "_fields") else tuple(items)  # namedtuples stay
        return items
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, torch.Tensor) and dims is not None:
        if isinstance(dims, (dict, tuple, list)):
            raise ValueError(f"batch_dim{path} is a structure but {name}{path} is a tensor")
        d = int(dims)
        if obj.ndim == 0:
            raise ValueError(f"{name}{path} is a 0-dimensional tensor; a batched input needs a batch axis "
                             "(pass batch_dim=None for this leaf to hand it to every call unchanged)")
        if not -obj.ndim <= d < obj.ndim:
            raise ValueError(f"batch_dim {d} is out of range for {name}{path} of shape {tuple(obj.shape)}")
        leaves.append(obj.movedim(d, 0) if d % obj.ndim else obj)
        leaf_dims.append(d % obj.ndim)
        return _Leaf(len(leaves) - 1)
    return obj  # static: passed to every call as it is (None, numbers, strings, unbatched tensors)


def _rebuild(skel, leaves):
    if isinstance(skel, _Leaf):
        return leaves[skel.index]
    if isinstance(skel, dict):
        return {k: _rebuild(v, leaves) for k, v in skel.items()}
    if isinstance(skel, tuple):
        items = [_rebuild(v, leaves) for v in skel]
        return type(skel)(*items) if hasattr(type(skel), "_fields") else tuple(items)
    if isinstance(skel, list):
        return [_rebuild(v, leaves) for v in skel]
    return skel


def _signature(skel):
    """The nesting without the static values (x1 and x2 must agree on it)."""
    if isinstance(skel, _Leaf):
        return "leaf"
    if isinstance(skel, dict):
        return ("dict", tuple((k, _signature(v)) for k, v in skel.items()))
    if isinstance(skel, (tuple, list)):
        return (type(skel).__name__, tuple(_signature(v) for v in skel))
    return "static"


class Inputs:
    """A batch of model inputs: batched leaves (batch axis first) and the recipe to call the model."""

    __slots__ = ("leaves", "skel", "dims", "kind", "n")

    def __init__(self, leaves: tuple, skel, dims: tuple, kind: str):
        self.leaves, self.skel, self.dims, self.kind = tuple(leaves), skel, tuple(dims), kind
        self.n = int(self.leaves[0].shape[0])

    def with_leaves(self, leaves) -> "Inputs":
        return Inputs(tuple(leaves), self.skel, self.dims, self.kind)

    def __getitem__(self, sl: slice) -> "Inputs":
        return self.with_leaves(leaf[sl] for leaf in self.leaves)

    def call(self, leaves=None) -> tuple[tuple, dict]:
        """(args, kwargs) for ``model(*args, **kwargs)`` with the batch axes put back where the user had them."""
        leaves = self.leaves if leaves is None else leaves
        leaves = [t.movedim(0, d) if d else t for t, d in zip(leaves, self.dims)]
        obj = _rebuild(self.skel, leaves)
        if self.kind == "args":
            return tuple(obj), {}
        if self.kind == "kwargs":
            return (), dict(obj)
        return (obj,), {}

    def compatible(self, other: "Inputs") -> bool:
        """Same nesting, same static values (so both can share one batch)."""
        return self.kind == other.kind and self.dims == other.dims and _same_static(self.skel, other.skel)

    @staticmethod
    def cat(parts: list["Inputs"]) -> "Inputs":
        first = parts[0]
        return first.with_leaves(torch.cat([p.leaves[i] for p in parts]) for i in range(len(first.leaves)))

    def describe(self) -> str:
        if self.kind == "tensor" and isinstance(self.skel, _Leaf):
            return f"inputs of shape {tuple(self.call()[0][0].shape)}"
        shapes = [tuple(t.shape) for t in self.leaves]
        return f"inputs with batched tensors of shapes {shapes}"

    @property
    def floating(self) -> torch.Tensor | None:
        return next((t for t in self.leaves if t.is_floating_point()), None)


def _same_static(a, b) -> bool:
    if isinstance(a, _Leaf) or isinstance(b, _Leaf):
        return isinstance(a, _Leaf) and isinstance(b, _Leaf) and a.index == b.index
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same_static(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_static(u, v) for u, v in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    try:
        return bool(a is b or a == b)
    except Exception:  # noqa: BLE001 - an object without a boolean equality
        return False


def prepare_inputs(x: Any, name: str, *, dtype: torch.dtype, device, batch_dim: Any = 0) -> Inputs:
    """Validate ``x`` and return it as :class:`Inputs`.

    * a tensor, numpy array or (nested) list of numbers: one positional argument, as before;
    * a tuple: positional arguments ``model(*x)``; a dict: keyword arguments ``model(**x)`` (wrap a tuple or
      dict the model takes as one argument in a 1-tuple: ``(x,)``); tuples, lists and dicts nest freely;
    * ``batch_dim``: the batch axis of every tensor leaf (default 0), or a structure like ``x`` holding an
      axis or None per leaf (None: the leaf is handed unchanged to every call).

    Floating leaves are cast to ``dtype`` and checked as before (no NaN/Inf rows, no zero-sized axis);
    integer and boolean leaves (token ids, attention masks) keep their dtype. Every batched leaf must have
    the same batch length, and there must be at least one.
    """
    if isinstance(x, Sequences):  # variable-length sequences: one argument (values, lengths)
        kind = "tensor"
    elif isinstance(x, tuple):
        kind = "args"
    elif isinstance(x, dict):
        kind = "kwargs"
        if not all(isinstance(k, str) for k in x):
            raise TypeError(f"{name} is a dict of keyword arguments; its keys must be strings, got {list(x)}")
    else:
        kind = "tensor"
        if not isinstance(x, (torch.Tensor, np.ndarray)):
            try:
                arr = np.asarray(x)
            except Exception as exc:  # noqa: BLE001
                raise TypeError(f"{name} must be a tensor, an array, a tuple (positional arguments) or a dict "
                                f"(keyword arguments), got {type(x).__name__}") from exc
            if arr.dtype.kind not in "fiub":
                raise TypeError(f"{name} must be a tensor, an array, a tuple (positional arguments) or a dict "
                                f"(keyword arguments) of tensors, got {type(x).__name__} with dtype {arr.dtype}")
            x = arr
    leaves: list[torch.Tensor] = []
    leaf_dims: list[int] = []
    skel = _flatten(x, batch_dim, "", leaves, leaf_dims, name)
    if not leaves:
        raise ValueError(f"{name} holds no batched tensor; pass the batch as a tensor (or tensors inside a "
                         "tuple/dict) with the samples along batch_dim")
    out = []
    for i, t in enumerate(leaves):
        where = name if kind == "tensor" and isinstance(skel, _Leaf) else f"{name} (batched tensor {i})"
        if t.is_complex():
            raise TypeError(f"{where} is complex ({t.dtype}); ntkit needs real inputs")
        if t.shape[0] == 0:
            raise ValueError(f"{where} is empty (batch size 0); pass at least one sample.")
        if any(s == 0 for s in t.shape[1:]):
            raise ValueError(f"{where} has a zero-sized dimension: shape {tuple(t.shape)}.")
        if t.is_floating_point():
            t = t.to(device=device, dtype=dtype)
            check_finite_rows(t, where)
        else:
            t = t.to(device=device)
        out.append(t)
    lengths = {int(t.shape[0]) for t in out}
    if len(lengths) > 1:
        raise ValueError(f"the batched tensors of {name} have different batch lengths {[int(t.shape[0]) for t in out]}"
                         " along their batch axes; they must all hold the same samples (set batch_dim per leaf, "
                         "None for a leaf that is not batched)")
    return Inputs(tuple(out), skel, tuple(leaf_dims), kind)


def _is_sequence_list(x: Any) -> bool:
    """A list of (T_i, d) (or 1-D) arrays/tensors of different lengths: a batch of variable-length sequences."""
    if not isinstance(x, list) or not x:
        return False
    if not all(isinstance(s, (torch.Tensor, np.ndarray)) and s.ndim in (1, 2) for s in x):
        return False
    return len({tuple(s.shape) for s in x}) > 1


def sequence_pair(x1: Any, x2: Any, *, dtype: torch.dtype, device) -> tuple[Any, Any]:
    """Batches of variable-length sequences -- a list of (T_i, d) arrays of different lengths, or
    :class:`~ntkit.Sequences` -- validated (errors name the sequence and time step) and zero-padded at the
    end to one common length, as :class:`~ntkit.Sequences` (values, lengths), the input of the finite twin
    of a recurrent architecture. Anything else is returned unchanged (an (n, T, d) tensor or a list of
    equal-length sequences is an ordinary batch)."""
    seq1 = isinstance(x1, Sequences) or _is_sequence_list(x1)
    seq2 = x2 is not None and (isinstance(x2, Sequences) or _is_sequence_list(x2))
    if not (seq1 or seq2):
        return x1, x2
    s1 = as_sequences(x1, "x1", dtype=dtype, device=device)
    s2 = None if x2 is None else as_sequences(x2, "x2", dtype=dtype, device=device)
    if s2 is not None and s2.values.shape[-1] != s1.values.shape[-1]:
        raise ValueError(f"x2 sequences have {s2.values.shape[-1]} features per time step, x1 sequences have "
                         f"{s1.values.shape[-1]}; they must match")
    t = max(s1.values.shape[1], 0 if s2 is None else s2.values.shape[1])

    def pad(s):
        if s is None or s.values.shape[1] == t:
            return s
        return Sequences(torch.nn.functional.pad(s.values, (0, 0, 0, t - s.values.shape[1])), s.lengths)

    return pad(s1), pad(s2)


def check_pair_inputs(a: Inputs, b: Inputs) -> None:
    """x2 must have x1's nesting and, leaf by leaf, the same per-sample shape and kind of dtype."""
    if a.kind != b.kind or _signature(a.skel) != _signature(b.skel) or a.dims != b.dims:
        raise ValueError("x1 and x2 have different structures (nesting, keys or batched leaves); they must be "
                         "passed the same way")
    for i, (u, v) in enumerate(zip(a.leaves, b.leaves)):
        if u.shape[1:] != v.shape[1:]:
            what = "" if len(a.leaves) == 1 else f" (batched tensor {i})"
            raise ValueError(f"x1 samples have shape {tuple(u.shape[1:])} but x2 samples have shape "
                             f"{tuple(v.shape[1:])}{what}; they must match")
        if u.is_floating_point() != v.is_floating_point() or (u.dtype == torch.bool) != (v.dtype == torch.bool):
            raise TypeError(f"x1 and x2 batched tensor {i} have dtypes {u.dtype} and {v.dtype}; pass both as "
                            "floating point or both as integers")
