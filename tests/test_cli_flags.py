"""One rule for every CLI: each flag checked before any work, one line naming it, exit status 2.

Every value-taking flag of every CLI is tried with NaN, infinities, a wrong type, an empty string
and the out-of-range values listed for it; the work each CLI would start (data loading, model
building, writing) is replaced by a failure, so a value accepted by mistake fails the test.
``test_every_flag_is_covered`` keeps the table complete when a flag is added.
"""

import argparse

import pytest

from refbnn import budget, cli_util, export, infer, predictor, train
from refbnn.experiments import groups, nonlinearity
from refbnn.golden import cli as golden_cli

GENERIC = ["nan", "inf", "-inf", "abc", "", "1e400"]
NUMERIC = {"int", "float"}
# cli -> (positional arguments, {flag: (kind, extra bad values)})
TABLE = {
    "train": (train, [], {
        "--dataset": ("choice", ["cifar-100"]),
        "--data-dir": ("path", ["{missing}"]),
        "--model": ("choice", ["resnet50"]),
        "--width": ("float", ["0", "-1", "1e9", "4.5"]),
        "--epochs": ("int", ["0", "-1", "1.5", "1000000"]),
        "--batch-size": ("int", ["0", "-3", "5000"]),
        "--optimizer": ("choice", ["lamb"]),
        "--lr": ("float", ["0", "-1"]),
        "--momentum": ("float", ["-0.1", "1.5"]),
        "--weight-decay": ("float", ["-1"]),
        "--schedule": ("choice", ["exp"]),
        "--warmup-epochs": ("float", ["-3", "11"]),  # at most --epochs (10)
        "--step-epochs": ("int", ["-1", "1.5"]),
        "--label-smoothing": ("float", ["-1", "2", "1.01"]),
        "--augment": ("int", ["-1", "28", "1000"]),
        "--seed": ("int", ["-1", str(2**63)]),
        "--threads": ("int", ["0", "-1", "5000"]),
        "--out-dir": ("path", ["{file}/run"]),
        "--out": ("path", ["{file}/model.h5"]),
        "--resume": ("path", ["{missing}", "{dir}"]),
        "--stop-after": ("int", ["0", "-1"]),
        "--limit-train": ("int", ["0", "-1"]),
        "--limit-test": ("int", ["0", "-2"]),
    }),
    "infer": (infer, ["{model}"], {
        "--engine": ("choice", ["gpu"]),
        "--stem": ("choice", ["fp16", "BF16"]),
        "--top-k": ("int", ["0", "-1"]),
        "--invert": ("choice", ["maybe"]),
        "--data-dir": ("path", ["{missing}"]),
        "--batch-size": ("int", ["0", "100000"]),
        "--latency-runs": ("int", ["0", "-5"]),
        "--threads": ("int", ["0", "5000"]),
    }),
    "export": (export, ["{model}", "{dst}", "--onnx"], {
        "--batch": ("int", ["0", "-1", "5000"]),
    }),
    "golden": (golden_cli, ["{dst}"], {
        "--check": ("files", []),
        "--model": ("choice", ["resnet50"]),
        "--weights": ("path", ["{missing}"]),
        "--seed": ("int", ["-1", str(2**32)]),
        "--batch": ("int", ["0", "1", "100000"]),
        "--input-shape": ("shape", ["0,12,12", "1,12", "1,1000,1000", "1,12,x"]),
        "--width": ("float", ["0", "-1", "1e9"]),
        "--num-classes": ("int", ["0", "-1", "1000000000"]),
        "--format": ("choice", ["xml"]),
        "--max-bytes": ("int", ["0", "-1"]),
    }),
    "budget": (budget, ["ftbnn18"], {
        "--input-shape": ("shape", ["0,28,28", "3,99999,99999", "a,b,c"]),
        "--num-classes": ("int", ["0", "-1", "1000000000"]),
        "--width-multiplier": ("float", ["0", "-1", "1e9"]),
        "--png": ("path", ["{file}/x.png"]),
    }),
    "nonlinearity": (nonlinearity, [], {
        "--out-dir": ("path", ["{file}/out"]),
        "--data-dir": ("path", ["{missing}"]),
        "--seeds": ("int", ["0", "-1", "100000"]),
        "--epochs": ("int", ["0", "-1"]),
        "--batch-size": ("int", ["1", "0", "100000"]),
        "--lr": ("float", ["0", "-1"]),
        "--width": ("int", ["0", "100000"]),
        "--train-size": ("int", ["-5", "60001"]),
        "--test-size": ("int", ["-1", "10001"]),
        "--models": ("list", ["linear,cnn", ",", "relu,relu"]),
        "--jobs": ("int", ["0", "-2"]),
        "--threads": ("int", ["0", "-1"]),
    }),
    "groups": (groups, [], {
        "--dataset": ("choice", ["cifar10"]),
        "--out-dir": ("path", ["{file}/out"]),
        "--data-dir": ("path", ["{missing}"]),
        "--seeds": ("int", ["0", "-1", "101"]),
        "--epochs": ("int", ["0", "-1"]),
        "--train-size": ("int", ["-1", "60001"]),
        "--test-size": ("int", ["-1", "10001"]),
        "--budget18": ("float", ["0", "-1", "1001"]),
        "--budget34": ("float", ["0", "-0.5"]),
        "--depths": ("list", ["18,18", "50", ",", ""]),
        "--groups": ("list", ["3", "1,1", "1,,2"]),
        "--jobs": ("int", ["0", "-2"]),
        "--threads": ("int", ["0", "-1"]),
    }),
}


def cases():
    for cli, (_, _, flags) in TABLE.items():
        for flag, (kind, extra) in flags.items():
            values = (GENERIC if kind in NUMERIC else []) + extra
            for v in values:
                yield pytest.param(cli, flag, v, id=f"{cli} {flag} {v!r}")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from refbnn import fileformat, models

    d = tmp_path_factory.mktemp("flags")
    net = models.build("ftbnn18", seed=0, width_multiplier=0.0625, input_shape=[1, 28, 28], num_classes=10)
    fileformat.save_model(d / "m.h5", net.state_dict(), config=net.config,
                          binary_weights=net.binary_weights())
    (d / "afile").write_text("x")
    return {"model": str(d / "m.h5"), "dst": str(d / "out"), "file": str(d / "afile"),
            "missing": str(d / "missing"), "dir": str(d)}


@pytest.fixture
def no_work(monkeypatch):
    """Every CLI's first piece of real work fails the test: a flag must be refused before it."""
    def started(*a, **k):
        raise AssertionError("work started although a flag is bad")

    monkeypatch.setattr(cli_util, "load_split", started)
    monkeypatch.setattr(predictor, "load", started)
    from refbnn import fileformat, golden
    monkeypatch.setattr(fileformat, "export_packed", started)
    monkeypatch.setattr(export, "export_onnx_file", started)
    monkeypatch.setattr(golden, "generate", started)
    monkeypatch.setattr(golden_cli, "load_model", started)
    monkeypatch.setattr(budget, "count", started)
    monkeypatch.setattr(nonlinearity, "run_study", started)
    monkeypatch.setattr(groups, "run_study", started)


@pytest.mark.parametrize(("cli", "flag", "value"), list(cases()))
def test_bad_flag_value_is_one_line_naming_the_flag(cli, flag, value, files, no_work, capsys,
                                                    tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output folders land here, if any
    module, positional, _ = TABLE[cli]
    value = value.format(**files)
    argv = [p.format(**files) for p in positional] + [flag, value]
    status = module.main(argv)
    err = capsys.readouterr().err
    assert status == 2, (status, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert flag in err, err


@pytest.mark.parametrize("cli", list(TABLE))
def test_every_flag_is_covered(cli):
    module, _, flags = TABLE[cli]
    parser = module.build_parser()
    taking_values = {a.option_strings[-1] if a.option_strings[-1].startswith("--") else a.option_strings[0]
                     for a in parser._actions if a.option_strings and a.nargs != 0
                     and not isinstance(a, argparse.BooleanOptionalAction)}
    assert taking_values == set(flags), taking_values ^ set(flags)


@pytest.mark.parametrize(("argv", "flag"), [
    (["--schedule", "step"], "--step-epochs"),           # the step schedule needs its step
    (["--nesterov"], "--nesterov"),                       # Adam has no Nesterov momentum
    (["--epochs", "2", "--warmup-epochs", "3"], "--warmup-epochs"),
    (["--resume", "{model}", "--lr", "0.1"], "--lr"),     # the checkpoint's recipe is continued
    (["--resume", "{model}", "--limit-train", "5"], "--limit-train"),
])
def test_flags_that_conflict_name_one_of_them(argv, flag, files, no_work, capsys):
    status = train.main([a.format(**files) for a in argv])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and flag in err, err


def test_help_is_exit_0_everywhere(capsys):
    for module, _, _ in TABLE.values():
        assert module.main(["--help"]) == 0
    assert "--invert" in capsys.readouterr().out


# --- the typed argparse values of cli_util ------------------------------------------------------------
def test_int_and_float_types_state_their_range():
    t = cli_util.int_in(1, 5)
    assert t("5") == 5 and t(" 1") == 1
    for bad in ("0", "6", "2.0", "x", "1e3"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"an integer in \[1, 5\]"):
            t(bad)
    f = cli_util.float_in(0.0, 1.0, lo_open=True)
    assert f("1") == 1.0 and f("1e-300") == 1e-300
    for bad in ("0", "1.0000001", "nan", "inf", "-inf", "1e400", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"a finite number in \(0, 1\]"):
            f(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="> 0"):
        cli_util.positive_float("-0.0")
    assert cli_util.nonnegative_float("-0.0") == 0.0


def test_one_range_for_the_cli_and_for_recipe_check():
    from refbnn.training.recipe import LIMITS, Recipe, RecipeError

    for field, accepted in LIMITS.items():
        assert train.build_parser()._option_string_actions[train.flag(field)].type is accepted
    assert Recipe().check() == Recipe()
    for field, value in [("lr", float("inf")), ("augment", 1000), ("label_smoothing", float("nan")),
                         ("epochs", 2.0), ("batch_size", True), ("momentum", "0.9")]:
        with pytest.raises(RecipeError, match=field):
            Recipe(**{field: value}).check()


def test_cli_defaults_are_the_recipe_defaults():
    # issue 13: one set of defaults, the measured one the shipped model was trained with
    from refbnn import fileformat
    from refbnn.training.recipe import Recipe

    args = train.parse_args([])
    assert args.recipe == Recipe()
    shipped = fileformat.load(train.__file__.rsplit("/refbnn/", 1)[0] + "/weights/ftbnn18.h5")
    assert shipped.provenance["run"]["recipe"] == Recipe().to_dict()
    assert (Recipe().batch_size, Recipe().lr, Recipe().augment) == (128, 3e-3, 2)
