"""bits.py: sign table, word conversion, validation — checked against hand-worked values and the oracle."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from refbnn import bits, reference


def test_sign_table_default_and_caffe():
    x = np.array([2.5, 0.0, -0.0, -1e-30, 1e-30, np.inf, -np.inf], dtype=np.float32)
    assert bits.sign(x).tolist() == [1, 1, 1, -1, 1, 1, -1]
    assert bits.sign(x, sign_at_zero=-1).tolist() == [1, -1, -1, -1, 1, 1, -1]


def test_sign_rejects_nan_and_ternary():
    with pytest.raises(ValueError, match="NaN"):
        bits.sign(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="ternary"):
        bits.sign(np.array([1.0]), sign_at_zero=0)


def test_words_for():
    assert [bits.words_for(n, 64) for n in (1, 63, 64, 65, 128)] == [1, 1, 1, 2, 2]
    assert [bits.words_for(n, 32) for n in (1, 32, 33, 64, 65)] == [1, 1, 2, 2, 3]


def test_lce_word_layout_by_hand():
    # channels 0, 2 and 33 negative out of 40: 64-bit word = 2^0 + 2^2 + 2^33;
    # LCE words: word 0 = 0b101 = 5, word 1 = bit 1 = 2.
    x = np.ones(40)
    x[[0, 2, 33]] = -1
    w64 = reference.pack(x, 64)
    assert w64.tolist() == [1 + 4 + 2**33]
    assert bits.words64_to_words32(w64, 40).tolist() == [5, 2]


@given(st.integers(1, 200), st.integers(0, 3), st.data())
def test_word_conversion_matches_oracle_32bit_packing(n, lead, data):
    x = data.draw(hnp.arrays(np.float32, (lead, n), elements=st.sampled_from([-1.0, 0.0, 2.0])))
    w64 = reference.pack(x, 64)
    w32 = bits.words64_to_words32(w64, n)
    assert w32.dtype == np.int32
    np.testing.assert_array_equal(w32.view(np.uint32), reference.pack(x, 32))
    np.testing.assert_array_equal(bits.words32_to_words64(w32, n), w64)


def test_word_conversion_rejects_wrong_word_count():
    with pytest.raises(ValueError, match="need 2 uint64 words"):
        bits.words64_to_words32(np.zeros(1, np.uint64), 100)
    with pytest.raises(ValueError, match="32-bit words"):
        bits.words32_to_words64(np.zeros(1, np.int32), 100)


@given(hnp.arrays(st.sampled_from([np.uint64, np.int64, np.uint32, np.int32, np.uint8]),
                  hnp.array_shapes(min_dims=0, max_dims=3, max_side=4)))
def test_popcount_counts_bits_like_python(words):
    """bits.popcount (NumPy 1.26-safe) against Python's bin(): any shape incl. 0-d, signed too."""
    got = bits.popcount(words)
    assert got.shape == words.shape and got.dtype == np.uint8
    width = 8 * words.dtype.itemsize
    expected = [bin(int(v) % (1 << width)).count("1") for v in words.reshape(-1)]
    assert got.reshape(-1).tolist() == expected


def test_popcount_rejects_floats():
    with pytest.raises(ValueError, match="integer"):
        bits.popcount(np.zeros(3))
