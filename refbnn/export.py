"""``python -m refbnn.export SRC.h5 DST.h5 --packed-only``: a deployment-only copy of a model;
``python -m refbnn.export SRC.h5 OUT.xml --openvino``: the same network as OpenVINO IR.

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
    p.add_argument("dst", help="where to write the packed-only file (or the OpenVINO .xml)")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--packed-only", action="store_true", help="drop latent binary weights")
    kind.add_argument("--openvino", action="store_true",
                      help="OpenVINO IR (.xml + .bin) with per-layer outputs, refbnn.interop.openvino")
    args = p.parse_args(argv)
    try:
        if args.openvino:
            from refbnn.interop.openvino import export
            try:
                export(args.src, args.dst)
            except (ImportError, RuntimeError) as e:  # no OpenVINO; OpenVINO's own errors
                raise ValueError(str(e)) from None
            print(f"wrote {args.dst} and {args.dst.rsplit('.', 1)[0]}.bin")
            return 0
        fileformat.export_packed(args.src, args.dst)
    except (fileformat.FormatError, ValueError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    import os
    before, after = os.path.getsize(args.src), os.path.getsize(args.dst)
    print(f"wrote {args.dst}: {after:,} bytes ({before / after:.1f}x smaller than {args.src})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
