"""The opt-in bf16 stem's kernels (refbnn/kernels/realconv.py's bf16 section, fvec.bf_*) against
their oracles (refbnn/kernels/real_oracle.py: ``bf16_round``, ``conv_bn_bf16``), exactly: the
products of two bfloat16 values are exact in float32, so the oracle can follow the stated order of
float32 sums step by step (docs/semantics.md, "bf16 stem")."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numba import njit

from refbnn.kernels import real_oracle
from refbnn.kernels import realconv as rc
from refbnn.kernels.dispatch import host_has_avx512_bf16
from refbnn.kernels.fvec import bf_bcast, bf_dot, bf_dot_emulated, bf_load, f16_load, f16_store_n

EDGES = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1.0, -1.0,
                  # ties: 1 + 2**-8 (to even: 1), 1 + 3 * 2**-8 (to even: 1 + 2**-6)
                  1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8),
                  3.3895314e38,   # bfloat16's largest value: kept
                  3.3961776e38,   # its half-way point to 2**128: a tie, to the even infinity
                  3.4028235e38,   # float32's largest: infinity
                  1.1754944e-38,  # 2**-126: the smallest normal, kept
                  1.1753e-38,     # a float32 denormal that rounds up to 2**-126: kept
                  1.0e-39, -1.0e-39, 1.0e-45],  # denormal results: zeros of their sign
                 np.float32)


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def _same(a, b):
    """Bit for bit, any NaN equal to any NaN."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return (_bits(a) == _bits(b)) | (np.isnan(a) & np.isnan(b))


def _kernel_round(x):
    out = np.empty(x.size, np.uint16)
    rc.to_bf16_array(np.ascontiguousarray(x, np.float32).reshape(-1), out)
    return (out.astype(np.uint32) << 16).view(np.float32).reshape(np.shape(x))


def test_bf16_rounding_edges():
    got = _kernel_round(EDGES)
    assert _same(got, real_oracle.bf16_round(EDGES)).all()
    want = [0.0, -0.0, np.inf, -np.inf, np.nan, np.nan, 1.0, -1.0, 1.0, 1 + 2 ** -6, -1.0,
            3.3895314e38, np.inf, np.inf, 2.0 ** -126, 2.0 ** -126, 0.0, -0.0, 0.0]
    assert _same(got, np.array(want, np.float32)).all()
    assert np.signbit(got[[1, 17]]).all() and not np.signbit(got[[0, 16, 18]]).any()
    out = np.empty(EDGES.size, np.uint16)
    rc.to_bf16_array(EDGES, out)
    assert ((out[[4, 5]] & 0x40) != 0).all()  # NaN stays NaN, quiet, its sign kept
    assert out[5] >> 15 == 1


@given(st.lists(st.integers(0, 2 ** 32 - 1), min_size=1, max_size=200))
def test_bf16_rounding_matches_the_oracle_for_any_bits(words):
    x = np.array(words, np.uint32).view(np.float32)
    assert _same(_kernel_round(x), real_oracle.bf16_round(x)).all()


@njit
def _dot(acc, x, w, out, emulated):
    a = f16_load(acc, 0)
    xv = bf_bcast(x, 0)
    wv = bf_load(w, 0)
    f16_store_n(out, 0, bf_dot_emulated(a, xv, wv) if emulated else bf_dot(a, xv, wv), 16)


def _pairs(rng, n, tiny):
    """``n`` bfloat16 values: normal, with exponents spread so sums cancel and round, and (with
    ``tiny``) some near 2**-63 whose products fall below 2**-126 (flushed)."""
    v = rng.standard_normal(n) * 2.0 ** rng.integers(-20, 20, n)
    if tiny:
        v[rng.random(n) < 0.3] *= 2.0 ** -60
    return real_oracle.bf16_round(v.astype(np.float32))


@pytest.mark.parametrize("emulated", [False, True])
@given(seed=st.integers(0, 2 ** 32 - 1), tiny=st.booleans())
def test_bf_dot_is_the_documented_order(emulated, seed, tiny):
    """acc = ftz(acc + odd products) then ftz(acc + even products), each sum rounded once: the
    instruction (where the CPU has it) and its FMA emulation, bit for bit."""
    rng = np.random.default_rng(seed)
    acc = (rng.standard_normal(16) * 2.0 ** rng.integers(-20, 20, 16)).astype(np.float32)
    if tiny:
        acc[rng.random(16) < 0.3] *= np.float32(2.0 ** -100)
        acc = real_oracle._ftz(acc)
    x, w = _pairs(rng, 2, tiny), _pairs(rng, 32, tiny).reshape(16, 2)
    out = np.empty(16, np.float32)
    _dot(acc, (_bits(x) >> 16).astype(np.uint16), (_bits(w) >> 16).astype(np.uint32)[:, 0]
         | ((_bits(w) >> 16).astype(np.uint32)[:, 1] << 16), out, emulated)
    # the products are exact in float64 and in float32 (8-bit significands, no underflow below
    # 2**-149 for these magnitudes), so one float32 add rounds each sum once
    want = real_oracle._ftz(acc + (x[1] * w[:, 1]).astype(np.float32))
    want = real_oracle._ftz(want + (x[0] * w[:, 0]).astype(np.float32))
    assert _same(out, want).all(), (acc, x, w, out, want)


@pytest.mark.skipif(not host_has_avx512_bf16(), reason="this CPU has no AVX512-BF16 (VDPBF16PS); "
                    "the bf16 stem runs the FMA emulation, tested above")
def test_bf16_stem_tile_uses_vdpbf16ps():
    import re

    from refbnn.kernels.ftiles import tile_bf_nv4

    fn = njit(tile_bf_nv4.py_func)  # a fresh, uncached compile: cached code cannot be inspected
    b = np.zeros(6, np.int64)
    fn(np.zeros(200, np.uint16), b, np.zeros(1, np.int64), 1, np.zeros(64, np.uint32), 0,
       np.zeros(200, np.float32), b, np.ones(64, np.float32), np.zeros(64, np.float32), 0, 64)
    asm = fn.inspect_asm(fn.signatures[0])
    assert len(re.findall(r"vdpbf16ps\s+[^\n]*zmm", asm)) >= 24


@given(n=st.integers(1, 2), h=st.integers(1, 9), w=st.integers(1, 9), c=st.integers(1, 4),
       k=st.integers(1, 7), stride=st.integers(1, 2), o=st.integers(1, 70),
       seed=st.integers(0, 2 ** 16))
def test_bf16_stem_conv_is_exactly_the_oracle(n, h, w, c, k, stride, o, seed):
    """The planar bf16 input (the border, and the odd kernels' extra zero column, never written),
    the weight pairs and the tile kernels, on :func:`conv_taps`: the oracle's bits, any kernel
    size (even ones have no zero partner), channel count and output width (masked last vector)."""
    rng = np.random.default_rng(seed)
    pad = k // 2
    hp, wp = h + 2 * pad, w + 2 * pad
    wpb = rc.bf16_planar_width(wp, k)
    oh, ow = (hp - k) // stride + 1, (wp - k) // stride + 1
    x = (rng.standard_normal((n, c, h, w)) * 2.0 ** rng.integers(-8, 8, (n, c, h, w))) \
        .astype(np.float32)
    x[rng.random(x.shape) < 0.05] = 0.0
    wt = rng.standard_normal((k, k, c, o)).astype(np.float32)
    scale, shift = rng.normal(0, 1, o).astype(np.float32), rng.normal(0, 1, o).astype(np.float32)
    planar = np.zeros((n, c, hp, wpb), np.uint16)
    flat = planar.reshape(n, -1)
    for img in range(n):
        rc.to_padded_planar_bf16(x.reshape(-1), img, c, h, w, flat[img], hp, wpb, pad, pad, 0, h)
    inner = np.zeros(planar.shape, bool)
    inner[:, :, pad:pad + h, pad:pad + w] = True
    assert (planar[~inner] == 0).all()
    nv = rc.vectors_for(o, bf16=True)
    bases, toff = rc.planar_geometry_bf16(n, c, hp, wpb, k, stride, oh, ow)
    assert toff.shape[0] == c * k * -(-k // 2)
    guard = np.full(n * oh * ow * o + 40, np.nan, np.float32)  # masked stores leave the rest
    rc.conv_taps(planar.reshape(-1), bases, bases.shape[0], toff,
                 rc.weight_tiles(rc.weight_pairs_bf16(wt), nv), nv, o, scale, shift, guard)
    want = real_oracle.conv_bn_bf16(x.transpose(0, 2, 3, 1), wt, stride, pad, scale, shift)
    assert np.isnan(guard[-40:]).all()
    np.testing.assert_array_equal(guard[:-40].reshape(want.shape).view(np.uint32),
                                  want.view(np.uint32))


def test_bf16_oracle_is_close_to_the_float32_conv():
    """Sanity of the oracle itself against the float64 conv: bfloat16 inputs move each product
    by at most 2 * 2**-8 of its magnitude (plus float32 sums)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 12, 12, 3)).astype(np.float32)
    wt = rng.standard_normal((7, 7, 3, 16)).astype(np.float32)
    one, zero = np.ones(16, np.float32), np.zeros(16, np.float32)
    want, bound = real_oracle.conv_bn(x, wt, 2, 3, one, zero)
    got = real_oracle.conv_bn_bf16(x, wt, 2, 3, one, zero)
    mag = real_oracle.conv_bn(np.abs(x), np.abs(wt), 2, 3, one, zero)[0]
    assert (np.abs(got - want) <= 2.01 * 2.0 ** -8 * mag + bound).all()
    assert np.abs(got - want).max() > 0  # it does round
