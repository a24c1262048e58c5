"""Run a model once and record what each leaf layer saw: ``(name, layer, input, output)``."""

from __future__ import annotations

import numpy as np


def trace(model, x, keep=lambda name, layer: True, mode="eval"):
    """Forward ``x`` through ``model`` in ``mode`` ("eval" or "train") and return a list of
    ``(name, layer, input, output)`` for every leaf layer that ``keep(name, layer)`` accepts, in call
    order. The model's mode and its layers are restored afterwards."""
    records = []
    patched = []
    for name, layer in model.named_modules():
        if name == "" or any(True for _ in layer.children()) or not keep(name, layer):
            continue

        def spy(inp, _layer=layer, _name=name, _forward=layer.forward):
            out = _forward(inp)
            records.append((_name, _layer, inp, out))
            return out

        object.__setattr__(layer, "forward", spy)
        patched.append(layer)
    was_training = model.training
    try:
        model.train(mode == "train")
        model.forward(np.asarray(x, dtype=np.float32))
    finally:
        for layer in patched:
            object.__delattr__(layer, "forward")
        model.train(was_training)
    return records
