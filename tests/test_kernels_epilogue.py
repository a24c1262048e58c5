"""Fused conv epilogues (float, LCE float, threshold bits, fused residual) and chaining, against the
reference."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import refbnn
from refbnn import reference as ref

IMPLS = ["portable", "fast"]
VALUES = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -3.0])
MULTIPLIERS = st.sampled_from([1.0, -1.0, 0.0, -0.0, 0.1, -0.37, 3e-8, 1e30, -1e30]) | \
    st.floats(-4, 4, width=32)


@st.composite
def affine_with_ties(draw, channels, k):
    """Per-channel multiplier and bias; some channels get a bias that makes y exactly 0 at an
    integer acc in [-k, k] (bias = -float32(acc0 * mul)), the tie sign_at_zero must resolve."""
    mul = np.array([draw(MULTIPLIERS) for _ in range(channels)], np.float32)
    bias = np.array([draw(st.floats(-5, 5, width=32)) for _ in range(channels)], np.float32)
    for c in range(channels):
        if draw(st.booleans()):
            acc0 = np.float32(draw(st.integers(-k, k)))
            bias[c] = -np.float32(acc0 * mul[c])
    return mul, bias


def _layer(draw, groups, cg, o, max_hw):
    """A random conv layer case with these groups, channels and at most ``max_hw`` rows/columns."""
    n, h, w = draw(st.integers(1, 2)), draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    kh = draw(st.integers(1, 3))
    x = draw(hnp.arrays(np.float32, (n, h, w, groups * cg), elements=VALUES))
    kernel = draw(hnp.arrays(np.float32, (kh, kh, cg, o), elements=VALUES))
    mul, bias = draw(affine_with_ties(o, kh * kh * cg))
    return dict(x=x, kernel=kernel, groups=groups, stride=draw(st.sampled_from([1, 2])),
                padding=draw(st.sampled_from(["same", "valid", 1])) if kh <= min(h, w) else "same",
                pad_value=draw(st.sampled_from([0, 1, -1])), mul=mul, bias=bias,
                saz=draw(st.sampled_from([1, -1])))


@st.composite
def layers(draw):
    groups = draw(st.integers(1, 2))
    return _layer(draw, groups, draw(st.sampled_from([1, 5, 33, 64, 70])),
                  groups * draw(st.integers(1, 40)), 6)


def _run(layer, impl, output, **kw):
    plan = refbnn.BConv2DPlan(refbnn.pack_kernel(layer["kernel"]), layer["x"].shape[3],
                              layer["x"].shape[1:3], layer["stride"], layer["padding"],
                              layer["pad_value"], 1, layer["groups"], output=output,
                              multiplier=layer["mul"], bias=layer["bias"], impl=impl, **kw)
    return plan, plan(layer["x"])


def _acc(layer):
    return ref.bconv2d(layer["x"], layer["kernel"], layer["stride"], layer["padding"],
                       layer["pad_value"], 1, layer["groups"])


@pytest.mark.parametrize("impl", IMPLS)
@given(layer=layers())
def test_float_outputs_equal_reference_transforms_bitwise(impl, layer):
    acc = _acc(layer)
    _, y = _run(layer, impl, "float")
    assert y.dtype == np.float32
    assert np.array_equal(y, ref.output_transform(acc, layer["mul"], layer["bias"]))
    plan, y_lce = _run(layer, impl, "float_lce")
    want = ref.output_transform_lce(acc, plan.k, layer["mul"], layer["bias"])
    assert np.array_equal(y_lce, want)


@pytest.mark.parametrize("impl", IMPLS)
@given(layer=layers(), out_groups=st.sampled_from([1, 2]))
def test_bits_output_is_sign_of_float_transform(impl, layer, out_groups):
    o = layer["kernel"].shape[3]
    if o % out_groups:
        out_groups = 1
    _, got = _run(layer, impl, "bits", out_groups=out_groups, sign_at_zero=layer["saz"])
    signs = ref.threshold_output(_acc(layer), layer["mul"], layer["bias"], layer["saz"])
    og = o // out_groups
    want = np.stack([ref.pack(signs[..., g * og:(g + 1) * og]) for g in range(out_groups)], axis=3)
    assert np.array_equal(got.reshape(want.shape), want)


@given(k=st.integers(0, 300), saz=st.sampled_from([1, -1]), data=st.data())
def test_output_thresholds_equal_sign_for_every_acc(k, saz, data):
    mul, bias = data.draw(affine_with_ties(6, k))
    thr, direction = refbnn.output_thresholds(mul, bias, k, saz)
    acc = np.arange(-k, k + 1)[:, None]
    want = ref.threshold_output(acc, mul, bias, saz) < 0
    assert np.array_equal(acc * direction < thr, want)


def test_thresholds_with_exact_zero_outputs():
    """y == 0 exactly at acc = 2 (mul 0.5, bias -1) and for all acc (mul 0, bias 0)."""
    mul = np.array([0.5, -0.5, 0.0, -0.0], np.float32)
    bias = np.array([-1.0, 1.0, 0.0, -0.0], np.float32)
    acc = np.arange(-4, 5)[:, None]
    for saz in (1, -1):
        thr, direction = refbnn.output_thresholds(mul, bias, 4, saz)
        want = ref.threshold_output(acc, mul, bias, saz) < 0
        assert np.array_equal(acc * direction < thr, want)
    # the tie itself: sign(0) is +1 under sign_at_zero=+1 (bit 0) and -1 under -1 (bit 1)
    thr, direction = refbnn.output_thresholds(mul[:1], bias[:1], 4, 1)
    assert not (2 * direction[0] < thr[0])
    thr, direction = refbnn.output_thresholds(mul[:1], bias[:1], 4, -1)
    assert 2 * direction[0] < thr[0]


@pytest.mark.parametrize("impl", IMPLS)
def test_two_binary_layers_chain_without_unpacking(impl):
    """Layer 1 writes packed bits straight into layer 2's padded input buffer."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 9, 9, 48)).astype(np.float32)
    k1 = rng.standard_normal((3, 3, 48, 80)).astype(np.float32)
    k2 = rng.standard_normal((3, 3, 80, 24)).astype(np.float32)
    mul = rng.standard_normal(80).astype(np.float32)
    bias = rng.standard_normal(80).astype(np.float32)
    plan1 = refbnn.BConv2DPlan(refbnn.pack_kernel(k1), 48, (9, 9), 2, "same", 0, output="bits",
                               multiplier=mul, bias=bias, impl=impl)
    plan2 = refbnn.BConv2DPlan(refbnn.pack_kernel(k2), 80, plan1.out_hw, 1, "same", 0, impl=impl)
    buf = plan2.padded_input(2)
    plan1.run_padded(plan1.pack_input(x), out=buf, out_offset=plan2.input_offset)
    got = plan2.run_padded(buf)
    hidden = ref.threshold_output(ref.bconv2d(x, k1, 2, "same", 0), mul, bias)
    assert np.array_equal(got, ref.bconv2d(hidden, k2, 1, "same", 0))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padding, pad_value", [("valid", 0), ("same", 1), ("same", 0)])
def test_bits_output_whole_words_mixed_sign_multipliers(impl, padding, pad_value):
    """64 channels in one word and interior tiles: the fast path's in-register threshold (popcount
    domain, sign flip for negative multipliers), with thresholds inside [-K, K]."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, 7, 64)).astype(np.float32)
    k = rng.standard_normal((3, 3, 64, 64)).astype(np.float32)
    mul = rng.standard_normal(64).astype(np.float32)
    bias = (rng.standard_normal(64) * 20).astype(np.float32)
    for saz in (1, -1):
        plan = refbnn.BConv2DPlan(refbnn.pack_kernel(k), 64, (6, 7), 1, padding, pad_value,
                                  output="bits", multiplier=mul, bias=bias, sign_at_zero=saz,
                                  impl=impl)
        acc = ref.bconv2d(x, k, 1, padding, pad_value)
        want = ref.pack(ref.threshold_output(acc, mul, bias, saz))
        assert np.array_equal(plan(x), want)


SLOPES = st.sampled_from([0.0, -0.0, 0.25, -1.5, 1.0, 3.0])


@st.composite
def activations(draw, channels):
    kind = draw(st.sampled_from([None, "relu", "prelu", "fprelu"]))
    per_channel = draw(st.booleans())

    def slopes():
        if per_channel:
            return np.array([draw(SLOPES) for _ in range(channels)], np.float32)
        return np.float32(draw(SLOPES))

    if kind == "prelu":
        return ("prelu", slopes())
    if kind == "fprelu":
        return ("fprelu", slopes(), slopes())
    return kind


@pytest.mark.parametrize("impl", IMPLS)
@given(layer=layers(), out_groups=st.sampled_from([1, 2]), pad=st.integers(0, 2), data=st.data())
def test_fused_residual_output_equals_reference(impl, layer, out_groups, pad, data):
    """BatchNorm, pre-activation, residual add, post-activation, then both the float result and
    its packed signs written into a padded buffer (the next layer's input) at an offset."""
    o = layer["kernel"].shape[3]
    if o % out_groups:
        out_groups = 1
    pre, post = data.draw(activations(o)), data.draw(activations(o))
    plan = refbnn.BConv2DPlan(refbnn.pack_kernel(layer["kernel"]), layer["x"].shape[3],
                              layer["x"].shape[1:3], layer["stride"], layer["padding"],
                              layer["pad_value"], 1, layer["groups"], output="fused",
                              multiplier=layer["mul"], bias=layer["bias"], out_groups=out_groups,
                              sign_at_zero=layer["saz"], impl=impl, pre=pre, post=post)
    acc = _acc(layer)
    n, oh, ow, _ = acc.shape
    residual = data.draw(hnp.arrays(np.float32, acc.shape, elements=VALUES | st.floats(-9, 9,
                                                                                     width=32)))
    # exact zeros after the add: residual = -y where a channel is picked
    y0 = ref.activation(ref.output_transform(acc, layer["mul"], layer["bias"]), pre)
    tie = data.draw(hnp.arrays(np.bool_, acc.shape))
    residual = np.where(tie, -y0, residual).astype(np.float32)
    words = plan.out_words // out_groups
    bits = np.full((n, oh + 2 * pad, ow + 2 * pad, plan.out_words), 7, np.uint64)
    z, got_bits = plan.run_fused(plan.pack_input(layer["x"]), residual, bits, (pad, pad))
    assert got_bits is bits
    want_z, want_sign = ref.residual_output(acc, layer["mul"], layer["bias"], residual, pre, post,
                                            layer["saz"])
    assert z.dtype == np.float32 and np.array_equal(z, want_z)
    og = o // out_groups
    want = np.concatenate([ref.pack(want_sign[..., g * og:(g + 1) * og]) for g in
                           range(out_groups)], axis=-1).reshape(n, oh, ow, out_groups * words)
    assert np.array_equal(bits[:, pad:pad + oh, pad:pad + ow], want.astype(np.uint64))
    border = np.ones(bits.shape[:3], bool)
    border[:, pad:pad + oh, pad:pad + ow] = False
    assert (bits[border] == 7).all()  # the padding of the next layer's buffer is left alone


def test_fused_output_argument_errors():
    k = np.ones((3, 3, 8, 4), np.float32)
    one = np.ones(4, np.float32)
    plan = refbnn.BConv2DPlan(refbnn.pack_kernel(k), 8, (5, 5), output="fused", multiplier=one,
                              bias=one, pre="relu")
    buf = plan.pack_input(np.ones((1, 5, 5, 8), np.float32))
    res = np.zeros((1, 5, 5, 4), np.float32)
    for call, match in [
        (lambda: plan.run_padded(buf), "run_fused"),
        (lambda: plan.run_fused(buf, res[:, :4]), "residual"),
        (lambda: plan.run_fused(buf, res.astype(np.float64)), "residual"),
        (lambda: plan.run_fused(buf, res, out=np.zeros((1, 5, 5, 5), np.float32)[..., 1:]),
         "C-contiguous"),
        (lambda: plan.run_fused(buf, res[:, :, :, :3]), "divide"),
        (lambda: plan.run_fused(buf, res, np.zeros((1, 4, 4, 1), np.uint64)), "bits"),
        (lambda: refbnn.BConv2DPlan(refbnn.pack_kernel(k), 8, (5, 5), output="float",
                                    multiplier=one, bias=one, pre="relu"), "fused"),
        (lambda: refbnn.BConv2DPlan(refbnn.pack_kernel(k), 8, (5, 5), output="fused",
                                    multiplier=one, bias=one, post="gelu"), "post"),
        (lambda: refbnn.BConv2DPlan(refbnn.pack_kernel(k), 8, (5, 5), output="fused",
                                    multiplier=one, bias=one, pre=("prelu", [1, 2])), "slopes"),
        (lambda: refbnn.BConv2DPlan(refbnn.pack_kernel(k), 8, (5, 5), output="fused",
                                    multiplier=one, bias=one, pre=("prelu", np.inf)), "finite"),
    ]:
        with pytest.raises(ValueError, match=match) as info:
            call()
        assert "\n" not in str(info.value)


def _fused_plan(layer, impl, out_groups, pre, post):
    return refbnn.BConv2DPlan(refbnn.pack_kernel(layer["kernel"]), layer["x"].shape[3],
                              layer["x"].shape[1:3], layer["stride"], layer["padding"],
                              layer["pad_value"], 1, layer["groups"], output="fused",
                              multiplier=layer["mul"], bias=layer["bias"], out_groups=out_groups,
                              sign_at_zero=layer["saz"], impl=impl, pre=pre, post=post)


@pytest.mark.parametrize("impl", IMPLS)
@given(layer=layers(), data=st.data())
def test_fused_repeated_missing_and_in_place_residual(impl, layer, data):
    """A residual of ``Cr`` channels (dividing O) acts as its channels repeated (the cheap
    shortcut), ``None`` as no add, and ``out`` may be the residual itself (updated in place)."""
    o = layer["kernel"].shape[3]
    pre, post = data.draw(activations(o)), data.draw(activations(o))
    plan = _fused_plan(layer, impl, 1, pre, post)
    acc = _acc(layer)
    cr = data.draw(st.sampled_from([d for d in range(1, o + 1) if o % d == 0]))
    small = data.draw(hnp.arrays(np.float32, acc.shape[:3] + (cr,),
                                 elements=VALUES | st.floats(-9, 9, width=32)))
    full = np.tile(small, (1, 1, 1, o // cr))
    buf = plan.pack_input(layer["x"])
    want_z, want_sign = ref.residual_output(acc, layer["mul"], layer["bias"], full, pre, post,
                                            layer["saz"])
    want_bits = ref.pack(want_sign)
    z, bits = plan.run_fused(buf, small)
    assert np.array_equal(z, want_z) and np.array_equal(bits, want_bits)
    inplace = full.copy()
    z, bits = plan.run_fused(buf, inplace, out=inplace)
    assert z is inplace and np.array_equal(z, want_z) and np.array_equal(bits, want_bits)
    zero_z, zero_sign = ref.residual_output(acc, layer["mul"], layer["bias"], np.zeros_like(full),
                                            pre, post, layer["saz"])
    z, bits = plan.run_fused(buf, None)
    assert np.array_equal(z, zero_z) and np.array_equal(bits, ref.pack(zero_sign))


@given(layer=layers(), out_groups=st.sampled_from([1, 2]), channel_major=st.booleans(),
       cuts=st.lists(st.integers(0, 10 ** 6), max_size=4), data=st.data())
def test_fast_work_items_in_any_split_equal_one_call(layer, out_groups, channel_major, cuts, data):
    """``bconv_fast.conv_items`` over any split of a call's work items (each on its own scratch,
    pixel- or channel-major) writes exactly what one ``run_fused`` call writes."""
    from refbnn.kernels import bconv_fast as bf

    o = layer["kernel"].shape[3]
    if o % out_groups:
        out_groups = 1
    pre, post = data.draw(activations(o)), data.draw(activations(o))
    plan = _fused_plan(layer, "fast", out_groups, pre, post)
    acc = _acc(layer)
    residual = data.draw(hnp.arrays(np.float32, acc.shape, elements=st.floats(-9, 9, width=32)))
    buf = plan.pack_input(layer["x"])
    want_z, want_bits = plan.run_fused(buf, residual)
    conv, table = plan.fast_records(acc.shape[0])
    aligned = plan.fused_units_aligned
    channel_major = channel_major and aligned
    total = bf.items(conv, table, channel_major)
    edges = sorted({0, total, *(c % (total + 1) for c in cuts)})
    z = np.full(acc.shape, np.nan, np.float32)
    bits = np.full(want_bits.shape, 7, np.uint64)
    for i0, i1 in itertools.pairwise(edges):
        bf.conv_items(buf.reshape(-1), conv, table, i0, i1, channel_major,
                      z.reshape(-1).view(np.uint8), residual.reshape(-1), o, bits.reshape(-1),
                      bf.acc_scratch(), np.empty(16, np.float32), True, bf.BAND)
    assert np.array_equal(z, want_z) and np.array_equal(bits, want_bits)


@st.composite
def wide_layers(draw):
    """Layers with 32-lane tiles (more than 8 channels per group): the fused epilogue runs in the
    micro-kernel's registers (``TILE_FUSED``) on runs of equal tiles, border tiles included; a
    group's last tile is whole (32, 64 channels) or partial (9 to 31 lanes used: 9, 20, 24, 40,
    48, 77 channels), masked to its channels."""
    groups = draw(st.integers(1, 2))
    return _layer(draw, groups, draw(st.sampled_from([3, 64, 70])),
                  groups * draw(st.sampled_from([32, 64, 9, 20, 24, 40, 48, 77])), 9)


@given(layer=wide_layers(), out_groups=st.sampled_from([1, 2]), channel_major=st.booleans(),
       residual_kind=st.sampled_from(["full", "none", "in_place"]),
       cuts=st.lists(st.integers(0, 10 ** 6), max_size=3), band=st.sampled_from([0, 1, 2, 5, 32]),
       data=st.data())
def test_fused_in_registers_equals_reference(layer, out_groups, channel_major, residual_kind,
                                             cuts, band, data):
    """The register epilogue (``conv_items(..., regs=True)``, as the engine runs it) in any split of
    the work items and any band of pixel tiles writes the reference's float result and packed
    signs, and exactly what the scratch-buffer epilogue (``regs=False``) writes."""
    from refbnn.kernels import bconv_fast as bf

    o = layer["kernel"].shape[3]
    if (o // out_groups) % 32 or (o // layer["groups"]) % 32:  # every tile's signs one aligned
        out_groups = layer["groups"]  # unit: each conv group's channels from a multiple of 32 bits
    pre, post = data.draw(activations(o)), data.draw(activations(o))
    plan = _fused_plan(layer, "fast", out_groups, pre, post)
    assert plan.fused_units_aligned
    assert bf.fused_in_registers(o, layer["groups"], True, o) and bf.fused_in_registers(o, 1,
                                                                                       True, 0)
    acc = _acc(layer)
    residual = data.draw(hnp.arrays(np.float32, acc.shape, elements=VALUES | st.floats(-9, 9,
                                                                                     width=32)))
    y0 = ref.activation(ref.output_transform(acc, layer["mul"], layer["bias"]), pre)
    residual = np.where(data.draw(hnp.arrays(np.bool_, acc.shape)), -y0, residual)
    residual = residual.astype(np.float32)
    r = np.zeros_like(residual) if residual_kind == "none" else residual
    want_z, want_sign = ref.residual_output(acc, layer["mul"], layer["bias"], r, pre, post,
                                            layer["saz"])
    og = o // out_groups
    n, oh, ow, _ = acc.shape
    want_bits = np.concatenate([ref.pack(want_sign[..., g * og:(g + 1) * og])
                                for g in range(out_groups)], axis=-1).reshape(n, oh, ow, -1)
    buf = plan.pack_input(layer["x"]).reshape(-1)
    conv, table = plan.fast_records(n)
    total = bf.items(conv, table, channel_major)
    edges = sorted({0, total, *(c % (total + 1) for c in cuts)})
    got = []
    guard = 40  # float32 elements after the output: a partial tile must not store past its lanes
    for regs in (True, False):
        zbuf = np.full(acc.size + guard, np.nan, np.float32)
        z = zbuf[:acc.size].reshape(acc.shape)
        if residual_kind == "in_place":
            z[...] = residual
        res, rsc = (np.zeros(0, np.float32), 0) if residual_kind == "none" else \
            (z.reshape(-1) if residual_kind == "in_place" else residual.reshape(-1), o)
        bits = np.full(want_bits.shape, 7, np.uint64)
        for i0, i1 in itertools.pairwise(edges):
            bf.conv_items(buf, conv, table, i0, i1, channel_major, z.reshape(-1).view(np.uint8),
                          res, rsc, bits.reshape(-1), bf.acc_scratch(), np.empty(16, np.float32),
                          regs, band)
        # values as the reference (which adds a zero residual where there is none: -0 -> +0)
        assert np.array_equal(z, want_z) and np.array_equal(bits, want_bits.astype(np.uint64))
        assert np.isnan(zbuf[acc.size:]).all()
        got.append((z.view(np.uint32), bits))
    assert all(np.array_equal(a, b) for a, b in zip(*got))  # and bit for bit the same
