"""``python -m refbnn.convert_larq MODEL.h5|MODEL.keras OUT.h5``: a Larq (Keras) model to a refbnn
model file (:mod:`refbnn.interop.larq` says which models convert). Meant to become the ``larq``
subcommand of ``python -m refbnn.convert``; needs the ``larq`` extra (tensorflow, tf-keras, larq).

An unsupported layer or option: one line naming the layer and its class, exit 2; the destination
is written atomically and never equal to the source.
"""

from __future__ import annotations

import argparse
import os
import sys

from refbnn.cli_util import UserError, fail


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m refbnn.convert_larq", description=__doc__.splitlines()[0])
    p.add_argument("model", help="Keras model file (.h5 or .keras) with Larq layers")
    p.add_argument("out", help="refbnn model file to write (.h5)")
    return p.parse_args(argv)


def run(src, dest) -> dict:
    """Convert ``src`` to ``dest``; returns the refbnn config. Raises ``UserError``-like errors."""
    from refbnn.interop import larq

    if os.path.exists(dest) and os.path.exists(src) and os.path.samefile(src, dest):
        raise UserError(f"{dest}: the output would overwrite the input")
    return larq.convert_file(src, dest)


def main(argv=None) -> int:
    args = parse_args(argv)
    from refbnn import fileformat
    from refbnn.models.config import ConfigError

    try:
        cfg = run(args.model, args.out)
    except (UserError, ValueError, ConfigError, fileformat.FormatError, OSError) as e:
        return fail(e)
    print(f"wrote {args.out}: {cfg['name']}, input {cfg['input_shape']}, widths {cfg['widths']}, "
          f"blocks {cfg['blocks']}, scale {cfg['scale']}, bn_eps {cfg['bn_eps']:g}, "
          f"pad_values {cfg['pad_values'] or {}} (default {cfg['pad_value']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
