"""Mini-batches for training and evaluation: shuffling, shift augmentation, normalisation.

Everything random comes from the ``np.random.Generator`` passed in, so a batch sequence is a
pure function of (data set, arguments, generator state at the call).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .specs import DATASETS

DATASET_STATS = "dataset"


def normalization_table(mean: float, std: float) -> np.ndarray:
    """(256,) float32 table: entry ``v`` is ``float32((v / 255 - mean) / std)``, evaluated in
    float64 in that order and rounded once to float32. Pixel ``v`` of a batch becomes entry ``v``."""
    if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
        raise ValueError(f"normalize needs a finite mean and a std > 0, got ({mean}, {std})")
    return ((np.arange(256, dtype=np.float64) / 255.0 - mean) / std).astype(np.float32)


def shift_images(images: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Translate each image by whole pixels, filling with 0 (the background pixel value).

    ``images``: (B, H, W); ``shifts``: (B, 2) integers ``(dy, dx)``. Returns a new (B, H, W) array
    of the same dtype with ``out[b, i, j] = images[b, i - dy, j - dx]`` where that index is inside
    the image, else 0 (positive ``dy`` moves content down, positive ``dx`` right).
    """
    b, h, w = images.shape
    shifts = np.asarray(shifts, dtype=np.int64).reshape(b, 2)
    k = int(np.abs(shifts).max()) if b else 0
    padded = np.pad(images, ((0, 0), (k, k), (k, k)))
    rows = np.arange(h)[None, :] + (k - shifts[:, 0])[:, None]   # (B, H) rows of ``padded``
    cols = np.arange(w)[None, :] + (k - shifts[:, 1])[:, None]   # (B, W)
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _resolve_stats(dataset, normalize) -> tuple[float, float]:
    if isinstance(normalize, str):
        if normalize != DATASET_STATS:
            raise ValueError(f"normalize must be 'dataset', (mean, std) or None, got {normalize!r}")
        if dataset.name not in DATASETS:
            raise ValueError(f"no default normalisation for dataset {dataset.name!r}; "
                             "pass normalize=(mean, std)")
        spec = DATASETS[dataset.name]
        return spec.mean, spec.std
    if normalize is None:
        return 0.0, 1.0
    mean, std = normalize
    return float(mean), float(std)


def batches(dataset, batch_size: int, rng: np.random.Generator, shuffle: bool = True,
            drop_last: bool = False, augment: int | None = None, normalize=DATASET_STATS,
            start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of mini-batches ``(x, y)`` from ``dataset`` (a :class:`~refbnn.data.Dataset`).

    ``x``: (B, 1, H, W) float32 NCHW, C-contiguous; ``y``: (B,) int64 labels. Every example appears
    exactly once per epoch; the last batch is smaller (``N % batch_size``) unless ``drop_last``
    drops it. Batches index the uint8 images per batch; the data set is never copied whole.

    Random draws happen at this call, eagerly, in this order: ``rng.permutation(N)`` if
    ``shuffle`` (else order ``0..N-1``); then, if ``augment`` (= k > 0), one
    ``rng.integers(-k, k + 1, size=(M, 2))`` of ``(dy, dx)`` shifts, row ``p`` for the example at
    epoch position ``p`` (``M`` = examples yielded). Nothing is drawn while iterating, so saving
    the generator state before the call and the number of batches consumed lets a run resume:
    restore the state and pass ``start`` = that number (skipped batches are not computed).

    ``augment``: maximal shift k in pixels (None or 0: none); each image is translated by its
    ``(dy, dx)`` with 0-pixel fill (:func:`shift_images`) BEFORE normalisation.
    ``normalize``: ``"dataset"`` (default) uses the data set's train-split statistics: MNIST
    (0.1307, 0.3081), Fashion-MNIST (0.2860, 0.3530); a ``(mean, std)`` pair uses those; None
    gives plain ``v / 255``. Pixel ``v`` maps to ``float32((v / 255 - mean) / std)``
    (:func:`normalization_table`), so a shifted-in pixel becomes ``-mean / std``.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    batch_size, k, start = int(batch_size), int(augment or 0), int(start)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if k < 0:
        raise ValueError(f"augment (max shift in pixels) must be >= 0, got {k}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    table = normalization_table(*_resolve_stats(dataset, normalize))
    n = len(dataset.labels)
    order = rng.permutation(n) if shuffle else np.arange(n)
    used = (n // batch_size) * batch_size if drop_last else n
    shifts = rng.integers(-k, k + 1, size=(used, 2)) if k else None
    return _iterate(dataset.images, dataset.labels, order, used, batch_size, shifts, table, start)


def _iterate(images, labels, order, used, batch_size, shifts, table, start):
    for lo in range(start * batch_size, used, batch_size):
        hi = min(lo + batch_size, used)
        idx = order[lo:hi]
        pixels = images[idx]
        if shifts is not None:
            pixels = shift_images(pixels, shifts[lo:hi])
        x = table[pixels][:, None, :, :]
        yield np.ascontiguousarray(x), labels[idx].astype(np.int64)
