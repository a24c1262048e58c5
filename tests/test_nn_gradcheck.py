"""Finite-difference gradient checks (float64) of every real-valued layer.

Layers compute in the dtype of their input; parameters are switched to float64 here so that the
central differences ``(L(v + e) - L(v - e)) / 2e`` with ``e = 1e-6`` are accurate to ~1e-8.
Parameter gradients are stored as float32 (``Parameter.accumulate``), so they are compared with
a relative tolerance of 1e-5 (float32 rounding is 6e-8 relative; the rest is slack).
"""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from refbnn import nn
from refbnn.nn import functional as F

EPS = 1e-6


def _to64(module):
    for p in module.parameters():
        p.data = p.data.astype(np.float64)
        p.grad = None


def _randomise_params(module, rng):
    for p in module.parameters():
        p.data = p.data + rng.uniform(-0.5, 0.5, size=p.shape)


def gradcheck(module, x, rng, n_probe=12):
    """Compare backward with central differences of L = sum(forward(x) * r)."""
    _to64(module)
    _randomise_params(module, rng)
    module.train()
    y = module.forward(x)
    r = rng.standard_normal(y.shape)
    module.zero_grad()
    dx = module.backward(r.copy())
    assert dx.shape == x.shape and dx.dtype == np.float64

    def loss():
        return float((module.forward(x) * r).sum())

    flat = x.reshape(-1)
    for idx in rng.choice(flat.size, size=min(n_probe, flat.size), replace=False):
        old = flat[idx]
        flat[idx] = old + EPS
        lp = loss()
        flat[idx] = old - EPS
        lm = loss()
        flat[idx] = old
        num = (lp - lm) / (2 * EPS)
        assert abs(num - dx.reshape(-1)[idx]) <= 1e-6 * (1 + abs(num)), (idx, num, dx.reshape(-1)[idx])
    for name, p in module.named_parameters():
        pf = p.data.reshape(-1)
        for idx in rng.choice(pf.size, size=min(n_probe, pf.size), replace=False):
            old = pf[idx]
            pf[idx] = old + EPS
            lp = loss()
            pf[idx] = old - EPS
            lm = loss()
            pf[idx] = old
            num = (lp - lm) / (2 * EPS)
            got = float(p.grad.reshape(-1)[idx])
            assert abs(num - got) <= 1e-5 * (1 + abs(num)), (name, idx, num, got)


seeds = st.integers(0, 2**31 - 1)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
       st.integers(1, 2), st.integers(0, 2), st.integers(1, 2), st.booleans(), seeds,
       st.sampled_from([0, 10**9]))
def test_conv2d(n, cg, og, k, stride, pad, dil, bias, seed, chunk_bytes):
    # chunk_bytes 0: conv2d_backward_fused works one image at a time; else in one chunk
    old = F.CHUNK_BYTES, F.CHUNK_MIN_PIXELS
    F.CHUNK_BYTES, F.CHUNK_MIN_PIXELS = chunk_bytes, chunk_bytes
    try:
        _check_conv2d(n, cg, og, k, stride, pad, dil, bias, seed)
    finally:
        F.CHUNK_BYTES, F.CHUNK_MIN_PIXELS = old


def _check_conv2d(n, cg, og, k, stride, pad, dil, bias, seed):
    rng = np.random.default_rng(seed)
    groups = int(rng.integers(1, 3))
    size = (k - 1) * dil + 1 + int(rng.integers(0, 4))
    m = nn.Conv2d(cg * groups, og * groups, (k, max(1, k - 1)), stride=(stride, 1),
                  padding=(pad, min(pad, 1)), dilation=dil, groups=groups, bias=bias)
    gradcheck(m, rng.standard_normal((n, cg * groups, size, size + 1)), rng)


@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.booleans(), seeds)
def test_linear(n, fin, fout, bias, seed):
    rng = np.random.default_rng(seed)
    gradcheck(nn.Linear(fin, fout, bias=bias), rng.standard_normal((n, fin)), rng)


@given(st.integers(2, 4), st.integers(1, 4), st.integers(1, 4), seeds)
def test_batchnorm2d(n, c, h, seed):
    rng = np.random.default_rng(seed)
    gradcheck(nn.BatchNorm2d(c), rng.standard_normal((n, c, h, h + 1)) * 3 + 1, rng)


@given(st.integers(2, 5), st.integers(1, 4), st.sampled_from([None, 3]), seeds)
def test_batchnorm1d(n, c, length, seed):
    rng = np.random.default_rng(seed)
    shape = (n, c) if length is None else (n, c, length)
    gradcheck(nn.BatchNorm1d(c), rng.standard_normal(shape), rng)


def _away_from_zero(rng, shape):
    """Normal values with |x| >= 0.01, so that no kink lies within EPS of a probe."""
    x = rng.standard_normal(shape)
    return np.where(np.abs(x) < 0.01, 0.5, x)


@given(st.integers(1, 4), st.integers(1, 4), seeds)
def test_activations(n, c, seed):
    rng = np.random.default_rng(seed)
    x = _away_from_zero(rng, (n, c, 3, 2))
    gradcheck(nn.ReLU(), x.copy(), rng)
    gradcheck(nn.PReLU(), x.copy(), rng)
    gradcheck(nn.PReLU(c), x.copy(), rng)
    gradcheck(nn.FPReLU(c), x.copy(), rng)
    gradcheck(nn.FPReLU(c), x[:, :, 0, 0].copy(), rng)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(0, 1),
       st.booleans(), seeds)
def test_pools(k, s, extra, pad, include_pad, seed):
    rng = np.random.default_rng(seed)
    pad = min(pad, k // 2)
    x = rng.standard_normal((2, 2, k + extra + 1, k + extra))
    gradcheck(nn.MaxPool2d(k, s, pad), x.copy(), rng)
    gradcheck(nn.AvgPool2d(k, s, pad, count_include_pad=include_pad), x.copy(), rng)
    gradcheck(nn.GlobalAvgPool2d(), x.copy(), rng)


@given(st.integers(1, 3), seeds)
def test_structural(times, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 4, 4))
    gradcheck(nn.ChannelRepeat(times), x.copy(), rng)
    gradcheck(nn.Flatten(), x.copy(), rng)
    block = nn.Residual(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)),
                        nn.Sequential(nn.AvgPool2d(1), nn.Conv2d(3, 3, 1)))
    gradcheck(block, x.copy(), rng)
    gradcheck(nn.Residual(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.FPReLU(3))), x.copy(),
              rng)


@given(st.integers(1, 3), st.integers(1, 4), seeds)
def test_binary_layers_with_real_input_are_linear_in_x(n, c, seed):
    # binarize_input=False: the layer is a linear map of x with weights alpha * sign(W), so its
    # input gradient is exact (the weight gradient is an estimator and is checked elsewhere).
    rng = np.random.default_rng(seed)
    for scale in ("none", "mean_abs"):
        m = nn.BinaryConv2d(c, 2, scale=scale, binarize_input=False)
        _to64(m)
        x = rng.standard_normal((n, c, 4, 5))
        y = m.forward(x)
        r = rng.standard_normal(y.shape)
        dx = m.backward(r)
        idx = tuple(rng.integers(0, s) for s in x.shape)
        xp, xm = x.copy(), x.copy()
        xp[idx] += EPS
        xm[idx] -= EPS
        num = ((m.forward(xp) - m.forward(xm)) * r).sum() / (2 * EPS)
        assert abs(num - dx[idx]) <= 1e-6 * (1 + abs(num))
