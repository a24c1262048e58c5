"""Golden vectors: language-neutral HDF5 test cases for other BNN implementations.

``docs/golden.md`` is the specification. :func:`generate` writes ``ops.h5`` (bit ops, expected
values from the oracle :mod:`refbnn.reference`), ``layers.h5`` (training layers forward and
backward) and ``model.h5`` (a model's per-layer outputs and one training step); :func:`check`
recomputes a file's cases with refbnn's fast paths and lists every mismatch.
"""

from __future__ import annotations

import os

import numpy as np

from refbnn.goldenlib import layers, model, ops
from refbnn.goldenlib.fileio import Case, GoldenError, GoldenFile, read, write

__all__ = ["Case", "GoldenError", "GoldenFile", "Mismatch", "check", "compare", "generate",
           "read", "recompute", "write"]

FILES = ("ops.h5", "layers.h5", "model.h5")


def generate(out_dir, net, seed: int = 0, batch: int = 4, version: str = "") -> list[str]:
    """Write the three golden files for model ``net`` (a built ``BNNResNet``) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    files = {
        "ops.h5": GoldenFile("ops", seed, {}, ops.op_cases(seed)),
        "layers.h5": GoldenFile("layers", seed, {}, layers.layer_cases(seed)),
        "model.h5": GoldenFile("model", seed, {"config": net.config, "batch": batch},
                               model.model_cases(net, seed, batch), dict(net.state_dict())),
    }
    paths = []
    for name, golden in files.items():
        path = os.path.join(out_dir, name)
        write(path, golden, version)
        paths.append(path)
    return paths


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
    golden = read(path)
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
