"""Training: losses, optimizers, learning-rate schedules (and the training loop in ``trainer``)."""

from refbnn.training.losses import cross_entropy
from refbnn.training.optim import SGD, Adam, AdamW, Optimizer, param_groups
from refbnn.training.schedules import SCHEDULES, lr_at

__all__ = ["SCHEDULES", "SGD", "Adam", "AdamW", "Optimizer", "cross_entropy", "lr_at",
           "param_groups"]
