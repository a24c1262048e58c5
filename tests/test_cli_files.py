"""What the CLIs write and read: umask modes, stale temps, output = input, a full disk, --data-dir."""

import errno
import os
import resource
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from refbnn import cli_util, export, fileformat, models, train
from refbnn.data import DataError
from refbnn.plot import save_png
from refbnn.training.recipe import Recipe
from refbnn.training.trainer import make_optimizer


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_text_and_png_honour_the_umask(tmp_path, umask_027):
    cli_util.write_text_atomic(tmp_path / "a.txt", "x")
    save_png(Image.new("RGB", (4, 4)), tmp_path / "a.png")
    for name in ("a.txt", "a.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == umask_027, name
    os.umask(0o022)
    cli_util.write_text_atomic(tmp_path / "a.txt", "y")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert (tmp_path / "a.txt").read_text() == "y"


def test_stale_temps_of_the_same_target_only_are_removed(tmp_path):
    stale = ["metrics.jsonl.0a1b2c3d.tmp", "metrics.jsonl.k_x9ab7q.tmp"]  # ours, older mkstemp
    keep = ["metrics.jsonl", "other.jsonl.0a1b2c3d.tmp", "metrics.jsonl.0a1b2c3.tmp",
            "metrics.jsonl.0a1b2c3d.tmp.bak", "xmetrics.jsonl.0a1b2c3d.tmp",
            "metrics.jsonl.tmp-0a1b2c3d4e5f6a7b"]  # the last: the .h5 writer's pattern
    for name in stale + keep:
        (tmp_path / name).write_text("old")
    (tmp_path / "metrics.jsonl.deadbeef.tmp").mkdir()  # not a file: left alone
    cli_util.write_text_atomic(tmp_path / "metrics.jsonl", "new\n")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(keep + ["metrics.jsonl.deadbeef.tmp"]), left
    assert (tmp_path / "metrics.jsonl").read_text() == "new\n"
    (tmp_path / "curves.png.abcdef12.tmp").write_bytes(b"half")
    save_png(Image.new("RGB", (4, 4)), tmp_path / "curves.png")
    assert not (tmp_path / "curves.png.abcdef12.tmp").exists()


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")

    class Boom(Exception):
        pass

    with pytest.raises(Boom), cli_util.atomic_open(target) as f:
        f.write("half")
        raise Boom
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_same_file_sees_through_links(tmp_path):
    a = tmp_path / "a.h5"
    a.write_text("x")
    os.symlink(a, tmp_path / "s.h5")
    os.link(a, tmp_path / "h.h5")
    assert cli_util.same_file(a, tmp_path / "s.h5") and cli_util.same_file(a, tmp_path / "h.h5")
    assert cli_util.same_file(a, tmp_path / "sub" / ".." / "a.h5")
    assert not cli_util.same_file(a, tmp_path / "b.h5")
    assert cli_util.same_file(tmp_path / "new.h5", tmp_path / "." / "new.h5")  # neither exists


# --- output = input -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    net = models.build("ftbnn18", seed=0, width_multiplier=0.0625, input_shape=[1, 28, 28], num_classes=10)
    path = tmp_path_factory.mktemp("m") / "m.h5"
    fileformat.save_model(path, net.state_dict(), config=net.config, binary_weights=net.binary_weights())
    return path


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "dotted"])
def test_export_refuses_to_replace_its_source(model_file, tmp_path, capsys, how):
    src = tmp_path / "M.h5"
    src.write_bytes(model_file.read_bytes())
    dst = {"same": src, "dotted": tmp_path / "." / "M.h5"}.get(how, tmp_path / "link.h5")
    if how == "symlink":
        os.symlink(src, dst)
    elif how == "hardlink":
        os.link(src, dst)
    before = src.read_bytes()
    assert export.main([str(src), str(dst), "--packed-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "source" in err, err
    assert src.read_bytes() == before and fileformat.load(src).kind == "model"


def _checkpoint(path, net, rng_state=None, provenance=None):
    hparams = make_optimizer(net, Recipe()).state_dict()["hparams"]
    fileformat.save_checkpoint(path, net.state_dict(), config=net.config, optimizer_state={},
                               optimizer_hyperparameters=hparams, rng_state=rng_state, epoch=0,
                               history=[], binary_weights=net.binary_weights(), provenance=provenance,
                               dataset="mnist")


@pytest.mark.parametrize("how", ["same", "symlink"])
def test_train_refuses_out_equal_to_resume(tmp_path, capsys, how):
    net = models.build("ftbnn18", seed=0, width_multiplier=0.0625, input_shape=[1, 28, 28], num_classes=10)
    ckpt = tmp_path / "ck.h5"
    rng = {"bit_generator": np.random.default_rng(0).bit_generator.state, "batches_done": 0}
    _checkpoint(ckpt, net, rng, {"run": {"recipe": {}}})
    out = ckpt if how == "same" else tmp_path / "link.h5"
    if how == "symlink":
        os.symlink(ckpt, out)
    before = ckpt.read_bytes()
    assert train.main(["--resume", str(ckpt), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err and "--resume" in err, err
    assert ckpt.read_bytes() == before


@pytest.mark.parametrize(("provenance", "rng", "words"), [
    (None, None, ["run.recipe"]),                              # save_checkpoint's own defaults
    ({"run": {"recipe": {}}}, None, ["RNG state"]),
    ({"run": {"recipe": {"lr": "fast"}}}, {"bit_generator": {}}, ["recipe lr"]),
    ({"run": {"recipe": {"warp": 9}}}, {"bit_generator": {}}, ["warp"]),
    ({"run": {"recipe": {}}}, {"bit_generator": {"bad": 1}, "batches_done": 0}, ["generator state"]),
    ({"run": {"recipe": {}}}, {"bit_generator": {}, "batches_done": 10**9}, ["batches_done"]),
])
def test_resume_of_a_bare_checkpoint_is_one_line(tmp_path, capsys, provenance, rng, words, data_dir):
    net = models.build("ftbnn18", seed=0, width_multiplier=0.0625, input_shape=[1, 28, 28], num_classes=10)
    ckpt = tmp_path / "ck.h5"
    _checkpoint(ckpt, net, rng, provenance)
    status = train.main(["--resume", str(ckpt), "--quiet", "--threads", "1", "--data-dir",
                         str(data_dir), "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "o" / "model.h5").exists()


# --- a full disk (RLIMIT_FSIZE: writes past the limit fail with EFBIG, as ENOSPC would) --------------
def run_limited(args, cwd, limit_bytes, timeout=300):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          preexec_fn=limit, timeout=timeout, env=dict(os.environ))


def assert_one_line_no_partial(r, folder, progress_lines: int = 0):
    """A failed write: non-zero exit (no signal), one ``error:`` line after ``progress_lines`` lines
    of progress, no traceback, no temp file left."""
    assert r.returncode > 0, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == progress_lines + 1 and lines[-1].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert not [p.name for p in folder.rglob("*") if ".tmp" in p.name]


def test_text_write_on_a_full_disk(tmp_path):
    code = ("import sys; from refbnn import cli_util\n"
            "try:\n    cli_util.write_text_atomic('big.txt', 'x' * 100000)\n"
            "except OSError as e:\n    sys.exit(cli_util.fail(e))\n")
    r = run_limited(["-c", code], tmp_path, 4096)
    assert_one_line_no_partial(r, tmp_path)
    assert not (tmp_path / "big.txt").exists()


def _export_full(model_file, tmp_path):
    return run_limited(["-m", "refbnn.export", str(model_file), "small.h5", "--packed-only"], tmp_path,
                       20_000)


def _golden_full(tmp_path):
    return run_limited(["-m", "refbnn.golden", "g", "--model", "ftbnn18_purified", "--batch", "2"],
                       tmp_path, 100_000)


def _train_full(fake_mnist, tmp_path):
    return run_limited(["-m", "refbnn.train", "--data-dir", str(fake_mnist), "--out-dir", "run",
                        "--width", "0.0625", "--batch-size", "20", "--epochs", "1", "--quiet",
                        "--threads", "1"], tmp_path, 30_000)


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_cli_turns_a_failed_write_into_one_line(model_file, fake_mnist, tmp_path, monkeypatch, capsys):
    from refbnn import golden
    from refbnn.golden import cli as golden_cli

    monkeypatch.setattr(fileformat, "export_packed", _enospc)
    assert export.main([str(model_file), str(tmp_path / "s.h5"), "--packed-only"]) == 2
    monkeypatch.setattr(golden, "generate", _enospc)
    assert golden_cli.main([str(tmp_path / "g"), "--model", "ftbnn18_purified"]) == 2
    monkeypatch.setattr(fileformat, "save_checkpoint", _enospc)
    assert train.main(["--data-dir", str(fake_mnist), "--out-dir", str(tmp_path / "run"), "--width",
                       "0.0625", "--batch-size", "30", "--epochs", "1", "--quiet", "--threads", "1"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and all("cannot write" in e and "No space left" in e for e in errors), errors
    assert not (tmp_path / "run" / "model.h5").exists()


def test_export_on_a_full_disk(model_file, tmp_path):
    assert_one_line_no_partial(_export_full(model_file, tmp_path), tmp_path)


def test_golden_on_a_full_disk(tmp_path):
    assert_one_line_no_partial(_golden_full(tmp_path), tmp_path)


def test_train_on_a_full_disk(fake_mnist, tmp_path):
    # the start line and the epoch line come before the failed save of the first checkpoint
    assert_one_line_no_partial(_train_full(fake_mnist, tmp_path), tmp_path, progress_lines=2)


# --- --data-dir means that folder -------------------------------------------------------------------------
def test_data_dir_without_the_data_is_an_error(tmp_path, fake_mnist, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("REFBNN_DATA_DIR", str(fake_mnist.parent))  # would hold it: not used
    with pytest.raises(DataError, match="--data-dir"):
        cli_util.load_split("mnist", "train", empty, download=True)
    ds, folder = cli_util.load_split("mnist", "train", fake_mnist.parent)  # DIR/mnist/ is searched
    assert folder == fake_mnist and len(ds) == 60
    ds, folder = cli_util.load_split("mnist", "test", fake_mnist)
    assert folder == fake_mnist and len(ds) == 20
    ds, folder = cli_util.load_split("mnist", "test")  # no --data-dir: the usual lookup
    assert folder == fake_mnist


def test_train_and_infer_with_a_wrong_data_dir(tmp_path, fake_mnist, model_file, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("REFBNN_DATA_DIR", str(fake_mnist.parent))
    assert train.main(["--data-dir", str(empty), "--out-dir", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(empty) in err and "--data-dir" in err, err
    from refbnn import infer

    with_dataset = tmp_path / "d.h5"
    f = fileformat.load(model_file)
    fileformat.save_model(with_dataset, f.state_dict, config=f.config, dataset="mnist",
                          binary_weights={n: {"groups": b.groups} for n, b in f.binary.items()})
    assert infer.main([str(with_dataset), "--data-dir", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(empty) in err, err


def test_infer_no_download(tmp_path, model_file, monkeypatch, capsys):
    from refbnn import infer
    from refbnn.data import download

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("REFBNN_DATA_DIR", raising=False)
    monkeypatch.setattr(download, "OPENER", lambda url, timeout: pytest.fail("downloaded"))
    with_dataset = tmp_path / "d.h5"
    f = fileformat.load(model_file)
    fileformat.save_model(with_dataset, f.state_dict, config=f.config, dataset="mnist",
                          binary_weights={n: {"groups": b.groups} for n, b in f.binary.items()})
    assert infer.main([str(with_dataset), "--no-download"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "download disabled" in err, err


def test_the_start_line_names_the_data_folder(fake_mnist, tmp_path, capsys):
    status = train.main(["--data-dir", str(fake_mnist.parent), "--out-dir", str(tmp_path / "o"),
                         "--width", "0.0625", "--batch-size", "30", "--epochs", "1", "--quiet",
                         "--threads", "1"])
    err = capsys.readouterr().err
    assert status == 0, err
    assert f"on mnist from {fake_mnist}:" in err.splitlines()[0]
