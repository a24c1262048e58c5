"""QONNX out (refbnn.interop.qonnx): export --qonnx writes a graph with BipolarQuant that QONNX's own
executor runs; crosscheck --against qonnx agrees layer by layer (binary convs bit-exact) and catches
a changed weight; models QONNX cannot express are one-line errors."""

import numpy as np
import pytest

pytest.importorskip("qonnx", reason="needs qonnx (the 'qonnx' extra)")
onnx = pytest.importorskip("onnx", reason="needs onnx (the 'qonnx' extra)")

from refbnn import crosscheck, export, fileformat, models  # noqa: E402
from refbnn.golden.model import randomize_state  # noqa: E402
from refbnn.interop import qonnx  # noqa: E402

pytestmark = pytest.mark.qonnx

CONFIGS = {
    "bireal_tf": dict(input_shape=[3, 64, 64], width_multiplier=0.125, num_classes=7, conv_padding="tf",
                      bn_eps=1e-3, scale="mean_abs", pad_values={"layer2.0.binary_conv": 1}),
    "ftbnn_binary_shortcut_pad1": dict(input_shape=[1, 12, 12], width_multiplier=0.125, num_classes=10,
                                       nonlinearity="relu_stage_end", downsample="binary", pad_value=1),
    "derived_fprelu_cheap": "ftbnn18_g2",
}


def _model_file(tmp_path, spec, seed=0):
    net = models.build(spec, seed=seed, input_shape=[1, 12, 12], width_multiplier=0.25,
                       num_classes=4) if isinstance(spec, str) else models.BNNResNet(spec)
    randomize_state(net, seed)
    path = tmp_path / f"m{seed}.h5"
    fileformat.save_model(path, net.state_dict(), config=net.config, binary_weights=net.binary_weights())
    return net, path


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_runs_in_qonnx_and_matches_layer_by_layer(tmp_path, capsys, name):
    net, path = _model_file(tmp_path, CONFIGS[name])
    out = tmp_path / "m.onnx"
    assert export.main([str(path), str(out), "--qonnx", "--batch", "2"]) == 0
    proto = onnx.load(out)
    ops = {n.op_type for n in proto.graph.node}
    assert "BipolarQuant" in ops and "Conv" in ops
    assert {n.domain for n in proto.graph.node if n.op_type == "BipolarQuant"} == {qonnx.QONNX_DOMAIN}
    x, _ = crosscheck.seeded_batch(net.config, 0, 2)
    ref = crosscheck.run_refbnn(net, x)
    other = qonnx.qonnx_outputs(out, x)
    for k, r in ref.outputs.items():
        o = other[k].reshape(r.shape)
        assert np.abs(r - o).max() <= 1e-4 * max(np.abs(r).max(), 1e-30), k
        if k.endswith("binary_conv"):
            assert np.array_equal(r, o), k  # integers (times alpha): bit-exact
    capsys.readouterr()
    assert crosscheck.main([str(path), "--against", "qonnx", str(out)]) == 0
    assert "all " in capsys.readouterr().out


def test_crosscheck_qonnx_catches_other_weights(tmp_path, capsys):
    _, path = _model_file(tmp_path, CONFIGS["bireal_tf"])
    _, other = _model_file(tmp_path, CONFIGS["bireal_tf"], seed=1)
    out = tmp_path / "o.onnx"
    assert export.main([str(other), str(out), "--qonnx", "--batch", "2"]) == 0
    assert crosscheck.main([str(path), "--against", "qonnx", str(out)]) == 1
    assert "BEYOND TOLERANCE" in capsys.readouterr().out


def test_bipolar_quant_is_sign_at_zero_plus_one(tmp_path):
    """The convention the export relies on, measured in QONNX itself: 0.0 and -0.0 map to +1."""
    from onnx import TensorProto, helper
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    x = np.array([[0.0, -0.0, 1e-45, -1e-45, 2.0, -2.0]], np.float32)
    node = helper.make_node("BipolarQuant", ["x", "s"], ["y"], domain=qonnx.QONNX_DOMAIN)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])],
                              [helper.make_tensor("s", TensorProto.FLOAT, [], [1.0])])
    y = execute_onnx(ModelWrapper(helper.make_model(graph)), {"x": x})["y"]
    assert y.tolist() == [[1.0, 1.0, 1.0, -1.0, 1.0, -1.0]]


def test_unexpressible_and_bad_inputs(tmp_path, capsys):
    _, path = _model_file(tmp_path, dict(CONFIGS["ftbnn_binary_shortcut_pad1"], sign_at_zero=-1))
    assert export.main([str(path), str(tmp_path / "c.onnx"), "--qonnx"]) == 2
    assert "BipolarQuant maps x >= 0 to +1" in capsys.readouterr().err
    assert not (tmp_path / "c.onnx").exists()
    _, path = _model_file(tmp_path, CONFIGS["ftbnn_binary_shortcut_pad1"])
    out = tmp_path / "b1.onnx"
    assert export.main([str(path), str(out), "--qonnx"]) == 0  # batch 1
    assert crosscheck.main([str(path), "--against", "qonnx", str(out)]) == 2  # crosscheck batch 2
    assert "--batch 1" in capsys.readouterr().err
    assert crosscheck.main([str(path), "--against", "qonnx", str(tmp_path / "absent.onnx")]) == 2
