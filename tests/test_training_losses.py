"""cross_entropy: value against a literal float64 definition, gradient by finite differences,
stability for huge logits, NaN/inf surfacing, bad input, and PyTorch agreement."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refbnn.training import cross_entropy


def _literal(z, y, e):
    total = 0.0
    for row, label in zip(z.astype(np.float64), y):
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        logp = [v - lse for v in row]
        total += (1 - e) * -logp[label] + e * -sum(logp) / len(row)
    return total / len(y)


@given(st.integers(1, 5), st.integers(2, 6), st.sampled_from([0.0, 0.1, 0.5]),
       st.integers(0, 2**31 - 1))
def test_value_and_gradient(n, k, e, seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, k)) * 3
    y = rng.integers(0, k, n)
    loss, g = cross_entropy(z, y, e)
    assert abs(loss - _literal(z, y, e)) <= 1e-12 * (1 + abs(loss))
    eps = 1e-6
    for i in range(n):
        for j in range(k):
            zp, zm = z.copy(), z.copy()
            zp[i, j] += eps
            zm[i, j] -= eps
            num = (cross_entropy(zp, y, e)[0] - cross_entropy(zm, y, e)[0]) / (2 * eps)
            assert abs(num - g[i, j]) <= 1e-7


def test_huge_logits_are_stable_and_float32_stays_float32():
    z = np.array([[1e4, 0.0, -1e4], [-3e4, 3e4, 0.0]], dtype=np.float32)
    loss, g = cross_entropy(z, np.array([0, 0]))
    assert math.isclose(loss, 3e4, rel_tol=1e-6)  # row 0 contributes 0, row 1 contributes 6e4
    assert g.dtype == np.float32 and np.isfinite(g).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_give_nan(bad):
    z = np.zeros((2, 3), np.float32)
    z[1, 2] = bad
    loss, g = cross_entropy(z, np.array([0, 1]))
    assert math.isnan(loss) and np.isnan(g).all()


def test_bad_input():
    z = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="labels must lie"):
        cross_entropy(z, np.array([0, 3]))
    with pytest.raises(ValueError, match="labels must be"):
        cross_entropy(z, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="logits"):
        cross_entropy(z[0], np.array([0]))
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(z, np.array([0, 1]), 1.5)


def test_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    z = rng.standard_normal((16, 10)).astype(np.float32) * 4
    y = rng.integers(0, 10, 16)
    zt = torch.tensor(z, requires_grad=True)
    lt = torch.nn.functional.cross_entropy(zt, torch.tensor(y), label_smoothing=0.1)
    lt.backward()
    loss, g = cross_entropy(z, y, 0.1)
    # float32 log-sum-exp over 10 terms in a different order: 1e-6 relative
    assert math.isclose(loss, lt.item(), rel_tol=1e-6)
    np.testing.assert_allclose(g, zt.grad.numpy(), rtol=1e-5, atol=1e-7)
