"""Binary convolution kernels (fast and portable paths) against refbnn.reference.bconv2d, exactly."""

import numba
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import refbnn
from refbnn import reference as ref

IMPLS = ["portable", "fast"]
VALUES = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.25, -2.5])


@st.composite
def conv_cases(draw, max_cg=130):
    """A random binary conv layer: shapes, stride, dilation, groups, all padding forms."""
    groups = draw(st.integers(1, 3))
    cg = draw(st.one_of(st.integers(1, 12), st.sampled_from([63, 64, 65, max_cg])))
    og = draw(st.one_of(st.integers(1, 20), st.sampled_from([31, 33, 40])))
    n, h, w = draw(st.integers(1, 2)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = draw(st.sampled_from([1, 2, (1, 2), (3, 1)]))
    dilation = draw(st.sampled_from([1, 1, 2, (2, 1)]))
    padding = draw(st.one_of(
        st.sampled_from(["valid", "same"]), st.integers(0, 2),
        st.tuples(st.integers(0, 2), st.integers(0, 2)),
        st.tuples(*[st.integers(0, 2)] * 4)))
    pads = ref.explicit_padding(padding, (h, w), (kh, kw), ref.pair(stride), ref.pair(dilation))
    dh, dw = ref.pair(dilation)
    assume(h + pads[0] + pads[1] >= (kh - 1) * dh + 1 and w + pads[2] + pads[3] >= (kw - 1) * dw + 1)
    x = draw(hnp.arrays(np.float32, (n, h, w, groups * cg), elements=VALUES))
    kernel = draw(hnp.arrays(np.float32, (kh, kw, cg, groups * og), elements=VALUES))
    return dict(x=x, kernel=kernel, stride=stride, padding=padding, dilation=dilation,
                groups=groups, pad_value=draw(st.sampled_from([0, 1, -1])),
                sign_at_zero=draw(st.sampled_from([1, -1])))


def _ref(case):
    return ref.bconv2d(case["x"], case["kernel"], case["stride"], case["padding"],
                       case["pad_value"], case["dilation"], case["groups"], case["sign_at_zero"])


@pytest.mark.parametrize("impl", IMPLS)
@given(case=conv_cases())
def test_bconv2d_equals_reference(impl, case):
    got = refbnn.bconv2d(**case, impl=impl)
    want = _ref(case)
    assert got.dtype == np.int32
    assert got.shape == want.shape
    assert np.array_equal(got, want)


@pytest.mark.parametrize("impl", IMPLS)
@given(case=conv_cases(max_cg=70), five_d=st.booleans())
def test_bconv2d_packed_equals_reference(impl, case, five_d):
    saz, groups = case["sign_at_zero"], case["groups"]
    xp = refbnn.pack_groups(case["x"], groups, sign_at_zero=saz)
    if not five_d:
        xp = xp.reshape(xp.shape[:3] + (-1,))
    wp = refbnn.pack_kernel(case["kernel"], sign_at_zero=saz)
    got = refbnn.bconv2d_packed(xp, wp, case["x"].shape[3], case["stride"], case["padding"],
                                case["pad_value"], case["dilation"], groups, impl=impl)
    assert np.array_equal(got, _ref(case))


def test_fast_kernel_tiles_and_thread_counts_agree():
    """Pixel counts that are not multiples of the tile, 1 vs 2 threads, batch > 1."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 11, 7, 96)).astype(np.float32)
    k = rng.standard_normal((3, 3, 96, 72)).astype(np.float32)
    want = ref.bconv2d(x, k, 1, "same", 0)
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, before}):
            numba.set_num_threads(threads)
            assert np.array_equal(refbnn.bconv2d(x, k, impl="fast"), want)
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("impl", IMPLS)
def test_large_channel_counts(impl):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 5, 5, 300)).astype(np.float32)
    k = rng.standard_normal((3, 3, 300, 70)).astype(np.float32)
    for pv in (0, 1, -1):
        want = ref.bconv2d(x, k, 2, "same", pv)
        assert np.array_equal(refbnn.bconv2d(x, k, 2, "same", pv, impl=impl), want)


def test_plan_reuses_padded_buffer_without_stale_data():
    rng = np.random.default_rng(3)
    k = rng.standard_normal((3, 3, 20, 16)).astype(np.float32)
    plan = refbnn.BConv2DPlan(refbnn.pack_kernel(k), 20, (6, 6), impl="fast")
    for _ in range(2):
        x = rng.standard_normal((2, 6, 6, 20)).astype(np.float32)
        assert np.array_equal(plan(x), ref.bconv2d(x, k))


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    k = np.ones((3, 3, 3, 5), np.float32)
    out = refbnn.bconv2d(np.zeros((0, 4, 4, 3), np.float32), k, impl=impl)
    assert out.shape == (0, 4, 4, 5) and out.dtype == np.int32


@given(nv=st.sampled_from([4, 1]), m=st.integers(1, 6), nsteps=st.integers(1, 100),
       ones=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_both_tile_families_count_every_bit(nv, m, nsteps, ones, seed):
    """``tile_wide`` (registers across one pass) and ``tile_narrow`` (a pass per pixel or pair,
    byte counters folded every ``BYTE_STEPS`` steps) give the popcounts of the NumPy definition
    for every tile shape, step counts across the byte counters' limit (31, 62, 93 ...) and
    all-ones words (8 bits per byte per step: the counters' worst case), in a run of two tiles,
    as scratch popcounts and as int32 accumulators. The fast conv calls the host's family
    (``bconv_tiles.tile``); this checks the other one too."""
    from refbnn.kernels import bconv_tiles as bt
    from refbnn.kernels.epilogue import TILE_INT32, TILE_SCRATCH

    rng = np.random.default_rng(seed)
    lanes, mr = 8 * nv, 6
    if ones:  # x ^ w all ones: every byte of every step adds 8
        xp = np.zeros(2 * mr + nsteps + 8, np.uint64)
        wt = np.full(nsteps * lanes, np.iinfo(np.uint64).max, np.uint64)
    else:
        xp = rng.integers(0, 2 ** 64, 2 * mr + nsteps + 8, dtype=np.uint64)
        wt = rng.integers(0, 2 ** 64, nsteps * lanes, dtype=np.uint64)
    bases = rng.integers(0, 2 * mr, 2 * mr).astype(np.int64)  # slots of two tiles, mr apart
    soff = rng.permutation(nsteps + 8)[:nsteps].astype(np.int64)
    words = xp[bases[:, None] + soff[None, :]]  # (slot, step)
    w = wt.reshape(nsteps, lanes)
    want = np.zeros((2 * mr, lanes), np.int64)
    for s in range(nsteps):
        xor = np.ascontiguousarray(words[:, s, None] ^ w[None, s, :])  # (slot, lane) uint64
        want += np.unpackbits(xor.view(np.uint8), axis=-1).reshape(2 * mr, lanes, 64).sum(-1, dtype=np.int64)
    k = 64 * nsteps
    for family in (bt.tile_wide, bt.tile_narrow):
        acc = np.full(mr * lanes + 16, -1, np.int64)
        family(nv, m, xp.ctypes.data, bases.ctypes.data, 0, wt.ctypes.data, 0, soff.ctypes.data,
               nsteps, acc.ctypes.data, 0, 0, 0, k, TILE_SCRATCH, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0,
               TILE_SCRATCH)
        np.testing.assert_array_equal(acc[:m * lanes].reshape(m, lanes), want[:m], family.__name__)
        out = np.full(2 * mr * lanes + 8, -7, np.int32)
        obases = (np.arange(2 * mr) * lanes).astype(np.int64)
        family(nv, m, xp.ctypes.data, bases.ctypes.data, 0, wt.ctypes.data, 0, soff.ctypes.data,
               nsteps, acc.ctypes.data, out.ctypes.data, obases.ctypes.data, 0, k, TILE_INT32, 0,
               0, 0, 0, 0, 0, 0, 0, 2, 0, TILE_INT32)
        got = out[:-8].reshape(2 * mr, lanes)
        for t in range(2):
            rows = slice(t * mr, t * mr + m)
            np.testing.assert_array_equal(got[rows], k - 2 * want[rows], family.__name__)
            assert (got[t * mr + m:(t + 1) * mr] == -7).all()
        assert (out[-8:] == -7).all()
