"""``python -m refbnn.crosscheck``: agreement is reported as such, and a deliberately perturbed twin
(one flipped weight sign; another sign(0) convention) or golden file is caught at the right layer.
The golden-file and command-line tests need no PyTorch; the twin tests skip without it."""

import importlib.util

import h5py
import numpy as np
import pytest

from refbnn import crosscheck, fileformat, models
from refbnn.golden import cli as golden_cli
from refbnn.golden.model import randomize_state

SMALL = {"input_shape": [1, 12, 12], "width_multiplier": 0.125, "num_classes": 10}
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="PyTorch (the torch extra) is not installed")


@pytest.fixture(scope="module")
def torch(torch_one_thread):
    return torch_one_thread


@pytest.fixture(scope="module")
def net():
    model = models.build("ftbnn18_purified", seed=7, **SMALL)
    randomize_state(model, 7)
    return model


@pytest.fixture(scope="module")
def weights(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("cc") / "model.h5"
    fileformat.save_model(path, net.state_dict(), config=net.config,
                          binary_weights=net.binary_weights())
    return path


def _twin(model):
    from refbnn.interop.torch import to_torch_state, twin

    t = twin(model.config)
    t.load_state_dict(to_torch_state(model.state_dict()))
    return t


def _first_bad(model, tmodel, train=False):
    x, labels = crosscheck.seeded_batch(model.config, 0, 2)
    labels = labels if train else None
    rows = crosscheck.compare(crosscheck.run_refbnn(model, x, labels),
                              crosscheck.run_torch(tmodel, x, labels),
                              crosscheck.kink_rules(model), train=train)
    return rows, crosscheck.first_failure(rows)


@needs_torch
def test_cli_agrees_with_torch(weights, capsys, torch):
    assert crosscheck.main([str(weights), "--against", "torch"]) == 0
    assert crosscheck.main([str(weights), "--against", "torch", "--train"]) == 0
    out = capsys.readouterr().out
    assert "layer4.0.downsample.1" in out and "layer3.1.bn1.weight" in out  # outputs and grads
    assert out.count("within tolerance") == 2


@needs_torch
@pytest.mark.parametrize("layer", ["layer1.0.binary_conv", "layer3.1.binary_conv",
                                   "layer2.0.downsample.1"])
def test_flipped_weight_sign_is_named(net, layer, torch):
    tmodel = _twin(net)
    w = tmodel.get_submodule(layer).weight
    with torch.no_grad():
        i = int(torch.argmax(w.abs()))  # a clearly nonzero weight: negating it flips its bit
        w.view(-1)[i] = -w.view(-1)[i]
    rows, bad = _first_bad(net, tmodel)
    assert bad is not None and bad.name == layer and bad.kind == "output"
    assert all(r.ok for r in rows[: rows.index(bad)])


@needs_torch
def test_sign_of_zero_convention_is_named(torch):
    """A stem BatchNorm channel with scale and shift 0 feeds exact zeros to the first binary conv;
    a twin that binarizes with torch.sign (0 -> 0) there disagrees at exactly that layer."""
    model = models.build("ftbnn18_purified", seed=8, **SMALL)
    randomize_state(model, 8)
    state = model.state_dict()
    state["bn1.weight"][0] = 0.0
    state["bn1.bias"][0] = 0.0
    model.load_state_dict(state)
    _, bad = _first_bad(model, _twin(model))
    assert bad is None, bad
    tmodel = _twin(model)
    tmodel.layer1[0].binary_conv.sign_at_zero = 0
    _, bad = _first_bad(model, tmodel)
    assert bad is not None and bad.name == "layer1.0.binary_conv"
    assert bad.flips == 0  # equal inputs (exact zeros in both): the layer binarizes them differently


@needs_torch
def test_gradient_difference_is_named(net, torch):
    """With forward passes equal, a changed backward (identity instead of approx_sign) is caught
    among the gradients."""
    tmodel = _twin(net)
    tmodel.layer4[0].binary_conv.act_grad = "identity"
    rows, bad = _first_bad(net, tmodel, train=True)
    assert bad is not None and bad.kind == "grad"
    assert all(r.ok for r in rows if r.kind == "output")


def _last_verdict(out):
    return next(line for line in out.splitlines() if line.startswith(("first ", "all ")))


def test_against_golden_file(net, weights, tmp_path, capsys):
    out = tmp_path / "g"
    assert golden_cli.main([str(out), "--weights", str(weights), "--batch", "2"]) == 0
    model_file = out / "model.h5"
    assert crosscheck.main([str(weights), "--against", "golden", str(model_file), "--train"]) == 0
    with h5py.File(model_file, "r+") as f:
        ds = f["cases/eval/outputs/out.layer3.0.bn1"]
        ds[0, 1, 0, 0] = ds[0, 1, 0, 0] + np.float32(0.5)
    capsys.readouterr()
    assert crosscheck.main([str(weights), "--against", "golden", str(model_file)]) == 1
    assert _last_verdict(capsys.readouterr().out).startswith(
        "first output beyond tolerance: layer3.0.bn1 ")
    # a second, earlier corruption: the first failing layer in call order is named (a search
    # scanning from the end would name layer3.0.bn1 again)
    with h5py.File(model_file, "r+") as f:
        ds = f["cases/eval/outputs/out.layer1.1.binary_conv"]
        ds[0, 0, 0, 0] = ds[0, 0, 0, 0] + np.float32(3.0)
    assert crosscheck.main([str(weights), "--against", "golden", str(model_file)]) == 1
    out = capsys.readouterr().out
    assert _last_verdict(out).startswith("first output beyond tolerance: layer1.1.binary_conv ")
    assert "layer3.0.bn1" not in out  # the table stops at the first failure


def test_first_failure_is_the_earliest_row():
    rows = [crosscheck.Row(n, "output", 0.0, 0.0, ok) for n, ok in
            [("a", True), ("b", False), ("c", True), ("d", False)]]
    assert crosscheck.first_failure(rows).name == "b"
    assert crosscheck.first_failure(rows[:1]) is None


def _run(outputs, inputs=None):
    from collections import OrderedDict

    return crosscheck.Run(OrderedDict(outputs), inputs or {})


def test_compare_counts_flips_across_sign_rules():
    """refbnn binarizes with x >= 0 (+1 at 0), the other side with torch.sign (0 at 0): an exact
    zero input is a flip; equal signs are not; values the other run lacks are skipped or fail."""
    a = np.array([[0.0, -1e-9, 2.0, -3.0]], np.float32)
    ref = _run([("conv", a), ("logits", a)], {"conv": a})
    other = _run([("conv", a), ("logits", a)], {"conv": np.array([[0.0, -1.0, 1.0, -1.0]])})
    rows = crosscheck.compare(ref, other, {"conv": "ge"}, other_rules={"conv": "sign"})
    assert (rows[0].flips, rows[0].near_zero_flips) == (1, 1)
    rows = crosscheck.compare(ref, other, {"conv": "ge"})
    assert rows[0].flips == 0
    lacking = _run([("logits", a)])
    assert [r.ok for r in crosscheck.compare(ref, lacking, {})] == [False, True]
    assert [r.name for r in crosscheck.compare(ref, lacking, {}, missing="skip")] == ["logits"]
    assert crosscheck.not_compared(ref, lacking) == ["conv"]
    assert not crosscheck.compare(ref, _run([("conv", a)]), {}, missing="skip")[-1].ok  # no logits


def test_other_sign_rule_resolution():
    rules = {"b": "ge", "relu": "gt"}
    other = _run([])
    assert crosscheck._resolve_other_rules(rules, {"b"}, other, None) == rules
    assert crosscheck._resolve_other_rules(rules, {"b"}, other, 0) == {"b": "sign", "relu": "gt"}
    other.rules = {"*": "gt"}
    assert crosscheck._resolve_other_rules(rules, {"b"}, other, 0)["b"] == "gt"  # read beats flag


def test_flags_before_the_weight_file(weights, tmp_path, capsys):
    """``crosscheck --against golden FILE weights.h5`` and ``--against torch weights.h5``: the weight
    file after --against's own values is the positional argument."""
    out = tmp_path / "g"
    assert golden_cli.main([str(out), "--weights", str(weights), "--batch", "2"]) == 0
    assert crosscheck.main(["--against", "golden", str(out / "model.h5"), str(weights)]) == 0
    args = crosscheck.parse_args(["--against", "torch", str(weights)])
    assert (args.weights, args.against) == (str(weights), ["torch"])
    args = crosscheck.parse_args(["--against", "torch-module", "a.b:c", str(weights), "--checkpoint", "x"])
    assert (args.weights, args.against) == (str(weights), ["torch-module", "a.b:c"])
    with pytest.raises(SystemExit) as e:
        crosscheck.parse_args(["--against", "torch"])
    assert e.value.code == 2
    capsys.readouterr()


@pytest.mark.parametrize("against", [["torch", "extra"], ["onnx", "absent.onnx"],
                                     ["golden", "absent.h5"], ["nothing"],
                                     ["torch-module", "pkg.mod:f"],  # no --checkpoint
                                     ["onnx", "absent.onnx", "--train"],
                                     ["golden", "absent.h5", "--checkpoint", "x.pth"],
                                     ["golden", "absent.h5", "--rename", "m.json"],
                                     ["golden", "absent.h5", "--rtol", "nan"]])
def test_bad_input_exits_2(weights, capsys, against):
    assert crosscheck.main([str(weights), "--against", *against]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_bad_weight_file_exits_2(tmp_path, capsys):
    path = tmp_path / "x.h5"
    path.write_bytes(b"not a weight file")
    assert crosscheck.main([str(path), "--against", "golden", str(path)]) == 2
    assert crosscheck.main([str(tmp_path / "absent.h5"), "--against", "golden", str(path)]) == 2
    assert capsys.readouterr().err.count("error: ") == 2
