"""``crosscheck --against keras|lce|qonnx FILE``: the other stacks' runs in refbnn's layer names.

``other_run`` returns a ``Run`` (``crosscheck.Run``, passed in to keep the layering) for refbnn's
seeded batch ``x`` (NCHW): ``keras KERAS.h5`` gives every layer's output (:mod:`refbnn.interop.larq`),
``lce MODEL.tflite`` LCE's logits and ``qonnx MODEL.onnx`` QONNX's outputs
(:mod:`refbnn.interop.qonnx`). Eval mode only; problems raise ``UserError`` (one line, exit 2).
"""

from __future__ import annotations

from refbnn.cli_util import UserError


def other_run(impl, rest, config, state, x, labels, run_cls):
    if labels is not None:
        raise UserError(f"--against {impl} compares eval mode only; drop --train")
    if len(rest) != 1:
        raise UserError(f"--against {impl} needs one file: --against {impl} FILE")
    path = rest[0]
    if impl == "keras":
        from refbnn.interop import larq

        try:
            model = larq.load_keras(path)
            _, _, names = larq.from_keras(model)
            return run_cls(larq.keras_outputs(model, names, x), larq.keras_inputs(model, names, x))
        except larq.UnsupportedModel as e:
            raise UserError(str(e)) from None
    if impl == "lce":
        from refbnn.interop import lce

        return run_cls(lce.lce_outputs(path, x))
    from refbnn.interop import qonnx

    return run_cls(qonnx.qonnx_outputs(path, x))
