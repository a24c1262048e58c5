"""Golden vectors: fresh files check clean with the fast paths, the checker catches corruption, bad
files exit 2, the cases hold the promised hard edges, and a file written from docs/golden.md alone
(plain h5py, hand-computed values) is checked like refbnn's own."""

import json
import shutil

import h5py
import numpy as np
import pytest

from refbnn import fileformat, golden, models
from refbnn.golden import cli as golden_cli
from refbnn.golden import fileio

MODEL_ARGS = ["--model", "ftbnn18_purified", "--batch", "2", "--seed", "1"]


@pytest.fixture(scope="module")
def gdir(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden")
    assert golden_cli.main([str(out), *MODEL_ARGS]) == 0
    return out


def _cases(path):
    return {c.name: c for c in fileio.read(path).cases}


def test_fresh_files_check_clean(gdir, capsys):
    paths = [str(gdir / f) for f in golden.FILES]
    for p in paths:
        assert golden.check(p) == []
    assert golden_cli.main(["--check", *paths]) == 0
    assert capsys.readouterr().out.count(": OK") == 3


def test_sign_and_pack_cases_follow_the_written_semantics(gdir):
    cases = _cases(gdir / "ops.h5")
    for saz in (1, -1):
        c = cases[f"sign_saz{saz:+d}"]
        x, y = c.inputs["x"], c.outputs["y"]
        zero = x == 0
        assert (zero & np.signbit(x)).any() and (zero & ~np.signbit(x)).any()  # 0.0 and -0.0
        assert (y[zero] == saz).all()  # docs/semantics.md section 1: both zeros map to sign_at_zero
        assert (y[x > 0] == 1).all() and (y[x < 0] == -1).all()
    c = cases["pack_c1_w64_saz+1"]  # one value per row: the word is 1 exactly for a negative value
    assert c.outputs["words"].dtype == np.uint64
    assert np.array_equal(c.outputs["words"][:, 0], (c.inputs["x"][:, 0] < 0).astype(np.uint64))


def test_cases_hold_the_hard_edges(gdir):
    ops = _cases(gdir / "ops.h5")
    convs = [c for c in ops.values() if c.op == "bconv2d"]
    assert {c.params["pad_value"] for c in convs} == {0, 1, -1}
    assert {json.dumps(c.params["padding"])[:2] for c in convs} >= {'"v', '"s', "[1", "[0"}
    assert any(c.params["groups"] > 1 for c in convs) and any(c.params["dilation"] != [1, 1]
                                                               for c in convs)
    assert any(c.params["stride"][0] == 2 and c.inputs["x"].shape[1] % 2 for c in convs)
    assert any(c.inputs["x"].shape[3] % 32 for c in convs)
    assert any(c.inputs["x"].shape[3] > 64 and c.inputs["x"].shape[3] % 64 for c in convs)
    outs = [c for c in ops.values() if c.op == "bconv2d_output"]
    assert any((c.outputs["y"] == 0).any() for c in outs)  # ties at the threshold
    assert any((c.inputs["multiplier"] < 0).any() for c in outs)
    assert any(c.params["sign_at_zero"] == -1 for c in outs)
    layers = _cases(gdir / "layers.h5")
    assert (layers["batchnorm2d_train_negative_scale"].inputs["weight"] < 0).any()
    assert {c.params["kwargs"].get("act_grad", "approx_sign") for c in layers.values()
            if c.op == "BinaryConv2d"} == {"ste", "approx_sign", "identity"}
    model = fileio.read(gdir / "model.h5")
    assert model.meta["config"]["name"] == "ftbnn18_purified"
    step = {c.name: c for c in model.cases}["train_step"]
    params = [k for k in model.arrays if not k.endswith(("running_mean", "running_var",
                                                          "num_batches_tracked"))]
    assert all(f"grad.{k}" in step.outputs and f"updated.{k}" in step.outputs for k in params)


CORRUPTIONS = [
    ("ops.h5", "bconv_same_s2_odd", "acc", lambda a: a + np.int32(2) * (np.arange(a.size) == 7)
     .reshape(a.shape).astype(np.int32)),
    ("ops.h5", "pack_c100_w32_saz+1", "words", lambda a: a ^ np.uint32(1 << 3)),
    ("layers.h5", "batchnorm2d_train_negative_scale", "grad.weight", lambda a: a * np.float32(1.01)),
    ("model.h5", "eval", "out.layer2.0.binary_conv", lambda a: a + np.float32(2.0)),
    ("model.h5", "train_step", "grad.layer3.1.bn1.bias", lambda a: -a),
    # one float value, not the first, off by one part in a thousand
    ("model.h5", "eval", "out.layer3.1.bn1", lambda a: _one(a, -1, np.float32(1.001))),
    ("layers.h5", "batchnorm2d_train_negative_scale", "grad_x", lambda a: _one(a, a.size // 2,
                                                                                  np.float32(0.999))),
]


def _one(a, index, factor):
    """``a`` with element ``index`` (flat) scaled by ``factor`` (moved by 1 if it is 0)."""
    a = a.copy()
    v = a.flat[index]
    a.flat[index] = v * factor if v != 0 else a.dtype.type(1)
    return a


@pytest.mark.parametrize(("fname", "case", "output", "change"), CORRUPTIONS,
                         ids=[c[1] + "/" + c[2] for c in CORRUPTIONS])
def test_checker_catches_a_corrupted_value(gdir, tmp_path, capsys, fname, case, output, change):
    path = tmp_path / fname
    shutil.copy(gdir / fname, path)
    with h5py.File(path, "r+") as f:
        ds = f[f"cases/{case}/outputs/{output}"]
        ds[...] = change(ds[()])
    mismatches = golden.check(path)
    assert {m.split(":")[0] for m in mismatches} == {f"{case}/{output}"}
    if case.startswith("bconv"):  # recomputed with both kernel paths, each reports it
        assert sorted(m.rsplit("[", 1)[-1] for m in mismatches) == ["fast kernels]",
                                                                     "portable kernels]"]
    else:
        assert len(mismatches) == 1
    assert golden_cli.main(["--check", str(path)]) == 1
    assert f"{case}/{output}" in capsys.readouterr().out


def _write_bgemm_from_spec(path, acc):
    """A golden file written from docs/golden.md alone, with a hand-computed bgemm case."""
    with h5py.File(path, "w") as f:
        f.attrs.update({"format": "refbnn-golden", "format_version": 1, "kind": "ops", "seed": 0,
                        "refbnn_version": "hand", "meta": "{}", "cases": '["by_hand"]'})
        g = f.create_group("cases/by_hand")
        g.attrs.update({"op": "bgemm", "params": '{"sign_at_zero": 1}', "inputs": '["x", "w"]',
                        "outputs": '["acc"]'})
        g["inputs/x"] = np.array([[1.0, -2.0, 0.0]], np.float32)
        g["inputs/w"] = np.array([[1.0, 1.0, 1.0], [-1.0, -0.0, 3.0]], np.float32)
        g["outputs/acc"] = np.array(acc, np.int32)


def test_file_written_from_the_spec(tmp_path):
    # signs: x -> [+1, -1, +1]; w rows -> [+1, +1, +1] and [-1, +1, +1] (-0.0 is +1)
    path = tmp_path / "hand.h5"
    _write_bgemm_from_spec(path, [[1, -1]])
    assert golden.check(path) == []
    _write_bgemm_from_spec(path, [[1, 1]])
    assert len(golden.check(path)) == 2  # the portable and the fast kernels each report it


def _broken(tmp_path, gdir, how):
    path = tmp_path / "broken.h5"
    if how == "text":
        path.write_text("not hdf5\n")
        return path
    shutil.copy(gdir / "ops.h5", path)
    with h5py.File(path, "r+") as f:
        if how == "format":
            f.attrs["format"] = "something-else"
        elif how == "op":
            f["cases/bgemm_k7_saz+1"].attrs["op"] = "no_such_op"
        elif how == "dataset":
            del f["cases/bgemm_k7_saz+1/inputs/w"]
        elif how == "cases":
            f.attrs["cases"] = "[not json"
    return path


@pytest.mark.parametrize("how", ["text", "format", "op", "dataset", "cases"])
def test_bad_file_exits_2_with_one_line(gdir, tmp_path, capsys, how):
    path = _broken(tmp_path, gdir, how)
    assert golden_cli.main(["--check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_missing_file_and_bad_arguments(tmp_path, capsys):
    assert golden_cli.main(["--check", str(tmp_path / "absent.h5")]) == 2
    assert golden_cli.main([str(tmp_path / "out"), "--model", "no_such_model"]) == 2
    assert capsys.readouterr().err.count("error: ") == 2


def test_from_a_weight_file(tmp_path, capsys):
    net = models.build("birealnet18", seed=2, input_shape=[1, 9, 9], width_multiplier=0.125,
                       num_classes=4)
    weights = tmp_path / "w.h5"
    fileformat.save_model(weights, net.state_dict(), config=net.config,
                          binary_weights=net.binary_weights())
    out = tmp_path / "g"
    assert golden_cli.main([str(out), "--weights", str(weights), "--batch", "2"]) == 0
    model = fileio.read(out / "model.h5")
    assert model.meta["config"] == net.config
    assert all(np.array_equal(model.arrays[k], v) for k, v in net.state_dict().items())
    assert golden.check(out / "model.h5") == []
    packed = tmp_path / "p.h5"
    fileformat.save_model(packed, net.state_dict(), config=net.config,
                          binary_weights=net.binary_weights(), packed_only=True)
    assert golden_cli.main([str(tmp_path / "g2"), "--weights", str(packed)]) == 2
    assert "packed-only" in capsys.readouterr().err


def test_compare_looks_at_every_element():
    e = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
    assert golden.compare(e, e.copy()) is None
    for index in (5, 11):
        a = e.copy()
        a.flat[index] += np.float32(1e-3)
        problem = golden.compare(e, a, rtol=0.0, atol=1e-4)
        assert problem is not None and problem.startswith("1 of 12 values differ"), problem
        assert f"first at {np.unravel_index(index, e.shape)}".replace("np.int64(", "") \
            .replace(")", "") in problem.replace(")", "")
    a = e.copy()
    a.flat[7] = np.nan
    assert golden.compare(e, a, atol=1.0) is not None
