"""Golden cases of the training layers: forward and backward of each, with its upstream gradient.

A case's ``op`` is a layer class of :mod:`refbnn.nn` (or ``cross_entropy``); ``params`` hold its
constructor keyword arguments (``kwargs``) and ``mode`` (``"train"``: forward, then backward of
``grad_out``; ``"eval"``: forward only). Inputs: ``x``, ``grad_out`` and the layer's parameters and
buffers under their state-dict names. Outputs: ``y``; in train mode ``grad_x`` and ``grad.<param>``
for every parameter, and the buffers after the step (``state.<buffer>``, BatchNorm's running
statistics). Expected values come from refbnn's layers themselves (NCHW, float32).
"""

from __future__ import annotations

import numpy as np

from refbnn import nn
from refbnn.golden.fileio import Case
from refbnn.golden.ops import edgy
from refbnn.training.losses import cross_entropy

LAYERS = {name: getattr(nn, name) for name in (
    "BinaryConv2d", "BinaryLinear", "Conv2d", "Linear", "BatchNorm2d", "BatchNorm1d", "ReLU",
    "PReLU", "FPReLU", "MaxPool2d", "AvgPool2d", "GlobalAvgPool2d", "ChannelRepeat")}

# Float32 tolerance (rtol relative to max |expected|, docs/golden.md): element-wise layers are
# exact up to one rounding per element; layers with sums (GEMMs, batch statistics, pooling, every
# parameter gradient) may add their terms in another order, a few ulp of the largest partial sum.
# Measured against PyTorch (tests/test_interop_torch.py): a shared PReLU slope's gradient, a sum of
# 200 products, differs by 1.7e-6 relative.
ELEMENTWISE = ("ReLU", "PReLU", "FPReLU", "MaxPool2d", "ChannelRepeat")
RTOL_ELEMENTWISE = 1e-6
RTOL_SUMS = 1e-5


def tolerance(op: str, key: str, value) -> tuple[float, float]:
    """``(rtol, atol)`` of one output: integers exact; parameter gradients are sums over the batch."""
    if np.asarray(value).dtype.kind in "iu":
        return (0.0, 0.0)
    if op in ELEMENTWISE and not key.startswith("grad."):
        return (RTOL_ELEMENTWISE, 0.0)
    return (RTOL_SUMS, 0.0)


def run_layer(op: str, params: dict, inputs: dict) -> dict:
    """Build the layer, load its parameters from ``inputs``, run forward (and backward)."""
    if op == "cross_entropy":
        loss, grad = cross_entropy(inputs["logits"], inputs["labels"], params["label_smoothing"])
        return {"loss": np.float64(loss), "grad_logits": grad}
    layer = LAYERS[op](**params["kwargs"])
    own = layer.state_dict()
    layer.load_state_dict({k: inputs[k] for k in own if k in inputs}, strict=False)
    train = params["mode"] == "train"
    layer.train(train)
    out = {"y": np.asarray(layer.forward(np.array(inputs["x"], copy=True)))}
    if train:
        out["grad_x"] = np.asarray(layer.backward(np.array(inputs["grad_out"], copy=True)))
        for name, p in layer.named_parameters():
            out[f"grad.{name}"] = p.grad if p.grad is not None else np.zeros_like(p.data)
        for name, b in layer.named_buffers():
            out[f"state.{name}"] = np.asarray(b)
    return out


def _near_edges(rng, shape):
    """Activations for binary layers: normal values plus exact 0, -0.0, +-1 (the STE edges), +-0.5
    and values beyond +-1."""
    x = edgy(rng, shape, 0.1)
    flat = x.reshape(-1)
    picks = rng.choice(flat.size, size=min(flat.size, 24), replace=False)
    flat[picks] = np.resize(np.array([1.0, -1.0, 0.5, -0.5, 1.5, -1.5], np.float32), picks.size)
    return x


def _latent(rng, shape):
    """Latent binary weights: small values, exact zeros, and entries with |W| > 1 (no gradient)."""
    w = edgy(rng, shape, 0.1, 0.6)
    w.reshape(-1)[:3] = [1.0, -1.0, 1.25]
    return w


def _case(rng, name, op, kwargs, x, mode="train", **tensors):
    layer = LAYERS[op](**kwargs)
    inputs = {"x": x}
    for k, v in layer.state_dict().items():
        inputs[k] = tensors.get(k, v)
    probe = run_layer(op, {"kwargs": kwargs, "mode": "eval"}, inputs)["y"]
    if mode == "train":
        inputs["grad_out"] = rng.standard_normal(probe.shape).astype(np.float32)
    return Case(name, op, {"kwargs": kwargs, "mode": mode}, inputs, {})


def layer_cases(seed: int) -> list:
    rng = np.random.default_rng(seed)
    cases = []
    convs = {
        "binary_conv_approx_sign_mean_abs_s2_odd": dict(
            in_channels=5, out_channels=6, kernel_size=3, stride=2, padding=1, scale="mean_abs"),
        "binary_conv_ste_groups2_pad_plus1_caffe": dict(
            in_channels=6, out_channels=4, kernel_size=3, padding=1, groups=2, act_grad="ste",
            pad_value=1, sign_at_zero=-1),
        "binary_conv_identity_torch_sign_dil2_pad_minus1": dict(
            in_channels=3, out_channels=5, kernel_size=3, padding=2, dilation=2,
            act_grad="identity", pad_value=-1, sign_at_zero=0),
        "binary_conv_1x1_s2_odd": dict(in_channels=7, out_channels=3, kernel_size=1, stride=2,
                                       padding=0),
    }
    for name, kw in convs.items():
        cin, cout, g = kw["in_channels"], kw["out_channels"], kw.get("groups", 1)
        k = kw["kernel_size"]
        cases.append(_case(rng, name, "BinaryConv2d", kw, _near_edges(rng, (2, cin, 7, 7)),
                           weight=_latent(rng, (cout, cin // g, k, k))))
    for act in ("ste", "approx_sign"):
        kw = dict(in_features=37, out_features=5, bias=True, scale="mean_abs", act_grad=act)
        cases.append(_case(rng, f"binary_linear_{act}", "BinaryLinear", kw,
                           _near_edges(rng, (3, 37)), weight=_latent(rng, (5, 37))))
    bn = {"weight": np.array([1.5, -0.75, 0.0, 2.0, -1.0], np.float32),  # negative scales, a zero
          "bias": rng.normal(0, 1, 5).astype(np.float32),
          "running_mean": rng.normal(0, 1, 5).astype(np.float32),
          "running_var": rng.uniform(0.5, 2, 5).astype(np.float32)}
    x = rng.standard_normal((3, 5, 5, 7)).astype(np.float32) * 2 + 0.5
    cases.append(_case(rng, "batchnorm2d_train_negative_scale", "BatchNorm2d",
                       {"num_features": 5}, x, **bn))
    cases.append(_case(rng, "batchnorm2d_eval_negative_scale", "BatchNorm2d",
                       {"num_features": 5}, x, mode="eval", **bn))
    cases.append(_case(rng, "batchnorm1d_train_cumulative", "BatchNorm1d",
                       {"num_features": 5, "momentum": None}, x[:, :, 0, :2].reshape(6, 5), **bn))
    x = edgy(rng, (2, 4, 5, 5))
    slopes = {"pos_slope": np.array([1.0, 0.5, -0.25, 2.0], np.float32),
              "neg_slope": np.array([1.0, -0.5, 0.1, 0.0], np.float32)}
    cases.append(_case(rng, "fprelu_negative_slopes", "FPReLU", {"num_channels": 4}, x, **slopes))
    cases.append(_case(rng, "prelu_shared", "PReLU", {"num_parameters": 1}, x,
                       weight=np.array([0.25], np.float32)))
    cases.append(_case(rng, "prelu_per_channel", "PReLU", {"num_parameters": 4}, x,
                       weight=np.array([0.25, -0.5, 0.0, 1.5], np.float32)))
    cases.append(_case(rng, "relu_zeros", "ReLU", {}, x))
    ties = np.round(rng.standard_normal((2, 3, 7, 7)), 0).astype(np.float32)  # many equal maxima
    cases.append(_case(rng, "maxpool_3x3_s2_p1_ties", "MaxPool2d",
                       {"kernel_size": 3, "stride": 2, "padding": 1}, ties))
    x = rng.standard_normal((2, 3, 7, 7)).astype(np.float32)
    cases.append(_case(rng, "avgpool_2x2_s2_ceil_odd", "AvgPool2d",
                       {"kernel_size": 2, "stride": 2, "ceil_mode": True, "count_include_pad": False},
                       x))
    cases.append(_case(rng, "avgpool_3x3_s1_p1_count_pad", "AvgPool2d",
                       {"kernel_size": 3, "stride": 1, "padding": 1}, x))
    cases.append(_case(rng, "global_avgpool", "GlobalAvgPool2d", {}, x))
    cases.append(_case(rng, "channel_repeat_2", "ChannelRepeat", {"times": 2}, x))
    cases.append(_case(rng, "conv2d_3x3_s2_bias", "Conv2d",
                       {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "stride": 2,
                        "padding": 1, "bias": True}, x))
    cases.append(_case(rng, "linear_bias", "Linear", {"in_features": 6, "out_features": 3},
                       rng.standard_normal((4, 6)).astype(np.float32)))
    logits = rng.standard_normal((5, 10)).astype(np.float32) * 3
    for eps in (0.0, 0.1):
        cases.append(Case(f"cross_entropy_smoothing{eps}", "cross_entropy", {"label_smoothing": eps},
                          {"logits": logits, "labels": rng.integers(0, 10, 5).astype(np.int64)}, {}))
    for case in cases:
        case.outputs = run_layer(case.op, case.params, case.inputs)
        case.tolerance = {k: tolerance(case.op, k, v) for k, v in case.outputs.items()}
    return cases
