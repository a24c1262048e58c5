"""refbnn.experiments.groups: FTBNN's Figure 5 at 28x28 (derived models, 1/2/4 groups)."""

import json

import numpy as np
import pytest
from one_line import run_refused
from PIL import Image

from refbnn import models
from refbnn.experiments import groups as study
from refbnn.models.budget import count

SHAPE = [1, 28, 28]


def _ops(depth, g, width, cfg):
    # the budget of the model as the preset builds it, computed here without the study's helpers
    model = models.build(f"ftbnn{depth}_g{g}", input_shape=SHAPE, num_classes=10, stem_pool=cfg.stem_pool,
                         widths=[width, 2 * width, 4 * width, 8 * width], bridge_channels=width)
    return count(model).ops


# --- the widths ------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth, g, target", [(18, 1, 0.35e6), (18, 4, 0.35e6), (18, 2, 0.30e6),
                                              (34, 2, 0.25e6)])
def test_solved_width_is_the_nearest_multiple(depth, g, target):
    cfg = study.StudyConfig()
    width, budget = study.solve_width(depth, g, target, cfg, SHAPE, 10)
    unit = max(2, g)
    assert width % unit == 0 and budget.ops == _ops(depth, g, width, cfg)
    # every multiple of the unit up to well past the target: none is nearer
    scan = {w: _ops(depth, g, w, cfg) for w in range(unit, 2 * width + unit, unit)}
    best = min(scan, key=lambda w: (abs(scan[w] - target), w))
    assert width == best


def test_narrowest_width_when_the_target_is_below_every_model():
    width, _ = study.solve_width(18, 4, 1.0, study.StudyConfig(), SHAPE, 10)
    assert width == 4


def test_default_plan_matches_budgets_within_the_width_steps():
    cfg = study.StudyConfig(depths=[18])
    entries = study.plan(cfg, SHAPE, 10)
    assert [e["groups"] for e in entries] == [1, 2, 4]
    for e in entries:
        w = e["widths"]
        assert w == [w[0], 2 * w[0], 4 * w[0], 8 * w[0]] and w[0] % max(2, e["groups"]) == 0
        assert abs(e["ops"] / (cfg.budget18 * 1e6) - 1) < 0.03, e
    text = study.format_plan(entries)
    assert text.count("\n") == 2 and "Layer=18 Group=4: widths" in text


# --- the whole study, --quick --------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("groups")
    status = study.main(["--quick", "--dataset", "mnist", "--out-dir", str(out), "--data-dir",
                         str(data_dir), "--no-download"])
    return status, out


def test_quick_study_writes_every_output(quick_run):
    status, out = quick_run
    assert status == 0
    for name in ("results.json", "results.md", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    with Image.open(out / "curves.png") as im:  # two panels side by side
        assert im.format == "PNG" and im.size[0] >= 2 * im.size[1]
    assert not list(out.glob("*.tmp"))


def test_quick_study_results(quick_run):
    _, out = quick_run
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "mnist" and results["config"]["epochs"] == 2
    assert results["train_images"] == 256 and results["test_images"] == 128
    assert results["recipe"]["epochs"] == 2 and results["recipe"]["optimizer"] == "adam"
    entries = results["models"]
    assert [(e["depth"], e["groups"]) for e in entries] == [(d, g) for d in (18, 34) for g in (1, 2, 4)]
    for e in entries:
        assert e["name"] == f"ftbnn{e['depth']}_g{e['groups']}" and e["seeds"] == [0]
        assert len(e["curve"]) == 2 and all(0 <= a <= 1 for a in e["curve"])
        assert e["curve"][-1] == e["accuracy"][0] == e["test_accuracy_per_seed"][0][-1]
        # accuracies are multiples of 1/128 (the test images)
        assert all(float(128 * a).is_integer() for a in e["curve"])
        assert e["ops"] == pytest.approx(e["flops"] + e["bops"] / 64)
        assert e["images_per_second"][0] > 0 and e["train_seconds"][0] > 0
    # 4 comparisons within a depth, 2 across depths (one seed: no interval)
    assert len(results["comparisons"]) == 6
    assert all(c["low"] is None and not c["significant"] for c in results["comparisons"])
    md = (out / "results.md").read_text().splitlines()
    assert md[0].startswith("| Layer | Group | widths | OPs (M)")
    assert sum(line.startswith("| 18 |") or line.startswith("| 34 |") for line in md) == 6


def test_seeds_are_paired_and_workers_do_not_change_the_runs(fake_mnist, tmp_path):
    # fake MNIST: 60 training, 20 test images; two seeds of two models, in-process and in two
    # worker processes: the same numbers, and every comparison pairs seed with seed
    base = ["--quick", "--dataset", "mnist", "--data-dir", str(fake_mnist), "--no-download",
            "--train-size", "0", "--test-size", "0", "--seeds", "2", "--depths", "18", "--groups", "1,4"]
    assert study.main([*base, "--out-dir", str(tmp_path / "a")]) == 0
    assert study.main([*base, "--out-dir", str(tmp_path / "b"), "--jobs", "2"]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    assert a["train_images"] == 60 and a["test_images"] == 20
    for ea, eb in zip(a["models"], b["models"]):
        assert ea["seeds"] == [0, 1]
        assert ea["test_accuracy_per_seed"] == eb["test_accuracy_per_seed"]
        assert ea["train_loss_per_seed"] == eb["train_loss_per_seed"]
    (c,) = a["comparisons"]
    g1, g4 = a["models"]
    assert c["a"] == "Layer=18: Group=4" and c["b"] == "Group=1" and c["seeds"] == [0, 1]
    assert c["differences"] == pytest.approx([100 * (x - y) for x, y in zip(g4["accuracy"], g1["accuracy"])])
    assert c["mean"] == pytest.approx(np.mean(c["differences"]))


def test_resume_reuses_matching_stored_runs_and_trains_the_rest(fake_mnist, tmp_path, capsys):
    """Every finished run is stored under runs/; --resume trains only what is missing (more seeds),
    reuses the rest unchanged, and trains again a run whose file is corrupt or whose settings
    differ. The results equal a study run in one go."""
    base = ["--quick", "--dataset", "mnist", "--data-dir", str(fake_mnist), "--no-download",
            "--train-size", "0", "--test-size", "0", "--depths", "18", "--groups", "1,4",
            "--out-dir", str(tmp_path / "r")]
    runs = tmp_path / "r" / "runs"
    assert study.main([*base, "--seeds", "1"]) == 0
    assert sorted(p.name for p in runs.iterdir()) == ["ftbnn18_g1_seed0.json", "ftbnn18_g4_seed0.json"]
    first = {p.name: p.read_bytes() for p in runs.iterdir()}
    assert study.main([*base, "--seeds", "2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert out.count("stored run reused") == 2
    second = json.loads((tmp_path / "r" / "results.json").read_text())
    assert second["runs_reused"] == 2 and len(list(runs.iterdir())) == 4
    assert all(first[name] == (runs / name).read_bytes() for name in first)  # not rewritten
    assert study.main([*base, "--seeds", "2", "--out-dir", str(tmp_path / "once")]) == 0
    once = json.loads((tmp_path / "once" / "results.json").read_text())
    for a, b in zip(second["models"], once["models"]):
        assert a["seeds"] == b["seeds"] == [0, 1]
        assert a["test_accuracy_per_seed"] == b["test_accuracy_per_seed"]
        assert a["train_loss_per_seed"] == b["train_loss_per_seed"]
    assert second["comparisons"] == once["comparisons"]
    # a truncated file is trained again; without --resume nothing is reused
    (runs / "ftbnn18_g4_seed1.json").write_text('{"settings": {')
    assert study.main([*base, "--seeds", "2", "--resume"]) == 0
    third = json.loads((tmp_path / "r" / "results.json").read_text())
    assert third["runs_reused"] == 3
    for a, b in zip(third["models"], second["models"]):  # the same numbers (times aside)
        assert a["test_accuracy_per_seed"] == b["test_accuracy_per_seed"]
        assert a["train_loss_per_seed"] == b["train_loss_per_seed"]
    assert json.loads((runs / "ftbnn18_g4_seed1.json").read_text())["run"]["seed"] == 1
    assert study.main([*base, "--seeds", "2"]) == 0
    assert json.loads((tmp_path / "r" / "results.json").read_text())["runs_reused"] == 0
    # other settings (one epoch instead of two): nothing matches
    assert study.main([*base, "--seeds", "1", "--epochs", "1", "--resume"]) == 0
    assert json.loads((tmp_path / "r" / "results.json").read_text())["runs_reused"] == 0
    assert not list(runs.glob("*.tmp"))


# --- flags: one line, exit status 2, nothing written -----------------------------------------------
@pytest.mark.parametrize("args", [
    ["--seeds", "0"], ["--epochs", "0"], ["--epochs", "x"], ["--budget18", "0"], ["--budget34", "nan"],
    ["--budget18", "-1"], ["--depths", "18,18"], ["--depths", "50"], ["--groups", "3"], ["--groups", ""],
    ["--dataset", "cifar10"], ["--train-size", "-1"], ["--test-size", "10001"], ["--jobs", "0"],
    ["--threads", "0"], ["--no-such-flag"],
])
def test_bad_arguments_one_line_exit_2(args, tmp_path):
    run_refused("refbnn.experiments.groups", "--out-dir", str(tmp_path / "out"), *args)
    assert not (tmp_path / "out").exists()


def test_out_dir_has_the_documented_default():
    assert study.parse_args([]).out_dir == "runs/groups" == study.DEFAULT_OUT_DIR


def test_unwritable_out_dir_fails_before_anything_runs(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(study, "run_study", lambda *a, **k: pytest.fail("ran before checking"))
    status = study.main(["--out-dir", str(tmp_path / "afile" / "out"), "--quick"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "--out-dir" in err and "afile" in err, err


def test_missing_data_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "train_run", lambda *a, **k: pytest.fail("trained without data"))
    status = study.main(["--out-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path), "--quick"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "fashion-mnist" in err, err


def test_train_size_beyond_the_split_is_a_one_line_error(fake_mnist, tmp_path, capsys):
    status = study.main(["--out-dir", str(tmp_path / "out"), "--dataset", "mnist", "--data-dir",
                         str(fake_mnist), "--no-download", "--train-size", "61"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "61" in err and "60" in err, err
