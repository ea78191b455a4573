"""Data loaders for the demo and the reproductions: MNIST from IDX or npz files, and bundled digits.

The package never downloads data and never assumes where data lives: MNIST paths are arguments. When
no MNIST path is given, :func:`load_digits` returns real handwritten digits that ship inside
scikit-learn (8x8 images), so every experiment can run on a fresh machine.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

__all__ = ["load_mnist", "load_digits", "load_images"]


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 8:
        raise ValueError(f"{path} is too short to be an IDX file")
    magic = int.from_bytes(raw[0:4], "big")
    if magic not in (2049, 2051):
        raise ValueError(f"{path} is not an MNIST IDX file (magic number {magic}, expected 2049 or 2051)")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but the file holds {data.size} bytes of data")
    return data.reshape(dims)


def load_mnist(path: str | os.PathLike, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST images and labels from a folder of IDX files or an ``.npz`` file.

    Parameters
    ----------
    path : path
        A folder holding ``t10k-images-idx3-ubyte(.gz)`` and ``t10k-labels-idx1-ubyte(.gz)`` (or the
        ``train-`` pair), or an ``.npz`` file with arrays ``images`` (n, 28, 28) and ``labels`` (n,).
    n : int, optional
        Keep the first ``n`` samples (in file order).

    Returns
    -------
    images : ndarray, float64, shape (n, 28, 28), pixels in [0, 1]
    labels : ndarray, int64, shape (n,)
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"MNIST path {p} does not exist; pass a folder with the IDX files or an .npz "
                                "with 'images' and 'labels'")
    if p.is_file():
        with np.load(p) as z:
            if "images" not in z or "labels" not in z:
                raise ValueError(f"{p} has arrays {sorted(z.files)}; expected 'images' and 'labels'")
            images, labels = z["images"], z["labels"]
    else:
        found = None
        for prefix in ("t10k", "train"):
            for ext in (".gz", ""):
                img, lab = p / f"{prefix}-images-idx3-ubyte{ext}", p / f"{prefix}-labels-idx1-ubyte{ext}"
                if img.is_file() and lab.is_file():
                    found = (img, lab)
                    break
            if found:
                break
        if found is None:
            raise FileNotFoundError(f"no MNIST IDX files (t10k-images-idx3-ubyte[.gz] and the labels file) in {p}")
        images, labels = _read_idx(found[0]), _read_idx(found[1])
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{p}: {images.shape[0]} images but {labels.shape[0]} labels")
    if n is not None:
        if n > images.shape[0]:
            raise ValueError(f"asked for {n} MNIST samples but {p} holds {images.shape[0]}")
        images, labels = images[:n], labels[:n]
    return images.astype(np.float64) / 255.0, labels.astype(np.int64)


def load_digits(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 handwritten digits bundled with scikit-learn, pixels scaled to [0, 1].

    Returns ``images`` (n, 8, 8) float64 and ``labels`` (n,) int64, in the bundled order.
    """
    from sklearn.datasets import load_digits as _load

    d = _load()
    images, labels = d.images / 16.0, d.target.astype(np.int64)
    if n is not None:
        if n > images.shape[0]:
            raise ValueError(f"asked for {n} digits but scikit-learn bundles {images.shape[0]}")
        images, labels = images[:n], labels[:n]
    return images, labels


def load_images(mnist: str | os.PathLike | None = None, n: int | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """MNIST from ``mnist`` if given, else scikit-learn's bundled digits; returns (images, labels, name)."""
    if mnist is not None:
        images, labels = load_mnist(mnist, n)
        return images, labels, "MNIST"
    images, labels = load_digits(n)
    return images, labels, "scikit-learn digits (8x8)"
