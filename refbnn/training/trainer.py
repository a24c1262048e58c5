"""The training loop: mini-batch SGD/Adam on a refbnn model, deterministic and resumable.

A run is a pure function of (model init, data, :class:`Recipe`, seed, thread count): every random
draw comes from one ``np.random.Generator``, whose state at the start of the current epoch, together
with the number of batches already done, is all a checkpoint needs to continue bit-identically
(:meth:`Trainer.position` / :meth:`Trainer.restore_position`; the position also carries the
epoch's running loss/accuracy sums, so an epoch's statistics cover all of its batches).

Every step is checked for NaN and infinity (loss, gradients, parameters, optimizer state, running
statistics; :mod:`refbnn.training.faults`): a fault raises :class:`NumericalFault` naming where.
The epoch loop with evaluation, run files and Ctrl-C is :func:`refbnn.training.fit.fit`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from refbnn.data import batches
from refbnn.training.faults import NonFiniteLoss, NumericalFault, first_nonfinite, locate_in_forward
from refbnn.training.losses import cross_entropy
from refbnn.training.optim import SGD, Adam, AdamW, param_groups
from refbnn.training.recipe import Recipe
from refbnn.training.schedules import lr_at

__all__ = ["EpochStats", "NonFiniteLoss", "NumericalFault", "Recipe", "Trainer", "evaluate",
           "make_optimizer"]


def make_optimizer(model, recipe: Recipe):
    """The recipe's optimizer over ``model``'s parameters: no weight decay on parameters flagged
    ``decay=False`` (BatchNorm, slopes, biases); binary latent weights clipped to [-1, 1] after each
    step when ``recipe.clip_latent``."""
    groups = param_groups(model, recipe.weight_decay,
                          clip_latent=(-1.0, 1.0) if recipe.clip_latent else None)
    name = recipe.optimizer.lower()
    if name == "adam":
        return Adam(groups, lr=recipe.lr)
    if name == "adamw":
        return AdamW(groups, lr=recipe.lr)
    if name == "sgd":
        return SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}; use adam, adamw or sgd")


def evaluate(model, dataset, batch_size: int = 500) -> dict:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) on every example of ``dataset``."""
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    try:
        for x, y in batches(dataset, batch_size, np.random.default_rng(0), shuffle=False):
            logits = model.forward(x)
            loss, _ = cross_entropy(logits, y)
            total_loss += float(loss) * len(y)
            correct += int((logits.argmax(axis=1) == y).sum())
            n += len(y)
    finally:
        model.train(was_training)
    return {"loss": total_loss / n, "accuracy": correct / n}


@dataclass
class EpochStats:
    """Running sums of the current epoch: summed loss (``loss * batch size`` per step), correct
    predictions, images seen and seconds spent in steps (all JSON-able: checkpoints carry them)."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def loss(self):
        return self.loss_sum / max(self.seen, 1)

    @property
    def accuracy(self):
        return self.correct / max(self.seen, 1)

    def to_dict(self) -> dict:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen,
                "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict) -> EpochStats:
        try:
            out = cls(float(d["loss_sum"]), int(d["correct"]), int(d["seen"]), float(d["seconds"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"epoch_stats must hold loss_sum, correct, seen and seconds, got {d!r}") \
                from None
        if not (math.isfinite(out.loss_sum) and math.isfinite(out.seconds)) or min(out.seen, out.correct) < 0:
            raise ValueError(f"epoch_stats out of range: {d!r}")
        return out


class Trainer:
    """Owns the model, optimizer, generator and position (epoch, batches done in it, the epoch's
    running sums). ``recipe`` is checked (:meth:`Recipe.check`)."""

    def __init__(self, model, train_set, recipe: Recipe, seed: int = 0):
        self.model = model
        self.train_set = train_set
        self.recipe = recipe.check()
        self.optimizer = make_optimizer(model, recipe)
        self.rng = np.random.default_rng(seed)
        self.epoch = 0                  # epochs completed
        self.batches_done = 0           # batches completed in the current epoch
        self.stats = EpochStats()       # running sums of the current epoch
        self.epoch_start_state = self.rng.bit_generator.state
        self.history: list[dict] = []
        self.stop_requested = False     # set (e.g. by a SIGINT handler) to stop between two steps
        self._params = list(model.named_parameters())

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_set) / self.recipe.batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.recipe.epochs

    def learning_rate(self, step: int) -> float:
        r = self.recipe
        return lr_at(step, base_lr=r.lr, total_steps=self.total_steps, schedule=r.schedule,
                     warmup_steps=round(r.warmup_epochs * self.steps_per_epoch),
                     step_size=r.step_epochs * self.steps_per_epoch, gamma=0.1)

    # --- position (for checkpoints) ------------------------------------------------------------
    def position(self) -> dict:
        """JSON-able training position: the generator state at the start of the current epoch,
        the batches done in it (0 after a complete epoch) and its running sums."""
        return {"bit_generator": self.epoch_start_state, "batches_done": self.batches_done,
                "epoch_stats": self.stats.to_dict()}

    def restore_position(self, epoch: int, position: dict) -> None:
        """Continue from :meth:`position`. A position without ``epoch_stats`` (checkpoints written
        before positions carried them) restarts the epoch's sums at 0. Raises ``ValueError`` for a
        position that does not fit this run."""
        if not isinstance(position, dict) or not isinstance(position.get("bit_generator"), dict):
            raise ValueError("the training position (rng_state) needs a bit_generator state")
        done = position.get("batches_done")
        if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= self.steps_per_epoch:
            raise ValueError(f"batches_done must be an integer in [0, {self.steps_per_epoch}], "
                             f"got {done!r}")
        stats = EpochStats.from_dict(position["epoch_stats"]) if "epoch_stats" in position \
            else EpochStats()
        try:
            self.rng.bit_generator.state = position["bit_generator"]
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"unusable generator state: {e}") from None
        self.epoch = int(epoch)
        self.batches_done = done
        self.stats = stats
        self.epoch_start_state = self.rng.bit_generator.state

    # --- numerical faults ----------------------------------------------------------------------
    def _when(self) -> str:
        return f"at epoch {self.epoch + 1}, batch {self.batches_done + 1}"

    def _check_gradients(self) -> None:
        name = first_nonfinite((n, p.grad) for n, p in self._params)
        if name is not None:
            raise NumericalFault(f"the gradient of {name} became NaN or infinite {self._when()}")

    def _check_after_step(self) -> None:
        checks = (("parameter", ((n, p.data) for n, p in self._params)),
                  ("optimizer state", ((f"{n}.{slot}", v) for n, st in self.optimizer.state.items()
                                       for slot, v in st.items())),
                  ("buffer", self.model.named_buffers()))
        for what, arrays in checks:
            name = first_nonfinite(arrays)
            if name is not None:
                raise NumericalFault(f"{what} {name} became NaN or infinite in the step "
                                     f"{self._when()} (lr {self.optimizer.lr:g})")

    def _forward_fault(self, x, what: str) -> str:
        where = locate_in_forward(self.model, x, buffers=False)  # checked after the last step
        return f"{what} {self._when()}" + (f": first in {where}" if where else "")

    # --- one epoch -----------------------------------------------------------------------------
    def train_epoch(self, on_batch=None) -> EpochStats | None:
        """Train from the current position to the end of the epoch.

        ``on_batch(stats, n_in_batch)`` is called after every step. Returns the epoch's statistics
        (over all its batches, also those done before a resume), or ``None`` if
        :attr:`stop_requested` stopped it early (the position then points at the next batch).
        Raises :class:`NumericalFault` (:class:`NonFiniteLoss` for the loss) as soon as a NaN or
        an infinity appears (:mod:`refbnn.training.faults`), before it reaches the weights where
        it can: a non-finite loss or gradient is never applied.
        """
        # NaN and overflow are detected and reported by the checks of every step: numpy's warnings
        # about them would only repeat that, several lines before the one-line fault
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return self._train_epoch(on_batch)

    def _train_epoch(self, on_batch):
        r = self.recipe
        self.epoch_start_state = self.rng.bit_generator.state
        it = batches(self.train_set, r.batch_size, self.rng, shuffle=True, augment=r.augment,
                     start=self.batches_done)
        if self.batches_done == 0:
            self.stats = EpochStats()
        stats = self.stats
        self.model.train()
        t0, seconds0 = time.perf_counter(), stats.seconds
        for x, y in it:
            step = self.epoch * self.steps_per_epoch + self.batches_done
            self.optimizer.lr = self.learning_rate(step)
            try:
                logits = self.model.forward(x)
            except ValueError:  # e.g. a binary layer refusing NaN input
                where = locate_in_forward(self.model, x, buffers=False)  # checked after the last step
                if where is None:
                    raise  # not a numerical fault
                raise NumericalFault(f"NaN or infinite values {self._when()}: first in {where}") \
                    from None
            loss, dlogits = cross_entropy(logits, y, label_smoothing=r.label_smoothing)
            if not np.isfinite(loss):
                raise NonFiniteLoss(self._forward_fault(x, f"loss became {loss}"))
            self.model.zero_grad()
            self.model.backward(dlogits)
            self._check_gradients()
            self.optimizer.step()
            self._check_after_step()
            self.batches_done += 1
            stats.loss_sum += float(loss) * len(y)
            stats.correct += int((logits.argmax(axis=1) == y).sum())
            stats.seen += len(y)
            stats.seconds = seconds0 + time.perf_counter() - t0
            if on_batch is not None:
                on_batch(stats, len(y))
            if self.stop_requested:
                # rewind the generator to the epoch start: position() describes the next batch
                self.rng.bit_generator.state = self.epoch_start_state
                return None
        self.epoch += 1
        self.batches_done = 0
        self.stats = EpochStats()
        self.epoch_start_state = self.rng.bit_generator.state
        return stats
