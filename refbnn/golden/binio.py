"""Golden files as raw little-endian ``.bin`` arrays plus one JSON manifest (``docs/golden.md``
section 10), for readers with no HDF5 or NumPy: a C or HLS testbench reads a file with ``fread``.

Folder ``OUT/bin/``: ``manifest.json`` and one ``.bin`` per array, C order (row-major), no header:
``<kind>/<case>/inputs/<name>.bin``, ``.../outputs/<name>.bin``, ``.../derived/<name>.bin`` (the
packed-word twins of the bit ops) and ``model/weights/<name>.bin``. The manifest is a JSON object:
``format`` (``"refbnn-golden-bin"``), ``format_version`` (1), ``refbnn_version``, ``byte_order``
(``"little"``) and ``files``: one description per kind (:func:`refbnn.golden.manifest.describe`)
whose array entries add ``file`` (relative to the manifest) and ``nbytes``.
"""

from __future__ import annotations

import json
import os

import numpy as np

from refbnn.golden.fileio import VERSION, GoldenError, GoldenFile, check_readable
from refbnn.golden.manifest import describe, parse, word_twins

FORMAT = "refbnn-golden-bin"
MANIFEST = "manifest.json"


def _rel(kind, section, case, role, name):
    if section == "weights":
        return f"{kind}/weights/{name}.bin"
    return f"{kind}/{case}/{role}/{name}.bin"


def _save(folder, rel, value) -> int:
    a = np.ascontiguousarray(value)
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    path = os.path.join(folder, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(a.tobytes(order="C"))
    return a.nbytes


def write(folder, goldens, version: str) -> str:
    """Write the golden files ``goldens`` (a list of :class:`GoldenFile`) into ``folder`` (created,
    expected empty); returns the manifest's path, written last."""
    os.makedirs(folder, exist_ok=True)
    files = []
    for golden in goldens:
        kind = golden.kind

        def locate(section, case, role, name, kind=kind):
            return {"file": _rel(kind, section, case, role, name)}

        twins = {c.name: word_twins(c) for c in golden.cases}
        desc = describe(golden, locate, twins)
        for d, c in zip(desc["cases"], golden.cases):
            derived = {k: v[0] for k, v in twins[c.name].items()}
            for role, values in (("inputs", c.inputs), ("outputs", c.outputs), ("derived", derived)):
                for e in d.get(role, []):
                    e["nbytes"] = _save(folder, e["file"], values[e["name"]])
        for e in desc["weights"]:
            e["nbytes"] = _save(folder, e["file"], golden.arrays[e["name"]])
        files.append(desc)
    manifest = {"format": FORMAT, "format_version": VERSION, "refbnn_version": version,
                "byte_order": "little", "files": files}
    path = os.path.join(folder, MANIFEST)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    return path


def read(path) -> list[GoldenFile]:
    """Read every golden file a ``manifest.json`` describes; raise :class:`GoldenError` naming the
    first problem (a missing file, a size that does not match its dtype and shape, ...)."""
    path = check_readable(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GoldenError(f"{path}: not a readable JSON manifest ({e})") from None
    try:
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise GoldenError(f"not a golden manifest (format is not {FORMAT!r})")
        if manifest.get("format_version") != VERSION:
            raise GoldenError(f"format_version must be {VERSION}, got {manifest.get('format_version')!r}")
        if manifest.get("byte_order") != "little":
            raise GoldenError("byte_order must be 'little'")

        def load(entry, where):
            rel = entry.get("file")
            full = os.path.normpath(os.path.join(folder, str(rel)))
            if not isinstance(rel, str) or not full.startswith(folder + os.sep) or \
                    not os.path.isfile(full):
                raise GoldenError(f"{where}: missing file {rel!r}")
            dtype = np.dtype(entry["dtype"]).newbyteorder("<")
            shape = tuple(int(v) for v in entry["shape"])
            want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if os.path.getsize(full) != want:
                raise GoldenError(f"{where}: {rel} has {os.path.getsize(full)} bytes, "
                                  f"{entry['dtype']} {list(shape)} needs {want}")
            return np.fromfile(full, dtype=dtype).astype(dtype.newbyteorder("="))\
                .reshape(shape)

        files = manifest.get("files")
        if not isinstance(files, list):
            raise GoldenError("'files' must be a list")
        return [parse(d, load) for d in files]
    except GoldenError as e:
        raise GoldenError(f"{path}: {e}") from None
