"""``python -m refbnn.train --dataset mnist``: train a 1-bit network on CPU, resumably.

Writes into ``--out-dir`` (default ``runs/<dataset>-<model>``): ``checkpoint.h5`` after every epoch
(and on Ctrl-C), ``metrics.jsonl`` (one JSON object per epoch), ``curves.png`` (loss and test
accuracy per epoch) and, at the end, the trained model (``--out``, default ``<out-dir>/model.h5``)
which ``python -m refbnn.infer`` runs. Every file is written to a temporary name and renamed.

``--stop-after K`` ends this invocation after K epochs with a checkpoint that ``--resume`` continues
bit-identically (N epochs straight and K epochs + resume give the same weights, for the same thread
count).

Exit status: 0 done (or stopped by ``--stop-after``), 2 bad arguments or data, 3 the loss became
NaN/inf (the last good checkpoint is kept), 130 interrupted (a resumable checkpoint was saved).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

from refbnn.cli_util import write_text_atomic

DEFAULTS = {
    "model": "ftbnn18", "width": 0.375, "stem_pool": True, "epochs": 10, "batch_size": 128,
    "optimizer": "adam", "lr": 3e-3, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0,
    "schedule": "cosine", "warmup_epochs": 0.0, "step_epochs": 0, "label_smoothing": 0.0,
    "augment": 2, "seed": 0,
}
RECIPE_FLAGS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov", "weight_decay",
                "schedule", "warmup_epochs", "step_epochs", "label_smoothing", "augment")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m refbnn.train",
                                description="Train a 1-bit CNN (Bi-Real Net / FTBNN) on CPU.")
    p.add_argument("--dataset", default="mnist", help="mnist or fashion-mnist (default mnist)")
    p.add_argument("--data-dir", help="folder holding the IDX files (else $REFBNN_DATA_DIR/<dataset>, "
                   "the cache, /usr/share/datasets)")
    p.add_argument("--no-download", action="store_true", help="never try to download the data")
    p.add_argument("--model", help=f"model preset (default {DEFAULTS['model']})")
    p.add_argument("--width", type=float, help=f"width multiplier (default {DEFAULTS['width']})")
    p.add_argument("--stem-pool", action=argparse.BooleanOptionalAction, default=None,
                   help="3x3/2 max-pool after the stem (default on: 28x28 input -> 14x14 stages)")
    p.add_argument("--epochs", type=int, help=f"default {DEFAULTS['epochs']}")
    p.add_argument("--batch-size", type=int, help=f"default {DEFAULTS['batch_size']}")
    p.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), help="default adam")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {DEFAULTS['lr']})")
    p.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    p.add_argument("--nesterov", action="store_true", default=None, help="SGD with Nesterov momentum")
    p.add_argument("--weight-decay", type=float, help="default 0 (never on BN, slopes, biases)")
    p.add_argument("--schedule", choices=("constant", "cosine", "linear", "step"), help="default cosine")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up (default 0)")
    p.add_argument("--step-epochs", type=int, help="step schedule: lr x0.1 every N epochs")
    p.add_argument("--label-smoothing", type=float, help="default 0")
    p.add_argument("--augment", type=int, help="random shifts of up to N pixels (default 2; 0 off)")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--out-dir", help="run folder (default runs/<dataset>-<model>)")
    p.add_argument("--out", help="final model file (default <out-dir>/model.h5)")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue a run from its checkpoint.h5")
    p.add_argument("--stop-after", type=int, metavar="EPOCHS",
                   help="stop after this many epochs in this invocation (resumable, like Ctrl-C)")
    p.add_argument("--limit-train", type=int, help="use only the first N training images (smoke tests)")
    p.add_argument("--limit-test", type=int, help="evaluate on only the first N test images")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def fail(message: str, status: int = 2) -> int:
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    return status


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written there (raises ``OSError``)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".write-test-")
    os.close(fd)
    os.unlink(tmp)


def write_curves(path, history, title):
    """Two panels like the paper's Figure 5: train/test loss, and test accuracy (%), per epoch."""
    from refbnn.plot import line_panels

    epochs = [r["epoch"] for r in history]
    line_panels(path, [
        ({"train loss": (epochs, [r["train_loss"] for r in history]),
          "test loss": (epochs, [r["test_loss"] for r in history])}, f"{title}: loss", "epoch", "loss"),
        ({"test accuracy %": (epochs, [100 * r["test_accuracy"] for r in history]),
          "train accuracy %": (epochs, [100 * r["train_accuracy"] for r in history])},
         f"{title}: accuracy", "epoch", "%")])


def main(argv=None) -> int:
    args = parse_args(argv)
    # heavy imports after argument parsing, so --help is instant
    import numba
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    from refbnn import fileformat, models
    from refbnn.data import DATASETS, DataError, load_dataset, subset
    from refbnn.training.trainer import NonFiniteLoss, Recipe, Trainer, evaluate

    threads = args.threads or os.cpu_count() or 1
    if threads < 1:
        return fail(f"--threads must be >= 1, got {threads}")
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    threadpool_limits(1)  # refbnn.nn splits its GEMMs over numba's threads and keeps BLAS at one

    # --- what to train: from the checkpoint, or from the flags -------------------------------
    resumed = None
    if args.resume:
        try:
            resumed = fileformat.load(args.resume)
        except (fileformat.FormatError, OSError) as e:
            return fail(e)
        if resumed.kind != "checkpoint":
            return fail(f"{args.resume}: is a {resumed.kind} file, not a training checkpoint")
        given = [f for f in RECIPE_FLAGS + ("model", "width", "stem_pool", "seed")
                 if getattr(args, f) is not None and f != "epochs"]
        if given:
            return fail(f"--resume continues the saved recipe; drop --{given[0].replace('_', '-')}")
        run = resumed.provenance["run"]
        dataset_name, model_name, seed = resumed.dataset, run["model"], run["seed"]
        if args.limit_train is not None or args.limit_test is not None:
            return fail("--resume continues with the saved data limits; drop --limit-train/--limit-test")
        args.limit_train, args.limit_test = run.get("limit_train"), run.get("limit_test")
        recipe = Recipe.from_dict(run["recipe"])
        if args.epochs is not None:
            recipe.epochs = args.epochs
        config = resumed.config
    else:
        values = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in DEFAULTS.items()}
        dataset_name, model_name, seed = args.dataset, values["model"], values["seed"]
        recipe = Recipe(**{k: values[k] for k in RECIPE_FLAGS})
        config = None
    if dataset_name not in DATASETS:
        return fail(f"unknown dataset {dataset_name!r}; known: {', '.join(sorted(DATASETS))}")
    if recipe.epochs < 1 or recipe.batch_size < 1 or not recipe.lr > 0:
        return fail("--epochs, --batch-size and --lr must be positive")
    if args.stop_after is not None and args.stop_after < 1:
        return fail("--stop-after must be positive")

    out_dir = Path(args.out_dir or (Path(args.resume).parent if args.resume
                                    else Path("runs") / f"{dataset_name}-{model_name}"))
    out_path = Path(args.out) if args.out else out_dir / "model.h5"
    try:
        check_writable(out_dir)
        check_writable(out_path.parent)
    except OSError as e:
        return fail(f"cannot write to the output folder: {e}")
    ckpt_path = out_dir / "checkpoint.h5"

    try:
        train_set = load_dataset(dataset_name, "train", data_dir=args.data_dir, download=not args.no_download)
        test_set = load_dataset(dataset_name, "test", data_dir=args.data_dir, download=not args.no_download)
    except DataError as e:
        return fail(e)
    for limit, name in ((args.limit_train, "--limit-train"), (args.limit_test, "--limit-test")):
        if limit is not None and limit < 1:
            return fail(f"{name} must be positive")
    if args.limit_train:
        train_set = subset(train_set, min(args.limit_train, len(train_set)))
    if args.limit_test:
        test_set = subset(test_set, min(args.limit_test, len(test_set)))
    spec = DATASETS[dataset_name]
    h, w = train_set.images.shape[1:]

    try:
        if config is None:
            config = models.get_config(model_name, input_shape=[1, h, w],
                                       num_classes=len(train_set.class_names),
                                       width_multiplier=values["width"],
                                       stem_pool=values["stem_pool"])
        model = models.build(config, seed=seed)
    except ValueError as e:
        return fail(e)
    trainer = Trainer(model, train_set, recipe, seed=seed)
    if resumed is not None:
        try:
            model.load_state_dict(resumed.state_dict)
            trainer.optimizer.load_state_dict({"state": resumed.optimizer_state,
                                               "hparams": resumed.optimizer_hyperparameters})
            trainer.restore_position(resumed.epoch, resumed.rng_state)
            trainer.history = list(resumed.history)
        except (KeyError, ValueError) as e:
            return fail(f"{args.resume}: does not match its own model config: {e}")
        if trainer.epoch >= recipe.epochs:
            return fail(f"{args.resume}: already trained {trainer.epoch} of {recipe.epochs} epochs; "
                        "pass a larger --epochs to continue")

    command = "python -m refbnn.train " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    run_info = {"model": model_name, "seed": seed, "recipe": recipe.to_dict(), "threads": threads,
                "limit_train": args.limit_train, "limit_test": args.limit_test,
                "command": command if resumed is None else resumed.provenance["run"]["command"]}
    input_spec = {"shape": [1, h, w], "layout": "NCHW", "channel_order": "L",
                  "mean": [spec.mean], "std": [spec.std]}
    common = {"config": config, "input_spec": input_spec,
              "class_names": list(train_set.class_names), "dataset": dataset_name}

    def save_checkpoint():
        opt = trainer.optimizer.state_dict()
        fileformat.save_checkpoint(
            ckpt_path, model.state_dict(), binary_weights=model.binary_weights(),
            optimizer_state=opt["state"],
            optimizer_hyperparameters=opt["hparams"],
            rng_state=trainer.position(), epoch=trainer.epoch, history=trainer.history,
            metrics=trainer.history[-1] if trainer.history else {}, provenance={"run": run_info}, **common)

    def write_logs():
        write_text_atomic(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in trainer.history))
        write_curves(out_dir / "curves.png", trainer.history, f"{model_name} on {dataset_name}")

    interrupted = {"count": 0}

    def on_sigint(signum, frame):
        interrupted["count"] += 1
        if interrupted["count"] > 1:
            raise KeyboardInterrupt
        trainer.stop_requested = True

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    print(f"training {model_name} (stage widths {'/'.join(map(str, model.config['widths']))}, "
          f"{sum(p.data.size for p in model.parameters()):,} parameters) on {dataset_name}: "
          f"{len(train_set)} train / {len(test_set)} test images, {threads} threads, "
          f"epochs {trainer.epoch + 1}..{recipe.epochs}", file=sys.stderr)
    stop_at = recipe.epochs
    if args.stop_after is not None:
        stop_at = min(recipe.epochs, trainer.epoch + args.stop_after)
    try:
        while trainer.epoch < stop_at:
            epoch = trainer.epoch + 1
            bar = tqdm(total=trainer.steps_per_epoch, initial=trainer.batches_done, unit="batch",
                       desc=f"epoch {epoch}/{recipe.epochs}", disable=args.quiet, leave=True,
                       dynamic_ncols=True)

            def on_batch(stats, n, bar=bar):
                bar.update(1)
                bar.set_postfix(loss=f"{stats.loss:.4f}", acc=f"{stats.accuracy:.4f}",
                                img_s=f"{stats.seen / max(stats.seconds, 1e-9):.0f}", refresh=False)

            try:
                stats = trainer.train_epoch(on_batch)
            finally:
                bar.close()
            if stats is None:
                save_checkpoint()
                print(f"interrupted in epoch {epoch}; saved {ckpt_path}; continue with "
                      f"python -m refbnn.train --resume {ckpt_path}", file=sys.stderr)
                return 130
            t = time.perf_counter()
            test = evaluate(model, test_set)
            last_step = trainer.epoch * trainer.steps_per_epoch - 1
            record = {"epoch": epoch, "lr": trainer.learning_rate(last_step),
                      "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                      "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                      "train_seconds": stats.seconds, "eval_seconds": time.perf_counter() - t,
                      "images_per_second": stats.seen / max(stats.seconds, 1e-9)}
            trainer.history.append(record)
            save_checkpoint()
            write_logs()
            print(f"epoch {epoch}: train loss {stats.loss:.4f} acc {stats.accuracy:.4f} | test loss "
                  f"{test['loss']:.4f} acc {test['accuracy']:.4f} | "
                  f"{record['images_per_second']:.0f} img/s, "
                  f"{stats.seconds:.0f} s", file=sys.stderr)
        if trainer.epoch < recipe.epochs:
            print(f"stopped after epoch {trainer.epoch} of {recipe.epochs} as asked; continue with "
                  f"python -m refbnn.train --resume {ckpt_path}", file=sys.stderr)
            return 0
    except NonFiniteLoss as e:
        kept = (f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists()
                else "no checkpoint was written")
        return fail(f"{e}; stopped, {kept}", status=3)
    except KeyboardInterrupt:
        print("interrupted twice: stopped without saving the current epoch", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous_handler)

    final = trainer.history[-1]
    fileformat.save_model(out_path, model.state_dict(), binary_weights=model.binary_weights(), metrics={
        "test_accuracy": final["test_accuracy"], "test_loss": final["test_loss"], "epochs": recipe.epochs},
        provenance={"run": run_info}, **common)
    print(f"wrote {out_path} (test accuracy {final['test_accuracy']:.4f})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
