"""refbnn against its PyTorch twin (refbnn.interop.torch) for every preset, and weights both ways.

Tolerances (float32): the twin sums convolutions, matmuls and batch statistics in another order, so
each layer differs by a few ulp of its largest partial sum; through ~20 layers that stays far below
1e-4 of each array's largest value (measured: logits <= 3e-7, gradients <= 2e-5 relative). Binary
layers are exact on equal signs; a value within rounding of 0 may binarize differently, which the
tests count and report rather than hide.
"""

from collections import OrderedDict

import numpy as np
import pytest

from refbnn import models
from refbnn.crosscheck import NEAR_ZERO, run_refbnn, run_torch
from refbnn.golden.model import is_binary, randomize_state
from refbnn.interop.checkpoints import ConversionError

torch = pytest.importorskip("torch")
from refbnn.interop.torch import (  # noqa: E402  (needs torch)
    from_torch_state,
    load_official_birealnet,
    to_torch_state,
    twin,
)

RTOL_LOGITS = 1e-4
RTOL_GRAD = 1e-4
SMALL = {"input_shape": [1, 10, 10], "width_multiplier": 0.125, "num_classes": 10}


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tests/conftest.py


def _pair(name, seed=0):
    model = models.build(name, seed=seed, **SMALL)
    randomize_state(model, seed)  # off BatchNorm's initial zeros, where ReLU's derivative jumps
    tmodel = twin(model.config)
    tmodel.load_state_dict(to_torch_state(model.state_dict()))
    return model, tmodel


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64).reshape(np.shape(a))
    scale = np.abs(b).max()
    return np.abs(a - b).max() / scale if scale else np.abs(a - b).max()


def _binary_input_flips(model, ref, other):
    """(flipped signs, of which within rounding of 0) over every binary layer's input."""
    flips = near = 0
    for name, layer in model.named_modules():
        if not is_binary(layer):
            continue
        a, b = ref.inputs[name], other.inputs[name].reshape(ref.inputs[name].shape)
        sa, sb = (a >= 0, b >= 0) if layer.sign_at_zero == 1 else \
            (a > 0, b > 0) if layer.sign_at_zero == -1 else (np.sign(a), np.sign(b))
        flipped = sa != sb
        flips += int(flipped.sum())
        near += int((flipped & (np.abs(a) <= NEAR_ZERO * np.abs(a).max())).sum())
    return flips, near


@pytest.mark.parametrize("name", models.list_models())
def test_preset_matches_twin(name, record_property):
    model, tmodel = _pair(name)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, *model.config["input_shape"])).astype(np.float32)
    labels = rng.integers(0, 10, 2)

    ref, other = run_refbnn(model, x), run_torch(tmodel, x)
    assert _rel(ref.outputs["logits"], other.outputs["logits"]) <= RTOL_LOGITS
    flips, near = _binary_input_flips(model, ref, other)
    print(f"{name} eval: {flips} binary input sign flips, {near} within rounding of 0")
    record_property("eval_binary_input_flips", f"{flips} ({near} within rounding of 0)")
    assert flips == near

    ref, other = run_refbnn(model, x, labels), run_torch(tmodel, x, labels)
    flips, near = _binary_input_flips(model, ref, other)
    print(f"{name} train: {flips} binary input sign flips, {near} within rounding of 0")
    record_property("train_binary_input_flips", f"{flips} ({near} within rounding of 0)")
    assert flips == near
    assert list(ref.grads) == list(other.grads)
    worst = max((_rel(ref.grads[k], other.grads[k]), k) for k in ref.grads)
    print(f"{name} train: worst relative gradient difference {worst[0]:.2e} ({worst[1]})")
    record_property("worst_gradient_rel_diff", f"{worst[0]:.2e} ({worst[1]})")
    assert worst[0] <= RTOL_GRAD, worst


def test_twin_detects_a_changed_weight():
    """The comparison can fail: one flipped latent weight sign changes the logits."""
    model, tmodel = _pair("birealnet18")
    with torch.no_grad():
        w = tmodel.layer1[0].binary_conv.weight
        w[0, 0, 1, 1] = -w[0, 0, 1, 1] if w[0, 0, 1, 1] != 0 else -1.0
    x = np.random.default_rng(2).standard_normal((2, 1, 10, 10)).astype(np.float32)
    assert _rel(run_refbnn(model, x).outputs["logits"], run_torch(tmodel, x).outputs["logits"]) > 1e-3


def test_state_dict_round_trip_exact():
    model = models.build("ftbnn18_g2", seed=4, **SMALL)
    randomize_state(model, 4)
    state = model.state_dict()
    tmodel = twin(model.config)
    assert list(tmodel.state_dict()) == list(state)
    tmodel.load_state_dict(to_torch_state(state))
    back = from_torch_state(tmodel.state_dict())
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert np.atleast_1d(back[k]).tobytes() == np.atleast_1d(v).tobytes(), k  # bit for bit
    again = models.BNNResNet(model.config)
    again.load_state_dict(back)
    assert all(np.array_equal(again.state_dict()[k], v) for k, v in state.items())


def _official_layout(state):
    """A synthetic checkpoint in the official Bi-Real Net layout: ``module.`` prefixes,
    ``binary_conv.weights`` flattened to ``(O*I*9, 1)``, wrapped in ``{"state_dict": ...}``."""
    out = OrderedDict()
    for k, v in state.items():
        t = torch.from_numpy(np.array(v, copy=True))
        if k.endswith("binary_conv.weight"):
            k, t = k[: -len("weight")] + "weights", t.reshape(-1, 1)
        out["module." + k] = t
    return {"state_dict": out}


def test_load_official_birealnet_layout():
    config = models.get_config("birealnet18", **SMALL)
    model = models.BNNResNet(config)
    randomize_state(model, 5)
    state = model.state_dict()
    ckpt = _official_layout(state)
    w = ckpt["state_dict"]["module.layer1.0.binary_conv.weights"]
    assert w.shape == (8 * 8 * 9, 1)
    loaded = load_official_birealnet(ckpt, config)
    assert list(loaded) == list(state)
    for k, v in state.items():
        assert np.array_equal(loaded[k], v), k
    target = models.BNNResNet(config)
    target.load_state_dict(loaded)
    x = np.random.default_rng(0).standard_normal((2, 1, 10, 10)).astype(np.float32)
    model.eval()
    target.eval()
    assert np.array_equal(model(x), target(x))


def test_load_official_birealnet_names_problems():
    config = models.get_config("birealnet18", **SMALL)
    state = models.BNNResNet(config).state_dict()
    ckpt = _official_layout(state)["state_dict"]
    extra = OrderedDict(ckpt, **{"module.layer9.0.bn1.weight": torch.zeros(3)})
    with pytest.raises(ConversionError, match=r"layer9\.0\.bn1\.weight"):
        load_official_birealnet(extra, config)
    missing = OrderedDict((k, v) for k, v in ckpt.items() if "layer2.1.bn1.weight" not in k)
    with pytest.raises(ConversionError, match=r"layer2\.1\.bn1"):
        load_official_birealnet(missing, config)


def _torch_layer(op, kw):
    """The PyTorch module for a golden layer case, or None where the twin has no such layer."""
    from refbnn.interop import torch as tw

    tnn = torch.nn
    if op == "BinaryConv2d":
        if kw.get("dilation", 1) != 1:
            return None  # the twin's binary conv has no dilation (no model uses it)
        return tw.BinaryConv2d(kw["in_channels"], kw["out_channels"], kw["kernel_size"],
                               kw.get("stride", 1), kw.get("padding", 1), kw.get("groups", 1),
                               kw.get("scale", "none"), kw.get("sign_at_zero", 1),
                               kw.get("act_grad", "approx_sign"), kw.get("pad_value", 0))
    if op in ("BatchNorm2d", "BatchNorm1d"):
        return getattr(tnn, op)(kw["num_features"], momentum=kw.get("momentum", 0.1))
    simple = {
        "FPReLU": lambda: tw.FPReLU(kw["num_channels"]),
        "PReLU": lambda: tnn.PReLU(kw["num_parameters"]),
        "ReLU": tnn.ReLU,
        "MaxPool2d": lambda: tnn.MaxPool2d(kw["kernel_size"], kw.get("stride"), kw.get("padding", 0)),
        "AvgPool2d": lambda: tnn.AvgPool2d(kw["kernel_size"], kw.get("stride"), kw.get("padding", 0),
                                           kw.get("ceil_mode", False), kw.get("count_include_pad", True)),
        "GlobalAvgPool2d": lambda: tnn.Sequential(tnn.AdaptiveAvgPool2d(1), tnn.Flatten()),
        "ChannelRepeat": lambda: tw.ChannelRepeat(kw["times"]),
        "Conv2d": lambda: tnn.Conv2d(kw["in_channels"], kw["out_channels"], kw["kernel_size"],
                                     kw.get("stride", 1), kw.get("padding", 0), bias=kw.get("bias", False)),
        "Linear": lambda: tnn.Linear(kw["in_features"], kw["out_features"], bias=kw.get("bias", True)),
    }
    return simple[op]() if op in simple else None


def _torch_outputs(case):
    if case.op == "cross_entropy":
        z = torch.tensor(case.inputs["logits"], requires_grad=True)
        loss = torch.nn.functional.cross_entropy(z, torch.from_numpy(case.inputs["labels"]),
                                                 label_smoothing=case.params["label_smoothing"])
        loss.backward()
        return {"loss": loss.item(), "grad_logits": z.grad.numpy()}
    m = _torch_layer(case.op, case.params["kwargs"])
    if m is None:
        return None
    own = m.state_dict()
    m.load_state_dict({k: torch.tensor(case.inputs[k]) for k in own})
    train = case.params["mode"] == "train"
    m.train(train)
    x = torch.tensor(case.inputs["x"], requires_grad=True)
    y = m(x)
    out = {"y": y.detach().numpy()}
    if train:
        y.backward(torch.tensor(case.inputs["grad_out"]))
        out["grad_x"] = x.grad.numpy()
        out.update({f"grad.{k}": p.grad.numpy() for k, p in m.named_parameters()})
        out.update({f"state.{k}": b.numpy() for k, b in m.named_buffers()})
    return out


def test_golden_layer_cases_reproduce_in_torch(tmp_path):
    """layers.h5 read back from disk and recomputed with PyTorch meets its stated tolerances: the
    golden tolerances are realistic for another float32 implementation."""
    from refbnn import golden
    from refbnn.golden import fileio, layers

    path = tmp_path / "layers.h5"
    fileio.write(path, fileio.GoldenFile("layers", 0, {}, layers.layer_cases(0)), "test")
    checked, problems = 0, []
    for case in fileio.read(path).cases:
        got = _torch_outputs(case)
        if got is None:
            continue
        for key, expected in case.outputs.items():
            problem = golden.compare(expected, got[key], *case.tolerance[key])
            checked += 1
            if problem:
                problems.append(f"{case.name}/{key}: {problem}")
    assert checked >= 50 and not problems, problems


def test_golden_bconv_cases_reproduce_in_torch():
    """ops.h5's binary convolutions, recomputed from docs/golden.md's formula with torch.conv2d on
    +-1 float64 tensors (exact for these sizes): padding spec, pad value, stride, dilation, groups."""
    from refbnn.golden import ops

    checked = 0
    for case in ops.op_cases(0):
        if case.op not in ("bconv2d", "bconv2d_output"):
            continue
        p = case.params
        ge = (lambda v: v >= 0) if p["sign_at_zero"] == 1 else (lambda v: v > 0)
        x = torch.tensor(np.where(ge(case.inputs["x"]), 1.0, -1.0)).permute(0, 3, 1, 2)
        w = torch.tensor(np.where(ge(case.inputs["kernel"]), 1.0, -1.0)).permute(3, 2, 0, 1)
        (kh, kw), (h, wd) = w.shape[2:], x.shape[2:]
        pad = p["padding"]
        if pad == "valid":
            pad = [0, 0, 0, 0]
        elif pad == "same":
            pad = []
            for n, k, s, d in zip((h, wd), (kh, kw), p["stride"], p["dilation"]):
                total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
                pad += [total // 2, total - total // 2]
        elif len(pad) == 2:
            pad = [pad[0], pad[0], pad[1], pad[1]]
        top, bottom, left, right = pad
        xp = torch.nn.functional.pad(x, (left, right, top, bottom), value=float(p["pad_value"]))
        acc = torch.nn.functional.conv2d(xp, w, stride=tuple(p["stride"]),
                                         dilation=tuple(p["dilation"]), groups=p["groups"])
        assert np.array_equal(acc.permute(0, 2, 3, 1).numpy(), case.outputs["acc"]), case.name
        checked += 1
    assert checked >= 10
