"""``python -m refbnn.convert`` and ``crosscheck --against torch-module`` on a checkpoint in the
official Bi-Real Net layout, written here by ``official_bireal_layout`` (the test's own module that
follows the layout: ``module.`` prefixes, flat ``binary_conv.weights``, torch.sign, in-place residual
add) exactly as the official ``train.py`` saves it.

Tolerances: the module binarizes with PyTorch's float32 mean |W| and a straight-through estimator
whose forward values are +-1 only up to float rounding, so each binary conv differs from refbnn's
exact alpha by a few ulp (measured: <= 3e-7 relative per layer, logits <= 5e-7), inside crosscheck's
RTOL 1e-4. The converted file with sign_at_zero=0 binarizes exactly as the module; with +1 its
exact-zero latent weights (planted here) binarize differently and the check fails at the first layer
holding one.
"""

import importlib.util
import json
from collections import OrderedDict

import numpy as np
import pytest

from refbnn import convert, crosscheck, export, fileformat, infer, models
from refbnn.golden import cli as golden_cli

torch = pytest.importorskip("torch", reason="PyTorch (the torch extra) reads the checkpoints")
import official_bireal_layout as official  # noqa: E402  (tests/, on sys.path under pytest)
from one_line import one_error  # noqa: E402

FACTORY = "official_bireal_layout:birealnet18"
SHAPE = "3,32,32"


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tests/conftest.py


def _trained_looking(net, zeros=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("binary_conv.weights"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
                p.view(-1)[:zeros] = 0.0  # exact zeros occur in real checkpoints
            elif name.startswith("conv1") or "downsample.1" in name or name.startswith("fc"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=gen))
    return net


def _save_official(net, path):
    """As the official train.py: DataParallel's state dict plus epoch, best accuracy, optimizer."""
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    net(torch.zeros(2, 3, 32, 32)).sum().backward()
    opt.step()  # a real optimizer state (step counts, moments) in the file
    torch.save({"epoch": 12, "state_dict": torch.nn.DataParallel(net).state_dict(),
                "best_top1_acc": torch.tensor(41.5), "optimizer": opt.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    net = _trained_looking(official.birealnet18())
    return _save_official(net, tmp_path_factory.mktemp("official") / "model_best.pth.tar")


@pytest.fixture(scope="module")
def converted(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "bireal.h5"
    assert convert.main(["bireal", str(ckpt), str(out), "--input-shape", SHAPE]) == 0
    return out


def _verdict(out):
    return [line for line in out.splitlines() if line.startswith(("all ", "first "))][-1]


def test_official_checkpoint_converts(ckpt, tmp_path, capsys):
    out = tmp_path / "b.h5"
    assert convert.main(["bireal", str(ckpt), str(out), "--input-shape", SHAPE]) == 0
    text = capsys.readouterr().out
    assert "official Bi-Real Net layout, module. prefixes; epoch 12, best_top1_acc 41.5" in text
    assert "sign_at_zero=0 (torch.sign, as the official code)" in text
    assert "48 of 171648 latent binary weights are exactly 0" in text  # 16 layers x 3 planted
    f = fileformat.load(out)
    cfg = f.config
    assert (cfg["stem_kernel"], cfg["stem_stride"], cfg["stem_pool"]) == (7, 2, True)  # even at 32x32
    assert cfg["widths"] == [8, 16, 32, 64] and cfg["num_classes"] == 10 and cfg["sign_at_zero"] == 0
    assert f.provenance["epoch"] == 12
    # the tensors, bit for bit
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    w = state["module.layer2.0.binary_conv.weights"].numpy()
    assert np.array_equal(f.state_dict["layer2.0.binary_conv.weight"], w.reshape(16, 8, 3, 3))
    assert np.array_equal(f.state_dict["fc.bias"], state["module.fc.bias"].numpy())
    # and refbnn's model reproduces the module's logits
    net = official.birealnet18()
    net.load_state_dict({k[len("module."):]: v for k, v in state.items()})
    net.eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    model = models.BNNResNet(cfg)
    model.load_state_dict(f.state_dict)
    model.eval()
    want = net(torch.from_numpy(x)).detach().numpy()
    assert np.abs(model(x) - want).max() <= 1e-4 * np.abs(want).max()


def test_crosscheck_against_the_module(converted, ckpt, capsys):
    capsys.readouterr()
    assert crosscheck.main([str(converted), "--against", "torch-module", FACTORY,
                            "--checkpoint", str(ckpt), "--batch", "3"]) == 0
    out = capsys.readouterr().out
    verdict = _verdict(out)
    print(verdict)
    assert verdict.startswith("all 47 comparisons within tolerance; 47 layer outputs compared")
    assert "0 sign flips" in verdict and "not compared" not in out
    # the module's residual add is in place: the hooked bn1 output was copied before it ran
    assert "layer1.0.bn1 " in out


def test_hooks_copy_before_in_place_adds(ckpt):
    net = official.birealnet18()
    net.load_state_dict({k[len("module."):]: v for k, v in
                         torch.load(ckpt, weights_only=True)["state_dict"].items()})
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    run = crosscheck.run_torch(net, x)
    blk = net.layer1[1]
    with torch.no_grad():
        h = net.layer1[0](net.maxpool(net.bn1(net.conv1(torch.from_numpy(x)))))
        bn_out = blk.bn1(blk.binary_conv(blk.binary_activation(h))).numpy()
    assert np.array_equal(run.outputs["layer1.1.bn1"], bn_out)  # not bn_out + h


def test_sign_at_zero_one_disagrees_where_weights_are_zero(ckpt, tmp_path, capsys):
    """Converted with --sign-at-zero 1, the planted zero weights binarize to +1 instead of 0: the
    first binary conv is named, with no input flips (the weights differ, not the inputs)."""
    out = tmp_path / "plus.h5"
    assert convert.main(["bireal", str(ckpt), str(out), "--input-shape", SHAPE,
                         "--sign-at-zero", "1"]) == 0
    assert "sign_at_zero=0" not in capsys.readouterr().out
    assert crosscheck.main([str(out), "--against", "torch-module", FACTORY,
                            "--checkpoint", str(ckpt)]) == 1
    text = capsys.readouterr().out
    assert _verdict(text).startswith("first output beyond tolerance: layer1.0.binary_conv ")
    print(_verdict(text), [line for line in text.splitlines() if "layer outputs compared" in line])


def test_exact_zero_activations_count_as_flips(tmp_path, capsys):
    """A stem BatchNorm channel with scale and shift 0 sends exact zeros into layer1.0's sign. With
    sign_at_zero +1 in refbnn and torch.sign in the module (--other-sign-at-zero 0) they are flips."""
    net = _trained_looking(official.birealnet18(), zeros=0, seed=1)
    with torch.no_grad():
        net.bn1.weight[0] = 0.0
        net.bn1.bias[0] = 0.0
    ckpt = _save_official(net, tmp_path / "z.pth")
    out = tmp_path / "z.h5"
    assert convert.main(["bireal", str(ckpt), str(out), "--input-shape", SHAPE, "--sign-at-zero", "1"]) == 0
    capsys.readouterr()
    args = [str(out), "--against", "torch-module", FACTORY, "--checkpoint", str(ckpt)]
    assert crosscheck.main(args + ["--other-sign-at-zero", "0"]) == 1
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("layer1.0.binary_conv "))
    flips = int(row.split()[4])
    assert flips > 0 and "BEYOND TOLERANCE" in row and "input signs flipped" in row
    assert crosscheck.main(args) == 1  # without the flag the other side is read as +1: no flips
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("layer1.0.binary_conv "))
    assert row.split()[4] == "0"


def test_converted_file_runs_everywhere(converted, tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(img)
    assert infer.main([str(converted), str(img), "--engine", "reference", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert len(top) == 3
    assert infer.main([str(converted), str(img)]) == 2  # the packed engine: ternary, one line
    assert "--engine reference runs it on the float path" in one_error(capsys)
    assert golden_cli.main([str(tmp_path / "g"), "--weights", str(converted), "--batch", "2"]) == 0
    assert crosscheck.main([str(converted), "--against", "golden", str(tmp_path / "g" / "model.h5")]) == 0
    assert crosscheck.main([str(converted), "--against", "torch"]) == 0  # the twin, torch.sign too
    capsys.readouterr()
    # one bit cannot hold a ternary sign: a packed-only export is refused in one line, nothing written
    assert export.main([str(converted), str(tmp_path / "p.h5"), "--packed-only"]) == 2
    assert "sign_at_zero=0" in one_error(capsys)
    assert not (tmp_path / "p.h5").exists()
    if importlib.util.find_spec("onnxruntime"):
        assert export.main([str(converted), str(tmp_path / "c.onnx"), "--onnx", "--layer-outputs"]) == 0
        capsys.readouterr()
        assert crosscheck.main([str(converted), "--against", "onnx", str(tmp_path / "c.onnx")]) == 0
        print(_verdict(capsys.readouterr().out))


def test_twin_state_dict_converts(tmp_path, capsys):
    """A plain state dict of refbnn's PyTorch twin (.pt): ``bireal`` for Bi-Real configs, ``twin``
    for any config."""
    from refbnn.interop.torch import to_torch_state, twin

    cfg = models.get_config("ftbnn18", input_shape=[1, 12, 12], width_multiplier=0.125, num_classes=10)
    model = models.BNNResNet(cfg)
    from refbnn.golden.model import randomize_state

    randomize_state(model, 2)
    t = twin(cfg)
    t.load_state_dict(to_torch_state(model.state_dict()))
    torch.save(t.state_dict(), tmp_path / "twin.pt")
    out = tmp_path / "t.h5"
    assert convert.main(["twin", str(tmp_path / "twin.pt"), str(out), "--model", "ftbnn18",
                         "--input-shape", "1,12,12", "--width-multiplier", "0.125"]) == 0
    f = fileformat.load(out)
    assert all(np.array_equal(f.state_dict[k], v) for k, v in model.state_dict().items())
    assert crosscheck.main([str(out), "--against", "torch"]) == 0
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert convert.main(["twin", str(tmp_path / "twin.pt"), str(tmp_path / "t2.h5"),
                         "--config", str(tmp_path / "cfg.json")]) == 0
    capsys.readouterr()
    for bad in ("0", "nan", "-1"):
        assert convert.main(["twin", str(tmp_path / "twin.pt"), str(tmp_path / "t3.h5"), "--model",
                             "ftbnn18", "--width-multiplier", bad]) == 2
        assert "--width-multiplier" in one_error(capsys)
    assert convert.main(["twin", str(tmp_path / "twin.pt"), str(tmp_path / "t3.h5"), "--model",
                         "ftbnn18", "--input-shape", "1,12,12"]) == 2  # full width: shapes differ
    assert "needs" in one_error(capsys)
    assert convert.main(["twin", str(tmp_path / "twin.pt"), str(tmp_path / "t3.h5"), "--model",
                         "nosuchmodel"]) == 2
    assert "unknown model" in one_error(capsys)
    # a Bi-Real twin's state dict through the bireal command (4-D weights, no prefixes)
    bcfg = models.get_config("birealnet18", input_shape=[3, 32, 32], width_multiplier=0.125,
                             num_classes=10, stem_kernel=7, stem_stride=2, stem_pool=True)
    bmodel = models.BNNResNet(bcfg)
    randomize_state(bmodel, 3)
    torch.save(to_torch_state(bmodel.state_dict()), tmp_path / "b.pth")
    assert convert.main(["bireal", str(tmp_path / "b.pth"), str(tmp_path / "b.h5"),
                         "--input-shape", SHAPE, "--sign-at-zero", "1"]) == 0
    assert "refbnn twin layout" in capsys.readouterr().out
    g = fileformat.load(tmp_path / "b.h5")
    assert all(np.array_equal(g.state_dict[k], v) for k, v in bmodel.state_dict().items())


class _Boom:
    def __reduce__(self):
        return (print, ("code in the checkpoint ran",))


def _official_state(ckpt):
    return OrderedDict(torch.load(ckpt, weights_only=True)["state_dict"])


def test_conversion_errors_are_one_line(ckpt, tmp_path, capsys):
    def run(state_or_obj, *extra, name="bad.pth"):
        path = tmp_path / name
        torch.save(state_or_obj, path)
        rc = convert.main(["bireal", str(path), str(tmp_path / "out.h5"), "--input-shape", SHAPE, *extra])
        return rc, one_error(capsys) if rc else capsys.readouterr()

    state = _official_state(ckpt)
    # a 3x3 stem (a CIFAR variant): the official architecture needs 7x7
    bad = OrderedDict(state, **{"module.conv1.weight": torch.zeros(8, 3, 3, 3)})
    rc, err = run({"state_dict": bad})
    assert rc == 2 and "conv1.weight: shape (8, 3, 3, 3) in" in err and "needs (8, 3, 7, 7)" in err
    # a flat binary weight of the wrong length
    bad = OrderedDict(state, **{"module.layer3.1.binary_conv.weights": torch.zeros(100, 1)})
    rc, err = run({"state_dict": bad})
    assert rc == 2 and "layer3.1.binary_conv.weights: shape (100, 1)" in err and "(32, 32, 3, 3)" in err
    rc, err = run({"state_dict": OrderedDict(state, **{"module.extra.weight": torch.zeros(3)})})
    assert rc == 2 and "unexpected tensor extra.weight in" in err
    rc, err = run({"state_dict": OrderedDict((k, v) for k, v in state.items()
                                             if "layer2.1.bn1.bias" not in k)})
    assert rc == 2 and "lacks layer2.1.bn1.bias" in err
    rc, err = run({"state_dict": state}, "--model", "birealnet34")
    assert rc == 2 and "layer1.4" in err  # 34 has 6 blocks in stage 1
    rc, err = run({"state_dict": state}, "--input-shape", "1,32,32")
    assert rc == 2 and "input channels" in err
    # nothing in a file runs: weights_only refuses arbitrary objects
    rc, err = run({"state_dict": state, "hook": _Boom()})
    assert rc == 2 and "weights-only" in err
    assert "code in the checkpoint ran" not in capsys.readouterr().out
    (tmp_path / "junk.pth").write_bytes(b"junk")
    assert convert.main(["bireal", str(tmp_path / "junk.pth"), str(tmp_path / "o.h5")]) == 2
    one_error(capsys)
    assert convert.main(["bireal", str(tmp_path / "absent.pth"), str(tmp_path / "o.h5")]) == 2
    assert "no such file" in one_error(capsys)
    assert convert.main(["bireal", str(ckpt), str(ckpt)]) == 2
    assert "replace the checkpoint" in one_error(capsys)
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / "o.h5").exists()


def test_missing_torch_is_one_line(ckpt, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torch" else real(n, *a))
    assert convert.main(["bireal", str(ckpt), str(tmp_path / "o.h5")]) == 2
    assert "needs PyTorch" in one_error(capsys)


def test_torch_module_errors_are_one_line(converted, ckpt, tmp_path, capsys):
    base = [str(converted), "--against", "torch-module"]
    cases = [
        (["no_colon", "--checkpoint", str(ckpt)], "PKG.MODULE:FACTORY"),
        (["absent_pkg_xyz.mod:f", "--checkpoint", str(ckpt)], "cannot import absent_pkg_xyz.mod"),
        (["official_bireal_layout:nothing", "--checkpoint", str(ckpt)], "no callable nothing"),
        ([FACTORY, "--checkpoint", str(ckpt), "--factory-kwargs", '{"width": 16}'], "does not fit"),
        ([FACTORY, "--checkpoint", str(ckpt), "--factory-kwargs", '{"bogus": 1}'], "TypeError"),
        ([FACTORY, "--checkpoint", str(ckpt), "--factory-kwargs", "[1]"], "JSON object"),
        ([FACTORY, "--checkpoint", str(tmp_path / "absent.pth")], "no such file"),
        ([FACTORY, "--checkpoint", str(ckpt), "--train"], "eval mode only"),
        ([FACTORY], "needs --checkpoint"),
        ([FACTORY, "--checkpoint", str(ckpt), "--rename", str(tmp_path / "absent.json")], "rename map"),
    ]
    for extra, message in cases:
        assert crosscheck.main(base + extra) == 2, extra
        assert message in one_error(capsys), extra
    # the module fails on the input: 1-channel images into a 3-channel stem
    gray = tmp_path / "gray.h5"
    cfg = dict(fileformat.load(converted).config, input_shape=[1, 32, 32])
    m = models.BNNResNet(cfg)
    fileformat.save_model(gray, m.state_dict(), config=m.config, binary_weights=m.binary_weights())
    assert crosscheck.main([str(gray), "--against", "torch-module", FACTORY, "--checkpoint", str(ckpt)]) == 2
    assert "failed on the (2, 1, 32, 32) input batch" in one_error(capsys)
