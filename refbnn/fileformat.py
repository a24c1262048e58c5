"""refbnn's HDF5 file format (version 2) for weights, checkpoints and packed deployment exports.

``docs/format.md`` is the specification; this module is its reference implementation. In short:

* a 512-byte user block ``refbnn-hdf5 2`` + the SHA-256 of the rest, checked before HDF5 parses
  anything; the whole file is read into memory once, so what was hashed is what is parsed;
* no HDF5 attributes and no variable-length data anywhere: the metadata is one UTF-8 JSON object
  in the ``uint8`` dataset ``/meta`` (size capped and checked before it is read); tensors are plain
  little-endian numeric datasets, contiguous and unfiltered;
* the model config (``refbnn.models.config.SCHEMA``) determines the exact set of tensors — names,
  shapes, dtypes and packed binary weights — so a reader checks every object against it, and the
  sizes against the file's size, before it reads any tensor;
* state-dict key ``a.b.weight`` is dataset ``weight`` of group ``/model/a.b``; a binary weight ``W``
  (``(O, I, KH, KW)``) is also stored as ``weight_packed``: ``uint64`` words
  ``pack(sign(moveaxis(W, 1, -1)))`` of shape ``(O, KH, KW, ceil(I/64))``, bit 1 = -1, LSB first;
* ``kind="packed"`` files drop the latent binary weights; ``kind="checkpoint"`` files add
  ``/optimizer`` and the epoch, RNG state and metrics history.

Every problem in a file raises :class:`FormatError` naming the file and the HDF5 object. Writes
build the whole file in memory, then write it atomically (:mod:`refbnn.atomicio`): a full disk is an
``OSError`` naming the target, with no partial or temporary file left. Version-1 files (string
attributes, which a damaged file can make HDF5 loop on) are refused with the command that converts
them: ``python -m refbnn.fileformat upgrade OLD NEW``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import h5py
import numpy as np

from refbnn import __version__ as REFBNN_VERSION
from refbnn.atomicio import remove_stale_temps, write_bytes_atomic
from refbnn.bits import check_sign_at_zero, words_for
from refbnn.models.config import FIELDS, ConfigError, encodes_utf8, loads_json, resolve, tensor_layout
from refbnn.ops import pack_bits, unpack_bits

FORMAT_NAME = "refbnn"
FORMAT_VERSION = 2
KINDS = ("model", "checkpoint", "packed")
PACKED_SUFFIX = "_packed"
SCALE_SUFFIX = "_packed_scale"
USERBLOCK_SIZE = 512
USERBLOCK_MAGIC = "refbnn-hdf5"
WORD_BITS = 64
LAYOUTS = {2: "OI", 3: "OWI", 4: "OHWI"}
UPGRADE_COMMAND = "python -m refbnn.fileformat upgrade OLD NEW"
MAX_META_BYTES = 16 << 20       # /meta holds at most 16 MiB of JSON
MAX_TEXT = 256                  # characters of refbnn_version, dataset and each class name

#: dataset dtypes and their only valid HDF5 types (little-endian IEEE floats, two's-complement ints)
HDF5_TYPES = {np.dtype(n): t for n, t in (
    ("float16", h5py.h5t.IEEE_F16LE), ("float32", h5py.h5t.IEEE_F32LE),
    ("float64", h5py.h5t.IEEE_F64LE), ("int8", h5py.h5t.STD_I8LE), ("int16", h5py.h5t.STD_I16LE),
    ("int32", h5py.h5t.STD_I32LE), ("int64", h5py.h5t.STD_I64LE), ("uint8", h5py.h5t.STD_U8LE),
    ("uint16", h5py.h5t.STD_U16LE), ("uint32", h5py.h5t.STD_U32LE),
    ("uint64", h5py.h5t.STD_U64LE))}
TENSOR_DTYPES = tuple(HDF5_TYPES)

META_KEYS = ("format", "format_version", "kind", "refbnn_version", "config", "input_spec",
             "class_names", "dataset", "metrics", "provenance", "binary")
CHECKPOINT_KEYS = ("epoch", "rng_state", "history", "optimizer_hyperparameters")
INPUT_SPEC_KEYS = ("shape", "layout", "channel_order", "mean", "std")

# HDF5 object header message types (HDF5 file format spec IV.A.2) each object may carry; anything
# else (attributes, filters, external files, shared or unknown messages, old-style groups) is refused
_MESSAGE_NAMES = {1: "dataspace", 2: "link info", 3: "datatype", 4: "old fill value",
                  5: "fill value", 6: "link", 7: "external data files", 8: "data layout",
                  10: "group info", 11: "filter pipeline", 12: "attribute", 13: "comment",
                  16: "continuation", 17: "symbol table", 18: "modification time",
                  21: "attribute info", 22: "reference count"}
_GROUP_MESSAGES = {0, 2, 6, 10, 16}
_DATASET_MESSAGES = {0, 1, 3, 5, 8, 16}


class FormatError(ValueError):
    """A file that is not a valid refbnn file; ``file`` and ``hdf5_path`` say where."""

    def __init__(self, file, hdf5_path: str, problem: str):
        self.file = str(file)
        self.hdf5_path = hdf5_path
        self.problem = problem
        super().__init__(f"{self.file}: {hdf5_path}: {problem}")


@dataclass(frozen=True)
class BinaryWeight:
    """How a binary weight is packed: latent ``shape`` (PyTorch layout), ``groups``, ``sign_at_zero``,
    and ``scale``: ``None`` or the layer's float32 per-output-channel factor ``alpha`` ``(O,)``
    (Bi-Real's ``mean |W[o]|``), which a packed-only file cannot recompute from the bits."""

    shape: tuple[int, ...]
    groups: int = 1
    sign_at_zero: int = 1
    scale: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass
class LoadedFile:
    """Everything :func:`load` read from a refbnn file, validated.

    ``config``: the resolved model config (``refbnn.models.config.SCHEMA``), valid and consistent
    with every tensor. ``names``: every tensor name in state-dict order (``BNNResNet(config)``'s).
    ``state_dict``: every real tensor, including latent binary weights except in ``kind="packed"``
    files; all finite, BatchNorm running variances >= 0. ``packed``: binary weight name ->
    ``uint64`` words (layout in :func:`pack_weight_signs`); ``binary``: the same names ->
    :class:`BinaryWeight`.

    Optional metadata is ``None`` when the file does not hold it, never a placeholder:
    ``input_spec`` (no input recipe: a caller must not guess one), ``class_names``, ``dataset``,
    ``metrics``, ``provenance`` (how the file was made; refbnn's trainer stores
    ``{"run": {...}}``, other writers may store nothing). Checkpoint fields are ``None`` unless
    ``kind == "checkpoint"``; in a checkpoint ``epoch``, ``history``, ``optimizer_state`` and
    ``optimizer_hyperparameters`` are always present, and ``rng_state`` is ``None`` when the
    writer had no RNG state to save (such a checkpoint cannot resume bit-identically).
    """

    path: str
    kind: str
    version: int
    refbnn_version: str
    config: dict
    input_spec: dict | None
    class_names: list[str] | None
    dataset: str | None
    metrics: dict | None
    provenance: dict | None
    names: list[str] = field(default_factory=list)
    state_dict: OrderedDict = field(default_factory=OrderedDict)
    packed: OrderedDict = field(default_factory=OrderedDict)
    binary: OrderedDict = field(default_factory=OrderedDict)
    optimizer_state: OrderedDict | None = None
    optimizer_hyperparameters: dict | None = None
    rng_state: dict | None = None
    epoch: int | None = None
    history: list | None = None

    def sign_state_dict(self) -> OrderedDict:
        """A full state dict for inference: every binary weight replaced by its sign (float32 +-1,
        from the packed bits, PyTorch layout), every other tensor as stored. Works for all kinds.
        A layer that derives a scale from its latent weight (Bi-Real's ``mean |W|``) gets 1 from
        these signs: use ``binary[name].scale`` for it."""
        out = OrderedDict()
        for name in self.names:
            if name in self.packed:
                out[name] = unpack_weight_signs(self.packed[name], self.binary[name].shape)
            else:
                out[name] = self.state_dict[name]
        return out


# --- packing -----------------------------------------------------------------------------------

def pack_weight_signs(weight, sign_at_zero: int = 1) -> np.ndarray:
    """Pack a PyTorch-layout binary weight ``(O, I, *K)`` (``I`` input channels per group, ``K`` 0-2
    spatial axes) into ``uint64`` words ``(O, *K, ceil(I/64))``: ``pack(sign(moveaxis(W, 1, -1)))``.

    Bit 1 means -1; input channel ``c`` goes to word ``c // 64``, bit ``c % 64`` (LSB first); unused
    high bits are 0; ``sign(0) = sign_at_zero``. Each output channel's ``I`` values belong to one
    group, so grouped weights pack each group's input channels separately by construction.
    """
    w = np.asarray(weight)
    if w.ndim not in LAYOUTS:
        raise ValueError(f"a binary weight must have 2-4 axes (O, I, *K), got shape {w.shape}")
    return pack_bits(np.moveaxis(w, 1, -1), axis=-1, word_bits=WORD_BITS, sign_at_zero=sign_at_zero)


def unpack_weight_signs(words, shape) -> np.ndarray:
    """Inverse of :func:`pack_weight_signs`: float32 +-1 weight of PyTorch ``shape`` ``(O, I, *K)``."""
    shape = tuple(int(n) for n in shape)
    signs = unpack_bits(np.asarray(words), shape[1], axis=-1, word_bits=WORD_BITS, dtype=np.float32)
    return np.ascontiguousarray(np.moveaxis(signs, -1, 1), dtype=np.float32)


def _packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0], *shape[2:], words_for(shape[1], WORD_BITS))


# --- the on-disk layout a config determines (one source for the writer and the reader) ---------

@dataclass(frozen=True)
class _Slot:
    """One dataset under /model: the state-dict ``key`` it belongs to, its HDF5 ``group`` (a member
    of /model, "" = /model itself) and ``leaf`` name, ``role`` ("tensor", "packed" or "scale"),
    shape and dtype."""

    key: str
    group: str
    leaf: str
    role: str
    shape: tuple
    dtype: np.dtype

    @property
    def hpath(self) -> str:
        return f"/model/{self.group}/{self.leaf}" if self.group else f"/model/{self.leaf}"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=object)) * self.dtype.itemsize


@dataclass
class _Plan:
    names: list                     # state-dict keys in order
    dtypes: dict                    # key -> dtype of the real tensor
    slots: list                     # every /model dataset, in writing order
    binary: OrderedDict             # key -> BinaryWeight (no scale values)
    scaled: bool                    # binary weights carry a "_packed_scale" dataset
    meta_binary: dict               # the "binary" entry of /meta


def _split_key(key: str) -> tuple[str, str]:
    group, _, leaf = key.rpartition(".")
    return group, leaf


def _plan(cfg: dict, kind: str) -> _Plan:
    """The exact /model datasets of a ``kind`` file of resolved ``cfg`` (docs/format.md §4-5)."""
    layout = tensor_layout(cfg)
    packs = cfg["sign_at_zero"] != 0          # ternary sign(0) = 0 cannot be packed in one bit
    scaled = cfg["scale"] == "mean_abs"
    plan = _Plan([t.name for t in layout], {t.name: np.dtype(t.dtype) for t in layout}, [],
                 OrderedDict(), scaled and packs, {})
    for t in layout:
        group, leaf = _split_key(t.name)
        binary = t.binary and packs
        if not (binary and kind == "packed"):
            plan.slots.append(_Slot(t.name, group, leaf, "tensor", t.shape, np.dtype(t.dtype)))
        if binary:
            plan.slots.append(_Slot(t.name, group, leaf + PACKED_SUFFIX, "packed",
                                    _packed_shape(t.shape), np.dtype(np.uint64)))
            if scaled:
                plan.slots.append(_Slot(t.name, group, leaf + SCALE_SUFFIX, "scale", t.shape[:1],
                                        np.dtype(np.float32)))
            plan.binary[t.name] = BinaryWeight(t.shape, t.groups, cfg["sign_at_zero"])
            plan.meta_binary[t.name] = {
                "unpacked_shape": list(t.shape), "layout": LAYOUTS[len(t.shape)],
                "groups": t.groups, "sign_at_zero": cfg["sign_at_zero"], "word_bits": WORD_BITS,
                "bit_order": "lsb_first", "bit_one_means": -1, "scaled": scaled}
    return plan


# --- metadata: one JSON object, checked the same way by the writer and the reader --------------

class _MetaProblem(Exception):
    """A problem in /meta; ``where`` is the key path inside the JSON object."""

    def __init__(self, where: str, problem: str):
        self.where, self.problem = where, problem
        super().__init__(f"{where}: {problem}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _text(meta, key, nullable=False):
    v = meta[key]
    if v is None and nullable:
        return None
    if not isinstance(v, str) or not 1 <= len(v) <= MAX_TEXT:
        raise _MetaProblem(key, f"must be a string of 1..{MAX_TEXT} characters"
                           + (" or null" if nullable else "") + f", got {_brief(v)}")
    return v


def _typed(meta, key, types):
    v = meta[key]
    if not isinstance(v, types):
        names = " or ".join("null" if t is type(None) else {"dict": "object", "list": "array"}.get(
            t.__name__, t.__name__) for t in types)
        raise _MetaProblem(key, f"must be a JSON {names}, got {_brief(v)}")
    return v


def _brief(v) -> str:
    if isinstance(v, dict | list):
        return f"a JSON {'object' if isinstance(v, dict) else 'array'} of {len(v)} entries"
    text = json.dumps(v) if isinstance(v, str | int | float | bool | type(None)) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_meta(meta, plan_for=None) -> tuple[dict, _Plan]:
    """Validate a parsed /meta object; return ``(resolved config, plan)``. ``plan_for``: the kind
    the caller expects, or None to take it from ``meta``. Raises :class:`_MetaProblem`."""
    if not isinstance(meta, dict):
        raise _MetaProblem("(root)", f"must be a JSON object, got {_brief(meta)}")
    if meta.get("format") != FORMAT_NAME:
        raise _MetaProblem("format", f"must be {FORMAT_NAME!r}, got {_brief(meta.get('format'))}")
    version = meta.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        raise _MetaProblem("format_version", f"must be {FORMAT_VERSION} (the user block's version), "
                                             f"got {_brief(version)}")
    kind = meta.get("kind")
    if kind not in KINDS:
        raise _MetaProblem("kind", f"must be one of {', '.join(KINDS)}, got {_brief(kind)}")
    keys = META_KEYS + (CHECKPOINT_KEYS if kind == "checkpoint" else ())
    missing = [k for k in keys if k not in meta]
    if missing:
        raise _MetaProblem(missing[0], "missing key")
    extra = [k for k in meta if k not in keys]
    if extra:
        raise _MetaProblem(extra[0], f"unknown key (a {kind!r} file has exactly: {', '.join(keys)})")
    _text(meta, "refbnn_version")
    _text(meta, "dataset", nullable=True)
    for key in ("metrics", "provenance"):
        _typed(meta, key, (dict, type(None)))
    config = _typed(meta, "config", (dict,))
    try:
        cfg = resolve(config)
    except ConfigError as e:
        raise _MetaProblem("config", str(e)) from None
    if cfg != {**cfg, **config}:
        changed = next(k for k in cfg if k in config and cfg[k] != config[k])
        raise _MetaProblem("config", f"is not in resolved form: field {changed!r} is "
                                     f"{_brief(config[changed])}, resolution gives {_brief(cfg[changed])}")
    missing_fields = [k for k in cfg if k not in config and FIELDS[k].required]
    if missing_fields:
        raise _MetaProblem("config", f"missing field {missing_fields[0]!r} (a file stores the "
                                     "resolved config with every field)")
    spec = _typed(meta, "input_spec", (dict, type(None)))
    if spec is not None:
        problem = _input_spec_problem(spec, cfg["input_shape"])
        if problem:
            raise _MetaProblem("input_spec", problem)
    names = _typed(meta, "class_names", (list, type(None)))
    if names is not None:
        if len(names) != cfg["num_classes"]:
            raise _MetaProblem("class_names", f"has {len(names)} entries, the config's num_classes "
                                              f"is {cfg['num_classes']}")
        bad = [i for i, c in enumerate(names) if not isinstance(c, str) or not 1 <= len(c) <= MAX_TEXT]
        if bad:
            raise _MetaProblem("class_names", f"entry {bad[0]} must be a string of 1..{MAX_TEXT} "
                                              f"characters, got {_brief(names[bad[0]])}")
    if kind == "packed" and cfg["sign_at_zero"] == 0:
        raise _MetaProblem("kind", "a 'packed' file cannot hold sign_at_zero=0 (ternary sign) "
                                   "weights: one bit cannot hold them")
    plan = _plan(cfg, kind)
    binary = _typed(meta, "binary", (dict,))
    if binary != plan.meta_binary:
        key = next((k for k in list(plan.meta_binary) + list(binary)
                    if binary.get(k) != plan.meta_binary.get(k)), "")
        want = plan.meta_binary.get(key)
        raise _MetaProblem("binary", f"entry {key!r} is {_brief(binary.get(key))}; the config "
                                     f"implies {json.dumps(want) if want else 'no such entry'}")
    if kind == "checkpoint":
        epoch = meta["epoch"]
        if not _is_int(epoch) or not 0 <= epoch < 2 ** 63:
            raise _MetaProblem("epoch", f"must be an integer >= 0, got {_brief(epoch)}")
        _typed(meta, "rng_state", (dict, type(None)))
        _typed(meta, "history", (list,))
        _typed(meta, "optimizer_hyperparameters", (dict,))
    return cfg, plan


def _input_spec_problem(spec, input_shape=None) -> str | None:
    """Why ``spec`` is not a valid input_spec (``docs/format.md`` §2.1), or None if it is."""
    if not isinstance(spec, Mapping):
        return "must be a JSON object"
    missing = [k for k in INPUT_SPEC_KEYS if k not in spec]
    if missing:
        return f"missing key {missing[0]!r} (needs {', '.join(INPUT_SPEC_KEYS)})"
    shape, layout = spec["shape"], spec["layout"]
    if not isinstance(shape, list | tuple) or len(shape) != 3 or not all(
            _is_int(n) and n > 0 for n in shape):
        return f"'shape' must be 3 positive ints (one sample, no batch axis), got {_brief(shape)}"
    if layout not in ("NCHW", "NHWC"):
        return f"'layout' must be 'NCHW' or 'NHWC', got {_brief(layout)}"
    chw = list(shape) if layout == "NCHW" else [shape[2], shape[0], shape[1]]
    if input_shape is not None and chw != list(input_shape):
        return f"'shape' {list(shape)} ({layout}) does not match the config's input_shape " \
               f"{list(input_shape)} (C, H, W)"
    channels = chw[0]
    order = spec["channel_order"]
    if not isinstance(order, str) or len(order) != channels:
        return f"'channel_order' must be a str with one letter per channel ({channels}), " \
               f"got {_brief(order)}"
    for key in ("mean", "std"):
        v = spec[key]
        if not isinstance(v, list | tuple) or len(v) != channels or not all(
                isinstance(x, int | float) and not isinstance(x, bool) and np.isfinite(x)
                for x in v):
            return f"{key!r} must be {channels} finite numbers, got {_brief(v)}"
    if not all(x > 0 for x in spec["std"]):
        return "'std' values must be > 0"
    return None


def _json_default(obj):
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _parse_meta(raw: bytes):
    """Bytes of /meta -> parsed JSON (strict UTF-8, bounded depth). Raises :class:`_MetaProblem`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _MetaProblem("(text)", f"is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        return loads_json(text, "the metadata")
    except ValueError as e:
        raise _MetaProblem("(text)", str(e)) from None


# --- writing -----------------------------------------------------------------------------------

def save_model(path, state_dict: Mapping, *, config: Mapping, binary_weights: Mapping | None = None,
               input_spec: Mapping | None = None, class_names=None, dataset: str | None = None,
               metrics: Mapping | None = None, provenance: Mapping | None = None,
               packed_only: bool = False) -> None:
    """Write a model file (``kind="model"``), or with ``packed_only`` a deployment export
    (``kind="packed"``: latent binary weights dropped, their packed sign bits kept).

    ``config``: a model config (resolved here and stored resolved); ``state_dict`` must hold exactly
    the tensors it determines (``refbnn.models.config.tensor_layout``: names, shapes, dtypes), all
    finite, BatchNorm running variances >= 0. ``binary_weights``: optional name ->
    ``{"groups": g, "sign_at_zero": s, "scale": alpha}`` as ``BNNResNet.binary_weights()`` gives;
    ``groups`` and ``sign_at_zero``, if given, must agree with the config; ``scale`` (float32
    ``(O,)``, Bi-Real's ``mean |W[o]|``) is required for ``scale="mean_abs"`` configs.
    ``metrics``/``provenance``: JSON objects or None; ``input_spec``: see ``docs/format.md``;
    ``class_names``: ``num_classes`` strings. Bad arguments raise ``ValueError`` (a bad config:
    ``ConfigError``); a write failure (full disk) raises ``OSError`` naming ``path``. The
    destination is replaced atomically and left untouched on any error.
    """
    kind = "packed" if packed_only else "model"
    meta = _common_meta(kind, config, input_spec, class_names, dataset, metrics, provenance)
    _write(path, meta, state_dict, binary_weights)


def save_checkpoint(path, state_dict: Mapping, *, config: Mapping, optimizer_state: Mapping,
                    optimizer_hyperparameters: Mapping, rng_state: Mapping | None, epoch: int,
                    history: list, binary_weights: Mapping | None = None,
                    input_spec: Mapping | None = None, class_names=None,
                    dataset: str | None = None, metrics: Mapping | None = None,
                    provenance: Mapping | None = None) -> None:
    """Write a training checkpoint (``kind="checkpoint"``): a model file plus optimizer state.

    ``optimizer_state``: flat name -> finite numeric array (names without ``/``; at most
    ``4 * tensors + 16`` entries, none larger than the model's largest tensor);
    ``optimizer_hyperparameters``: JSON object; ``rng_state``: JSON object such as
    ``np.random.Generator.bit_generator.state``, or ``None`` (then a resume cannot be
    bit-identical; :class:`LoadedFile` says so with ``rng_state=None``); ``epoch``: int >= 0
    (epochs completed); ``history``: JSON list. Other arguments as in :func:`save_model`.
    """
    meta = _common_meta("checkpoint", config, input_spec, class_names, dataset, metrics, provenance)
    if isinstance(epoch, bool) or not isinstance(epoch, int | np.integer) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    meta.update(epoch=int(epoch), rng_state=rng_state, history=history,
                optimizer_hyperparameters=optimizer_hyperparameters)
    if not isinstance(optimizer_state, Mapping):
        raise ValueError("optimizer_state must be a mapping name -> array")
    _write(path, meta, state_dict, binary_weights, optimizer_state)


def export_packed(src, dst) -> None:
    """Convert a ``model`` or ``checkpoint`` file into a ``packed`` deployment export (metadata kept,
    optimizer state dropped). The source is fully validated first; ``dst`` must not be ``src``."""
    if os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):
        raise ValueError(f"{dst}: the destination is the source file; choose another name")
    f = load(src)
    _save_like(f, dst, packed_only=True)


def upgrade(src, dst) -> LoadedFile:
    """Convert a format-version-1 file ``src`` into a version-2 file ``dst`` (any kind), keeping every
    tensor, metric and provenance bit for bit; return what was written, as :func:`load` reads it.

    Reading version 1 parses HDF5 string attributes, which a damaged or crafted file can make HDF5
    loop on: convert files you trust, or use ``python -m refbnn.fileformat upgrade OLD NEW``, which
    runs the read in a child process under a time limit. ``src`` may equal ``dst`` (the file is read
    completely before the new one replaces it)."""
    from refbnn.fileformat_v1 import load_v1

    old = load_v1(src)
    try:
        resolve(old.config)
    except ConfigError as e:
        raise FormatError(src, "/", f"attribute 'config' cannot be upgraded: {e}") from None
    _save_like(old, dst, packed_only=old.kind == "packed")
    return load(dst)


def _save_like(f: LoadedFile, dst, packed_only: bool) -> None:
    binary = {n: {"groups": b.groups, "sign_at_zero": b.sign_at_zero, "scale": b.scale}
              for n, b in f.binary.items()}
    state = f.state_dict if f.kind != "packed" else f.sign_state_dict()
    common = dict(config=f.config, binary_weights=binary, input_spec=f.input_spec,
                  class_names=f.class_names, dataset=f.dataset, metrics=f.metrics,
                  provenance=f.provenance)
    if f.kind == "checkpoint" and not packed_only:
        save_checkpoint(dst, state, optimizer_state=f.optimizer_state,
                        optimizer_hyperparameters=f.optimizer_hyperparameters,
                        rng_state=f.rng_state, epoch=f.epoch, history=f.history, **common)
    else:
        save_model(dst, state, packed_only=packed_only, **common)


def _common_meta(kind, config, input_spec, class_names, dataset, metrics, provenance) -> dict:
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a model config mapping, got {type(config).__name__}")
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": kind,
            "refbnn_version": REFBNN_VERSION, "config": resolve(dict(config)),
            "input_spec": input_spec, "class_names": None if class_names is None else list(class_names),
            "dataset": dataset, "metrics": metrics, "provenance": provenance, "binary": None}


def _tensor_problem(key: str, arr: np.ndarray) -> str | None:
    """Why a tensor's values are invalid (docs/format.md §4), or None."""
    if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        return f"holds a non-finite value ({float(arr[tuple(bad)])} at index {tuple(int(i) for i in bad)})"
    if key.endswith(".running_var") and arr.size and (arr < 0).any():
        return f"BatchNorm running variance below 0 ({float(arr.min())!r})"
    if key.endswith(".num_batches_tracked") and (arr < 0).any():
        return "num_batches_tracked below 0"
    return None


def _write(path, meta: dict, state_dict, binary_weights, optimizer_state=None) -> None:
    if not isinstance(state_dict, Mapping):
        raise ValueError("state_dict must be a mapping name -> array")
    cfg = meta["config"]
    plan = _plan(cfg, meta["kind"])
    meta["binary"] = plan.meta_binary
    state = _checked_state(state_dict, plan)
    scales = _checked_scales(binary_weights, plan, state, cfg)
    opt = None if optimizer_state is None else _checked_optimizer(optimizer_state, plan)
    try:
        text = json.dumps(meta, allow_nan=False, default=_json_default, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata is not JSON-able ({e}); NaN/inf are not allowed, use null") from e
    raw = text.encode("utf-8", "strict") if encodes_utf8(text) else None
    if raw is None:
        raise ValueError("metadata holds a string that is not valid Unicode (a lone surrogate)")
    if len(raw) > MAX_META_BYTES:
        raise ValueError(f"metadata is {len(raw):,} bytes of JSON, more than {MAX_META_BYTES:,}")
    try:
        _check_meta(_parse_meta(raw))
    except _MetaProblem as e:
        raise ValueError(f"metadata {e.where}: {e.problem}") from None
    image = _file_image(raw, plan, state, scales, opt)
    write_bytes_atomic(path, image)


def _checked_state(state_dict: Mapping, plan: _Plan) -> dict:
    missing = [k for k in plan.names if k not in state_dict]
    if missing:
        raise ValueError(f"state_dict lacks {missing[0]!r} ({len(missing)} missing), which the "
                         "config's network has")
    extra = [k for k in state_dict if k not in plan.dtypes]
    if extra:
        raise ValueError(f"state_dict has {extra[0]!r}, which the config's network does not have")
    shapes = {s.key: s.shape for s in plan.slots if s.role == "tensor"} | {
        k: b.shape for k, b in plan.binary.items()}
    out = {}
    for key in plan.names:
        arr = np.asarray(state_dict[key])
        if arr.dtype != plan.dtypes[key] or arr.shape != shapes[key]:
            raise ValueError(f"state_dict[{key!r}] is {arr.dtype} {arr.shape}; the config needs "
                             f"{plan.dtypes[key]} {shapes[key]}")
        problem = _tensor_problem(key, arr)
        if problem:
            raise ValueError(f"state_dict[{key!r}] {problem}")
        out[key] = np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")  # keeps 0-d arrays 0-d
    return out


def _checked_scales(binary_weights, plan: _Plan, state: dict, cfg: dict) -> dict:
    given = dict(binary_weights or {})
    layout_binary = {t.name: t for t in tensor_layout(cfg) if t.binary}
    unknown = [k for k in given if k not in layout_binary]
    if unknown:
        raise ValueError(f"binary weight {unknown[0]!r} is not a binary layer of the config's network")
    scales = {}
    for key, t in layout_binary.items():
        spec = dict(given.get(key) or {})
        extra = set(spec) - {"groups", "sign_at_zero", "scale"}
        if extra:
            raise ValueError(f"binary weight {key!r}: unknown options {sorted(extra)}")
        if spec.get("groups", t.groups) != t.groups:
            raise ValueError(f"binary weight {key!r}: groups={spec['groups']!r}, the config gives "
                             f"{t.groups}")
        saz = spec.get("sign_at_zero", cfg["sign_at_zero"])
        if isinstance(saz, bool) or saz != cfg["sign_at_zero"]:
            raise ValueError(f"binary weight {key!r}: sign_at_zero={saz!r}, the config gives "
                             f"{cfg['sign_at_zero']}")
        if key not in plan.binary:
            continue
        check_sign_at_zero(saz)
        if plan.scaled:
            scale = spec.get("scale")
            if scale is None:
                raise ValueError(f"binary weight {key!r}: scale='mean_abs' layers need their "
                                 "'scale' (mean |W[o]|, float32) in binary_weights")
            scale = np.asarray(scale)
            if scale.dtype != np.float32 or scale.shape != t.shape[:1] or \
                    not np.isfinite(scale).all() or (scale < 0).any():
                raise ValueError(f"binary weight {key!r}: scale must be {t.shape[0]} finite float32 "
                                 f"values >= 0, got {scale.dtype} {scale.shape}")
            scales[key] = scale.astype("<f4")
    return scales


def _checked_optimizer(optimizer_state: Mapping, plan: _Plan) -> dict:
    limit_count, limit_size = _optimizer_limits(plan)
    if len(optimizer_state) > limit_count:
        raise ValueError(f"optimizer_state has {len(optimizer_state)} entries, more than "
                         f"{limit_count} (4 per model tensor + 16)")
    out = {}
    for name, value in optimizer_state.items():
        if not isinstance(name, str) or not name or "/" in name or "\0" in name or \
                name in (".", "..") or not encodes_utf8(name):
            raise ValueError(f"optimizer_state key {name!r} is not a valid name (non-empty str "
                             "without '/')")
        arr = np.asarray(value)
        if arr.dtype not in HDF5_TYPES:
            raise ValueError(f"optimizer_state[{name!r}]: unsupported dtype {arr.dtype}")
        if arr.size > limit_size:
            raise ValueError(f"optimizer_state[{name!r}] has {arr.size} values, more than the "
                             f"model's largest tensor ({limit_size})")
        problem = _tensor_problem(name, arr)
        if problem:
            raise ValueError(f"optimizer_state[{name!r}] {problem}")
        out[name] = np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")
    return out


def _optimizer_limits(plan: _Plan) -> tuple[int, int]:
    largest = max((int(np.prod(s.shape, dtype=object)) for s in plan.slots if s.role == "tensor"),
                  default=1)
    largest = max([largest] + [int(np.prod(b.shape, dtype=object)) for b in plan.binary.values()])
    return 4 * len(plan.names) + 16, max(largest, 1)


def _file_image(meta_raw: bytes, plan: _Plan, state: dict, scales: dict, opt: dict | None):
    """The complete file as a writable buffer: HDF5 built in memory (no disk I/O inside HDF5, so a
    full disk can never leave HDF5 half-closed), user block stamped."""
    bio = io.BytesIO()
    with h5py.File(bio, "w", libver=("v110", "v110"), userblock_size=USERBLOCK_SIZE) as f:
        f.create_dataset("meta", data=np.frombuffer(meta_raw, dtype=np.uint8))
        model = f.create_group("model", track_order=True)
        groups: dict[str, h5py.Group] = {"": model}
        for slot in plan.slots:
            if slot.group not in groups:
                groups[slot.group] = model.create_group(slot.group, track_order=True)
            if slot.role == "tensor":
                data = state[slot.key]
            elif slot.role == "packed":
                data = pack_weight_signs(state[slot.key], plan.binary[slot.key].sign_at_zero)
            else:
                data = scales[slot.key]
            groups[slot.group].create_dataset(slot.leaf, data=np.asarray(data, slot.dtype.newbyteorder("<")))
        if opt is not None:
            g = f.create_group("optimizer", track_order=True)
            for name, arr in opt.items():
                g.create_dataset(name, data=arr)
    image = bio.getbuffer()
    image[:USERBLOCK_SIZE] = _userblock(hashlib.sha256(image[USERBLOCK_SIZE:]).hexdigest())
    return image


def _userblock(digest: str, version: int | None = None) -> bytes:
    version = FORMAT_VERSION if version is None else version
    text = f"{USERBLOCK_MAGIC} {version}\nsha256 {digest}\n".encode("ascii")
    return text + b"\0" * (USERBLOCK_SIZE - len(text))


# --- reading -----------------------------------------------------------------------------------

def load(path, expect: Mapping | None = None) -> LoadedFile:
    """Read and validate a refbnn file of any kind; raise :class:`FormatError` on any problem.

    The file is read into memory once, its SHA-256 checked, then parsed from that copy; every
    dataset's type, shape, layout and size is checked against what its config determines before
    any tensor is read, and all declared data together must fit in the file, so a bad file fails
    in time and memory proportional to its size. ``expect``: optional name -> array (checks shape
    and dtype) or shape tuple, e.g. a model's ``state_dict()``; the file's tensors (binary weights
    under their latent name and shape; a packed-only weight's dtype is not checked) must be
    exactly these. A missing file raises ``FileNotFoundError``.
    """
    path = str(path)
    if expect is not None:
        expect = _normalize_expect(expect)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise FormatError(path, "/", "is not a regular file")
    with open(path, "rb") as fh:
        _check_seal(path, fh.read(USERBLOCK_SIZE), check_hash=False)  # before reading a foreign file
        fh.seek(0)
        data = fh.read()
    version = _check_seal(path, data)
    if version == 1:
        raise FormatError(path, "/", f"format version 1 (string attributes, which a damaged file "
                                     f"can make HDF5 hang on) is no longer read; convert it once "
                                     f"with: {UPGRADE_COMMAND.replace('OLD', path)}")
    try:
        f = h5py.File(io.BytesIO(data), "r")
    except (OSError, RuntimeError, ValueError) as e:
        raise FormatError(path, "/", f"not a readable HDF5 file ({_oneline(e)})") from None
    with f:
        return _Reader(path, f, len(data)).read(expect)


def _read_dataset(path, ds, hpath: str) -> np.ndarray:
    """All of HDF5 dataset ``ds`` (at ``hpath`` in file ``path``), C-ordered, in native byte order;
    a read HDF5 refuses is a :class:`FormatError`."""
    try:
        arr = ds[()]
    except (OSError, RuntimeError, ValueError, TypeError) as e:
        raise FormatError(path, hpath, f"data is unreadable ({_oneline(e)})") from None
    arr = np.asarray(arr)
    return np.asarray(arr, dtype=arr.dtype.newbyteorder("="), order="C")


def _oneline(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _check_seal(path: str, data: bytes, check_hash: bool = True) -> int:
    """Check the user block before HDF5 parses anything (HDF5 can crash or hang on damaged
    metadata); return the format version it names, or raise FormatError. ``check_hash=False``:
    only the first 512 bytes are given, check the magic line and version."""
    head = data[:USERBLOCK_SIZE]
    lines = head.split(b"\n")
    magic = lines[0].split(b" ")
    digits = magic[1] if len(magic) == 2 and magic[1].isdigit() and len(magic[1]) < 6 else b""
    if len(head) < USERBLOCK_SIZE or magic[0] != USERBLOCK_MAGIC.encode() or not digits:
        raise FormatError(path, "/", "not a refbnn file (no refbnn user block at byte 0; "
                                     "not HDF5, or HDF5 written by something else)")
    if int(digits) > FORMAT_VERSION:
        raise FormatError(path, "/", f"format version {int(digits)} is newer than this refbnn "
                                     f"({REFBNN_VERSION}) reads (version {FORMAT_VERSION}); "
                                     "upgrade refbnn")
    if int(digits) not in (1, FORMAT_VERSION):
        raise FormatError(path, "/", f"unknown format version {digits.decode()}")
    version = int(magic[1])
    if not check_hash:
        return version
    stored = lines[1][len(b"sha256 "):].decode("latin-1") if len(lines) > 1 else ""
    if len(stored) != 64 or not all(c in "0123456789abcdef" for c in stored) \
            or head != _userblock(stored, version):
        raise FormatError(path, "/", "damaged refbnn user block")
    if hashlib.sha256(memoryview(data)[USERBLOCK_SIZE:]).hexdigest() != stored:
        raise FormatError(path, "/", "file bytes do not match the SHA-256 in the user block "
                                     "(truncated or damaged file)")
    return version


class _Reader:
    def __init__(self, path: str, f: h5py.File, size: int):
        self.path = path
        self.f = f
        self.size = size
        self.where = "/"      # the object being read: what a stray HDF5 error is reported at

    def error(self, hpath: str, problem: str) -> FormatError:
        return FormatError(self.path, hpath, problem)

    def read(self, expect) -> LoadedFile:
        try:
            return self._read(expect)
        except FormatError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
            raise self.error(self.where, f"unreadable HDF5 data ({type(e).__name__}: "
                                         f"{_oneline(e)})") from None

    # -- objects ---------------------------------------------------------------------------------
    def _object(self, obj, hpath: str, allowed: set) -> None:
        """Check an object's header: only the message types ``allowed``, none shared, no
        attributes (docs/format.md §1)."""
        self.where = hpath
        info = h5py.h5o.get_info(obj.id)
        present, shared = int(info.hdr.mesg.present), int(info.hdr.mesg.shared)
        extra = [t for t in range(64) if present >> t & 1 and t not in allowed]
        if extra:
            name = _MESSAGE_NAMES.get(extra[0], f"type {extra[0]}")
            raise self.error(hpath, f"holds an HDF5 {name} message, which this format does not "
                                    "allow (no attributes, filters, external or virtual storage, "
                                    "old-style groups)")
        if shared:
            raise self.error(hpath, "uses shared HDF5 header messages, which this format does not allow")
        if h5py.h5a.get_num_attrs(obj.id):  # (ObjInfo.num_attrs needs h5py >= 3.11)
            raise self.error(hpath, "has attributes; version 2 files have none")

    def _members(self, group, hpath: str, expected) -> dict:
        """``{name: object}`` of a group that must hold exactly the names ``expected``, each by a hard
        link; the member count is checked before any member is looked at."""
        self._object(group, hpath, _GROUP_MESSAGES)
        n = len(group)
        if n != len(expected):
            if n <= len(expected) + 64:      # few enough to name the first difference
                names = list(group)
                extra = [m for m in names if m not in expected]
                missing = [m for m in expected if m not in names]
                if extra:
                    raise self.error(hpath, f"unexpected member {extra[0]!r}"
                                            + (f" ({len(extra)} in all)" if len(extra) > 1 else ""))
                if missing:
                    raise self.error(hpath, f"missing member {missing[0]!r}"
                                            + (f" ({len(missing)} in all)" if len(missing) > 1 else ""))
            raise self.error(hpath, f"has {n:,} members, expected {len(expected):,}")
        out = {}
        for name in group:
            child = f"{hpath.rstrip('/')}/{name}"
            self.where = child
            if name not in expected:
                raise self.error(child, f"unexpected member {name!r} (expected: "
                                        f"{', '.join(sorted(set(expected) - set(out))[:4])})")
            link = group.get(name, getlink=True)
            if not isinstance(link, h5py.HardLink):
                raise self.error(child, f"is a {type(link).__name__}; only hard links are allowed")
            out[name] = group[name]
        return out

    def _dataset(self, obj, hpath: str, dtype: np.dtype | None, shape: tuple | None,
                 max_elements: int | None = None) -> h5py.Dataset:
        """Structure checks made before any data is read: header messages, exact HDF5 type,
        shape, contiguous (or compact) storage of exactly the bytes the shape needs."""
        if not isinstance(obj, h5py.Dataset):
            raise self.error(hpath, f"must be a dataset, found a {type(obj).__name__}")
        self._object(obj, hpath, _DATASET_MESSAGES)
        tid = obj.id.get_type()
        found = next((d for d, t in HDF5_TYPES.items() if tid.equal(t)), None)
        if found is None or (dtype is not None and found != dtype):
            want = dtype.name if dtype is not None else "a little-endian int or IEEE float"
            raise self.error(hpath, f"HDF5 type {_type_name(tid)} is not {want} (enum, compound, "
                                    "string, reference, big-endian or custom types are invalid)")
        space = obj.id.get_space()
        extent = space.get_simple_extent_type()
        if extent not in (h5py.h5s.SIMPLE, h5py.h5s.SCALAR):
            raise self.error(hpath, "has a null dataspace")
        have = () if extent == h5py.h5s.SCALAR else tuple(int(n) for n in space.shape)
        if shape is not None and have != tuple(shape):
            raise self.error(hpath, f"shape {have} but the config needs {tuple(shape)}")
        elements = int(np.prod(have, dtype=object))
        if max_elements is not None and elements > max_elements:
            raise self.error(hpath, f"holds {elements:,} values, more than {max_elements:,}")
        plist = obj.id.get_create_plist()
        if plist.get_layout() not in (h5py.h5d.CONTIGUOUS, h5py.h5d.COMPACT) or \
                plist.get_nfilters() or plist.get_external_count():
            raise self.error(hpath, "datasets must be stored contiguous or compact, without "
                                    "filters, external or virtual storage")
        nbytes = elements * found.itemsize
        if nbytes > self.size:
            raise self.error(hpath, f"declares {nbytes:,} bytes, more than the file's {self.size:,}")
        stored = obj.id.get_storage_size()
        if stored != nbytes:
            raise self.error(hpath, f"stores {stored:,} bytes, shape {have} {found} needs {nbytes:,} "
                                    "(truncated or unwritten)")
        return obj

    def _data(self, ds, hpath: str) -> np.ndarray:
        self.where = hpath
        return _read_dataset(self.path, ds, hpath)

    # -- top level -------------------------------------------------------------------------------
    def _read(self, expect) -> LoadedFile:
        f = self.f
        superblock = f.id.get_create_plist().get_version()[0]
        if superblock < 2:
            raise self.error("/", f"HDF5 superblock version {superblock}: version 2 files use HDF5's "
                                  "checksummed structures (write with library format bounds v108 "
                                  "or later)")
        self._object(f, "/", _GROUP_MESSAGES)
        n = len(f)
        if n > 3:
            raise self.error("/", f"has {n:,} members; a refbnn file has /meta, /model and, in a "
                                  "checkpoint, /optimizer")
        names = list(f)
        if "meta" not in names:
            raise self.error("/", "missing member 'meta' (the metadata dataset)")
        meta_obj = self._members_like(f, names)["meta"]
        raw = self._data(self._dataset(meta_obj, "/meta", np.dtype(np.uint8), None,
                                       MAX_META_BYTES), "/meta")
        if raw.ndim != 1 or raw.size == 0:
            raise self.error("/meta", f"must be a non-empty 1-D uint8 array, got shape {raw.shape}")
        try:
            meta = _parse_meta(raw.tobytes())
            cfg, plan = _check_meta(meta)
        except _MetaProblem as e:
            raise self.error("/meta", f"{e.where}: {e.problem}") from None
        kind = meta["kind"]
        expected_root = ("meta", "model", "optimizer") if kind == "checkpoint" else ("meta", "model")
        members = self._members(f, "/", expected_root)
        need = sum(s.nbytes for s in plan.slots)
        if need > self.size:
            raise self.error("/model", f"the config's tensors need {need:,} bytes, more than the "
                                       f"file's {self.size:,}")
        out = LoadedFile(
            path=self.path, kind=kind, version=FORMAT_VERSION, refbnn_version=meta["refbnn_version"],
            config=cfg, input_spec=meta["input_spec"], class_names=meta["class_names"],
            dataset=meta["dataset"], metrics=meta["metrics"], provenance=meta["provenance"])
        datasets = self._model_datasets(members["model"], plan)
        optimizer = None
        if kind == "checkpoint":
            optimizer = self._optimizer_datasets(members["optimizer"], plan)
        declared = need + raw.size + sum(ds.id.get_storage_size() for ds in (optimizer or {}).values())
        if declared > self.size:
            raise self.error("/", f"declares {declared:,} bytes of data, more than the file's "
                                  f"{self.size:,} (datasets may not share storage)")
        self._read_model(out, plan, datasets)
        if expect is not None:
            self._check_expect(out, plan, expect)
        if kind == "checkpoint":
            out.epoch, out.rng_state = meta["epoch"], meta["rng_state"]
            out.history = meta["history"]
            out.optimizer_hyperparameters = meta["optimizer_hyperparameters"]
            out.optimizer_state = OrderedDict()
            for name, ds in optimizer.items():
                hpath = f"/optimizer/{name}"
                arr = self._data(ds, hpath)
                problem = _tensor_problem(name, arr)
                if problem:
                    raise self.error(hpath, problem)
                out.optimizer_state[name] = arr
        return out

    def _members_like(self, f, names) -> dict:
        """Root members by name, each checked to be a hard link (before /meta says the kind)."""
        out = {}
        for name in names:
            self.where = f"/{name}"
            if name not in ("meta", "model", "optimizer"):
                raise self.error(f"/{name}", f"unexpected member {name!r}")
            if not isinstance(f.get(name, getlink=True), h5py.HardLink):
                raise self.error(f"/{name}", "only hard links are allowed")
            out[name] = f[name]
        return out

    def _model_datasets(self, model, plan: _Plan) -> dict:
        if not isinstance(model, h5py.Group):
            raise self.error("/model", "must be a group")
        by_group: dict[str, dict[str, _Slot]] = OrderedDict()
        for s in plan.slots:
            by_group.setdefault(s.group, OrderedDict())[s.leaf] = s
        top = list(by_group.get("", {})) + [g for g in by_group if g]
        members = self._members(model, "/model", top)
        out = {}
        for gname, leaves in by_group.items():
            if gname == "":
                found = {leaf: members[leaf] for leaf in leaves}
            else:
                gpath = f"/model/{gname}"
                group = members[gname]
                if not isinstance(group, h5py.Group):
                    raise self.error(gpath, f"must be a group (module {gname!r})")
                found = self._members(group, gpath, list(leaves))
            for leaf, s in leaves.items():
                out[s] = self._dataset(found[leaf], s.hpath, s.dtype, s.shape)
        return out

    def _optimizer_datasets(self, group, plan: _Plan) -> dict:
        gpath = "/optimizer"
        if not isinstance(group, h5py.Group):
            raise self.error(gpath, "must be a group")
        self._object(group, gpath, _GROUP_MESSAGES)
        limit_count, limit_size = _optimizer_limits(plan)
        n = len(group)
        if n > limit_count:
            raise self.error(gpath, f"has {n:,} members, more than {limit_count:,} (4 per model "
                                    "tensor + 16)")
        out = OrderedDict()
        for name in group:
            hpath = f"{gpath}/{name}"
            self.where = hpath
            if not encodes_utf8(name) or "\0" in name:
                raise self.error(hpath, "the name is not valid UTF-8 text")
            if not isinstance(group.get(name, getlink=True), h5py.HardLink):
                raise self.error(hpath, "only hard links are allowed")
            out[name] = self._dataset(group[name], hpath, None, None, limit_size)
        return out

    def _read_model(self, out: LoadedFile, plan: _Plan, datasets: dict) -> None:
        out.names = list(plan.names)
        words, scales = {}, {}
        for s, ds in datasets.items():
            arr = self._data(ds, s.hpath)
            if s.role == "tensor":
                problem = _tensor_problem(s.key, arr)
                if problem:
                    raise self.error(s.hpath, problem)
                out.state_dict[s.key] = arr
            elif s.role == "packed":
                words[s.key] = (arr, s.hpath)
            else:
                if not np.isfinite(arr).all() or (arr < 0).any():
                    raise self.error(s.hpath, "scale values must be finite and >= 0")
                scales[s.key] = arr.astype(np.float32)
        for key, b in plan.binary.items():
            arr, hpath = words[key]
            self._check_words(arr, b, hpath, out.state_dict.get(key), hpath[: -len(PACKED_SUFFIX)])
            out.packed[key] = arr
            out.binary[key] = BinaryWeight(b.shape, b.groups, b.sign_at_zero, scales.get(key))
        out.state_dict = OrderedDict((k, out.state_dict[k]) for k in plan.names if k in out.state_dict)

    def _check_words(self, words: np.ndarray, b: BinaryWeight, hpath: str, latent, lpath) -> None:
        n = b.shape[1]
        if n % WORD_BITS and words.size and (words[..., -1] >> np.uint64(n % WORD_BITS)).any():
            raise self.error(hpath, f"unused high bits of the last word are not 0 (I = {n})")
        if latent is None:
            return
        expected = pack_weight_signs(latent, b.sign_at_zero)
        if not np.array_equal(expected, words):
            bad = np.argwhere(expected != words)
            first = tuple(int(i) for i in bad[0])
            raise self.error(hpath, f"packed sign bits disagree with sign({lpath}) in "
                                    f"{len(bad)} word(s), first at word index {first}")

    def _check_expect(self, out: LoadedFile, plan: _Plan, expect: Mapping) -> None:
        shapes = {k: b.shape for k, b in plan.binary.items()}
        for k in plan.names:
            if k not in shapes:
                shapes[k] = out.state_dict[k].shape
        missing = [k for k in expect if k not in shapes]
        if missing:
            more = f" ({len(missing) - 1} more)" if len(missing) > 1 else ""
            raise self.error("/model", f"the caller expects tensor {missing[0]!r}, which the file's "
                                       f"config does not have{more}")
        for key in plan.names:
            group, leaf = _split_key(key)
            hpath = f"/model/{group}/{leaf}" if group else f"/model/{leaf}"
            if key not in expect:
                raise self.error(hpath, f"unexpected tensor {key!r} (not in the expected names)")
            shape, dtype = expect[key]
            if tuple(shapes[key]) != shape:
                raise self.error(hpath, f"shape {tuple(shapes[key])} but expected {shape}")
            if dtype is not None and key in out.state_dict and out.state_dict[key].dtype != dtype:
                raise self.error(hpath, f"dtype {out.state_dict[key].dtype} but expected {dtype}")


def _type_name(tid) -> str:
    names = {h5py.h5t.INTEGER: "integer", h5py.h5t.FLOAT: "float", h5py.h5t.STRING: "string",
             h5py.h5t.COMPOUND: "compound", h5py.h5t.ENUM: "enum", h5py.h5t.VLEN: "vlen",
             h5py.h5t.ARRAY: "array", h5py.h5t.REFERENCE: "reference", h5py.h5t.OPAQUE: "opaque",
             h5py.h5t.BITFIELD: "bitfield", h5py.h5t.TIME: "time"}
    try:
        cls = names.get(tid.get_class(), "unknown")
        order = " big-endian" if tid.get_class() in (h5py.h5t.INTEGER, h5py.h5t.FLOAT) and \
            tid.get_order() == h5py.h5t.ORDER_BE else ""
        return f"{cls}{order} of {tid.get_size()} bytes"
    except (ValueError, RuntimeError, TypeError):
        return "unknown"


def _normalize_expect(expect: Mapping) -> dict[str, tuple[tuple[int, ...], np.dtype | None]]:
    """``expect`` as name -> (shape, dtype or None); a bad ``expect`` is the caller's ``ValueError``."""
    if not isinstance(expect, Mapping):
        raise ValueError("expect must be a mapping name -> array or shape tuple")
    out = {}
    for name, want in expect.items():
        try:
            if hasattr(want, "shape"):
                dtype = getattr(want, "dtype", None)
                out[name] = (tuple(int(n) for n in want.shape),
                             None if dtype is None else np.dtype(dtype))
            else:
                out[name] = (tuple(int(n) for n in want), None)
        except (TypeError, ValueError) as e:
            raise ValueError(f"expect[{name!r}] must be a NumPy array or a shape tuple ({e})") from e
    return out


# --- python -m refbnn.fileformat upgrade OLD NEW ------------------------------------------------

def main(argv=None) -> int:
    """``python -m refbnn.fileformat upgrade OLD NEW [--timeout S]``: convert a version-1 file.

    The version-1 read runs in a child process killed after ``--timeout`` seconds (default 600), so a
    damaged file that makes HDF5 loop ends with one line and exit status 2 instead of hanging."""
    from refbnn.cli_util import fail

    p = argparse.ArgumentParser(prog="python -m refbnn.fileformat",
                                description="Convert refbnn format-version-1 files to version 2.")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upgrade", help="convert OLD (version 1) into NEW (version 2); NEW may be OLD")
    up.add_argument("old")
    up.add_argument("new")
    up.add_argument("--timeout", type=float, default=600.0,
                    help="seconds the version-1 read may take (default 600)")
    up.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.timeout > 0 or args.timeout != args.timeout:
        return fail(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if not os.path.isfile(args.old):
        return fail(f"{args.old}: no such file")
    if args.in_process:
        try:
            f = upgrade(args.old, args.new)
        except (FormatError, ValueError, OSError) as e:
            return fail(e)
        print(f"wrote {args.new} (format version {f.version}, kind {f.kind}, {len(f.names)} tensors)")
        return 0
    try:
        r = subprocess.run([sys.executable, "-m", "refbnn.fileformat", "upgrade", "--in-process",
                            args.old, args.new], timeout=args.timeout)
    except subprocess.TimeoutExpired:
        remove_stale_temps(args.new)
        return fail(f"{args.old}: reading it took more than {args.timeout:g} s (a damaged "
                    f"version-1 file can make HDF5 loop); {args.new} was not written")
    return r.returncode if r.returncode in (0, 2) else fail(
        f"{args.old}: the conversion process ended with status {r.returncode}; {args.new} was not "
        "written")


if __name__ == "__main__":
    sys.exit(main())
