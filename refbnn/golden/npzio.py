"""Golden files as NumPy ``.npz`` archives (``docs/golden.md`` section 9): the same cases as the
HDF5 form, readable with ``numpy.load`` alone (``allow_pickle=False``).

Array ``manifest`` is the UTF-8 bytes (``uint8``) of a JSON object: ``format``
(``"refbnn-golden-npz"``), ``format_version`` (1), ``refbnn_version`` and the file's description
(:func:`refbnn.golden.manifest.describe`), each array entry naming its ``key`` in the archive:
``cases/<case>/inputs/<name>``, ``cases/<case>/outputs/<name>``, ``weights/<name>``.
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np

from refbnn.atomicio import write_bytes_atomic
from refbnn.golden.fileio import VERSION, GoldenError, GoldenFile, check_readable
from refbnn.golden.manifest import describe, parse

FORMAT = "refbnn-golden-npz"


def _key(section, case, role, name):
    return {"key": f"weights/{name}" if section == "weights" else f"cases/{case}/{role}/{name}"}


def write(path, golden: GoldenFile, version: str) -> None:
    """Write ``golden`` to ``path`` atomically (:func:`refbnn.atomicio.write_bytes_atomic`)."""
    path = os.fspath(path)
    desc = {"format": FORMAT, "format_version": VERSION, "refbnn_version": version,
            **describe(golden, _key)}
    arrays = {"manifest": np.frombuffer(json.dumps(desc, sort_keys=True).encode(), np.uint8)}
    for c in golden.cases:
        for role, group in (("inputs", c.inputs), ("outputs", c.outputs)):
            for k, v in group.items():
                a = np.asarray(v)
                arrays[_key("cases", c.name, role, k)["key"]] = a.astype(a.dtype.newbyteorder("<"))
    for k, v in golden.arrays.items():
        a = np.asarray(v)
        arrays[f"weights/{k}"] = a.astype(a.dtype.newbyteorder("<"))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getbuffer())


def read(path) -> GoldenFile:
    """Read a ``.npz`` golden file; raise :class:`GoldenError` naming the first problem."""
    path = check_readable(path)
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise GoldenError(f"{path}: not a readable .npz file ({e})") from None
    with z:
        try:
            if "manifest" not in z.files:
                raise GoldenError("no 'manifest' array")
            try:
                desc = json.loads(bytes(z["manifest"]).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise GoldenError(f"'manifest' is not UTF-8 JSON ({e})") from None
            if not isinstance(desc, dict) or desc.get("format") != FORMAT:
                raise GoldenError(f"not a golden file (format is not {FORMAT!r})")
            if desc.get("format_version") != VERSION:
                raise GoldenError(f"format_version must be {VERSION}, got {desc.get('format_version')!r}")

            def load(entry, where):
                key = entry.get("key")
                if not isinstance(key, str) or key not in z.files:
                    raise GoldenError(f"{where}: missing array {key!r}")
                return z[key]

            return parse(desc, load)
        except GoldenError as e:
            raise GoldenError(f"{path}: {e}") from None
