"""Which other stacks can express a golden case: ``keras``, ``lce``, ``torch``, ``onnx``,
``openvino``, ``qonnx`` (``docs/golden.md`` section 8 gives the rules in prose).

A stack is listed for a case when that stack's own standard ops compute the case under the case's
conventions (sign rule, padding, pad value, groups), as a user of that stack would write it:

* ``keras``: Larq layers and quantizers (``QuantConv2D``, ``QuantDense``, ``ste_sign``, ...) and
  Keras layers. Signs with ``x >= 0 -> +1`` only; TensorFlow padding only (``"valid"``, or
  ``"same"`` with the odd row/column at the bottom/right), pad values 0 and +1; no stride > 1
  together with dilation > 1 (TensorFlow refuses it).
* ``lce``: LCE's converter applied to such a Keras model, running LCE's binary ops: as ``keras``,
  plus a grouped binary conv only with ``Cin / groups`` a multiple of 32 (else LCE silently runs a
  float conv), and not zero padding whose kernel reach exceeds the input (LCE's border correction
  is wrong there). Its float output is ``y_lce``, not ``y``.
* ``torch``, ``onnx``: float ops on ``+-1`` values (comparisons, ``Where``, ``Pad``, ``Conv``):
  every case.
* ``openvino``: its opset, binary convolutions on ``BinaryConvolution`` (no groups); both sign
  rules (FakeQuantize thresholds, ``ecosystem-notes``).
* ``qonnx``: ``BipolarQuant`` (``x >= 0 -> +1``) and standard ONNX ops.

Packed words are LCE's only for 32-bit words under ``x >= 0 -> +1``; the thresholds of
``output_thresholds`` are refbnn's own (no stack computes them).
"""

from __future__ import annotations

import numpy as np

from refbnn import reference

STACKS = ("keras", "lce", "torch", "onnx", "openvino", "qonnx")
INFERENCE = ("lce", "onnx", "openvino", "qonnx")  # no training: only forward cases
TF_PADDINGS = ("valid", "same")


def _padding(p):
    return p if isinstance(p, str) else tuple(p)


def _explicit(padding, hw, khw, stride, dilation):
    return tuple(int(v) for v in reference.explicit_padding(_padding(padding), hw, khw, stride, dilation))


def tf_padding(padding, hw, khw, stride, dilation=(1, 1)) -> str | None:
    """``"valid"`` or ``"same"`` when ``padding`` resolves to what TensorFlow's mode gives for this
    geometry, else ``None`` (asymmetric or symmetric padding TensorFlow cannot write)."""
    pads = _explicit(padding, hw, khw, stride, dilation)
    for mode in TF_PADDINGS:
        if pads == _explicit(mode, hw, khw, stride, dilation):
            return mode
    return None


def _ordered(names) -> list[str]:
    return [s for s in STACKS if s in set(names)]


def _conv_stacks(p, inputs) -> list[str]:
    x, kernel = inputs["x"], inputs["kernel"]
    hw, khw = x.shape[1:3], kernel.shape[:2]
    stride, dilation = tuple(p["stride"]), tuple(p["dilation"])
    pads = _explicit(p["padding"], hw, khw, stride, dilation)
    pv = p["pad_value"] if any(pads) else None  # no padded tap: the pad value does not matter
    plus = p["sign_at_zero"] == 1
    out = {"torch", "onnx"}
    if p["groups"] == 1:
        out.add("openvino")
    if plus:
        out.add("qonnx")
    mode = tf_padding(p["padding"], hw, khw, stride, dilation)
    keras = plus and mode is not None and pv in (None, 0, 1) and not (
        max(stride) > 1 and max(dilation) > 1)
    if keras:
        out.add("keras")
        cg = kernel.shape[2]
        reach = [(k - 1) * d + 1 for k, d in zip(khw, dilation)]
        bad_border = pv == 0 and any(r > n for r, n in zip(reach, hw))
        lce_output = p.get("_op") != "bconv2d_output" or pv != 0  # y_lce exists for pad +-1 only
        if (p["groups"] == 1 or cg % 32 == 0) and not bad_border and lce_output:
            out.add("lce")
    return _ordered(out)


def op_stacks(case) -> list[str]:
    """Stacks that express a bit-op case (``ops.h5``)."""
    p, op = case.params, case.op
    plus = p.get("sign_at_zero") == 1
    if op in ("sign", "bgemm"):
        return list(STACKS) if plus else ["torch", "onnx", "openvino"]
    if op == "pack":
        return ["lce"] if plus and p["word_bits"] == 32 else []
    if op == "output_thresholds":
        return []
    if op == "maxpool2d":
        x = case.inputs["x"]
        mode = tf_padding(p["padding"], x.shape[1:3], tuple(p["pool"]), tuple(p["stride"]))
        out = {"torch", "onnx", "openvino"}
        if plus:
            out.add("qonnx")
            if mode is not None:
                out.update({"keras", "lce"})
        return _ordered(out)
    if op in ("bconv2d", "bconv2d_output"):
        return _conv_stacks(dict(p, _op=op), case.inputs)
    raise ValueError(f"no stack rule for bit op {op!r}")


# layer classes Keras (with Larq) has, and how their options must look
_KERAS_ELEMENTWISE = ("ReLU", "PReLU", "GlobalAvgPool2d", "Linear", "cross_entropy")


def layer_stacks(case) -> list[str]:
    """Stacks that express a training-layer case (``layers.h5``): torch every one (its tests
    recompute them); keras where Larq/Keras has the layer with these options, training included;
    the inference stacks only for eval-mode cases of layers they have."""
    op, p = case.op, case.params
    kw, mode = p.get("kwargs", {}), p.get("mode", "train")
    out = {"torch"}
    x = case.inputs.get("x")
    if op in _KERAS_ELEMENTWISE:
        out.add("keras")
    elif op in ("BinaryConv2d", "Conv2d", "MaxPool2d", "AvgPool2d"):
        k = np.broadcast_to(kw.get("kernel_size"), 2)
        s = np.broadcast_to(kw.get("stride", 1 if op.endswith("Conv2d") else kw.get("kernel_size")), 2)
        d = np.broadcast_to(kw.get("dilation", 1), 2)
        pad = np.broadcast_to(kw.get("padding", 1 if op == "BinaryConv2d" else 0), 2)
        hw = x.shape[2:4]
        pads = [int(pad[0]), int(pad[1])]
        if op == "AvgPool2d" and kw.get("ceil_mode"):  # ceil mode adds bottom/right rows
            pads = (0, int(-(-hw[0] // s[0]) * s[0] + k[0] - s[0] - hw[0]),
                    0, int(-(-hw[1] // s[1]) * s[1] + k[1] - s[1] - hw[1]))
        tf_ok = tf_padding(pads, hw, tuple(k), tuple(s), tuple(d)) is not None
        if op == "BinaryConv2d":
            binary_ok = kw.get("sign_at_zero", 1) == 1 and kw.get("pad_value", 0) in (0, 1) and \
                not (max(s) > 1 and max(d) > 1)
            tf_ok = tf_ok and binary_ok
        if op == "AvgPool2d" and any(pads) and kw.get("count_include_pad", True):
            tf_ok = False  # TensorFlow's average excludes padded positions
        if tf_ok:
            out.add("keras")
    elif op == "BinaryLinear":
        if kw.get("sign_at_zero", 1) == 1:
            out.add("keras")
    elif op == "BatchNorm2d" and mode == "eval":
        out.add("keras")
    if mode == "eval" and op in ("BatchNorm2d", "ReLU", "PReLU", "MaxPool2d", "AvgPool2d",
                                 "GlobalAvgPool2d", "Conv2d", "Linear"):
        out.update({"onnx", "openvino", "qonnx"})
    return _ordered(out)


def model_stacks(case, config: dict) -> list[str]:
    """Stacks that express a model case (``model.h5``): torch always (the twin,
    ``refbnn.interop.torch``); for the eval case also onnx, and qonnx under ``x >= 0 -> +1``;
    keras (and lce for eval) only for configs written in TensorFlow's conventions
    (``conv_padding == "tf"``, see ``refbnn.models.config``)."""
    out = {"torch"}
    plus = config.get("sign_at_zero") == 1
    tf = config.get("conv_padding") == "tf" and plus
    if tf:
        out.add("keras")
    if case.op == "model_eval":
        out.add("onnx")
        if plus:
            out.add("qonnx")
        if tf:
            out.add("lce")
    return _ordered(out)


def annotate(kind: str, cases, meta: dict) -> None:
    """Set ``case.stacks`` for every case of a golden file of ``kind``."""
    for case in cases:
        if kind == "ops":
            case.stacks = op_stacks(case)
        elif kind == "layers":
            case.stacks = layer_stacks(case)
        else:
            case.stacks = model_stacks(case, meta.get("config", {}))
