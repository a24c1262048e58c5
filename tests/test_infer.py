"""`python -m refbnn.infer`: test-set evaluation, image classification, and bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from refbnn import fileformat, infer, models
from refbnn.data import load_dataset

SPEC = {"shape": [1, 28, 28], "layout": "NCHW", "channel_order": "L", "mean": [0.1307], "std": [0.3081]}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    model = models.build("ftbnn18", seed=0, width_multiplier=0.125, input_shape=[1, 28, 28], num_classes=10)
    model.eval()
    path = tmp_path_factory.mktemp("m") / "tiny.h5"
    fileformat.save_model(path, model.state_dict(), config=model.config,
                          binary_weights=model.binary_weights(), input_spec=SPEC,
                          class_names=[str(i) for i in range(10)], dataset="mnist")
    return path


def run(args, **env):
    import os
    return subprocess.run([sys.executable, "-m", "refbnn.infer", *map(str, args)], capture_output=True,
                          text=True, env=dict(os.environ, **env), timeout=600)


def test_classifies_image_files_in_any_mode(model_file, tmp_path, data_dir):
    test = load_dataset("mnist", "test", data_dir=data_dir / "mnist", download=False)
    paths = []
    for i, mode in enumerate(["L", "RGB", "RGBA", "P"]):
        p = tmp_path / f"digit{i}.png"
        Image.fromarray(test.images[i]).convert(mode).resize((56, 40)).save(p)
        paths.append(p)
    jpg = tmp_path / "digit.jpg"
    Image.fromarray(test.images[0]).save(jpg)
    paths.append(jpg)
    r = run([model_file, *paths, "--json", "--top-k", "2"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [o["file"] for o in out] == [str(p) for p in paths]
    for o in out:
        probs = [t["probability"] for t in o["top"]]
        assert len(probs) == 2 and probs[0] >= probs[1] and 0 <= probs[1] and probs[0] <= 1
        assert o["top"][0]["class"] == str(o["top"][0]["index"])
    r = run([model_file, paths[0], "--engine", "reference"])
    assert r.returncode == 0 and r.stdout.startswith(f"{paths[0]}: ")


def test_image_conversion_follows_the_input_spec(tmp_path):
    img = np.zeros((10, 20), np.uint8)
    img[2:8, 5:15] = 255
    p = tmp_path / "x.png"
    Image.fromarray(img).save(p)
    x = infer.image_batch([str(p)], SPEC, invert="no")
    assert x.shape == (1, 1, 28, 28)
    assert x.min() == pytest.approx(-0.1307 / 0.3081) and x.max() == pytest.approx((1 - 0.1307) / 0.3081)
    inverted = infer.image_batch([str(p)], SPEC, invert="auto")
    np.testing.assert_array_equal(inverted, x)   # dark border: left as it is
    Image.fromarray(255 - img).save(p)
    np.testing.assert_allclose(infer.image_batch([str(p)], SPEC, invert="auto"), x, atol=1e-6)


def test_evaluates_the_test_split(model_file, data_dir):
    r = run([model_file, "--json", "--latency-runs", "20"], REFBNN_DATA_DIR=str(data_dir))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["images"] == 10000 and 0 <= out["accuracy"] <= 1
    lat = out["batch1_latency_ms"]
    assert out["images_per_second"] > 0 and lat["p90"] >= lat["median"] > 0


@pytest.mark.parametrize("case", ["missing", "not_refbnn", "not_image", "missing_image", "future",
                                  "reference_bf16"])
def test_bad_input_is_one_line_and_status_2(case, model_file, tmp_path, monkeypatch):
    args = [model_file, tmp_path / "nothing.png"]
    if case == "missing":
        args = [tmp_path / "nope.h5"]
    elif case == "not_refbnn":
        bad = tmp_path / "bad.h5"
        bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"junk" * 100)
        args = [bad]
    elif case == "not_image":
        txt = tmp_path / "a.png"
        txt.write_text("hello")
        args = [model_file, txt]
    elif case == "future":
        model = models.build("ftbnn18", width_multiplier=0.125, input_shape=[1, 28, 28], num_classes=10)
        monkeypatch.setattr(fileformat, "FORMAT_VERSION", fileformat.FORMAT_VERSION + 1)
        fileformat.save_model(tmp_path / "v2.h5", model.state_dict(), config=model.config,
                              binary_weights=model.binary_weights(), input_spec=SPEC)
        monkeypatch.undo()
        args = [tmp_path / "v2.h5"]
    elif case == "reference_bf16":  # the bf16 stem is the packed engine's option
        args = [model_file, "--engine", "reference", "--stem", "bf16"]
    r = run(args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: ")
    if case == "future":
        assert "version" in r.stderr


def test_export_packed_only_runs_the_same(model_file, tmp_path):
    dst = tmp_path / "packed.h5"
    r = subprocess.run([sys.executable, "-m", "refbnn.export", str(model_file), str(dst), "--packed-only"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert fileformat.load(dst).kind == "packed"
    assert dst.stat().st_size < model_file.stat().st_size
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    a, _ = infer.load_runner(str(model_file), "packed")
    b, _ = infer.load_runner(str(dst), "packed")
    np.testing.assert_array_equal(a(x), b(x))
    r = subprocess.run([sys.executable, "-m", "refbnn.export", str(tmp_path / "none.h5"), str(dst),
                        "--packed-only"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
