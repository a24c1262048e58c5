"""Golden-vector files: one HDF5 file holds a list of cases (``docs/golden.md`` is the spec).

A case is one operation applied to named input arrays, with the named output arrays it must produce
and, per output, the tolerance a re-computation must meet. Nothing in a file is code: metadata is
JSON text in string attributes, arrays are plain little-endian numeric datasets.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field

import h5py
import numpy as np

from refbnn.atomicio import write_bytes_atomic

FORMAT = "refbnn-golden"
VERSION = 1
KINDS = ("ops", "layers", "model")
DTYPES = ("float32", "float64", "int8", "int32", "int64", "uint32", "uint64")


class GoldenError(ValueError):
    """A golden file that cannot be read or does not follow ``docs/golden.md``."""


@dataclass
class Case:
    """One golden case. ``tolerance[name] = (rtol, atol)``; an output without an entry is exact;
    ``stacks``: the other stacks that can express it (:mod:`refbnn.golden.stacks`).

    An output ``a`` matches the expected ``e`` when shapes are equal and
    ``max |a - e| <= atol + rtol * max |e|`` (both 0: every element equal; NaN never matches).
    """

    name: str
    op: str
    params: dict
    inputs: dict
    outputs: dict
    tolerance: dict = field(default_factory=dict)
    stacks: list = field(default_factory=list)  # docs/golden.md section 8; [] when unknown


@dataclass
class GoldenFile:
    """A file's root metadata (``kind``, ``seed``, ``meta`` JSON object) and its cases in order.

    ``arrays``: extra root-level named arrays (the model file's ``/weights``)."""

    kind: str
    seed: int
    meta: dict
    cases: list
    arrays: dict = field(default_factory=dict)


def _dataset(group, name, value):
    a = np.asarray(value)
    if a.dtype.name not in DTYPES:
        raise ValueError(f"golden array {name!r} has unsupported dtype {a.dtype}")
    return group.create_dataset(name, data=a.astype(a.dtype.newbyteorder("<")))


def write(path, golden: GoldenFile, version: str) -> None:
    """Write ``golden`` to ``path`` atomically: the HDF5 file is built in memory (so a full disk
    never leaves HDF5 half-closed), then written by :func:`refbnn.atomicio.write_bytes_atomic`
    (mode 0666 minus the umask; on any error no partial or temporary file is left, ``OSError``
    names ``path``)."""
    bio = io.BytesIO()
    with h5py.File(bio, "w", track_order=True) as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = np.int64(VERSION)
        f.attrs["kind"] = golden.kind
        f.attrs["seed"] = np.int64(golden.seed)
        f.attrs["refbnn_version"] = version
        f.attrs["meta"] = json.dumps(golden.meta, sort_keys=True)
        f.attrs["cases"] = json.dumps([c.name for c in golden.cases])
        if golden.arrays:
            g = f.create_group("weights", track_order=True)
            for k, v in golden.arrays.items():
                _dataset(g, k, v)
        cases = f.create_group("cases", track_order=True)
        for c in golden.cases:
            g = cases.create_group(c.name, track_order=True)
            g.attrs["op"] = c.op
            g.attrs["params"] = json.dumps(c.params, sort_keys=True)
            g.attrs["inputs"] = json.dumps(list(c.inputs))
            g.attrs["outputs"] = json.dumps(list(c.outputs))
            g.attrs["stacks"] = json.dumps(list(c.stacks))
            gi = g.create_group("inputs", track_order=True)
            for k, v in c.inputs.items():
                _dataset(gi, k, v)
            go = g.create_group("outputs", track_order=True)
            for k, v in c.outputs.items():
                ds = _dataset(go, k, v)
                rtol, atol = c.tolerance.get(k, (0.0, 0.0))
                ds.attrs["rtol"] = np.float64(rtol)
                ds.attrs["atol"] = np.float64(atol)
    write_bytes_atomic(path, bio.getbuffer())


def _json(obj, hpath, name):
    try:
        return json.loads(_str(obj, hpath, name))
    except json.JSONDecodeError as e:
        raise GoldenError(f"{hpath}: attribute {name!r} is not JSON ({e})") from None


def _str(obj, hpath, name):
    if name not in obj.attrs:
        raise GoldenError(f"{hpath}: missing attribute {name!r}")
    v = obj.attrs[name]
    if isinstance(v, bytes):
        v = v.decode("utf-8")
    if not isinstance(v, str):
        raise GoldenError(f"{hpath}: attribute {name!r} must be a string")
    return v


def _arrays(group, hpath, names):
    out = {}
    for name in names:
        ds = group.get(name)
        if not isinstance(ds, h5py.Dataset):
            raise GoldenError(f"{hpath}/{name}: missing dataset")
        if ds.dtype.name not in DTYPES:
            raise GoldenError(f"{hpath}/{name}: unsupported dtype {ds.dtype}")
        out[name] = ds[()]
    return out


def check_readable(path) -> str:
    """``path`` as a string if it is a regular file (a link to one is fine), else raise
    :class:`GoldenError`: "no such file", or "not a regular file" for a folder, FIFO or device (a
    FIFO would block the read)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GoldenError(f"{path}: " + ("not a regular file" if os.path.exists(path) else
                                         "no such file"))
    return path


def read(path) -> GoldenFile:
    """Read a golden file; raise :class:`GoldenError` naming the first problem."""
    path = check_readable(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise GoldenError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        try:
            return _read(f)
        except GoldenError as e:
            raise GoldenError(f"{path}: {e}") from None


def _read(f) -> GoldenFile:
    if f.attrs.get("format") not in (FORMAT, FORMAT.encode()):
        raise GoldenError(f"not a golden file (format attribute is not {FORMAT!r})")
    version = f.attrs.get("format_version")
    if not isinstance(version, (int, np.integer)) or int(version) != VERSION:
        raise GoldenError(f"format_version must be {VERSION}, got {version!r}")
    kind = _str(f, "/", "kind")
    if kind not in KINDS:
        raise GoldenError(f"kind must be one of {KINDS}, got {kind!r}")
    seed = f.attrs.get("seed")
    if not isinstance(seed, (int, np.integer)):
        raise GoldenError("/: attribute 'seed' must be an integer")
    names = _json(f, "/", "cases")
    arrays = {}
    if "weights" in f:
        arrays = _arrays(f["weights"], "/weights", list(f["weights"].keys()))
    cases = []
    for name in names:
        hpath = f"/cases/{name}"
        g = f.get(hpath)
        if not isinstance(g, h5py.Group):
            raise GoldenError(f"{hpath}: missing case group")
        ins, outs = _json(g, hpath, "inputs"), _json(g, hpath, "outputs")
        for sub in ("inputs", "outputs"):
            if not isinstance(g.get(sub), h5py.Group):
                raise GoldenError(f"{hpath}/{sub}: missing group")
        outputs = _arrays(g["outputs"], hpath + "/outputs", outs)
        tol = {}
        for k in outs:
            a = g["outputs"][k].attrs
            tol[k] = (float(a.get("rtol", 0.0)), float(a.get("atol", 0.0)))
        stacks = _json(g, hpath, "stacks") if "stacks" in g.attrs else []
        cases.append(Case(name, _str(g, hpath, "op"), _json(g, hpath, "params"),
                          _arrays(g["inputs"], hpath + "/inputs", ins), outputs, tol, stacks))
    return GoldenFile(kind, int(seed), _json(f, "/", "meta"), cases, arrays)
