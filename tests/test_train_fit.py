"""training.fit: run files, resume statistics, Ctrl-C after the last step, and numerical faults."""

import json
import os
import signal

import numpy as np
import pytest

from refbnn import fileformat, models, train
from refbnn.data import load_dataset
from refbnn.training import faults
from refbnn.training import trainer as trainer_mod
from refbnn.training.faults import NonFiniteLoss, NumericalFault
from refbnn.training.fit import Callback, fit, resume_recipe
from refbnn.training.recipe import Recipe


def tiny_model(seed=0):
    return models.build("ftbnn18", seed=seed, width_multiplier=0.0625, input_shape=[1, 28, 28],
                        num_classes=10)


@pytest.fixture
def data(fake_mnist):
    return (load_dataset("mnist", "train", data_dir=fake_mnist, download=False),
            load_dataset("mnist", "test", data_dir=fake_mnist, download=False))


RECIPE = dict(epochs=2, batch_size=20, lr=5e-3, augment=1)  # 60 images: 3 steps per epoch


class StopAt(Callback):
    """Ctrl-C's effect after step ``batch`` of epoch ``epoch`` (1-based)."""

    def __init__(self, epoch, batch):
        self.epoch, self.batch = epoch, batch

    def on_batch(self, trainer, stats):
        if trainer.epoch + 1 == self.epoch and trainer.batches_done == self.batch:
            trainer.stop_requested = True


@pytest.mark.parametrize("batch", [1, 3])  # 3: interrupted after the epoch's last step
def test_resumed_epoch_records_every_batch_of_it(data, tmp_path, batch):
    train_set, test_set = data
    straight = fit(tiny_model(), Recipe(**RECIPE), train_set, test_set, tmp_path / "a", seed=4,
                   handle_sigint=False)
    assert straight.status == "finished" and straight.model_path == tmp_path / "a" / "model.h5"
    first = fit(tiny_model(), Recipe(**RECIPE), train_set, test_set, tmp_path / "b", seed=4,
                callbacks=[StopAt(2, batch)], handle_sigint=False)
    assert first.status == "interrupted" and first.epoch == 1 and first.model_path is None
    ckpt = fileformat.load(tmp_path / "b" / "checkpoint.h5")
    assert ckpt.rng_state["batches_done"] == batch and ckpt.rng_state["epoch_stats"]["seen"] == 20 * batch
    recipe, _ = resume_recipe(ckpt)
    second = fit(tiny_model(seed=9), recipe, train_set, test_set, tmp_path / "b", seed=4, resume=ckpt,
                 handle_sigint=False)
    assert second.status == "finished"
    a, b = straight.history[-1], second.history[-1]
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr"):
        assert a[key] == b[key], key
    assert b["images_per_second"] > 0 and b["train_seconds"] > 0
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["train_loss"] for line in lines] == [r["train_loss"] for r in straight.history]
    wa, wb = fileformat.load(straight.model_path), fileformat.load(second.model_path)
    for name in wa.names:
        np.testing.assert_array_equal(wa.state_dict[name], wb.state_dict[name], err_msg=name)


def test_stop_after_and_no_files_without_out_dir(data, tmp_path, monkeypatch):
    train_set, _ = data
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    r = fit(tiny_model(), Recipe(**RECIPE), train_set, stop_after=1, handle_sigint=False)
    assert r.status == "stopped" and r.epoch == 1 and r.checkpoint is None
    assert set(r.history[0]) == {"epoch", "lr", "train_loss", "train_accuracy", "train_seconds",
                                 "eval_seconds", "images_per_second"}
    assert list((tmp_path / "cwd").iterdir()) == []


def test_sigint_after_the_last_step_still_finishes_and_exits_130(fake_mnist, tmp_path, monkeypatch,
                                                                 capsys):
    real = fileformat.save_model

    def save_then_ctrl_c(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the final model file is written
        return real(*a, **k)

    monkeypatch.setattr(fileformat, "save_model", save_then_ctrl_c)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup, else Python's default handler
    status = train.main(["--data-dir", str(fake_mnist), "--out-dir", str(tmp_path / "o"), "--width",
                         "0.0625", "--batch-size", "30", "--epochs", "1", "--quiet", "--threads", "1"])
    err = capsys.readouterr().err
    assert status == 130, err
    assert "Traceback" not in err and "finished" in err
    assert fileformat.load(tmp_path / "o" / "model.h5").kind == "model"
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back


# --- numerical faults ---------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [["--lr", "1e6"], ["--optimizer", "sgd", "--lr", "1e6"],
                                   ["--optimizer", "sgd", "--lr", "100", "--momentum", "0.99"]])
def test_destructive_recipes_stop_with_status_3(fake_mnist, tmp_path, capsys, flags):
    out = tmp_path / "o"
    status = train.main(["--data-dir", str(fake_mnist), "--out-dir", str(out), "--width", "0.0625",
                         "--batch-size", "20", "--epochs", "3", "--quiet", "--threads", "1", *flags])
    err = capsys.readouterr().err
    assert status == 3, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("error: "), err  # the start line, then one error
    assert "NaN or infinite" in lines[1] and "epoch" in lines[1]
    assert not (out / "model.h5").exists()
    if (out / "checkpoint.h5").exists():
        ck = fileformat.load(out / "checkpoint.h5")
        assert all(np.isfinite(v).all() for v in ck.state_dict.values())


class Inject(Callback):
    """After step ``batch`` of epoch ``epoch`` (1-based), ``act(trainer)``."""

    def __init__(self, epoch, batch, act):
        self.epoch, self.batch, self.act = epoch, batch, act

    def on_batch(self, trainer, stats):
        if trainer.epoch + 1 == self.epoch and trainer.batches_done == self.batch:
            self.act(trainer)


def _set(name, value, where=3):
    def act(trainer):
        target = dict(trainer.model.named_parameters()).get(name)
        if target is not None:
            target.data.flat[where] = value
        else:
            dict(trainer.model.named_buffers())[name].flat[1] = value
    return act


@pytest.mark.parametrize(("act", "words"), [
    (_set("layer1.0.bn1.weight", np.nan), ["parameter layer1.0.bn1.weight"]),
    # finite weights whose output overflows float32, and whose batch variance does
    (_set("conv1.weight", 3e38, slice(None)), ["first in the output of conv1 (Conv2d)", "epoch 2, batch 2"]),
    (_set("conv1.weight", 1e38), ["buffer bn1.running_var", "epoch 2, batch 2"]),
    (_set("layer2.1.bn1.running_var", np.inf), ["buffer layer2.1.bn1.running_var"]),
])
def test_a_fault_names_where_and_keeps_the_last_good_checkpoint(data, tmp_path, act, words):
    train_set, test_set = data
    out = tmp_path / "o"
    with pytest.raises(NumericalFault) as e:
        fit(tiny_model(), Recipe(**RECIPE), train_set, test_set, out, callbacks=[Inject(2, 1, act)],
            handle_sigint=False)
    assert all(w in str(e.value) for w in words), str(e.value)
    ck = fileformat.load(out / "checkpoint.h5")
    assert ck.epoch == 1 and all(np.isfinite(v).all() for v in ck.state_dict.values())
    assert all(np.isfinite(v).all() for v in ck.optimizer_state.values())
    assert not (out / "model.h5").exists()


def test_nan_in_the_data_is_named(data, monkeypatch):
    train_set, _ = data
    real = trainer_mod.batches

    def poisoned(*a, **k):
        for i, (x, y) in enumerate(real(*a, **k)):
            if i == 1:
                x = x.copy()
                x[0, 0, 5, 5] = np.nan
            yield x, y

    monkeypatch.setattr(trainer_mod, "batches", poisoned)
    t = trainer_mod.Trainer(tiny_model(), train_set, Recipe(**RECIPE))
    with pytest.raises(NumericalFault, match=r"epoch 1, batch 2: first in the input batch"):
        t.train_epoch()


def test_a_non_finite_gradient_is_never_applied(data, monkeypatch):
    train_set, _ = data
    t = trainer_mod.Trainer(tiny_model(), train_set, Recipe(**RECIPE))
    real = t.model.backward

    def backward(g):
        out = real(g)
        t.model.fc.weight.grad[0, 0] = np.inf
        return out

    monkeypatch.setattr(t.model, "backward", backward)
    before = t.model.state_dict()
    with pytest.raises(NumericalFault, match=r"gradient of fc.weight .* epoch 1, batch 1"):
        t.train_epoch()
    after = t.model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before if "running" not in k
               and "num_batches" not in k)  # the step was not taken
    assert t.optimizer.state == {}


def test_loss_fault_is_a_numerical_fault():
    assert issubclass(NonFiniteLoss, NumericalFault)


def test_nothing_non_finite_is_ever_saved(data, tmp_path, monkeypatch):
    # with the per-step checks switched off, the check before the save still refuses
    train_set, _ = data
    monkeypatch.setattr(trainer_mod.Trainer, "_check_after_step", lambda self: None)
    out = tmp_path / "o"
    with pytest.raises(NumericalFault, match="refusing to save"):
        fit(tiny_model(), Recipe(**RECIPE), train_set, None, out, handle_sigint=False,
            callbacks=[Inject(1, 3, _set("layer1.0.bn1.bias", np.nan))])
    assert not (out / "checkpoint.h5").exists()


def test_first_nonfinite_reads_every_float_array_and_never_flags_a_finite_one():
    big = np.full(1000, 3e38, np.float32)  # its float32 sum overflows; every element is finite
    assert faults.first_nonfinite([("a", big), ("i", np.array([2**62], np.int64))]) is None
    for bad in (np.nan, np.inf, -np.inf):
        b = big.copy()
        b[-1] = bad
        assert faults.first_nonfinite([("a", big), ("b", b), ("c", b)]) == "b"
    assert faults.first_nonfinite([("g", None)]) is None
    # finite arrays whose sums overflow only when added together; a complex array
    huge = np.array([1.5e308])
    assert faults.first_nonfinite([("a", huge), ("b", huge)]) is None
    assert faults.first_nonfinite([("z", np.array([1 + 2j, np.nan * 1j]))]) == "z"
    assert faults.first_nonfinite([("z", np.array([1 + 2j])), ("e", np.empty(0))]) is None


def test_locate_in_forward_restores_the_modules():
    model = tiny_model()
    x = np.zeros((2, 1, 28, 28), np.float32)
    assert faults.locate_in_forward(model, x) is None
    assert all("forward" not in vars(m) for _, m in model.named_modules())
    x[1, 0, 3, 3] = np.inf
    assert faults.locate_in_forward(model, x) == "the input batch"
