"""``fit``: train a model for a recipe's epochs, with evaluation, history, run files and Ctrl-C.

::

    from refbnn import models
    from refbnn.data import load_dataset
    from refbnn.training.fit import fit
    from refbnn.training.recipe import Recipe

    model = models.build("ftbnn18", seed=0, input_shape=[1, 28, 28], num_classes=10,
                         width_multiplier=0.375, stem_pool=True)
    result = fit(model, Recipe(), load_dataset("mnist", "train"), load_dataset("mnist", "test"),
                 out_dir="runs/mnist-ftbnn18", seed=0)

Every epoch: :meth:`Trainer.train_epoch`, then (with ``test_set``) an evaluation, one history record
(``epoch, lr, train_loss, train_accuracy, test_loss, test_accuracy, train_seconds, eval_seconds,
images_per_second``) and, with ``out_dir``, ``checkpoint.h5``, ``metrics.jsonl`` and
``curves.png`` in it; after the last epoch the model file (``model_path``, default
``out_dir/model.h5``). Every file is written atomically, and no tensor holding NaN or infinity is
ever written (:func:`~refbnn.training.faults.check_finite` before every save).

Stopping: ``stop_after=K`` ends after K epochs of this call (status ``"stopped"``, with a
checkpoint that ``resume`` continues bit-identically). With ``handle_sigint`` (main thread only)
the first Ctrl-C stops between two steps and saves a resumable checkpoint (status
``"interrupted"``); a second raises ``KeyboardInterrupt`` at once; a Ctrl-C after the last step
lets the run finish and write its files (status ``"finished"``, ``interrupted=True``). A numerical
fault raises :class:`~refbnn.training.faults.NumericalFault` and leaves the files of the last
completed epoch as they were.

This module joins the training loop to the file format (it sits one layer above the rest of
:mod:`refbnn.training`, next to :mod:`refbnn.fileformat`).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refbnn import fileformat
from refbnn.cli_util import write_text_atomic
from refbnn.data import DATASETS
from refbnn.training.faults import NumericalFault, check_finite
from refbnn.training.recipe import Recipe
from refbnn.training.trainer import Trainer, evaluate

CHECKPOINT = "checkpoint.h5"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
MODEL = "model.h5"


class Callback:
    """Hooks of :func:`fit`; every method is optional (this base class does nothing)."""

    def on_start(self, trainer: Trainer) -> None:
        """Once, after a resumed run's state is restored and checked, before any step."""

    def on_epoch_start(self, trainer: Trainer) -> None:
        """Before the steps of epoch ``trainer.epoch + 1`` (``trainer.batches_done`` may be > 0)."""

    def on_batch(self, trainer: Trainer, stats) -> None:
        """After every step; ``stats`` (:class:`EpochStats`) are the epoch's running sums."""

    def on_epoch_end(self, trainer: Trainer, record: dict | None) -> None:
        """After an epoch's evaluation and files, with its history record; ``None`` when the epoch
        did not complete (Ctrl-C, a numerical fault, an error)."""

    def on_end(self, result: FitResult) -> None:
        """After the last epoch and the final files (not called when fit raises)."""


class ConsoleLog(Callback):
    """A tqdm progress bar per epoch (unless ``quiet``) and one line per epoch on ``stream``
    (default stderr), after ``header`` (with the epochs to run) once at the start."""

    def __init__(self, quiet: bool = False, stream=None, header: str | None = None):
        self.quiet, self.stream, self.bar, self.header = quiet, stream, None, header

    def on_start(self, trainer):
        if self.header is not None:
            print(f"{self.header}, epochs {trainer.epoch + 1}..{trainer.recipe.epochs}",
                  file=self.stream or sys.stderr)

    def on_epoch_start(self, trainer):
        from tqdm import tqdm

        self.bar = tqdm(total=trainer.steps_per_epoch, initial=trainer.batches_done, unit="batch",
                        desc=f"epoch {trainer.epoch + 1}/{trainer.recipe.epochs}",
                        disable=self.quiet, leave=True, dynamic_ncols=True,
                        file=self.stream or sys.stderr)

    def on_batch(self, trainer, stats):
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{stats.loss:.4f}", acc=f"{stats.accuracy:.4f}",
                             img_s=f"{stats.seen / max(stats.seconds, 1e-9):.0f}", refresh=False)

    def on_epoch_end(self, trainer, record):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if record is None:
            return
        test = (f" | test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f}"
                if "test_loss" in record else "")
        print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} acc "
              f"{record['train_accuracy']:.4f}{test} | {record['images_per_second']:.0f} img/s, "
              f"{record['train_seconds']:.0f} s", file=self.stream or sys.stderr)


@dataclass
class FitResult:
    """What :func:`fit` did. ``status``: ``"finished"`` (all epochs, model file written),
    ``"stopped"`` (``stop_after``) or ``"interrupted"`` (Ctrl-C; resumable checkpoint saved);
    ``interrupted``: a Ctrl-C arrived (for ``"finished"``: after the last step)."""

    status: str
    epoch: int
    history: list
    interrupted: bool = False
    checkpoint: Path | None = None
    model_path: Path | None = None
    final: dict = field(default_factory=dict)


# --- resuming ----------------------------------------------------------------------------------------
def resume_recipe(loaded) -> tuple[Recipe, dict]:
    """``(recipe, run)`` of a checkpoint written by :func:`fit` (``loaded``: a
    :class:`~refbnn.fileformat.LoadedFile`); ``ValueError`` naming what is missing when the file
    cannot be continued (another kind, no RNG state, no recorded recipe, ...)."""
    where = loaded.path
    if loaded.kind != "checkpoint":
        raise ValueError(f"{where}: is a {loaded.kind} file, not a training checkpoint")
    run = (loaded.provenance or {}).get("run")
    if not isinstance(run, dict) or not isinstance(run.get("recipe"), dict):
        raise ValueError(f"{where}: not a checkpoint of refbnn's training loop (its provenance holds "
                         "no run.recipe), so the run cannot be continued")
    if not isinstance(loaded.rng_state, dict) or "bit_generator" not in loaded.rng_state:
        raise ValueError(f"{where}: the checkpoint holds no RNG state (rng_state), so the run cannot "
                         "be continued bit-identically")
    if not isinstance(loaded.optimizer_hyperparameters, dict):
        raise ValueError(f"{where}: the checkpoint holds no optimizer hyper-parameters")
    try:
        recipe = Recipe.from_dict(run["recipe"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: provenance run.recipe: {e}") from None
    return recipe, run


def _restore(trainer: Trainer, loaded) -> None:
    try:
        trainer.model.load_state_dict(loaded.state_dict)
        trainer.optimizer.load_state_dict({"state": loaded.optimizer_state,
                                           "hparams": loaded.optimizer_hyperparameters})
        trainer.restore_position(loaded.epoch, loaded.rng_state)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{loaded.path}: does not match its own model config and recipe: "
                         f"{' '.join(str(e).split())}") from None
    if not isinstance(loaded.history, list) or len(loaded.history) != loaded.epoch:
        raise ValueError(f"{loaded.path}: history holds {len(loaded.history or [])} records for "
                         f"{loaded.epoch} epochs")
    trainer.history = list(loaded.history)


# --- files -------------------------------------------------------------------------------------------
def input_spec(dataset) -> dict | None:
    """The ``input_spec`` of models trained on ``dataset`` (``batches``' default normalisation)."""
    spec = DATASETS.get(dataset.name)
    if spec is None:
        return None
    h, w = dataset.images.shape[1:]
    return {"shape": [1, int(h), int(w)], "layout": "NCHW", "channel_order": "L",
            "mean": [spec.mean], "std": [spec.std]}


def write_curves(path, history, title) -> None:
    """Two panels like the paper's Figure 5: train/test loss, and accuracy (%), per epoch; the
    series are named ``train`` and ``test`` in both, so each has one colour."""
    from refbnn.plot import line_panels

    epochs = [r["epoch"] for r in history]
    loss = {"train": (epochs, [r["train_loss"] for r in history])}
    acc = {"train": (epochs, [100 * r["train_accuracy"] for r in history])}
    if history and "test_loss" in history[0]:
        loss["test"] = (epochs, [r["test_loss"] for r in history])
        acc["test"] = (epochs, [100 * r["test_accuracy"] for r in history])
    line_panels(path, [(loss, f"{title}: loss", "epoch", "loss"),
                       (acc, f"{title}: accuracy", "epoch", "accuracy (%)")])


class _RunFiles:
    def __init__(self, trainer, out_dir, model_path, meta, title):
        self.trainer, self.meta, self.title = trainer, meta, title
        self.out_dir = Path(out_dir)
        self.checkpoint = self.out_dir / CHECKPOINT
        self.model_path = Path(model_path) if model_path is not None else self.out_dir / MODEL
        for folder in (self.out_dir, self.model_path.parent):
            folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _write(path, save, *args, **kw) -> None:
        try:
            save(path, *args, **kw)
        except NumericalFault:
            raise
        except (OSError, RuntimeError) as e:  # h5py reports some failed writes as RuntimeError
            raise OSError(f"cannot write {path}: {' '.join(str(e).split())}") from None

    def _state(self):
        model = self.trainer.model
        state = model.state_dict()
        check_finite(state.items(), "refusing to save: tensor")
        return state, model.binary_weights()

    def save_checkpoint(self) -> None:
        t = self.trainer
        state, binary = self._state()
        opt = t.optimizer.state_dict()
        check_finite(opt["state"].items(), "refusing to save: optimizer state")
        self._write(
            self.checkpoint, fileformat.save_checkpoint, state, binary_weights=binary,
            optimizer_state=opt["state"],
            optimizer_hyperparameters=opt["hparams"], rng_state=t.position(), epoch=t.epoch,
            history=t.history, metrics=t.history[-1] if t.history else {}, **self.meta)

    def write_logs(self) -> None:
        history = self.trainer.history
        write_text_atomic(self.out_dir / METRICS,
                          "".join(json.dumps(r, allow_nan=False) + "\n" for r in history))
        write_curves(self.out_dir / CURVES, history, self.title)

    def save_model(self) -> None:
        state, binary = self._state()
        final = self.trainer.history[-1]
        metrics = {"epochs": self.trainer.recipe.epochs}
        metrics.update({k: final[k] for k in ("test_accuracy", "test_loss") if k in final})
        self._write(self.model_path, fileformat.save_model, state, binary_weights=binary,
                    metrics=metrics, **self.meta)


# --- the loop ----------------------------------------------------------------------------------------
def fit(model, recipe: Recipe, train_set, test_set=None, out_dir=None, *, seed: int = 0,
        callbacks=(), resume=None, stop_after: int | None = None, model_path=None,
        run_info: dict | None = None, handle_sigint: bool = True) -> FitResult:
    """Train ``model`` (a refbnn Module; with ``out_dir`` a ``models.build`` network, whose
    ``config`` the files record) on ``train_set`` for ``recipe.epochs`` epochs (module docstring).

    ``resume``: a checkpoint (:class:`~refbnn.fileformat.LoadedFile`, see :func:`resume_recipe`)
    to continue from: weights, optimizer, position and history come from it (``recipe`` should be
    its recipe, ``epochs`` may be larger). ``run_info``: extra JSON fields of the files'
    ``provenance["run"]`` (``seed`` and ``recipe`` are added). Raises ``ValueError`` for a
    checkpoint that does not fit, :class:`NumericalFault`, ``OSError`` from writing.
    """
    trainer = Trainer(model, train_set, recipe, seed=seed)
    if resume is not None:
        _restore(trainer, resume)
        if trainer.epoch >= recipe.epochs:
            raise ValueError(f"{resume.path}: already trained {trainer.epoch} of {recipe.epochs} "
                             "epochs; pass a larger epochs to continue")
    files = None
    if out_dir is not None:
        run = {**(run_info or {}), "seed": seed, "recipe": recipe.to_dict()}
        meta = {"config": model.config, "input_spec": input_spec(train_set),
                "class_names": list(train_set.class_names), "dataset": train_set.name,
                "provenance": {"run": run}}
        files = _RunFiles(trainer, out_dir, model_path, meta,
                          f"{model.config.get('name', 'model')} on {train_set.name}")
    for cb in callbacks:
        cb.on_start(trainer)
    stop_at = recipe.epochs if stop_after is None else min(recipe.epochs, trainer.epoch + stop_after)
    interrupts = {"count": 0}

    def on_sigint(signum, frame):
        interrupts["count"] += 1
        if interrupts["count"] > 1:
            raise KeyboardInterrupt
        trainer.stop_requested = True

    previous = None
    if handle_sigint and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        status = _epochs(trainer, test_set, files, list(callbacks), stop_at)
        if status == "finished" and files is not None:
            files.save_model()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    result = FitResult(status, trainer.epoch, trainer.history, interrupted=interrupts["count"] > 0,
                       checkpoint=files.checkpoint if files else None,
                       model_path=files.model_path if files and status == "finished" else None,
                       final=trainer.history[-1] if trainer.history else {})
    for cb in callbacks:
        cb.on_end(result)
    return result


def _epochs(trainer: Trainer, test_set, files, callbacks, stop_at) -> str:
    while trainer.epoch < stop_at:
        if trainer.stop_requested:  # Ctrl-C between two epochs: the checkpoint is already saved
            return "interrupted"
        record = None
        for cb in callbacks:
            cb.on_epoch_start(trainer)
        try:
            stats = trainer.train_epoch(
                (lambda s, n: [cb.on_batch(trainer, s) for cb in callbacks]) if callbacks else None)
            if stats is None:
                if files is not None:
                    files.save_checkpoint()
                return "interrupted"
            record = _record(trainer, stats, test_set)
            trainer.history.append(record)
            if files is not None:
                files.save_checkpoint()
                files.write_logs()
        finally:
            for cb in callbacks:
                cb.on_epoch_end(trainer, record)
    return "finished" if trainer.epoch >= trainer.recipe.epochs else "stopped"


def _record(trainer: Trainer, stats, test_set) -> dict:
    epoch = trainer.epoch
    last_step = epoch * trainer.steps_per_epoch - 1
    record = {"epoch": epoch, "lr": trainer.learning_rate(last_step),
              "train_loss": stats.loss, "train_accuracy": stats.accuracy}
    t = time.perf_counter()
    if test_set is not None:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # checked just below
            test = evaluate(trainer.model, test_set)
        if not math.isfinite(test["loss"]):
            raise NumericalFault(f"the test loss became {test['loss']} after epoch {epoch} (every "
                                 "weight and running statistic is finite: an activation overflowed)")
        record.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
    record.update(train_seconds=stats.seconds, eval_seconds=time.perf_counter() - t,
                  images_per_second=stats.seen / max(stats.seconds, 1e-9))
    return record
