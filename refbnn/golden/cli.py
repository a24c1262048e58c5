"""The command line of ``python -m refbnn.golden`` (run by :mod:`refbnn.golden.__main__`); the
library it drives is :mod:`refbnn.golden`.

``python -m refbnn.golden OUT_DIR``: write golden vectors for other BNN implementations.

Writes ``OUT_DIR/ops.h5`` (bit ops, expected values from the NumPy oracle), ``OUT_DIR/layers.h5``
(training layers, forward and backward) and ``OUT_DIR/model.h5`` (a model's per-layer outputs in
eval mode and one training step), as specified in ``docs/golden.md``. The model is a preset
(``--model``, small input by default) or a refbnn weight file (``--weights``). ``--format`` picks
the form: ``hdf5`` (default), ``npz`` (``ops.npz``, ...), ``bin`` (``OUT_DIR/bin/``: raw
little-endian arrays and ``manifest.json``) or ``c`` (``OUT_DIR/c/``: C headers and a header-only
checker); ``--max-bytes`` caps the model cases' arrays (default 16 MiB; nothing is written above it).

``python -m refbnn.golden --check FILE [FILE ...]`` recomputes every case with refbnn's fast paths
and prints every mismatch (``.h5``, ``.npz`` or ``bin/manifest.json``). Exit status: 0 all agree,
1 mismatches, 2 bad arguments, a bad file or an output that cannot be written (a full disk).
"""

from __future__ import annotations

from refbnn import cli_util, golden
from refbnn.cli_util import ArgumentParser, fail
from refbnn.golden.model import randomize_state

#: input sides a golden model case may have: every layer's outputs are stored, for a batch
MAX_GOLDEN_SIDE = 256


def golden_shape(text: str) -> list[int]:
    """argparse type: C,H,W with C in [1, 4096] and H, W in [1, 256]."""
    shape = cli_util.parse_shape(text)
    if max(shape[1:]) > MAX_GOLDEN_SIDE:
        import argparse

        raise argparse.ArgumentTypeError(f"expected H and W in [1, {MAX_GOLDEN_SIDE}] (every layer's "
                                         f"output is stored), got {text!r}")
    return shape


def build_parser() -> ArgumentParser:
    from refbnn.models import list_models

    p = ArgumentParser(prog="python -m refbnn.golden",
                       description="Write or check golden vectors (docs/golden.md).")
    p.add_argument("out_dir", nargs="?", help="folder to write ops.h5, layers.h5, model.h5 into")
    p.add_argument("--check", nargs="+", metavar="FILE", help="recompute these golden files")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", choices=list_models(), metavar="PRESET",
                     help=f"model preset, one of {', '.join(list_models())} (default birealnet18)")
    src.add_argument("--weights", metavar="FILE", type=cli_util.existing_file,
                     help="a refbnn model or checkpoint file (.h5)")
    p.add_argument("--seed", type=cli_util.int_in(0, 2**32 - 1), default=0,
                   help="seed of inputs and initial weights, 0 to 2**32-1 (default 0)")
    p.add_argument("--batch", type=cli_util.int_in(2, 256), default=4,
                   help="model input batch size, 2-256 (default 4; BatchNorm training needs 2)")
    p.add_argument("--input-shape", type=golden_shape, default=[1, 12, 12],
                   help="preset input C,H,W (default 1,12,12; odd sizes after stride 2)")
    p.add_argument("--width", type=cli_util.width_multiplier, default=0.125,
                   help="preset width multiplier in (0, 4] (default 0.125)")
    p.add_argument("--num-classes", type=cli_util.int_in(1, 10_000), default=10,
                   help="preset classes, 1-10000 (default 10)")
    p.add_argument("--format", choices=("hdf5", "npz", "bin", "c"), default="hdf5",
                   help="hdf5 (default), npz, bin (raw .bin + manifest.json) or c (C headers)")
    p.add_argument("--max-bytes", type=cli_util.int_in(1, 2**40), default=16 * 2**20,
                   help="cap on the model cases' array bytes, 1 to 2**40 (default 16 MiB)")
    return p


def parse_args(argv):
    p = build_parser()
    args = p.parse_args(argv)
    if (args.out_dir is None) == (args.check is None):
        p.error("give either OUT_DIR or --check FILE")
    if args.out_dir is not None:
        try:
            cli_util.check_writable(args.out_dir)
        except OSError as e:
            p.error(f"argument OUT_DIR: cannot write to {args.out_dir}: {e}")
    return args


def load_model(args):
    """The model to record: from ``--weights`` or a freshly seeded preset."""
    from refbnn import fileformat, models

    if args.weights:
        loaded = fileformat.load(args.weights)
        if loaded.kind == "packed":
            raise ValueError(f"{args.weights}: a packed-only file has no latent weights; "
                             "use the model or checkpoint file")
        net = models.BNNResNet(loaded.config)
        net.load_state_dict(loaded.state_dict)
        return net
    net = models.build(args.model or "birealnet18", seed=args.seed, input_shape=args.input_shape,
                       width_multiplier=args.width, num_classes=args.num_classes)
    randomize_state(net, args.seed)  # BatchNorm and slopes off their initial values (and ties)
    return net


def run_check(paths) -> int:
    status = 0
    for path in paths:
        try:
            mismatches = golden.check(path)
        except golden.GoldenError as e:
            return fail(e)
        for m in mismatches:
            print(f"MISMATCH {path}: {m}")
        print(f"{path}: {'OK' if not mismatches else f'{len(mismatches)} mismatches'}")
        status = status or (1 if mismatches else 0)
    return status


@cli_util.command
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check:
        return run_check(args.check)
    import refbnn
    from refbnn import fileformat

    try:
        net = load_model(args)
    except (fileformat.FormatError, ValueError, KeyError) as e:
        return fail(e)
    except OSError as e:
        return fail(f"{args.weights}: cannot read: {e}")
    except MemoryError:
        return fail("out of memory building the model; choose a smaller --width or --input-shape")
    try:
        paths = golden.generate(args.out_dir, net, args.seed, args.batch, refbnn.__version__,
                                fmt=args.format, max_bytes=args.max_bytes)
    except ValueError as e:
        return fail(e)
    except (OSError, RuntimeError) as e:  # h5py reports some failed writes as RuntimeError
        return fail(f"cannot write the golden files into {args.out_dir}: {e}")
    for path in paths:
        print(f"wrote {path}")
    return 0
