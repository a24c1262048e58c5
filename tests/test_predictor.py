"""refbnn.load: a file ready to predict; image files converted as infer converts them."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import refbnn
from refbnn import fileformat, infer, models, predictor
from refbnn.predictor import ImageError, image_batch

SPEC = {"shape": [1, 28, 28], "layout": "NCHW", "channel_order": "L", "mean": [0.1307], "std": [0.3081]}


def _save(path, net, spec=SPEC, packed_only=False):
    fileformat.save_model(path, net.state_dict(), config=net.config, binary_weights=net.binary_weights(),
                          input_spec=spec, class_names=[f"c{i}" for i in range(10)], dataset="mnist",
                          packed_only=packed_only)
    return path


@pytest.fixture(scope="module")
def net():
    from refbnn.golden.model import randomize_state

    n = models.build("ftbnn18", seed=1, width_multiplier=0.125, input_shape=[1, 28, 28], num_classes=10)
    randomize_state(n, 1)  # BatchNorm off its initial values, so logits differ per input
    return n.eval()


@pytest.fixture(scope="module")
def model_file(net, tmp_path_factory):
    return _save(tmp_path_factory.mktemp("p") / "m.h5", net)


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal((5, 1, 28, 28)).astype(np.float32)


def test_load_and_predict(model_file, net, x):
    m = refbnn.load(model_file)
    assert m.engine == "packed" and m.input_shape == (1, 28, 28) and m.class_names[3] == "c3"
    logits = m.logits(x)
    assert logits.shape == (5, 10) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, net.forward(x), atol=1e-4)  # tests/test_engine.py's bound
    p = m.predict(x)
    assert p.dtype == np.float64 and np.allclose(p.sum(axis=1), 1.0)
    np.testing.assert_array_equal(p.argmax(1), logits.argmax(1))
    ref = refbnn.load(model_file, engine="reference")
    np.testing.assert_array_equal(ref.logits(x), net.forward(x))
    forward, f = infer.load_runner(str(model_file), "packed")  # the older helper, same engine
    np.testing.assert_array_equal(forward(x), logits)
    assert f.path == str(model_file)


def test_packed_only_file_predicts_the_same(model_file, net, x, tmp_path):
    packed = _save(tmp_path / "p.h5", net, packed_only=True)
    np.testing.assert_array_equal(refbnn.load(packed).logits(x), refbnn.load(model_file).logits(x))


def test_nhwc_input_layout(net, x, tmp_path, model_file):
    spec = dict(SPEC, shape=[28, 28, 1], layout="NHWC")
    m = refbnn.load(_save(tmp_path / "nhwc.h5", net, spec))
    assert m.input_shape == (28, 28, 1)
    np.testing.assert_array_equal(m.logits(x.transpose(0, 2, 3, 1)), refbnn.load(model_file).logits(x))
    with pytest.raises(ValueError, match="NHWC"):
        m.logits(x)


@pytest.mark.parametrize(("bad", "words"), [
    (np.zeros((2, 28, 28), np.float32), "(N, 1, 28, 28)"),
    (np.zeros((2, 1, 28, 28), np.uint8), "float"),
    (np.full((1, 1, 28, 28), np.nan, np.float32), "NaN"),
])
def test_predict_refuses_bad_input(model_file, bad, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        refbnn.load(model_file).predict(bad)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        refbnn.load(tmp_path / "none.h5")
    (tmp_path / "t.h5").write_text("text")
    with pytest.raises(fileformat.FormatError):
        refbnn.load(tmp_path / "t.h5")
    with pytest.raises(ValueError, match="engine"):
        refbnn.load(tmp_path / "t.h5", engine="gpu")


def test_predict_files_is_infer(model_file, tmp_path, capsys):
    img = np.zeros((28, 28), np.uint8)
    img[6:22, 12:16] = 255
    p = tmp_path / "one.png"
    Image.fromarray(img).save(p)
    m = refbnn.load(model_file)
    probs = m.predict_files([p])
    np.testing.assert_array_equal(probs, m.predict(m.images_from_files([p])))
    assert infer.main([str(model_file), str(p), "--json", "--top-k", "1"]) == 0
    out = capsys.readouterr().out
    assert f'"class": "c{int(probs.argmax())}"' in out


# --- image conversion ----------------------------------------------------------------------------------
def _strokes():
    """An anti-aliased bar: stroke coverage in [0, 255] (uint8), 40x30."""
    a = np.zeros((40, 30), np.float64)
    a[8:32, 12:18] = 1.0
    a[8:32, 11] = a[8:32, 18] = 0.5
    return np.rint(a * 255).astype(np.uint8)


def test_transparent_background_classifies_like_paper(tmp_path):
    cover = _strokes()
    # dark strokes, transparent canvas (RGB under it black, as drawing apps export)
    rgba = np.zeros((*cover.shape, 4), np.uint8)
    rgba[..., 3] = cover
    Image.fromarray(rgba, "RGBA").save(tmp_path / "dark.png")
    Image.fromarray(255 - cover).save(tmp_path / "paper.png")  # the same strokes on white paper
    # light strokes on a transparent canvas: like the same strokes on black
    rgba[..., :3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "light.png")
    Image.fromarray(cover).save(tmp_path / "black.png")
    paper, dark = image_batch([tmp_path / "paper.png", tmp_path / "dark.png"], SPEC, "auto")
    np.testing.assert_allclose(dark, paper, atol=1e-6)
    black, light = image_batch([tmp_path / "black.png", tmp_path / "light.png"], SPEC, "auto")
    np.testing.assert_allclose(light, black, atol=1e-6)
    np.testing.assert_allclose(paper, black, atol=1e-6)  # auto inverted the paper
    assert paper.max() > 2 and paper.min() < 0  # strokes and background both there
    # explicit choices: "yes" says the strokes are dark, "no" that they are light
    np.testing.assert_allclose(image_batch([tmp_path / "dark.png"], SPEC, "yes")[0], paper, atol=1e-6)
    np.testing.assert_allclose(image_batch([tmp_path / "light.png"], SPEC, "no")[0], black, atol=1e-6)


def test_transparent_rgb_model_composites_on_white(tmp_path):
    spec = {"shape": [3, 8, 8], "layout": "NCHW", "channel_order": "RGB", "mean": [0, 0, 0],
            "std": [1, 1, 1]}
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:6, 2:6] = [255, 0, 0, 255]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    x = image_batch([tmp_path / "t.png"], spec)[0]
    assert x[:, 0, 0].tolist() == [1.0, 1.0, 1.0] and x[:, 3, 3].tolist() == [1.0, 0.0, 0.0]


def test_exif_orientation_is_applied(tmp_path):
    upright = Image.fromarray(_strokes()[:, :20])
    upright.save(tmp_path / "upright.png")
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "phone.png", exif=exif)
    a, b = image_batch([tmp_path / "upright.png", tmp_path / "phone.png"], SPEC, "no")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, image_batch([tmp_path / "phone.png"], SPEC, "no")[0].T[None])


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    v = _strokes()
    Image.fromarray(v).save(tmp_path / "8.png")
    Image.fromarray(v.astype(np.uint16) * 257).save(tmp_path / "16.png")  # 0..65535, mode I;16
    with Image.open(tmp_path / "16.png") as im:
        assert im.mode in ("I;16", "I")
    a, b = image_batch([tmp_path / "8.png", tmp_path / "16.png"], SPEC, "no")
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(b)) > 2  # clipping to {0, 255} would leave two values


def _png_header_only(path, width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
                     chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("case", ["bomb", "truncated", "text", "missing", "folder", "empty", "bad_crc"])
def test_bad_image_is_one_line_exit_2(case, model_file, tmp_path, capsys):
    p = tmp_path / "x.png"
    if case == "bomb":
        _png_header_only(p, 20000, 20000)
    elif case == "truncated":
        Image.fromarray(_strokes()).save(p)
        p.write_bytes(p.read_bytes()[:60])
    elif case == "text":
        p.write_text("not an image")
    elif case == "folder":
        p.mkdir()
    elif case == "empty":
        p.write_bytes(b"")
    elif case == "bad_crc":
        Image.fromarray(_strokes()).save(p)
        data = bytearray(p.read_bytes())
        data[30] ^= 0xFF
        p.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=str(p)):
        image_batch([p], SPEC)
    assert infer.main([str(model_file), str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    if case == "bomb":
        assert "too large" in err


def test_the_converter_lives_in_one_place():
    assert infer.image_batch is predictor.image_batch
