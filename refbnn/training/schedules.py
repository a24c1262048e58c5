"""Learning-rate schedules: pure functions of the (0-based) step index.

With ``W = warmup_steps`` and ``T = total_steps``: for ``step < W`` the rate rises linearly,
``base_lr * (step + 1) / W`` (never 0, reaching ``base_lr`` at step ``W - 1``); afterwards
``t = step - W`` runs over ``D = T - W`` decay steps and

* ``constant``: ``base_lr``;
* ``step``: ``base_lr * gamma ** floor(t / step_size)``;
* ``cosine``: ``final_lr + (base_lr - final_lr) * (1 + cos(pi * t / D)) / 2``;
* ``linear``: ``final_lr + (base_lr - final_lr) * (1 - t / D)`` (Bi-Real: decay to 0).

Steps at or past ``T`` keep the value at ``t = D`` (``final_lr`` for cosine and linear).
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "step", "cosine", "linear")


def lr_at(step: int, base_lr: float, total_steps: int, schedule: str = "constant",
          warmup_steps: int = 0, step_size: int = 0, gamma: float = 0.1,
          final_lr: float = 0.0) -> float:
    """The learning rate at ``step`` (see the module docstring). Raises ``ValueError`` on a
    negative step, an unknown schedule or inconsistent lengths."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got "
                         f"{total_steps} and {warmup_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    d = total_steps - warmup_steps
    t = min(step - warmup_steps, d)
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        if step_size < 1:
            raise ValueError(f"the step schedule needs step_size >= 1, got {step_size}")
        return base_lr * gamma ** (t // step_size)
    frac = t / d if d else 1.0
    if schedule == "cosine":
        return final_lr + (base_lr - final_lr) * (1 + math.cos(math.pi * frac)) / 2
    return final_lr + (base_lr - final_lr) * (1 - frac)
