"""The oracle itself, checked against independent definitions: hand-worked cases, a literal
seven-loop convolution, the popcount identity, and PyTorch's conv2d when installed."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refbnn import reference


def loop_bconv2d(x, k, stride, pads, pad_value, dilation, groups, sign_at_zero=1):
    """The definition in docs/semantics.md section 3, one multiply-add at a time."""
    xs, ks = reference.sign(x, sign_at_zero), reference.sign(k, sign_at_zero)
    n, h, w, _ = xs.shape
    kh, kw, cg, o = ks.shape
    top, bottom, left, right = pads
    oh = (h + top + bottom - (kh - 1) * dilation - 1) // stride + 1
    ow = (w + left + right - (kw - 1) * dilation - 1) // stride + 1
    og = o // groups
    out = np.zeros((n, oh, ow, o), dtype=np.int64)
    for b, i, j, oc in itertools.product(range(n), range(oh), range(ow), range(o)):
        g = oc // og
        total = 0
        for a, bb, ci in itertools.product(range(kh), range(kw), range(cg)):
            r, s = i * stride + a * dilation - top, j * stride + bb * dilation - left
            v = xs[b, r, s, g * cg + ci] if 0 <= r < h and 0 <= s < w else pad_value
            total += int(v * ks[a, bb, ci, oc])
        out[b, i, j, oc] = total
    return out


conv_cases = st.tuples(
    st.integers(1, 2), st.integers(1, 6), st.integers(1, 6), st.integers(1, 3), st.integers(1, 3),
    st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(1, 2),
    st.sampled_from([0, 1, -1]), st.sampled_from([1, -1]), st.integers(0, 2**31))


@given(conv_cases)
def test_oracle_equals_literal_loops(case):
    n, h, w, cg, og, kh, kw, stride, groups, pad_value, saz, seed = case
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, (n, h, w, cg * groups)).astype(np.float32)   # exact zeros included
    k = rng.integers(-2, 3, (kh, kw, cg, og * groups)).astype(np.float32)
    pads = tuple(int(v) for v in rng.integers(0, 3, 4))
    if h + pads[0] + pads[1] < kh or w + pads[2] + pads[3] < kw:
        return
    got = reference.bconv2d(x, k, stride, pads, pad_value, 1, groups, saz)
    np.testing.assert_array_equal(got, loop_bconv2d(x, k, stride, pads, pad_value, 1, groups, saz))


@given(st.integers(1, 130), st.integers(1, 3), st.integers(0, 2**31))
def test_valid_conv_is_k_minus_twice_popcount(c, ksize, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, ksize, ksize, c))
    k = rng.standard_normal((ksize, ksize, c, 1))
    acc = reference.bconv2d(x, k, padding="valid")
    xw = reference.pack(x.reshape(1, -1))
    ww = reference.pack(k[..., 0].reshape(1, -1))
    popcount = sum(bin(int(a) ^ int(b)).count("1") for a, b in zip(xw[0], ww[0]))
    assert acc.item() == ksize * ksize * c - 2 * popcount


def test_same_padding_splits_like_tensorflow():
    # in 5, k 3, stride 2: out 3, total pad (3-1)*2+3-5 = 2 -> 1/1; in 6 -> total 1 -> 0 top, 1 bottom
    assert reference.explicit_padding("same", (5, 6), (3, 3), (2, 2), (1, 1)) == (1, 1, 0, 1)
    assert reference.explicit_padding("same", (7, 7), (3, 3), (1, 1), (2, 2)) == (2, 2, 2, 2)
    assert reference.explicit_padding((1, 2), (7, 7), (3, 3), (1, 1), (1, 1)) == (1, 1, 2, 2)


def test_zero_padding_counts_only_in_bounds_taps():
    # all +1 input and kernel, 3x3 same: corner sees 4 taps, edge 6, centre 9 (per channel)
    x = np.ones((1, 3, 3, 2))
    k = np.ones((3, 3, 2, 1))
    acc = reference.bconv2d(x, k, padding="same", pad_value=0)[0, :, :, 0]
    assert acc.tolist() == [[8, 12, 8], [12, 18, 12], [8, 12, 8]]
    acc1 = reference.bconv2d(x, k, padding="same", pad_value=1)[0, :, :, 0]
    assert (acc1 == 18).all()


def test_pack_unpack_by_hand():
    x = np.array([[-1.0, 0.0, -0.0, 3.0, -2.0]])
    assert reference.pack(x).tolist() == [[1 + 16]]
    assert reference.pack(x, sign_at_zero=-1).tolist() == [[1 + 2 + 4 + 16]]
    assert reference.unpack(np.array([[17]], np.uint64), 5).tolist() == [[-1, 1, 1, 1, -1]]


def test_output_transform_order_and_lce_variant():
    acc = np.arange(-9, 10, 2)
    m = np.float32(0.1)
    b = np.float32(-0.3)
    y = reference.output_transform(acc, m, b)
    expect = [np.float32(np.float32(np.float32(a) * m) + b) for a in acc]
    assert y.tolist() == expect
    y_lce = reference.output_transform_lce(acc, 9, m, b)
    np.testing.assert_allclose(y_lce, y, rtol=0, atol=4 * np.spacing(np.float32(1.0)))


def test_threshold_output_tie_follows_sign_at_zero():
    acc = np.array([-2, 0, 2])
    m = np.float32(1.0)
    assert reference.threshold_output(acc, m, 0.0).tolist() == [-1, 1, 1]
    assert reference.threshold_output(acc, m, 0.0, sign_at_zero=-1).tolist() == [-1, -1, 1]


def test_maxpool_ignores_padding_and_bgemm():
    x = -np.ones((1, 3, 3, 1))
    x[0, 0, 0, 0] = 1
    out = reference.maxpool2d(x, 2, 2, padding="same")[..., 0]
    assert out.tolist() == [[[1, -1], [-1, -1]]]
    a = np.array([[1.0, -1.0, 0.0]])
    b = np.array([[1.0, 1.0, 1.0], [-1.0, 1.0, -1.0]])
    assert reference.bgemm(a, b).tolist() == [[1, -3]]


@given(conv_cases.filter(lambda c: c[9] == 0 and c[10] == 1))
def test_oracle_equals_torch_conv_of_signs(case):
    torch = pytest.importorskip("torch")
    n, h, w, cg, og, kh, kw, stride, groups, _, _, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h + 2, w + 2, cg * groups))
    k = rng.standard_normal((kh, kw, cg, og * groups))
    got = reference.bconv2d(x, k, stride, (1, 1), 0, 1, groups)
    xt = torch.from_numpy(np.where(x >= 0, 1.0, -1.0).transpose(0, 3, 1, 2))
    kt = torch.from_numpy(np.where(k >= 0, 1.0, -1.0).transpose(3, 2, 0, 1).copy())
    want = torch.nn.functional.conv2d(xt, kt, stride=stride, padding=1, groups=groups)
    np.testing.assert_array_equal(got, want.numpy().transpose(0, 2, 3, 1).round().astype(np.int64))
