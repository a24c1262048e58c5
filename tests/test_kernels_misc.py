"""Packed max-pool, binary GEMM, kernel dispatch, generated code and the fast path's assembly."""

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import refbnn
from refbnn import reference as ref
from refbnn.kernels import _codegen, dispatch

IMPLS = ["portable", "fast"]
VALUES = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, -0.5])


@given(data=st.data(), saz=st.sampled_from([1, -1]))
def test_maxpool2d_packed_equals_reference(data, saz):
    n, h, w = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))
    c = data.draw(st.sampled_from([1, 7, 64, 65, 130]))
    pool = data.draw(st.sampled_from([1, 2, 3, (2, 3)]))
    ph, pw = ref.pair(pool)
    stride = data.draw(st.sampled_from([None, 1, 2, (1, 3)]))
    padding = data.draw(st.sampled_from(["valid", "same", (0, 1), (1, 0, 0, 1)]))
    sh, sw = ref.pair(stride if stride is not None else pool)
    pads = ref.explicit_padding(padding, (h, w), (ph, pw), (sh, sw), (1, 1))
    if max(pads[:2]) >= ph or max(pads[2:]) >= pw or h + pads[0] + pads[1] < ph \
            or w + pads[2] + pads[3] < pw:
        padding = "valid"
        if h < ph or w < pw:
            pool, stride = 1, None
    x = data.draw(hnp.arrays(np.float32, (n, h, w, c), elements=VALUES))
    got = refbnn.maxpool2d_packed(refbnn.pack_bits(x, sign_at_zero=saz), pool, stride, padding)
    want = ref.pack(ref.maxpool2d(x, pool, stride, padding, saz))
    assert np.array_equal(got, want)


@pytest.mark.parametrize("impl", IMPLS)
@given(m=st.integers(1, 13), nout=st.integers(1, 40), k=st.sampled_from([1, 30, 64, 100, 200]),
       saz=st.sampled_from([1, -1]), data=st.data())
def test_bgemm_equals_reference(impl, m, nout, k, saz, data):
    x = data.draw(hnp.arrays(np.float32, (m, k), elements=VALUES))
    w = data.draw(hnp.arrays(np.float32, (nout, k), elements=VALUES))
    got = refbnn.bgemm(x, w, sign_at_zero=saz, impl=impl)
    assert got.dtype == np.int32
    assert np.array_equal(got, ref.bgemm(x, w, saz))


def test_generated_code_and_cache_digests_are_current():
    """``python refbnn/kernels/_codegen.py`` regenerates bconv_tiles.py and stamps every
    DEPS_DIGEST (Numba's on-disk cache of a kernel is keyed to its own file only)."""
    assert _codegen.stale() == [], "run python refbnn/kernels/_codegen.py"


def test_digests_cover_the_real_imports_transitively():
    """The stamp of bconv_fast covers the tiles, the epilogue and the intrinsics they import; the
    portable kernel's covers no fast-path module (it must not depend on the AVX-512 tiles)."""
    from pathlib import Path

    def deps(module):
        path = Path(_codegen.PACKAGE.parent, *module.split(".")).with_suffix(".py")
        return {p.stem for p in _codegen.dependencies(path.read_text(), module)}

    # the fused epilogue's merge and pack (the engine's); fvec's bf16 dot asks dispatch which
    # instruction the host has
    fused = {"elementwise", "fvec", "dispatch"}
    assert deps("refbnn.kernels.bconv_fast") == {"bconv_tiles", "epilogue", "simd", "sync"} | fused
    assert deps("refbnn.kernels.bconv_portable") == {"epilogue", "simd"} | fused
    assert deps("refbnn.kernels.packing") == {"simd"}
    assert deps("refbnn.kernels.realpool") == {"elementwise", "realconv", "ftiles", "fvec", "simd",
                                               "sync", "dispatch"}
    cached = "@njit(cache=True)\ndef f():\n    pass\n"
    assert _codegen.needs_digest("from .simd import v8_zero\n" + cached, "refbnn.kernels.y")
    assert not _codegen.needs_digest(cached, "refbnn.kernels.y")



#: The binary-conv kernel tree's jitted functions (name called: defining file, name defined;
#: ``tile`` is one of the two tile families, same parameters) and the jitted modules that call them.
_TREE = {"run_op": ("refbnn/engine/program.py", "run_op"),
         "conv_items": ("refbnn/kernels/bconv_fast.py", "conv_items"),
         "_tiles": ("refbnn/kernels/bconv_fast.py", "_tiles"),
         "tile": ("refbnn/kernels/bconv_tiles.py", "tile_wide")}
_TREE_CALLERS = ("refbnn/engine/program.py", "refbnn/kernels/bconv_fast.py")


def test_binary_conv_tree_is_called_without_constants_or_omitted_arguments():
    """Inside jitted code a constant argument (``0``, ``True``) is a Numba literal type and an
    omitted one a type of its own, so every call that passes them compiles the whole micro-kernel
    tree under it again (cold, a few seconds each; the engine's ``run_op`` had 4 copies, ``_tiles``
    4, each micro-kernel 2). Every call of these kernels passes all parameters, none a constant
    (``np.int64(0)`` is a plain ``int64``)."""
    import ast
    from pathlib import Path

    root = Path(_codegen.PACKAGE).parent
    params = {}
    for name, (rel, defined) in _TREE.items():
        tree = ast.parse((root / rel).read_text())
        fns = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        params[name] = len(fns[defined].args.args)
        if name == "tile":
            assert len(fns["tile_narrow"].args.args) == params[name]
    bad, seen = [], set()
    for rel in _TREE_CALLERS:
        for node in ast.walk(ast.parse((root / rel).read_text())):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name not in params:
                continue
            seen.add(name)
            args = list(node.args) + [k.value for k in node.keywords]
            if len(args) != params[name] or any(isinstance(a, ast.Constant) for a in args):
                bad.append(f"{rel}:{node.lineno} {name}")
    assert seen == set(params) and not bad, bad


def test_borrowed_view_is_the_same_memory():
    from numba import njit

    from refbnn.kernels.sync import borrowed

    @njit
    def through(a, b):
        v, w = borrowed(a), borrowed(b)
        v[1:3] += 10.0  # writes land in ``a``
        return v.shape[0], v.strides[0], w[1, 1], w.strides[0]

    a = np.arange(5, dtype=np.float32)
    b = np.arange(12, dtype=np.int64).reshape(4, 3)[::2]
    assert through(a, b) == (5, 4, 7, 48)  # strides kept (every other row of 3 int64)
    np.testing.assert_array_equal(a, [0, 11, 12, 3, 4])


def test_kernel_choice_env_and_argument(monkeypatch):
    monkeypatch.setenv("REFBNN_KERNEL", "portable")
    assert dispatch.resolve_kernel() == "portable"
    assert dispatch.resolve_kernel("fast") == "fast"
    monkeypatch.setenv("REFBNN_KERNEL", "auto")
    for feats, want in (({"avx512f": True, "avx512vpopcntdq": True, "avx2": True}, "fast"),
                        ({"avx2": True, "fma": True}, "fast"),  # an AVX2-only host (measured)
                        ({"avx512f": True, "avx512vpopcntdq": False, "avx2": False}, "portable"),
                        ({"neon": True}, "portable"), ({}, "portable")):
        monkeypatch.setattr(dispatch, "_host_features", lambda f=feats: f)
        assert dispatch.resolve_kernel() == want, feats
    monkeypatch.undo()
    monkeypatch.setenv("REFBNN_KERNEL", "auto")
    k = np.ones((1, 1, 3, 2), np.float32)
    for choice in ("portable", "fast"):
        monkeypatch.setenv("REFBNN_KERNEL", choice)
        assert refbnn.BConv2DPlan(refbnn.pack_kernel(k), 3, (2, 2)).impl == choice
    monkeypatch.setenv("REFBNN_KERNEL", "avx")
    with pytest.raises(ValueError, match="REFBNN_KERNEL"):
        dispatch.resolve_kernel()


def test_cpu_features_are_numbas_target(monkeypatch):
    """``NUMBA_CPU_FEATURES`` (what Numba compiles for, e.g. an AVX2 build on an AVX-512 host)
    overrides the host query, so the kernel and tile choices follow the code Numba emits."""
    assert dispatch.parse_features("+avx2, -avx512f,fma,,") == {"avx2": True, "avx512f": False,
                                                                "fma": True}
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2,+fma,-avx512f,-avx512vpopcntdq")
    dispatch._host_features.cache_clear()
    try:
        assert dispatch._host_features() == {"avx2": True, "fma": True, "avx512f": False,
                                             "avx512vpopcntdq": False}
        assert not dispatch.host_has_wide_vectors() and not dispatch.host_has_avx512_popcount()
        assert dispatch.resolve_kernel("auto") == "fast"
        monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx512f,+avx512vpopcntdq")
        dispatch._host_features.cache_clear()
        assert dispatch.host_has_wide_vectors() and dispatch.host_has_avx512_popcount()
        monkeypatch.delenv("NUMBA_CPU_FEATURES")
        dispatch._host_features.cache_clear()
        from llvmlite import binding

        assert dispatch._host_features() == dict(binding.get_host_cpu_features())
    finally:
        monkeypatch.undo()
        dispatch._host_features.cache_clear()


@pytest.mark.skipif(not dispatch.host_has_avx512_popcount(),
                    reason="host has no AVX-512 VPOPCNTDQ, so no zmm vpopcntq is expected")
def test_fast_tile_compiles_to_zmm_vpopcntq():
    """The 6x32 micro-kernel's inner loop is 512-bit XOR/POPCNT/ADD and its int32 stores are
    16 lanes wide (compiled afresh, as inspect_asm is unavailable for cached code)."""
    from numba import njit

    from refbnn.kernels import bconv_tiles
    from refbnn.kernels.epilogue import TILE_SCRATCH

    fn = njit(bconv_tiles._t6x4.py_func)
    xp = np.zeros(192, np.uint64)
    i64, i32 = np.zeros(192, np.int64), np.zeros(32, np.int32)
    a, a32, ax = i64.ctypes.data, i32.ctypes.data, xp.ctypes.data  # the tiles take addresses
    fn(ax, a, 0, ax, 0, a, 1, a, a32, a, 0, 1, TILE_SCRATCH, a, a, 0, 0, a, a, a, a, 1, 0,
       TILE_SCRATCH)
    asm = fn.inspect_asm(fn.signatures[0])
    assert len(re.findall(r"vpopcntq\s+[^\n]*zmm", asm)) == 24
    assert not re.search(r"vpopcntq\s+[^\n]*ymm", asm)
    # int32 stores narrow two 8-lane vectors with one 2-source permute (TILE_INT32 and
    # TILE_INT32_CORR: 6 pixels x 2 pairs each), not with two vpmovqd
    assert len(re.findall(r"vperm[ti]2d", asm)) >= 24


def test_vector_float_epilogue_multiplies_then_adds_without_fma():
    """y = float32(float32(acc) * mul) + bias needs two roundings: no fused multiply-add."""
    from numba import njit

    from refbnn.kernels.epilogue import v8_store_f32
    from refbnn.kernels.simd import v8_load, v8_zero

    @njit
    def epilogue(out, pc, mul, bias, lce):
        v8_store_f32(out.ctypes.data, 0, v8_load(pc, 0), 7, v8_zero(), mul, bias, 0, lce)

    pc = np.arange(8, dtype=np.int64)
    mul = np.linspace(-1.3, 2.1, 8).astype(np.float32)
    bias = np.linspace(0.3, -0.7, 8).astype(np.float32)
    out = np.empty(8, np.float32)
    epilogue(out, pc, mul, bias, False)  # the LCE branch is in the same compiled function
    assert np.array_equal(out, ref.output_transform(7 - 2 * pc, mul, bias))
    asm = epilogue.inspect_asm(epilogue.signatures[0])
    assert "vfmadd" not in asm and "vfmsub" not in asm and "vfnmadd" not in asm


@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 4), st.integers(1, 3),
       st.integers(1, 130), st.integers(0, 2), st.integers(0, 2), st.booleans(), st.data())
def test_parallel_packing_equals_serial_packing(d0, d1, d2, groups, cg, pad1, pad2, nonpos, data):
    # the public ops pack small inputs serially (tests/test_ops.py checks them against the
    # oracle); the multi-threaded kernel must write the same words, padded layout included
    from refbnn.kernels.packing import pack_rows_into, pack_rows_into_serial
    c = groups * cg
    x = data.draw(hnp.arrays(np.float32, (d0, d1, d2, c), elements=VALUES))
    wg = (cg + 63) // 64
    p1, p2 = d1 + 2 * pad1, d2 + 2 * pad2
    outs = []
    for kernel in (pack_rows_into, pack_rows_into_serial):
        out = np.full((d0, p1, p2, groups * wg), 7, np.uint64)  # untouched border stays 7
        nans = kernel(x.reshape(-1), d0, d1, d2, c, groups, out.reshape(-1), p1, p2, pad1, pad2,
                      nonpos)
        assert nans == 0
        outs.append(out)
    assert np.array_equal(outs[0], outs[1])
    inner = outs[1][:, pad1:pad1 + d1, pad2:pad2 + d2]
    want = np.stack([ref.pack(x[..., g * cg:(g + 1) * cg], 64, -1 if nonpos else 1)
                     for g in range(groups)], axis=3).reshape(inner.shape)
    assert np.array_equal(inner, want)


@given(st.sampled_from([np.float32, np.float64]), st.integers(1, 2), st.integers(1, 3),
       st.integers(1, 3), st.integers(1, 2), st.booleans(), st.data())
def test_full_word_packing_counts_nan_words_exactly(dtype, d1, d2, wg, groups, nonpos, data):
    # whole 64-value words take a fast path that proves "no NaN" by a finite running sum: NaN,
    # +-inf, inf - inf and overflow to inf (0.75 * max + 0.75 * max) must neither hide a NaN nor
    # invent one; the count is the number of words holding a NaN
    from refbnn.kernels.packing import pack_rows_into, pack_rows_into_serial
    cg = 64 * wg
    c = groups * cg
    big = float(dtype(np.finfo(dtype).max * 0.75))  # representable (hypothesis 6.100 checks)
    edge = st.sampled_from([0.0, -0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, big, -big])
    x = data.draw(hnp.arrays(dtype, (1, d1, d2, c), elements=edge | st.floats(-2, 2, width=32)))
    want_nans = int(np.isnan(x.reshape(-1, 64)).any(axis=1).sum())
    for kernel in (pack_rows_into, pack_rows_into_serial):
        out = np.zeros((1, d1, d2, groups * wg), np.uint64)
        assert kernel(x.reshape(-1), 1, d1, d2, c, groups, out.reshape(-1), d1, d2, 0, 0,
                      nonpos) == want_nans
        if not want_nans:
            assert np.array_equal(out, ref.pack(x, 64, -1 if nonpos else 1))
