"""``python -m refbnn.crosscheck``: agreement is reported as such, and a deliberately perturbed twin
(one flipped weight sign; another sign(0) convention) or golden file is caught at the right layer."""

import h5py
import numpy as np
import pytest

from refbnn import crosscheck, fileformat, golden, models
from refbnn.goldenlib.model import randomize_state

torch = pytest.importorskip("torch")
from refbnn.interop.torch import to_torch_state, twin  # noqa: E402  (needs torch)

SMALL = {"input_shape": [1, 12, 12], "width_multiplier": 0.125, "num_classes": 10}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: one intra-op thread (PyTorch's spinning workers only slow a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def test_cli_agrees_with_torch(weights, capsys):
    assert crosscheck.main([str(weights), "--against", "torch"]) == 0
    assert crosscheck.main([str(weights), "--against", "torch", "--train"]) == 0
    out = capsys.readouterr().out
    assert "layer4.0.downsample.1" in out and "layer3.1.bn1.weight" in out  # outputs and grads
    assert out.count("within tolerance") == 2


@pytest.mark.parametrize("layer", ["layer1.0.binary_conv", "layer3.1.binary_conv",
                                   "layer2.0.downsample.1"])
def test_flipped_weight_sign_is_named(net, layer):
    tmodel = _twin(net)
    w = tmodel.get_submodule(layer).weight
    with torch.no_grad():
        i = int(torch.argmax(w.abs()))  # a clearly nonzero weight: negating it flips its bit
        w.view(-1)[i] = -w.view(-1)[i]
    rows, bad = _first_bad(net, tmodel)
    assert bad is not None and bad.name == layer and bad.kind == "output"
    assert all(r.ok for r in rows[: rows.index(bad)])


def test_sign_of_zero_convention_is_named():
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


def test_gradient_difference_is_named(net):
    """With forward passes equal, a changed backward (identity instead of approx_sign) is caught
    among the gradients."""
    tmodel = _twin(net)
    tmodel.layer4[0].binary_conv.act_grad = "identity"
    rows, bad = _first_bad(net, tmodel, train=True)
    assert bad is not None and bad.kind == "grad"
    assert all(r.ok for r in rows if r.kind == "output")


def test_against_golden_file(net, weights, tmp_path, capsys):
    out = tmp_path / "g"
    assert golden.main([str(out), "--weights", str(weights), "--batch", "2"]) == 0
    model_file = out / "model.h5"
    assert crosscheck.main([str(weights), "--against", "golden", str(model_file), "--train"]) == 0
    with h5py.File(model_file, "r+") as f:
        ds = f["cases/eval/outputs/out.layer3.0.bn1"]
        ds[0, 1, 0, 0] = ds[0, 1, 0, 0] + np.float32(0.5)
    capsys.readouterr()
    assert crosscheck.main([str(weights), "--against", "golden", str(model_file)]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("first output beyond tolerance: layer3.0.bn1 ")


@pytest.mark.parametrize("against", [["torch", "extra"], ["onnx", "absent.onnx"],
                                     ["golden", "absent.h5"], ["nothing"]])
def test_bad_input_exits_2(weights, capsys, against):
    assert crosscheck.main([str(weights), "--against", *against]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_bad_weight_file_exits_2(tmp_path, capsys):
    path = tmp_path / "x.h5"
    path.write_bytes(b"not a weight file")
    assert crosscheck.main([str(path), "--against", "torch"]) == 2
    assert crosscheck.main([str(tmp_path / "absent.h5"), "--against", "torch"]) == 2
    assert capsys.readouterr().err.count("error: ") == 2
