"""The recipe of a training run: its hyper-parameters, their defaults and their accepted ranges.

:class:`Recipe` holds the one set of defaults (``python -m refbnn.train`` takes them from here) and
:data:`LIMITS` the one set of ranges: :meth:`Recipe.check` applies them, and the CLI uses them as its
flags' argparse types.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields

from refbnn.cli_util import float_in, int_in
from refbnn.training.schedules import SCHEDULES

OPTIMIZERS = ("adam", "adamw", "sgd")

#: field -> its accepted values, as an argparse type (``.accepts`` says what in words). Floats are
#: always finite; ``augment`` shifts a 28x28 image by less than its side; ``batch_size`` is capped
#: where one batch's activations still fit comfortably in memory.
LIMITS = {
    "epochs": int_in(1, 100_000),
    "batch_size": int_in(1, 4096),
    "lr": float_in(0.0, lo_open=True),
    "momentum": float_in(0.0, 1.0),
    "weight_decay": float_in(0.0),
    "warmup_epochs": float_in(0.0),
    "step_epochs": int_in(0, 100_000),
    "label_smoothing": float_in(0.0, 1.0),
    "augment": int_in(0, 27),
}


class RecipeError(ValueError):
    """A recipe value out of range; ``field`` names the :class:`Recipe` field."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"recipe {field}: {problem}")


@dataclass
class Recipe:
    """Hyper-parameters of a training run (all JSON-able; stored in checkpoints).

    The defaults are refbnn's measured recipe, the one ``python -m refbnn.train`` uses and the
    shipped ``weights/ftbnn18.h5`` was trained with (README, "Training")."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adam"          # "adam", "adamw" or "sgd"
    lr: float = 3e-3
    momentum: float = 0.9            # SGD only
    nesterov: bool = False           # SGD only
    weight_decay: float = 0.0        # not applied to BatchNorm, slopes and biases
    schedule: str = "cosine"         # "constant", "cosine", "linear", "step"
    warmup_epochs: float = 0.0       # linear warm-up, at most ``epochs``
    step_epochs: int = 0             # "step": multiply lr by 0.1 every this many epochs (>= 1)
    label_smoothing: float = 0.0
    augment: int = 2                 # random shifts of up to this many pixels (0: none)
    clip_latent: bool = True         # clip binary latent weights to [-1, 1] after each step

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        """The recipe stored as ``d`` (e.g. in a checkpoint), checked (:class:`RecipeError`)."""
        if not isinstance(d, dict):
            raise RecipeError("(all)", f"expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise RecipeError(sorted(unknown)[0], f"unknown recipe fields: {', '.join(sorted(unknown))}")
        recipe = cls(**d)
        recipe.check()
        return recipe

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> Recipe:
        """Raise :class:`RecipeError` for the first field out of range (:data:`LIMITS`, the
        option lists, and: ``warmup_epochs <= epochs``; ``step_epochs >= 1`` for the step
        schedule; Nesterov only for SGD with momentum > 0). Returns the recipe."""
        for name, accepted in LIMITS.items():
            v = getattr(self, name)
            try:
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise ValueError
                accepted(repr(v))  # the CLI's own check of the same value typed as a flag
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                raise RecipeError(name, f"expected {accepted.accepts}, got {v!r}") from None
        for name, options in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            if getattr(self, name) not in options:
                raise RecipeError(name, f"expected one of {', '.join(options)}, got "
                                        f"{getattr(self, name)!r}")
        for name in ("nesterov", "clip_latent"):
            if not isinstance(getattr(self, name), bool):
                raise RecipeError(name, f"expected true or false, got {getattr(self, name)!r}")
        if self.warmup_epochs > self.epochs:
            raise RecipeError("warmup_epochs", f"must be at most epochs ({self.epochs}), got "
                                               f"{self.warmup_epochs:g}")
        if self.schedule == "step" and self.step_epochs < 1:
            raise RecipeError("step_epochs", "the step schedule needs step_epochs >= 1 (lr x0.1 "
                                             f"every that many epochs), got {self.step_epochs}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise RecipeError("nesterov", "Nesterov momentum needs optimizer sgd with momentum > 0")
        return self
