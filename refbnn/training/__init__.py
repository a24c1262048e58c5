"""Training: losses, optimizers, learning-rate schedules, the recipe (``recipe``: defaults and
ranges), the resumable step loop (``trainer``), numerical-fault checks (``faults``) and
``fit.fit``, the epoch loop with evaluation, run files and Ctrl-C that ``python -m refbnn.train``
and ``refbnn.experiments`` use (it is not imported here: it sits above the file format)."""

from refbnn.training.losses import cross_entropy
from refbnn.training.optim import SGD, Adam, AdamW, Optimizer, param_groups
from refbnn.training.schedules import SCHEDULES, lr_at

__all__ = ["SCHEDULES", "SGD", "Adam", "AdamW", "Optimizer", "cross_entropy", "lr_at",
           "param_groups"]
