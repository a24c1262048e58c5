"""The JSON description of a golden file shared by the ``.npz`` and ``.bin`` forms
(``docs/golden.md`` sections 9 and 10), and the packed-word twins the ``.bin`` and C forms add.

``describe(golden, locate)`` gives one JSON object per golden file: ``kind``, ``seed``, ``meta``,
``weights`` (array entries) and ``cases``, each case with ``name``, ``op``, ``params``, ``stacks``,
``inputs`` and ``outputs`` (array entries; outputs add ``rtol``, ``atol``). An array entry is
``{"name", "dtype", "shape"}`` plus where the bytes are (``locate``'s keys). :func:`parse` inverts
it given a loader of those bytes.
"""

from __future__ import annotations

import numpy as np

from refbnn import reference
from refbnn.golden.fileio import DTYPES, KINDS, Case, GoldenError, GoldenFile


def array_entry(name, value) -> dict:
    a = np.asarray(value)
    if a.dtype.name not in DTYPES:
        raise ValueError(f"golden array {name!r} has unsupported dtype {a.dtype}")
    return {"name": name, "dtype": a.dtype.name, "shape": list(a.shape)}


def describe(golden: GoldenFile, locate, twins: dict | None = None) -> dict:
    """JSON description of ``golden``; ``locate(section, case, role, name)`` returns the dict of
    location keys (``{"file": ...}`` or ``{"key": ...}``) merged into each array entry. With
    ``twins`` (``{case name: word_twins(case)}``), each bit-op case also lists its packed-word
    twins as ``derived`` and its geometry as ``resolved`` (:func:`resolved_params`)."""
    def entry(section, case, role, name, value, extra=None):
        e = array_entry(name, value)
        e.update(locate(section, case, role, name))
        e.update(extra or {})
        return e

    cases = []
    for c in golden.cases:
        d = {"name": c.name, "op": c.op, "params": c.params, "stacks": list(c.stacks),
             "inputs": [entry("cases", c.name, "inputs", k, v) for k, v in c.inputs.items()],
             "outputs": []}
        for k, v in c.outputs.items():
            rtol, atol = c.tolerance.get(k, (0.0, 0.0))
            d["outputs"].append(entry("cases", c.name, "outputs", k, v,
                                      {"rtol": float(rtol), "atol": float(atol)}))
        if twins is not None and golden.kind == "ops":
            d["derived"] = [entry("cases", c.name, "derived", k, v, {"from": src, "layout": layout})
                            for k, (v, src, layout) in twins[c.name].items()]
            d["resolved"] = resolved_params(c)
        cases.append(d)
    return {"kind": golden.kind, "seed": golden.seed, "meta": golden.meta,
            "weights": [entry("weights", None, None, k, v) for k, v in golden.arrays.items()],
            "cases": cases}


def _get(d, key, kind, where):
    if not isinstance(d, dict) or key not in d:
        raise GoldenError(f"{where}: missing {key!r}")
    v = d[key]
    if kind is not None and not isinstance(v, kind):
        raise GoldenError(f"{where}: {key!r} must be a {kind.__name__}")
    return v


def parse(d: dict, load) -> GoldenFile:
    """Rebuild a :class:`GoldenFile` from :func:`describe`'s object; ``load(entry, where)`` returns
    the array of one entry (checked here against its ``dtype`` and ``shape``)."""
    def arrays(entries, where):
        out = {}
        for i, e in enumerate(entries):
            w = f"{where}[{i}]"
            name, dtype = _get(e, "name", str, w), _get(e, "dtype", str, w)
            shape = _get(e, "shape", list, w)
            if dtype not in DTYPES:
                raise GoldenError(f"{w}: unsupported dtype {dtype!r}")
            a = load(e, f"{where}/{name}")
            if a.dtype.name != dtype or list(a.shape) != shape:
                raise GoldenError(f"{where}/{name}: holds {a.dtype.name} {list(a.shape)}, "
                                  f"the description says {dtype} {shape}")
            out[name] = a
        return out

    kind = _get(d, "kind", str, "file")
    if kind not in KINDS:
        raise GoldenError(f"kind must be one of {KINDS}, got {kind!r}")
    seed = _get(d, "seed", int, kind)
    meta = _get(d, "meta", dict, kind)
    cases = []
    for i, c in enumerate(_get(d, "cases", list, kind)):
        where = f"{kind} case {i}"
        name = _get(c, "name", str, where)
        where = f"{kind}/{name}"
        outs = _get(c, "outputs", list, where)
        outputs = arrays(outs, where + "/outputs")
        tol = {e["name"]: (float(e.get("rtol", 0.0)), float(e.get("atol", 0.0))) for e in outs}
        cases.append(Case(name, _get(c, "op", str, where), _get(c, "params", dict, where),
                          arrays(_get(c, "inputs", list, where), where + "/inputs"), outputs, tol,
                          list(c.get("stacks", []))))
    weights = arrays(d.get("weights", []), kind + "/weights")
    return GoldenFile(kind, seed, meta, cases, weights)


# --- packed-word twins and resolved geometry (the .bin and C forms; not in .h5 / .npz) ---------

def _pack(x, word_bits, saz):
    return reference.pack(x, word_bits, saz)


def word_twins(case: Case) -> dict:
    """Packed inputs (and 32-bit twins of 64-bit outputs) a bit-level implementation reads:
    ``{name: (array, source name, layout)}``. Images pack per group, ``(N, H, W, G, words)``;
    kernels OHWI ``(O, KH, KW, words)``; matrices per row; bit 1 = -1, value ``c`` in word
    ``c // W`` bit ``c % W``. Names: ``<source>.words64`` (uint64), ``<source>.words32`` (uint32)."""
    p, i, out = case.params, case.inputs, {}
    saz = p.get("sign_at_zero")
    if case.op in ("bconv2d", "bconv2d_output"):
        x, k = i["x"], i["kernel"]
        n, h, w, c = x.shape
        g = int(p["groups"])
        for wb in (64, 32):
            out[f"x.words{wb}"] = (_pack(x.reshape(n, h, w, g, c // g), wb, saz), "x",
                                   f"N,H,W,G,ceil(Cg/{wb})")
            out[f"kernel.words{wb}"] = (_pack(k.transpose(3, 0, 1, 2), wb, saz), "kernel",
                                        f"O,KH,KW,ceil(Cg/{wb})")
        if "bits" in case.outputs:
            bits = reference.unpack(case.outputs["bits"], k.shape[3], 64)
            out["bits.words32"] = (_pack(bits, 32, saz), "bits", "N,OH,OW,ceil(O/32)")
    elif case.op == "bgemm":
        for name in ("x", "w"):
            for wb in (64, 32):
                out[f"{name}.words{wb}"] = (_pack(i[name], wb, saz), name, f"rows,ceil(K/{wb})")
    elif case.op == "maxpool2d":
        for wb in (64, 32):
            out[f"x.words{wb}"] = (_pack(i["x"], wb, saz), "x", f"N,H,W,ceil(C/{wb})")
    elif case.op == "pack" and p["word_bits"] == 64:
        n = i["x"].shape[-1]
        vals = reference.unpack(case.outputs["words"], n, 64)
        out["words.words32"] = (_pack(vals, 32, saz), "words", "rows,ceil(C/32)")
    return out


def resolved_params(case: Case) -> dict:
    """Geometry a C implementation would otherwise derive: explicit ``pad_top``, ``pad_bottom``,
    ``pad_left``, ``pad_right`` for convolutions and pools, and for convolutions ``cg`` (input
    channels per group) and ``k_taps`` (``KH * KW * Cg``, LCE's ``K``)."""
    p, i = case.params, case.inputs
    if case.op in ("bconv2d", "bconv2d_output"):
        kernel = i["kernel"]
        khw, dil = kernel.shape[:2], tuple(p["dilation"])
    elif case.op == "maxpool2d":
        kernel, khw, dil = None, tuple(p["pool"]), (1, 1)
    else:
        return {}
    pad = p["padding"] if isinstance(p["padding"], str) else tuple(p["padding"])
    pads = reference.explicit_padding(pad, i["x"].shape[1:3], khw, tuple(p["stride"]), dil)
    out = dict(zip(("pad_top", "pad_bottom", "pad_left", "pad_right"), (int(v) for v in pads)))
    if kernel is not None:
        out["cg"] = int(kernel.shape[2])
        out["k_taps"] = int(kernel.shape[0] * kernel.shape[1] * kernel.shape[2])
    return out
