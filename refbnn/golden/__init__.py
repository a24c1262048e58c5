"""Golden vectors: language-neutral test cases for other BNN implementations.

``docs/golden.md`` is the specification. :func:`generate` writes the cases of ``ops`` (bit ops,
expected values from the oracle :mod:`refbnn.reference`), ``layers`` (training layers forward and
backward) and ``model`` (a model's per-layer outputs and one training step) in one of four forms:
HDF5 (``ops.h5``, ...), NumPy ``.npz``, raw ``.bin`` files with a JSON manifest (``bin/``) or C
headers (``c/``); :func:`check` recomputes a file's cases with refbnn's fast paths and lists every
mismatch (HDF5, ``.npz`` and ``bin/manifest.json``).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from refbnn.golden import binio, cheader, layers, model, npzio, ops, stacks
from refbnn.golden.fileio import Case, GoldenError, GoldenFile, read, write

__all__ = ["Case", "GoldenError", "GoldenFile", "Mismatch", "check", "compare", "generate",
           "read", "read_any", "recompute", "write"]

FILES = ("ops.h5", "layers.h5", "model.h5")
FORMATS = ("hdf5", "npz", "bin", "c")
DEFAULT_MAX_BYTES = 16 * 2**20  # raw bytes of the model file's arrays (16 MiB)


def nbytes(golden: GoldenFile) -> int:
    """Raw bytes of every array of ``golden`` (inputs, outputs, weights)."""
    total = sum(np.asarray(v).nbytes for v in golden.arrays.values())
    for c in golden.cases:
        total += sum(np.asarray(v).nbytes for v in (*c.inputs.values(), *c.outputs.values()))
    return total


def build(net, seed: int = 0, batch: int = 4, max_bytes: int | None = DEFAULT_MAX_BYTES) -> list:
    """The three :class:`GoldenFile` objects (``ops``, ``layers``, ``model``), stacks annotated.

    Raises ``ValueError`` when the model file's arrays exceed ``max_bytes`` (``None``: no cap)."""
    files = [GoldenFile("ops", seed, {}, ops.op_cases(seed)),
             GoldenFile("layers", seed, {}, layers.layer_cases(seed)),
             GoldenFile("model", seed, {"config": net.config, "batch": batch},
                        model.model_cases(net, seed, batch), dict(net.state_dict()))]
    for g in files:
        stacks.annotate(g.kind, g.cases, g.meta)
    size = nbytes(files[2])
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"the model cases hold {size} bytes of arrays, over --max-bytes {max_bytes}; "
                         "use a smaller --input-shape, --batch or --width, or raise --max-bytes")
    return files


def _replace_folder(out_dir, name, fill, marker) -> str:
    """Write a folder ``out_dir/name`` through ``fill(tmp_folder)`` in a temporary sibling, then swap
    it in; an existing ``name`` is replaced only if it holds ``marker`` (a golden folder)."""
    dest = os.path.join(out_dir, name)
    if os.path.exists(dest) and not os.path.isfile(os.path.join(dest, marker)):
        raise ValueError(f"{dest} exists and is not a golden folder (no {marker}); "
                         "remove it or choose another OUT_DIR")
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir)
    old = None
    try:
        fill(tmp)
        if os.path.exists(dest):
            old = tempfile.mkdtemp(prefix=f".{name}.old.", dir=out_dir)
            os.replace(dest, os.path.join(old, name))
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old:
            shutil.rmtree(old, ignore_errors=True)
    return dest


def generate(out_dir, net, seed: int = 0, batch: int = 4, version: str = "", fmt: str = "hdf5",
             max_bytes: int | None = DEFAULT_MAX_BYTES) -> list[str]:
    """Write the golden files for model ``net`` (a built ``BNNResNet``) into ``out_dir`` in form
    ``fmt`` (``FORMATS``); returns the paths written. Nothing is written when the model cases
    exceed ``max_bytes``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown golden format {fmt!r}; one of {', '.join(FORMATS)}")
    files = build(net, seed, batch, max_bytes)
    os.makedirs(out_dir, exist_ok=True)
    if fmt == "bin":
        dest = _replace_folder(out_dir, "bin", lambda d: binio.write(d, files, version), binio.MANIFEST)
        return [os.path.join(dest, binio.MANIFEST)]
    if fmt == "c":
        dest = _replace_folder(out_dir, "c", lambda d: cheader.write(d, files, version),
                               cheader.CHECKER)
        return [os.path.join(dest, f"{g.kind}.h") for g in files] + [os.path.join(dest, cheader.CHECKER)]
    writer, ext = (write, ".h5") if fmt == "hdf5" else (npzio.write, ".npz")
    paths = []
    for golden in files:
        path = os.path.join(out_dir, golden.kind + ext)
        writer(path, golden, version)
        paths.append(path)
    return paths


def read_any(path) -> list[GoldenFile]:
    """The golden files at ``path``: an HDF5 file, a ``.npz`` file or a ``bin/manifest.json``."""
    p = os.fspath(path)
    if p.endswith(".npz"):
        return [npzio.read(p)]
    if p.endswith(".json"):
        return binio.read(p)
    return [read(p)]


def recompute(golden: GoldenFile, case: Case, impl: str | None = None) -> dict:
    """A case's outputs recomputed by refbnn's fast paths (kernels for the bit ops, the layers);
    ``impl`` selects the convolution kernel path (``"portable"``, ``"fast"``, ``None``: auto)."""
    try:
        if golden.kind == "ops":
            fn = ops.FAST.get(case.op)
            if fn is None:
                raise GoldenError(f"case {case.name}: unknown bit op {case.op!r}")
            return fn(case.params, case.inputs, impl)
        if golden.kind == "layers":
            if case.op != "cross_entropy" and case.op not in layers.LAYERS:
                raise GoldenError(f"case {case.name}: unknown layer {case.op!r}")
            return layers.run_layer(case.op, case.params, case.inputs)
        if case.op not in ("model_eval", "model_train_step"):
            raise GoldenError(f"case {case.name}: unknown model op {case.op!r}")
        return model.run_model(golden.meta["config"], golden.arrays, case.op, case.params,
                               case.inputs)
    except GoldenError:
        raise
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise GoldenError(f"case {case.name}: cannot run it ({type(e).__name__}: {e})") from None


class Mismatch(str):
    """One line naming a case, an output and how it differs."""


def compare(expected, actual, rtol: float = 0.0, atol: float = 0.0) -> str | None:
    """``None`` if ``actual`` matches ``expected`` (same shape, ``max |a - e| <= atol + rtol *
    max |e|``, NaN nowhere), else a short description of the difference."""
    e, a = np.asarray(expected), np.asarray(actual)
    if e.shape != a.shape:
        return f"shape {a.shape}, expected {e.shape}"
    if e.size == 0:
        return None
    if e.dtype.kind in "iu" and a.dtype.kind in "iu":  # integers and words: exact, no rounding
        bad = e != a
        summary = ""
    else:
        diff = np.abs(e.astype(np.float64) - a.astype(np.float64))
        diff = np.where(np.isnan(diff), np.inf, diff)
        allowed = atol + rtol * float(np.abs(e.astype(np.float64)).max())
        bad = diff > allowed
        summary = f", max |diff| {float(diff.max()):.6g} (allowed {allowed:.3g})"
    if not bad.any():
        return None
    first = np.unravel_index(int(np.argmax(bad)), e.shape)
    return (f"{int(bad.sum())} of {e.size} values differ{summary}; first at "
            f"{tuple(int(i) for i in first)}: expected {e[first]!r}, got {a[first]!r}")


def check(path) -> list[Mismatch]:
    """Every mismatch between a golden file and refbnn's recomputation (empty: all agree); the
    binary convolutions are recomputed with both kernel paths.

    Raises :class:`GoldenError` if the file cannot be read or a case cannot be run."""
    mismatches = []
    for golden in read_any(path):
        mismatches += check_file(golden)
    return mismatches


def check_file(golden: GoldenFile) -> list[Mismatch]:
    """Every mismatch between one golden file's cases and refbnn's recomputation."""
    mismatches = []
    for case in golden.cases:
        both = golden.kind == "ops" and case.op in ops.KERNEL_OPS
        for impl in ("portable", "fast") if both else (None,):
            got = recompute(golden, case, impl)
            where = f" [{impl} kernels]" if impl else ""
            for key, expected in case.outputs.items():
                if key not in got:
                    mismatches.append(Mismatch(f"{case.name}/{key}: not produced by refbnn{where}"))
                    continue
                rtol, atol = case.tolerance.get(key, (0.0, 0.0))
                problem = compare(expected, got[key], rtol, atol)
                if problem:
                    mismatches.append(Mismatch(f"{case.name}/{key}: {problem}{where}"))
    return mismatches
