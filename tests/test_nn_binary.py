"""BinaryConv2d / BinaryLinear: exact integer forward against the oracle and the packed kernels,
the straight-through gradients against their formulas and against the float conv backward."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refbnn
from refbnn import nn, reference
from refbnn.nn import functional as F
from refbnn.nn.binary import act_grad_factor
from refbnn.nn.functional import conv2d


@st.composite
def bconv_case(draw):
    groups = draw(st.integers(1, 3))
    cg, og = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    kh, kw = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 3]))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pad = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    h = draw(st.integers(max(1, (kh - 1) * dil[0] + 1 - 2 * pad[0]), 8))
    w = draw(st.integers(max(1, (kw - 1) * dil[1] + 1 - 2 * pad[1]), 8))
    n = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cg * groups, h, w)).astype(np.float32)
    x.reshape(-1)[::7] = 0.0  # exact zeros exercise sign(0)
    layer = nn.BinaryConv2d(cg * groups, og * groups, (kh, kw), stride, pad, dil, groups)
    wt = rng.standard_normal(layer.weight.shape).astype(np.float32)
    wt.reshape(-1)[::5] = 0.0
    layer.weight.data = wt
    # forward on the packed kernels or on the float GEMM of +-1 values: both must be exact
    layer.use_packed = draw(st.booleans())
    return layer, x


def _nhwc(x):
    return x.transpose(0, 2, 3, 1)


def _hwio(w):
    return w.transpose(2, 3, 1, 0)


@given(bconv_case(), st.sampled_from([1, -1]), st.sampled_from([0, 1, -1]))
def test_accumulators_equal_reference(case, sign_at_zero, pad_value):
    layer, x = case
    layer.sign_at_zero, layer.pad_value = sign_at_zero, float(pad_value)
    acc = layer.accumulators(x)
    ref = reference.bconv2d(_nhwc(x), _hwio(layer.weight.data), stride=layer.stride,
                            padding=layer.padding, pad_value=pad_value, dilation=layer.dilation,
                            groups=layer.groups, sign_at_zero=sign_at_zero)
    np.testing.assert_array_equal(_nhwc(acc), ref)
    # training forward (scale "none") returns exactly the accumulators
    np.testing.assert_array_equal(layer.forward(x), acc)


@given(bconv_case(), st.sampled_from([1, -1]), st.sampled_from([0, 1, -1]))
def test_accumulators_equal_packed_kernels(case, sign_at_zero, pad_value):
    layer, x = case
    layer.use_packed = False  # the float GEMM path against the packed kernels
    layer.sign_at_zero, layer.pad_value = sign_at_zero, float(pad_value)
    packed = refbnn.bconv2d(_nhwc(x), _hwio(layer.weight.data), stride=layer.stride,
                            padding=layer.padding, pad_value=pad_value, dilation=layer.dilation,
                            groups=layer.groups, sign_at_zero=sign_at_zero)
    np.testing.assert_array_equal(_nhwc(layer.accumulators(x)), packed)


@given(bconv_case())
def test_ternary_sign_and_real_input(case):
    layer, x = case
    w = layer.weight.data.astype(np.float64)
    args = (layer.stride, layer.padding, layer.dilation, layer.groups)
    layer.sign_at_zero = 0
    np.testing.assert_array_equal(layer.accumulators(x),
                                  conv2d(np.sign(x).astype(np.float64), np.sign(w), *args))
    layer.sign_at_zero, layer.binarize_input = 1, False
    expect = conv2d(x.astype(np.float64), np.where(w >= 0, 1.0, -1.0), *args)
    # float32 GEMM of real x with +-1 weights, K <= 45 terms of size ~3: 1e-5 absolute
    np.testing.assert_allclose(layer.accumulators(x), expect, rtol=0, atol=1e-5)


@given(bconv_case())
def test_mean_abs_scale(case):
    layer, x = case
    layer.scale = "mean_abs"
    y = layer.forward(x)
    acc = reference.bconv2d(_nhwc(x), _hwio(layer.weight.data), stride=layer.stride,
                            padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
    alpha = np.abs(layer.weight.data.astype(np.float64)).reshape(layer.out_channels, -1).mean(1)
    # one float32 product of an exact integer and alpha (itself a float32 mean): 1e-6 relative
    np.testing.assert_allclose(_nhwc(y), acc * alpha, rtol=1e-6, atol=1e-30)


def _ste_literal(v, kind):
    if kind == "ste":
        return 1.0 if abs(v) <= 1 else 0.0
    if kind == "approx_sign":
        if -1 <= v < 0:
            return 2 + 2 * v
        if 0 <= v < 1:
            return 2 - 2 * v
        return 0.0
    return 1.0


@pytest.mark.parametrize("kind", ["ste", "approx_sign", "identity"])
def test_act_grad_formulas(kind):
    pts = [-2.0, -1.0, -0.999, -0.5, -1e-7, 0.0, 1e-7, 0.25, 0.5, 0.999, 1.0, 1.001, 3.0]
    rng = np.random.default_rng(0)
    vals = np.array(pts + list(rng.uniform(-1.5, 1.5, 50)))
    for dtype in (np.float32, np.float64):
        got = act_grad_factor(vals.astype(dtype), kind)
        expect = [_ste_literal(float(v), kind) for v in vals.astype(dtype)]
        np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="act_grad"):
        act_grad_factor(vals, "tanh")


@given(bconv_case(), st.sampled_from(["ste", "approx_sign", "identity"]),
       st.sampled_from(["none", "mean_abs"]), st.sampled_from([0, 1, -1]),
       st.sampled_from([0, 10**9]))
def test_backward_equals_masked_float_conv(case, kind, scale, pad_value, tap_major_max):
    # tap_major_max selects conv2d_backward_fused's channel-major (0) or tap-major (1e9) columns
    old = F.TAP_MAJOR_MAX_P
    F.TAP_MAJOR_MAX_P = tap_major_max
    try:
        _check_backward(*case, kind, scale, pad_value)
    finally:
        F.TAP_MAJOR_MAX_P = old


def _check_backward(layer, x, kind, scale, pad_value):
    x = x.astype(np.float64)
    layer.weight.data = (layer.weight.data * 0.8).astype(np.float64)  # some |W| > 1, some <= 1
    layer.act_grad, layer.scale, layer.pad_value = kind, scale, float(pad_value)
    y = layer.forward(x)
    dy = np.random.default_rng(3).standard_normal(y.shape)
    dx = layer.backward(dy.copy())
    # the same computation spelled out with a float Conv2d on the padded +-1 input
    w = layer.weight.data
    wb = np.where(w >= 0, 1.0, -1.0)
    alpha = np.abs(w).reshape(len(w), -1).mean(1) if scale == "mean_abs" else np.ones(len(w))
    ph, pw = layer.padding
    xb = np.pad(np.where(x >= 0, 1.0, -1.0), ((0, 0), (0, 0), (ph, ph), (pw, pw)),
                constant_values=float(pad_value))
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, 0,
                     layer.dilation, layer.groups)
    conv.weight.data = wb * alpha[:, None, None, None]
    np.testing.assert_allclose(conv.forward(xb), y, rtol=1e-12, atol=1e-12)
    dxb = conv.backward(dy.copy())[:, :, ph:ph + x.shape[2], pw:pw + x.shape[3]]
    g = np.vectorize(lambda v: _ste_literal(v, kind))(x)
    np.testing.assert_allclose(dx, dxb * g, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.weight.grad, conv.weight.grad * (np.abs(w) <= 1),
                               rtol=1e-6, atol=1e-6)  # both stored as float32


@given(st.integers(1, 4), st.integers(1, 70), st.integers(1, 4), st.sampled_from([1, -1]),
       st.integers(0, 2**31 - 1))
def test_binary_linear(n, fin, fout, sign_at_zero, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, fin)).astype(np.float32)
    x.reshape(-1)[::4] = 0
    layer = nn.BinaryLinear(fin, fout, bias=True, scale="mean_abs", sign_at_zero=sign_at_zero,
                            act_grad="ste")
    layer.weight.data = rng.uniform(-1.3, 1.3, (fout, fin)).astype(np.float32)
    acc = layer.accumulators(x)
    np.testing.assert_array_equal(acc, reference.bgemm(x, layer.weight.data, sign_at_zero))
    alpha = np.abs(layer.weight.data.astype(np.float64)).mean(1)
    y = layer.forward(x)
    np.testing.assert_allclose(y, acc * alpha + layer.bias.data, rtol=1e-5, atol=1e-5)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = layer.backward(dy)
    xb = reference.sign(x, sign_at_zero)
    wq = reference.sign(layer.weight.data, sign_at_zero) * alpha[:, None]
    np.testing.assert_allclose(dx, (dy @ wq) * (np.abs(x) <= 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.weight.grad,
                               (dy.T @ xb) * (np.abs(layer.weight.data) <= 1), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(layer.bias.grad, dy.sum(0), rtol=1e-5, atol=1e-5)


def test_bad_input_and_options():
    layer = nn.BinaryConv2d(2, 2)
    x = np.zeros((1, 2, 3, 3), np.float32)
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^BinaryConv2d: input contains NaN"):
        layer.forward(x)
    with pytest.raises(ValueError, match="channels"):
        layer.forward(np.zeros((1, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match="scale"):
        nn.BinaryConv2d(2, 2, scale="max")
    with pytest.raises(ValueError, match="sign_at_zero"):
        nn.BinaryConv2d(2, 2, sign_at_zero=2)
    with pytest.raises(ValueError, match="pad_value"):
        nn.BinaryConv2d(2, 2, pad_value=0.5)
    layer.eval()
    layer.forward(np.zeros((1, 2, 3, 3), np.float32))
    with pytest.raises(RuntimeError, match="backward"):
        layer.backward(np.zeros((1, 2, 3, 3), np.float32))


@given(bconv_case())
def test_accumulators_do_not_disturb_a_pending_backward(case):
    layer, x = case
    y = layer.forward(x)
    dy = np.random.default_rng(5).standard_normal(y.shape).astype(np.float32)
    dx_plain = layer.backward(dy.copy())
    g_plain = layer.weight.grad.copy()
    layer.zero_grad()
    layer.forward(x)
    layer.accumulators(-x)  # another input in between
    np.testing.assert_array_equal(layer.backward(dy.copy()), dx_plain)
    np.testing.assert_array_equal(layer.weight.grad, g_plain)
