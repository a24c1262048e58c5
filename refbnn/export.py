"""``python -m refbnn.export SRC.h5 DST --packed-only | --onnx | --openvino | --qonnx | --lce``: other forms.

* ``--packed-only``: a deployment-only copy (``DST.h5``). Drops the latent float32 weights of the
  binary layers (keeping their packed sign bits and, for Bi-Real layers, the per-channel scale) and any
  optimizer state: the result runs with ``python -m refbnn.infer DST.h5`` and is about 30x smaller for
  the binary layers.
* ``--onnx [--layer-outputs] [--batch N]``: an ONNX model (``DST.onnx``, opset 17) of the eval-mode
  network, built with the ``onnx`` package alone (:mod:`refbnn.interop.onnx`: sign as
  ``x >= 0 ? +1 : -1`` with the model's sign(0), then a float ``Conv`` on +-1 values). Its first output
  is ``logits``; ``--layer-outputs`` adds every layer's output under refbnn's layer name, for
  ``python -m refbnn.crosscheck SRC.h5 --against onnx DST.onnx``; ``--batch N`` fixes the batch size
  (default: symbolic). Needs a file with latent weights (not a packed-only one).
* ``--openvino``: OpenVINO IR (``DST.xml`` + ``DST.bin``, :mod:`refbnn.interop.openvino`, extra
  ``openvino``): FakeQuantize sign + BinaryConvolution, with per-layer outputs for crosscheck.
* ``--qonnx [--batch N]``: a QONNX graph (``BipolarQuant`` + ONNX ops, :mod:`refbnn.interop.qonnx`,
  extra ``qonnx``) that runs in qonnx's own executor; static batch (default 1).
* ``--lce``: a ``.tflite`` through Larq and LCE's converter (:mod:`refbnn.interop.lce`, extra ``larq``).

Exit status 2 with a one-line message on any problem; the destination is written atomically and is
never the source.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from refbnn import fileformat
from refbnn.cli_util import UserError, fail


def export_onnx_file(src, dst, layer_outputs: bool = False, batch: int | None = None) -> None:
    """The ONNX export of the model in the refbnn file ``src`` written to ``dst`` (Python API of
    ``--onnx``; raises ``UserError``, ``FormatError`` or ``ValueError``)."""
    if importlib.util.find_spec("onnx") is None:
        raise UserError("--onnx needs the onnx package, which is not installed (pip install onnx)")
    from refbnn import models
    from refbnn.interop.onnx import export_onnx

    f = fileformat.load(src)
    if f.kind == "packed":
        raise UserError(f"{src}: a packed-only file; export --onnx from the model file it came from")
    model = models.BNNResNet(f.config)
    model.load_state_dict(f.state_dict)
    model.eval()
    export_onnx(model, dst, layer_outputs=layer_outputs, batch=batch)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m refbnn.export", description=__doc__.splitlines()[0])
    p.add_argument("src", help="a refbnn model or checkpoint file")
    p.add_argument("dst", help="where to write the export")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--packed-only", action="store_true",
                      help="a packed refbnn file without latent binary weights")
    kind.add_argument("--onnx", action="store_true", help="an ONNX model (refbnn.interop.onnx)")
    kind.add_argument("--openvino", action="store_true",
                      help="OpenVINO IR (.xml + .bin) with per-layer outputs, refbnn.interop.openvino")
    kind.add_argument("--qonnx", action="store_true",
                      help="a QONNX graph (BipolarQuant + ONNX ops; refbnn.interop.qonnx)")
    kind.add_argument("--lce", action="store_true",
                      help="a .tflite through Larq and LCE's converter (refbnn.interop.lce)")
    p.add_argument("--layer-outputs", action="store_true",
                   help="--onnx: every layer's output as an extra graph output")
    p.add_argument("--batch", type=int, default=None,
                   help="--onnx: static batch size (default: any); --qonnx: static batch (default 1)")
    args = p.parse_args(argv)
    try:
        if args.layer_outputs and not args.onnx:
            raise UserError("--layer-outputs goes with --onnx")
        if args.batch is not None and not (args.onnx or args.qonnx):
            raise UserError("--batch goes with --onnx or --qonnx")
        if args.batch is not None and args.batch < 1:
            raise UserError(f"--batch must be >= 1, got {args.batch}")
        if os.path.exists(args.dst) and os.path.samefile(args.src, args.dst):
            raise UserError(f"{args.dst}: the destination is the source file")
        if args.onnx:
            export_onnx_file(args.src, args.dst, args.layer_outputs, args.batch)
            what = "ONNX model" + (" with layer outputs" if args.layer_outputs else "")
        elif args.openvino:
            from refbnn.interop.openvino import export

            try:
                export(args.src, args.dst)
            except (ImportError, RuntimeError) as e:  # no OpenVINO; OpenVINO's own errors
                raise UserError(str(e)) from None
            what = f"OpenVINO IR, weights in {args.dst.rsplit('.', 1)[0]}.bin"
        elif args.qonnx:
            from refbnn.interop import qonnx

            qonnx.export_file(args.src, args.dst, args.batch or 1)
            what = "QONNX model"
        elif args.lce:
            from refbnn.interop import lce

            lce.export_file(args.src, args.dst)
            what = "LCE flatbuffer"
        else:
            fileformat.export_packed(args.src, args.dst)
            what = f"{os.path.getsize(args.src) / os.path.getsize(args.dst):.1f}x smaller than {args.src}"
    except (UserError, fileformat.FormatError, ValueError, OSError) as e:
        return fail(e)
    print(f"wrote {args.dst}: {os.path.getsize(args.dst):,} bytes ({what})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
