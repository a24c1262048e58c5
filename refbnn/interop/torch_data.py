"""Data for the PyTorch trainer (:mod:`refbnn.interop.train_torch`; needs the ``torch`` extra).

* :class:`IdxImages`: a refbnn MNIST-family :class:`~refbnn.data.Dataset` as a ``torch`` dataset
  with the CPU trainer's shift augmentation and normalisation (:func:`refbnn.data.shift_images`,
  :func:`refbnn.data.normalization_table`), fetched a whole batch at a time.
* :class:`ImageFolder`: an ImageNet-layout tree ``root/<split>/<class>/<image>`` read with pillow;
  training items get a random-resized crop and a horizontal flip, evaluation items a resize and a
  center crop (the standard ImageNet pipeline, written here because torchvision is not installed).
* :class:`ShardSampler`: ``torch``'s :class:`~torch.utils.data.DistributedSampler` that can start
  part-way into an epoch (resuming from a mid-epoch checkpoint).

Randomness is keyed, not streamed: example ``i`` of epoch ``e`` draws from
``np.random.default_rng([seed, e, i])`` (image folders), or its shift is row ``i`` of a table drawn
from ``np.random.default_rng([seed, e])`` (MNIST family). So the augmentation of an example depends
on neither the number of ranks nor of data-loader workers nor where a run was resumed.
"""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from refbnn.data import DataError, normalization_table, shift_images

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
CROP_SCALE = (0.08, 1.0)            # random-resized crop: fraction of the image area
CROP_RATIO = (3 / 4, 4 / 3)         # ... and aspect ratio (width / height) range
EVAL_RESIZE_RATIO = 256 / 224       # evaluation: shorter side resized to size * this, then cropped


def pass_batch(batch):
    """``collate_fn`` for datasets whose ``__getitems__`` already returns a collated batch."""
    return batch


class IdxImages(Dataset):
    """A refbnn MNIST-family data set for ``torch``: item ``i`` -> ``(x, y)``, ``x`` (1, H, W)
    float32, ``y`` int64.

    Exactly :func:`refbnn.data.batches`' per-example transform: with ``augment = k > 0`` each image
    is shifted by whole pixels ``(dy, dx)`` in ``[-k, k]`` with 0 fill, then pixel ``v`` becomes
    ``float32((v / 255 - mean) / std)``. The shifts of epoch ``e`` are
    ``np.random.default_rng([seed, e]).integers(-k, k + 1, size=(N, 2))``, row ``i`` for example
    ``i`` (call :meth:`set_epoch` before each epoch). ``__getitems__`` builds a whole batch in one
    pass; use it with ``collate_fn=pass_batch``.
    """

    def __init__(self, dataset, mean: float, std: float, augment: int = 0, seed: int = 0):
        if augment < 0:
            raise ValueError(f"augment (max shift in pixels) must be >= 0, got {augment}")
        self.images, self.labels = dataset.images, dataset.labels
        self.table = normalization_table(mean, std)
        self.augment, self.seed = int(augment), int(seed)
        self.epoch = 0
        self._shifts = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._shifts = None

    def shifts(self) -> np.ndarray | None:
        """(N, 2) int64 ``(dy, dx)`` of the current epoch, or None without augmentation."""
        if self.augment and self._shifts is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._shifts = rng.integers(-self.augment, self.augment + 1, size=(len(self.labels), 2))
        return self._shifts

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices):
        idx = np.asarray(indices, dtype=np.int64)
        pixels = self.images[idx]
        shifts = self.shifts()
        if shifts is not None:
            pixels = shift_images(pixels, shifts[idx])
        x = np.ascontiguousarray(self.table[pixels][:, None])
        return torch.from_numpy(x), torch.from_numpy(self.labels[idx].astype(np.int64))

    def __getitem__(self, i):
        x, y = self.__getitems__([i])
        return x[0], y[0]


# --- image folders -----------------------------------------------------------------------------

def scan_image_folder(folder, classes=None):
    """``(classes, samples)`` of ``folder/<class>/<image>``: class names sorted (or as given),
    samples ``[(path, label)]`` sorted by class, then file name; image files by extension
    (:data:`IMAGE_EXTENSIONS`, any case). Raises :class:`~refbnn.data.DataError` for a missing
    folder, no class folders, a class folder without images, or (``classes`` given) a class
    folder not among ``classes``."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder (expected <root>/train/<class>/* and "
                        "<root>/val/<class>/*)")
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not found:
        raise DataError(f"{folder}: holds no class folders")
    if classes is None:
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DataError(f"{folder}: class folder {extra[0]!r} is not among the training classes")
    index = {c: k for k, c in enumerate(classes)}
    samples = []
    for c in found:
        sub = os.path.join(folder, c)
        files = sorted(e.name for e in os.scandir(sub)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(f"{sub}: holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        samples.extend((os.path.join(sub, f), index[c]) for f in files)
    return list(classes), samples


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=CROP_SCALE, ratio=CROP_RATIO) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of a random crop covering ``scale`` of the area with aspect
    ratio (w / h) in ``ratio`` (log-uniform), as ImageNet training usually samples it.

    Up to 10 tries, each drawing ``area = width * height * U(scale)`` and
    ``r = exp(U(log ratio))``, then ``w = round(sqrt(area * r))``, ``h = round(sqrt(area / r))``;
    the first that fits is placed at ``top = integers(0, height - h + 1)``,
    ``left = integers(0, width - w + 1)``. Otherwise the whole image clamped to ``ratio``, centered.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        r = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * r))
        h = round(math.sqrt(target / r))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    r = width / height
    if r < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif r > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def resize_center_crop_geometry(width: int, height: int, resize: int, size: int):
    """``((new_w, new_h), (left, top, right, bottom))``: scale the shorter side to ``resize`` (the
    longer one to ``int(resize * long / short)``), then a centered ``size`` x ``size`` crop at
    ``round((new - size) / 2)``."""
    if width <= height:
        new = (resize, int(resize * height / width))
    else:
        new = (int(resize * width / height), resize)
    left = round((new[0] - size) / 2.0)
    top = round((new[1] - size) / 2.0)
    return new, (left, top, left + size, top + size)


class ImageFolder(Dataset):
    """``root/<split>/<class>/<image>`` as a ``torch`` dataset: item ``i`` -> ``(x, y)``, ``x``
    (3, size, size) **uint8** RGB (normalise on the device: ``(x / 255 - mean) / std`` with
    :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`), ``y`` the class index (classes sorted by name).

    ``train=True``: :func:`random_resized_crop_box` resized to ``size`` x ``size`` (bilinear, one
    pillow ``resize`` with ``box``), then flipped left-right when ``rng.random() < 0.5``, all drawn
    from ``np.random.default_rng([seed, epoch, i])``. ``train=False``: shorter side resized to
    ``round(size * 256 / 224)`` (bilinear), centered ``size`` crop. Every image is converted to RGB.
    """

    def __init__(self, root, split: str, size: int = 224, train: bool = True, seed: int = 0,
                 classes=None):
        self.folder = os.path.join(os.fspath(root), split)
        self.classes, self.samples = scan_image_folder(self.folder, classes)
        self.size, self.train, self.seed = int(size), bool(train), int(seed)
        self.resize = round(self.size * EVAL_RESIZE_RATIO)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int):
        """The transformed RGB pillow image of item ``i``."""
        from PIL import Image, UnidentifiedImageError

        path, _ = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{path}: not a readable image ({e})") from None
        bilinear = Image.Resampling.BILINEAR
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            box = random_resized_crop_box(im.width, im.height, rng)
            im = im.resize((self.size, self.size), bilinear, box=box)
            if rng.random() < 0.5:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            new, box = resize_center_crop_geometry(im.width, im.height, self.resize, self.size)
            im = im.resize(new, bilinear).crop(box)
        return im

    def __getitem__(self, i):
        a = np.asarray(self.load(i), dtype=np.uint8)
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))), self.samples[i][1]


def even_subset(n_total: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(n_total)``: ``floor(k * n_total / n)``."""
    return [k * n_total // n for k in range(n)]


# --- sampling ----------------------------------------------------------------------------------

class ShardSampler(DistributedSampler):
    """:class:`~torch.utils.data.DistributedSampler` (seeded ``randperm`` per epoch, padded to a
    multiple of the world size by repeating the first indices, rank ``r`` taking positions
    ``r, r + W, ...``) that skips the first ``start_batch`` per-rank batches of ``batch_size``.

    With per-rank batch ``b`` and ``W`` ranks, global step ``k`` therefore trains on positions
    ``[k * b * W, (k + 1) * b * W)`` of the epoch's permutation, the same examples one rank with
    batch ``b * W`` uses, whenever ``N`` is a multiple of ``W`` (else padding repeats ``< W``).
    """

    def __init__(self, dataset, num_replicas: int, rank: int, batch_size: int, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=False)
        self.batch_size = int(batch_size)
        self.start_batch = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start_batch * self.batch_size, None)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_batch * self.batch_size)
