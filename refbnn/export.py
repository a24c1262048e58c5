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

Exit status 2 with a one-line message on any problem (DST naming SRC itself, also through a link, is
refused, as is an ``--openvino`` DST whose ``.bin`` is SRC or DST itself, and a DST that is a folder, a
FIFO or a device); the destination is written atomically.
"""

from __future__ import annotations

import importlib.util
import os

from refbnn import cli_util
from refbnn.cli_util import ArgumentParser, UserError, fail


def export_onnx_file(src, dst, layer_outputs: bool = False, batch: int | None = None) -> None:
    """The ONNX export of the model in the refbnn file ``src`` written to ``dst`` (Python API of
    ``--onnx``; raises ``UserError``, ``FormatError`` or ``ValueError``)."""
    if importlib.util.find_spec("onnx") is None:
        raise UserError("--onnx needs the onnx package, which is not installed (pip install onnx)")
    from refbnn import fileformat, models
    from refbnn.interop.onnx import export_onnx

    f = fileformat.load(src)
    if f.kind == "packed":
        raise UserError(f"{src}: a packed-only file; export --onnx from the model file it came from")
    model = models.BNNResNet(f.config)
    model.load_state_dict(f.state_dict)
    model.eval()
    export_onnx(model, dst, layer_outputs=layer_outputs, batch=batch)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m refbnn.export", description=__doc__.splitlines()[0])
    p.add_argument("src", type=cli_util.existing_file, help="a refbnn model or checkpoint file")
    p.add_argument("dst", help="where to write the export (not SRC itself)")
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
    p.add_argument("--batch", type=cli_util.int_in(1, 4096), default=None,
                   help="--onnx: static batch size 1-4096 (default: any); --qonnx: static batch (default 1)")
    return p


def _export(args) -> str:
    """Write the export ``args`` asks for; returns what was written, for the report line."""
    from refbnn import fileformat

    if args.onnx:
        export_onnx_file(args.src, args.dst, args.layer_outputs, args.batch)
        return "ONNX model" + (" with layer outputs" if args.layer_outputs else "")
    if args.openvino:
        from refbnn.interop.openvino import export

        try:
            export(args.src, args.dst)
        except (ImportError, RuntimeError) as e:  # no OpenVINO; OpenVINO's own errors
            raise UserError(str(e)) from None
        return f"OpenVINO IR, weights in {args.dst.rsplit('.', 1)[0]}.bin"
    if args.qonnx:
        from refbnn.interop import qonnx

        qonnx.export_file(args.src, args.dst, args.batch or 1)
        return "QONNX model"
    if args.lce:
        from refbnn.interop import lce

        lce.export_file(args.src, args.dst)
        return "LCE flatbuffer"
    fileformat.export_packed(args.src, args.dst)
    return f"{os.path.getsize(args.src) / os.path.getsize(args.dst):.1f}x smaller than {args.src}"


@cli_util.command
def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if cli_util.same_file(args.src, args.dst):
        p.fail_flag("dst", f"{args.dst} is the source file; the export would replace the model and "
                           "lose its latent weights: choose another name")
    if args.openvino:
        from pathlib import Path

        weights = Path(args.dst).with_suffix(".bin")
        if weights == Path(args.dst):
            p.fail_flag("dst", f"{args.dst}: the IR's weights go to DST with the suffix .bin; "
                               "name DST .xml")
        if cli_util.same_file(args.src, weights):
            p.fail_flag("dst", f"the IR's weights file {weights} is the source file; the export "
                               "would replace the model: choose another name")
    if args.layer_outputs and not args.onnx:
        p.fail_flag("--layer-outputs", "goes with --onnx")
    if args.batch is not None and not (args.onnx or args.qonnx):
        p.fail_flag("--batch", "goes with --onnx or --qonnx")
    from refbnn import fileformat

    try:
        what = _export(args)
    except (UserError, fileformat.FormatError, ValueError) as e:
        return fail(e)
    except (OSError, RuntimeError) as e:  # h5py reports some failed writes as RuntimeError
        return fail(f"cannot write {args.dst}: {e}")
    print(f"wrote {args.dst}: {os.path.getsize(args.dst):,} bytes ({what})")
    return 0


if __name__ == "__main__":
    cli_util.run_main(main)
