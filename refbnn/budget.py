"""``python -m refbnn.budget MODEL``: per-layer MACs, FLOPs, BOPs, parameters and bytes of a model.

OPs = FLOPs + BOPs/64 (see :mod:`refbnn.models.budget` for what counts). ``--json`` prints the
whole budget as JSON; ``--png PATH`` draws the real/binary split of the original FTBNN-18 baseline and
its binary-purified variants (the paper's Figure 3, right).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from refbnn import cli_util, models
from refbnn.cli_util import ArgumentParser, UserError, fail, parse_shape
from refbnn.models.budget import count
from refbnn.plot import stacked_bars


def format_table(b) -> str:
    rows = [f"{'layer':<28}{'kind':<7}{'output':>16}{'MACs':>15}{'params':>11}"
            f"{'float B':>12}{'packed B':>11}"]
    for c in b.layers:
        shape = "x".join(str(v) for v in c.out_shape)
        rows.append(f"{c.name:<28}{c.kind:<7}{shape:>16}{c.macs:>15,}{c.params:>11,}"
                    f"{c.bytes_float:>12,}{c.bytes_packed:>11,}")
    rows.append("")
    rows.append(f"model {b.model}, input {'x'.join(map(str, b.input_shape))}")
    rows.append(f"FLOPs {b.flops:,} ({b.flops:.3e})   BOPs {b.bops:,} ({b.bops:.3e})")
    rows.append(f"OPs = FLOPs + BOPs/64 = {b.ops:.4e}")
    rows.append(f"params {b.params:,}   {b.bytes_float / 2**20:.2f} MiB as float32, "
                f"{b.bytes_packed / 2**20:.2f} MiB with packed binary weights")
    return "\n".join(rows)


def budget_split_figure(path, input_shape=(3, 224, 224)):
    """Stacked bars of real FLOPs and BOPs/64 (millions) for the baseline and purified FTBNNs."""
    bars = {}
    for name in ("ftbnn18", "ftbnn18_purified", "ftbnn18_g1"):
        b = count(models.build(name, input_shape=list(input_shape)))
        bars[name] = [b.flops / 1e6, b.bops / 64 / 1e6]
    return stacked_bars(path, bars, ["real FLOPs (M)", "BOPs/64 (M)"],
                        title="Budget split, ImageNet 224x224 (OPs in millions)", ylabel="M OPs")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m refbnn.budget", description=__doc__.splitlines()[0])
    p.add_argument("model", choices=models.list_models(), metavar="MODEL",
                   help=f"preset name ({', '.join(models.list_models())})")
    p.add_argument("--input-shape", type=parse_shape, default=None,
                   help="C,H,W of one image, each in [1, 4096] (default: the preset's, 3,224,224)")
    p.add_argument("--num-classes", type=cli_util.int_in(1, 100_000), default=None,
                   help="1-100000 (default: the preset's, 1000)")
    p.add_argument("--width-multiplier", type=cli_util.width_multiplier, default=None,
                   help="in (0, 4] (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--png", metavar="PATH", help="also write the real/binary budget split figure")
    return p


@cli_util.command
def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.png:
        try:
            cli_util.check_writable(Path(args.png).resolve().parent)
        except OSError as e:
            p.fail_flag("--png", f"cannot write {args.png}: {e}")
    try:
        overrides = {k: v for k, v in (("input_shape", args.input_shape), ("num_classes", args.num_classes),
                                       ("width_multiplier", args.width_multiplier)) if v is not None}
        b = count(models.build(args.model, **overrides))
        print(json.dumps(b.to_dict(), indent=1) if args.json else format_table(b))
        if args.png:
            budget_split_figure(args.png)
            print(f"wrote {args.png}", file=sys.stderr)
    except (UserError, ValueError) as e:
        return fail(e)
    except OSError as e:
        return fail(f"cannot write {args.png}: {e}")
    except MemoryError:
        return fail("out of memory building the model; choose a smaller --width-multiplier")
    return 0


if __name__ == "__main__":
    cli_util.run_main(main)
