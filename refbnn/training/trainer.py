"""The training loop: mini-batch SGD/Adam on a refbnn model, deterministic and resumable.

A run is a pure function of (model init, data, :class:`Recipe`, seed, thread count): every random
draw comes from one ``np.random.Generator``, whose state at the start of the current epoch, together
with the number of batches already done, is all a checkpoint needs to continue bit-identically
(:meth:`Trainer.position` / :meth:`Trainer.restore_position`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from refbnn.data import batches
from refbnn.training.losses import cross_entropy
from refbnn.training.optim import SGD, Adam, AdamW, param_groups
from refbnn.training.schedules import lr_at


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class Recipe:
    """Hyper-parameters of a training run (all JSON-able; stored in checkpoints)."""

    epochs: int = 10
    batch_size: int = 100
    optimizer: str = "adam"          # "adam", "adamw" or "sgd"
    lr: float = 2e-3
    momentum: float = 0.9            # SGD only
    nesterov: bool = False           # SGD only
    weight_decay: float = 0.0        # not applied to BatchNorm, slopes and biases
    schedule: str = "cosine"         # "constant", "cosine", "linear", "step"
    warmup_epochs: float = 0.0
    step_epochs: int = 0             # "step": multiply lr by 0.1 every this many epochs
    label_smoothing: float = 0.0
    augment: int = 1                 # random shifts of up to this many pixels (0: none)
    clip_latent: bool = True         # clip binary latent weights to [-1, 1] after each step

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown recipe fields: {', '.join(sorted(unknown))}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


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


class Trainer:
    """Owns the model, optimizer, generator and position (epoch, batches done in it)."""

    def __init__(self, model, train_set, recipe: Recipe, seed: int = 0):
        self.model = model
        self.train_set = train_set
        self.recipe = recipe
        self.optimizer = make_optimizer(model, recipe)
        self.rng = np.random.default_rng(seed)
        self.epoch = 0                  # epochs completed
        self.batches_done = 0           # batches completed in the current epoch
        self.epoch_start_state = self.rng.bit_generator.state
        self.history: list[dict] = []
        self.stop_requested = False     # set (e.g. by a SIGINT handler) to stop between two steps

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
        """JSON-able training position: the generator state at the start of the current epoch and
        the batches done in it (0 after a complete epoch)."""
        return {"bit_generator": self.epoch_start_state, "batches_done": self.batches_done}

    def restore_position(self, epoch: int, position: dict) -> None:
        self.epoch = int(epoch)
        self.batches_done = int(position["batches_done"])
        self.rng.bit_generator.state = position["bit_generator"]
        self.epoch_start_state = self.rng.bit_generator.state

    # --- one epoch -----------------------------------------------------------------------------
    def train_epoch(self, on_batch=None) -> EpochStats | None:
        """Train from the current position to the end of the epoch.

        ``on_batch(stats, n_in_batch)`` is called after every step. Returns the epoch's statistics,
        or ``None`` if :attr:`stop_requested` stopped it early (the position then points at the
        next batch). Raises :class:`NonFiniteLoss` before applying a step whose loss is NaN/inf.
        """
        r = self.recipe
        self.epoch_start_state = self.rng.bit_generator.state
        it = batches(self.train_set, r.batch_size, self.rng, shuffle=True, augment=r.augment,
                     start=self.batches_done)
        stats = EpochStats()
        self.model.train()
        t0 = time.perf_counter()
        for x, y in it:
            step = self.epoch * self.steps_per_epoch + self.batches_done
            self.optimizer.lr = self.learning_rate(step)
            logits = self.model.forward(x)
            loss, dlogits = cross_entropy(logits, y, label_smoothing=r.label_smoothing)
            if not np.isfinite(loss):
                raise NonFiniteLoss(f"loss became {loss} at epoch {self.epoch + 1}, "
                                    f"batch {self.batches_done + 1}")
            self.model.zero_grad()
            self.model.backward(dlogits)
            self.optimizer.step()
            self.batches_done += 1
            stats.loss_sum += float(loss) * len(y)
            stats.correct += int((logits.argmax(axis=1) == y).sum())
            stats.seen += len(y)
            stats.seconds = time.perf_counter() - t0
            if on_batch is not None:
                on_batch(stats, len(y))
            if self.stop_requested:
                # rewind the generator to the epoch start: position() describes the next batch
                self.rng.bit_generator.state = self.epoch_start_state
                return None
        self.epoch += 1
        self.batches_done = 0
        self.epoch_start_state = self.rng.bit_generator.state
        return stats
