"""Numerical faults in training: a NaN or an infinity, stopped where it first appears.

What :class:`~refbnn.training.trainer.Trainer` checks on every step (all cheap next to the step):

* the loss (a non-finite logit makes it NaN, :func:`~refbnn.training.losses.cross_entropy`);
* every gradient, after the backward pass and before the optimizer uses it;
* every parameter, every float optimizer state (Adam's moments, SGD's momentum) and every float
  buffer (BatchNorm's running statistics), after the optimizer step;
* activations: a binary layer refuses NaN input (``sign(NaN)`` is undefined) and any NaN or
  infinity that reaches the logits makes the loss NaN. Either way :func:`locate_in_forward`
  re-runs that batch's forward pass to name the first layer whose input or output is non-finite.

Each check of an array is one float32 sum: a sum is NaN or infinite whenever an element is, and
only when it is non-finite (possibly from overflow) is the array scanned element by element, so
a finite array is never reported. A fault raises :class:`NumericalFault` naming the tensor or
layer; the model is then not usable (a rerun of the forward pass has moved BatchNorm's running
statistics): continue from the last checkpoint, which never holds non-finite values
(:func:`check_finite` runs before every save).
"""

from __future__ import annotations

import math

import numpy as np


class NumericalFault(RuntimeError):
    """A NaN or infinite value appeared in training; the message says where and when."""


class NonFiniteLoss(NumericalFault):
    """The training loss became NaN or infinite."""


def _nonfinite(a) -> bool:
    a = np.asarray(a)
    if a.dtype.kind not in "fc" or a.size == 0:
        return False
    with np.errstate(over="ignore", invalid="ignore"):
        s = a.sum()
    return not np.isfinite(s) and not np.isfinite(a).all()


def first_nonfinite(named_arrays) -> str | None:
    """The name of the first float array of ``named_arrays`` (``(name, array)`` pairs) holding a
    NaN or an infinity, else ``None``; integer arrays are skipped.

    Fast path (every training step runs this over the parameters, gradients and optimizer
    state): the float64 sum of all the arrays' sums, under one ``errstate``; a finite total means
    every array is finite (a NaN or an infinity anywhere makes each sum it enters non-finite).
    Otherwise (also when finite values merely overflow) the arrays are checked one by one."""
    floats = []
    for name, a in named_arrays:
        a = None if a is None else np.asarray(a)
        if a is not None and a.dtype.kind in "fc" and a.size:
            floats.append((name, a))
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for _, a in floats:
            s = a.sum()
            total += float(s.real) + float(s.imag)
    if math.isfinite(total):
        return None
    for name, a in floats:
        if _nonfinite(a):
            return name
    return None


def check_finite(named_arrays, what: str) -> None:
    """Raise :class:`NumericalFault` ``"<what> <name> is not finite"`` for the first non-finite
    array of ``named_arrays``."""
    name = first_nonfinite(named_arrays)
    if name is not None:
        raise NumericalFault(f"{what} {name} holds NaN or infinite values")


def locate_in_forward(model, x, buffers: bool = True) -> str | None:
    """Where a NaN or an infinity first appears in ``model.forward(x)``: ``"the input batch"``,
    ``"parameter <name>"``, ``"buffer <name>"``, ``"the input of <layer>"`` or ``"the output of
    <layer>"`` (dotted module names, ``"the model"`` for the top one), or ``None`` when nothing
    is non-finite. Re-runs the forward pass (in the model's current mode) with every module's
    ``forward`` wrapped; exceptions of that pass are swallowed. ``buffers=False`` skips the check
    of the buffers: after a failed training-mode forward pass BatchNorm's running statistics hold
    what that pass computed, not a cause (training mode normalises with the batch's own)."""
    if _nonfinite(x):
        return "the input batch"
    name = first_nonfinite((n, p.data) for n, p in model.named_parameters())
    if name is not None:
        return f"parameter {name}"
    name = first_nonfinite(model.named_buffers()) if buffers else None
    if name is not None:
        return f"buffer {name}"
    found: list[str] = []
    wrapped = []

    def wrap(label, module):
        inner = module.forward

        def forward(v):
            if not found and _nonfinite(v):
                found.append(f"the input of {label}")
            out = inner(v)
            if not found and _nonfinite(out):
                found.append(f"the output of {label}")
            return out

        module.forward = forward
        wrapped.append(module)

    for name, module in model.named_modules():
        wrap(f"{name} ({type(module).__name__})" if name else "the model", module)
    try:
        model.forward(x)
    except Exception:  # the fault being located may well raise
        pass
    finally:
        for module in wrapped:
            del module.forward
    return found[0] if found else None
