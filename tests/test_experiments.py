"""refbnn.experiments.nonlinearity: the MNIST study of non-linearity (FTBNN Figure 2)."""

import json

import numpy as np
import pytest
from one_line import run_refused
from PIL import Image

from refbnn import nn
from refbnn.data import batches, load_dataset, subset
from refbnn.experiments import nonlinearity as study
from refbnn.models.diagnostics import binary_input_stats

MODELS = ["linear", "binary", "prelu", "relu"]
FIGURES = ["features.png", "discrepancy.png"] + [f"features-{m}.png" for m in MODELS]


# --- the whole study, --quick, on real MNIST -----------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("nonlin")
    status = study.main(["--quick", "--out-dir", str(out), "--data-dir", str(data_dir),
                         "--no-download"])
    return status, out


def test_quick_study_writes_every_output(quick_run):
    status, out = quick_run
    assert status == 0
    for name in ["results.json", "results.md", *FIGURES]:
        assert (out / name).stat().st_size > 0, name
    for name in FIGURES:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and min(im.size) >= 200
    assert not list(out.glob("*.tmp"))


def test_quick_study_table_is_well_formed(quick_run):
    _, out = quick_run
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == MODELS
    assert results["config"]["seeds"] == 2 and results["config"]["epochs"] == 1
    for entry in results["models"].values():
        assert entry["seeds"] == [0, 1]
        assert all(0.0 <= a <= 1.0 for a in entry["accuracy"])
        assert entry["accuracy_mean"] == pytest.approx(np.mean(entry["accuracy"]))
        assert entry["accuracy_std"] == pytest.approx(np.std(entry["accuracy"], ddof=1))
        assert len(entry["curve_epoch"]) == len(entry["curve_discrepancy"]) >= 2
        assert entry["curve_epoch"][0] == 0.0 and entry["curve_epoch"][-1] == 1.0
    lines = (out / "results.md").read_text().strip().splitlines()
    table = lines[:2 + len(MODELS)]
    assert all(line.startswith("|") and line.endswith("|") and line.count("|") == 5
               for line in table)
    assert [line.split("|")[1].strip() for line in table[2:]] == ["Linear", "Binary", "PReLU", "ReLU"]
    assert lines[2 + len(MODELS):4 + len(MODELS)] == ["", "Test accuracy (%) per seed:"]


def test_quick_study_paired_comparisons(quick_run):
    # every difference is a - b of the two models' own per-seed values, seed by seed
    _, out = quick_run
    results = json.loads((out / "results.json").read_text())
    models, comparisons = results["models"], results["comparisons"]
    names = {entry["name"]: key for key, entry in models.items()}
    pairs = [(c["a"], c["b"]) for c in comparisons["accuracy"]]
    assert pairs == [("PReLU", "Binary"), ("ReLU", "Binary"), ("Binary", "Linear"), ("ReLU", "PReLU")]
    for key, scale in (("accuracy", 100.0), ("discrepancy", 1.0)):
        for c in comparisons[key]:
            a, b = models[names[c["a"]]], models[names[c["b"]]]
            assert c["seeds"] == a["seeds"] == b["seeds"] == [0, 1]
            expected = [scale * (x - y) for x, y in zip(a[key], b[key])]
            assert c["differences"] == pytest.approx(expected, abs=1e-12)
            assert c["low"] <= c["mean"] <= c["high"]
            assert c["significant"] == (c["low"] > 0 or c["high"] < 0)
    md = (out / "results.md").read_text()
    assert md.count("- PReLU - Binary: ") == 2 and "| difference (points) |" in md


def test_quick_study_discrepancy_zero_without_binarization(quick_run):
    _, out = quick_run
    models = json.loads((out / "results.json").read_text())["models"]
    linear = models["linear"]
    assert linear["discrepancy"] == [0.0, 0.0] and linear["relative_error"] == [0.0, 0.0]
    assert set(linear["curve_discrepancy"]) == {0.0}
    for name in ("binary", "prelu", "relu"):
        assert min(models[name]["discrepancy"]) > 0 and min(models[name]["relative_error"]) > 0
        assert min(models[name]["curve_discrepancy"]) > 0


def test_parallel_workers_give_the_same_runs(quick_run, data_dir, tmp_path):
    # every run is a pure function of (model, seed, data, recipe): two worker processes must
    # reproduce the in-process runs exactly
    _, out = quick_run
    status = study.main(["--quick", "--out-dir", str(tmp_path), "--data-dir", str(data_dir),
                         "--no-download", "--models", "binary,linear", "--jobs", "2"])
    assert status == 0
    serial = json.loads((out / "results.json").read_text())["models"]
    parallel = json.loads((tmp_path / "results.json").read_text())["models"]
    assert list(parallel) == ["binary", "linear"]
    for name in parallel:
        for key in ("accuracy", "discrepancy", "relative_error", "curve_discrepancy"):
            assert parallel[name][key] == serial[name][key], (name, key)


# --- bad arguments: one line, exit status 2 ------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["--seeds", "0"], ["--epochs", "-1"], ["--lr", "0"], ["--batch-size", "1"], ["--width", "0"],
    ["--models", "linear,cnn"], ["--train-size", "-5"], ["--threads", "0"], ["--jobs", "0"],
    ["--seeds", "two"],
    ["--no-such-flag"],
])
def test_bad_arguments_one_line_exit_2(args, tmp_path):
    run_refused("refbnn.experiments.nonlinearity", "--out-dir", str(tmp_path / "out"), *args)
    assert not (tmp_path / "out").exists()


def test_out_dir_has_the_readme_default():
    # the README runs `python -m refbnn.experiments.nonlinearity` with no flag at all
    assert study.parse_args([]).out_dir == "runs/nonlinearity" == study.DEFAULT_OUT_DIR


def test_unwritable_out_dir_fails_before_any_training(tmp_path, data_dir, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(study, "train_run", lambda *a, **k: pytest.fail("trained before checking"))
    status = study.main(["--out-dir", str(tmp_path / "afile" / "out"), "--data-dir", str(data_dir),
                         "--no-download", "--quick"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "--out-dir" in err and "afile" in err, err


def test_train_size_beyond_the_split_is_a_one_line_error(data_dir, tmp_path, capsys):
    status = study.main(["--out-dir", str(tmp_path), "--data-dir", str(data_dir), "--no-download",
                         "--train-size", "60001"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "60001" in err


# --- the measurement -----------------------------------------------------------------------------
def test_standardize_per_channel():
    a = np.array([1.0, 3.0, 5.0, 5.0, 7.0, 7.0]).reshape(1, 3, 1, 2)
    z = study.standardize(a)
    # channel 0: mean 2, population std 1; channel 1 is constant -> 0; channel 2 as channel 0
    assert z.ravel().tolist() == [-1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    a[0, 2] = [6.0, 8.0]
    assert study.standardize(a).ravel().tolist() == [-1.0, 1.0, 0.0, 0.0, -1.0, 1.0]


def _binary_conv(seed, cin=4, cout=5):
    nn.init.manual_seed(seed)
    return nn.BinaryConv2d(cin, cout, 3, padding=1, scale="none")


def test_discrepancy_zero_when_nothing_is_lost_by_binarization():
    # latent weights already +-1 and inputs already +-1: sign() changes nothing, so the binary
    # output equals the real convolution exactly and both measures are 0
    conv = _binary_conv(0)
    conv.weight.data = np.where(conv.weight.data >= 0, 1.0, -1.0).astype(np.float32)
    rng = np.random.default_rng(1)
    x = np.where(rng.standard_normal((3, 4, 6, 6)) >= 0, 1.0, -1.0).astype(np.float32)
    assert study.slot_discrepancy(conv, x) == (0.0, 0.0)


def test_discrepancy_positive_and_scale_free_for_real_inputs():
    conv = _binary_conv(2)
    x = np.random.default_rng(3).standard_normal((3, 4, 6, 6)).astype(np.float32)
    disc, rel = study.slot_discrepancy(conv, x)
    assert disc > 0.05 and rel > 0.05
    # a positive per-channel factor on the latent weights keeps every sign and scales the real
    # output per channel, which the standardisation removes (float64 statistics: ~1e-7 slack)
    conv.weight.data = conv.weight.data * np.linspace(0.5, 3.0, 5, dtype=np.float32)[:, None, None, None]
    assert study.slot_discrepancy(conv, x)[0] == pytest.approx(disc, rel=1e-5)


def test_real_conv_slots_have_zero_discrepancy():
    model = study.build_model("linear", 4)
    x = np.random.default_rng(4).standard_normal((6, 1, 28, 28)).astype(np.float32)
    assert study.discrepancy(model, x) == (0.0, 0.0)
    assert len(study.conv_slots(model)) == 4
    assert all(isinstance(conv, nn.Conv2d) for _, conv in study.conv_slots(model))


# --- the architecture ----------------------------------------------------------------------------
@pytest.mark.parametrize("variant", MODELS)
def test_shapes_and_two_dimensional_features(variant):
    model = study.build_model(variant, 4)
    x = np.random.default_rng(5).standard_normal((3, 1, 28, 28)).astype(np.float32)
    assert model.features.forward(x).shape == (3, 2)
    assert model.forward(x).shape == (3, 10)
    binary = [c for _, c in study.conv_slots(model) if isinstance(c, nn.BinaryConv2d)]
    assert len(binary) == (0 if variant == "linear" else 4)


def test_linear_model_is_affine():
    # eval mode, float64: f(a x1 + (1 - a) x2) == a f(x1) + (1 - a) f(x2) up to rounding
    model = study.build_model("linear", 4)
    model.eval()
    rng = np.random.default_rng(6)
    x1, x2 = rng.standard_normal((2, 2, 1, 28, 28))
    a = 0.3
    mixed = model.forward(a * x1 + (1 - a) * x2)
    assert np.allclose(mixed, a * model.forward(x1) + (1 - a) * model.forward(x2), rtol=0, atol=1e-9)


def test_binary_model_is_not_affine():
    model = study.build_model("binary", 4)
    model.eval()
    rng = np.random.default_rng(6)
    x1, x2 = rng.standard_normal((2, 2, 1, 28, 28))
    mixed = model.forward(0.3 * x1 + 0.7 * x2)
    assert not np.allclose(mixed, 0.3 * model.forward(x1) + 0.7 * model.forward(x2), atol=1e-3)


@pytest.mark.parametrize("variant", ["binary", "prelu", "relu"])
def test_no_binary_conv_is_dead_on_mnist(variant, data_dir):
    # the ReLU trap (docs/models.md): the non-linearity sits before the add, so every sign()
    # still sees both signs. Train mode (batch statistics, as in training); in eval mode an
    # untrained BN is the identity and the ReLU branch adds raw non-negative accumulators, so only
    # "not constant" is required there.
    test = subset(load_dataset("mnist", "test", data_dir=data_dir, download=False), 64)
    x, _ = next(batches(test, 64, np.random.default_rng(0), shuffle=False))
    model = study.build_model(variant, 8)
    stats = binary_input_stats(model, x, mode="train")
    assert len(stats) == 4
    for s in stats:
        assert not s.dead and 0.05 < s.positive_fraction < 0.95, s
    assert not any(s.dead for s in binary_input_stats(model, x, mode="eval"))


def test_same_seed_same_initial_weights_in_every_model():
    # the pairing by seed: the four models draw the same initial weights (PReLU adds its slopes,
    # which are constant), and fit's seed fixes the batch order
    states = {}
    for variant in MODELS:
        nn.init.manual_seed(3)
        states[variant] = study.build_model(variant, 6).state_dict()
    ref = states["binary"]
    for variant, state in states.items():
        assert set(ref) <= set(state), variant
        for key in ref:
            assert np.array_equal(state[key], ref[key]), (variant, key)
    nn.init.manual_seed(4)
    assert not np.array_equal(study.build_model("binary", 6).state_dict()["features.0.weight"],
                              ref["features.0.weight"])
