"""Golden cases of the bit ops: expected outputs from the oracle, re-computed by the fast paths.

Every op here is exact (integers, sign bits, or float32 transforms with a fixed rounding order), so
every output's tolerance is 0. ``REFERENCE[op]`` computes a case with :mod:`refbnn.reference`;
``FAST[op](params, inputs, impl)`` with :mod:`refbnn.ops` (the Numba kernels; ``impl`` picks the
portable or the fast convolution path for the ops in ``KERNEL_OPS``). Layouts follow ``docs/semantics.md``:
NHWC images, HWIO kernels, bit 1 = -1, least significant bit first.
"""

from __future__ import annotations

import numpy as np

from refbnn import ops, reference
from refbnn.golden.fileio import Case


def _padding(p):
    return p if isinstance(p, str) else tuple(p)


def _conv_kwargs(p):
    return {"stride": tuple(p["stride"]), "padding": _padding(p["padding"]),
            "pad_value": p["pad_value"], "dilation": tuple(p["dilation"]), "groups": p["groups"],
            "sign_at_zero": p["sign_at_zero"]}


# --- reference (the oracle) --------------------------------------------------------------------

def _ref_sign(p, i):
    return {"y": reference.sign(i["x"], p["sign_at_zero"]).astype(np.int8)}


def _ref_pack(p, i):
    return {"words": reference.pack(i["x"], p["word_bits"], p["sign_at_zero"])}


def _ref_bconv2d(p, i):
    return {"acc": reference.bconv2d(i["x"], i["kernel"], **_conv_kwargs(p)).astype(np.int32)}


def _lce_k(p, kernel):
    return int(kernel.shape[0] * kernel.shape[1] * kernel.shape[2])


def _ref_bconv2d_output(p, i):
    acc = reference.bconv2d(i["x"], i["kernel"], **_conv_kwargs(p))
    m, b, saz = i["multiplier"], i["bias"], p["sign_at_zero"]
    out = {"acc": acc.astype(np.int32), "y": reference.output_transform(acc, m, b)}
    if p["pad_value"] != 0:  # LCE's order needs every tap to count (its own padding, +-1)
        out["y_lce"] = reference.output_transform_lce(acc, _lce_k(p, i["kernel"]), m, b)
    out["bits"] = reference.pack(reference.threshold_output(acc, m, b, saz), 64, saz)
    return out


def _ref_thresholds(p, i):
    """Thresholds derived from the oracle's float transform evaluated on every acc in [-k, k]:
    the bit (1 = negative output) runs ones-first (direction +1, bit iff acc < thr) or
    zeros-first (direction -1, bit iff -acc < thr); a constant run counts as ones-first."""
    k, saz = p["k"], p["sign_at_zero"]
    acc = np.arange(-k, k + 1)[:, None]
    bit = reference.threshold_output(acc, i["multiplier"], i["bias"], saz) < 0  # (2k+1, O)
    ones = bit.sum(axis=0)
    idx = np.arange(2 * k + 1)[:, None]
    ones_first = (bit == (idx < ones)).all(axis=0)
    if not (ones_first | (bit == (idx >= 2 * k + 1 - ones)).all(axis=0)).all():
        raise AssertionError("the oracle's output transform is not monotone")
    # ones first: bit iff acc < ones - k; zeros first: bit iff acc > k - ones, i.e. -acc < ones - k
    return {"thr": (ones - k).astype(np.int64),
            "direction": np.where(ones_first, 1, -1).astype(np.int64)}


def _ref_maxpool(p, i):
    y = reference.maxpool2d(i["x"], tuple(p["pool"]), tuple(p["stride"]), _padding(p["padding"]),
                            p["sign_at_zero"])
    return {"y": y.astype(np.int8)}


def _ref_bgemm(p, i):
    return {"acc": reference.bgemm(i["x"], i["w"], p["sign_at_zero"]).astype(np.int32)}


REFERENCE = {"sign": _ref_sign, "pack": _ref_pack, "bconv2d": _ref_bconv2d,
             "bconv2d_output": _ref_bconv2d_output, "output_thresholds": _ref_thresholds,
             "maxpool2d": _ref_maxpool, "bgemm": _ref_bgemm}


# --- fast paths ---------------------------------------------------------------------------------

def _fast_sign(p, i, impl=None):
    return {"y": ops.sign(i["x"], p["sign_at_zero"])}


def _fast_pack(p, i, impl=None):
    words = ops.pack_bits(i["x"], word_bits=p["word_bits"], sign_at_zero=p["sign_at_zero"])
    return {"words": words.view(np.uint32) if p["word_bits"] == 32 else words}


def _fast_bconv2d(p, i, impl=None):
    return {"acc": ops.bconv2d(i["x"], i["kernel"], **_conv_kwargs(p), impl=impl)}


def _fast_bconv2d_output(p, i, impl=None):
    kw = _conv_kwargs(p)
    saz, groups = kw.pop("sign_at_zero"), kw["groups"]
    x, kernel = i["x"], i["kernel"]
    xp = ops.pack_groups(x, groups, saz)
    wp = ops.pack_kernel(kernel, saz)
    out = {"acc": ops.bconv2d_packed(xp, wp, x.shape[3], **kw, impl=impl)}
    modes = {"y": "float", "y_lce": "float_lce", "bits": "bits"}
    if p["pad_value"] == 0:
        del modes["y_lce"]
    for key, mode in modes.items():
        out[key] = ops.bconv2d_packed(xp, wp, x.shape[3], **kw, output=mode, impl=impl,
                                      multiplier=i["multiplier"], bias=i["bias"], sign_at_zero=saz)
    return out


def _fast_thresholds(p, i, impl=None):
    thr, direction = ops.output_thresholds(i["multiplier"], i["bias"], p["k"], p["sign_at_zero"])
    return {"thr": thr, "direction": direction}


def _fast_maxpool(p, i, impl=None):
    c = i["x"].shape[3]
    words = ops.pack_bits(i["x"], sign_at_zero=p["sign_at_zero"])
    y = ops.maxpool2d_packed(words, tuple(p["pool"]), tuple(p["stride"]), _padding(p["padding"]))
    return {"y": ops.unpack_bits(y, c)}


def _fast_bgemm(p, i, impl=None):
    return {"acc": ops.bgemm(i["x"], i["w"], p["sign_at_zero"], impl=impl)}


# ops whose kernels come in two paths ("portable" and "fast", refbnn.kernels.dispatch); both are
# exact on every CPU, and --check runs both
KERNEL_OPS = ("bconv2d", "bconv2d_output", "bgemm")

FAST = {"sign": _fast_sign, "pack": _fast_pack, "bconv2d": _fast_bconv2d,
        "bconv2d_output": _fast_bconv2d_output, "output_thresholds": _fast_thresholds,
        "maxpool2d": _fast_maxpool, "bgemm": _fast_bgemm}


# --- inputs with hard edges -------------------------------------------------------------------

def edgy(rng, shape, zeros=0.15, scale=1.0) -> np.ndarray:
    """float32 normal values with a share of exact ``0.0`` and ``-0.0`` (half each)."""
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    r = rng.random(shape)
    x[r < zeros / 2] = 0.0
    x[(r >= zeros / 2) & (r < zeros)] = -0.0
    return x


SIGN_EDGES = np.array([0.0, -0.0, 1e-45, -1e-45, 1.17549435e-38, -1.17549435e-38, 1.0, -1.0,
                       np.inf, -np.inf, 3.4028235e38, -3.4028235e38], np.float32)

# name: (N, H, W, C, O, KH, KW, stride, padding, pad_value, dilation, groups, sign_at_zero)
CONVS = {
    "bconv_same_s2_odd": (2, 7, 7, 33, 5, 3, 3, [2, 2], "same", 0, [1, 1], 1, 1),
    "bconv_valid_c70": (1, 6, 5, 70, 3, 3, 3, [1, 1], "valid", 0, [1, 1], 1, 1),
    "bconv_sym_pad_plus1": (2, 5, 6, 65, 4, 3, 3, [1, 1], [1, 1], 1, [1, 1], 1, 1),
    "bconv_explicit_minus1_dil2": (1, 8, 7, 20, 6, 3, 3, [2, 1], [0, 2, 1, 0], -1, [2, 2], 1, 1),
    "bconv_groups2_cg35_caffe": (1, 6, 6, 70, 4, 3, 3, [1, 1], "same", 0, [1, 1], 2, -1),
    "bconv_groups4_s2_plus1": (2, 7, 5, 32, 8, 3, 3, [2, 2], "same", 1, [1, 1], 4, -1),
    "bconv_1x1_s2_odd": (1, 7, 7, 100, 7, 1, 1, [2, 2], "valid", 0, [1, 1], 1, 1),
    "bconv_c3_same_minus1_s2": (1, 5, 5, 3, 2, 3, 3, [2, 2], "same", -1, [1, 1], 1, 1),
    "bconv_same_s1_c130": (1, 4, 5, 130, 3, 3, 3, [1, 1], "same", 0, [1, 1], 1, 1),
    # in Larq's conventions (docs/golden.md section 8): pad value +1, groups, dilation, and a
    # zero-padded kernel reaching past the whole input (LCE's border correction fails there)
    "bconv_same_plus1_s2_odd_c40": (2, 7, 7, 40, 6, 3, 3, [2, 2], "same", 1, [1, 1], 1, 1),
    "bconv_groups2_cg32_same": (1, 6, 6, 64, 6, 3, 3, [1, 1], "same", 0, [1, 1], 2, 1),
    "bconv_valid_dil2_c40": (1, 9, 8, 40, 4, 3, 3, [1, 1], "valid", 0, [2, 2], 1, 1),
    "bconv_same_zero_reach_past_input": (1, 2, 3, 10, 3, 3, 3, [1, 1], "same", 0, [1, 1], 1, 1),
}


def _conv_case(rng, name, spec, op="bconv2d"):
    n, h, w, c, o, kh, kw, stride, padding, pad_value, dilation, groups, saz = spec
    params = {"stride": stride, "padding": padding, "pad_value": pad_value, "dilation": dilation,
              "groups": groups, "sign_at_zero": saz}
    inputs = {"x": edgy(rng, (n, h, w, c)), "kernel": edgy(rng, (kh, kw, c // groups, o), 0.05)}
    return Case(name, op, params, inputs, {})


def _affine_with_ties(rng, acc, o, saz_case):
    """Per-channel float32 multiplier and bias: mixed signs, a zero multiplier, and biases that put
    the float output exactly at 0 for an accumulator value that occurs (threshold ties)."""
    m = rng.uniform(0.05, 2.0, o).astype(np.float32) * rng.choice([-1, 1], o).astype(np.float32)
    b = rng.normal(0, 3, o).astype(np.float32)
    flat = acc.reshape(-1, o)
    for ch in range(o):
        if ch % 3 == 0:  # tie: y == 0 exactly where acc == a0 (m * a0 is exact for small ints)
            m[ch] = np.float32(rng.choice([0.5, -0.25, 1.0, -2.0]))
            b[ch] = -m[ch] * np.float32(flat[rng.integers(len(flat)), ch])
    m[1 % o] = 0.0
    b[1 % o] = 0.0 if saz_case else -1.5
    return m, b


def op_cases(seed: int) -> list:
    rng = np.random.default_rng(seed)
    cases = []
    for saz in (1, -1):
        x = np.concatenate([SIGN_EDGES, edgy(rng, 20)])
        cases.append(Case(f"sign_saz{saz:+d}", "sign", {"sign_at_zero": saz}, {"x": x}, {}))
    for c, wb, saz in [(1, 64, 1), (33, 64, 1), (64, 64, 1), (100, 64, -1), (130, 64, 1),
                       (1, 32, 1), (33, 32, -1), (64, 32, 1), (100, 32, 1)]:
        cases.append(Case(f"pack_c{c}_w{wb}_saz{saz:+d}", "pack",
                          {"word_bits": wb, "sign_at_zero": saz}, {"x": edgy(rng, (3, c))}, {}))
    for name, spec in CONVS.items():
        cases.append(_conv_case(rng, name, spec))
    out_specs = {
        "bconv_output_o70_plus1": (2, 5, 5, 33, 70, 3, 3, [1, 1], "same", 1, [1, 1], 1, 1),
        "bconv_output_o9_zero_pad_caffe": (2, 6, 5, 20, 9, 3, 3, [2, 2], [1, 1], 0, [1, 1], 1, -1),
        "bconv_output_groups2_minus1": (1, 5, 6, 66, 8, 3, 3, [1, 1], "same", -1, [1, 1], 2, -1),
        "bconv_output_zero_same_s1": (2, 5, 6, 40, 7, 3, 3, [1, 1], "same", 0, [1, 1], 1, 1),
        "bconv_output_plus1_s2_odd_c64": (1, 7, 7, 64, 10, 3, 3, [2, 2], "same", 1, [1, 1], 1, 1),
    }
    for name, spec in out_specs.items():
        case = _conv_case(rng, name, spec, "bconv2d_output")
        acc = reference.bconv2d(case.inputs["x"], case.inputs["kernel"], **_conv_kwargs(case.params))
        m, b = _affine_with_ties(rng, acc, spec[4], spec[12] == -1)
        case.inputs.update(multiplier=m, bias=b)
        cases.append(case)
    for k, saz in [(27, 1), (27, -1), (297, 1)]:
        o = 12
        m = rng.uniform(0.01, 3.0, o).astype(np.float32) * rng.choice([-1, 1], o).astype(np.float32)
        b = rng.normal(0, k / 4, o).astype(np.float32)
        m[:3] = [0.5, -0.5, 0.0]
        b[:3] = [-1.5, 2.5, 0.0 if saz == 1 else -0.0]  # ties at acc = 3 and acc = 5; m == 0
        m[3], b[3] = 0.0, -1.0  # constant negative output
        m[4], b[4] = 1e-7, 0.0  # tiny multiplier: the product rounds, the tie sits at acc == 0
        cases.append(Case(f"thresholds_k{k}_saz{saz:+d}", "output_thresholds",
                          {"k": k, "sign_at_zero": saz}, {"multiplier": m, "bias": b}, {}))
    for pool, stride, padding, saz in [([3, 3], [2, 2], "same", 1), ([2, 2], [2, 2], "valid", -1),
                                       ([3, 2], [1, 2], [1, 1, 0, 1], 1)]:
        x = edgy(rng, (2, 7, 7, 70), 0.3)
        name = f"maxpool_{pool[0]}x{pool[1]}_s{stride[0]}{stride[1]}_saz{saz:+d}"
        cases.append(Case(name, "maxpool2d", {"pool": pool, "stride": stride, "padding": padding,
                                              "sign_at_zero": saz}, {"x": x}, {}))
    for k, saz in [(100, 1), (64, -1), (7, 1)]:
        cases.append(Case(f"bgemm_k{k}_saz{saz:+d}", "bgemm", {"sign_at_zero": saz},
                          {"x": edgy(rng, (5, k)), "w": edgy(rng, (7, k))}, {}))
    for case in cases:
        case.outputs = REFERENCE[case.op](case.params, case.inputs)
    return cases
