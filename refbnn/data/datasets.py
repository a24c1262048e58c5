"""Loading a named data set split into memory, with the checks every split must pass."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from . import download as _download
from . import locate
from .idx import DataError, read_idx
from .specs import SPLIT_FILES, check_split, get_spec

IMAGE_SHAPE = (28, 28)


@dataclass(frozen=True, eq=False)
class Dataset:
    """One split of a data set held in memory.

    ``images``: (N, 28, 28) uint8, row-major pixels as stored in the IDX file (0 = background).
    ``labels``: (N,) uint8, each ``< len(class_names)``. ``class_names[k]`` names label ``k``.
    ``name``: the data set's name (``"mnist"``, ``"fashion-mnist"``); ``split``: ``"train"`` or
    ``"test"`` (any string for hand-built sets). Checked on construction (:class:`DataError`).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    name: str
    split: str

    def __post_init__(self):
        check_pair(self.images, self.labels, len(self.class_names), f"{self.name} {self.split}")

    def __len__(self) -> int:
        return len(self.labels)


def check_pair(images, labels, n_classes: int, where: str) -> None:
    """Raise :class:`DataError` unless images are (N, 28, 28) uint8 and labels (N,) uint8 below
    ``n_classes``; ``where`` names the source (files or data set) in the message."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{where}: images must be (N, 28, 28) uint8, got {images.shape} "
                        f"{images.dtype}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{where}: labels must be (N,) uint8, got {labels.shape} {labels.dtype}")
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")
    if labels.size and int(labels.max()) >= n_classes:
        raise DataError(f"{where}: label {int(labels.max())} out of range (expected < {n_classes})")


def load_dataset(name: str, split: str, data_dir=None, download: bool = True) -> Dataset:
    """Load split ``split`` (``"train"`` or ``"test"``) of data set ``name``.

    ``name``: ``"mnist"`` or ``"fashion-mnist"`` (anything else: :class:`DataError` listing the
    known names). Files are looked for in the folders of :mod:`refbnn.data.locate` (``data_dir``
    first: the folder holding the files, or its parent holding ``<name>/``). If no folder holds
    both files of the split and ``download`` is true, all four files are downloaded into the user
    cache and verified (:mod:`refbnn.data.download`); any failure is one :class:`DataError` line
    naming the folders searched and where to put the files.
    """
    spec = get_spec(name)
    file_names = SPLIT_FILES[check_split(split)]
    dirs = locate.search_dirs(spec.name, data_dir)
    paths = locate.find_files(dirs, file_names)
    if paths is None:
        where = (f"{spec.name} {split} files ({' and '.join(f + '[.gz]' for f in file_names)}) "
                 f"not found in: {', '.join(str(d) for d in dirs)}")
        hint = (f"put the four files in {locate.cache_dir(spec.name)}, or in DIR/{spec.name}/ and "
                f"set {locate.ENV_VAR}=DIR (a {os.pathsep!r}-separated list of folders), or pass "
                f"data_dir=DIR")
        if not download:
            raise DataError(f"{where} (download disabled); {hint}")
        cache = locate.cache_dir(spec.name)
        try:
            _download.download_dataset(spec, cache)
        except DataError as e:
            raise DataError(f"{where}; download failed: {e}; {hint}") from None
        paths = locate.find_files([cache], file_names)
        if paths is None:  # pragma: no cover - download_dataset wrote them or raised
            raise DataError(f"{where}; download did not produce them in {cache}")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    check_pair(images, labels, len(spec.class_names), f"{paths[0]} + {paths[1]}")
    if len(labels) == 0:  # nothing to train or evaluate on: the runs would divide by zero
        raise DataError(f"{paths[0]} + {paths[1]}: the {split} split holds no images")
    return Dataset(images, labels, spec.class_names, spec.name, split)


def subset(dataset: Dataset, n: int, seed: int | None = None) -> Dataset:
    """The first ``n`` examples (``seed=None``; views, no copy) or ``n`` distinct examples drawn by
    ``np.random.default_rng(seed)`` without replacement, kept in their original order."""
    n = int(n)
    if not 0 <= n <= len(dataset):
        raise ValueError(f"subset size must be in [0, {len(dataset)}], got {n}")
    if seed is None:
        idx = slice(0, n)
    else:
        idx = np.sort(np.random.default_rng(seed).choice(len(dataset), size=n, replace=False))
    return Dataset(dataset.images[idx], dataset.labels[idx], dataset.class_names, dataset.name,
                   dataset.split)
