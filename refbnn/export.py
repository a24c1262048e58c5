"""``python -m refbnn.export SRC.h5 DST.h5 --packed-only``: a deployment-only copy of a model.

Drops the latent float32 weights of the binary layers (keeping their packed sign bits and, for
Bi-Real layers, the per-channel scale) and any optimizer state: the result runs with
``python -m refbnn.infer DST.h5`` and is about 30x smaller for the binary layers. Exit status 2 with a
one-line message on any problem; the destination is written atomically.
"""

from __future__ import annotations

import argparse
import sys

from refbnn import fileformat


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m refbnn.export", description=__doc__.splitlines()[0])
    p.add_argument("src", help="a refbnn model or checkpoint file")
    p.add_argument("dst", help="where to write the packed-only file")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--packed-only", action="store_true",
                      help="drop latent binary weights")
    kind.add_argument("--qonnx", action="store_true",
                      help="a QONNX graph (BipolarQuant + ONNX ops; refbnn.interop.qonnx)")
    kind.add_argument("--lce", action="store_true",
                      help="a .tflite through Larq and LCE's converter (refbnn.interop.lce)")
    p.add_argument("--batch", type=int, default=1, help="--qonnx: the graph's static batch (1)")
    args = p.parse_args(argv)
    if args.qonnx or args.lce:
        return _export_other(args)
    try:
        fileformat.export_packed(args.src, args.dst)
    except (fileformat.FormatError, ValueError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    import os
    before, after = os.path.getsize(args.src), os.path.getsize(args.dst)
    print(f"wrote {args.dst}: {after:,} bytes ({before / after:.1f}x smaller than {args.src})")
    return 0


def _export_other(args) -> int:
    """``--qonnx`` / ``--lce``: interop/qonnx.py and interop/lce.py do the work."""
    try:
        if args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
        if args.qonnx:
            from refbnn.interop import qonnx

            qonnx.export_file(args.src, args.dst, args.batch)
        else:
            from refbnn.interop import lce

            lce.export_file(args.src, args.dst)
    except (fileformat.FormatError, ValueError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    import os
    print(f"wrote {args.dst}: {os.path.getsize(args.dst):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
