"""Golden cases of a whole model: every layer's output in eval mode, and one training step.

The file's ``/weights`` group holds the model's state dict and its ``meta`` the resolved config.
Case ``eval`` (op ``model_eval``): input ``x`` (N, C, H, W) float32; outputs ``out.<layer>`` for
every leaf layer in call order, ``in.<layer>`` for the input of each layer with a kink at 0
(binary layers' pre-sign input, ReLU, PReLU, FPReLU), and ``logits``. Case ``train_step`` (op
``model_train_step``): inputs ``x`` and ``labels`` (int64);
the model in train mode (BatchNorm on batch statistics) gives ``out.<layer>``/``in.<layer>`` and
``logits``; mean cross-entropy gives ``loss``; backward gives ``grad.<param>`` for every parameter;
one ``SGD(lr, momentum, weight_decay)`` step (``params``) gives ``updated.<param>``, and
``state.<buffer>`` holds the buffers after the step (running statistics moved once).
"""

from __future__ import annotations

import numpy as np

from refbnn import nn
from refbnn.bits import SIGN_RULES
from refbnn.golden.fileio import Case
from refbnn.models import BNNResNet
from refbnn.models.trace import trace
from refbnn.training.losses import cross_entropy
from refbnn.training.optim import SGD

SGD_PARAMS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}

# Tolerances (rtol relative to max |expected| of each array; docs/golden.md). Another float32
# implementation sums convolutions and batch statistics in another order: a few ulp of the largest
# partial sum per layer, growing slowly with depth (measured against PyTorch: logits within 3e-7,
# gradients within 2e-5 on small models). The margins cover that, not sign flips: a value within
# rounding of 0 before a binary layer can flip its sign and change that layer's output by a whole
# step (docs/golden.md, "Sign flips").
RTOL_OUTPUT = 1e-4
RTOL_GRAD = 1e-4


def is_binary(layer) -> bool:
    return isinstance(layer, (nn.BinaryConv2d, nn.BinaryLinear)) and layer.binarize_input


def kink_rule(layer) -> str | None:
    """Where a layer's forward or derivative jumps at ``x = 0``, the test that decides the side:
    ``"ge"`` (``x >= 0``: sign with sign_at_zero +1, FPReLU), ``"gt"`` (``x > 0``: sign with -1,
    ReLU, PReLU), ``"sign"`` (torch.sign, ternary); ``None`` for a layer without such a kink."""
    if is_binary(layer):
        return SIGN_RULES[layer.sign_at_zero]
    if isinstance(layer, (nn.ReLU, nn.PReLU)):
        return "gt"
    if isinstance(layer, nn.FPReLU):
        return "ge"
    return None


def randomize_state(model, seed: int, scale_mean: float = 1.0) -> None:
    """Give BatchNorm and the non-linearities trained-looking values (seeded): scales
    N(scale_mean, 0.5) (some negative; a smaller mean keeps deep models' logits smaller), shifts and
    running means N(0, 0.5), running variances U(0.5, 2), slopes N(1, 0.3) / PReLU N(0.25, 0.1).
    Fresh layers (shift 0 after an integer-valued binary conv) put many values at exactly 0, where
    ReLU's derivative jumps; this keeps the test off those ties. The one home of this: golden model
    cases (docs/golden.md section 7), the tests and the benchmarks use it."""
    rng = np.random.default_rng(seed)
    state = model.state_dict()
    for name, v in state.items():
        leaf = name.rsplit(".", 1)[-1]
        layer = dict(model.named_modules())[name.rsplit(".", 1)[0]]
        if isinstance(layer, (nn.BatchNorm2d, nn.BatchNorm1d)):
            if leaf == "weight":
                v = rng.normal(scale_mean, 0.5, v.shape)
            elif leaf in ("bias", "running_mean"):
                v = rng.normal(0.0, 0.5, v.shape)
            elif leaf == "running_var":
                v = rng.uniform(0.5, 2.0, v.shape)
        elif isinstance(layer, nn.FPReLU):
            v = rng.normal(1.0, 0.3, v.shape)
        elif isinstance(layer, nn.PReLU):
            v = rng.normal(0.25, 0.1, v.shape)
        state[name] = np.asarray(v, dtype=state[name].dtype)
    model.load_state_dict(state)


def forward_record(model, x, mode: str) -> dict:
    """``out.<layer>``, ``in.<layer with a kink>`` and ``logits`` of one forward in ``mode``; the model
    is left in ``mode`` with its backward caches filled."""
    out = {}
    records = trace(model, x, mode=mode)
    for name, layer, inp, y in records:
        if kink_rule(layer):
            out[f"in.{name}"] = np.asarray(inp)
        out[f"out.{name}"] = np.asarray(y)
    model.train(mode == "train")
    out["logits"] = np.asarray(records[-1][3])
    return out


def run_model(config: dict, weights: dict, op: str, params: dict, inputs: dict) -> dict:
    """Recompute a model case from the config and weights (``op`` ``model_eval`` or
    ``model_train_step``)."""
    model = BNNResNet(config)
    model.load_state_dict(weights)
    x = np.asarray(inputs["x"], np.float32)
    if op == "model_eval":
        return forward_record(model, x, "eval")
    out = forward_record(model, x, "train")
    loss, dlogits = cross_entropy(out["logits"], inputs["labels"])
    out["loss"] = np.float64(loss)
    model.zero_grad()
    model.backward(dlogits)
    names, plist = zip(*model.named_parameters())
    for name, p in zip(names, plist):
        out[f"grad.{name}"] = p.grad.copy() if p.grad is not None else np.zeros_like(p.data)
    sgd = params["sgd"]
    SGD([{"params": list(plist), "names": list(names)}], sgd["lr"], momentum=sgd["momentum"],
        weight_decay=sgd["weight_decay"]).step()
    for name, p in zip(names, plist):
        out[f"updated.{name}"] = p.data.copy()
    for name, b in model.named_buffers():
        out[f"state.{name}"] = np.array(b, copy=True)
    return out


def tolerances(outputs: dict) -> dict:
    tol = {}
    for k, v in outputs.items():
        if np.asarray(v).dtype.kind in "iu":
            tol[k] = (0.0, 0.0)
        else:
            tol[k] = (RTOL_GRAD if k.startswith(("grad.", "updated.")) else RTOL_OUTPUT, 0.0)
    return tol


def model_cases(model, seed: int, batch: int) -> list:
    """The ``eval`` and ``train_step`` cases for ``model`` on a seeded standard-normal batch."""
    rng = np.random.default_rng(seed)
    shape = (batch, *model.config["input_shape"])
    inputs = {"x": rng.standard_normal(shape).astype(np.float32),
              "labels": rng.integers(0, model.config["num_classes"], batch).astype(np.int64)}
    weights = model.state_dict()
    cases = [Case("eval", "model_eval", {}, {"x": inputs["x"]}, {}),
             Case("train_step", "model_train_step", {"sgd": dict(SGD_PARAMS)}, inputs, {})]
    for case in cases:
        case.outputs = run_model(model.config, weights, case.op, case.params, case.inputs)
        case.tolerance = tolerances(case.outputs)
    return cases
