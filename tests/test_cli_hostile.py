"""Hostile input to the command-line tools: FIFOs and device nodes where files go, folders where
files go, empty data splits, malformed flags of the tools with their own parsers.

The house rule: a one-line ``error:``, exit status 2, no traceback, nothing hangs, nothing written
or replaced. Cases that would hang without their check run in a subprocess with a timeout.
"""

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from conftest import write_idx_gz
from one_line import one_error, run_refused

from refbnn import cli_util, crosscheck, export, fileformat, infer, models, train
from refbnn.atomicio import write_bytes_atomic

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "ftbnn18.h5"
TINY = ["--width", "0.0625", "--batch-size", "20", "--epochs", "1", "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    net = models.build("ftbnn18", seed=0, width_multiplier=0.0625, input_shape=[1, 28, 28],
                       num_classes=10)
    path = tmp_path_factory.mktemp("hostile") / "m.h5"
    fileformat.save_model(path, net.state_dict(), config=net.config, dataset="mnist",
                          binary_weights=net.binary_weights())
    return path


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def is_fifo(path) -> bool:
    return stat.S_ISFIFO(os.lstat(path).st_mode)


# --- outputs: a FIFO, a device or a folder is refused, never replaced by a plain file ---------------
def test_atomic_writers_refuse_a_fifo_or_a_folder(tmp_path, fifo):
    for write in (lambda p: write_bytes_atomic(p, b"x"), lambda p: cli_util.write_text_atomic(p, "x")):
        with pytest.raises(OSError, match="not a regular file"):
            write(fifo)
        assert is_fifo(fifo)
        with pytest.raises(OSError, match="a folder"):
            write(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]  # no temp file left


def test_export_and_budget_refuse_to_replace_a_fifo(model_file, fifo, capsys):
    from refbnn import budget

    assert export.main([str(model_file), str(fifo), "--packed-only"]) == 2
    assert "not a regular file" in one_error(capsys)
    assert budget.main(["ftbnn18", "--png", str(fifo)]) == 2
    assert "not a regular file" in capsys.readouterr().err
    assert is_fifo(fifo) and sorted(p.name for p in fifo.parent.iterdir()) == ["fifo"]


def test_export_openvino_never_writes_its_bin_over_the_source_or_itself(model_file, tmp_path, capsys):
    pytest.importorskip("openvino")
    src = tmp_path / "model.bin"  # a refbnn file named .bin: the IR's weights would go there
    src.write_bytes(model_file.read_bytes())
    assert export.main([str(src), str(tmp_path / "model.xml"), "--openvino"]) == 2
    assert "source" in one_error(capsys)
    assert fileformat.load(src).kind == "model" and not (tmp_path / "model.xml").exists()
    assert export.main([str(model_file), str(tmp_path / "out.bin"), "--openvino"]) == 2
    assert ".bin" in one_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_export_openvino_on_a_full_disk_says_so(model_file, tmp_path, monkeypatch, capsys):
    ov = pytest.importorskip("openvino")
    import shutil

    def full(*a, **k):
        raise RuntimeError("basic_ios::clear: iostream error")  # what OpenVINO says on ENOSPC

    monkeypatch.setattr(ov, "save_model", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 16, 1 << 16, 0))
    assert export.main([str(model_file), str(tmp_path / "m.xml"), "--openvino"]) == 2
    err = one_error(capsys)
    assert "cannot write" in err and "m.xml" in err and "no space left" in err, err
    assert list(tmp_path.iterdir()) == []


def test_train_refuses_a_folder_as_out_before_training(fake_mnist, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    status = train.main(["--data-dir", str(fake_mnist), "--out-dir", str(tmp_path / "run"),
                         "--out", str(tmp_path / "taken"), *TINY])
    err = one_error(capsys)
    assert status == 2 and "--out" in err and "folder" in err, err
    assert not (tmp_path / "run" / "checkpoint.h5").exists()  # refused before the first epoch


# --- inputs: a FIFO never blocks a read ---------------------------------------------------------------
def test_infer_refuses_a_fifo_image(fifo, tmp_path):
    proc = run_refused("refbnn.infer", str(SHIPPED), str(fifo), timeout=60)
    assert "not a regular file" in proc.stderr


def test_crosscheck_refuses_a_fifo_model(model_file, fifo):
    proc = run_refused("refbnn.crosscheck", str(model_file), "--against", "onnx", str(fifo), timeout=60)
    assert "not a regular file" in proc.stderr


def test_convert_refuses_a_fifo_checkpoint(fifo, tmp_path):
    pytest.importorskip("torch")
    proc = run_refused("refbnn.convert", "twin", str(fifo), str(tmp_path / "o.h5"), "--model",
                       "ftbnn18", timeout=60)
    assert "not a regular file" in proc.stderr and not (tmp_path / "o.h5").exists()


def test_crosscheck_refuses_a_non_ir_file_for_openvino(model_file, tmp_path, capsys):
    text = tmp_path / "model.xml"
    text.write_text("hello\n")  # OpenVINO would try its TensorFlow frontend (logging to stderr)
    assert crosscheck.main([str(model_file), "--against", "openvino", str(text)]) == 2
    assert "not an OpenVINO IR" in one_error(capsys)


# --- an empty data split is a data error, not a division by zero ----------------------------------
@pytest.fixture
def empty_test_split(fake_mnist):
    write_idx_gz(fake_mnist / "t10k-images-idx3-ubyte.gz", np.zeros((0, 28, 28), np.uint8))
    write_idx_gz(fake_mnist / "t10k-labels-idx1-ubyte.gz", np.zeros(0, np.uint8))
    return fake_mnist


def test_infer_and_train_on_an_empty_test_split(empty_test_split, model_file, tmp_path, capsys):
    assert infer.main([str(model_file), "--data-dir", str(empty_test_split)]) == 2
    assert "holds no images" in one_error(capsys)
    status = train.main(["--data-dir", str(empty_test_split), "--out-dir", str(tmp_path / "run"), *TINY])
    assert status == 2 and "holds no images" in one_error(capsys)
    assert not (tmp_path / "run" / "checkpoint.h5").exists()


# --- the tools with their own parsers: one line, exit 2 ----------------------------------------------
@pytest.mark.parametrize(("flag", "value"), [("--batch", "abc"), ("--batch", "1e30"),
                                             ("--batch", "100000000"), ("--seed", "-1"),
                                             ("--seed", "x")])
def test_crosscheck_flags_are_one_line(model_file, capsys, flag, value):
    assert crosscheck.main([str(model_file), "--against", "torch", flag, value]) == 2
    assert flag in one_error(capsys)


@pytest.mark.parametrize(("argv", "flag"), [
    (["twin", "{ckpt}", "{out}", "--model", "ftbnn18", "--width-multiplier", "abc"], "--width-multiplier"),
    (["twin", "{ckpt}", "{out}", "--model", "ftbnn18", "--input-shape", "0,1,1"], "--input-shape"),
    (["twin", "{ckpt}", "{out}", "--config", "{dir}"], "--config"),
    (["bireal", "{ckpt}", "{out}", "--sign-at-zero", "5"], "--sign-at-zero"),
    (["bireal", "{dir}", "{out}"], "argument checkpoint"),
    (["nosuch"], "source"),
])
def test_convert_flags_are_one_line(tmp_path, capsys, argv, flag):
    from refbnn import convert

    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"not read")
    names = {"ckpt": str(ckpt), "out": str(tmp_path / "o.h5"), "dir": str(tmp_path)}
    assert convert.main([a.format(**names) for a in argv]) == 2
    assert flag in one_error(capsys)
    assert not (tmp_path / "o.h5").exists()


@pytest.mark.parametrize(("flag", "value"), [("--seed", "-5"), ("--seed", "1e3"), ("--epochs", "abc")])
def test_train_torch_flags_are_one_line(monkeypatch, capsys, flag, value):
    pytest.importorskip("torch")
    from refbnn.interop import train_torch

    def started(*a, **k):
        raise AssertionError("work started although a flag is bad")

    monkeypatch.setattr(train_torch, "plan_run", started)
    assert train_torch.main([flag, value]) == 2
    assert flag in one_error(capsys)



@pytest.mark.parametrize("name", ["folder", "folder/bin/manifest.json", "fifo.npz"])
def test_golden_check_names_a_non_file_as_such(tmp_path, capsys, name):
    from refbnn.golden import cli as golden_cli

    (tmp_path / "folder" / "bin" / "manifest.json").mkdir(parents=True)
    os.mkfifo(tmp_path / "fifo.npz")
    assert golden_cli.main(["--check", str(tmp_path / name)]) == 2
    assert "not a regular file" in one_error(capsys)  # it exists: not "no such file"
