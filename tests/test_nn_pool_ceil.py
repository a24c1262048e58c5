"""AvgPool2d's ceil_mode (used by the downsampling shortcuts on odd maps) against PyTorch, and its
gradient against finite differences."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refbnn import nn

cases = st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 3), st.integers(1, 3),
                  st.integers(0, 1), st.booleans(), st.integers(0, 2**31))


def _valid(h, w, k, s, p):
    return 2 * p <= k and h + 2 * p >= k and w + 2 * p >= k


@given(cases)
def test_ceil_mode_matches_torch(case):
    torch = pytest.importorskip("torch")
    h, w, k, s, p, cip, seed = case
    if not _valid(h, w, k, s, p):
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, h, w))
    layer = nn.AvgPool2d(k, s, p, count_include_pad=cip, ceil_mode=True)
    y = layer.forward(x)
    g = rng.standard_normal(y.shape)
    dx = layer.backward(g)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.avg_pool2d(xt, k, s, p, ceil_mode=True, count_include_pad=cip)
    yt.backward(torch.tensor(g))
    # float64 on both sides: the same sums in possibly different order, a few ulp apart
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_odd_map_shrinks_like_a_stride_two_conv():
    x = np.arange(49, dtype=np.float64).reshape(1, 1, 7, 7)
    y = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False).forward(x)
    assert y.shape == (1, 1, 4, 4)
    assert y[0, 0, 3, 3] == 48.0                      # the lone corner pixel
    assert y[0, 0, 0, 3] == (6 + 13) / 2              # last column: two pixels
    assert y[0, 0, 0, 0] == (0 + 1 + 7 + 8) / 4


def test_ceil_mode_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2, 5, 7))
    layer = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
    g = rng.standard_normal(layer.forward(x).shape)
    dx = layer.backward(g)
    eps = 1e-6
    num = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        num[idx] = ((layer.forward(xp) * g).sum() - (layer.forward(xm) * g).sum()) / (2 * eps)
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-8)
