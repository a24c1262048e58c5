"""refbnn.data: IDX files, the MNIST-family data sets (lookup, download) and mini-batches.

Typical use (what ``python -m refbnn.train --dataset mnist`` does)::

    train = load_dataset("mnist", "train")               # Dataset: images (N,28,28) uint8, labels
    rng = np.random.default_rng(seed)
    for x, y in batches(train, 128, rng, augment=2):     # x (B,1,28,28) float32, y (B,) int64
        ...

Every data problem raises :class:`DataError` (a ``ValueError``) with a one-line message.
"""

from .datasets import Dataset, load_dataset, subset
from .idx import DataError, read_idx
from .loader import batches, normalization_table, shift_images
from .specs import DATASETS

__all__ = ["DATASETS", "DataError", "Dataset", "batches", "load_dataset", "normalization_table",
           "read_idx", "shift_images", "subset"]
