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
