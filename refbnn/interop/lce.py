"""Larq Compute Engine (LCE): ``.tflite`` files through LCE's converter, LCE's interpreter, and
refbnn's bit-exact prediction of LCE's binary convolutions from the file's own constants.

* :func:`export_file` (``python -m refbnn.export MODEL.h5 OUT.tflite --lce``): the refbnn model as a
  Larq/Keras model (:func:`refbnn.interop.larq.to_keras`), converted by
  ``larq_compute_engine.convert_keras_model`` (LCE folds each BatchNorm into a per-channel
  multiplier and bias of its own).
* :func:`run` / :func:`lce_outputs`: LCE's interpreter, one image at a time (LCE's graphs have
  batch 1), for ``crosscheck --against lce``.
* :func:`read_bconvs` reads every ``LceBconv2d`` of a ``.tflite`` (the flatbuffer schema ships in
  the LCE package): the packed filter (int32 OHWI words, bit 1 = -1), the folded
  ``post_activation_multiplier`` / ``post_activation_bias``, and the options (stride, padding,
  ``pad_values``, dilation). :func:`predict_bconv` computes LCE's float output from them exactly:
  refbnn's accumulators, then ``reference.output_transform_lce`` (pad value 1 or no padding) or
  ``reference.output_transform_lce_zero_padding`` (zero padding: LCE pads with +1 and corrects each
  border pixel in float). LCE's own kernels are wrong where a zero-padded kernel reaches past the
  whole input; there refbnn follows Keras and the plain definition, and says so.

Needs tensorflow, tf-keras, larq and larq-compute-engine (the ``larq`` extra) and NumPy < 2.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from refbnn.atomicio import write_bytes_atomic
from refbnn.interop.larq import UnsupportedModel, import_tf


class LCEError(ValueError):
    """A file LCE cannot read or run, or a model it cannot express; one line."""


def _lce():
    import_tf()
    try:
        import larq_compute_engine as lce
        from larq_compute_engine.tflite.python.interpreter import Interpreter
    except ImportError as e:
        raise LCEError(f"needs larq-compute-engine (the 'larq' extra): {e}") from None
    return lce, Interpreter


def convert(keras_model) -> bytes:
    """``larq_compute_engine.convert_keras_model`` of a Keras model: the ``.tflite`` bytes."""
    lce, _ = _lce()
    return lce.convert_keras_model(keras_model)


def export_file(src, dest) -> str:
    """Write the LCE ``.tflite`` of the refbnn model file ``src`` to ``dest`` (atomically)."""
    from refbnn import fileformat
    from refbnn.interop import larq
    from refbnn.models import BNNResNet

    loaded = fileformat.load(src)
    if loaded.kind == "packed":
        raise LCEError(f"{src}: a packed-only file has no latent weights; use the model file")
    net = BNNResNet(loaded.config)
    net.load_state_dict(loaded.state_dict)
    try:
        data = convert(larq.to_keras(net))
    except UnsupportedModel as e:
        raise LCEError(str(e)) from None
    dest = os.fspath(dest)
    write_bytes_atomic(dest, data)
    return dest


def _read(path_or_bytes) -> bytes:
    if isinstance(path_or_bytes, (bytes, bytearray)):
        return bytes(path_or_bytes)
    path = os.fspath(path_or_bytes)
    if not os.path.isfile(path):
        raise LCEError(f"{path}: no such file")
    with open(path, "rb") as f:
        return f.read()


def run(path_or_bytes, x_nhwc) -> list:
    """LCE's interpreter on every image of ``x_nhwc`` (float32 NHWC), one at a time: a list with
    one array ``(N, ...)`` per graph output."""
    _, Interpreter = _lce()
    data = _read(path_or_bytes)
    try:
        interp = Interpreter(data)
    except Exception as e:  # LCE's wrapper raises RuntimeError and others for a bad file
        raise LCEError(f"LCE cannot load the model ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
                       ) from None
    outs = None
    for img in np.asarray(x_nhwc, np.float32):
        y = interp.predict(img[None])
        y = y if isinstance(y, list) else [y]
        outs = [[] for _ in y] if outs is None else outs
        for store, v in zip(outs, y):
            store.append(np.asarray(v, np.float32)[0])
    return [np.stack(o) for o in outs]


def lce_outputs(path, x_nchw) -> OrderedDict:
    """``crosscheck --against lce``: LCE's single output as ``logits`` for refbnn's NCHW batch."""
    outs = run(path, np.ascontiguousarray(np.asarray(x_nchw, np.float32).transpose(0, 2, 3, 1)))
    if len(outs) != 1:
        raise LCEError(f"{path}: {len(outs)} outputs; crosscheck compares a single-output (logits) graph")
    return OrderedDict([("logits", outs[0].reshape(len(x_nchw), -1))])


def read_bconvs(path_or_bytes) -> list[dict]:
    """Every ``LceBconv2d`` of a ``.tflite``, in graph order: ``filter`` (int32 ``(O, KH, KW,
    ceil(Cin/32))``), ``multiplier``, ``bias`` (float32 ``(O,)``, LCE's fold; ``None`` when the
    op writes bits), ``channels_in``, ``stride``, ``dilation``, ``padding`` (``"same"``/``"valid"``),
    ``pad_values`` (0 or 1)."""
    _lce()
    from flatbuffers import flexbuffers
    from larq_compute_engine.mlir.python import tflite_schema as schema

    data = _read(path_or_bytes)
    try:
        model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
    except Exception as e:  # a truncated or foreign flatbuffer
        raise LCEError(f"not a .tflite flatbuffer ({type(e).__name__})") from None
    graph = model.subgraphs[0]

    def const(index, dtype):
        if index < 0:
            return None
        t = graph.tensors[index]
        buf = model.buffers[t.buffer].data
        if buf is None:
            return None
        return np.frombuffer(bytes(bytearray(buf)), dtype=dtype).reshape(list(t.shape)).copy()

    found = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex].customCode
        if code != b"LceBconv2d":
            continue
        opts = flexbuffers.Loads(bytes(bytearray(op.customOptions)))
        ins = list(op.inputs)
        found.append({
            "filter": const(ins[1], "<i4"), "multiplier": const(ins[2], "<f4"),
            "bias": const(ins[3], "<f4"), "channels_in": int(opts["channels_in"]),
            "stride": (int(opts["stride_height"]), int(opts["stride_width"])),
            "dilation": (int(opts["dilation_height_factor"]), int(opts["dilation_width_factor"])),
            "padding": {0: "same", 1: "valid"}[int(opts["padding"])], "pad_values": int(opts["pad_values"]),
            "fused_activation": int(opts.get("fused_activation_function", 0))})
    return found


def filter_kernel(op: dict) -> np.ndarray:
    """An ``LceBconv2d``'s packed filter as a ``+-1`` float32 HWIO kernel (bit 1 = -1)."""
    from refbnn import bits, ops

    words = bits.words32_to_words64(op["filter"], op["channels_in"])
    signs = ops.unpack_bits(words, op["channels_in"], dtype=np.float32)  # (O, KH, KW, Cin)
    return np.ascontiguousarray(signs.transpose(1, 2, 3, 0))


def predict_bconv(op: dict, x_nhwc) -> np.ndarray:
    """LCE's float output of one ``LceBconv2d`` on real input ``x_nhwc`` (what its ``LceQuantize``
    packs: ``x < 0`` is bit 1), from the op's own filter and folded constants; float32 NHWC."""
    from refbnn import ops, reference

    if op["multiplier"] is None or op["bias"] is None:
        raise LCEError("this LceBconv2d writes bits (a threshold), not a float output")
    if op["fused_activation"]:
        raise LCEError("an LceBconv2d with a fused activation (clamp) is not modelled")
    kernel = filter_kernel(op)
    k = int(np.prod(kernel.shape[:3]))
    one = op["pad_values"] == 1 or op["padding"] == "valid"
    acc = ops.bconv2d(np.asarray(x_nhwc, np.float32), kernel, stride=op["stride"], padding=op["padding"],
                      pad_value=1 if one else 0, dilation=op["dilation"]).astype(np.int64)
    if one:
        return reference.output_transform_lce(acc, k, op["multiplier"], op["bias"])
    corr, has_pad = reference.padded_tap_sum(kernel, x_nhwc.shape[1:3], "same", op["stride"], op["dilation"])
    return reference.output_transform_lce_zero_padding(acc, corr, has_pad, k, op["multiplier"], op["bias"])


def bconv_agreement(path_or_bytes, x_nhwc) -> dict:
    """For a ``.tflite`` holding one binary conv (``LceQuantize -> LceBconv2d``, BatchNorm folded):
    LCE's output against :func:`predict_bconv`. ``{"equal": fraction of bit-identical values,
    "max_abs": largest difference, "n": values}``."""
    data = _read(path_or_bytes)
    convs = read_bconvs(data)
    if len(convs) != 1:
        raise LCEError(f"expected one LceBconv2d, found {len(convs)}")
    got = run(data, x_nhwc)[0]
    want = predict_bconv(convs[0], x_nhwc)
    same = (got == want) & (np.signbit(got) == np.signbit(want))
    return {"equal": float(same.mean()), "max_abs": float(np.abs(got - want).max()), "n": int(got.size)}
