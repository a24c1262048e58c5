"""``python -m refbnn.export SRC.h5 DST.h5 --packed-only``: a deployment-only copy of a model.

Drops the latent float32 weights of the binary layers (keeping their packed sign bits and, for
Bi-Real layers, the per-channel scale) and any optimizer state: the result runs with
``python -m refbnn.infer DST.h5`` and is about 30x smaller for the binary layers. Exit status 2 with a
one-line message on any problem (DST naming SRC itself, also through a link, is refused); the
destination is written atomically.
"""

from __future__ import annotations

import os

from refbnn import cli_util
from refbnn.cli_util import ArgumentParser, fail


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m refbnn.export", description=__doc__.splitlines()[0])
    p.add_argument("src", type=cli_util.existing_file, help="a refbnn model or checkpoint file")
    p.add_argument("dst", help="where to write the packed-only file (not SRC itself)")
    p.add_argument("--packed-only", action="store_true", required=True,
                   help="drop latent binary weights (the only export kind so far)")
    return p


@cli_util.command
def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if cli_util.same_file(args.src, args.dst):
        p.fail_flag("dst", f"{args.dst} is the source file; the packed-only copy would replace "
                           "the model and lose its latent weights: choose another name")
    from refbnn import fileformat

    try:
        fileformat.export_packed(args.src, args.dst)
    except (fileformat.FormatError, ValueError) as e:
        return fail(e)
    except (OSError, RuntimeError) as e:  # h5py reports some failed writes as RuntimeError
        return fail(f"cannot write {args.dst}: {e}")
    before, after = os.path.getsize(args.src), os.path.getsize(args.dst)
    print(f"wrote {args.dst}: {after:,} bytes ({before / after:.1f}x smaller than {args.src})")
    return 0


if __name__ == "__main__":
    cli_util.run_main(main)
