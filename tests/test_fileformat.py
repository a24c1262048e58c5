"""refbnn's HDF5 format: bit-exact round trips, the packed-bit layout against the reference oracle,
the packed-only size, and one FormatError (naming file and HDF5 path) per kind of damage."""

import hashlib
import json
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refbnn import fileformat as ff
from refbnn import reference
from refbnn.fileformat import FormatError

INPUT_SPEC = {"shape": [1, 28, 28], "layout": "NCHW", "channel_order": "L",
              "mean": [0.1307], "std": [0.3081]}


def oracle_packed(weight, sign_at_zero=1):
    """The specified layout, from the slow oracle: pack(sign(W) with axis 1 moved last)."""
    return reference.pack(np.moveaxis(np.asarray(weight), 1, -1), 64, sign_at_zero)


def synthetic_state(seed=0):
    """A state dict exercising every case: binary conv (grouped, I not a multiple of 64, exact
    zeros and -0.0), binary linear, real tensors of several dtypes, scalars, an empty tensor and a
    key without a dot."""
    rng = np.random.default_rng(seed)
    conv = rng.standard_normal((12, 5, 3, 3)).astype(np.float32)
    conv[0, 0, 0, :] = [0.0, -0.0, 0.0]
    real = rng.standard_normal((4, 3)).astype(np.float64)
    real[0, 0] = np.nan  # real tensors are stored bit for bit, NaN included
    state = {
        "stem.weight": rng.standard_normal((8, 1, 3, 3)).astype(np.float32),
        "layer1.0.conv.weight": conv,
        "layer1.0.bn.weight": rng.standard_normal(12).astype(np.float32),
        "layer1.0.bn.running_var": rng.random(12).astype(np.float32),
        "layer1.0.bn.num_batches_tracked": np.array(17, dtype=np.int64),
        "layer1.1.conv.weight": rng.standard_normal((130, 70, 1, 1)).astype(np.float32),
        "fc.weight": rng.standard_normal((10, 130)).astype(np.float32),
        "fc.bias": np.zeros(10, np.float32),
        "head.table": rng.integers(-5, 5, size=(3, 2), dtype=np.int8),
        "head.real": real,
        "head.empty": np.zeros((0, 4), np.float32),
        "temperature": np.array(0.5, dtype=np.float32),
    }
    binary = {"layer1.0.conv.weight": {"groups": 3, "sign_at_zero": -1},
              "layer1.1.conv.weight": {"groups": 1, "sign_at_zero": 1,
                                       "scale": rng.random(130).astype(np.float32)},
              "fc.weight": {}}
    return state, binary


def save_synthetic(path, **kw):
    state, binary = synthetic_state()
    ff.save_model(path, state, config={"arch": "test", "width": 2}, binary_weights=binary,
                  input_spec=INPUT_SPEC, class_names=[str(i) for i in range(10)],
                  dataset="mnist", metrics={"top1": np.float32(0.75)},
                  provenance={"command": "refbnn.train --seed 3", "seed": 3}, **kw)
    return state, binary


def assert_bit_equal(a, b, name):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, name
    assert a.tobytes() == b.tobytes(), name


def test_model_round_trip_is_bit_exact(tmp_path):
    path = tmp_path / "m.h5"
    state, binary = save_synthetic(path)
    f = ff.load(path, expect=state)
    assert f.kind == "model" and f.version == 1 and f.refbnn_version
    assert f.names == list(state) and list(f.state_dict) == list(state)
    for name, value in state.items():
        assert_bit_equal(f.state_dict[name], value, name)
    assert list(f.packed) == list(binary)
    for name, spec in binary.items():
        saz = spec.get("sign_at_zero", 1)
        assert_bit_equal(f.packed[name], oracle_packed(state[name], saz), name)
        assert f.binary[name] == ff.BinaryWeight(state[name].shape, spec.get("groups", 1), saz)
        if "scale" in spec:
            assert_bit_equal(f.binary[name].scale, spec["scale"], name + " scale")
        else:
            assert f.binary[name].scale is None
    assert f.config == {"arch": "test", "width": 2}
    assert f.input_spec == INPUT_SPEC and f.class_names == [str(i) for i in range(10)]
    assert f.dataset == "mnist" and f.metrics == {"top1": 0.75}
    assert f.provenance == {"command": "refbnn.train --seed 3", "seed": 3}
    assert f.epoch is None and f.optimizer_state is None


def test_file_layout_matches_the_spec(tmp_path):
    """The on-disk names, attributes and dtypes that docs/format.md promises other readers."""
    path = tmp_path / "m.h5"
    save_synthetic(path)
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "refbnn" and f.attrs["format_version"] == 1
        assert f.attrs["kind"] == "model" and json.loads(f.attrs["input_spec"]) == INPUT_SPEC
        assert list(f["model"]) == ["stem", "layer1.0.conv", "layer1.0.bn", "layer1.1.conv", "fc",
                                    "head", "temperature"]
        conv = f["model/layer1.0.conv"]
        assert list(conv) == ["weight", "weight_packed"]
        assert conv["weight"].dtype == np.dtype("<f4")
        packed = conv["weight_packed"]
        assert packed.dtype == np.dtype("<u8") and packed.shape == (12, 3, 3, 1)
        assert dict(packed.attrs) | {"unpacked_shape": None} == {
            "packs": "weight", "layout": "OHWI", "unpacked_shape": None, "groups": 3,
            "sign_at_zero": -1, "word_bits": 64, "bit_order": "lsb_first", "bit_one_means": -1}
        assert list(packed.attrs["unpacked_shape"]) == [12, 5, 3, 3]
        assert f["model/fc/weight_packed"].attrs["layout"] == "OI"
        assert f["model/layer1.1.conv/weight_packed"].attrs["scale"].dtype == np.dtype("<f4")
        assert f["model/layer1.0.bn/num_batches_tracked"].dtype == np.dtype("<i8")
        assert f["model/layer1.0.bn/num_batches_tracked"].shape == ()
        assert f["model/temperature"][()] == np.float32(0.5)


def test_user_block_holds_the_sha256_of_the_rest(tmp_path):
    path = tmp_path / "m.h5"
    save_synthetic(path)
    data = path.read_bytes()
    digest = hashlib.sha256(data[512:]).hexdigest()
    assert data[:512] == f"refbnn-hdf5 1\nsha256 {digest}\n".encode().ljust(512, b"\0")
    assert data[512:520] == b"\x89HDF\r\n\x1a\n"  # the HDF5 superblock follows the user block


def test_a_file_written_from_the_spec_alone_loads(tmp_path):
    """docs/format.md is enough to write a valid file: plain h5py (default HDF5 format bounds, no
    creation-order tracking, fixed-length strings, int32 attributes) plus the user block."""
    path = tmp_path / "hand.h5"
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    words = reference.pack(np.moveaxis(w, 1, -1), 64, 1)
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, value in {"format": "refbnn", "format_version": np.int32(1), "kind": "packed",
                            "config": '{"arch": "hand"}', "input_spec": "null",
                            "class_names": '["a", "b"]', "dataset": "", "metrics": "null",
                            "refbnn_version": "other-implementation 0.1",
                            "provenance": '{"seed": 1}'}.items():
            f.attrs[name] = np.bytes_(value) if isinstance(value, str) else value
        f.create_dataset("model/conv/weight_packed", data=words)
        for name, value in {"packs": "weight", "layout": "OHWI", "unpacked_shape": [6, 3, 3, 3],
                            "groups": 1, "sign_at_zero": 1, "word_bits": 64,
                            "bit_order": "lsb_first", "bit_one_means": -1}.items():
            f["model/conv/weight_packed"].attrs[name] = value
        f.create_dataset("model/conv/bias", data=np.arange(6, dtype=np.float32))
    reseal(path)
    loaded = ff.load(path, expect={"conv.weight": w, "conv.bias": np.zeros(6, np.float32)})
    assert loaded.kind == "packed" and loaded.config == {"arch": "hand"}
    assert loaded.names == ["conv.bias", "conv.weight"]  # name order without creation order
    assert_bit_equal(loaded.packed["conv.weight"], words, "words")
    assert_bit_equal(loaded.sign_state_dict()["conv.weight"],
                     reference.sign(w).astype(np.float32), "signs")


def test_checkpoint_round_trip_restores_optimizer_and_rng(tmp_path):
    path = tmp_path / "c.h5"
    state, binary = synthetic_state()
    rng = np.random.default_rng(12345)
    rng.random(7)
    momentum = {f"momentum.{k}": np.full(v.shape, 0.25, np.float32) for k, v in state.items()
                if v.dtype == np.float32}
    momentum["step"] = np.array(41, np.int64)
    history = [{"epoch": 1, "loss": 2.5, "acc": None}, {"epoch": 2, "loss": 1.25, "acc": 0.5}]
    ff.save_checkpoint(path, state, config={"arch": "test"}, binary_weights=binary,
                       optimizer_state=momentum,
                       optimizer_hyperparameters={"name": "adam", "lr": 1e-3, "betas": [0.9, 0.999]},
                       rng_state=rng.bit_generator.state, epoch=2, history=history)
    f = ff.load(path, expect=state)
    assert f.kind == "checkpoint" and f.epoch == 2 and f.history == history
    assert list(f.optimizer_state) == list(momentum)
    for name, value in momentum.items():
        assert_bit_equal(f.optimizer_state[name], value, name)
    assert f.optimizer_hyperparameters == {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.999]}
    restored = np.random.default_rng(0)
    restored.bit_generator.state = f.rng_state
    assert np.array_equal(restored.random(5), rng.random(5))
    for name, value in state.items():
        assert_bit_equal(f.state_dict[name], value, name)


def test_packed_only_keeps_bits_and_drops_latent_weights(tmp_path):
    path = tmp_path / "p.h5"
    state, binary = save_synthetic(path, packed_only=True)
    f = ff.load(path, expect=state)
    assert f.kind == "packed" and f.names == list(state)
    assert list(f.state_dict) == [k for k in state if k not in binary]
    for name, spec in binary.items():
        saz = spec.get("sign_at_zero", 1)
        assert_bit_equal(f.packed[name], oracle_packed(state[name], saz), name)
    assert_bit_equal(f.binary["layer1.1.conv.weight"].scale, binary["layer1.1.conv.weight"]["scale"],
                     "scale")
    signs = f.sign_state_dict()
    assert list(signs) == list(state)
    for name, spec in binary.items():
        expected = reference.sign(state[name], spec.get("sign_at_zero", 1)).astype(np.float32)
        assert_bit_equal(signs[name], expected, name)
    assert_bit_equal(signs["fc.bias"], state["fc.bias"], "fc.bias")


def test_export_packed_equals_direct_packed_save(tmp_path):
    save_synthetic(tmp_path / "m.h5")
    ff.export_packed(tmp_path / "m.h5", tmp_path / "e.h5")
    save_synthetic(tmp_path / "p.h5", packed_only=True)
    e, p = ff.load(tmp_path / "e.h5"), ff.load(tmp_path / "p.h5")
    assert e.kind == "packed" and e.names == p.names and e.config == p.config
    for name in p.packed:
        assert_bit_equal(e.packed[name], p.packed[name], name)
        assert e.binary[name] == p.binary[name]
    assert_bit_equal(e.binary["layer1.1.conv.weight"].scale, p.binary["layer1.1.conv.weight"].scale,
                     "scale")
    for name in p.state_dict:
        assert_bit_equal(e.state_dict[name], p.state_dict[name], name)


def bireal18_binary_layers(rng):
    """The 16 binary 3x3 convolutions of Bi-Real Net-18 (ImageNet widths), PyTorch layout."""
    shapes = []
    c_in = 64
    for width in (64, 128, 256, 512):
        for _ in range(4):
            shapes.append((width, c_in, 3, 3))
            c_in = width
    return {f"layer{i // 4 + 1}.{i % 4}.conv.weight": rng.standard_normal(s).astype(np.float32)
            for i, s in enumerate(shapes)}


def test_packed_only_is_over_20x_smaller_than_float32(tmp_path):
    state = bireal18_binary_layers(np.random.default_rng(0))
    binary = {name: {} for name in state}
    ff.save_model(tmp_path / "p.h5", state, config={"arch": "birealnet18"},
                  binary_weights=binary, packed_only=True)
    float32_bytes = sum(v.size * 4 for v in state.values())
    ratio = float32_bytes / os.path.getsize(tmp_path / "p.h5")
    # 32x is the ideal (1 bit per float32 weight; every I here is a multiple of 64); the rest is
    # HDF5 metadata and attributes.
    assert ratio >= 20, ratio


# --- damage: each kind raises one FormatError naming the file and the HDF5 path -----------------

def reseal(path):
    """Rewrite the user block as docs/format.md section 1 specifies, so an edited file's damage is
    seen by the structural checks rather than by the checksum (a buggy writer's consistent file)."""
    data = Path(path).read_bytes()
    head = f"refbnn-hdf5 1\nsha256 {hashlib.sha256(data[512:]).hexdigest()}\n".encode()
    Path(path).write_bytes(head.ljust(512, b"\0") + data[512:])


def edit(path, fn):
    with h5py.File(path, "a") as f:
        fn(f)
    reseal(path)


def set_attr(hpath, name, value):
    def fn(f):
        f[hpath].attrs[name] = value
    return fn


def replace_dataset(hpath, make):
    def fn(f):
        old = f[hpath]
        data, attrs = old[()], dict(old.attrs)
        del f[hpath]
        new = f.create_dataset(hpath, data=make(data))
        for k, v in attrs.items():
            new.attrs[k] = v
    return fn


def delete(hpath):
    def fn(f):
        del f[hpath]
    return fn


def flip_one_bit(data):
    data = data.copy()
    data[1, 0, 0, 0] ^= np.uint64(1)
    return data


DAMAGE = {
    "wrong format string": (set_attr("/", "format", "keras"), "/", "not a refbnn file"),
    "missing format attribute": (lambda f: f.attrs.__delitem__("format"), "/", "not a refbnn file"),
    "future version": (set_attr("/", "format_version", np.int64(2)), "/", "newer"),
    "version as string": (set_attr("/", "format_version", "1"), "/", "integer"),
    "unknown kind": (set_attr("/", "kind", "weights"), "/", "'kind'"),
    "invalid JSON": (set_attr("/", "config", "{'arch': 'x'"), "/", "not valid JSON"),
    "NaN in JSON": (set_attr("/", "metrics", '{"top1": NaN}'), "/", "not valid JSON"),
    "JSON of the wrong type": (set_attr("/", "config", "[1, 2]"), "/", "JSON dict"),
    "bad input_spec": (set_attr("/", "input_spec", '{"shape": [1, 28, 28]}'), "/", "input_spec"),
    "unknown root attribute": (set_attr("/", "pickle", "x"), "/", "unexpected attribute"),
    "unknown root member": (lambda f: f.create_group("extra"), "/", "unexpected member"),
    "missing /model": (delete("/model"), "/", "missing member 'model'"),
    "unsupported dtype": (replace_dataset("/model/fc/bias", lambda d: d.astype(bool)),
                          "/model/fc/bias", "unsupported dtype"),
    "latent weight missing next to packed bits": (
        delete("/model/layer1.0.conv/weight"), "/model/layer1.0.conv/weight", "missing latent"),
    "packed bits flipped vs latent signs": (
        replace_dataset("/model/layer1.0.conv/weight_packed", flip_one_bit),
        "/model/layer1.0.conv/weight_packed", "disagree"),
    "latent weight of the wrong shape": (
        replace_dataset("/model/fc/weight", lambda d: d[:, :-1]), "/model/fc/weight",
        "does not match"),
    "packed bits of the wrong shape": (
        replace_dataset("/model/fc/weight_packed", lambda d: d[:-1]), "/model/fc/weight_packed",
        "shape"),
    "packed bits with a wrong attribute": (
        set_attr("/model/fc/weight_packed", "bit_order", "msb_first"), "/model/fc/weight_packed",
        "bit_order"),
    "packed bits with a missing attribute": (
        lambda f: f["/model/fc/weight_packed"].attrs.__delitem__("groups"),
        "/model/fc/weight_packed", "missing attribute 'groups'"),
    "scale of the wrong length": (
        set_attr("/model/layer1.1.conv/weight_packed", "scale", np.ones(129, np.float32)),
        "/model/layer1.1.conv/weight_packed", "attribute 'scale'"),
    "scale as float64": (
        set_attr("/model/layer1.1.conv/weight_packed", "scale", np.ones(130, np.float64)),
        "/model/layer1.1.conv/weight_packed", "attribute 'scale'"),
    "groups not dividing O": (set_attr("/model/fc/weight_packed", "groups", np.int64(3)),
                              "/model/fc/weight_packed", "groups"),
    "padding bits set": (
        replace_dataset("/model/fc/weight_packed", lambda d: d | np.uint64(1 << 63)),
        "/model/fc/weight_packed", "unused high bits"),
    "attribute on a tensor": (set_attr("/model/fc/bias", "scale", 2.0), "/model/fc/bias",
                              "unexpected attribute"),
    "soft link": (lambda f: f["model/fc"].__setitem__("alias", h5py.SoftLink("/model/fc/bias")),
                  "/model/fc/alias", "hard links"),
    "nested group": (lambda f: f["model/fc"].create_group("inner"), "/model/fc/inner",
                     "must be a dataset"),
    "dataset name with a dot": (
        lambda f: f["model/fc"].create_dataset("w.x", data=np.zeros(2, np.float32)),
        "/model/fc/w.x", "must not contain '.'"),
    "compressed dataset": (
        lambda f: (f["model/fc"].__delitem__("bias"),
                   f["model/fc"].create_dataset("bias", data=np.zeros(10, np.float32),
                                                compression="gzip")),
        "/model/fc/bias", "without filters"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_file_raises_format_error_naming_the_path(tmp_path, case):
    fn, hpath, words = DAMAGE[case]
    path = tmp_path / "m.h5"
    save_synthetic(path)
    ff.load(path)  # intact before the edit
    edit(path, fn)
    with pytest.raises(FormatError) as info:
        ff.load(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.file == str(path) and err.hdf5_path == hpath
    assert str(path) in str(err) and hpath in str(err) and words in str(err), str(err)


def test_packed_only_file_must_not_hold_latent_binary_weights(tmp_path):
    path = tmp_path / "p.h5"
    save_synthetic(path, packed_only=True)
    edit(path, lambda f: f["model/fc"].create_dataset("weight", data=np.ones((10, 130), "f4")))
    with pytest.raises(FormatError, match=r"p\.h5: /model/fc/weight: a 'packed' file must not"):
        ff.load(path)


def test_packed_only_file_checks_padding_bits(tmp_path):
    path = tmp_path / "p.h5"
    save_synthetic(path, packed_only=True)
    edit(path, replace_dataset("/model/layer1.0.conv/weight_packed", lambda d: d | np.uint64(32)))
    assert path.read_bytes()[:14] == b"refbnn-hdf5 1\n"
    with pytest.raises(FormatError, match=r"/model/layer1.0.conv/weight_packed: unused high bits"):
        ff.load(path)


def test_not_hdf5_and_truncated_files(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"this is not an HDF5 file\n" * 40)
    with pytest.raises(FormatError, match=r"junk\.h5: /: not a refbnn file"):
        ff.load(junk)
    path = tmp_path / "m.h5"
    save_synthetic(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=r"cut\.h5: /: .*truncated or damaged"):
        ff.load(cut)
    reseal(cut)  # a consistent checksum does not make a truncated file readable
    with pytest.raises(FormatError, match=r"cut\.h5: /: not a readable HDF5 file"):
        ff.load(cut)
    (tmp_path / "empty.h5").write_bytes(b"")
    with pytest.raises(FormatError, match=r"empty\.h5: /: not a refbnn file"):
        ff.load(tmp_path / "empty.h5")
    with pytest.raises(FileNotFoundError):
        ff.load(tmp_path / "absent.h5")


def test_any_changed_byte_is_caught_by_the_checksum(tmp_path):
    path = tmp_path / "m.h5"
    save_synthetic(path)
    data = path.read_bytes()
    for offset in (100, 600, len(data) // 2, len(data) - 1):  # user block, metadata, data, end
        damaged = bytearray(data)
        damaged[offset] ^= 0x10
        path.write_bytes(bytes(damaged))
        with pytest.raises(FormatError, match=r"m\.h5: /: .*(user block|SHA-256)"):
            ff.load(path)


def test_plain_hdf5_without_user_block_is_refused(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "refbnn"
        f.create_group("model")
    with pytest.raises(FormatError, match=r"plain\.h5: /: not a refbnn file \(no refbnn user block"):
        ff.load(path)


@pytest.mark.parametrize("change, hpath, words", [
    (lambda s: s.update({"layer9.conv.weight": np.zeros((2, 2), np.float32)}),
     "/model/layer9.conv/weight", "missing tensor 'layer9.conv.weight'"),
    (lambda s: s.update({"bias": np.zeros(2, np.float32)}), "/model/bias", "missing tensor"),
    (lambda s: s.pop("head.table"), "/model/head/table", "unexpected tensor 'head.table'"),
    (lambda s: s.pop("fc.weight"), "/model/fc/weight", "unexpected tensor 'fc.weight'"),
    (lambda s: s.update({"fc.bias": np.zeros(11, np.float32)}), "/model/fc/bias",
     "shape (10,) but expected (11,)"),
    (lambda s: s.update({"fc.weight": (10, 131)}), "/model/fc/weight", "shape"),
    (lambda s: s.update({"fc.bias": np.zeros(10, np.float64)}), "/model/fc/bias",
     "dtype float32 but expected float64"),
    (lambda s: s.update({"layer1.0.bn.num_batches_tracked": np.array(0, np.int32)}),
     "/model/layer1.0.bn/num_batches_tracked", "dtype int64"),
])
def test_expect_catches_missing_extra_shape_and_dtype(tmp_path, change, hpath, words):
    path = tmp_path / "m.h5"
    state, _ = save_synthetic(path)
    expect = dict(state)
    change(expect)
    with pytest.raises(FormatError) as info:
        ff.load(path, expect=expect)
    assert info.value.hdf5_path == hpath and words in str(info.value), str(info.value)
    assert str(path) in str(info.value)


def test_bad_expect_is_the_callers_value_error(tmp_path):
    path = tmp_path / "m.h5"
    save_synthetic(path)
    with pytest.raises(ValueError, match=r"expect\['fc.bias'\]") as info:
        ff.load(path, expect={"fc.bias": "ten"})
    assert not isinstance(info.value, FormatError)


def test_expect_on_packed_only_file_uses_the_unpacked_shape(tmp_path):
    path = tmp_path / "p.h5"
    state, _ = save_synthetic(path, packed_only=True)
    ff.load(path, expect={k: v.shape for k, v in state.items()})
    expect = dict(state, **{"fc.weight": np.zeros((10, 129), np.float32)})
    with pytest.raises(FormatError, match=r"/model/fc/weight_packed: shape \(10, 130\)"):
        ff.load(path, expect=expect)


# --- writing: atomic, and bad input is a ValueError -----------------------------------------------

def tmp_files(folder: Path):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_failed_write_removes_temp_file_and_keeps_destination(tmp_path, monkeypatch):
    path = tmp_path / "m.h5"
    save_synthetic(path)
    before = path.read_bytes()
    opened = []
    real_file = h5py.File

    def spy(name, *args, **kw):
        opened.append(Path(name))
        return real_file(name, *args, **kw)

    monkeypatch.setattr(ff.h5py, "File", spy)
    state = {"a.weight": np.ones(3, np.float32), "b.weight": object()}
    with pytest.raises(ValueError, match=r"state_dict\['b.weight'\]: unsupported dtype object"):
        ff.save_model(path, state, config={})
    assert len(opened) == 1 and opened[0].name.startswith("m.h5.tmp-")  # the write had begun
    assert opened[0].parent == tmp_path and not opened[0].exists()
    assert tmp_files(tmp_path) == [] and path.read_bytes() == before


def test_failure_at_replace_removes_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "m.h5"
    save_synthetic(path)
    before = path.read_bytes()

    def broken_replace(src, dst):
        assert Path(src).exists()
        raise OSError("disk full")

    monkeypatch.setattr(ff.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_synthetic(path)
    assert tmp_files(tmp_path) == [] and path.read_bytes() == before


def test_nan_latent_binary_weight_is_refused_mid_write(tmp_path):
    state, binary = synthetic_state()
    state["fc.weight"][3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ff.save_model(tmp_path / "m.h5", state, config={}, binary_weights=binary)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("state, binary, kw, words", [
    ({"a..b": np.zeros(1)}, {}, {}, "empty name component"),
    ({"a/b": np.zeros(1)}, {}, {}, "not a valid name"),
    ({"x.weight_packed": np.zeros(1)}, {}, {}, "reserved"),
    ({"a": np.zeros(1), "a.b": np.zeros(1)}, {}, {}, "clashes"),
    ({"a.b": np.zeros(1, bool)}, {}, {}, "unsupported dtype bool"),
    ({"a.w": np.zeros((4, 2))}, {"a.v": {}}, {}, "not a state_dict key"),
    ({"a.w": np.zeros((4, 2))}, {"a.w": {"groups": 3}}, {}, "groups=3"),
    ({"a.w": np.zeros((4, 2))}, {"a.w": {"sign_at_zero": 2}}, {}, "sign_at_zero"),
    ({"a.w": np.zeros((4, 2))}, {"a.w": {"group": 2}}, {}, "unknown options"),
    ({"a.w": np.zeros(4)}, {"a.w": {}}, {}, "2-4 axes"),
    ({"a.w": np.zeros((4, 2))}, {"a.w": {"scale": np.ones(4)}}, {}, "scale must be 4 finite float32"),
    ({"a.w": np.zeros((4, 2))}, {"a.w": {"scale": np.ones(3, np.float32)}}, {}, "scale must be"),
    ({"a.w": np.zeros((4, 2), np.int32)}, {"a.w": {}}, {}, "float array"),
    ({}, {}, {"metrics": {"loss": float("nan")}}, "NaN"),
    ({}, {}, {"config": [1]}, "config must be a JSON dict"),
    ({}, {}, {"provenance": {"when": object()}}, "not JSON-able"),
    ({}, {}, {"class_names": [1, 2]}, "class_names"),
    ({}, {}, {"input_spec": dict(INPUT_SPEC, std=[0.0])}, "'std'"),
    ({}, {}, {"input_spec": dict(INPUT_SPEC, layout="CHW")}, "'layout'"),
    ({}, {}, {"input_spec": dict(INPUT_SPEC, channel_order="RGB")}, "'channel_order'"),
])
def test_bad_save_arguments_raise_value_error_and_write_nothing(tmp_path, state, binary, kw, words):
    kw.setdefault("config", {})
    with pytest.raises(ValueError) as info:
        ff.save_model(tmp_path / "m.h5", state, binary_weights=binary, **kw)
    assert words in str(info.value), str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_ternary_sign_weights_are_stored_unpacked_and_cannot_be_exported(tmp_path):
    state, _ = synthetic_state()
    binary = {"fc.weight": {"sign_at_zero": 0}, "layer1.1.conv.weight": {}}
    ff.save_model(tmp_path / "m.h5", state, config={}, binary_weights=binary)
    f = ff.load(tmp_path / "m.h5", expect=state)
    assert list(f.packed) == ["layer1.1.conv.weight"]
    assert_bit_equal(f.state_dict["fc.weight"], state["fc.weight"], "fc.weight")
    with h5py.File(tmp_path / "m.h5", "r") as h:
        assert list(h["model/fc"]) == ["weight", "bias"]
    with pytest.raises(ValueError, match="sign_at_zero=0"):
        ff.save_model(tmp_path / "p.h5", state, config={}, binary_weights=binary, packed_only=True)
    assert not (tmp_path / "p.h5").exists()


def test_bad_checkpoint_arguments(tmp_path):
    common = dict(config={}, optimizer_hyperparameters={}, rng_state=None, history=[])
    with pytest.raises(ValueError, match="epoch"):
        ff.save_checkpoint(tmp_path / "c.h5", {}, optimizer_state={}, epoch=-1, **common)
    with pytest.raises(ValueError, match="optimizer_state key"):
        ff.save_checkpoint(tmp_path / "c.h5", {}, optimizer_state={"a/b": np.zeros(1)}, epoch=0,
                           **common)
    with pytest.raises(ValueError, match="not JSON-able"):
        ff.save_checkpoint(tmp_path / "c.h5", {}, optimizer_state={}, epoch=0,
                           **dict(common, rng_state={"key": np.zeros(3)}))
    assert list(tmp_path.iterdir()) == []


# --- the packed layout, over shapes --------------------------------------------------------------

@st.composite
def binary_weights(draw):
    ndim = draw(st.sampled_from([2, 3, 4]))
    groups = draw(st.integers(1, 3))
    o = groups * draw(st.integers(1, 4))
    i = draw(st.integers(0, 140))
    spatial = tuple(draw(st.integers(1, 3)) for _ in range(ndim - 2))
    shape = (o, i, *spatial)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # a mix of signs with exact +-0.0 so sign_at_zero matters
    w = rng.choice(np.array([-1.5, -0.0, 0.0, 0.25, 2.0], np.float32), size=shape)
    return w, groups, draw(st.sampled_from([1, -1]))


@given(binary_weights())
def test_packed_layout_equals_reference_pack_of_transposed_signs(case):
    w, groups, saz = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "w.h5"
        ff.save_model(path, {"layer.weight": w}, config={},
                      binary_weights={"layer.weight": {"groups": groups, "sign_at_zero": saz}})
        f = ff.load(path, expect={"layer.weight": w})
        with h5py.File(path, "r") as h:
            on_disk = h["model/layer/weight_packed"][()]
    expected = oracle_packed(w, saz)
    assert_bit_equal(on_disk, expected, "on disk")
    assert_bit_equal(f.packed["layer.weight"], expected, "loaded")
    assert_bit_equal(f.state_dict["layer.weight"], w, "latent")
    assert_bit_equal(ff.unpack_weight_signs(expected, w.shape),
                     reference.sign(w, saz).astype(np.float32), "unpacked")


# --- with the real model family -------------------------------------------------------------------

def small_model(preset):
    from refbnn.models import presets
    from refbnn.models.network import BNNResNet

    config = {**presets.PRESETS[preset], "input_shape": [1, 28, 28], "num_classes": 10,
              "width_multiplier": 0.25}
    return BNNResNet(config).eval(), BNNResNet


def test_real_model_round_trip_and_packed_export_reproduce_its_outputs(tmp_path):
    """FTBNN (grouped convs, bridge, scale folded into BN): the model file and the packed-only
    file (+-1 weights from the bits) rebuild a network whose eval outputs are bit-identical."""
    model, build = small_model("ftbnn18_g2")
    state, binary = model.state_dict(), model.binary_weights()
    assert any(spec["groups"] > 1 for spec in binary.values())
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    y = model(x)
    ff.save_model(tmp_path / "m.h5", state, config=model.config, binary_weights=binary,
                  input_spec=INPUT_SPEC)
    ff.save_model(tmp_path / "p.h5", state, config=model.config, binary_weights=binary,
                  input_spec=INPUT_SPEC, packed_only=True)
    full, packed = ff.load(tmp_path / "m.h5", expect=state), ff.load(tmp_path / "p.h5", expect=state)
    for loaded, weights in ((full, full.state_dict), (packed, packed.sign_state_dict())):
        rebuilt = build(loaded.config)
        rebuilt.load_state_dict(weights)
        assert_bit_equal(rebuilt.eval()(x), y, loaded.kind)
    binary_bytes = sum(state[n].nbytes for n in binary)
    assert os.path.getsize(tmp_path / "p.h5") < os.path.getsize(tmp_path / "m.h5") - binary_bytes


def test_real_bireal_model_keeps_its_scale_in_a_packed_export(tmp_path):
    model, _ = small_model("birealnet18")
    modules = dict(model.named_modules())
    binary = model.binary_weights()
    for name, spec in binary.items():
        spec.setdefault("scale", modules[name.rsplit(".", 1)[0]].weight_scale())
    ff.save_model(tmp_path / "p.h5", model.state_dict(), config=model.config,
                  binary_weights=binary, packed_only=True)
    packed = ff.load(tmp_path / "p.h5", expect=model.state_dict())
    for name, spec in binary.items():
        assert_bit_equal(packed.binary[name].scale, spec["scale"], name)
