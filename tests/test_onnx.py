"""ONNX export (refbnn.interop.onnx, ``export --onnx``) and ``crosscheck --against onnx``, torch-free.

Tolerances: every binary conv and the BatchNorm after it is computed by the same float32 operations
as refbnn's (exact integer accumulators, then the same multiply and add), so they agree bit for bit
while their inputs do; the real convs, pools and the classifier sum in onnxruntime's order, a few ulp
(measured: logits within 7e-7 relative on every preset), far inside crosscheck's RTOL 1e-4.
"""

import importlib.util

import numpy as np
import pytest
from one_line import one_error

from refbnn import crosscheck, export, fileformat, models
from refbnn.golden.model import forward_record, randomize_state

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="onnx and onnxruntime (the test extra) are not installed")

SMALL = {"input_shape": [1, 12, 12], "width_multiplier": 0.125, "num_classes": 10}


def _model(name="ftbnn18", seed=3, **over):
    m = models.build(name, seed=seed, **{**SMALL, **over})
    randomize_state(m, seed)
    return m


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    m = _model()
    path = tmp_path_factory.mktemp("onnx") / "m.h5"
    fileformat.save_model(path, m.state_dict(), config=m.config, binary_weights=m.binary_weights())
    return path


def _verdict(out):
    return [line for line in out.splitlines() if line.startswith(("all ", "first "))][-1]


@pytest.mark.parametrize("name", models.list_models())
def test_every_preset_matches_layer_by_layer(name, tmp_path, record_property):
    from refbnn.interop.onnx import export_onnx, run_onnx

    m = _model(name)
    path = export_onnx(m, tmp_path / "m.onnx", layer_outputs=True)
    x = np.random.default_rng(0).standard_normal((3, *m.config["input_shape"])).astype(np.float32)
    ref = forward_record(m, x, "eval")
    got, meta = run_onnx(path, x)
    assert meta["refbnn.sign_at_zero"] == "1"
    assert next(iter(got)) == "logits"
    binary = [n for n, layer in m.named_modules() if type(layer).__name__ == "BinaryConv2d"]
    exact, worst = 0, 0.0
    for key, want in ref.items():
        if not key.startswith(("out.", "in.")):
            continue
        have = got[key[4:] if key.startswith("out.") else key].reshape(want.shape)
        rel = float(np.abs(have.astype(np.float64) - want).max() / np.abs(want).max())
        worst = max(worst, rel)
        exact += rel == 0
        if key[4:] in binary and np.array_equal(got["in." + key[4:]], ref["in." + key[4:]]):
            assert np.array_equal(have, want), key  # same input: the binary conv is bit-exact
    assert worst <= 1e-5
    rel = float(np.abs(got["logits"] - ref["logits"]).max() / np.abs(ref["logits"]).max())
    print(f"{name}: logits rel diff {rel:.2e}, {exact} of {len(ref) - 1} arrays bit-exact")
    record_property("onnx_logits_rel_diff", f"{rel:.2e}")


def test_ternary_model_uses_sign(tmp_path):
    """sign_at_zero=0 exports as ONNX Sign (0 at 0); exact zeros reach layer1.0 (a zeroed stem BN
    channel) and the ONNX run agrees with refbnn's float path there."""
    import onnx

    from refbnn.interop.onnx import export_onnx, run_onnx

    m = _model("birealnet18", sign_at_zero=0)
    state = m.state_dict()
    state["bn1.weight"][0] = state["bn1.bias"][0] = 0.0
    m.load_state_dict(state)
    path = export_onnx(m, tmp_path / "t.onnx", layer_outputs=True)
    assert "Sign" in {n.op_type for n in onnx.load(str(path)).graph.node}
    x = np.random.default_rng(1).standard_normal((2, 1, 12, 12)).astype(np.float32)
    got, _ = run_onnx(path, x)
    ref = forward_record(m, x, "eval")
    assert (ref["in.layer1.0.binary_conv"] == 0).any()
    assert np.array_equal(got["layer1.0.binary_conv"], ref["out.layer1.0.binary_conv"])
    assert np.allclose(got["logits"], ref["logits"], rtol=1e-5, atol=1e-6)


def test_pad_value_one(tmp_path):
    from refbnn.interop.onnx import export_onnx, run_onnx

    m = _model("ftbnn18", pad_value=1)
    path = export_onnx(m, tmp_path / "p.onnx", layer_outputs=True)
    x = np.random.default_rng(2).standard_normal((2, 1, 12, 12)).astype(np.float32)
    got, _ = run_onnx(path, x)
    ref = forward_record(m, x, "eval")
    assert np.array_equal(got["layer1.0.binary_conv"], ref["out.layer1.0.binary_conv"])


def test_logits_only_export_passes_on_logits(weights, tmp_path, capsys):
    dst = tmp_path / "m.onnx"
    assert export.main([str(weights), str(dst), "--onnx"]) == 0
    capsys.readouterr()
    assert crosscheck.main([str(weights), "--against", "onnx", str(dst), "--batch", "3"]) == 0
    out = capsys.readouterr().out
    assert "not compared (absent in the other run): 61 layers: conv1, bn1," in out
    assert _verdict(out).startswith("all 1 comparisons within tolerance; 1 layer outputs compared")
    print(_verdict(out))


def test_layer_output_export_compares_every_layer(weights, tmp_path, capsys):
    dst = tmp_path / "m.onnx"
    assert export.main([str(weights), str(dst), "--onnx", "--layer-outputs"]) == 0
    capsys.readouterr()
    assert crosscheck.main(["--against", "onnx", str(dst), str(weights)]) == 0
    out = capsys.readouterr().out
    assert "not compared" not in out
    assert _verdict(out).startswith("all 62 comparisons within tolerance; 62 layer outputs compared")
    assert "layer2.0.binary_conv   output     0.000e+00" in out  # bit-exact binary conv
    print(_verdict(out))


def test_batch_one_export_is_run_image_by_image(weights, tmp_path, capsys):
    """A static batch of 1 (as torch.onnx.export writes by default): crosscheck feeds 1 at a time."""
    import onnxruntime as ort

    dst = tmp_path / "b1.onnx"
    assert export.main([str(weights), str(dst), "--onnx", "--batch", "1", "--layer-outputs"]) == 0
    assert ort.InferenceSession(str(dst)).get_inputs()[0].shape == [1, 1, 12, 12]
    capsys.readouterr()
    assert crosscheck.main([str(weights), "--against", "onnx", str(dst), "--batch", "3"]) == 0
    print(_verdict(capsys.readouterr().out))
    # a static batch of 2 with 3 images: chunks of 2, the last padded
    dst2 = tmp_path / "b2.onnx"
    assert export.main([str(weights), str(dst2), "--onnx", "--batch", "2"]) == 0
    assert crosscheck.main([str(weights), "--against", "onnx", str(dst2), "--batch", "3"]) == 0


def _corrupt(src, dst, layer, flat_index):
    """Negate one +-1 weight of ``layer``'s binary conv in an exported ONNX file."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    for init in model.graph.initializer:
        if init.name == layer + ".weight_sign":
            w = numpy_helper.to_array(init).copy()
            w.reshape(-1)[flat_index] *= -1
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(dst))


def test_corrupted_layers_are_named_first_in_call_order(weights, tmp_path, capsys):
    """One flipped binary weight in layer3.1 is named there; another in layer1.2 as well: the first
    failing layer in call order is the one reported (not the last)."""
    good = tmp_path / "m.onnx"
    assert export.main([str(weights), str(good), "--onnx", "--layer-outputs"]) == 0
    one, two = tmp_path / "one.onnx", tmp_path / "two.onnx"
    _corrupt(good, one, "layer3.1.binary_conv", 4)
    _corrupt(one, two, "layer1.2.binary_conv", 0)
    capsys.readouterr()
    assert crosscheck.main([str(weights), "--against", "onnx", str(one)]) == 1
    assert _verdict(capsys.readouterr().out).startswith(
        "first output beyond tolerance: layer3.1.binary_conv ")
    assert crosscheck.main([str(weights), "--against", "onnx", str(two)]) == 1
    assert _verdict(capsys.readouterr().out).startswith(
        "first output beyond tolerance: layer1.2.binary_conv ")


def test_rename_map(weights, tmp_path, capsys):
    """Graph outputs under other names line up through --rename's prefix map."""
    import json

    import onnx

    good = tmp_path / "m.onnx"
    assert export.main([str(weights), str(good), "--onnx", "--layer-outputs"]) == 0
    model = onnx.load(str(good))
    for o in model.graph.output:
        if o.name.startswith("layer1."):
            old = o.name
            o.name = "stage1." + old[len("layer1."):]
            for node in model.graph.node:
                node.output[:] = [o.name if v == old else v for v in node.output]
                node.input[:] = [o.name if v == old else v for v in node.input]
    onnx.save(model, str(tmp_path / "r.onnx"))
    capsys.readouterr()
    assert crosscheck.main([str(weights), "--against", "onnx", str(tmp_path / "r.onnx")]) == 0
    assert "not compared (absent in the other run): 12 layers: layer1.0.binary_conv" in \
        capsys.readouterr().out
    (tmp_path / "map.json").write_text(json.dumps({"stage1": "layer1"}))
    assert crosscheck.main([str(weights), "--against", "onnx", str(tmp_path / "r.onnx"),
                            "--rename", str(tmp_path / "map.json")]) == 0
    assert "not compared" not in capsys.readouterr().out


def test_onnx_errors_are_one_line(weights, tmp_path, capsys):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    assert crosscheck.main([str(weights), "--against", "onnx", str(junk)]) == 2
    assert "cannot load the ONNX model" in one_error(capsys)
    other = _model("ftbnn18", input_shape=[1, 16, 16])  # another input size
    wrong = tmp_path / "wrong.onnx"
    from refbnn.interop.onnx import export_onnx

    export_onnx(other, wrong)
    assert crosscheck.main([str(weights), "--against", "onnx", str(wrong)]) == 2
    assert "has shape ['N', 1, 16, 16], refbnn's model takes (N, 1, 12, 12)" in one_error(capsys)
    assert crosscheck.main([str(weights), "--against", "onnx", str(tmp_path / "absent.onnx")]) == 2
    one_error(capsys)
    bad_map = tmp_path / "map.json"
    bad_map.write_text("[1, 2]")
    assert crosscheck.main([str(weights), "--against", "onnx", str(wrong), "--rename", str(bad_map)]) == 2
    assert "rename map" in one_error(capsys)


def test_onnxruntime_failure_at_run_is_one_line(weights, tmp_path, capsys):
    """A model that loads but fails when run (a Reshape to an impossible shape)."""
    import onnx
    from onnx import TensorProto, helper

    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [7, 5])
    graph = helper.make_graph([helper.make_node("Reshape", ["input", "shape"], ["logits"])], "bad",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 12, 12])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                              initializer=[shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "bad.onnx"))
    assert crosscheck.main([str(weights), "--against", "onnx", str(tmp_path / "bad.onnx")]) == 2
    assert "onnxruntime failed" in one_error(capsys)


def test_export_errors_are_one_line(weights, tmp_path, capsys, monkeypatch):
    packed = tmp_path / "p.h5"
    assert export.main([str(weights), str(packed), "--packed-only"]) == 0
    capsys.readouterr()
    assert export.main([str(packed), str(tmp_path / "p.onnx"), "--onnx"]) == 2
    assert "packed-only" in one_error(capsys)
    assert export.main([str(weights), str(tmp_path / "x.h5"), "--packed-only", "--layer-outputs"]) == 2
    one_error(capsys)
    assert export.main([str(weights), str(tmp_path / "x.onnx"), "--onnx", "--batch", "0"]) == 2
    one_error(capsys)
    assert export.main([str(weights), str(weights), "--onnx"]) == 2
    assert "is the source" in one_error(capsys)
    assert fileformat.load(weights).kind == "model"  # untouched
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnx" else real(n, *a))
    assert export.main([str(weights), str(tmp_path / "y.onnx"), "--onnx"]) == 2
    assert "needs the onnx package" in one_error(capsys)
    assert not (tmp_path / "y.onnx").exists() and not (tmp_path / "x.onnx").exists()
