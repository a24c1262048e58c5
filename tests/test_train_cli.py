"""`python -m refbnn.train`: learning, bit-identical resume, Ctrl-C, and every failure path."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from refbnn import fileformat, models, train
from refbnn.data import load_dataset, subset
from refbnn.training import trainer as trainer_mod
from refbnn.training.trainer import Recipe, Trainer

TINY = ["--width", "0.0625", "--batch-size", "50", "--limit-train", "200", "--limit-test", "100",
        "--quiet", "--threads", "1"]


def run_cli(args, tmp_path, **kw):
    env = dict(os.environ, **kw.pop("env", {}))
    return subprocess.run([sys.executable, "-m", "refbnn.train", *args], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=kw.pop("timeout", 600))


@pytest.fixture(scope="module")
def mnist_small(data_dir):
    train_set = subset(load_dataset("mnist", "train", data_dir=data_dir / "mnist", download=False), 300)
    return train_set


def tiny_model(seed=0):
    return models.build("ftbnn18", seed=seed, width_multiplier=0.0625, input_shape=[1, 28, 28],
                        num_classes=10)


def test_loss_decreases_on_real_mnist(mnist_small):
    trainer = Trainer(tiny_model(), mnist_small, Recipe(epochs=3, batch_size=50, lr=5e-3, augment=0))
    losses = [trainer.train_epoch().loss for _ in range(3)]
    assert losses[0] > losses[1] > losses[2] and losses[2] < 0.9 * losses[0], losses


def test_stop_mid_epoch_and_restore_is_bit_identical(mnist_small):
    recipe = Recipe(epochs=2, batch_size=50, lr=5e-3, augment=1)
    straight = Trainer(tiny_model(), mnist_small, recipe, seed=3)
    straight.train_epoch()
    straight.train_epoch()

    first = Trainer(tiny_model(), mnist_small, recipe, seed=3)

    def stop_after_two(stats, n):
        first.stop_requested = first.batches_done >= 2

    assert first.train_epoch(stop_after_two) is None
    assert first.position()["batches_done"] == 2
    # a fresh trainer rebuilt from saved state only, as a checkpoint would
    second = Trainer(tiny_model(seed=99), mnist_small, recipe, seed=12345)
    second.model.load_state_dict(first.model.state_dict())
    second.optimizer.load_state_dict(first.optimizer.state_dict())
    second.restore_position(first.epoch, json.loads(json.dumps(first.position())))
    second.train_epoch()
    second.train_epoch()
    for (k, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=k)


def test_cli_resume_gives_bit_identical_weights(data_dir, tmp_path):
    env = {"REFBNN_DATA_DIR": str(data_dir)}
    r = run_cli([*TINY, "--epochs", "2", "--out-dir", "straight"], tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    r = run_cli([*TINY, "--epochs", "2", "--stop-after", "1", "--out-dir", "split"], tmp_path, env=env)
    assert r.returncode == 0 and "--resume" in r.stderr, r.stderr
    assert not (tmp_path / "split" / "model.h5").exists()
    r = run_cli(["--resume", "split/checkpoint.h5", "--quiet", "--threads", "1"], tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    a = fileformat.load(tmp_path / "straight" / "model.h5")
    b = fileformat.load(tmp_path / "split" / "model.h5")
    assert a.names == b.names
    for name in a.names:
        np.testing.assert_array_equal(a.state_dict[name], b.state_dict[name], err_msg=name)
    history = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert (tmp_path / "split" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert a.provenance["run"]["command"].startswith("python -m refbnn.train")


def test_ctrl_c_saves_a_resumable_checkpoint(data_dir, tmp_path):
    env = dict(os.environ, REFBNN_DATA_DIR=str(data_dir))
    args = [sys.executable, "-m", "refbnn.train", *TINY, "--limit-train", "1000", "--epochs", "20",
            "--out-dir", "run"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ckpt = tmp_path / "run" / "checkpoint.h5"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "resume" in err and "Traceback" not in err
    f = fileformat.load(ckpt)
    assert f.kind == "checkpoint" and f.epoch < 20
    assert not (tmp_path / "run" / "model.h5").exists()
    leftovers = [p.name for p in (tmp_path / "run").iterdir() if ".tmp" in p.name]
    assert leftovers == []
    r = subprocess.run([sys.executable, "-m", "refbnn.train", "--resume", str(ckpt), "--epochs",
                        str(f.epoch + 1), "--quiet", "--threads", "1"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert fileformat.load(tmp_path / "run" / "model.h5").metrics["epochs"] == f.epoch + 1


def assert_clean_failure(r, status, words, out_dir):
    assert r.returncode == status, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr
    if out_dir.exists():
        assert not [p for p in out_dir.iterdir() if p.name != "checkpoint.h5"], list(out_dir.iterdir())


def test_corrupt_idx_file_is_a_clear_error(fake_mnist, tmp_path):
    path = fake_mnist / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    r = run_cli(["--data-dir", str(fake_mnist), "--out-dir", "out", "--quiet"], tmp_path)
    assert_clean_failure(r, 2, ["train-images-idx3-ubyte"], tmp_path / "out")
    assert not (tmp_path / "out" / "checkpoint.h5").exists()


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    r = run_cli(["--dataset", "cifar-100", "--quiet"], tmp_path)
    assert_clean_failure(r, 2, ["cifar-100", "mnist", "fashion-mnist"], tmp_path / "runs")


def test_unwritable_output_folder(fake_mnist, tmp_path):
    (tmp_path / "afile").write_text("x")
    r = run_cli(["--data-dir", str(fake_mnist), "--out-dir", "afile/run", "--quiet"], tmp_path)
    assert_clean_failure(r, 2, ["cannot write", "afile"], tmp_path / "afile-none")


def test_wrong_checksum_of_a_download(tmp_path, monkeypatch, capsys):
    from refbnn.data import download

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("REFBNN_DATA_DIR", raising=False)
    monkeypatch.setattr(download, "OPENER", lambda url, timeout: gzip.compress(b"not mnist"))
    status = train.main(["--out-dir", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and "SHA-256" in err.upper().replace("SHA256", "SHA-256"), err
    assert not any((tmp_path / "cache").rglob("*-ubyte*"))
    assert not (tmp_path / "out" / "model.h5").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(fake_mnist, tmp_path, monkeypatch, capsys):
    real = trainer_mod.cross_entropy
    calls = {"n": 0}

    def sometimes_nan(logits, labels, label_smoothing=0.0):
        calls["n"] += 1
        loss, d = real(logits, labels, label_smoothing=label_smoothing)
        return (np.float32(np.nan), d) if calls["n"] == 5 else (loss, d)

    monkeypatch.setattr(trainer_mod, "cross_entropy", sometimes_nan)
    out = tmp_path / "out"
    status = train.main(["--data-dir", str(fake_mnist), "--out-dir", str(out), "--epochs", "3",
                         "--batch-size", "20", "--width", "0.0625", "--quiet", "--threads", "1"])
    err = capsys.readouterr().err
    assert status == 3, err
    assert "nan" in err and "epoch 2" in err and "checkpoint" in err
    f = fileformat.load(out / "checkpoint.h5")
    assert f.epoch == 1
    assert not (out / "model.h5").exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
