"""Public packing ops (refbnn.pack_bits / unpack_bits / pack_groups) against refbnn.reference."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import refbnn
from refbnn import bits
from refbnn import reference as ref

PACK_DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64]


@st.composite
def signed_arrays(draw, min_dims=1, max_dims=4, max_side=9, max_last=150):
    """Arrays of a packable dtype, rich in exact zeros and -0.0 (the sign_at_zero edge)."""
    dtype = np.dtype(draw(st.sampled_from(PACK_DTYPES)))
    ndim = draw(st.integers(min_dims, max_dims))
    shape = tuple(draw(st.integers(1, max_side)) for _ in range(ndim - 1))
    shape += (draw(st.integers(1, max_last)),)
    if dtype.kind == "f":
        tiny = float(np.finfo(dtype).smallest_subnormal)  # representable in every float dtype
        elems = st.sampled_from([0.0, -0.0, 1.5, -2.0, tiny, -tiny, np.inf, -np.inf]) | \
            st.floats(-4, 4, width=16)
    else:
        elems = st.integers(-3, 3)
    return draw(hnp.arrays(dtype, shape, elements=elems))


@given(signed_arrays(), st.sampled_from([1, -1]), st.sampled_from([64, 32]), st.data())
def test_pack_bits_equals_reference(x, saz, word_bits, data):
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    got = refbnn.pack_bits(x, axis=axis, word_bits=word_bits, sign_at_zero=saz)
    want = np.moveaxis(ref.pack(np.moveaxis(x, axis, -1), word_bits, saz), -1, axis)
    assert got.dtype == (np.uint64 if word_bits == 64 else np.int32)
    assert got.shape == want.shape
    assert np.array_equal(got.view(want.dtype), want)


@given(signed_arrays(), st.sampled_from([1, -1]), st.sampled_from([64, 32]),
       st.sampled_from([np.int8, np.float32]))
def test_unpack_inverts_pack(x, saz, word_bits, dtype):
    n = x.shape[-1]
    packed = refbnn.pack_bits(x, word_bits=word_bits, sign_at_zero=saz)
    got = refbnn.unpack_bits(packed, n, word_bits=word_bits, dtype=dtype)
    assert got.dtype == dtype
    assert np.array_equal(got, ref.sign(x, saz))


@given(signed_arrays(min_dims=2, max_dims=3), st.data())
def test_unpack_along_axis_matches_reference(x, data):
    axis = data.draw(st.integers(0, x.ndim - 1))
    words = np.moveaxis(ref.pack(np.moveaxis(x, axis, -1)), -1, axis)
    n = x.shape[axis]
    want = np.moveaxis(ref.unpack(np.moveaxis(words, axis, -1), n), -1, axis)
    assert np.array_equal(refbnn.unpack_bits(words, n, axis=axis), want)


@given(signed_arrays(min_dims=2, max_dims=2, max_last=200))
def test_64_32_word_conversion_round_trip(x):
    n = x.shape[-1]
    w64 = refbnn.pack_bits(x)
    w32 = bits.words64_to_words32(w64, n)
    assert np.array_equal(w32.view(np.uint32), ref.pack(x, 32))
    assert np.array_equal(bits.words32_to_words64(w32, n), w64)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 90),
       st.sampled_from([1, -1]), st.data())
def test_pack_groups_each_group_starts_at_bit_zero(n, h, groups, cg, saz, data):
    x = data.draw(hnp.arrays(np.float32, (n, h, 2, groups * cg),
                             elements=st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -3.0])))
    got = refbnn.pack_groups(x, groups, sign_at_zero=saz)
    want = np.stack([ref.pack(x[..., g * cg:(g + 1) * cg], 64, saz) for g in range(groups)],
                    axis=3)
    assert np.array_equal(got, want)
    if cg % 64 == 0:
        assert np.array_equal(got.reshape(n, h, 2, -1), refbnn.pack_bits(x, sign_at_zero=saz))


def test_sign_is_bits_sign():
    x = np.array([-1.0, -0.0, 0.0, 2.0])
    assert refbnn.sign is bits.sign
    assert np.array_equal(refbnn.sign(x), [-1, 1, 1, 1])
    assert np.array_equal(refbnn.sign(x, -1), [-1, -1, -1, 1])


def test_pack_large_multiword_rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7, 300)).astype(np.float32)
    x[0, 0, :64] = -0.0
    assert np.array_equal(refbnn.pack_bits(x), ref.pack(x))
    assert np.array_equal(refbnn.pack_bits(x, sign_at_zero=-1), ref.pack(x, 64, -1))


@pytest.mark.parametrize("call, match", [
    (lambda: refbnn.pack_bits(np.array([1.0, np.nan])), "NaN"),
    (lambda: refbnn.pack_bits(np.ones(3), word_bits=16), "word_bits"),
    (lambda: refbnn.pack_bits(np.ones(3), sign_at_zero=0), "sign_at_zero"),
    (lambda: refbnn.pack_bits(np.ones(3, np.uint8)), "dtype"),
    (lambda: refbnn.pack_bits(np.ones(3), axis=1), "axis"),
    (lambda: refbnn.pack_bits(np.float32(1.0)), "1-D"),
    (lambda: refbnn.unpack_bits(np.zeros(2, np.uint64), 65 + 64), "words"),
    (lambda: refbnn.unpack_bits(np.zeros(2, np.int32), 64), "uint64"),
    (lambda: refbnn.unpack_bits(np.zeros(1, np.uint64), 3, dtype=np.float64), "dtype"),
    (lambda: refbnn.pack_groups(np.ones((1, 1, 1, 6)), 4), "divide"),
    (lambda: refbnn.pack_groups(np.ones((1, 1, 6)), 2), "4-D"),
])
def test_bad_input_raises_one_line_value_error(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


_X = np.ones((1, 5, 5, 8), np.float32)
_K = np.ones((3, 3, 8, 4), np.float32)
_W = refbnn.pack_kernel(_K)


def _run_padded_wrong_rows(plan):
    """run_padded on a buffer one row taller than the plan's (whose padding depends on the
    kernel this host runs)."""
    hp, wp = plan.padded_hw
    return plan.run_padded(np.zeros((1, hp + 1, wp, plan.groups * plan.wg), np.uint64))


@pytest.mark.parametrize("call, match", [
    (lambda: refbnn.bconv2d(_X[0], _K), "NHWC"),
    (lambda: refbnn.bconv2d(_X, _K[0]), "HWIO"),
    (lambda: refbnn.bconv2d(np.where(_X > 0, np.nan, _X), _K), "NaN"),
    (lambda: refbnn.bconv2d(_X, np.full_like(_K, np.nan)), "NaN"),
    (lambda: refbnn.pack_kernel(np.ones((3, 3, 2)), 1), "HWIO"),
    (lambda: refbnn.pack_kernel(np.ones((1, 1, 2, 2), np.uint8)), "dtype"),
    (lambda: refbnn.bconv2d(_X, _K, groups=3), "divide"),
    (lambda: refbnn.bconv2d(_X, _K, groups=2), "input channels per group"),
    (lambda: refbnn.bconv2d(_X, np.ones((3, 3, 4, 3)), groups=2), "output channels"),
    (lambda: refbnn.bconv2d(_X, np.ones((7, 7, 8, 4)), padding="valid"), "larger than"),
    (lambda: refbnn.bconv2d(_X, _K, padding="full"), "padding"),
    (lambda: refbnn.bconv2d(_X, _K, padding=(1, 2, 3)), "padding"),
    (lambda: refbnn.bconv2d(_X, _K, padding=-1), "padding"),
    (lambda: refbnn.bconv2d(_X, _K, stride=0), "stride"),
    (lambda: refbnn.bconv2d(_X, _K, dilation=(1, 2, 3)), "dilation"),
    (lambda: refbnn.bconv2d(_X, _K, pad_value=2), "pad_value"),
    (lambda: refbnn.bconv2d(_X, _K, sign_at_zero=0), "sign_at_zero"),
    (lambda: refbnn.bconv2d(_X, _K, impl="gpu"), "kernel must be one of"),
    (lambda: refbnn.bconv2d_packed(np.zeros((1, 5, 5, 1), np.int64), _W, 8), "uint64"),
    (lambda: refbnn.bconv2d_packed(np.zeros((1, 5, 5, 2), np.uint64), _W, 8), "x_packed"),
    (lambda: refbnn.bconv2d_packed(np.full((1, 5, 5, 1), 2 ** 9, np.uint64), _W, 8), "above"),
    (lambda: refbnn.bconv2d_packed(np.zeros((1, 5, 5, 1), np.uint64), _W | np.uint64(2 ** 40),
                                   8), "above"),
    (lambda: refbnn.bconv2d_packed(np.zeros((1, 5, 5, 1), np.uint64), _W, 100), "words"),
    (lambda: refbnn.bconv2d_packed(np.zeros((5, 5, 1), np.uint64), _W, 8), "x_packed"),
    (lambda: refbnn.bconv2d_packed(np.zeros((1, 5, 5, 1), np.uint64), _W, 8, output="bits"),
     "multiplier"),
    (lambda: refbnn.bconv2d_packed(np.zeros((1, 5, 5, 1), np.uint64), _W, 8, output="float",
                                   multiplier=np.ones(3), bias=np.ones(3)), "per output channel"),
    (lambda: refbnn.bconv2d_packed(np.zeros((1, 5, 5, 1), np.uint64), _W, 8, output="float",
                                   multiplier=np.full(4, np.inf), bias=np.ones(4)), "finite"),
    (lambda: refbnn.bconv2d_packed(np.zeros((1, 5, 5, 1), np.uint64), _W, 8, output="bits",
                                   multiplier=np.ones(4), bias=np.ones(4), out_groups=3),
     "out_groups"),
    (lambda: refbnn.bconv2d_packed(np.zeros((1, 5, 5, 1), np.uint64), _W, 8, output="real"),
     "output"),
    (lambda: _run_padded_wrong_rows(refbnn.BConv2DPlan(_W, 8, (5, 5))), "buffer"),
    (lambda: refbnn.bgemm(np.ones((2, 3)), np.ones((2, 4))), "equal K"),
    (lambda: refbnn.bgemm_packed(np.ones((2, 1), np.uint64), np.ones((2, 1), np.uint64), 0),
     "positive"),
    (lambda: refbnn.maxpool2d_packed(np.zeros((1, 4, 4, 1), np.uint64), 2, padding=2),
     "smaller than the pool"),
    (lambda: refbnn.maxpool2d_packed(np.zeros((1, 1, 4, 1), np.uint64), 2), "larger than"),
    (lambda: refbnn.output_thresholds(np.ones(2), np.ones(2), 2 ** 24), "exact float32"),
])
def test_bad_conv_input_raises_one_line_value_error(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 150), st.integers(1, 40),
       st.sampled_from([1, -1]), st.sampled_from(PACK_DTYPES), st.data())
def test_pack_kernel_packs_hwio_as_the_transposed_kernel(kh, kw, ci, o, saz, dtype, data):
    """pack_kernel reads HWIO in place; its words equal packing the OHWI transpose."""
    elems = st.sampled_from([0.0, -0.0, 1.5, -2.0, np.inf, -np.inf]) if np.dtype(dtype).kind == "f" \
        else st.integers(-2, 2)
    k = data.draw(hnp.arrays(dtype, (kh, kw, ci, o), elements=elems))
    want = ref.pack(np.transpose(k, (3, 0, 1, 2)), 64, saz)
    got = refbnn.pack_kernel(k, sign_at_zero=saz)
    assert got.dtype == np.uint64 and got.shape == want.shape
    assert np.array_equal(got, want)
    # the same words from a non-contiguous view of the kernel
    assert np.array_equal(refbnn.pack_kernel(np.repeat(k, 2, axis=3)[..., ::2], saz), want)


@given(st.integers(1, 9), st.integers(1, 140), st.integers(1, 33),
       st.sampled_from([np.float32(0), np.float32(1e-45)]), st.data())
def test_parallel_hwio_packing_equals_serial(taps, cg, o, below, data):
    from refbnn.kernels.packing import pack_hwio, pack_hwio_serial
    k = data.draw(hnp.arrays(np.float32, (taps, cg, o),
                             elements=st.sampled_from([0.0, -0.0, 1.0, -1.0, np.nan])))
    outs = []
    for kernel in (pack_hwio, pack_hwio_serial):
        out = np.full(taps * ((cg + 63) // 64) * o, 7, np.uint64)
        assert (kernel(k.reshape(-1), taps, cg, o, below, out) > 0) == np.isnan(k).any()
        outs.append(out)
    assert np.array_equal(outs[0], outs[1])


@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 7), st.integers(1, 3),
       st.integers(1, 140), st.sampled_from([1, -1]), st.sampled_from(PACK_DTYPES),
       st.sampled_from([0, 1, (2, 0, 1, 3)]), st.sampled_from(["fast", "portable"]), st.data())
def test_pack_input_nchw_writes_the_words_of_the_nhwc_transpose(n, h, w, groups, cg, saz, dtype,
                                                                padding, impl, data):
    """Packing NCHW input straight from its channel planes gives the plan's padded buffer the
    words of the NHWC transpose (refbnn.reference.pack per group, border words 0); the threaded
    kernel and its serial twin write the same words."""
    from refbnn.kernels import packing as kp

    c = groups * cg
    elems = st.sampled_from([0.0, -0.0, 1.5, -2.0, np.inf, -np.inf]) | st.floats(-4, 4, width=16)
    if np.dtype(dtype).kind == "i":
        elems = st.integers(-3, 3)
    x = data.draw(hnp.arrays(dtype, (n, c, h, w), elements=elems))
    k = 1 if padding == 0 else 3  # a 3x3 kernel needs the padding on a 1x1 input
    kernel = np.ones((k, k, cg, 2 * groups), np.float32)
    plan = refbnn.BConv2DPlan(refbnn.pack_kernel(kernel), c, (h, w), padding=padding,
                              groups=groups, impl=impl)
    buf = plan.padded_input(n)
    buf[...] = ~np.uint64(0)  # every word the packing must write is garbage before it
    (t, left), hp, wp = plan.input_offset, *plan.padded_hw
    buf[:, :t] = buf[:, t + h:] = buf[:, :, :left] = buf[:, :, left + w:] = 0  # the zero border
    got = plan.pack_input_nchw(x, saz).copy()
    nhwc = x.transpose(0, 2, 3, 1)
    want = np.zeros_like(got)
    want[:, t:t + h, left:left + w] = np.concatenate(
        [ref.pack(nhwc[..., g * cg:(g + 1) * cg], 64, saz) for g in range(groups)], axis=3)
    assert np.array_equal(got, want)
    xf = np.ascontiguousarray(x if x.dtype != np.float16 else x.astype(np.float32))
    for kernel_fn in (kp.pack_nchw_into, kp.pack_nchw_into_serial):
        out = np.full_like(got, ~np.uint64(0))
        out[:, :t] = out[:, t + h:] = out[:, :, :left] = out[:, :, left + w:] = 0
        assert kernel_fn(xf.reshape(-1), n, c, h, w, groups, out.reshape(-1), hp, wp, t, left,
                         saz == -1) == 0
        assert np.array_equal(out, want)
    if x.dtype.kind == "f":
        x[-1, -1, -1, -1] = np.nan
        with pytest.raises(ValueError, match=r"^x contains NaN"):
            plan.pack_input_nchw(x, saz)


def test_bconv2d_nchw_equals_bconv2d_of_the_transpose():
    """Including maps of more than one block of NCHW_BLOCK_PIXELS (37x33: blocks of 31 rows, the
    last one short) and inputs large enough for the threaded packing kernel."""
    from refbnn.kernels.packing import NCHW_BLOCK_PIXELS
    from refbnn.ops.packing import PACK_PARALLEL_MIN_VALUES

    rng = np.random.default_rng(5)
    assert 37 * 33 > NCHW_BLOCK_PIXELS and 37 % (NCHW_BLOCK_PIXELS // 33)
    for c, groups, stride, pad_value, hw in ((70, 1, 1, 0, (9, 8)), (48, 2, 2, 1, (37, 33)),
                                             (3, 3, 1, -1, (9, 8)), (130, 2, 1, 0, (37, 33))):
        x = rng.standard_normal((2, c, *hw)).astype(np.float32)
        x[0, 0, :2] = 0.0
        k = rng.standard_normal((3, 3, c // groups, 6)).astype(np.float32)
        for saz in (1, -1):
            want = refbnn.bconv2d(x.transpose(0, 2, 3, 1), k, stride, 1, pad_value,
                                  groups=groups, sign_at_zero=saz)
            got = refbnn.ops.bconv2d_nchw(x, k, stride, 1, pad_value, groups=groups,
                                          sign_at_zero=saz)
            assert np.array_equal(got, want)
            assert np.array_equal(got, ref.bconv2d(x.transpose(0, 2, 3, 1), k, stride, 1,
                                                   pad_value, groups=groups, sign_at_zero=saz))
    assert x.size >= PACK_PARALLEL_MIN_VALUES  # the last case ran the threaded kernel
