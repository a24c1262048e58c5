"""refbnn's HDF5 file format for weights, checkpoints and packed deployment exports.

``docs/format.md`` is the specification; this module is its reference implementation. In short:

* root attributes ``format="refbnn"``, ``format_version=1``, ``kind`` and JSON metadata;
* state-dict key ``a.b.weight`` is dataset ``weight`` of group ``/model/a.b`` (a key without a dot is
  a dataset directly in ``/model``); dtypes and shapes are kept exactly, datasets are stored
  contiguous, little-endian and unfiltered, in state-dict order (HDF5 link creation order);
* a binary weight ``W`` (PyTorch layout ``(O, I, *K)``, ``I`` = input channels per group) is also
  stored as ``weight_packed``: ``uint64`` words ``pack(sign(moveaxis(W, 1, -1)))`` of shape
  ``(O, *K, ceil(I/64))`` (OHWI for a conv, OI for a linear layer); bit 1 means -1, LSB first;
* ``kind="packed"`` files drop the latent binary weights; ``kind="checkpoint"`` files add ``/optimizer``
  and the epoch, RNG state and metrics history.

A 512-byte HDF5 user block holds a magic line and the SHA-256 of the rest of the file, checked
before HDF5 parses anything. Nothing in a file is ever executed: metadata is JSON, tensors are plain
numeric datasets, and :func:`load` rejects links, external storage, filters, unknown names and
attributes. Every problem in a file raises :class:`FormatError` naming the file and the HDF5 path.
Writes are atomic (temp file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from refbnn import __version__ as REFBNN_VERSION
from refbnn.bits import check_sign_at_zero, words_for
from refbnn.ops import pack_bits, unpack_bits

FORMAT_NAME = "refbnn"
FORMAT_VERSION = 1
KINDS = ("model", "checkpoint", "packed")
PACKED_SUFFIX = "_packed"
USERBLOCK_SIZE = 512
USERBLOCK_MAGIC = "refbnn-hdf5 1"
WORD_BITS = 64
LAYOUTS = {2: "OI", 3: "OWI", 4: "OHWI"}
TENSOR_DTYPES = tuple(np.dtype(t) for t in (
    "float16", "float32", "float64", "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64"))

COMMON_ATTRS = ("format", "format_version", "kind", "config", "input_spec", "class_names",
                "dataset", "metrics", "refbnn_version", "provenance")
CHECKPOINT_ATTRS = ("epoch", "rng_state", "history")
PACKED_OPTIONAL_ATTRS = ("scale",)
PACKED_ATTRS = ("packs", "layout", "unpacked_shape", "groups", "sign_at_zero", "word_bits",
                "bit_order", "bit_one_means")
INPUT_SPEC_KEYS = ("shape", "layout", "channel_order", "mean", "std")


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

    ``names``: every tensor name in file (= saved state-dict) order. ``state_dict``: every real
    tensor, including latent binary weights except in ``kind="packed"`` files. ``packed``: binary
    weight name -> ``uint64`` words (layout in :func:`pack_weight_signs`); ``binary``: the same
    names -> :class:`BinaryWeight`. The checkpoint fields are ``None`` unless
    ``kind == "checkpoint"``.
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
    return _pack_last_axis(np.moveaxis(w, 1, -1), sign_at_zero)


def unpack_weight_signs(words, shape) -> np.ndarray:
    """Inverse of :func:`pack_weight_signs`: float32 +-1 weight of PyTorch ``shape`` ``(O, I, *K)``."""
    shape = tuple(int(n) for n in shape)
    signs = _unpack_last_axis(np.asarray(words), shape[1])
    return np.ascontiguousarray(np.moveaxis(signs, -1, 1), dtype=np.float32)


def _pack_last_axis(x: np.ndarray, sign_at_zero: int) -> np.ndarray:
    """``uint64`` words of ``sign(x)`` packed along the last axis (``docs/semantics.md`` section 2)."""
    return pack_bits(x, axis=-1, word_bits=WORD_BITS, sign_at_zero=sign_at_zero)


def _unpack_last_axis(words: np.ndarray, n: int) -> np.ndarray:
    """+-1 values of ``n`` packed channels per row of ``uint64`` words."""
    return unpack_bits(words, n, axis=-1, word_bits=WORD_BITS, dtype=np.float32)


def _packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0], *shape[2:], words_for(shape[1], WORD_BITS))


# --- writing -----------------------------------------------------------------------------------

def save_model(path, state_dict: Mapping, *, config: Mapping, binary_weights: Mapping | None = None,
               input_spec: Mapping | None = None, class_names=None, dataset: str | None = None,
               metrics: Mapping | None = None, provenance: Mapping | None = None,
               packed_only: bool = False) -> None:
    """Write a model file (``kind="model"``), or with ``packed_only`` a deployment export
    (``kind="packed"``: latent binary weights dropped, their packed sign bits kept).

    ``state_dict``: name -> numeric array (float16/32/64, (u)int8-64; scalars allowed).
    ``binary_weights``: name -> ``{"groups": g, "sign_at_zero": s, "scale": alpha}`` for each
    state-dict key holding a binary layer's latent weight ``(O, I, *K)``: ``groups`` and
    ``sign_at_zero`` default to 1 (``sign_at_zero=0`` layers are stored unpacked); ``scale`` is
    ``None`` (default) or the layer's float32 ``(O,)`` output factor (Bi-Real's ``mean |W[o]|``),
    stored with the packed bits; pass it for scaled layers, or a packed-only file loses it.
    ``config``/``metrics``/``provenance``: JSON objects; ``input_spec``: see ``docs/format.md``;
    ``class_names``: list of str. Bad arguments raise ``ValueError``; the destination is replaced
    atomically and left untouched on any error.
    """
    kind = "packed" if packed_only else "model"
    attrs = _common_attrs(kind, config, input_spec, class_names, dataset, metrics, provenance)
    _atomic_write(path, attrs, state_dict, binary_weights, drop_latent=packed_only)


def save_checkpoint(path, state_dict: Mapping, *, config: Mapping, optimizer_state: Mapping,
                    optimizer_hyperparameters: Mapping, rng_state: Mapping | None, epoch: int,
                    history: list, binary_weights: Mapping | None = None,
                    input_spec: Mapping | None = None, class_names=None,
                    dataset: str | None = None, metrics: Mapping | None = None,
                    provenance: Mapping | None = None) -> None:
    """Write a training checkpoint (``kind="checkpoint"``): a model file plus optimizer state.

    ``optimizer_state``: flat name -> numeric array (names without ``/``);
    ``optimizer_hyperparameters``: JSON object; ``rng_state``: JSON-able dict such as
    ``np.random.Generator.bit_generator.state`` (restore with ``rng.bit_generator.state = ...``);
    ``epoch``: int >= 0 (epochs completed); ``history``: JSON list (e.g. one metrics dict per epoch).
    Other arguments as in :func:`save_model`.
    """
    attrs = _common_attrs("checkpoint", config, input_spec, class_names, dataset, metrics,
                          provenance)
    if isinstance(epoch, bool) or not isinstance(epoch, int | np.integer) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    attrs["epoch"] = np.int64(epoch)
    attrs["rng_state"] = _to_json("rng_state", rng_state, (dict, type(None)))
    attrs["history"] = _to_json("history", history, (list,))
    hyper = _to_json("optimizer_hyperparameters", optimizer_hyperparameters, (dict,))
    if not isinstance(optimizer_state, Mapping):
        raise ValueError("optimizer_state must be a mapping name -> array")
    for name in optimizer_state:
        _check_member_name(name, "optimizer_state key")
    optimizer = (hyper, optimizer_state)
    _atomic_write(path, attrs, state_dict, binary_weights, drop_latent=False, optimizer=optimizer)


def export_packed(src, dst) -> None:
    """Convert a ``model`` or ``checkpoint`` file into a ``packed`` deployment export (metadata kept,
    optimizer state dropped). The source is fully validated first."""
    f = load(src)
    binary = {n: {"groups": b.groups, "sign_at_zero": b.sign_at_zero, "scale": b.scale}
              for n, b in f.binary.items()}
    state = f.state_dict if f.kind != "packed" else f.sign_state_dict()
    save_model(dst, state, config=f.config, binary_weights=binary, input_spec=f.input_spec,
               class_names=f.class_names, dataset=f.dataset, metrics=f.metrics,
               provenance=f.provenance, packed_only=True)


def _common_attrs(kind, config, input_spec, class_names, dataset, metrics, provenance) -> dict:
    if input_spec is not None:
        problem = _input_spec_problem(input_spec)
        if problem:
            raise ValueError(f"input_spec: {problem}")
    if class_names is not None:
        class_names = list(class_names)
        if not all(isinstance(c, str) for c in class_names):
            raise ValueError("class_names must be a list of str")
    if dataset is not None and not isinstance(dataset, str):
        raise ValueError(f"dataset must be a str or None, got {type(dataset).__name__}")
    return {
        "format": FORMAT_NAME,
        "format_version": np.int64(FORMAT_VERSION),
        "kind": kind,
        "config": _to_json("config", config, (dict,)),
        "input_spec": _to_json("input_spec", input_spec, (dict, type(None))),
        "class_names": _to_json("class_names", class_names, (list, type(None))),
        "dataset": dataset or "",
        "metrics": _to_json("metrics", metrics, (dict, type(None))),
        "refbnn_version": REFBNN_VERSION,
        "provenance": _to_json("provenance", provenance, (dict, type(None))),
    }


def _json_default(obj):
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _to_json(what: str, value, types: tuple) -> str:
    if isinstance(value, Mapping) and not isinstance(value, dict):
        value = dict(value)
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, types):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise ValueError(f"{what} must be a JSON {names}, got {type(value).__name__}")
    try:
        return json.dumps(value, allow_nan=False, default=_json_default, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON-able ({e}); NaN/inf are not allowed, use null") from e


def _check_member_name(name, what: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or "\0" in name or name in (".", ".."):
        raise ValueError(f"{what} {name!r} is not a valid name (non-empty str without '/')")


def _split_key(key) -> tuple[str, str]:
    """State-dict key -> (group name under /model, or "" for /model itself; dataset name)."""
    _check_member_name(key, "state_dict key")
    parts = key.split(".")
    if any(p == "" for p in parts):
        raise ValueError(f"state_dict key {key!r} has an empty name component")
    if parts[-1].endswith(PACKED_SUFFIX):
        raise ValueError(f"state_dict key {key!r}: names ending in {PACKED_SUFFIX!r} are reserved "
                         "for packed sign bits")
    return ".".join(parts[:-1]), parts[-1]


def _as_tensor(what: str, value) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype not in TENSOR_DTYPES:
        raise ValueError(f"{what}: unsupported dtype {arr.dtype} (allowed: float16/32/64, "
                         "int8-64, uint8-64)")
    return np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")  # keeps 0-d arrays 0-d


def _binary_specs(state_dict: Mapping, binary_weights: Mapping | None,
                  drop_latent: bool) -> dict[str, BinaryWeight]:
    """Validated packing options per binary weight. ``sign_at_zero=0`` (ternary ``torch.sign``)
    weights cannot be packed: they are left out (stored as plain tensors), or refused when the latent
    weights are to be dropped."""
    specs = {}
    for name, spec in (binary_weights or {}).items():
        if name not in state_dict:
            raise ValueError(f"binary weight {name!r} is not a state_dict key")
        spec = dict(spec or {})
        unknown = set(spec) - {"groups", "sign_at_zero", "scale"}
        if unknown:
            raise ValueError(f"binary weight {name!r}: unknown options {sorted(unknown)}")
        shape = np.shape(state_dict[name])
        if len(shape) not in LAYOUTS:
            raise ValueError(f"binary weight {name!r} must have 2-4 axes (O, I, *K), got {shape}")
        groups = spec.get("groups", 1)
        if isinstance(groups, bool) or not isinstance(groups, int | np.integer) or groups < 1 \
                or shape[0] % groups:
            raise ValueError(f"binary weight {name!r}: groups={groups!r} must be an int >= 1 "
                             f"dividing O={shape[0]}")
        sign_at_zero = spec.get("sign_at_zero", 1)
        if sign_at_zero == 0 and not isinstance(sign_at_zero, bool):
            if drop_latent:
                raise ValueError(f"binary weight {name!r} uses sign_at_zero=0 (ternary torch.sign), "
                                 "which one bit cannot hold: no packed-only export")
            continue
        sign_at_zero = check_sign_at_zero(sign_at_zero)
        scale = spec.get("scale")
        if scale is not None:
            scale = np.asarray(scale)
            if scale.dtype != np.float32 or scale.shape != shape[:1] or not np.isfinite(scale).all():
                raise ValueError(f"binary weight {name!r}: scale must be {shape[0]} finite float32 "
                                 f"values, got {scale.dtype} {scale.shape}")
        specs[name] = BinaryWeight(tuple(int(n) for n in shape), int(groups), sign_at_zero, scale)
    return specs


def _atomic_write(path, attrs: dict, state_dict: Mapping, binary_weights: Mapping | None, *,
                  drop_latent: bool, optimizer: tuple | None = None) -> None:
    if not isinstance(state_dict, Mapping):
        raise ValueError("state_dict must be a mapping name -> array")
    specs = _binary_specs(state_dict, binary_weights, drop_latent)
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(8)}")
    try:
        with h5py.File(tmp, "w-", libver=("v110", "v110"), track_order=True,
                       userblock_size=USERBLOCK_SIZE) as f:
            for name, value in attrs.items():
                f.attrs[name] = value
            _write_model(f.create_group("model", track_order=True), state_dict, specs, drop_latent)
            if optimizer is not None:
                hyper, tensors = optimizer
                g = f.create_group("optimizer", track_order=True)
                g.attrs["hyperparameters"] = hyper
                for name, value in tensors.items():
                    g.create_dataset(name, data=_as_tensor(f"optimizer_state[{name!r}]", value))
        _seal(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _userblock(digest: str) -> bytes:
    text = f"{USERBLOCK_MAGIC}\nsha256 {digest}\n".encode("ascii")
    return text + b"\0" * (USERBLOCK_SIZE - len(text))


def _sha256_after_userblock(fh) -> str:
    fh.seek(USERBLOCK_SIZE)
    h = hashlib.sha256()
    while chunk := fh.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _seal(path) -> None:
    """Write the user block (magic line, SHA-256 of every byte after it) and fsync the file."""
    with open(path, "r+b") as fh:
        digest = _sha256_after_userblock(fh)
        fh.seek(0)
        fh.write(_userblock(digest))
        fh.flush()
        os.fsync(fh.fileno())


def _check_seal(path: str) -> None:
    """Check the user block before HDF5 parses anything (HDF5 can crash or hang on damaged
    metadata): raise FormatError unless the magic line is there and the SHA-256 matches."""
    with open(path, "rb") as fh:
        head = fh.read(USERBLOCK_SIZE)
        lines = head.split(b"\n")
        if len(head) < USERBLOCK_SIZE or lines[0] != USERBLOCK_MAGIC.encode():
            raise FormatError(path, "/", "not a refbnn file (no refbnn user block at byte 0; "
                                         "not HDF5, or HDF5 written by something else)")
        stored = lines[1][len(b"sha256 "):].decode("latin-1") if len(lines) > 1 else ""
        if len(stored) != 64 or not all(c in "0123456789abcdef" for c in stored) \
                or head != _userblock(stored):
            raise FormatError(path, "/", "damaged refbnn user block")
        if _sha256_after_userblock(fh) != stored:
            raise FormatError(path, "/", "file bytes do not match the SHA-256 in the user block "
                                         "(truncated or damaged file)")


def _write_model(model: h5py.Group, state_dict: Mapping, specs: dict, drop_latent: bool) -> None:
    kinds: dict[str, str] = {}  # HDF5 member name directly under /model -> "group" | "dataset"
    for key, value in state_dict.items():
        group_name, leaf = _split_key(key)
        member, member_kind = (group_name, "group") if group_name else (leaf, "dataset")
        if kinds.setdefault(member, member_kind) != member_kind:
            raise ValueError(f"state_dict key {key!r} clashes with another key: {member!r} would be "
                             "both a layer group and a tensor")
        if group_name:
            parent = model[group_name] if group_name in model else model.create_group(
                group_name, track_order=True)
        else:
            parent = model
        arr = _as_tensor(f"state_dict[{key!r}]", value)
        spec = specs.get(key)
        if spec is None:
            parent.create_dataset(leaf, data=arr)
            continue
        if arr.dtype.kind != "f":
            raise ValueError(f"binary weight {key!r} must be a float array, got {arr.dtype}")
        if not drop_latent:
            parent.create_dataset(leaf, data=arr)
        words = pack_weight_signs(arr, spec.sign_at_zero)
        ds = parent.create_dataset(leaf + PACKED_SUFFIX, data=words.astype("<u8"))
        ds.attrs["packs"] = leaf
        ds.attrs["layout"] = LAYOUTS[arr.ndim]
        ds.attrs["unpacked_shape"] = np.asarray(arr.shape, dtype=np.int64)
        ds.attrs["groups"] = np.int64(spec.groups)
        ds.attrs["sign_at_zero"] = np.int64(spec.sign_at_zero)
        ds.attrs["word_bits"] = np.int64(WORD_BITS)
        ds.attrs["bit_order"] = "lsb_first"
        ds.attrs["bit_one_means"] = np.int64(-1)
        if spec.scale is not None:
            ds.attrs["scale"] = spec.scale.astype("<f4")


# --- reading -----------------------------------------------------------------------------------

def load(path, expect: Mapping | None = None) -> LoadedFile:
    """Read and validate a refbnn file of any kind; raise :class:`FormatError` on any problem.

    ``expect``: optional name -> array (checks shape and dtype) or shape tuple (shape only), e.g. a
    model's ``state_dict()``; the file's tensors (latent or packed binary weights count under their
    latent name, with their unpacked shape; a packed-only weight's dtype is not checked) must be
    exactly these names. A missing file raises ``FileNotFoundError``.
    """
    path = str(path)
    if expect is not None:
        expect = _normalize_expect(expect)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    _check_seal(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise FormatError(path, "/", f"not a readable HDF5 file ({e})") from None
    with f:
        return _Reader(path, f).read(expect)


@dataclass
class _Entry:
    """One logical tensor found in /model: its latent dataset and/or packed dataset."""

    hpath: str
    latent: h5py.Dataset | None = None
    packed: h5py.Dataset | None = None
    binary: BinaryWeight | None = None


class _Reader:
    def __init__(self, path: str, f: h5py.File):
        self.path = path
        self.f = f

    def error(self, hpath: str, problem: str) -> FormatError:
        return FormatError(self.path, hpath, problem)

    def read(self, expect) -> LoadedFile:
        hpath = "/"
        try:
            return self._read(expect)
        except FormatError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
            raise self.error(hpath, f"unreadable HDF5 data ({type(e).__name__}: {e})") from None

    # -- attributes ------------------------------------------------------------------------------
    def _attr(self, obj, hpath: str, name: str):
        try:
            return obj.attrs[name]
        except KeyError:
            raise self.error(hpath, f"missing attribute {name!r}") from None
        except (OSError, RuntimeError, TypeError, ValueError) as e:
            raise self.error(hpath, f"attribute {name!r} is unreadable ({e})") from None

    def _str_attr(self, obj, hpath: str, name: str) -> str:
        value = self._attr(obj, hpath, name)
        if isinstance(value, bytes | np.bytes_):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise self.error(hpath, f"attribute {name!r} is not UTF-8 text") from None
        if not isinstance(value, str):
            raise self.error(hpath, f"attribute {name!r} must be a string, got "
                                    f"{type(value).__name__}")
        return value

    def _int_attr(self, obj, hpath: str, name: str) -> int:
        value = self._attr(obj, hpath, name)
        if not isinstance(value, np.integer | int) or isinstance(value, bool | np.bool_):
            raise self.error(hpath, f"attribute {name!r} must be a scalar integer, got {value!r}")
        return int(value)

    def _json_attr(self, obj, hpath: str, name: str, types: tuple):
        text = self._str_attr(obj, hpath, name)

        def no_constants(c):
            raise ValueError(f"{c} is not JSON")
        try:
            value = json.loads(text, parse_constant=no_constants)
        except (ValueError, RecursionError) as e:
            raise self.error(hpath, f"attribute {name!r} is not valid JSON ({e})") from None
        if not isinstance(value, types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise self.error(hpath, f"attribute {name!r} must be a JSON {names}, got "
                                    f"{type(value).__name__}")
        return value

    # -- top level -------------------------------------------------------------------------------
    def _read(self, expect) -> LoadedFile:
        f = self.f
        fmt = self._str_attr(f, "/", "format") if "format" in f.attrs else None
        if fmt != FORMAT_NAME:
            raise self.error("/", f"not a refbnn file (attribute 'format' is {fmt!r}, expected "
                                  f"{FORMAT_NAME!r})")
        version = self._int_attr(f, "/", "format_version")
        if version > FORMAT_VERSION:
            raise self.error("/", f"format_version {version} is newer than this refbnn "
                                  f"({REFBNN_VERSION}) reads (version {FORMAT_VERSION}); upgrade")
        if version != FORMAT_VERSION:
            raise self.error("/", f"unknown format_version {version} (expected {FORMAT_VERSION})")
        kind = self._str_attr(f, "/", "kind")
        if kind not in KINDS:
            raise self.error("/", f"attribute 'kind' is {kind!r}, expected one of {KINDS}")
        allowed = COMMON_ATTRS + (CHECKPOINT_ATTRS if kind == "checkpoint" else ())
        self._exact_names("/", "attribute", list(f.attrs), allowed)
        input_spec = self._json_attr(f, "/", "input_spec", (dict, type(None)))
        if input_spec is not None and (problem := _input_spec_problem(input_spec)):
            raise self.error("/", f"attribute 'input_spec': {problem}")
        class_names = self._json_attr(f, "/", "class_names", (list, type(None)))
        if class_names is not None and not all(isinstance(c, str) for c in class_names):
            raise self.error("/", "attribute 'class_names' must be a JSON list of strings")
        out = LoadedFile(
            path=self.path, kind=kind, version=version,
            refbnn_version=self._str_attr(f, "/", "refbnn_version"),
            config=self._json_attr(f, "/", "config", (dict,)),
            input_spec=input_spec, class_names=class_names,
            dataset=self._str_attr(f, "/", "dataset") or None,
            metrics=self._json_attr(f, "/", "metrics", (dict, type(None))),
            provenance=self._json_attr(f, "/", "provenance", (dict, type(None))))
        members = ("model", "optimizer") if kind == "checkpoint" else ("model",)
        self._exact_names("/", "member", list(f), members)
        if kind == "checkpoint":
            out.epoch = self._int_attr(f, "/", "epoch")
            if out.epoch < 0:
                raise self.error("/", f"attribute 'epoch' must be >= 0, got {out.epoch}")
            out.rng_state = self._json_attr(f, "/", "rng_state", (dict, type(None)))
            out.history = self._json_attr(f, "/", "history", (list,))
        self._read_model(out, expect)
        if kind == "checkpoint":
            self._read_optimizer(out)
        return out

    def _exact_names(self, hpath: str, what: str, found: list, allowed: tuple) -> None:
        missing = [n for n in allowed if n not in found]
        extra = [n for n in found if n not in allowed]
        if missing:
            raise self.error(hpath, f"missing {what} {missing[0]!r}")
        if extra:
            raise self.error(hpath, f"unexpected {what} {extra[0]!r}")

    def _member(self, group: h5py.Group, gpath: str, name: str):
        hpath = f"{gpath.rstrip('/')}/{name}"
        link = group.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise self.error(hpath, f"is a {type(link).__name__}; only hard links are allowed")
        return group[name], hpath

    def _group(self, parent: h5py.Group, ppath: str, name: str):
        obj, hpath = self._member(parent, ppath, name)
        if not isinstance(obj, h5py.Group):
            raise self.error(hpath, "must be a group")
        return obj, hpath

    def _check_dataset(self, ds, hpath: str, attrs: tuple = (), optional: tuple = ()) -> None:
        """Structure checks made before any data is read."""
        if not isinstance(ds, h5py.Dataset):
            raise self.error(hpath, "must be a dataset")
        if ds.dtype not in TENSOR_DTYPES:
            raise self.error(hpath, f"unsupported dtype {ds.dtype}")
        plist = ds.id.get_create_plist()
        if ds.is_virtual or ds.external or plist.get_nfilters() or \
                plist.get_layout() not in (h5py.h5d.CONTIGUOUS, h5py.h5d.COMPACT):
            raise self.error(hpath, "datasets must be stored contiguous or compact, without "
                                    "filters, external or virtual storage")
        nbytes = int(np.prod(ds.shape, dtype=np.int64)) * ds.dtype.itemsize
        if ds.id.get_storage_size() != nbytes:
            raise self.error(hpath, f"stores {ds.id.get_storage_size()} bytes, shape {ds.shape} "
                                    f"{ds.dtype} needs {nbytes} (truncated or unwritten)")
        self._exact_names(hpath, "attribute", [a for a in ds.attrs if a not in optional], attrs)

    def _data(self, ds, hpath: str) -> np.ndarray:
        try:
            arr = ds[()]
        except (OSError, RuntimeError, ValueError, TypeError) as e:
            raise self.error(hpath, f"data is unreadable ({e})") from None
        arr = np.asarray(arr)
        return np.asarray(arr, dtype=arr.dtype.newbyteorder("="), order="C")

    # -- /model ----------------------------------------------------------------------------------
    def _read_model(self, out: LoadedFile, expect) -> None:
        model, mpath = self._group(self.f, "/", "model")
        entries: OrderedDict[str, _Entry] = OrderedDict()
        for name in model:
            obj, hpath = self._member(model, mpath, name)
            if isinstance(obj, h5py.Group):
                if any(p == "" for p in name.split(".")):
                    raise self.error(hpath, "layer name has an empty dotted component")
                for leaf in obj:
                    ds, dpath = self._member(obj, hpath, leaf)
                    self._add_entry(entries, f"{name}.{leaf}", leaf, ds, dpath)
            else:
                self._add_entry(entries, name, name, obj, hpath)

        for e in entries.values():
            if e.packed is not None and e.latent is None and out.kind != "packed":
                raise self.error(e.hpath, f"missing latent binary weight (a {out.kind!r} file "
                                          "keeps latent weights next to their packed bits)")
            if e.latent is not None and e.packed is not None and out.kind == "packed":
                raise self.error(e.hpath, "a 'packed' file must not hold latent binary weights")
            if e.latent is not None and e.binary is not None:
                if e.latent.dtype.kind != "f" or e.latent.shape != e.binary.shape:
                    raise self.error(e.hpath, f"latent binary weight {e.latent.dtype} "
                                              f"{e.latent.shape} does not match its packed bits' "
                                              f"unpacked_shape {e.binary.shape}")
        if expect is not None:
            self._check_expect(entries, expect, mpath)
        out.names = list(entries)
        for key, e in entries.items():
            if e.latent is not None:
                out.state_dict[key] = self._data(e.latent, e.hpath)
            if e.packed is not None:
                ppath = e.hpath + PACKED_SUFFIX
                words = self._data(e.packed, ppath)
                self._check_words(words, e, ppath, out.state_dict.get(key))
                out.packed[key] = words
                out.binary[key] = e.binary

    def _add_entry(self, entries, key: str, leaf: str, ds, hpath: str) -> None:
        if "." in leaf:
            raise self.error(hpath, "a tensor's dataset name must not contain '.'")
        if leaf.endswith(PACKED_SUFFIX):
            self._check_dataset(ds, hpath, PACKED_ATTRS, PACKED_OPTIONAL_ATTRS)
            binary = self._packed_attrs(ds, hpath, leaf)
            key = key[: -len(PACKED_SUFFIX)]
            e = entries.setdefault(key, _Entry(hpath[: -len(PACKED_SUFFIX)]))
            e.packed, e.binary = ds, binary
        else:
            self._check_dataset(ds, hpath)
            e = entries.setdefault(key, _Entry(hpath))
            e.latent = ds

    def _packed_attrs(self, ds, hpath: str, leaf: str) -> BinaryWeight:
        packs = self._str_attr(ds, hpath, "packs")
        if packs + PACKED_SUFFIX != leaf:
            raise self.error(hpath, f"attribute 'packs' is {packs!r}, expected "
                                    f"{leaf[: -len(PACKED_SUFFIX)]!r}")
        for name, expected in (("word_bits", WORD_BITS), ("bit_one_means", -1)):
            if self._int_attr(ds, hpath, name) != expected:
                raise self.error(hpath, f"attribute {name!r} must be {expected}")
        if self._str_attr(ds, hpath, "bit_order") != "lsb_first":
            raise self.error(hpath, "attribute 'bit_order' must be 'lsb_first'")
        shape = np.asarray(self._attr(ds, hpath, "unpacked_shape"))
        if shape.ndim != 1 or shape.dtype.kind not in "iu" or len(shape) not in LAYOUTS or \
                (shape < 0).any():
            raise self.error(hpath, f"attribute 'unpacked_shape' must be 2-4 integers >= 0, got "
                                    f"{shape.tolist()}")
        shape = tuple(int(n) for n in shape)
        layout = self._str_attr(ds, hpath, "layout")
        if layout != LAYOUTS[len(shape)]:
            raise self.error(hpath, f"attribute 'layout' is {layout!r}, expected "
                                    f"{LAYOUTS[len(shape)]!r} for unpacked_shape {shape}")
        groups = self._int_attr(ds, hpath, "groups")
        if groups < 1 or shape[0] % groups:
            raise self.error(hpath, f"attribute 'groups' = {groups} must be >= 1 and divide "
                                    f"O = {shape[0]}")
        sign_at_zero = self._int_attr(ds, hpath, "sign_at_zero")
        if sign_at_zero not in (1, -1):
            raise self.error(hpath, f"attribute 'sign_at_zero' must be 1 or -1, got {sign_at_zero}")
        if ds.dtype != np.uint64:
            raise self.error(hpath, f"packed bits must be uint64, got {ds.dtype}")
        if ds.shape != _packed_shape(shape):
            raise self.error(hpath, f"shape {ds.shape} does not match unpacked_shape {shape} "
                                    f"(expected {_packed_shape(shape)})")
        scale = None
        if "scale" in ds.attrs:
            scale = np.asarray(self._attr(ds, hpath, "scale"))
            if scale.dtype != np.float32 or scale.shape != shape[:1] or not np.isfinite(scale).all():
                raise self.error(hpath, f"attribute 'scale' must be {shape[0]} finite float32 "
                                        f"values, got {scale.dtype} {scale.shape}")
            scale = scale.astype(np.float32)  # native byte order
        return BinaryWeight(shape, groups, sign_at_zero, scale)

    def _check_words(self, words: np.ndarray, e: _Entry, hpath: str, latent) -> None:
        n = e.binary.shape[1]
        if n % WORD_BITS and words.size and (words[..., -1] >> np.uint64(n % WORD_BITS)).any():
            raise self.error(hpath, f"unused high bits of the last word are not 0 (I = {n})")
        if latent is None:
            return
        try:
            expected = pack_weight_signs(latent, e.binary.sign_at_zero)
        except ValueError as err:
            raise self.error(e.hpath, f"latent binary weight cannot be packed ({err})") from None
        if not np.array_equal(expected, words):
            bad = np.argwhere(expected != words)
            raise self.error(hpath, f"packed sign bits disagree with sign(latent weight) in "
                                    f"{len(bad)} word(s), first at word index {tuple(bad[0])}")

    def _check_expect(self, entries, expect: Mapping, mpath: str) -> None:
        missing = [k for k in expect if k not in entries]
        if missing:
            group, leaf = _split_key_lenient(missing[0])
            hpath = f"{mpath}/{group}/{leaf}" if group else f"{mpath}/{leaf}"
            more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
            raise self.error(hpath, f"missing tensor {missing[0]!r}{more}")
        for key, e in entries.items():
            if key not in expect:
                raise self.error(e.hpath if e.latent is not None else e.hpath + PACKED_SUFFIX,
                                 f"unexpected tensor {key!r} (not in the expected names)")
            shape, dtype = expect[key]
            have = e.latent.shape if e.latent is not None else e.binary.shape
            if tuple(have) != shape:
                raise self.error(e.hpath if e.latent is not None else e.hpath + PACKED_SUFFIX,
                                 f"shape {tuple(have)} but expected {shape}")
            if dtype is not None and e.latent is not None and e.latent.dtype != dtype:
                raise self.error(e.hpath, f"dtype {e.latent.dtype} but expected {dtype}")


    # -- /optimizer ------------------------------------------------------------------------------
    def _read_optimizer(self, out: LoadedFile) -> None:
        group, gpath = self._group(self.f, "/", "optimizer")
        self._exact_names(gpath, "attribute", list(group.attrs), ("hyperparameters",))
        out.optimizer_hyperparameters = self._json_attr(group, gpath, "hyperparameters", (dict,))
        out.optimizer_state = OrderedDict()
        for name in group:
            ds, hpath = self._member(group, gpath, name)
            self._check_dataset(ds, hpath)
            out.optimizer_state[name] = self._data(ds, hpath)


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


def _split_key_lenient(key: str) -> tuple[str, str]:
    group, _, leaf = str(key).rpartition(".")
    return group, leaf


def _input_spec_problem(spec) -> str | None:
    """Why ``spec`` is not a valid input_spec (``docs/format.md``), or None if it is."""
    if not isinstance(spec, Mapping):
        return "must be a JSON object"
    missing = [k for k in INPUT_SPEC_KEYS if k not in spec]
    if missing:
        return f"missing key {missing[0]!r} (needs {', '.join(INPUT_SPEC_KEYS)})"
    shape, layout = spec["shape"], spec["layout"]
    if not isinstance(shape, list | tuple) or len(shape) != 3 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        return f"'shape' must be 3 positive ints (one sample, no batch axis), got {shape!r}"
    if layout not in ("NCHW", "NHWC"):
        return f"'layout' must be 'NCHW' or 'NHWC', got {layout!r}"
    channels = shape[0] if layout == "NCHW" else shape[2]
    order = spec["channel_order"]
    if not isinstance(order, str) or len(order) != channels:
        return f"'channel_order' must be a str with one letter per channel ({channels}), " \
               f"got {order!r}"
    for key in ("mean", "std"):
        v = spec[key]
        if not isinstance(v, list | tuple) or len(v) != channels or not all(
                isinstance(x, int | float) and not isinstance(x, bool) and np.isfinite(x)
                for x in v):
            return f"{key!r} must be {channels} finite numbers, got {v!r}"
    if not all(x > 0 for x in spec["std"]):
        return "'std' values must be > 0"
    return None
