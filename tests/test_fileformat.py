"""refbnn's HDF5 format, version 2: bit-exact round trips, the on-disk layout docs/format.md
promises, a file written from the spec alone, the packed-bit layout against the reference oracle,
the packed-only size, and one FormatError (naming file and HDF5 object) per kind of damage."""

import hashlib
import json
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refbnn import fileformat as ff
from refbnn import models, reference
from refbnn.fileformat import FormatError

INPUT_SPEC = {"shape": [1, 12, 12], "layout": "NCHW", "channel_order": "L",
              "mean": [0.1307], "std": [0.3081]}
CLASSES = [str(i) for i in range(10)]


def oracle_packed(weight, sign_at_zero=1):
    """The specified layout, from the slow oracle: pack(sign(W) with axis 1 moved last)."""
    return reference.pack(np.moveaxis(np.asarray(weight), 1, -1), 64, sign_at_zero)


def small(preset="ftbnn18_g2", seed=0, **overrides):
    """A tiny model of a preset with every tensor off its initial value (ties and -0.0 included in
    the binary weights), so round trips and packing see real data."""
    kw = dict(input_shape=[1, 12, 12], num_classes=10, width_multiplier=0.125) | overrides
    model = models.build(preset, seed=seed, **kw)
    rng = np.random.default_rng(seed)
    state = model.state_dict()
    for name, value in state.items():
        if value.dtype == np.float32:
            value[...] = rng.standard_normal(value.shape).astype(np.float32)
            if name.endswith("running_var"):
                value[...] = np.abs(value) + 0.5
        else:
            value[...] = 17
    w = state["layer1.0.binary_conv.weight"]
    w.flat[:3] = [0.0, -0.0, 1.0]
    model.load_state_dict(state)
    return model.eval()


def save(path, model, packed_only=False, **kw):
    meta = dict(input_spec=INPUT_SPEC, class_names=CLASSES, dataset="mnist",
                metrics={"top1": np.float32(0.75)}, provenance={"command": "x --seed 3", "seed": 3})
    ff.save_model(path, model.state_dict(), config=model.config,
                  binary_weights=model.binary_weights(), packed_only=packed_only, **(meta | kw))


def assert_bit_equal(a, b, name):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, name
    assert a.tobytes() == b.tobytes(), name


@pytest.mark.parametrize("preset", ["ftbnn18_g2", "birealnet18", "ftbnn18_purified"])
def test_model_round_trip_is_bit_exact(tmp_path, preset):
    model = small(preset)
    state, binary = model.state_dict(), model.binary_weights()
    save(tmp_path / "m.h5", model)
    f = ff.load(tmp_path / "m.h5", expect=state)
    assert f.kind == "model" and f.version == 2 and f.refbnn_version
    assert f.names == list(state) and list(f.state_dict) == list(state)
    for name, value in state.items():
        assert_bit_equal(f.state_dict[name], value, name)
    assert list(f.packed) == list(binary)
    for name, spec in binary.items():
        assert_bit_equal(f.packed[name], oracle_packed(state[name]), name)
        assert f.binary[name] == ff.BinaryWeight(state[name].shape, spec["groups"], 1)
        if "scale" in spec:
            assert_bit_equal(f.binary[name].scale, spec["scale"], name + " scale")
        else:
            assert f.binary[name].scale is None
    assert f.config == model.config and f.input_spec == INPUT_SPEC and f.class_names == CLASSES
    assert f.dataset == "mnist" and f.metrics == {"top1": 0.75}
    assert f.provenance == {"command": "x --seed 3", "seed": 3}
    assert f.epoch is None and f.optimizer_state is None and f.rng_state is None


def test_absent_metadata_is_none(tmp_path):
    model = small()
    ff.save_model(tmp_path / "m.h5", model.state_dict(), config=model.config,
                  binary_weights=model.binary_weights())
    f = ff.load(tmp_path / "m.h5")
    assert (f.input_spec, f.class_names, f.dataset, f.metrics, f.provenance) == (None,) * 5


def test_file_layout_matches_the_spec(tmp_path):
    """The on-disk objects docs/format.md promises other readers: no attribute anywhere, /meta
    JSON, one group per module, packed words and their scale."""
    model = small("birealnet18")
    save(tmp_path / "m.h5", model)
    with h5py.File(tmp_path / "m.h5", "r") as f:
        assert list(f) == ["meta", "model"]
        meta = json.loads(f["meta"][()].tobytes().decode("utf-8"))
        assert f["meta"].dtype == np.dtype("u1") and f["meta"].ndim == 1
        assert list(meta) == list(ff.META_KEYS)
        assert meta["format"] == "refbnn" and meta["format_version"] == 2 and meta["kind"] == "model"
        assert meta["config"] == model.config and meta["input_spec"] == INPUT_SPEC
        assert list(f["model"])[:3] == ["conv1", "bn1", "layer1.0.binary_conv"]
        conv = f["model/layer1.0.binary_conv"]
        assert list(conv) == ["weight", "weight_packed", "weight_packed_scale"]
        o, i = model.config["widths"][0], model.config["stem_channels"]
        assert conv["weight"].dtype == np.dtype("<f4") and conv["weight"].shape == (o, i, 3, 3)
        assert conv["weight_packed"].dtype == np.dtype("<u8")
        assert conv["weight_packed"].shape == (o, 3, 3, 1)
        assert conv["weight_packed_scale"].dtype == np.dtype("<f4")
        assert meta["binary"]["layer1.0.binary_conv.weight"] == {
            "unpacked_shape": [o, i, 3, 3], "layout": "OHWI", "groups": 1, "sign_at_zero": 1,
            "word_bits": 64, "bit_order": "lsb_first", "bit_one_means": -1, "scaled": True}
        assert f["model/bn1/num_batches_tracked"].dtype == np.dtype("<i8")
        assert f["model/bn1/num_batches_tracked"].shape == ()

        def no_attrs(name, obj):
            assert len(obj.attrs) == 0, name
        assert len(f.attrs) == 0
        f.visititems(no_attrs)


def test_user_block_holds_the_version_and_sha256_of_the_rest(tmp_path):
    save(tmp_path / "m.h5", small())
    data = (tmp_path / "m.h5").read_bytes()
    digest = hashlib.sha256(data[512:]).hexdigest()
    assert data[:512] == f"refbnn-hdf5 2\nsha256 {digest}\n".encode().ljust(512, b"\0")
    assert data[512:520] == b"\x89HDF\r\n\x1a\n"  # the HDF5 superblock follows the user block


def spec_binary_entries(model):
    """docs/format.md §4's "binary" entries, from the text: every binary layer's latent weight."""
    out = {}
    for name, spec in model.binary_weights().items():
        shape = list(model.state_dict()[name].shape)
        out[name] = {"unpacked_shape": shape, "layout": "OHWI", "groups": spec["groups"],
                     "sign_at_zero": 1, "word_bits": 64, "bit_order": "lsb_first",
                     "bit_one_means": -1, "scaled": model.config["scale"] == "mean_abs"}
    return out


def test_a_file_written_from_the_spec_alone_loads(tmp_path):
    """docs/format.md is enough to write a valid file: plain h5py (default HDF5 format bounds, no
    creation-order tracking, library format bounds v108), JSON written by hand, words from the
    reference oracle."""
    model = small("ftbnn18")
    state = model.state_dict()
    meta = {"format": "refbnn", "format_version": 2, "kind": "packed",
            "refbnn_version": "other-implementation 0.1", "config": model.config,
            "input_spec": None, "class_names": None, "dataset": None, "metrics": None,
            "provenance": {"seed": 1}, "binary": spec_binary_entries(model)}
    path = tmp_path / "hand.h5"
    with h5py.File(path, "w", userblock_size=512, libver="v108") as f:
        f["meta"] = np.frombuffer(json.dumps(meta, indent=1).encode(), np.uint8)
        for name, value in state.items():
            group, _, leaf = name.rpartition(".")
            if name in meta["binary"]:
                f[f"model/{group}/{leaf}_packed"] = oracle_packed(value)
            else:
                f[f"model/{group}/{leaf}"] = value
    data = path.read_bytes()
    head = f"refbnn-hdf5 2\nsha256 {hashlib.sha256(data[512:]).hexdigest()}\n".encode()
    path.write_bytes(head.ljust(512, b"\0") + data[512:])
    loaded = ff.load(path, expect=state)
    assert loaded.kind == "packed" and loaded.config == model.config
    assert loaded.names == list(state)  # the config's order, whatever the HDF5 order
    w = state["layer1.0.binary_conv.weight"]
    assert_bit_equal(loaded.sign_state_dict()["layer1.0.binary_conv.weight"],
                     reference.sign(w).astype(np.float32), "signs")


def checkpoint_args(model, **changes):
    rng = np.random.default_rng(12345)
    rng.random(7)
    state = model.state_dict()
    opt = {f"{k}.exp_avg": np.full(v.shape, 0.25, np.float32) for k, v in state.items()
           if v.dtype == np.float32}
    opt["fc.weight.step"] = np.array(41, np.int64)
    args = dict(config=model.config, binary_weights=model.binary_weights(), optimizer_state=opt,
                optimizer_hyperparameters={"type": "Adam", "lr": 1e-3, "betas": [0.9, 0.999]},
                rng_state=rng.bit_generator.state, epoch=2,
                history=[{"epoch": 1, "loss": 2.5, "acc": None}, {"epoch": 2, "loss": 1.25}])
    return args | changes, rng


def test_checkpoint_round_trip_restores_optimizer_and_rng(tmp_path):
    model = small()
    args, rng = checkpoint_args(model)
    ff.save_checkpoint(tmp_path / "c.h5", model.state_dict(), **args)
    f = ff.load(tmp_path / "c.h5", expect=model.state_dict())
    assert f.kind == "checkpoint" and f.epoch == 2 and f.history == args["history"]
    assert list(f.optimizer_state) == list(args["optimizer_state"])
    for name, value in args["optimizer_state"].items():
        assert_bit_equal(f.optimizer_state[name], value, name)
    assert f.optimizer_hyperparameters == args["optimizer_hyperparameters"]
    restored = np.random.default_rng(0)
    restored.bit_generator.state = f.rng_state   # the 128-bit PCG64 state survives JSON
    assert np.array_equal(restored.random(5), rng.random(5))
    for name, value in model.state_dict().items():
        assert_bit_equal(f.state_dict[name], value, name)


def test_checkpoint_without_rng_state_says_so(tmp_path):
    model = small()
    args, _ = checkpoint_args(model, rng_state=None)
    ff.save_checkpoint(tmp_path / "c.h5", model.state_dict(), **args)
    f = ff.load(tmp_path / "c.h5")
    assert f.rng_state is None and f.provenance is None and f.epoch == 2


def test_packed_only_keeps_bits_and_drops_latent_weights(tmp_path):
    model = small("birealnet18")
    state, binary = model.state_dict(), model.binary_weights()
    save(tmp_path / "p.h5", model, packed_only=True)
    f = ff.load(tmp_path / "p.h5", expect=state)
    assert f.kind == "packed" and f.names == list(state)
    assert list(f.state_dict) == [k for k in state if k not in binary]
    for name, spec in binary.items():
        assert_bit_equal(f.packed[name], oracle_packed(state[name]), name)
        assert_bit_equal(f.binary[name].scale, spec["scale"], name + " scale")
    signs = f.sign_state_dict()
    assert list(signs) == list(state)
    for name in binary:
        assert_bit_equal(signs[name], reference.sign(state[name]).astype(np.float32), name)
    assert_bit_equal(signs["fc.bias"], state["fc.bias"], "fc.bias")


def test_export_packed_equals_direct_packed_save_and_refuses_its_source(tmp_path):
    model = small("birealnet18")
    save(tmp_path / "m.h5", model)
    ff.export_packed(tmp_path / "m.h5", tmp_path / "e.h5")
    save(tmp_path / "p.h5", model, packed_only=True)
    e, p = ff.load(tmp_path / "e.h5"), ff.load(tmp_path / "p.h5")
    assert e.kind == "packed" and e.names == p.names and e.config == p.config
    for name in p.packed:
        assert_bit_equal(e.packed[name], p.packed[name], name)
        assert e.binary[name] == p.binary[name]
        assert_bit_equal(e.binary[name].scale, p.binary[name].scale, name)
    for name in p.state_dict:
        assert_bit_equal(e.state_dict[name], p.state_dict[name], name)
    before = (tmp_path / "m.h5").read_bytes()
    with pytest.raises(ValueError, match="destination is the source"):
        ff.export_packed(tmp_path / "m.h5", tmp_path / "m.h5")
    assert (tmp_path / "m.h5").read_bytes() == before


def test_packed_only_binary_weights_are_over_20x_smaller_than_float32(tmp_path):
    """Bi-Real Net-18 at ImageNet size: the packed-only file's bytes beyond its real tensors, against
    the binary convolutions' float32 bytes (32x is the ideal; the rest is HDF5 metadata)."""
    model = models.build("birealnet18", seed=0)
    save(tmp_path / "p.h5", model, packed_only=True, input_spec=None, class_names=None)
    state, binary = model.state_dict(), model.binary_weights()
    real_bytes = sum(v.nbytes for k, v in state.items() if k not in binary)
    binary_bytes = sum(state[k].nbytes for k in binary) + sum(b["scale"].nbytes for b in binary.values())
    ratio = binary_bytes / (os.path.getsize(tmp_path / "p.h5") - real_bytes)
    assert ratio >= 20, ratio


# --- damage: each kind raises one FormatError naming the file and the HDF5 object ---------------

def reseal(path):
    """Rewrite the user block as docs/format.md section 1 specifies, so an edited file's damage is
    seen by the structural checks rather than by the checksum (a crafted or buggy writer's file)."""
    data = Path(path).read_bytes()
    head = f"refbnn-hdf5 2\nsha256 {hashlib.sha256(data[512:]).hexdigest()}\n".encode()
    Path(path).write_bytes(head.ljust(512, b"\0") + data[512:])


def edit(path, fn):
    with h5py.File(path, "a") as f:
        fn(f)
    reseal(path)


def read_meta(f):
    return json.loads(f["meta"][()].tobytes().decode("utf-8"))


def set_meta_bytes(raw: bytes):
    def fn(f):
        del f["meta"]
        f["meta"] = np.frombuffer(raw, np.uint8)
    return fn


def change_meta(change):
    """Edit /meta's JSON: ``change(meta)`` mutates the parsed object in place."""
    def fn(f):
        meta = read_meta(f)
        change(meta)
        set_meta_bytes(json.dumps(meta).encode())(f)
    return fn


def config_field(name, value):
    return change_meta(lambda m: m["config"].__setitem__(name, value))


def replace_dataset(hpath, make, **kw):
    def fn(f):
        data = f[hpath][()]
        del f[hpath]
        f.create_dataset(hpath, data=make(data), **kw)
    return fn


def delete(hpath):
    def fn(f):
        del f[hpath]
    return fn


def new_dataset(hpath, shape, dtype):
    """Replace ``hpath`` by a dataset of ``shape`` whose storage is never written."""
    def fn(f):
        del f[hpath]
        f.create_dataset(hpath, shape, dtype)
    return fn


def meta_bytes(f) -> bytes:
    return f["meta"][()].tobytes()


def flip_one_bit(data):
    data = data.copy()
    data[1, 0, 0, 0] ^= np.uint64(1)
    return data


def deep(n):
    return "[" * n + "]" * n


def set_first(value):
    def make(data):
        data = data.copy()
        data.flat[0] = value
        return data
    return make


CONV = "/model/layer1.0.binary_conv"
BN = "/model/layer1.0.bn1"
DAMAGE = {
    # metadata text and JSON
    "meta not UTF-8": (lambda f: set_meta_bytes(meta_bytes(f).replace(b'"mnist"', b'"mn\xffst"'))(f),
                       "/meta", "not UTF-8"),
    "surrogate escape in a string": (
        lambda f: set_meta_bytes(meta_bytes(f).replace(b'"mnist"', b'"\\udc80"'))(f),
        "/meta", "not valid Unicode"),
    "NaN in JSON": (change_meta(lambda m: m.__setitem__("metrics", {"top1": float("nan")})),
                    "/meta", "not valid JSON"),
    "duplicate key": (lambda f: set_meta_bytes(b'{"kind": "model", ' + meta_bytes(f)[1:])(f),
                      "/meta", "duplicate key"),
    "700-level nesting": (lambda f: set_meta_bytes(meta_bytes(f).replace(
        b'"seed": 3', b'"seed": ' + deep(700).encode()))(f), "/meta", "nests 702 levels"),
    "meta not an object": (set_meta_bytes(b"[1, 2]"), "/meta", "must be a JSON object"),
    "wrong format string": (change_meta(lambda m: m.__setitem__("format", "keras")), "/meta", "format"),
    "version 3 in meta": (change_meta(lambda m: m.__setitem__("format_version", 3)), "/meta",
                          "format_version"),
    "version as string": (change_meta(lambda m: m.__setitem__("format_version", "2")), "/meta",
                          "format_version"),
    "unknown kind": (change_meta(lambda m: m.__setitem__("kind", "weights")), "/meta", "kind"),
    "unknown meta key": (change_meta(lambda m: m.__setitem__("pickle", "x")), "/meta", "pickle: unknown key"),
    "missing meta key": (change_meta(lambda m: m.pop("metrics")), "/meta", "metrics: missing key"),
    "bad input_spec": (change_meta(lambda m: m.__setitem__("input_spec", {"shape": [1, 12, 12]})),
                       "/meta", "input_spec"),
    "input_spec of another size": (change_meta(lambda m: m["input_spec"].__setitem__("shape", [1, 28, 28])),
                                   "/meta", "does not match the config's input_shape"),
    "class_names of the wrong count": (change_meta(lambda m: m.__setitem__("class_names", ["a"])),
                                       "/meta", "class_names: has 1 entries"),
    "binary entry of another layout": (change_meta(
        lambda m: m["binary"]["layer1.0.binary_conv.weight"].__setitem__("bit_order", "msb_first")),
        "/meta", "binary: entry 'layer1.0.binary_conv.weight'"),
    # the config schema
    "width as a string": (config_field("widths", ["8", 16, 32, 64]), "/meta", "'widths' entry 0"),
    "groups 0": (config_field("groups", 0), "/meta", "'groups' must be in 1..8192"),
    "stem_pool as an int": (config_field("stem_pool", 1), "/meta", "'stem_pool' must be true or false"),
    "pad_value as a bool": (config_field("pad_value", True), "/meta", "'pad_value'"),
    "nested config value": (lambda f: set_meta_bytes(meta_bytes(f).replace(
        b'"num_classes": 10', b'"num_classes": ' + deep(60).encode()))(f), "/meta", "'num_classes'"),
    "10**9 classes": (config_field("num_classes", 10 ** 9), "/meta", "'num_classes' must be in"),
    "10**6 stem": (config_field("stem_channels", 10 ** 6), "/meta", "'stem_channels'"),
    "10**6 blocks": (config_field("blocks", [10 ** 6] * 4), "/meta", "'blocks' entry 0"),
    "widths of 4096": (lambda f: change_meta(lambda m: m["config"].update(
        widths=[4096] * 4, bridge_channels=4096))(f), "/meta", "more than the cap"),
    "unknown config field": (config_field("colour", 1), "/meta", "unknown config fields: colour"),
    "missing config field": (change_meta(lambda m: m["config"].pop("act_grad")), "/meta",
                             "missing field 'act_grad'"),
    "unresolved config": (config_field("width_multiplier", 0.5), "/meta", "resolved"),
    "config that disagrees with the tensors": (config_field("num_classes", 11), "/meta", "class_names"),
    "config bigger than the file": (change_meta(lambda m: m.update(class_names=None) or m["config"].update(
        num_classes=100_000)), "/model", "more than the file's"),
    # HDF5 structure
    "attribute on the root": (lambda f: f.attrs.__setitem__("format", "refbnn"), "/", "attribute"),
    "attribute on a tensor": (lambda f: f["model/fc/bias"].attrs.__setitem__("scale", 2.0),
                              "/model/fc/bias", "attribute"),
    "unknown root member": (lambda f: f.create_group("extra"), "/extra", "unexpected member"),
    "missing /model": (delete("/model"), "/", "missing member 'model'"),
    "missing /meta": (delete("/meta"), "/", "missing member 'meta'"),
    "meta as int8": (replace_dataset("/meta", lambda d: d.astype(np.int8)), "/meta", "not uint8"),
    "meta of 2**30 declared bytes": (new_dataset("/meta", (2 ** 30,), np.uint8), "/meta",
                                     "more than 16,777,216"),
    "meta without data": (new_dataset("/meta", (100,), np.uint8), "/meta", "stores 0 bytes"),
    "extra tensor": (lambda f: f["model/fc"].create_dataset("extra", data=np.zeros(2, np.float32)),
                     "/model/fc", "unexpected member 'extra'"),
    "extra module group": (lambda f: f["model"].create_group("fc2"), "/model", "unexpected member 'fc2'"),
    "20,000 extra groups": (lambda f: [f["model"].create_group(f"g{i}") for i in range(20000)],
                            "/model", "members, expected"),
    "missing tensor": (delete("/model/fc/bias"), "/model/fc", "missing member 'bias'"),
    "latent weight missing next to packed bits": (delete(f"{CONV}/weight"), CONV, "missing member 'weight'"),
    "group where a dataset belongs": (lambda f: (delete("/model/fc/bias")(f),
                                                 f.create_group("model/fc/bias")),
                                      "/model/fc/bias", "must be a dataset"),
    "dataset where a group belongs": (new_dataset("/model/fc", (1,), np.float32), "/model/fc",
                                      "must be a group"),
    "wrong shape": (replace_dataset("/model/fc/bias", lambda d: d[:-1]), "/model/fc/bias", "shape (9,)"),
    "float64 tensor": (replace_dataset("/model/fc/bias", lambda d: d.astype(np.float64)),
                       "/model/fc/bias", "is not float32"),
    "big-endian tensor": (replace_dataset("/model/fc/bias", lambda d: d.astype(">f4")),
                          "/model/fc/bias", "big-endian"),
    "bool tensor": (replace_dataset("/model/fc/bias", lambda d: d > 0), "/model/fc/bias", "enum"),
    "enum dataset": (replace_dataset(f"{BN}/num_batches_tracked", lambda d: d,
                                     dtype=h5py.enum_dtype({"a": 17, "b": 0}, basetype="i8")),
                     f"{BN}/num_batches_tracked", "enum"),
    "compound dataset": (replace_dataset("/model/fc/bias", lambda d: np.zeros(10, "f4,f4")),
                         "/model/fc/bias", "compound"),
    "vlen string dataset": (lambda f: (f["model/fc"].__delitem__("bias"),
                                       f["model/fc"].create_dataset("bias", data=["x"] * 10,
                                                                    dtype=h5py.string_dtype())),
                            "/model/fc/bias", "string"),
    "packed bits as int64": (replace_dataset(f"{CONV}/weight_packed", lambda d: d.view(np.int64)),
                             f"{CONV}/weight_packed", "is not uint64"),
    "packed bits flipped vs latent signs": (replace_dataset(f"{CONV}/weight_packed", flip_one_bit),
                                            f"{CONV}/weight_packed", "disagree"),
    "packed bits of the wrong shape": (replace_dataset(f"{CONV}/weight_packed", lambda d: d[:-1]),
                                       f"{CONV}/weight_packed", "shape"),
    "padding bits set": (replace_dataset(f"{CONV}/weight_packed", lambda d: d | np.uint64(1 << 63)),
                         f"{CONV}/weight_packed", "unused high bits"),
    "soft link": (lambda f: (f["model/fc"].__delitem__("bias"),
                             f["model/fc"].__setitem__("bias", h5py.SoftLink("/model/fc/weight"))),
                  "/model/fc/bias", "hard links"),
    "external link": (lambda f: (f["model/fc"].__delitem__("bias"),
                                 f["model/fc"].__setitem__("bias", h5py.ExternalLink("/etc/passwd", "/x"))),
                      "/model/fc/bias", "hard links"),
    "gzip dataset": (replace_dataset("/model/fc/bias", lambda d: d, compression="gzip"),
                     "/model/fc/bias", "filter pipeline"),
    "chunked dataset": (replace_dataset("/model/fc/bias", lambda d: d, chunks=(5,)), "/model/fc/bias",
                        "contiguous"),
    "external storage": (lambda f: (f["model/fc"].__delitem__("bias"),
                                    f["model/fc"].create_dataset("bias", (10,), "<f4",
                                                                 external=[("/etc/passwd", 0, 40)])),
                         "/model/fc/bias", "external"),
    "NaN weight": (replace_dataset("/model/fc/weight", set_first(np.nan)), "/model/fc/weight", "non-finite"),
    "inf running mean": (replace_dataset(f"{BN}/running_mean", set_first(np.inf)), f"{BN}/running_mean",
                         "non-finite"),
    "NaN running variance": (replace_dataset(f"{BN}/running_var", set_first(np.nan)), f"{BN}/running_var",
                             "non-finite"),
    "negative running variance": (replace_dataset(f"{BN}/running_var", set_first(-1e-3)),
                                  f"{BN}/running_var", "below 0"),
    "NaN latent binary weight": (replace_dataset(f"{CONV}/weight", set_first(np.nan)), f"{CONV}/weight",
                                 "non-finite"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_file_raises_format_error_naming_the_object(tmp_path, case):
    fn, hpath, words = DAMAGE[case]
    path = tmp_path / "m.h5"
    save(path, small())
    ff.load(path)  # intact before the edit
    edit(path, fn)
    with pytest.raises(FormatError) as info:
        ff.load(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.file == str(path) and err.hdf5_path == hpath, str(err)
    assert str(path) in str(err) and hpath in str(err) and words in str(err), str(err)
    assert "\n" not in str(err) and len(str(err)) < 600


def test_virtual_dataset_is_refused(tmp_path):
    path = tmp_path / "m.h5"
    save(path, small())

    def fn(f):
        layout = h5py.VirtualLayout(shape=(10,), dtype="<f4")
        layout[:] = h5py.VirtualSource(str(path), "model/fc/weight", shape=(10,))
        del f["model/fc/bias"]
        f["model/fc"].create_virtual_dataset("bias", layout)
    edit(path, fn)
    with pytest.raises(FormatError, match=r"/model/fc/bias: .*(virtual|contiguous)"):
        ff.load(path)


def test_scale_of_bireal_layers_is_checked(tmp_path):
    path = tmp_path / "p.h5"
    save(path, small("birealnet18"), packed_only=True)
    edit(path, replace_dataset(f"{CONV}/weight_packed_scale", lambda d: -d))
    with pytest.raises(FormatError, match=rf"{CONV}/weight_packed_scale: scale values must be"):
        ff.load(path)


def test_packed_only_file_must_not_hold_latent_binary_weights(tmp_path):
    path = tmp_path / "p.h5"
    save(path, small(), packed_only=True)
    edit(path, lambda f: f[CONV[1:]].create_dataset("weight", data=np.ones((2, 2, 3, 3), "f4")))
    with pytest.raises(FormatError, match=rf"p\.h5: {CONV}: .*unexpected member 'weight'"):
        ff.load(path)


def test_packed_only_int64_words_are_refused(tmp_path):
    """The uint64 check is the only one that sees this: no latent weight to compare against, the
    words' values are those of valid uint64 words."""
    path = tmp_path / "p.h5"
    save(path, small(), packed_only=True)
    edit(path, replace_dataset(f"{CONV}/weight_packed", lambda d: (d & np.uint64(2 ** 62)).view(np.int64)))
    with pytest.raises(FormatError, match=rf"{CONV}/weight_packed: HDF5 type integer of 8 bytes is not "
                                          "uint64"):
        ff.load(path)


def test_packed_only_file_checks_padding_bits(tmp_path):
    path = tmp_path / "p.h5"
    save(path, small(), packed_only=True)
    edit(path, replace_dataset(f"{CONV}/weight_packed", lambda d: d | np.uint64(1 << 40)))
    with pytest.raises(FormatError, match=rf"{CONV}/weight_packed: unused high bits"):
        ff.load(path)


def test_not_hdf5_and_truncated_files(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"this is not an HDF5 file\n" * 40)
    with pytest.raises(FormatError, match=r"junk\.h5: /: not a refbnn file"):
        ff.load(junk)
    path = tmp_path / "m.h5"
    save(path, small())
    data = path.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=r"cut\.h5: /: .*truncated or damaged"):
        ff.load(cut)
    reseal(cut)  # a consistent checksum does not make a truncated file readable
    with pytest.raises(FormatError, match=r"cut\.h5: /"):
        ff.load(cut)
    (tmp_path / "empty.h5").write_bytes(b"")
    with pytest.raises(FormatError, match=r"empty\.h5: /: not a refbnn file"):
        ff.load(tmp_path / "empty.h5")
    with pytest.raises(FileNotFoundError):
        ff.load(tmp_path / "absent.h5")
    with pytest.raises(FormatError, match="not a regular file"):
        ff.load(tmp_path)


def test_newer_and_unknown_versions_in_the_user_block(tmp_path):
    path = tmp_path / "m.h5"
    save(path, small())
    data = path.read_bytes()
    for version, words in ((3, "format version 3 is newer"), (0, "unknown format version 0")):
        head = f"refbnn-hdf5 {version}\nsha256 {hashlib.sha256(data[512:]).hexdigest()}\n"
        path.write_bytes(head.encode().ljust(512, b"\0") + data[512:])
        with pytest.raises(FormatError, match=words):
            ff.load(path)


def test_any_changed_byte_is_caught_by_the_checksum(tmp_path):
    path = tmp_path / "m.h5"
    save(path, small())
    data = path.read_bytes()
    for offset in (100, 600, len(data) // 2, len(data) - 1):  # user block, metadata, data, end
        damaged = bytearray(data)
        damaged[offset] ^= 0x10
        path.write_bytes(bytes(damaged))
        with pytest.raises(FormatError, match=r"m\.h5: /: .*(user block|SHA-256)"):
            ff.load(path)


def test_old_style_hdf5_is_refused(tmp_path):
    """HDF5's pre-1.8 structures (superblock 0, symbol-table groups, local heaps) have no checksum."""
    path = tmp_path / "old.h5"
    save(path, small())
    with h5py.File(path, "r") as src, h5py.File(tmp_path / "o.h5", "w", userblock_size=512,
                                                  libver="earliest") as dst:
        for name in src:
            src.copy(name, dst)
    (tmp_path / "o.h5").rename(path)
    reseal(path)
    with pytest.raises(FormatError, match=r"/: HDF5 superblock version 0"):
        ff.load(path)


def test_plain_hdf5_without_user_block_is_refused(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f.create_group("model")
    with pytest.raises(FormatError, match=r"plain\.h5: /: not a refbnn file \(no refbnn user block"):
        ff.load(path)


@pytest.mark.parametrize("change, hpath, words", [
    (lambda s: s.update({"layer9.conv.weight": np.zeros((2, 2), np.float32)}),
     "/model", "expects tensor 'layer9.conv.weight'"),
    (lambda s: s.pop("fc.bias"), "/model/fc/bias", "unexpected tensor 'fc.bias'"),
    (lambda s: s.update({"fc.bias": np.zeros(11, np.float32)}), "/model/fc/bias",
     "shape (10,) but expected (11,)"),
    (lambda s: s.update({"layer1.0.binary_conv.weight": (2, 2, 3, 4)}),
     "/model/layer1.0.binary_conv/weight", "shape"),
    (lambda s: s.update({"fc.bias": np.zeros(10, np.float64)}), "/model/fc/bias",
     "dtype float32 but expected float64"),
])
def test_expect_catches_missing_extra_shape_and_dtype(tmp_path, change, hpath, words):
    path = tmp_path / "m.h5"
    model = small()
    save(path, model)
    expect = dict(model.state_dict())
    change(expect)
    with pytest.raises(FormatError) as info:
        ff.load(path, expect=expect)
    assert info.value.hdf5_path == hpath and words in str(info.value), str(info.value)


def test_bad_expect_is_the_callers_value_error(tmp_path):
    path = tmp_path / "m.h5"
    save(path, small())
    with pytest.raises(ValueError, match=r"expect\['fc.bias'\]") as info:
        ff.load(path, expect={"fc.bias": "ten"})
    assert not isinstance(info.value, FormatError)


# --- writing: bad input is a ValueError and writes nothing -------------------------------------

def with_value(name, value):
    def change(state):
        state[name] = value
    return change


@pytest.mark.parametrize("change, kw, words", [
    (lambda s: s.pop("fc.bias"), {}, "lacks 'fc.bias'"),
    (with_value("extra.weight", np.zeros(1, np.float32)), {}, "has 'extra.weight'"),
    (lambda s: s.__setitem__("fc.bias", s["fc.bias"].astype(np.float64)), {}, "float64 (10,)"),
    (lambda s: s.__setitem__("fc.bias", s["fc.bias"][:-1]), {}, "(9,)"),
    (lambda s: s["fc.weight"].__setitem__((0, 0), np.nan), {}, "non-finite"),
    (lambda s: s["bn1.running_var"].__setitem__(0, -1), {}, "below 0"),
    (None, {"binary_weights": {"fc.weight": {}}}, "not a binary layer"),
    (None, {"binary_weights": {"layer1.0.binary_conv.weight": {"groups": 3}}}, "groups=3"),
    (None, {"binary_weights": {"layer1.0.binary_conv.weight": {"sign_at_zero": -1}}}, "sign_at_zero=-1"),
    (None, {"binary_weights": {"layer1.0.binary_conv.weight": {"group": 2}}}, "unknown options"),
    (None, {"metrics": {"loss": float("nan")}}, "NaN"),
    (None, {"config": [1]}, "config must be a model config"),
    (None, {"config": {"groups": 0}}, "'groups'"),
    (None, {"provenance": {"when": object()}}, "not JSON-able"),
    (None, {"provenance": {"x": json.loads(deep(80))}}, "nests"),
    (None, {"provenance": {"x": "\udc80"}}, "not valid Unicode"),
    (None, {"class_names": [1, 2]}, "class_names"),
    (None, {"dataset": 5}, "dataset"),
    (None, {"input_spec": dict(INPUT_SPEC, std=[0.0])}, "'std'"),
    (None, {"input_spec": dict(INPUT_SPEC, layout="CHW")}, "'layout'"),
    (None, {"input_spec": dict(INPUT_SPEC, shape=[1, 28, 28])}, "input_shape"),
])
def test_bad_save_arguments_raise_value_error_and_write_nothing(tmp_path, change, kw, words):
    model = small()
    state = model.state_dict()
    if change:
        change(state)
    args = dict(config=model.config, binary_weights=model.binary_weights()) | kw
    with pytest.raises(ValueError) as info:
        ff.save_model(tmp_path / "m.h5", state, **args)
    assert words in str(info.value), str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_mean_abs_layers_need_their_scale(tmp_path):
    model = small("birealnet18")
    with pytest.raises(ValueError, match="need their 'scale'"):
        ff.save_model(tmp_path / "m.h5", model.state_dict(), config=model.config)


def test_ternary_sign_weights_are_stored_unpacked_and_cannot_be_exported(tmp_path):
    model = small("ftbnn18", sign_at_zero=0)
    ff.save_model(tmp_path / "m.h5", model.state_dict(), config=model.config,
                  binary_weights=model.binary_weights())
    f = ff.load(tmp_path / "m.h5", expect=model.state_dict())
    assert list(f.packed) == [] and list(f.binary) == []
    with h5py.File(tmp_path / "m.h5", "r") as h:
        assert list(h[CONV[1:]]) == ["weight"]
    with pytest.raises(ValueError, match="sign_at_zero=0"):
        ff.save_model(tmp_path / "p.h5", model.state_dict(), config=model.config, packed_only=True)
    assert not (tmp_path / "p.h5").exists()


def test_bad_checkpoint_arguments(tmp_path):
    model = small()
    state = model.state_dict()
    cases = [(dict(epoch=-1), "epoch"), (dict(epoch=True), "epoch"),
             (dict(optimizer_state={"a/b": np.zeros(1)}), "optimizer_state key"),
             (dict(optimizer_state={"x": np.full(3, np.inf, np.float32)}), "non-finite"),
             (dict(optimizer_state={f"x{i}": np.zeros(1) for i in range(10000)}), "more than"),
             (dict(optimizer_state={"x": np.zeros(10 ** 6)}), "largest tensor"),
             (dict(rng_state={"key": np.zeros(3)}), "not JSON-able"),
             (dict(history={"a": 1}), "history")]
    for change, words in cases:
        args, _ = checkpoint_args(model, **change)
        with pytest.raises(ValueError, match=words):
            ff.save_checkpoint(tmp_path / "c.h5", state, **args)
    assert list(tmp_path.iterdir()) == []


# --- the packed layout, over shapes --------------------------------------------------------------

@st.composite
def binary_weights(draw):
    ndim = draw(st.sampled_from([2, 3, 4]))
    o = draw(st.integers(1, 6))
    i = draw(st.integers(0, 140))
    spatial = tuple(draw(st.integers(1, 3)) for _ in range(ndim - 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # a mix of signs with exact +-0.0 so sign_at_zero matters
    w = rng.choice(np.array([-1.5, -0.0, 0.0, 0.25, 2.0], np.float32), size=(o, i, *spatial))
    return w, draw(st.sampled_from([1, -1]))


@given(binary_weights())
def test_pack_weight_signs_equals_reference_pack_of_transposed_signs(case):
    w, saz = case
    expected = oracle_packed(w, saz)
    assert_bit_equal(ff.pack_weight_signs(w, saz), expected, "packed")
    assert_bit_equal(ff.unpack_weight_signs(expected, w.shape),
                     reference.sign(w, saz).astype(np.float32), "unpacked")


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(["ftbnn18_g2", "ftbnn18_g4", "birealnet18"]), st.sampled_from([1, -1]),
       st.integers(0, 2**16))
def test_stored_words_are_the_reference_packing_of_each_layer(preset, saz, seed):
    model = small(preset, seed=seed, sign_at_zero=saz)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "w.h5"
        save(path, model)
        with h5py.File(path, "r") as h:
            for name in model.binary_weights():
                group, _, leaf = name.rpartition(".")
                on_disk = h[f"model/{group}/{leaf}_packed"][()]
                assert_bit_equal(on_disk, oracle_packed(model.state_dict()[name], saz), name)
        f = ff.load(path)
    assert all(b.sign_at_zero == saz for b in f.binary.values())


def test_real_model_round_trip_and_packed_export_reproduce_its_outputs(tmp_path):
    """FTBNN (grouped convs, bridge, binary shortcuts; scale folded into BN): the model file and the
    packed-only file (+-1 weights from the bits) rebuild a network whose eval outputs are
    bit-identical. (Bi-Real's stored scale is tested bit for bit above.)"""
    x = np.random.default_rng(0).standard_normal((2, 1, 12, 12)).astype(np.float32)
    for preset in ("ftbnn18_g2", "ftbnn18_purified"):
        model = small(preset)
        y = model(x)
        save(tmp_path / "m.h5", model)
        save(tmp_path / "p.h5", model, packed_only=True)
        full, packed = ff.load(tmp_path / "m.h5"), ff.load(tmp_path / "p.h5")
        for loaded, weights in ((full, full.state_dict), (packed, packed.sign_state_dict())):
            rebuilt = models.build(loaded.config)
            rebuilt.load_state_dict(weights)
            assert_bit_equal(rebuilt.eval()(x), y, f"{preset} {loaded.kind}")


def test_a_huge_foreign_file_is_refused_from_its_first_bytes(tmp_path):
    """A 64 GiB (sparse) file that is not a refbnn file is refused without being read."""
    path = tmp_path / "huge.h5"
    with open(path, "wb") as fh:
        fh.write(b"\x89HDF\r\n\x1a\n")
        try:
            fh.truncate(2 ** 36)
        except OSError as e:
            pytest.skip(f"this filesystem cannot hold a sparse 64 GiB file: {e}")
    with pytest.raises(FormatError, match=r"huge\.h5: /: not a refbnn file"):
        ff.load(path)
