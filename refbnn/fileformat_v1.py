"""Reader of refbnn format version 1, kept only to convert old files (:func:`refbnn.fileformat.upgrade`).

Version 1 (``docs/format.md``, appendix A) stored metadata as HDF5 variable-length string
attributes. Their bytes live in HDF5's global heap, which has no checksum: a damaged or crafted
heap (with the refbnn SHA-256 re-stamped) can make HDF5's attribute read loop for minutes. So
:func:`refbnn.fileformat.load` refuses version 1, and this reader is only run on files a user
converts, by ``python -m refbnn.fileformat upgrade`` in a child process under a time limit.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import h5py
import numpy as np

from refbnn import __version__ as REFBNN_VERSION
from refbnn.fileformat import (
    LAYOUTS,
    PACKED_SUFFIX,
    TENSOR_DTYPES,
    USERBLOCK_SIZE,
    WORD_BITS,
    BinaryWeight,
    FormatError,
    LoadedFile,
    _input_spec_problem,
    _packed_shape,
    _read_dataset,
    pack_weight_signs,
)

FORMAT_NAME = "refbnn"
FORMAT_VERSION = 1
KINDS = ("model", "checkpoint", "packed")
USERBLOCK_MAGIC = "refbnn-hdf5 1"
COMMON_ATTRS = ("format", "format_version", "kind", "config", "input_spec", "class_names",
                "dataset", "metrics", "refbnn_version", "provenance")
CHECKPOINT_ATTRS = ("epoch", "rng_state", "history")
PACKED_OPTIONAL_ATTRS = ("scale",)
PACKED_ATTRS = ("packs", "layout", "unpacked_shape", "groups", "sign_at_zero", "word_bits",
                "bit_order", "bit_one_means")


def load_v1(path) -> LoadedFile:
    """Read and validate a version-1 file (``version=1`` in the result); FormatError on problems."""
    path = str(path)
    with open(path, "rb") as fh:
        data = fh.read()
    _check_seal_v1(path, data)
    try:
        f = h5py.File(io.BytesIO(data), "r")
    except OSError as e:
        raise FormatError(path, "/", f"not a readable HDF5 file ({e})") from None
    with f:
        return _Reader(path, f).read(None)


def _userblock_v1(digest: str) -> bytes:
    text = f"{USERBLOCK_MAGIC}\nsha256 {digest}\n".encode("ascii")
    return text + b"\0" * (USERBLOCK_SIZE - len(text))


def _check_seal_v1(path: str, data: bytes) -> None:
    head = data[:USERBLOCK_SIZE]
    lines = head.split(b"\n")
    if lines[0] == b"refbnn-hdf5 2":
        raise FormatError(path, "/", "is already format version 2; nothing to convert")
    if len(head) < USERBLOCK_SIZE or lines[0] != USERBLOCK_MAGIC.encode():
        raise FormatError(path, "/", "not a refbnn version-1 file (no 'refbnn-hdf5 1' user block)")
    stored = lines[1][len(b"sha256 "):].decode("latin-1") if len(lines) > 1 else ""
    if len(stored) != 64 or head != _userblock_v1(stored):
        raise FormatError(path, "/", "damaged refbnn user block")
    if hashlib.sha256(memoryview(data)[USERBLOCK_SIZE:]).hexdigest() != stored:
        raise FormatError(path, "/", "file bytes do not match the SHA-256 in the user block "
                                     "(truncated or damaged file)")


def _split_key_lenient(key: str) -> tuple[str, str]:
    group, _, leaf = str(key).rpartition(".")
    return group, leaf


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
        return _read_dataset(self.path, ds, hpath)

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


