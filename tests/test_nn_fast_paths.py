"""The training step's fast kernels against their NumPy oracles: max-pool (exact; symmetric and
"same" padding), the fused conv backward's im2col range (exact), tap-major col2im and the fused
gradients (stated tolerances); conv cases include asymmetric (bottom/right) padding."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refbnn.nn import _conv_kernels as CK
from refbnn.nn import functional as F
from refbnn.nn import pooling as P
from refbnn.nn.pooling import MaxPool2d

seeds = st.integers(0, 2**31 - 1)


@st.composite
def pool_case(draw, same=False):
    """``(x, kernel, stride, padding)``; ``same``: also TensorFlow's "same" padding (MaxPool2d)."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    h = draw(st.integers(max(1, kh - 2 * ph), 9))
    w = draw(st.integers(max(1, kw - 2 * pw), 9))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(seeds))
    # small integers: many ties between taps, which decide the arg-max
    x = rng.integers(-3, 4, (n, c, h, w)).astype(dtype)
    special = draw(st.sampled_from([None, -np.inf, np.nan, -0.0]))
    if special is not None:
        x.reshape(-1)[rng.integers(0, x.size, max(1, x.size // 6))] = special
    padding = "same" if same and draw(st.booleans()) else (ph, pw)
    return x, (kh, kw), (sh, sw), padding


@given(pool_case(same=True), st.booleans())
def test_max_pool_kernels_equal_oracle(case, training):
    x, k, s, p = case
    m = MaxPool2d(k, s, p)
    m.train(training)
    y = m.forward(x)
    kh, kw, sh, sw, ph, pw, oh, ow = m._geometry(x)
    ry, rarg = P.max_pool2d_reference(x, kh, kw, sh, sw, ph, pw, oh, ow)
    # same comparisons in the same order: identical values, NaNs and signs of zero
    np.testing.assert_array_equal(y, ry)
    assert y.dtype == x.dtype and np.array_equal(np.signbit(y), np.signbit(ry))
    if not training:
        return
    np.testing.assert_array_equal(m._cache[1], rarg)
    dy = np.random.default_rng(1).integers(-4, 5, y.shape).astype(x.dtype) * 0.25
    dx = m.backward(dy)
    rdx = P.max_pool2d_backward_reference(dy, rarg, x.shape, kh, kw, sh, sw, ph, pw)
    # the same additions in the same (tap, window) order: bit-identical
    np.testing.assert_array_equal(dx, rdx)
    assert dx.dtype == x.dtype


# --- conv backward: im2col ranges, tap-major columns, col2im, the fused gradients -------------
@st.composite
def conv_case(draw, max_groups=3):
    n = draw(st.integers(1, 4))
    groups = draw(st.integers(1, max_groups))
    cg = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    # symmetric, or one more row/column at the bottom/right (TensorFlow's "same")
    pb, pr = ph + draw(st.integers(0, 1)), pw + draw(st.integers(0, 1))
    h = draw(st.integers(max(1, (kh - 1) * dh + 1 - ph - pb), 7))
    w = draw(st.integers(max(1, (kw - 1) * dw + 1 - pw - pr), 7))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    x = np.random.default_rng(draw(seeds)).standard_normal((n, groups * cg, h, w)) * 1.3
    x = x.astype(dtype)
    x.reshape(-1)[::5] = 0.0  # exact zeros exercise the sign(0) conventions
    x.reshape(-1)[1::6] = 1.0  # and +-1 the straight-through estimators' edges
    x.reshape(-1)[2::6] = -1.0
    geom = F.ConvGeometry(x.shape, (groups, cg, kh, kw), (sh, sw), (ph, pb, pw, pr), (dh, dw),
                          groups)
    return x, geom


modes = st.sampled_from([None, 1, -1, 0])
pads = st.sampled_from([0.0, 1.0, -1.0])


@given(conv_case(), modes, pads, st.data())
def test_im2col_range_equals_oracle_columns(case, sign_at_zero, pad_value, data):
    x, geom = case
    n0 = data.draw(st.integers(0, geom.n - 1))
    n1 = data.draw(st.integers(n0 + 1, geom.n))
    p = geom.oh * geom.ow
    out = np.empty((geom.cols_shape[0], (n1 - n0) * p), dtype=x.dtype)
    CK.im2col_range_kernel(x, n0, n1, *geom.args, geom.oh, geom.ow, pad_value,
                           F.BINARIZE_MODES[sign_at_zero], out)
    ref = F.im2col_reference(x, *geom.args, pad_value, sign_at_zero, **geom.pads)
    np.testing.assert_array_equal(out, ref[:, n0 * p:n1 * p])  # copies: exact


@given(conv_case(), modes, pads, st.data())
def test_im2col_taps_equals_oracle_reordered(case, sign_at_zero, pad_value, data):
    x, geom = case
    n0 = data.draw(st.integers(0, geom.n - 1))
    n1 = data.draw(st.integers(n0 + 1, geom.n))
    g, p, taps = geom.groups, geom.oh * geom.ow, geom.kh * geom.kw
    cg = geom.c // g
    out = np.empty((g, (n1 - n0) * p, taps * cg), dtype=x.dtype)
    xs = np.empty((geom.h + geom.ph + geom.pb, geom.w + geom.pw + geom.pr, geom.c), dtype=x.dtype)
    CK.im2col_taps_kernel(x, n0, n1, g, *geom.args, geom.oh, geom.ow, pad_value,
                          F.BINARIZE_MODES[sign_at_zero], xs, out)
    ref = F.im2col_reference(x, *geom.args, pad_value, sign_at_zero, **geom.pads)[:, n0 * p:n1 * p]
    # rows (g, cl, a, b) -> (g, pixel, (a, b, cl))
    ref = ref.reshape(g, cg, taps, -1).transpose(0, 3, 2, 1).reshape(out.shape)
    np.testing.assert_array_equal(out, ref)


@given(conv_case(), st.sampled_from([None, "ste", "approx_sign"]), seeds)
def test_col2im_taps_equals_oracle(case, act_grad, seed):
    x, geom = case
    g, p, taps = geom.groups, geom.oh * geom.ow, geom.kh * geom.kw
    cg = geom.c // g
    dpm = np.random.default_rng(seed).standard_normal((g, geom.n * p, taps * cg)).astype(x.dtype)
    dx = np.empty_like(x)
    CK.col2im_taps_kernel(dpm, 0, geom.n, g, *geom.args, geom.oh, geom.ow, x,
                          F._GATES[act_grad], dx, np.empty((geom.h, geom.w, geom.c), x.dtype))
    cm = dpm.reshape(g, geom.n * p, taps, cg).transpose(0, 3, 2, 1).reshape(geom.cols_shape)
    ref = F.col2im_reference(cm, x.shape, *geom.args, **geom.pads)
    if act_grad:
        ref = ref * F.act_grad_factor(x, act_grad)
    # the same <= KH*KW = 9 O(1) terms per element added in another order, then one product:
    # a few ulp of the sum
    tol = 1e-5 if x.dtype == np.float32 else 1e-13
    np.testing.assert_allclose(dx, ref, rtol=tol, atol=tol)


def _definition_grads(dy, x, w, geom, pad_value, sign_at_zero, act_grad):
    """float64 ``(dx, dw)`` from the oracles: dW = dY cols^T, dcols = W^T dY, col2im, gate."""
    g, p = geom.groups, geom.oh * geom.ow
    og = geom.o // g
    cols = F.im2col_reference(x.astype(np.float64), *geom.args, pad_value, sign_at_zero,
                              **geom.pads)
    cols = cols.reshape(g, -1, geom.n * p)
    dym = dy.astype(np.float64).reshape(geom.n, g, og, p).transpose(1, 2, 0, 3)
    dym = dym.reshape(g, og, geom.n * p)
    wm = w.astype(np.float64).reshape(g, og, -1)
    dw = (dym @ cols.transpose(0, 2, 1)).reshape(w.shape)
    dcols = (wm.transpose(0, 2, 1) @ dym).reshape(geom.cols_shape)
    dx = F.col2im_reference(dcols, x.shape, *geom.args, **geom.pads)
    if act_grad:
        dx = dx * F.act_grad_factor(x.astype(np.float64), act_grad)
    return dx, dw


@given(conv_case(), st.integers(1, 3), modes, pads, st.sampled_from([None, "ste", "approx_sign"]),
       st.sampled_from(["x", "cols"]), st.sampled_from([0, 10**9]), st.booleans(), seeds)
def test_conv2d_backward_fused_equals_definition(case, og, sign_at_zero, pad_value,
                                                  act_grad, source, tap_major_max, tiny_chunks,
                                                  seed):
    with pytest.MonkeyPatch.context() as mp:
        _check_fused(mp, case, og, sign_at_zero, pad_value, act_grad, source, tap_major_max,
                     tiny_chunks, seed)


def _check_fused(monkeypatch, case, og, sign_at_zero, pad_value, act_grad, source, tap_major_max,
                 tiny_chunks, seed):
    import numba
    x, geom = case
    g = geom.groups
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((g * og, geom.c // g, geom.kh, geom.kw)).astype(x.dtype)
    geom = F.ConvGeometry(x.shape, w.shape, (geom.sh, geom.sw),
                          (geom.ph, geom.pb, geom.pw, geom.pr), (geom.dh, geom.dw), g)
    dy = rng.standard_normal((geom.n, geom.o, geom.oh, geom.ow)).astype(x.dtype)
    # both column layouts, one chunk per image or per thread range
    monkeypatch.setattr(F, "TAP_MAJOR_MAX_P", tap_major_max)
    if tiny_chunks:
        monkeypatch.setattr(F, "CHUNK_BYTES", 1)
        monkeypatch.setattr(F, "CHUNK_MIN_PIXELS", 1)
    kw = dict(x=x, pad_value=pad_value, sign_at_zero=sign_at_zero, act_grad=act_grad)
    if source == "cols":
        kw["cols"] = F.im2col(x, geom, pad_value, sign_at_zero)
    rdx, rdw = _definition_grads(dy, x, w, geom, pad_value, sign_at_zero, act_grad)
    old = numba.get_num_threads()
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            dx, dw = F.conv2d_backward_fused(dy, w, geom, **kw)
            dx2, dw2 = F.conv2d_backward_fused(dy, w, geom, **kw)
            # deterministic: the same partition and order on every call
            assert np.array_equal(dx, dx2) and np.array_equal(dw, dw2)
            assert dx.dtype == dw.dtype == x.dtype and dw.shape == w.shape
            # sums of <= 4*7*7 (dw) or 3*9 (dx) products of O(1) values in BLAS / chunk / tap
            # order against float64: float32 rounding of such sums stays below 1e-4
            tol = 1e-4 if x.dtype == np.float32 else 1e-10
            np.testing.assert_allclose(dw, rdw, rtol=tol, atol=tol)
            np.testing.assert_allclose(dx, rdx, rtol=tol, atol=tol)
            _, dw3 = F.conv2d_backward_fused(dy, w, geom, need_input_grad=False, **kw)
            np.testing.assert_array_equal(dw3, dw)
    finally:
        numba.set_num_threads(old)


def test_conv2d_backward_fused_rejects_missing_inputs():
    geom = F.ConvGeometry((1, 1, 3, 3), (1, 1, 3, 3), (1, 1), (1, 1), (1, 1), 1)
    dy = np.zeros((1, 1, 3, 3), np.float32)
    with pytest.raises(ValueError, match="x or cols"):
        F.conv2d_backward_fused(dy, np.zeros((1, 1, 3, 3), np.float32), geom)


# --- element-wise and layout kernels --------------------------------------------------------
@st.composite
def specials(draw, shape_max=5):
    shape = tuple(draw(st.lists(st.integers(1, shape_max), min_size=4, max_size=4)))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(seeds))
    x = rng.standard_normal(shape).astype(dtype)
    for v in (0.0, -0.0, 1.0, -1.0, np.inf, -np.inf):
        x.reshape(-1)[rng.integers(0, x.size, max(1, x.size // 8))] = v
    return x


@given(specials(), st.sampled_from([1, -1, 0]), st.booleans())
def test_sign_kernel_equals_binarize(x, sign_at_zero, with_nan):
    if with_nan:
        x.reshape(-1)[0] = np.nan
    out = np.empty_like(x)
    CK.sign_kernel(x.reshape(-1), F.BINARIZE_MODES[sign_at_zero], out.reshape(-1))
    ref = F.binarize(x, sign_at_zero)
    np.testing.assert_array_equal(out, ref)  # NaN positions compare equal too
    assert np.array_equal(np.signbit(out), np.signbit(ref))


@given(specials())
def test_accumulator_layout_kernel_is_an_exact_transpose(x):
    nhwc = x.transpose(0, 2, 3, 1)
    acc = np.random.default_rng(0).integers(-2**23, 2**23, nhwc.shape).astype(np.int32)
    back = np.empty(x.shape, x.dtype)
    CK.nhwc_to_nchw_kernel(acc, back)
    np.testing.assert_array_equal(back, acc.transpose(0, 3, 1, 2))  # |acc| < 2**24: exact


@given(specials())
def test_relu_backward_kernel_equals_where(x):
    from refbnn.nn import _act_kernels as AK
    dy = np.random.default_rng(3).standard_normal(x.shape).astype(x.dtype)
    dx = np.empty_like(dy)
    AK.relu_backward_kernel(x.reshape(-1), dy.reshape(-1), dx.reshape(-1))
    np.testing.assert_array_equal(dx, np.where(x > 0, dy, 0))


@given(specials(), st.integers(0, 3), st.sampled_from([1, 3, 1 << 14, (1 << 14) + 5]))
@np.errstate(invalid="ignore")  # inf + -inf is drawn
def test_add_kernel_equals_numpy_add(x, seed, size):
    from refbnn.nn import _elementwise_kernels as EK
    rng = np.random.default_rng(seed)
    big = rng.standard_normal(size).astype(x.dtype)
    for a in (x, big):  # the drawn specials, and sizes around one block
        b = np.roll(a, 1) * a.dtype.type(-0.5)
        np.testing.assert_array_equal(EK.add(a, b), a + b)
        assert np.array_equal(np.signbit(EK.add(a, b)), np.signbit(a + b))
    # what the kernel does not take goes to NumPy: broadcasting, mixed dtypes, views
    np.testing.assert_array_equal(EK.add(x, x[:1]), x + x[:1])
    np.testing.assert_array_equal(EK.add(x, x.astype(np.float16)), x + x.astype(np.float16))
    assert EK.add(x.T, x.T).dtype == x.dtype


@given(pool_case(), st.booleans(), st.booleans())
def test_avg_pool_kernels_equal_oracle(case, ceil_mode, include_pad):
    from refbnn.nn.pooling import AvgPool2d
    x, k, s, p = case
    x = np.nan_to_num(x, nan=1.5, neginf=-2.5)  # finite: the mean of -inf and +inf is moot
    m = AvgPool2d(k, s, p, count_include_pad=include_pad, ceil_mode=ceil_mode)
    m.train()
    y = m.forward(x)
    # the same additions in the same order and one division: bit-identical
    np.testing.assert_array_equal(y, m.forward_reference(x))
    assert np.array_equal(np.signbit(y), np.signbit(m.forward_reference(x)))
    dy = np.random.default_rng(2).standard_normal(y.shape).astype(x.dtype)
    dx = m.backward(dy)
    np.testing.assert_array_equal(dx, m.backward_reference(dy, x.shape))
    assert dx.dtype == x.dtype


@given(st.integers(1, 40000), st.sampled_from([0.0, 0.01]), st.booleans(), st.integers(1, 30), seeds,
       st.sampled_from([None, (-1.0, 1.0), (-0.5, 0.25), (0.5, -0.5)]))
def test_adam_kernel_equals_numpy_update(size, wd, decoupled, t, seed, clip):
    from refbnn.training import optim
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(size).astype(np.float32)
    p0[::7] = -0.0
    if size > 3:
        p0[3] = np.nan
    grad = (rng.standard_normal(size) * 0.1).astype(np.float32)
    m0 = (rng.standard_normal(size) * 0.01).astype(np.float32)
    v0 = (rng.random(size) * 1e-4).astype(np.float32)
    g = {"betas": [0.9, 0.999], "lr": 3e-3, "weight_decay": wd, "eps": 1e-8}

    class P:
        pass
    ref, fast = P(), P()
    ref.data, fast.data = p0.copy(), p0.copy()
    ref_state = {"exp_avg": m0.copy(), "exp_avg_sq": v0.copy()}
    optim.adam_update_reference(ref, grad, ref_state, g, t, decoupled)
    if clip is not None:  # the optimizer's step clips latent weights after the update
        np.clip(ref.data, clip[0], clip[1], out=ref.data)
        g["clip"] = clip
    opt = (optim.AdamW if decoupled else optim.Adam)([], lr=3e-3, weight_decay=wd)
    state = {"step": np.array(t - 1), "exp_avg": m0.copy(), "exp_avg_sq": v0.copy()}
    assert opt._update(fast, grad, state, g) is True  # the kernel path also applied the clip
    # the same float32 operations in the same order: bit-identical (NaN and -0.0 included)
    np.testing.assert_array_equal(fast.data, ref.data)
    assert np.array_equal(np.signbit(fast.data), np.signbit(ref.data))
    np.testing.assert_array_equal(state["exp_avg"], ref_state["exp_avg"])
    np.testing.assert_array_equal(state["exp_avg_sq"], ref_state["exp_avg_sq"])


@given(specials(), st.booleans())
def test_clipped_ste_kernel_equals_where(w, with_nan):
    if with_nan:
        w.reshape(-1)[0] = np.nan
    g = np.random.default_rng(4).standard_normal(w.shape).astype(w.dtype)
    out = np.empty_like(g)
    CK.clipped_ste_kernel(w.reshape(-1), g.reshape(-1), out.reshape(-1))
    np.testing.assert_array_equal(out, np.where(np.abs(w) <= 1, g, 0))


@given(st.integers(1, 600), st.integers(1, 900), st.integers(1, 1 << 22), st.integers(1, 4))
def test_image_chunks_cover_the_batch_evenly(n, p, image_bytes, threads):
    chunks = F.image_chunks(n, p, image_bytes, threads)
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(a1 == b0 for (_, a1), (b0, _) in itertools.pairwise(chunks))
    sizes = [b - a for a, b in chunks]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    if threads > 1 and n >= threads:
        assert len(chunks) % threads == 0  # every thread gets the same number of chunks


@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 9), seeds)
def test_swap01_kernel_is_an_exact_transpose(a, b, length, seed):
    src = np.random.default_rng(seed).standard_normal((a, b, length)).astype(np.float32)
    out = np.empty((b, a, length), np.float32)
    CK.swap01_kernel(src, out)
    np.testing.assert_array_equal(out, src.transpose(1, 0, 2))


@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 3), st.integers(1, 3), seeds)
def test_oihw_to_hwio_kernel_is_an_exact_transpose(o, c, kh, kw, seed):
    w = np.random.default_rng(seed).standard_normal((o, c, kh, kw)).astype(np.float32)
    w.reshape(-1)[::4] = -0.0
    out = np.empty((kh, kw, c, o), np.float32)
    CK.oihw_to_hwio_kernel(w, out)
    want = w.transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(out, want)
    assert np.array_equal(np.signbit(out), np.signbit(want))


def sum_dw_partials_reference(parts, tap_major, kh, kw):
    """The oracle: the parts added one after another with NumPy in index order, then reordered
    from tap-major (g, O/g, (a, b, c)) or channel-major (g, (c, a, b), O/g) to OIHW."""
    total = parts[0].copy()
    for q in parts[1:]:
        total += q
    g = parts.shape[1]
    if tap_major:
        og, cg = parts.shape[2], parts.shape[3] // (kh * kw)
        dw = total.reshape(g, og, kh, kw, cg).transpose(0, 1, 4, 2, 3)
    else:
        og, cg = parts.shape[3], parts.shape[2] // (kh * kw)
        dw = total.transpose(0, 2, 1).reshape(g, og, cg, kh, kw)
    return dw.reshape(g * og, cg, kh, kw)


@given(st.integers(1, 5), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4),
       st.integers(1, 3), st.integers(1, 3), st.booleans(),
       st.sampled_from([np.float32, np.float64]), seeds)
def test_sum_dw_partials_kernel_equals_serial_sum(count, g, og, cg, kh, kw, tap_major, dtype, seed):
    rng = np.random.default_rng(seed)
    shape = (count, g) + ((og, kh * kw * cg) if tap_major else (cg * kh * kw, og))
    # values of many magnitudes: a different order of the additions would round differently
    parts = (rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 7, shape)).astype(dtype)
    out = np.empty((g * og, cg, kh, kw), dtype)
    CK.sum_dw_partials_kernel(parts, tap_major, kh, kw, out)
    np.testing.assert_array_equal(out, sum_dw_partials_reference(parts, tap_major, kh, kw))


@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 3), st.integers(1, 3),
       st.sampled_from([np.float32, np.float64]), seeds)
def test_oihw_to_ohwi_kernel_is_an_exact_transpose(o, c, kh, kw, dtype, seed):
    w = np.random.default_rng(seed).standard_normal((o, c, kh, kw)).astype(np.float32)
    w.reshape(-1)[::4] = -0.0
    out = np.empty((o, kh, kw, c), dtype)
    CK.oihw_to_ohwi_kernel(w, out)
    want = w.transpose(0, 2, 3, 1).astype(dtype)
    np.testing.assert_array_equal(out, want)
    assert np.array_equal(np.signbit(out), np.signbit(want))
