"""``python -m refbnn.golden OUT_DIR``: write golden vectors for other BNN implementations.

Writes ``OUT_DIR/ops.h5`` (bit ops, expected values from the NumPy oracle), ``OUT_DIR/layers.h5``
(training layers, forward and backward) and ``OUT_DIR/model.h5`` (a model's per-layer outputs in
eval mode and one training step), as specified in ``docs/golden.md``. The model is a preset
(``--model``, small input by default) or a refbnn weight file (``--weights``). ``--format`` picks
the form: ``hdf5`` (default), ``npz`` (``ops.npz``, ...), ``bin`` (``OUT_DIR/bin/``: raw
little-endian arrays and ``manifest.json``) or ``c`` (``OUT_DIR/c/``: C headers and a header-only
checker); ``--max-bytes`` caps the model cases' arrays (default 16 MiB; nothing is written above it).

``python -m refbnn.golden --check FILE [FILE ...]`` recomputes every case with refbnn's fast paths
and prints every mismatch (``.h5``, ``.npz`` or ``bin/manifest.json``). Exit status: 0 all agree,
1 mismatches, 2 bad arguments or a bad file.
"""

from __future__ import annotations

import argparse
import sys

from refbnn.cli_util import fail, parse_shape


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m refbnn.golden",
                                description="Write or check golden vectors (docs/golden.md).")
    p.add_argument("out_dir", nargs="?", help="folder to write ops.h5, layers.h5, model.h5 into")
    p.add_argument("--check", nargs="+", metavar="FILE", help="recompute these golden files")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="model preset (default birealnet18)")
    src.add_argument("--weights", metavar="FILE", help="a refbnn model or checkpoint file (.h5)")
    p.add_argument("--seed", type=int, default=0, help="seed of inputs and initial weights (0)")
    p.add_argument("--batch", type=int, default=4, help="model input batch size (default 4)")
    p.add_argument("--input-shape", type=parse_shape, default=[1, 12, 12],
                   help="preset input C,H,W (default 1,12,12; odd sizes after stride 2)")
    p.add_argument("--width", type=float, default=0.125, help="preset width multiplier (0.125)")
    p.add_argument("--num-classes", type=int, default=10, help="preset classes (default 10)")
    p.add_argument("--format", choices=("hdf5", "npz", "bin", "c"), default="hdf5",
                   help="hdf5 (default), npz, bin (raw .bin + manifest.json) or c (C headers)")
    p.add_argument("--max-bytes", type=int, default=16 * 2**20,
                   help="cap on the model cases' array bytes (default 16 MiB)")
    args = p.parse_args(argv)
    if (args.out_dir is None) == (args.check is None):
        p.error("give either OUT_DIR or --check FILE")
    if args.max_bytes < 1:
        p.error(f"--max-bytes must be positive, got {args.max_bytes}")
    return args


def load_model(args):
    """The model to record: from ``--weights`` or a freshly seeded preset."""
    from refbnn import fileformat, models

    if args.batch < 2:
        raise ValueError("--batch must be >= 2 (BatchNorm training needs 2 values per channel)")
    if args.weights:
        loaded = fileformat.load(args.weights)
        if loaded.kind == "packed":
            raise ValueError(f"{args.weights}: a packed-only file has no latent weights; "
                             "use the model or checkpoint file")
        net = models.BNNResNet(loaded.config)
        net.load_state_dict(loaded.state_dict)
        return net
    from refbnn.goldenlib.model import randomize_state

    net = models.build(args.model or "birealnet18", seed=args.seed, input_shape=args.input_shape,
                       width_multiplier=args.width, num_classes=args.num_classes)
    randomize_state(net, args.seed)  # BatchNorm and slopes off their initial values (and ties)
    return net


def run_check(paths) -> int:
    from refbnn import goldenlib

    status = 0
    for path in paths:
        try:
            mismatches = goldenlib.check(path)
        except goldenlib.GoldenError as e:
            return fail(e)
        for m in mismatches:
            print(f"MISMATCH {path}: {m}")
        print(f"{path}: {'OK' if not mismatches else f'{len(mismatches)} mismatches'}")
        status = status or (1 if mismatches else 0)
    return status


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check:
        return run_check(args.check)
    import refbnn
    from refbnn import fileformat, goldenlib

    try:
        net = load_model(args)
        paths = goldenlib.generate(args.out_dir, net, args.seed, args.batch, refbnn.__version__,
                                   fmt=args.format, max_bytes=args.max_bytes)
    except (fileformat.FormatError, ValueError, KeyError, OSError) as e:
        return fail(e)
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
