"""The LCE ops of the oracle (refbnn.reference): padded_tap_sum is exactly the difference between
one-padding and zero padding, and output_transform_lce_zero_padding equals LCE's formula applied
to the one-padded accumulator plus one rounded correction, only on border pixels."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from refbnn import reference


@given(st.integers(1, 7), st.integers(1, 7), st.integers(1, 5), st.integers(1, 4), st.sampled_from([1, 2]),
       st.sampled_from([1, 2]), st.sampled_from([1, 3]), st.integers(0, 2**31 - 1))
def test_padded_tap_sum_is_one_padding_minus_zero_padding(h, w, c, o, stride, dil, k, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, h, w, c)).astype(np.float32)
    kernel = rng.standard_normal((k, k, c, o)).astype(np.float32)
    if (k - 1) * dil + 1 > max(h, w) + 2 * k:
        return
    zero = reference.bconv2d(x, kernel, stride, "same", 0, dil)
    one = reference.bconv2d(x, kernel, stride, "same", 1, dil)
    corr, has_pad = reference.padded_tap_sum(kernel, (h, w), "same", stride, dil)
    assert np.array_equal(one, zero + corr)
    assert not corr[~has_pad].any()


def test_zero_padding_transform_is_lce_formula_plus_a_rounded_correction():
    acc = np.array([[[[3, -5]], [[1, 7]]]])  # (1, OH=2, OW=1, O=2)
    corr = np.array([[[2, -2]], [[0, 0]]])  # acc + corr has the parity of k (every tap counts)
    has_pad = np.array([[True], [False]])
    m = np.array([0.1, -0.3], np.float32)
    b = np.array([0.7, 1.1], np.float32)
    y = reference.output_transform_lce_zero_padding(acc, corr, has_pad, 9, m, b)
    base = reference.output_transform_lce(acc + corr, 9, m, b)
    c = ((-m) * corr.astype(np.float32)).astype(np.float32)
    assert y.dtype == np.float32
    assert np.array_equal(y[0, 0], (base[0, 0] + c[0]).astype(np.float32))
    assert np.array_equal(y[0, 1], base[0, 1])  # interior pixel: untouched
    # the definition's value, up to float32 rounding: m * acc + b with the zero-padded acc
    assert np.allclose(y, (m * acc + b), rtol=1e-6, atol=1e-6)
