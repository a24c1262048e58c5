"""refbnn.interop.train_torch: the PyTorch twin trained with torch.distributed (gloo, 2 CPU ranks).

Claims and their tolerances:

* 2 ranks = 1 rank at the same global batch: with global-batch BatchNorm (``--sync-bn``, the
  default) both compute the same thing up to float summation order. In float32 that order noise is
  amplified by training itself (a binary input within rounding of 0 flips its sign; Adam divides
  tiny gradients by their own size), so the claim is checked in ``--dtype float64``, where the two
  runs' weights agree to float32 rounding after a full epoch (measured: identical once rounded to
  float32, 0 relative difference; the bound asserted is 1e-6 relative per tensor).
* resume: ``--stop-after 1`` + ``--resume`` equals the straight run bit for bit (same world size,
  threads and device; every tensor and optimizer slot compared exactly), and so does a resume
  from a mid-epoch ``--checkpoint-every`` checkpoint.
* refbnn's packed engine predicts what the twin predicts on the trained file: identical argmax
  except where the twin's two largest logits are within 1e-3 of each other (a sign flip of a value
  within float rounding of 0 may move a logit by that much; none were seen).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refbnn import fileformat, models

torch = pytest.importorskip("torch")
from refbnn.interop import train_torch  # noqa: E402  (needs torch)
from refbnn.interop.torch import to_torch_state, twin  # noqa: E402
from refbnn.interop.torch_data import (  # noqa: E402
    ImageFolder,
    ShardSampler,
    random_resized_crop_box,
    resize_center_crop_geometry,
)
from refbnn.interop.torch_optim import (  # noqa: E402
    refbnn_layout,
    state_from_refbnn,
    state_to_refbnn,
    torch_optimizer,
)
from refbnn.training.trainer import Recipe, make_optimizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = ["--width", "0.125", "--limit-train", "256", "--limit-test", "100", "--batch-size", "64",
        "--threads", "1", "--quiet"]
LOGIT_TIE = 1e-3


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tests/conftest.py


def launch(args, cwd, ranks):
    """``torchrun --standalone --nproc_per_node ranks`` (a free port) or plain ``python -m``."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             str(ranks)] if ranks > 1 else [sys.executable])
    r = subprocess.run([*head, "-m", "refbnn.interop.train_torch", *args], capture_output=True,
                       text=True, env=env, cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def tensors(path):
    f = fileformat.load(path)
    return f, f.state_dict


def max_rel(a, b):
    worst = 0.0
    for k in a:
        if a[k].dtype.kind == "f":
            x, y = a[k].astype(np.float64), b[k].astype(np.float64)
            scale = max(np.abs(x).max(), 1e-30)
            worst = max(worst, float(np.abs(x - y).max() / scale))
    return worst


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """Five trainings on 256 MNIST images, global batch 64 (4 steps per epoch), width x0.125."""
    root = tmp_path_factory.mktemp("ddp")
    data = ["--data-dir", str(data_dir / "mnist"), "--no-download"]
    out = {}
    # float64: 2 ranks vs 1 rank (in this process: no second torch import), one epoch
    f64 = [*TINY, *data, "--epochs", "1", "--dtype", "float64"]
    launch([*f64, "--out-dir", str(root / "f64_2")], root, 2)
    assert train_torch.main([*f64, "--out-dir", str(root / "f64_1")]) == 0
    out.update(f64_1=root / "f64_1", f64_2=root / "f64_2")
    # float32, 2 ranks: two epochs straight; one epoch, then --resume for the second
    straight, split = root / "straight", root / "split"
    launch([*TINY, *data, "--epochs", "2", "--out-dir", str(straight)], root, 2)
    launch([*TINY, *data, "--epochs", "2", "--stop-after", "1", "--out-dir", str(split)], root, 2)
    shutil.copy(split / "checkpoint.h5", root / "epoch1.h5")
    launch(["--resume", str(split / "checkpoint.h5"), "--threads", "1", "--quiet", *data[:2]], root, 2)
    out.update(straight=straight, split=split, epoch1=root / "epoch1.h5", root=root)
    return out


def test_two_ranks_equal_one_rank_in_float64(runs):
    f1, a = tensors(runs["f64_1"] / "checkpoint.h5")
    f2, b = tensors(runs["f64_2"] / "checkpoint.h5")
    assert f1.provenance["run"]["world_size"] == 1 and f2.provenance["run"]["world_size"] == 2
    assert f2.provenance["run"]["per_rank_batch_size"] == 32 and f2.provenance["run"]["sync_bn"]
    rel = max_rel(a, b)
    print(f"1 vs 2 ranks (float64 training, files float32): max relative difference {rel:.3g}")
    assert rel <= 1e-6
    h1, h2 = f1.history[-1], f2.history[-1]
    assert abs(h1["train_loss"] - h2["train_loss"]) <= 1e-9 * abs(h1["train_loss"])
    assert h1["test_accuracy"] == h2["test_accuracy"]
    # and training did something: the weights moved from refbnn's initialisation
    init = models.build(f1.config, seed=0).state_dict()
    assert max_rel(init, a) > 1e-3


def test_resume_continues_bit_identically(runs):
    fs, a = tensors(runs["straight"] / "checkpoint.h5")
    fr, b = tensors(runs["split"] / "checkpoint.h5")
    assert fs.epoch == fr.epoch == 2
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert set(fs.optimizer_state) == set(fr.optimizer_state)
    for k, v in fs.optimizer_state.items():
        assert np.array_equal(v, fr.optimizer_state[k]), k
    assert [r["train_loss"] for r in fs.history] == [r["train_loss"] for r in fr.history]
    _, final = tensors(runs["split"] / "model.h5")
    assert all(np.array_equal(final[k], b[k]) for k in b)


def test_engine_predicts_what_the_twin_predicts(runs, data_dir):
    import numba

    from refbnn.data import batches, load_dataset, subset
    from refbnn.infer import load_runner

    path = runs["straight"] / "model.h5"
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        predict, f = load_runner(str(path), "packed")
        test = subset(load_dataset("mnist", "test", data_dir=data_dir / "mnist", download=False), 1000)
        x, y = next(batches(test, 1000, np.random.default_rng(0), shuffle=False))
        engine = predict(x)
    finally:
        numba.set_num_threads(before)
    net = twin(f.config)
    net.load_state_dict(to_torch_state(f.state_dict))
    net.eval()
    with torch.no_grad():
        theirs = net(torch.from_numpy(x)).numpy()
    top2 = np.sort(theirs, axis=1)[:, -2:]
    differ = engine.argmax(1) != theirs.argmax(1)
    ties = top2[:, 1] - top2[:, 0] <= LOGIT_TIE
    print(f"engine vs twin: {int(differ.sum())} of {len(y)} argmax differ, "
          f"{int(ties.sum())} twin top-2 ties within {LOGIT_TIE}; max |logit diff| "
          f"{np.abs(engine - theirs).max():.3g}")
    assert not (differ & ~ties).any()
    assert (theirs.argmax(1) == y).mean() > 0.2  # it learned something (10 classes)


def test_crosscheck_and_refbnn_train_resume_take_the_files(runs, data_dir, tmp_path):
    from refbnn import crosscheck, train

    assert crosscheck.main([str(runs["straight"] / "model.h5"), "--against", "torch"]) == 0
    ckpt = tmp_path / "checkpoint.h5"
    shutil.copy(runs["epoch1"], ckpt)
    rc = train.main(["--resume", str(ckpt), "--quiet", "--threads", "1",
                     "--data-dir", str(data_dir / "mnist")])
    assert rc == 0
    f = fileformat.load(ckpt)
    assert f.epoch == 2 and len(f.history) == 2
    twin_epoch1 = fileformat.load(runs["epoch1"]).history[0]
    assert f.history[0] == twin_epoch1  # the twin's epoch, then refbnn's own
    assert (tmp_path / "model.h5").exists()


# --- in-process pieces -------------------------------------------------------------------------

def test_shard_sampler_global_batches_are_one_rank_batches():
    data = list(range(20))
    one = ShardSampler(data, 1, 0, batch_size=8, seed=5)
    ranks = [ShardSampler(data, 2, r, batch_size=4, seed=5) for r in range(2)]
    for s in (one, *ranks):
        s.set_epoch(3)
    flat = list(one)
    shards = [list(s) for s in ranks]
    for k in range(3):  # 20 = 8 + 8 + 4
        assert sorted(shards[0][4 * k:4 * k + 4] + shards[1][4 * k:4 * k + 4]) == \
            sorted(flat[8 * k:8 * k + 8])
    for s in ranks:
        s.start_batch = 2
    assert [list(s) for s in ranks] == [sh[8:] for sh in shards] and len(ranks[0]) == 2


def test_crop_geometry():
    # 500x375 (w x h): shorter side 375 -> 256, longer int(256 * 500 / 375) = 341; crop 224 at
    # left round(117 / 2) = 58 (round half to even), top round(32 / 2) = 16
    assert resize_center_crop_geometry(500, 375, 256, 224) == ((341, 256), (58, 16, 282, 240))
    assert resize_center_crop_geometry(300, 600, 256, 224) == ((256, 512), (16, 144, 240, 368))
    for seed in range(200):
        w, h = 50 + seed, 300 - seed
        box = random_resized_crop_box(w, h, np.random.default_rng(seed))
        l, t, r, b = box
        assert 0 <= l < r <= w and 0 <= t < b <= h
        cw, ch = r - l, b - t
        if (cw, ch) != (w, h) and cw * ch < 0.99 * w * h:  # a sampled crop, not the fallback
            assert 0.08 * w * h - w - h <= cw * ch <= w * h
            assert 3 / 4 - 0.05 <= cw / ch <= 4 / 3 + 0.05
        assert box == random_resized_crop_box(w, h, np.random.default_rng(seed))
    # a very wide image never fits the ratio range: the fallback clamps it, centered
    assert random_resized_crop_box(1000, 10, np.random.default_rng(0),
                                   scale=(0.99, 1.0)) == (493, 0, 506, 10)


def _image_tree(root, sizes):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                w, h = sizes[i % len(sizes)]
                a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(a).save(root / split / c / f"{i}.png")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")


def test_image_folder_transforms(tmp_path):
    _image_tree(tmp_path, [(40, 30), (24, 50)])
    train = ImageFolder(tmp_path, "train", size=16, train=True, seed=1)
    val = ImageFolder(tmp_path, "val", size=16, train=False, classes=train.classes)
    assert train.classes == ["cat", "dog"] and len(train) == 8 and len(val) == 4
    x, y = train[5]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 16, 16) and y == 1
    assert torch.equal(train[5][0], x)              # keyed by (seed, epoch, index)
    train.set_epoch(1)
    assert not torch.equal(train[5][0], x)
    # evaluation: resize the shorter side to round(16 * 256 / 224) = 18, then the centered crop
    from PIL import Image

    path = val.samples[0][0]
    with Image.open(path) as im:
        want = np.asarray(im.convert("RGB").resize((24, 18), Image.Resampling.BILINEAR).crop(
            (4, 1, 20, 17))).transpose(2, 0, 1)
    assert np.array_equal(val[0][0].numpy(), want)


def test_image_folder_training_writes_an_rgb_model(tmp_path, capsys):
    from refbnn import infer

    _image_tree(tmp_path / "data", [(40, 30), (24, 50)])
    out = tmp_path / "run"
    rc = train_torch.main(["--data", str(tmp_path / "data"), "--image-size", "16", "--width", "0.0625",
                           "--epochs", "1", "--batch-size", "4", "--workers", "0", "--threads", "1",
                           "--quiet", "--out-dir", str(out)])
    assert rc == 0
    f = fileformat.load(out / "model.h5")
    assert f.input_spec["channel_order"] == "RGB" and f.input_spec["shape"] == [3, 16, 16]
    assert f.class_names == ["cat", "dog"] and f.config["num_classes"] == 2
    assert "test_top5" in f.metrics
    capsys.readouterr()
    image = str(tmp_path / "data" / "val" / "cat" / "0.png")
    assert infer.main([str(out / "model.h5"), image, "--threads", "1"]) == 0
    assert "0.png:" in capsys.readouterr().out


def test_unreadable_image_is_one_line_exit_2(tmp_path, capsys):
    _image_tree(tmp_path / "data", [(40, 30)])
    bad = tmp_path / "data" / "train" / "cat" / "2.png"
    bad.write_bytes(b"not a png")
    rc = train_torch.main(["--data", str(tmp_path / "data"), "--image-size", "16", "--width", "0.0625",
                           "--epochs", "1", "--batch-size", "8", "--workers", "1", "--threads", "1",
                           "--quiet", "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(f"error: {bad}: not a readable image"), err
    assert not (tmp_path / "run" / "checkpoint.h5").exists()


@pytest.mark.parametrize("args, env, message", [
    (["--batch-size", "64", "--per-rank-batch-size", "8"], {}, "not both"),
    (["--batch-size", "65"], {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, "multiple of the world size"),
    (["--data", "/nonexistent/imagenet"], {}, "no such folder"),
    (["--dataset", "cifar"], {}, "unknown dataset"),
    (["--model", "resnet9000"], {}, "unknown model"),
    (["--epochs", "0"], {}, "--epochs must be positive"),
    (["--schedule", "step"], {}, "step_epochs >= 1"),
    (["--resume", "/nonexistent.h5"], {}, "no such file"),
    (["--resume", "x.h5", "--lr", "0.1"], {}, "drop --lr"),
])
def test_bad_input_is_one_line_exit_2(args, env, message, data_dir, tmp_path, monkeypatch, capsys):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc = train_torch.main([*args, "--data-dir", str(data_dir / "mnist"), "--no-download",
                           "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err and message in err, err


def test_resume_rejects_a_model_file(tmp_path, capsys):
    path = tmp_path / "m.h5"
    model = models.build("ftbnn18", seed=0, width_multiplier=0.0625, input_shape=[1, 28, 28],
                         num_classes=10)
    fileformat.save_model(path, model.state_dict(), config=model.config)
    assert train_torch.main(["--resume", str(path)]) == 2
    assert "not a training checkpoint" in capsys.readouterr().err


def test_optimizer_state_moves_both_ways_exactly():
    ref = models.build("ftbnn18", seed=0, width_multiplier=0.0625, input_shape=[1, 12, 12],
                       num_classes=4)
    recipe = Recipe(optimizer="adam", lr=1e-2, weight_decay=1e-4)
    layout = refbnn_layout(make_optimizer(ref, recipe).state_dict()["hparams"], ref.binary_weights())
    x = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(0))

    def step(net, opt):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()

    a, b = twin(ref.config), twin(ref.config)
    a.load_state_dict(to_torch_state(ref.state_dict()))
    opt_a = torch_optimizer(a, layout)
    step(a, opt_a)
    state, hparams = state_to_refbnn(opt_a, layout)
    assert state["fc.weight.step"].dtype == np.int64 and int(state["fc.weight.step"]) == 1
    b.load_state_dict(a.state_dict())
    opt_b = torch_optimizer(b, layout)
    state_from_refbnn(opt_b, layout, state, hparams)
    step(a, opt_a)
    step(b, opt_b)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    # and refbnn's own optimizer takes the same state
    make_optimizer(ref, recipe).load_state_dict({"state": state, "hparams": hparams})


def test_bireal_layout_keeps_binary_weights_out_of_weight_decay():
    ref = models.build("birealnet18", seed=0, width_multiplier=0.0625, input_shape=[3, 32, 32],
                       num_classes=4)
    recipe = Recipe(optimizer="adam", lr=1e-3, weight_decay=5e-6, clip_latent=False)
    layout = refbnn_layout(make_optimizer(ref, recipe).state_dict()["hparams"], ref.binary_weights(),
                           decay_binary=False)
    binary = set(ref.binary_weights())
    for g in layout["groups"]:
        if set(g["names"]) & binary:
            assert set(g["names"]) <= binary and g["weight_decay"] == 0.0
    decayed = [n for g in layout["groups"] if g["weight_decay"] for n in g["names"]]
    assert "conv1.weight" in decayed and "fc.weight" in decayed
    assert sorted(n for g in layout["groups"] for n in g["names"]) == sorted(dict(ref.named_parameters()))


def test_mid_epoch_checkpoint_resumes_bit_identically(data_dir, tmp_path, monkeypatch):
    saved = []
    original = fileformat.save_checkpoint

    def keep_each(path, *a, **k):  # --checkpoint-every overwrites checkpoint.h5: keep every save
        original(path, *a, **k)
        saved.append(tmp_path / f"save{len(saved)}.h5")
        shutil.copy(path, saved[-1])

    monkeypatch.setattr(fileformat, "save_checkpoint", keep_each)
    args = [*TINY, "--data-dir", str(data_dir / "mnist"), "--no-download", "--epochs", "2"]
    assert train_torch.main([*args, "--checkpoint-every", "2", "--out-dir", str(tmp_path / "a")]) == 0
    positions = [(f.epoch, f.rng_state["batches_done"]) for f in map(fileformat.load, saved)]
    assert positions == [(0, 2), (1, 0), (1, 2), (2, 0)]  # 4 steps per epoch
    monkeypatch.setattr(fileformat, "save_checkpoint", original)
    (tmp_path / "b").mkdir()
    shutil.copy(saved[2], tmp_path / "b" / "checkpoint.h5")  # epoch 2, after its 2nd step
    assert train_torch.main(["--resume", str(tmp_path / "b" / "checkpoint.h5"), "--threads", "1",
                             "--quiet", "--data-dir", str(data_dir / "mnist")]) == 0
    _, a = tensors(tmp_path / "a" / "model.h5")
    _, b = tensors(tmp_path / "b" / "model.h5")
    assert all(np.array_equal(a[k], b[k]) for k in a)
