"""A seeded, bounded fuzzer of refbnn's weight format (docs/format.md).

``python tools/fuzz_format.py --files 10000 --seed 0 --cli-files 100 --json report.json``

Each fuzz file starts from a valid file of a small model (four presets, all three kinds) and is
changed by one recipe:

* byte level: bit flips anywhere, flips inside HDF5 object headers with HDF5's own Jenkins checksum
  recomputed (what a crafted file does), flips inside fractal-heap blocks (link names of big groups,
  no HDF5 checksum), overwritten runs, truncation, appended junk; all but one with the refbnn SHA-256
  re-stamped;
* structure level (h5py edits of a copy, SHA-256 re-stamped): soft / external / hard links and link
  cycles, external storage, virtual datasets, filters and chunking, enum / compound / vlen / string /
  bool / big-endian / opaque types, huge declared shapes, null dataspaces, object-count bombs,
  attributes, committed datatypes, config-schema violations, metadata mutations (JSON text, UTF-8,
  nesting, duplicate keys, huge numbers), non-finite and invalid tensor values, and valid variations.

Every file is loaded by a worker process (``refbnn.fileformat.load``) under a memory limit
(``RLIMIT_AS``) and a time limit per file (a worker that does not answer is killed: a *hang*; one
that dies is a *crash*), and counted by outcome: ``format_error`` / ``accepted`` / ``hang`` /
``exception`` (anything but FormatError) / ``crash``. For up to ``--cli-files`` distinct accepted
files it then runs the command lines a user would (``python -m refbnn.infer FILE a.png b.png
--engine packed``, ``export FILE OUT --packed-only``, ``golden --weights FILE DIR``, ``crosscheck
FILE --against torch``, and for checkpoints ``train --resume FILE --epochs 2``), each under the same
limits, expecting exit status 0 or a one-line exit 2. ``--train-base`` adds a base checkpoint written
by ``python -m refbnn.train`` itself (MNIST from ``$REFBNN_DATA_DIR``), which ``--resume`` continues.
Failures are listed with their recipe (and kept with ``--keep DIR``). Exit status: 0 when there were
no hangs, crashes, exceptions or CLI failures, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import selectors
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout

USERBLOCK = 512
M32 = 0xFFFFFFFF
PRESETS = ("ftbnn18", "birealnet18", "ftbnn18_g2", "ftbnn18_purified")
CLIS = ("infer", "export", "golden", "crosscheck", "train")


# --- checksums ---------------------------------------------------------------------------------

def reseal(data: bytes | bytearray, version: int = 2) -> bytes:
    """Re-stamp the refbnn user block (magic line + SHA-256 of bytes 512..) of ``data``."""
    data = bytes(data)
    head = f"refbnn-hdf5 {version}\nsha256 {hashlib.sha256(data[USERBLOCK:]).hexdigest()}\n"
    return head.encode().ljust(USERBLOCK, b"\0") + data[USERBLOCK:]


def _rot(x, k):
    return ((x << k) | (x >> (32 - k))) & M32


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``, as HDF5's ``H5_checksum_lookup3`` computes metadata
    checksums (tested against the checksums of a real file in tests/test_fuzz_format.py)."""
    n = len(data)
    a = b = c = (0xDEADBEEF + n + initval) & M32
    i = 0
    while n - i > 12:
        a = (a + int.from_bytes(data[i:i + 4], "little")) & M32
        b = (b + int.from_bytes(data[i + 4:i + 8], "little")) & M32
        c = (c + int.from_bytes(data[i + 8:i + 12], "little")) & M32
        a = (a - c) & M32; a ^= _rot(c, 4); c = (c + b) & M32      # noqa: E702 (the mix, as written)
        b = (b - a) & M32; b ^= _rot(a, 6); a = (a + c) & M32      # noqa: E702
        c = (c - b) & M32; c ^= _rot(b, 8); b = (b + a) & M32      # noqa: E702
        a = (a - c) & M32; a ^= _rot(c, 16); c = (c + b) & M32     # noqa: E702
        b = (b - a) & M32; b ^= _rot(a, 19); a = (a + c) & M32     # noqa: E702
        c = (c - b) & M32; c ^= _rot(b, 4); b = (b + a) & M32      # noqa: E702
        i += 12
    tail = data[i:]
    if not tail:
        return c
    t = tail.ljust(12, b"\0")
    a = (a + int.from_bytes(t[0:4], "little")) & M32
    b = (b + int.from_bytes(t[4:8], "little")) & M32
    c = (c + int.from_bytes(t[8:12], "little")) & M32
    c ^= b; c = (c - _rot(b, 14)) & M32                            # noqa: E702 (the final mix)
    a ^= c; a = (a - _rot(c, 11)) & M32                            # noqa: E702
    b ^= a; b = (b - _rot(a, 25)) & M32                            # noqa: E702
    c ^= b; c = (c - _rot(b, 16)) & M32                            # noqa: E702
    a ^= c; a = (a - _rot(c, 4)) & M32                             # noqa: E702
    b ^= a; b = (b - _rot(a, 14)) & M32                            # noqa: E702
    c ^= b; c = (c - _rot(b, 24)) & M32                            # noqa: E702
    return c


def object_header_chunks(data: bytes) -> list[tuple[int, int]]:
    """``(start, end)`` of every version-2 object header chunk ("OHDR" ... checksum) and
    continuation chunk ("OCHK"), ``end`` = offset of its 4-byte checksum."""
    chunks = []
    pos = data.find(b"OHDR")
    while pos >= 0:
        flags = data[pos + 5] if pos + 5 < len(data) else 0
        p = pos + 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
        width = 1 << (flags & 3)
        size = int.from_bytes(data[p:p + width], "little")
        end = p + width + size
        if data[pos + 4] == 2 and end + 4 <= len(data):
            chunks.append((pos, end))
            chunks += _continuations(data, p + width, end, flags)
        pos = data.find(b"OHDR", pos + 4)
    return chunks


def _continuations(data, p, end, flags):
    out = []
    while p + 4 <= end:
        mtype, msize = data[p], int.from_bytes(data[p + 1:p + 3], "little")
        head = 4 + (2 if flags & 0x04 else 0)
        if mtype == 0x10 and msize >= 16:
            addr = int.from_bytes(data[p + head:p + head + 8], "little") + USERBLOCK
            length = int.from_bytes(data[p + head + 8:p + head + 16], "little")
            if data[addr:addr + 4] == b"OCHK" and addr + length <= len(data):
                out.append((addr, addr + length - 4))
        p += head + msize
    return out


def restamp_hdf5(data: bytearray, start: int, end: int) -> None:
    struct.pack_into("<I", data, end, lookup3(bytes(data[start:end])))


# --- base files --------------------------------------------------------------------------------

SPEC = {"shape": [1, 12, 12], "layout": "NCHW", "channel_order": "L", "mean": [0.5], "std": [0.25]}


def make_bases(folder: Path, train: bool = False) -> list[Path]:
    from refbnn import fileformat as ff
    from refbnn import models

    paths = []
    for i, preset in enumerate(PRESETS):
        m = models.build(preset, seed=i, input_shape=[1, 12, 12], num_classes=10,
                         width_multiplier=0.125)
        state, binary = m.state_dict(), m.binary_weights()
        common = dict(config=m.config, binary_weights=binary, input_spec=SPEC,
                      class_names=[f"c{k}" for k in range(10)], dataset="fuzz",
                      metrics={"test_accuracy": 0.5}, provenance={"run": {"seed": i}})
        for kind in ("model", "packed", "checkpoint"):
            path = folder / f"{preset}-{kind}.h5"
            if kind == "checkpoint":
                opt = {f"{k}.exp_avg": np.zeros_like(v) for k, v in state.items() if v.dtype == np.float32}
                ff.save_checkpoint(path, state, optimizer_state=opt,
                                   optimizer_hyperparameters={"type": "Adam", "lr": 0.003},
                                   rng_state={"bit_generator": np.random.default_rng(i).bit_generator.state,
                                              "batches_done": 0},
                                   epoch=1, history=[{"epoch": 1}], **common)
            else:
                ff.save_model(path, state, packed_only=kind == "packed", **common)
            paths.append(path)
    trained = _trained_checkpoint(folder) if train else None
    return paths + ([trained] if trained else [])


def _trained_checkpoint(folder: Path) -> Path | None:
    """A checkpoint written by ``python -m refbnn.train`` itself (one epoch on 64 MNIST images), the
    base that ``train --resume`` can really continue; None without MNIST in $REFBNN_DATA_DIR."""
    data = os.environ.get("REFBNN_DATA_DIR")
    if not data or not (Path(data) / "mnist").is_dir():
        return None
    run = folder / "trainrun"
    r = subprocess.run([sys.executable, "-m", "refbnn.train", "--dataset", "mnist", "--width", "0.125",
                        "--epochs", "1", "--batch-size", "32", "--limit-train", "64", "--limit-test",
                        "32", "--threads", "1", "--out-dir", str(run), "--quiet", "--no-download"],
                       capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if r.returncode != 0:
        raise RuntimeError(f"could not train the checkpoint base: {r.stderr[-500:]}")
    shutil.copyfile(run / "checkpoint.h5", folder / "trained-checkpoint.h5")
    return folder / "trained-checkpoint.h5"


# --- recipes -----------------------------------------------------------------------------------

BAD_VALUES = ["8", "", -1, 0, 1, 2, 3, 7, 64, 1.5, 1e9, 10 ** 9, 10 ** 6, 2 ** 40, 2 ** 64, -(2 ** 63),
              True, False, None, [], {}, [1], [[[[[1]]]]], [8, 16], [8, 16, 32, 64, 128],
              ["8", 16], "x" * 300, "\udc80", "relu", "none", "mean_abs", "cheap", [1, 28, 28],
              [1, 12, 12], [3, 12, 12], [1, 0, 12], 1e-300, -0.0, 0.5]


def _json_edit(rng, meta: dict) -> str:
    """One change of the parsed /meta object; returns a description."""
    choice = rng.integers(9)
    keys = sorted(meta)
    if choice <= 3:                       # a config field gets a random (mostly bad) value
        cfg = meta["config"]
        field = sorted(cfg)[rng.integers(len(cfg))]
        value = BAD_VALUES[rng.integers(len(BAD_VALUES))]
        cfg[field] = value
        return f"config[{field!r}] = {value!r}"[:120]
    if choice == 4:
        key = keys[rng.integers(len(keys))]
        value = BAD_VALUES[rng.integers(len(BAD_VALUES))]
        meta[key] = value
        return f"meta[{key!r}] = {value!r}"[:120]
    if choice == 5:
        key = keys[rng.integers(len(keys))]
        del meta[key]
        return f"del meta[{key!r}]"
    if choice == 6:
        key = sorted(meta["config"])[rng.integers(len(meta["config"]))]
        del meta["config"][key]
        return f"del config[{key!r}]"
    if choice == 7:                       # valid free-form variations: must stay loadable and runnable
        meta["provenance"] = {"note": "ü" * int(rng.integers(1, 50)), "nested": [[{"a": [1]}]],
                              "big": 10 ** 30, "tiny": 1e-300}
        meta["metrics"] = {"x": -0.0, "y": [None, True]}
        return "free-form provenance/metrics"
    entry = sorted(meta["binary"])[rng.integers(len(meta["binary"]))] if meta["binary"] else None
    if entry is None:
        meta["binary"] = {"x": 1}
        return "binary = {x: 1}"
    sub = sorted(meta["binary"][entry])[rng.integers(len(meta["binary"][entry]))]
    meta["binary"][entry][sub] = BAD_VALUES[rng.integers(len(BAD_VALUES))]
    return f"binary[{entry!r}][{sub!r}] changed"


def _meta_text_edit(rng, raw: bytes) -> tuple[bytes, str]:
    choice = rng.integers(8)
    if choice == 0:
        pos = int(rng.integers(len(raw)))
        bad = bytes([int(rng.choice([0x80, 0xFF, 0xC0, 0xED]))])
        return raw[:pos] + bad + raw[pos + 1:], "invalid UTF-8 byte"
    if choice == 1:
        return raw.replace(b'"fuzz"', b'"\\udc80\\ud800"'), "surrogate escapes"
    if choice == 2:
        n = int(rng.choice([63, 65, 700, 100_000]))
        return raw.replace(b'"seed"', b'"deep": ' + b"[" * n + b"]" * n + b', "seed"', 1), f"nesting {n}"
    if choice == 3:
        return b'{"kind": "packed", ' + raw[1:], "duplicate key"
    if choice == 4:
        return raw.replace(b"0.5", b"1e400", 1), "1e400"
    if choice == 5:
        return raw.replace(b"0.5", b"NaN", 1), "NaN"
    if choice == 6:
        return raw.replace(b'"seed": ', b'"seed": ' + b"9" * 5000 + b", \"s2\": ", 1), "5000-digit int"
    return b"\xef\xbb\xbf" + raw, "byte-order mark"


def _replace(f, hpath, make=None, **kw):
    data = f[hpath][()]
    del f[hpath]
    if make is None:
        return f.create_dataset(hpath, **kw)
    return f.create_dataset(hpath, data=make(data), **kw)


def _datasets(f):
    import h5py
    out = []
    f.visititems(lambda name, obj: out.append("/" + name) if isinstance(obj, h5py.Dataset) else None)
    return out


def _groups(f):
    import h5py
    out = []
    f.visititems(lambda name, obj: out.append("/" + name) if isinstance(obj, h5py.Group) else None)
    return out


def structure_edit(rng, f) -> str:
    """One structural change of an open (mode "a") refbnn file; returns a description."""
    import h5py

    dsets = [d for d in _datasets(f) if d != "/meta"]
    groups = [g for g in _groups(f) if g.startswith("/model/")]
    d = dsets[rng.integers(len(dsets))]
    g = groups[rng.integers(len(groups))]
    choice = int(rng.integers(34))
    if choice == 0:
        del f[d]
        f[d] = h5py.SoftLink(dsets[rng.integers(len(dsets))])
        return f"soft link at {d}"
    if choice == 1:
        del f[d]
        f[d] = h5py.ExternalLink(str(rng.choice(["/etc/passwd", "other.h5", f.filename])), "/model")
        return f"external link at {d}"
    if choice == 2:
        other = dsets[rng.integers(len(dsets))]
        del f[d]
        f[d] = f[other]
        return f"hard link {d} -> {other}"
    if choice == 3:
        del f[g]
        f[g] = f["/"]
        return f"group {g} is a hard link to the root (cycle)"
    if choice == 4:
        shape, dtype = f[d].shape, f[d].dtype
        del f[d]
        size = max(1, int(np.prod(shape)) * dtype.itemsize)
        f.create_dataset(d, shape, dtype, external=[("/etc/passwd", 0, size)])
        return f"external storage at {d}"
    if choice == 5:
        shape, dtype = f[d].shape, f[d].dtype
        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        layout[...] = h5py.VirtualSource(f.filename, dsets[0], shape=shape)
        del f[d]
        f.create_virtual_dataset(d, layout)
        return f"virtual dataset at {d}"
    if choice == 6:
        if not f[d].shape:
            return "no-op (scalar)"
        filt = [dict(compression="gzip"), dict(compression="lzf"), dict(shuffle=True),
                dict(fletcher32=True), dict(scaleoffset=4 if f[d].dtype.kind in "iu" else None,
                                           chunks=True)][rng.integers(5)]
        filt = {k: v for k, v in filt.items() if v is not None} or dict(compression="gzip")
        _replace(f, d, lambda x: x, **filt)
        return f"filters {sorted(filt)} at {d}"
    if choice == 7:
        if not f[d].shape:
            return "no-op (scalar)"
        _replace(f, d, lambda x: x, chunks=True)
        return f"chunked {d}"
    if choice == 8:
        base = f[d].dtype if f[d].dtype.kind in "iu" else np.dtype("i8")
        _replace(f, d, lambda x: x.astype(base), dtype=h5py.enum_dtype({"a": 0, "b": 1}, basetype=base))
        return f"enum at {d}"
    if choice == 9:
        _replace(f, d, lambda x: np.zeros(x.shape, "f4,f4"))
        return f"compound at {d}"
    if choice == 10:
        shape = f[d].shape
        del f[d]
        f.create_dataset(d, shape, dtype=h5py.string_dtype())
        return f"vlen string at {d}"
    if choice == 11:
        _replace(f, d, lambda x: np.zeros(x.shape, "S4"))
        return f"fixed string at {d}"
    if choice == 12:
        _replace(f, d, lambda x: x != 0)
        return f"bool at {d}"
    if choice == 13:
        _replace(f, d, lambda x: x.astype(x.dtype.newbyteorder(">")))
        return f"big-endian {d}"
    if choice == 14:
        _replace(f, d, lambda x: np.zeros(x.shape, "V4"))
        return f"opaque at {d}"
    if choice == 15:
        _replace(f, d, lambda x: x.astype(np.float16 if x.dtype.kind == "f" else np.int32))
        return f"narrower type at {d}"
    if choice == 16:
        n = int(rng.choice([2 ** 20, 2 ** 31, 2 ** 40, 2 ** 62 // 8]))
        dtype = f[d].dtype
        del f[d]
        f.create_dataset(d, (n,), dtype)
        return f"declared shape ({n},) at {d}"
    if choice == 17:
        del f[d]
        f.create_dataset(d, data=h5py.Empty("f4"))
        return f"null dataspace at {d}"
    if choice == 18:
        n = int(rng.choice([100, 20_000]))
        for i in range(n):
            f["model"].create_group(f"bomb{i}")
        return f"{n} extra groups in /model"
    if choice == 19:
        n = int(rng.choice([10, 5_000]))
        for i in range(n):
            f[g].create_dataset(f"x{i}", data=np.zeros(1, np.float32))
        return f"{n} extra datasets in {g}"
    if choice == 20:
        n = int(rng.choice([1, 20, 2_000]))
        for i in range(n):
            f.attrs[f"a{i}"] = "v" * 10
        return f"{n} root attributes"
    if choice == 21:
        f[d].attrs["note"] = np.bytes_(b"\xff\xfe")
        return f"attribute on {d}"
    if choice == 22:
        f["model/type"] = np.dtype("f4")
        return "committed datatype in /model"
    if choice == 23:
        f[g].create_group("sub")
        return f"sub-group in {g}"
    if choice == 24:
        del f[d]
        return f"deleted {d}"
    if choice == 25:
        f[g].id.set_comment(b".", b"a comment")
        return f"comment on {g}"
    if choice == 26:
        _replace(f, d, lambda x: x[..., :-1] if x.ndim and x.shape[-1] > 1 else np.zeros(3, x.dtype))
        return f"shape changed at {d}"
    # values
    if choice in (27, 28, 29):
        data = f[d][()]
        if data.size == 0:
            return "no-op (empty)"
        data = np.array(data, copy=True)
        flat = data.reshape(-1)
        i = int(rng.integers(flat.size))
        if data.dtype.kind == "f":
            flat[i] = [np.nan, np.inf, -np.inf, -1.0, 3e38, -0.0][int(rng.integers(6))]
        else:
            flat[i] = [np.iinfo(data.dtype).max, np.iinfo(data.dtype).min, 0, 1][int(rng.integers(4))]
        _replace(f, d, lambda x: data)
        return f"value {flat[i]!r} at {d}[{i}]"
    if choice == 30:
        packed = [x for x in dsets if x.endswith("_packed")]
        if not packed:
            return "no-op (no packed weights)"
        p = packed[rng.integers(len(packed))]
        _replace(f, p, lambda x: rng.integers(0, 2 ** 63, size=x.shape, dtype=np.uint64))
        return f"random words at {p}"
    if choice == 31:
        n = int(rng.choice([10, 5_000]))
        target = f["optimizer"] if "optimizer" in f else f["model"]
        for i in range(n):
            target.create_dataset(f"extra{i}", data=np.zeros(1, np.float32))
        return f"{n} datasets in {target.name}"
    if choice == 32:
        del f["meta"]
        f.create_dataset("meta", (int(rng.choice([0, 2 ** 25, 2 ** 40])),), np.uint8)
        return "meta declared huge / empty"
    _replace(f, "/meta", lambda x: x.astype(np.int8))
    return "meta as int8"


def make_fuzz_file(rng, base: Path, out: Path) -> str:
    """Write one fuzz file derived from ``base`` to ``out``; return its recipe."""
    import h5py

    data = bytearray(base.read_bytes())
    kind = int(rng.integers(100))
    if kind < 12:                                            # flips anywhere, SHA-256 re-stamped
        for _ in range(int(rng.integers(1, 9))):
            pos = int(rng.integers(USERBLOCK, len(data)))
            data[pos] ^= 1 << int(rng.integers(8))
        out.write_bytes(reseal(data))
        return "byte flips (sha256 re-stamped)"
    if kind < 14:                                            # flips without re-stamping
        pos = int(rng.integers(len(data)))
        data[pos] ^= 1 << int(rng.integers(8))
        out.write_bytes(bytes(data))
        return "byte flip (no re-stamp)"
    if kind < 30:                                            # inside an object header, HDF5 checksum too
        chunks = object_header_chunks(bytes(data))
        start, end = chunks[int(rng.integers(len(chunks)))]
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(start + 4, end))
            flip = data[pos] ^ (1 << int(rng.integers(8)))
            data[pos] = int(rng.integers(256)) if rng.random() < 0.5 else flip
        restamp_hdf5(data, start, end)
        out.write_bytes(reseal(data))
        return "object header bytes (HDF5 checksum and sha256 re-stamped)"
    if kind < 36:                                            # fractal heap direct blocks: no HDF5 checksum
        spots = [i for i in range(len(data)) if data[i:i + 4] == b"FHDB"] or [USERBLOCK]
        start = spots[int(rng.integers(len(spots)))]
        for _ in range(int(rng.integers(1, 5))):
            pos = min(len(data) - 1, start + 4 + int(rng.integers(400)))
            data[pos] = int(rng.integers(256))
        out.write_bytes(reseal(data))
        return "fractal heap block bytes (sha256 re-stamped)"
    if kind < 40:
        pos = int(rng.integers(USERBLOCK, len(data)))
        n = int(rng.integers(1, 64))
        data[pos:pos + n] = bytes([int(rng.choice([0, 255]))]) * len(data[pos:pos + n])
        out.write_bytes(reseal(data))
        return "overwritten run (sha256 re-stamped)"
    if kind < 44:
        cut = int(rng.integers(USERBLOCK, len(data)))
        out.write_bytes(reseal(data[:cut]) if rng.random() < 0.8 else bytes(data[:cut]))
        return "truncated"
    if kind < 46:
        out.write_bytes(reseal(data + rng.bytes(int(rng.integers(1, 5000)))))
        return "appended junk (sha256 re-stamped)"
    shutil.copyfile(base, out)
    with h5py.File(out, "a") as f:
        if kind < 70:
            meta = json.loads(f["meta"][()].tobytes().decode("utf-8"))
            what = _json_edit(rng, meta)
            raw = json.dumps(meta).encode("utf-8", "surrogatepass")
            if kind >= 64:
                raw, what = _meta_text_edit(rng, raw)
            del f["meta"]
            f["meta"] = np.frombuffer(raw, np.uint8)
            recipe = "meta: " + what
        else:
            recipe = "structure: " + structure_edit(rng, f)
    out.write_bytes(reseal(out.read_bytes()))
    return recipe


# --- the worker: loads files under limits --------------------------------------------------------

def limit_resources(memory_mb: int):
    def apply():
        limit = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def worker_main() -> int:
    from refbnn import fileformat as ff

    for line in sys.stdin:
        path = line.strip()
        try:
            f = ff.load(path)
            reply = {"outcome": "accepted", "kind": f.kind}
        except ff.FormatError as e:
            reply = {"outcome": "format_error", "hdf5_path": e.hdf5_path, "problem": e.problem[:200]}
        except BaseException as e:  # the point is to see everything
            reply = {"outcome": "exception", "error": f"{type(e).__name__}: {e}"[:300],
                     "traceback": traceback.format_exc()[-3000:]}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


class Worker:
    """One loader process; ``load(path)`` returns its reply, or ``hang`` / ``crash``."""

    def __init__(self, memory_mb: int, timeout_s: float):
        self.memory_mb, self.timeout_s = memory_mb, timeout_s
        self.proc = None

    def _start(self):
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     preexec_fn=limit_resources(self.memory_mb),
                                     env=dict(os.environ, PYTHONPATH=str(REPO)))
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.fresh = True                  # its first answer includes importing refbnn

    def load(self, path: Path) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        t = time.perf_counter()
        try:
            self.proc.stdin.write(f"{path}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        deadline = self.timeout_s + (60 if self.fresh else 0)
        self.fresh = False
        if not self.sel.select(timeout=deadline):
            self.stop()
            return {"outcome": "hang", "seconds": round(time.perf_counter() - t, 1)}
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            self.proc = None
            return {"outcome": "crash", "returncode": rc}
        reply = json.loads(line)
        reply["seconds"] = round(time.perf_counter() - t, 3)
        return reply

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


# --- the command lines ----------------------------------------------------------------------------

def cli_commands(path: Path, work: Path, images: list[Path]) -> dict[str, list[str]]:
    return {
        "infer": ["-m", "refbnn.infer", str(path), *map(str, images), "--engine", "packed",
                  "--threads", "1"],
        "export": ["-m", "refbnn.export", str(path), str(work / "exported.h5"), "--packed-only"],
        "golden": ["-m", "refbnn.golden", "--weights", str(path), str(work / "golden")],
        "crosscheck": ["-m", "refbnn.crosscheck", str(path), "--against", "torch"],
        "train": ["-m", "refbnn.train", "--resume", str(path), "--epochs", "2", "--out-dir",
                  str(work / "run"), "--quiet", "--threads", "1"],
    }


def run_cli(args, memory_mb, timeout_s) -> dict:
    try:
        r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout_s,
                           preexec_fn=limit_resources(memory_mb), cwd=REPO,
                           env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired:
        return {"outcome": "cli_hang"}
    err = r.stderr.strip()
    if r.returncode == 0:
        return {"outcome": "ok"}
    lines = err.splitlines()
    # one "error:" line, after progress lines only (train prints its start and epoch lines first)
    one_line = ("Traceback" not in err and bool(lines) and lines[-1].startswith("error: ")
                and not any(line.startswith("error: ") for line in lines[:-1])
                and (len(lines) == 1 or args[1] == "refbnn.train"))
    if r.returncode == 2 and one_line:
        return {"outcome": "one_line", "message": lines[-1][:200]}
    if r.returncode == 3 and one_line and args[1] == "refbnn.train":
        # a finite but absurd tensor (3e38 in Adam's state) makes training diverge: the documented
        # numerical-fault stop (exit 3, the last good checkpoint kept), not a failure of the CLI
        return {"outcome": "numerical_fault", "message": lines[-1][:200]}
    if (r.returncode == 1 and args[1] == "refbnn.crosscheck" and not err
            and "beyond tolerance" in r.stdout):
        # a verdict: the file's (damaged but finite) values make the two runs disagree
        return {"outcome": "disagrees", "message": r.stdout.strip().splitlines()[-1][:200]}
    return {"outcome": "cli_failure", "returncode": r.returncode, "stderr": err[-3000:]}


def write_images(folder: Path) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i, size in enumerate(((12, 12), (40, 30))):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, size=size[::-1], dtype=np.uint8), "L").save(p)
        out.append(p)
    return out


# --- the driver --------------------------------------------------------------------------------------

def fuzz(files: int, seed: int, work: Path, *, cli_files: int = 0, clis=CLIS, memory_mb: int = 3072,
         timeout_s: float = 10.0, cli_timeout_s: float = 180.0, keep: Path | None = None,
         progress=None, train_base: bool = False, only_base: str | None = None) -> dict:
    """Run the fuzzer; return the report (counts by outcome and recipe, failures with recipes)."""
    work.mkdir(parents=True, exist_ok=True)
    bases = [b for b in make_bases(work, train_base) if not only_base or only_base in b.name]
    images = write_images(work)
    worker = Worker(memory_mb, timeout_s)
    counts, by_recipe = Counter(), defaultdict(Counter)
    root_paths, root_problems, failures, accepted = Counter(), Counter(), [], []
    seen = set()
    t0 = time.perf_counter()
    try:
        for i in range(files):
            rng = np.random.default_rng([seed, i])
            base = bases[int(rng.integers(len(bases)))]
            path = work / f"fuzz-{i}.h5"
            recipe = make_fuzz_file(rng, base, path)
            family = recipe.split(":")[0] if ":" in recipe else recipe
            reply = worker.load(path)
            outcome = reply["outcome"]
            counts[outcome] += 1
            by_recipe[family][outcome] += 1
            if outcome == "format_error":
                root_paths["/" if reply["hdf5_path"] == "/" else "object"] += 1
                if reply["hdf5_path"] == "/":
                    root_problems[f"{family} | {reply['problem'][:70]}"] += 1
            record = {"index": i, "seed": seed, "base": base.name, "recipe": recipe, **reply}
            if outcome in ("hang", "crash", "exception"):
                failures.append(record)
                if keep:
                    keep.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, keep / path.name)
            elif outcome == "accepted":
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                if digest not in seen and len(accepted) < cli_files:
                    seen.add(digest)
                    keep_path = work / f"accepted-{i}.h5"
                    shutil.copyfile(path, keep_path)
                    accepted.append((keep_path, record))
            path.unlink()
            if progress and (i + 1) % progress == 0:
                print(f"{i + 1} files, {time.perf_counter() - t0:.0f} s: {dict(counts)}", file=sys.stderr)
    finally:
        worker.stop()
    cli_counts, cli_failures = Counter(), []
    for path, record in accepted:
        for name in clis:
            if name == "train" and record.get("kind") != "checkpoint":
                continue                  # only checkpoints resume (others: one line, tested elsewhere)
            out = work / "cli"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            res = run_cli(cli_commands(path, out, images)[name], memory_mb + 2048, cli_timeout_s)
            cli_counts[f"{name}:{res['outcome']}"] += 1
            if res["outcome"] in ("cli_failure", "cli_hang"):
                cli_failures.append({"cli": name, "file_recipe": record["recipe"], "index": record["index"],
                                     "base": record["base"], **res})
                if keep:
                    keep.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, keep / path.name)
        path.unlink()
    return {"files": files, "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
            "outcomes": dict(counts), "by_recipe": {k: dict(v) for k, v in sorted(by_recipe.items())},
            "format_error_paths": dict(root_paths), "root_problems": dict(root_problems.most_common()),
            "failures": failures,
            "cli_files": len(accepted), "cli_outcomes": dict(sorted(cli_counts.items())),
            "cli_failures": cli_failures, "memory_mb": memory_mb, "timeout_s": timeout_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cli-files", type=int, default=0, help="accepted files to run the CLIs on")
    p.add_argument("--clis", default=",".join(CLIS), help=f"comma-separated subset of {','.join(CLIS)}")
    p.add_argument("--memory-mb", type=int, default=3072, help="RLIMIT_AS of the loader (MiB)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per file before 'hang'")
    p.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    p.add_argument("--keep", type=Path, help="copy failing files here")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--train-base", action="store_true",
                   help="add a checkpoint written by refbnn.train (needs MNIST in $REFBNN_DATA_DIR)")
    p.add_argument("--only-base", help="fuzz only the base files whose name contains this")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main()
    clis = tuple(c for c in args.clis.split(",") if c)
    with tempfile.TemporaryDirectory(prefix="fuzz-format-") as tmp:
        report = fuzz(args.files, args.seed, args.work or Path(tmp), cli_files=args.cli_files, clis=clis,
                      memory_mb=args.memory_mb, timeout_s=args.timeout, keep=args.keep,
                      progress=max(1, args.files // 20), train_base=args.train_base,
                      only_base=args.only_base)
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text)
    print(json.dumps({k: report[k] for k in ("files", "seconds", "outcomes", "format_error_paths",
                                              "cli_files", "cli_outcomes")}, indent=1))
    for fail in report["failures"][:20] + report["cli_failures"][:20]:
        print(json.dumps(fail)[:1500])
    bad = sum(report["outcomes"].get(k, 0) for k in ("hang", "crash", "exception"))
    return 1 if bad or report["cli_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
