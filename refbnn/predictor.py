"""``refbnn.load(path)``: a refbnn weight file, ready to predict.

::

    import refbnn
    model = refbnn.load("weights/ftbnn18.h5")          # packed XNOR-popcount engine by default
    probs = model.predict(x)                           # x: (N, 1, 28, 28) float32, normalised
    probs = model.predict_files(["digit.png"])         # image files, converted as the file says
    model.class_names[probs.argmax(1)[0]]

:func:`load` reads any kind of refbnn file (model, checkpoint, packed export; the loader validates
it) and builds the packed engine from its config and named tensors (:meth:`refbnn.engine.Engine.from_file`:
no float model, so packed-only files run too); ``engine="reference"`` builds the float NumPy model in
eval mode instead.
``python -m refbnn.infer`` is a thin CLI over it.

Input, ``predict(images)``: an array in the file's input layout (``input_spec["layout"]``:
``(N, C, H, W)`` for ``"NCHW"``, ``(N, H, W, C)`` for ``"NHWC"``; the shape in ``input_spec``, or the
config's ``input_shape`` NCHW for a file without one), float32 (other float dtypes are converted),
already normalised: pixel ``p`` in [0, 255] as ``(p / 255 - mean) / std`` per channel. NaN is
refused (``ValueError``). Output: ``(N, classes)`` float64 softmax probabilities;
``logits(images)`` gives the raw ``(N, classes)`` float32 scores.

Image files, ``predict_files(paths)`` / ``images_from_files(paths)``: any format pillow reads; EXIF
orientation applied; 16-bit grey scaled to 8 bits (not clipped); a transparent background
composited onto the background the image's strokes need (below); converted to the spec's
``channel_order`` (``"L"`` grey, ``"RGB"``, ``"BGR"``), resized bilinearly to the model's input
size and normalised as above. For grey models (trained on light strokes on a dark background, as
MNIST) ``invert``: ``"yes"`` inverts every image, ``"no"`` none, ``"auto"`` (default) inverts an
image whose border is mostly light (mean > 0.5 after compositing). A transparent background is
white behind dark strokes and black behind light ones (for ``"auto"``: judged from the opaque
pixels' mean; ``"yes"`` means dark strokes, ``"no"`` light ones), so strokes drawn on a
transparent canvas classify like the same strokes on paper; RGB models composite onto white.
Images larger than pillow's bomb limit (about 89 megapixels) are refused. Every unreadable,
missing, corrupt or oversized file raises :class:`ImageError` naming it.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from refbnn import fileformat, models
from refbnn.engine import STEM_PRECISIONS, Engine, EngineError

ENGINES = ("packed", "reference")
INVERT = ("auto", "yes", "no")


class ImageError(ValueError):
    """An image file that cannot be used (missing, not an image, corrupt, too large)."""


class LoadedModel:
    """A refbnn file ready to predict (see the module docstring). Attributes: ``file`` (the
    :class:`~refbnn.fileformat.LoadedFile`), ``network`` (the eval-mode float model with
    ``engine="reference"``, else ``None``), ``engine``
    (``"packed"`` or ``"reference"``), ``input_spec``, ``class_names`` (a name per class),
    ``dataset``, ``input_shape`` (one image in the input layout)."""

    def __init__(self, file, network, forward, engine: str, warm_up=None):
        self.file, self.network, self.engine = file, network, engine
        self._forward = forward
        self._warm_up = warm_up
        self.input_spec = file.input_spec
        self.dataset = file.dataset
        k = int(file.config["num_classes"])
        self.class_names = list(file.class_names) if file.class_names else [str(i) for i in range(k)]
        spec = self.input_spec
        self.layout = spec["layout"] if spec else "NCHW"
        self.input_shape = tuple(spec["shape"]) if spec else tuple(file.config["input_shape"])

    def __repr__(self):
        return (f"LoadedModel({self.file.path!r}, engine={self.engine!r}, "
                f"input {self.layout} {self.input_shape}, {len(self.class_names)} classes)")

    def _nchw(self, images) -> np.ndarray:
        x = np.asarray(images)
        if x.dtype.kind != "f":
            raise ValueError(f"images must be a float array (normalised pixels), got {x.dtype}")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"images must be (N, {', '.join(map(str, self.input_shape))}) in "
                             f"{self.layout} layout, got {x.shape}")
        x = x.astype(np.float32, copy=False)
        if np.isnan(x).any():
            raise ValueError("images contain NaN")
        if self.layout == "NHWC":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x)

    def warm_up(self) -> None:
        """Load every compiled path of the packed engine before calls are timed
        (:meth:`refbnn.engine.Engine.warm_up`); nothing for the reference engine."""
        if self._warm_up is not None:
            self._warm_up()

    def logits(self, images) -> np.ndarray:
        """Raw scores ``(N, classes)`` float32 of ``images`` (input as in the module docstring)."""
        return np.asarray(self._forward(self._nchw(images)), dtype=np.float32)

    def predict(self, images) -> np.ndarray:
        """Class probabilities ``(N, classes)`` float64 (softmax of the logits)."""
        return softmax(self.logits(images).astype(np.float64))

    def images_from_files(self, paths, invert: str = "auto") -> np.ndarray:
        """The files converted as the input spec says: an array ``predict`` takes."""
        if self.input_spec is None:
            raise ValueError(f"{self.file.path}: the file has no input_spec, so images cannot be "
                             "converted")
        x = image_batch(paths, self.input_spec, invert)
        return x.transpose(0, 2, 3, 1).copy() if self.layout == "NHWC" else x

    def predict_files(self, paths, invert: str = "auto") -> np.ndarray:
        """Class probabilities ``(len(paths), classes)`` of image files (module docstring)."""
        return self.predict(self.images_from_files(paths, invert))


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def load(path, engine: str = "packed", stem: str = "float32") -> LoadedModel:
    """Load refbnn file ``path`` for prediction (module docstring); ``stem``: the packed engine's
    stem arithmetic (``"float32"``, or ``"bf16"``: docs/semantics.md 7b; the reference engine
    takes ``"float32"`` only). Raises ``FileNotFoundError``,
    :class:`~refbnn.fileformat.FormatError` (a ``ValueError``) for a bad file, ``ValueError`` for a
    config the network builder or the engine refuses, ``OSError`` when it cannot be read."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if stem not in STEM_PRECISIONS:
        raise ValueError(f"stem must be one of {', '.join(STEM_PRECISIONS)}, got {stem!r}")
    if stem != "float32" and engine != "packed":
        raise ValueError(f"stem={stem!r} is an option of the packed engine; the reference engine "
                         "computes the float path in float32")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    f = fileformat.load(path)
    if engine == "packed":
        # built from the config and the named tensors: a packed-only file needs no float model
        try:
            compiled = Engine.from_file(f, stem=stem)
        except EngineError as e:  # e.g. sign_at_zero=0 (converted official Bi-Real Net checkpoints)
            raise ValueError(f"{path}: {e}; --engine reference runs it on the float path") from None
        return LoadedModel(f, None, compiled.forward, engine, compiled.warm_up)
    try:
        network = models.build(f.config)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: model config: {e}") from None
    state = f.state_dict if f.kind != "packed" else f.sign_state_dict()
    if f.kind == "packed":
        # latent weights are gone: alpha * sign reproduces both sign(W) and mean|W| = alpha
        for name, b in f.binary.items():
            if b.scale is not None:
                a = np.asarray(b.scale, np.float32).reshape(-1, *[1] * (state[name].ndim - 1))
                state[name] = (state[name] * a).astype(np.float32)
    try:
        network.load_state_dict(state)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: the tensors do not match the model config: {e}") from None
    network.eval()
    return LoadedModel(f, network, network.forward, engine)


# --- image files -------------------------------------------------------------------------------------
def _open_image(path, mode: str, invert: str):
    """``(array (H, W, C) float32 in [0, 1] after compositing, PIL image in ``mode``)``."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey (pillow opens 16-bit PNGs as I;16 or I): scale 0..65535 to 0..255
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(a * (255 / 65535)), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        im = im.convert("RGBA")
        rgba = np.asarray(im, dtype=np.float32) / 255.0
        alpha = rgba[..., 3:]
        if alpha.min() < 1.0:
            grey = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
            if mode != "L":
                background = 1.0
            elif invert == "auto":
                w = alpha[..., 0]
                strokes = float((grey * w).sum() / w.sum()) if w.sum() > 0 else 0.0
                background = 1.0 if strokes < 0.5 else 0.0
            else:
                background = 1.0 if invert == "yes" else 0.0
            rgb = rgba[..., :3] * alpha + np.float32(background) * (1 - alpha)
            im = Image.fromarray(np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8), "RGB")
    return im.convert(mode)


def image_batch(paths, spec, invert: str = "auto") -> np.ndarray:
    """Image files as a normalised ``(N, C, H, W)`` float32 batch for input spec ``spec``
    (module docstring); :class:`ImageError` for a file that cannot be used."""
    from PIL import Image

    if invert not in INVERT:
        raise ValueError(f"invert must be one of {', '.join(INVERT)}, got {invert!r}")
    c, h, w = spec["shape"] if spec["layout"] == "NCHW" else (spec["shape"][2], *spec["shape"][:2])
    mode = "L" if spec["channel_order"] == "L" else "RGB"
    mean = np.asarray(spec["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec["std"], np.float32).reshape(1, -1, 1, 1)
    out = np.empty((len(paths), c, h, w), np.float32)
    for i, path in enumerate(paths):
        path = os.fspath(path)
        if not os.path.exists(path):
            raise ImageError(f"{path}: no such file")
        if os.path.isdir(path):
            raise ImageError(f"{path}: is a folder, not an image")
        if not os.path.isfile(path):  # a FIFO would block the read forever, a device never ends
            raise ImageError(f"{path}: not a regular file (a FIFO, device or socket), not an image")
        try:
            im = _open_image(path, mode, invert)
            im = im.resize((w, h), Image.Resampling.BILINEAR)
            a = np.asarray(im, dtype=np.float32) / 255.0
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(f"{path}: image too large ({e})") from None
        except MemoryError:
            raise ImageError(f"{path}: image too large to decode in memory") from None
        except Exception as e:  # pillow raises many types for broken files
            raise ImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        if mode == "L" and (invert == "yes" or (invert == "auto" and _border_mean(a[0]) > 0.5)):
            a = 1.0 - a
        out[i] = a
    if spec["channel_order"] == "BGR":
        out = out[:, ::-1]
    return (out - mean) / std


def _border_mean(a) -> float:
    return float(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]).mean())
