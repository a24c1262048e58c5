"""``python -m refbnn.train --dataset mnist``: train a 1-bit network on CPU, resumably.

The command line only (flags in, exit status out); the training library it drives is the package
:mod:`refbnn.training` (losses, optimizers, schedules, ``Recipe``, ``fit``).

Writes into ``--out-dir`` (default ``runs/<dataset>-<model>``): ``checkpoint.h5`` after every epoch
(and on Ctrl-C), ``metrics.jsonl`` (one JSON object per epoch), ``curves.png`` (train and test
loss and accuracy per epoch) and, at the end, the trained model (``--out``, default ``<out-dir>/model.h5``)
which ``python -m refbnn.infer`` runs. Every file is written to a temporary name and renamed.
The loop itself is :func:`refbnn.training.fit.fit`; the recipe's defaults and ranges are
:class:`refbnn.training.recipe.Recipe`'s. This module only turns flags into its arguments.

``--stop-after K`` ends this invocation after K epochs with a checkpoint that ``--resume`` continues
bit-identically (N epochs straight and K epochs + resume give the same weights, for the same thread
count).

Exit status: 0 done (or stopped by ``--stop-after``), 2 bad arguments, data or checkpoint, or an
output that cannot be written (a full disk), 3 a NaN or infinity appeared (the line names where;
the last good checkpoint is kept), 130 interrupted (a resumable checkpoint was saved).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from refbnn import cli_util
from refbnn.cli_util import ArgumentParser, fail
from refbnn.training.recipe import LIMITS, OPTIMIZERS, Recipe, RecipeError
from refbnn.training.schedules import SCHEDULES

MODEL_DEFAULTS = {"model": "ftbnn18", "width": 0.375, "stem_pool": True, "seed": 0}
RECIPE_FLAGS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov", "weight_decay",
                "schedule", "warmup_epochs", "step_epochs", "label_smoothing", "augment")


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def build_parser() -> ArgumentParser:
    from refbnn.data import DATASETS
    from refbnn.models import list_models

    r, m = Recipe(), MODEL_DEFAULTS
    p = ArgumentParser(prog="python -m refbnn.train",
                       description="Train a 1-bit CNN (Bi-Real Net / FTBNN) on CPU.")
    p.add_argument("--dataset", default="mnist", choices=sorted(DATASETS), help="default mnist")
    p.add_argument("--data-dir", type=cli_util.existing_dir,
                   help="folder holding the IDX files (or <dataset>/ with them); nothing else is "
                        "searched then (default: $REFBNN_DATA_DIR's folders/<dataset>, the cache)")
    p.add_argument("--no-download", action="store_true", help="never try to download the data")
    p.add_argument("--model", choices=list_models(), metavar="PRESET",
                   help=f"model preset, one of {', '.join(list_models())} (default {m['model']})")
    p.add_argument("--width", type=cli_util.width_multiplier,
                   help=f"width multiplier in (0, 4] (default {m['width']})")
    p.add_argument("--stem-pool", action=argparse.BooleanOptionalAction, default=None,
                   help="3x3/2 max-pool after the stem (default on: 28x28 input -> 14x14 stages)")
    p.add_argument("--epochs", type=LIMITS["epochs"], help=f"default {r.epochs}")
    p.add_argument("--batch-size", type=LIMITS["batch_size"], help=f"default {r.batch_size}")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help=f"default {r.optimizer}")
    p.add_argument("--lr", type=LIMITS["lr"], help=f"peak learning rate (default {r.lr:g})")
    p.add_argument("--momentum", type=LIMITS["momentum"], help=f"SGD momentum (default {r.momentum})")
    p.add_argument("--nesterov", action="store_true", default=None, help="SGD with Nesterov momentum")
    p.add_argument("--weight-decay", type=LIMITS["weight_decay"],
                   help=f"default {r.weight_decay:g} (never on BN, slopes, biases)")
    p.add_argument("--schedule", choices=SCHEDULES, help=f"default {r.schedule}")
    p.add_argument("--warmup-epochs", type=LIMITS["warmup_epochs"],
                   help=f"linear warm-up, at most --epochs (default {r.warmup_epochs:g})")
    p.add_argument("--step-epochs", type=LIMITS["step_epochs"],
                   help="step schedule: lr x0.1 every N epochs (needed with --schedule step)")
    p.add_argument("--label-smoothing", type=LIMITS["label_smoothing"],
                   help=f"in [0, 1] (default {r.label_smoothing:g})")
    p.add_argument("--augment", type=LIMITS["augment"],
                   help=f"random shifts of up to N pixels, 0-27 (default {r.augment}; 0 off)")
    p.add_argument("--seed", type=cli_util.seed, help=f"default {m['seed']}")
    p.add_argument("--threads", type=cli_util.threads, default=None,
                   help="CPU threads, 1-1024 (default: all cores)")
    p.add_argument("--out-dir", help="run folder (default runs/<dataset>-<model>)")
    p.add_argument("--out", help="final model file (default <out-dir>/model.h5)")
    p.add_argument("--resume", metavar="CHECKPOINT", type=cli_util.existing_file,
                   help="continue a run from its checkpoint.h5")
    p.add_argument("--stop-after", type=cli_util.positive_int, metavar="EPOCHS",
                   help="stop after this many epochs in this invocation (resumable, like Ctrl-C)")
    p.add_argument("--limit-train", type=cli_util.positive_int,
                   help="use only the first N training images (smoke tests)")
    p.add_argument("--limit-test", type=cli_util.positive_int,
                   help="evaluate on only the first N test images")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_args(argv):
    """The flags, every one checked (exit 2 with one line otherwise); ``args.recipe`` is the
    checked :class:`Recipe` of a new run (``None`` with ``--resume``: it comes from the file)."""
    p = build_parser()
    args = p.parse_args(argv)
    args.recipe = None
    if args.resume:
        given = [f for f in RECIPE_FLAGS + ("model", "width", "stem_pool", "seed", "limit_train",
                                            "limit_test")
                 if getattr(args, f) is not None and f != "epochs"]
        if given:
            p.fail_flag(flag(given[0]), "--resume continues the saved recipe, model and data "
                                        "limits; drop this flag")
    else:
        values = {f: getattr(args, f) for f in RECIPE_FLAGS if getattr(args, f) is not None}
        try:
            args.recipe = Recipe(**values).check()
        except RecipeError as e:
            p.fail_flag(flag(e.field), e.problem)
    for k, v in MODEL_DEFAULTS.items():
        if getattr(args, k) is None and not args.resume:
            setattr(args, k, v)
    return args


def _paths(args, dataset_name, model_name):
    out_dir = Path(args.out_dir or (Path(args.resume).parent if args.resume
                                    else Path("runs") / f"{dataset_name}-{model_name}"))
    out_path = Path(args.out) if args.out else out_dir / "model.h5"
    if args.resume and cli_util.same_file(args.resume, out_path):
        raise cli_util.UserError(f"argument --out: {out_path} is the checkpoint given to --resume; "
                                 "the model file would replace it")
    for name in ("checkpoint.h5", "metrics.jsonl", "curves.png"):
        if cli_util.same_file(out_dir / name, out_path):
            raise cli_util.UserError(f"argument --out: {out_path} is the run's own {name}")
    for folder, name in ((out_dir, "--out-dir"), (out_path.parent, "--out")):
        try:
            cli_util.check_writable(folder)
        except OSError as e:
            raise cli_util.UserError(f"argument {name}: cannot write to the output folder {folder}: "
                                     f"{e}") from None
    from refbnn.atomicio import check_target

    # a folder (or FIFO, device) where a file goes: refused now, not after the training
    for target, name in [(out_dir / n, "--out-dir") for n in ("checkpoint.h5", "metrics.jsonl",
                                                              "curves.png")] + [(out_path, "--out")]:
        try:
            check_target(target)
        except OSError as e:
            raise cli_util.UserError(f"argument {name}: {e.strerror}") from None
    return out_dir, out_path


@cli_util.command
def main(argv=None) -> int:
    args = parse_args(argv)
    # heavy imports after argument parsing, so --help is instant
    import numba
    from threadpoolctl import threadpool_limits

    from refbnn import fileformat, models
    from refbnn.data import DataError, subset
    from refbnn.training.faults import NumericalFault
    from refbnn.training.fit import ConsoleLog, fit, resume_recipe

    threads = args.threads or os.cpu_count() or 1
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    threadpool_limits(1)  # refbnn.nn splits its GEMMs over numba's threads and keeps BLAS at one

    # --- what to train: from the checkpoint, or from the flags; then where -----------------------
    try:
        resumed = None
        if args.resume:
            try:
                resumed = fileformat.load(args.resume)
                recipe, run = resume_recipe(resumed)
                if args.epochs is not None:
                    recipe.epochs = args.epochs
                    recipe.check()
            except (fileformat.FormatError, ValueError, OSError) as e:
                raise cli_util.UserError(f"argument --resume: {e}") from None
            dataset_name, seed = resumed.dataset, run.get("seed", 0)
            model_name = run.get("model") or resumed.config.get("name", "model")
            limit_train, limit_test = run.get("limit_train"), run.get("limit_test")
            from refbnn.data import DATASETS
            if dataset_name not in DATASETS:
                raise cli_util.UserError(f"argument --resume: {args.resume}: names no known dataset "
                                         f"({dataset_name!r})")
        else:
            recipe, dataset_name, model_name, seed = args.recipe, args.dataset, args.model, args.seed
            limit_train, limit_test = args.limit_train, args.limit_test
        out_dir, out_path = _paths(args, dataset_name, model_name)
    except cli_util.UserError as e:
        return fail(e)

    # --- data, model ------------------------------------------------------------------------------
    try:
        train_set, folder = cli_util.load_split(dataset_name, "train", args.data_dir, not args.no_download)
        test_set, _ = cli_util.load_split(dataset_name, "test", args.data_dir, not args.no_download)
    except DataError as e:
        return fail(e)
    if limit_train:
        train_set = subset(train_set, min(limit_train, len(train_set)))
    if limit_test:
        test_set = subset(test_set, min(limit_test, len(test_set)))
    h, w = train_set.images.shape[1:]
    try:
        if resumed is None:
            config = models.get_config(model_name, input_shape=[1, h, w],
                                       num_classes=len(train_set.class_names),
                                       width_multiplier=args.width, stem_pool=args.stem_pool)
        else:
            config = resumed.config
        model = models.build(config, seed=seed)
    except ValueError as e:
        return fail(f"argument --resume: {args.resume}: model config: {e}" if resumed else e)
    except MemoryError:
        return fail("out of memory building the model; choose a smaller --width")

    command = "python -m refbnn.train " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if resumed is not None and isinstance(run.get("command"), str):
        command = run["command"]  # the command that started the run
    run_info = {"model": model_name, "threads": threads, "limit_train": limit_train,
                "limit_test": limit_test, "command": command}
    header = (f"training {model_name} (stage widths {'/'.join(map(str, model.config['widths']))}, "
              f"{sum(p.data.size for p in model.parameters()):,} parameters) on {dataset_name} from "
              f"{folder}: {len(train_set)} train / {len(test_set)} test images, {threads} threads")
    ckpt = out_dir / "checkpoint.h5"
    try:
        result = fit(model, recipe, train_set, test_set, out_dir, seed=seed,
                     callbacks=[ConsoleLog(args.quiet, header=header)], resume=resumed,
                     stop_after=args.stop_after, model_path=out_path, run_info=run_info)
    except NumericalFault as e:
        kept = f"the last good checkpoint is {ckpt}" if ckpt.exists() else "no checkpoint was written"
        return fail(f"{e}; stopped, {kept}", status=3)
    except ValueError as e:  # the checkpoint does not fit its own config
        return fail(f"argument --resume: {e}")
    except MemoryError:
        return fail(f"out of memory training with --batch-size {recipe.batch_size}; choose a "
                    "smaller --batch-size or --width")
    except OSError as e:
        return fail(f"cannot write the run's files: {e}")
    except KeyboardInterrupt:
        return fail("interrupted twice: stopped without saving the current epoch", 130)

    resume_hint = f"continue with python -m refbnn.train --resume {ckpt}"
    if result.status == "interrupted":
        print(f"interrupted in epoch {result.epoch + 1}; saved {ckpt}; {resume_hint}", file=sys.stderr)
        return 130
    if result.status == "stopped":
        print(f"stopped after epoch {result.epoch} of {recipe.epochs} as asked; {resume_hint}",
              file=sys.stderr)
        return 0
    accuracy = result.final.get("test_accuracy")
    print(f"wrote {out_path}" + (f" (test accuracy {accuracy:.4f})" if accuracy is not None else ""),
          file=sys.stderr)
    if result.interrupted:
        print("interrupted after the last step: the run finished and its files are complete",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    cli_util.run_main(main)
