"""Bi-Real's alpha (refbnn.scale.mean_abs_scale) against an independent exact computation: the mean
of |W| as a Fraction (exact), then the nearest float32 chosen by exact comparison, ties to even."""

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from refbnn import nn
from refbnn.scale import mean_abs_scale


def _nearest_f32(q: Fraction) -> np.float32:
    c = np.float32(float(q))
    best = None
    for cand in (np.nextafter(c, np.float32(-np.inf)), c, np.nextafter(c, np.float32(np.inf))):
        if not np.isfinite(cand) or cand < 0:
            continue
        d = abs(Fraction(float(cand)) - q)
        even = int(np.array(cand, np.float32).view(np.uint32)) % 2 == 0
        key = (d, not even)
        if best is None or key < best[0]:
            best = (key, cand)
    return np.float32(best[1])


def _oracle(w, dtype=np.float32):
    w = np.asarray(w, np.float64).reshape(len(w), -1)
    means = [sum(Fraction(abs(float(v))) for v in row) / row.size for row in w]
    if dtype == np.float64:
        return np.array([float(q) for q in means])  # Fraction -> float is correctly rounded
    return np.array([_nearest_f32(q) for q in means], np.float32)


def _bits(a):
    return np.asarray(a).view(np.uint32 if np.asarray(a).dtype == np.float32 else np.uint64)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 40)),
                  elements=st.floats(-8.0, 8.0, width=32)),
       st.integers(-40, 40))
def test_matches_exact_oracle_off_grid(w, shift):
    """Any float32 weights (scaled by 2**shift: other binades, subnormals at the low end)."""
    w = (w * np.float32(2.0 ** shift)).astype(np.float32)
    assert np.array_equal(_bits(mean_abs_scale(w)), _bits(_oracle(w)))
    assert np.array_equal(_bits(mean_abs_scale(w, np.float64)), _bits(_oracle(w, np.float64)))


def test_ordinary_weights_differ_from_a_float32_mean():
    """Trained-looking weights (O, I, 3, 3): the exact alpha matches the oracle in every channel,
    while NumPy's float32 mean is off by an ulp or more in many channels (why this is defined)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 32, 3, 3)) * 0.03).astype(np.float32)
    got = mean_abs_scale(w)
    assert np.array_equal(_bits(got), _bits(_oracle(w)))
    naive = np.abs(w).reshape(64, -1).mean(axis=1)
    assert (naive != got).sum() >= 5
    fsum = np.array([math.fsum(np.abs(r).astype(float)) / r.size for r in w.reshape(64, -1)],
                    np.float64).astype(np.float32)
    assert np.array_equal(fsum, got)  # no trap here: fsum agrees on ordinary weights


def test_double_rounding_trap():
    """sum = 2 + 2**-23 + 2**-100 over 4 weights: the exact mean is just above the float32 midpoint
    0.5 + 2**-25, so it rounds up; fsum (and any float64 sum) drops 2**-100 first, lands on the
    midpoint and rounds to even (0.5): wrong."""
    w = np.array([[1.0, 1.0, 2.0 ** -23, 2.0 ** -100]], np.float32)
    up = np.nextafter(np.float32(0.5), np.float32(1))
    assert mean_abs_scale(w)[0] == up == _oracle(w)[0]
    assert np.float32(math.fsum([1.0, 1.0, 2.0 ** -23, 2.0 ** -100]) / 4) == np.float32(0.5)
    tie = np.array([[1.0, 1.0, 2.0 ** -23, 0.0]], np.float32)  # exactly the midpoint: to even
    assert mean_abs_scale(tie)[0] == np.float32(0.5) == _oracle(tie)[0]


def test_edges():
    assert mean_abs_scale(np.zeros((2, 3), np.float32)).tolist() == [0.0, 0.0]
    tiny = np.full((1, 3), np.float32(1e-45))           # the smallest subnormal, 3 times
    assert mean_abs_scale(tiny)[0] == np.float32(1e-45)
    big = np.full((1, 9), np.finfo(np.float32).max)
    assert mean_abs_scale(big)[0] == np.finfo(np.float32).max
    assert mean_abs_scale(np.array([[-2.0, 2.0]], np.float32))[0] == 2.0
    for bad in (np.array([[np.nan]]), np.array([[np.inf]])):
        with pytest.raises(ValueError, match="NaN or infinity"):
            mean_abs_scale(bad)
    with pytest.raises(ValueError, match="shape"):
        mean_abs_scale(np.zeros((0, 3)))


def test_layers_use_it():
    """BinaryConv2d / BinaryLinear with scale="mean_abs" scale by exactly this alpha."""
    conv = nn.BinaryConv2d(3, 4, 3, scale="mean_abs")
    rng = np.random.default_rng(1)
    conv.weight.data = (rng.standard_normal(conv.weight.data.shape) * 0.05).astype(np.float32)
    assert np.array_equal(conv.weight_scale(), mean_abs_scale(conv.weight.data))
    lin = nn.BinaryLinear(7, 5, scale="mean_abs")
    assert np.array_equal(lin.weight_scale(), mean_abs_scale(lin.weight.data))
