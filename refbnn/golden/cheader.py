"""Golden files as C headers (``docs/golden.md`` section 11): ``static const`` arrays, macros for
shapes, parameters and tolerances, and a header-only checker, for a testbench with no libraries
(C99 or C++; HLS C simulation; a microcontroller test).

Folder ``OUT/c/``: ``refbnn_golden.h`` (the checker), ``<kind>.h`` (includes every case of a
kind), ``<kind>/<case>.h`` (one case) and ``model/weights.h``. Identifiers: ``rg_<kind>_<case>_``
then ``in_<name>``, ``out_<name>`` or ``derived_<name>`` (``+`` becomes ``p``, ``-`` ``m``, every
other character outside ``[0-9A-Za-z_]`` ``_``); macros are the same in upper case with
``_NDIM``, ``_DIM<i>``, ``_SIZE``, ``_RTOL``, ``_ATOL`` appended, parameters
``RG_<KIND>_<CASE>_P_<KEY>``. Floats are written as the shortest decimal literal that reads back
exactly, infinities as ``INFINITY``; 64-bit words as ``UINT64_C(0x...)``, and every packed array
also as 32-bit words (``uint32_t``, LCE's and HLS's word).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from refbnn.golden.fileio import GoldenFile
from refbnn.golden.manifest import resolved_params, word_twins

CHECKER = "refbnn_golden.h"
PER_LINE = 8

CTYPES = {"float32": "float", "float64": "double", "int8": "int8_t", "int32": "int32_t",
          "int64": "int64_t", "uint32": "uint32_t", "uint64": "uint64_t"}
SUFFIX = {"float32": "f32", "float64": "f64", "int8": "i8", "int32": "i32", "int64": "i64",
          "uint32": "u32", "uint64": "u64"}

CHECKER_TEXT = r"""/* refbnn golden vectors: header-only checker (docs/golden.md, section 11). C99 or C++.
 *
 * rg_check_<t>(name, got, expected, n, rtol, atol) returns 0 when `got` matches `expected`
 * and 1 otherwise, and prints one line per mismatching array (define RG_NO_STDIO to print
 * nothing). Integers (i8, i32, i64, u32, u64): every element equal. Floats (f32, f64): every
 * |got - expected| <= atol + rtol * max |expected| over the whole array, and no NaN anywhere;
 * rtol = atol = 0 means every element equal (-0.0 equals 0.0).
 */
#ifndef REFBNN_GOLDEN_H
#define REFBNN_GOLDEN_H
#include <stddef.h>
#include <stdint.h>
#ifndef RG_NO_STDIO
#include <stdio.h>
#endif

static inline double rg_abs(double v) { return v < 0 ? -v : v; }

static inline void rg_report_float(const char *name, size_t bad, size_t n, size_t first,
                                   double got, double expected, double max_diff, double allowed) {
#ifndef RG_NO_STDIO
    printf("MISMATCH %s: %lu of %lu values differ, max |diff| %.9g (allowed %.3g); first at "
           "flat index %lu: expected %.9g, got %.9g\n", name, (unsigned long)bad,
           (unsigned long)n, max_diff, allowed, (unsigned long)first, expected, got);
#else
    (void)name; (void)bad; (void)n; (void)first; (void)got; (void)expected; (void)max_diff;
    (void)allowed;
#endif
}

static inline void rg_report_int(const char *name, size_t bad, size_t n, size_t first,
                                 long long got, long long expected, int is_unsigned) {
#ifndef RG_NO_STDIO
    printf(is_unsigned ? "MISMATCH %s: %lu of %lu values differ; first at flat index %lu: "
                         "expected 0x%llx, got 0x%llx\n"
                       : "MISMATCH %s: %lu of %lu values differ; first at flat index %lu: "
                         "expected %lld, got %lld\n",
           name, (unsigned long)bad, (unsigned long)n, (unsigned long)first, expected, got);
#else
    (void)name; (void)bad; (void)n; (void)first; (void)got; (void)expected; (void)is_unsigned;
#endif
}

#define RG_DEFINE_FLOAT_CHECK(fn, T)                                                       \
    static inline int fn(const char *name, const T *got, const T *expected, size_t n,      \
                         double rtol, double atol) {                                       \
        double emax = 0.0, dmax = 0.0, allowed;                                            \
        size_t i, bad = 0, first = 0;                                                      \
        for (i = 0; i < n; i++) {                                                          \
            double e = rg_abs((double)expected[i]);                                        \
            if (e > emax) emax = e;                                                        \
        }                                                                                  \
        allowed = atol + rtol * emax;                                                      \
        for (i = 0; i < n; i++) {                                                          \
            double d = rg_abs((double)got[i] - (double)expected[i]);                       \
            if (!(d <= allowed)) { /* NaN fails too */                                     \
                if (!bad) first = i;                                                       \
                bad++;                                                                     \
            }                                                                              \
            if (d > dmax || d != d) dmax = d;                                              \
        }                                                                                  \
        if (!bad) return 0;                                                                \
        rg_report_float(name, bad, n, first, (double)got[first], (double)expected[first],  \
                        dmax, allowed);                                                    \
        return 1;                                                                          \
    }

#define RG_DEFINE_INT_CHECK(fn, T, U)                                                      \
    static inline int fn(const char *name, const T *got, const T *expected, size_t n,      \
                         double rtol, double atol) {                                       \
        size_t i, bad = 0, first = 0;                                                      \
        (void)rtol; (void)atol; /* integers are always exact */                            \
        for (i = 0; i < n; i++) {                                                          \
            if (got[i] != expected[i]) {                                                   \
                if (!bad) first = i;                                                       \
                bad++;                                                                     \
            }                                                                              \
        }                                                                                  \
        if (!bad) return 0;                                                                \
        rg_report_int(name, bad, n, first, (long long)got[first],                          \
                      (long long)expected[first], U);                                      \
        return 1;                                                                          \
    }

RG_DEFINE_FLOAT_CHECK(rg_check_f32, float)
RG_DEFINE_FLOAT_CHECK(rg_check_f64, double)
RG_DEFINE_INT_CHECK(rg_check_i8, int8_t, 0)
RG_DEFINE_INT_CHECK(rg_check_i32, int32_t, 0)
RG_DEFINE_INT_CHECK(rg_check_i64, int64_t, 0)
RG_DEFINE_INT_CHECK(rg_check_u32, uint32_t, 1)
RG_DEFINE_INT_CHECK(rg_check_u64, uint64_t, 1)

#endif /* REFBNN_GOLDEN_H */
"""


def ident(*parts) -> str:
    """A C identifier: the parts joined by ``_``; ``+`` becomes ``p``, ``-`` becomes ``m``, every
    other character outside ``[0-9A-Za-z_]`` becomes ``_``."""
    text = "_".join(str(p) for p in parts).replace("+", "p").replace("-", "m")
    return re.sub(r"[^0-9A-Za-z_]", "_", text)


def _float(v, suffix: str) -> str:
    """The shortest decimal literal that reads back as exactly ``v`` (``suffix`` ``"f"``: a
    float32 value, else float64); decimal, not hexadecimal, so that C++ before C++17 reads it."""
    if np.isinf(v):
        return ("-" if v < 0 else "") + ("INFINITY" if suffix == "f" else "((double)INFINITY)")
    if np.isnan(v):
        raise ValueError("golden arrays hold no NaN")
    v = np.float32(v) if suffix == "f" else np.float64(v)
    return np.format_float_scientific(v, unique=True, trim="-", exp_digits=2) + suffix


def literals(a: np.ndarray) -> list[str]:
    """C literals of the flattened array ``a``, exact for every dtype of ``DTYPES``."""
    flat = np.asarray(a).reshape(-1)
    name = flat.dtype.name
    if name == "float32":
        return [_float(v, "f") for v in flat]
    if name == "float64":
        return [_float(v, "") for v in flat]
    if name == "uint64":
        return [f"UINT64_C(0x{int(v):016x})" for v in flat]
    if name == "uint32":
        return [f"0x{int(v):08x}u" for v in flat]
    if name == "int64":
        lo = np.iinfo(np.int64).min
        return ["(INT64_C(-9223372036854775807) - 1)" if int(v) == lo else f"INT64_C({int(v)})"
                for v in flat]
    lo = np.iinfo(np.int32).min
    return ["(-2147483647 - 1)" if int(v) == lo else str(int(v)) for v in flat]


def array_text(cname: str, a) -> str:
    """``#define``s of shape and size and the ``static const`` definition of one array."""
    a = np.asarray(a)
    if a.dtype.name not in CTYPES:
        raise ValueError(f"{cname}: no C type for dtype {a.dtype}")
    macro = cname.upper()
    lines = [f"#define {macro}_NDIM {a.ndim}"]
    lines += [f"#define {macro}_DIM{i} {d}" for i, d in enumerate(a.shape)]
    lines.append(f"#define {macro}_SIZE {a.size}")
    vals = literals(a) or ["0"]  # C has no empty arrays: one unused element, _SIZE stays 0
    body = ",\n".join("    " + ", ".join(vals[i:i + PER_LINE]) for i in range(0, len(vals), PER_LINE))
    lines.append(f"static const {CTYPES[a.dtype.name]} {cname}[{max(a.size, 1)}] = {{\n{body}\n}};")
    return "\n".join(lines)


def _param_macros(prefix: str, params: dict) -> list[str]:
    out = []

    def walk(key, v):
        if isinstance(v, dict):
            for k, w in v.items():
                walk(f"{key}_{k}", w)
        elif isinstance(v, (list, tuple)):
            out.append(f"#define {ident(prefix, key).upper()}_LEN {len(v)}")
            for i, w in enumerate(v):
                walk(f"{key}_{i}", w)
        elif isinstance(v, bool):
            out.append(f"#define {ident(prefix, key).upper()} {int(v)}")
        elif isinstance(v, int):
            out.append(f"#define {ident(prefix, key).upper()} {v}")
        elif isinstance(v, float):
            out.append(f"#define {ident(prefix, key).upper()} {_float(v, '')}")
        elif isinstance(v, str):
            out.append(f"#define {ident(prefix, key).upper()} {json.dumps(v)}")
        else:  # None
            out.append(f"/* {ident(prefix, key).upper()}: null */")

    for k, v in params.items():
        walk(k, v)
    return out


def _comment(text: str) -> str:
    return text.replace("*/", "* /")


def case_header(kind: str, case, version: str) -> str:
    """The text of ``<kind>/<case>.h``."""
    base = ident("rg", kind, case.name)
    guard = base.upper() + "_H"
    need_inf = any(np.asarray(v).dtype.kind == "f" and np.isinf(v).any()
                   for v in (*case.inputs.values(), *case.outputs.values()))
    head = [f"/* refbnn golden vectors (refbnn {_comment(version)}), {kind} case \"{case.name}\""
            " (docs/golden.md).",
            f" * op: {case.op}",
            f" * params: {_comment(json.dumps(case.params, sort_keys=True))}",
            f" * stacks: {' '.join(case.stacks) or '(refbnn only)'}",
            " */",
            f"#ifndef {guard}", f"#define {guard}", "#include <stdint.h>",
            f'#include "../{CHECKER}"']
    if need_inf:
        head.append("#include <math.h> /* INFINITY */")
    body = ["", "/* parameters (and the resolved geometry) */"]
    body += _param_macros(base + "_p", {**case.params, **(resolved_params(case) if kind == "ops" else {})})
    for name, v in case.inputs.items():
        a = np.asarray(v)
        body += ["", f"/* input {name}: {a.dtype.name} {list(a.shape)} */",
                 array_text(ident(base, "in", name), a)]
    twins = word_twins(case) if kind == "ops" else {}
    for name, (v, src, layout) in twins.items():
        a = np.asarray(v)
        body += ["", f"/* derived {name}: {a.dtype.name} [{layout}] = {list(a.shape)}, the packed "
                     f"bits of {src} */", array_text(ident(base, "derived", name), a)]
    for name, v in case.outputs.items():
        a = np.asarray(v)
        rtol, atol = case.tolerance.get(name, (0.0, 0.0))
        cname = ident(base, "out", name)
        t = CTYPES[a.dtype.name]
        body += ["", f"/* output {name}: {a.dtype.name} {list(a.shape)}, rtol {rtol!r} atol {atol!r} */",
                 array_text(cname, a),
                 f"#define {cname.upper()}_RTOL {_float(rtol, '')}",
                 f"#define {cname.upper()}_ATOL {_float(atol, '')}",
                 f"static inline int {ident(base, 'check', name)}(const {t} *got) {{",
                 f"    return rg_check_{SUFFIX[a.dtype.name]}({json.dumps(case.name + '/' + name)}, "
                 f"got, {cname}, {cname.upper()}_SIZE, {cname.upper()}_RTOL, {cname.upper()}_ATOL);",
                 "}"]
    return "\n".join(head + body + ["", f"#endif /* {guard} */", ""])


def weights_header(golden: GoldenFile, version: str) -> str:
    guard = "RG_MODEL_WEIGHTS_H"
    lines = [f"/* refbnn golden vectors (refbnn {_comment(version)}): the model's state dict, one "
             "array per name (docs/golden.md). */", f"#ifndef {guard}", f"#define {guard}",
             "#include <stdint.h>"]
    for name, v in golden.arrays.items():
        a = np.asarray(v)
        lines += ["", f"/* {name}: {a.dtype.name} {list(a.shape)} */",
                  array_text(ident("rg_model_weight", name), a)]
    return "\n".join(lines + ["", f"#endif /* {guard} */", ""])


def _check_unique(names, what):
    seen = {}
    for n in names:
        c = ident(n)
        if c in seen and seen[c] != n:
            raise ValueError(f"{what} {seen[c]!r} and {n!r} give the same C identifier {c}")
        seen[c] = n


def write(folder, goldens, version: str) -> str:
    """Write the C headers of ``goldens`` into ``folder`` (created); returns the checker's path,
    written last."""
    os.makedirs(folder, exist_ok=True)
    for golden in goldens:
        kind = golden.kind
        _check_unique([c.name for c in golden.cases], f"{kind} cases")
        os.makedirs(os.path.join(folder, kind), exist_ok=True)
        includes = []
        for case in golden.cases:
            _check_unique([f"in_{k}" for k in case.inputs] + [f"out_{k}" for k in case.outputs],
                          f"{kind}/{case.name} arrays")
            rel = f"{kind}/{ident(case.name)}.h"
            with open(os.path.join(folder, rel), "w") as f:
                f.write(case_header(kind, case, version))
            includes.append(rel)
        if golden.arrays:
            _check_unique(list(golden.arrays), "weights")
            with open(os.path.join(folder, kind, "weights.h"), "w") as f:
                f.write(weights_header(golden, version))
            includes.append(f"{kind}/weights.h")
        guard = ident("rg", kind, "all_h").upper()
        with open(os.path.join(folder, f"{kind}.h"), "w") as f:
            f.write(f"/* every {kind} case of the refbnn golden vectors */\n#ifndef {guard}\n"
                    f"#define {guard}\n" + "".join(f'#include "{r}"\n' for r in includes) +
                    f"#endif /* {guard} */\n")
    path = os.path.join(folder, CHECKER)
    with open(path, "w") as f:
        f.write(CHECKER_TEXT)
    return path
