"""refbnn.data: IDX reader, data set lookup and download, mini-batches.

IDX files are written here byte by byte (struct, independent of the reader). Real-data facts
(counts, first labels, SHA-256 digests, pixel statistics) are published properties of MNIST and
Fashion-MNIST, recomputed here with hashlib / NumPy, not by the code under test.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import socket
import struct
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refbnn.data import (
    DataError,
    Dataset,
    batches,
    load_dataset,
    locate,
    normalization_table,
    read_idx,
    shift_images,
    specs,
    subset,
)
from refbnn.data import download as dl

STD_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
TYPE_CODES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


# --- helpers ---------------------------------------------------------------------------------
def idx_bytes(array, code: int = 0x08) -> bytes:
    array = np.asarray(array)
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(TYPE_CODES[code]).tobytes()


def write(path: Path, data: bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_split(folder: Path, n: int, split: str = "train", gz: bool = True, seed: int = 0):
    """Synthetic split files (n images, labels) in ``folder``; returns (images, labels)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    img_name, lbl_name = specs.SPLIT_FILES[split]
    suffix = ".gz" if gz else ""
    write(folder / (img_name + suffix), idx_bytes(images), gz)
    write(folder / (lbl_name + suffix), idx_bytes(labels), gz)
    return images, labels


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Empty env folder and user cache: nothing is found unless a test puts it."""
    monkeypatch.setenv("REFBNN_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_mirrors(monkeypatch, name: str, *mirrors: str):
    monkeypatch.setitem(specs.DATASETS, name, replace(specs.DATASETS[name], mirrors=mirrors))


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


# --- IDX reader ------------------------------------------------------------------------------
@st.composite
def idx_arrays(draw):
    code = draw(st.sampled_from(sorted(TYPE_CODES)))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=4)))
    dtype = np.dtype(TYPE_CODES[code])
    n = int(np.prod(shape))
    if dtype.kind == "f":
        values = draw(st.lists(st.floats(allow_nan=False, width=8 * dtype.itemsize),
                               min_size=n, max_size=n))
    else:
        info = np.iinfo(dtype)
        values = draw(st.lists(st.integers(int(info.min), int(info.max)), min_size=n, max_size=n))
    return code, np.array(values, dtype=dtype).reshape(shape)


@given(case=idx_arrays(), gz=st.booleans())
def test_idx_round_trip_is_exact(tmp_path_factory, case, gz):
    code, array = case
    path = write(tmp_path_factory.mktemp("idx") / "a.idx", idx_bytes(array, code), gz)
    out = read_idx(path)
    assert out.shape == array.shape
    assert out.dtype == array.dtype.newbyteorder("=") and out.dtype.isnative
    assert out.tobytes() == array.astype(out.dtype).tobytes()  # bit-exact, also for -0.0
    assert out.flags.writeable and out.flags.c_contiguous


def test_gzip_is_detected_by_content_not_name(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    gz_named_plain = write(tmp_path / "plain.idx", idx_bytes(array), gz=True)
    plain_named_gz = write(tmp_path / "raw.gz", idx_bytes(array), gz=False)
    np.testing.assert_array_equal(read_idx(gz_named_plain), array)
    np.testing.assert_array_equal(read_idx(plain_named_gz), array)


GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(13)
BAD_FILES = {
    "empty": (b"", False, "empty"),
    "png": (PNG, False, "not an IDX file"),
    "png_gzipped": (PNG, True, "not an IDX file"),
    "text": (b"hello world\n", False, "not an IDX file"),
    "short_magic": (b"\x00\x00", False, "not an IDX file"),
    "unknown_type": (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", False, "type code"),
    "zero_dims": (b"\x00\x00\x08\x00", False, "0 dimensions"),
    "truncated_header": (GOOD[:9], False, "truncated IDX header"),
    "truncated_payload": (GOOD[:-1], False, "truncated"),
    "truncated_payload_gz": (GOOD[:-5], True, "truncated"),
    "over_long": (GOOD + b"\x00", False, "over-long"),
    "over_long_gz": (GOOD + b"\x00\x01", True, "over-long"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_idx_files_raise_one_line_data_error_naming_the_file(tmp_path, case):
    data, gz, problem = BAD_FILES[case]
    path = write(tmp_path / f"{case}.bin", data, gz)
    with pytest.raises(DataError, match=problem) as info:
        read_idx(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("damage", ["cut_stream", "flip_deflate", "flip_crc", "trailing_junk"])
def test_corrupt_gzip_raises_data_error(tmp_path, damage):
    payload = idx_bytes(np.random.default_rng(1).integers(0, 256, (50, 28, 28), dtype=np.uint8))
    blob = bytearray(gzip.compress(payload))
    if damage == "cut_stream":
        blob = blob[: len(blob) // 2]
    elif damage == "flip_deflate":
        blob[len(blob) // 2] ^= 0xFF
    elif damage == "flip_crc":
        blob[-8] ^= 0xFF  # CRC-32 of the member
    else:
        blob += b"junk after the gzip member"
    path = write(tmp_path / "broken.gz", bytes(blob))
    with pytest.raises(DataError) as info:
        read_idx(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file_and_directory_raise_data_error(tmp_path):
    for path in (tmp_path / "nope.idx", tmp_path):
        with pytest.raises(DataError, match="cannot open") as info:
            read_idx(path)
        assert str(path) in str(info.value)


# --- real data ----------------------------------------------------------------------------------
def sha256_of_content(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).hexdigest()


def test_real_mnist(data_dir):
    train = load_dataset("mnist", "train", data_dir=data_dir, download=False)
    test = load_dataset("mnist", "test", data_dir=data_dir / "mnist", download=False)
    assert (train.images.shape, test.images.shape) == ((60000, 28, 28), (10000, 28, 28))
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.uint8
    assert list(train.labels[:10]) == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert list(test.labels[:10]) == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(train.labels).tolist()[:2] == [5923, 6742]
    assert train.class_names == tuple("0123456789") and (train.name, train.split) == ("mnist",
                                                                                      "train")
    # documented normalisation constants: the train split's statistics, rounded to 4 decimals
    x = train.images / 255.0
    assert abs(x.mean() - 0.1307) < 5e-5 and abs(x.std() - 0.3081) < 5e-5
    # the checksum constants are the digests of these (standard) files' contents
    for f in STD_FILES:
        path = locate.find_file(data_dir / "mnist", f)
        assert sha256_of_content(path) == specs.MNIST.sha256[f]


@pytest.mark.skipif(not FASHION_SYSTEM_DIR.is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package(isolated, monkeypatch):
    # the system copy is found only when REFBNN_DATA_DIR lists its parent (here second)
    with pytest.raises(DataError):
        load_dataset("fashion-mnist", "train", download=False)
    monkeypatch.setenv("REFBNN_DATA_DIR",
                       os.pathsep.join([str(isolated / "env"), str(FASHION_SYSTEM_DIR.parent)]))
    train = load_dataset("fashion-mnist", "train", download=False)
    assert train.images.shape == (60000, 28, 28)
    assert list(train.labels[:10]) == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert train.class_names[0] == "T-shirt/top" and train.class_names[9] == "Ankle boot"
    x = train.images / 255.0
    assert abs(x.mean() - 0.2860) < 5e-5 and abs(x.std() - 0.3530) < 5e-5
    for f in STD_FILES:
        assert sha256_of_content(FASHION_SYSTEM_DIR / (f + ".gz")) == \
            specs.FASHION_MNIST.sha256[f]


def test_real_slice_batches(data_dir):
    train = subset(load_dataset("mnist", "train", data_dir=data_dir, download=False), 300)
    seen = []
    for x, y in batches(train, 64, np.random.default_rng(0), augment=2):
        assert x.dtype == np.float32 and x.shape[1:] == (1, 28, 28) and y.dtype == np.int64
        seen.append(y)
    assert np.bincount(np.concatenate(seen), minlength=10).tolist() == \
        np.bincount(train.labels, minlength=10).tolist()


# --- data set checks and names -----------------------------------------------------------------
def test_unknown_name_and_split_list_the_known_ones(isolated):
    with pytest.raises(DataError, match="mnist, fashion-mnist"):
        load_dataset("cifar10", "train")
    with pytest.raises(DataError, match="train, test"):
        load_dataset("mnist", "validation")


@pytest.mark.parametrize("problem", ["count", "label", "shape"])
def test_inconsistent_split_files_are_rejected_naming_them(isolated, problem):
    folder = isolated / "d"
    images = np.zeros((4, 28, 28), np.uint8)
    labels = np.array([0, 1, 2, 3], np.uint8)
    if problem == "count":
        labels = labels[:3]
    elif problem == "label":
        labels[2] = 10
    else:
        images = np.zeros((4, 28, 27), np.uint8)
    write(folder / "train-images-idx3-ubyte", idx_bytes(images))
    write(folder / "train-labels-idx1-ubyte", idx_bytes(labels))
    with pytest.raises(DataError, match={"count": "3 labels", "label": "label 10",
                                         "shape": "28, 27"}[problem]) as info:
        load_dataset("mnist", "train", data_dir=folder, download=False)
    assert "train-images-idx3-ubyte" in str(info.value)


# --- lookup order ------------------------------------------------------------------------------
def test_lookup_order_argument_env_roots_cache(isolated, monkeypatch):
    arg_parent = isolated / "arg"
    write_split(arg_parent / "mnist", 1)
    write_split(isolated / "env" / "mnist", 2)
    write_split(isolated / "env2" / "mnist", 3, gz=False)
    write_split(isolated / "cache" / "refbnn" / "mnist", 4)
    roots = [str(isolated / "env"), "", str(isolated / "env2")]  # empty entries are ignored
    monkeypatch.setenv("REFBNN_DATA_DIR", os.pathsep.join(roots))
    assert len(load_dataset("mnist", "train", data_dir=arg_parent, download=False)) == 1
    assert len(load_dataset("mnist", "train", data_dir=arg_parent / "mnist", download=False)) == 1
    assert len(load_dataset("mnist", "train", download=False)) == 2
    for folder, expected in (("env", 3), ("env2", 4)):
        for f in files_under(isolated / folder):
            f.unlink()
        assert len(load_dataset("mnist", "train", download=False)) == expected
    for f in files_under(isolated / "cache"):
        f.unlink()
    with pytest.raises(DataError):
        load_dataset("mnist", "train", download=False)


def test_only_the_argument_env_roots_and_cache_are_searched(isolated, monkeypatch):
    monkeypatch.setenv("REFBNN_DATA_DIR", os.pathsep.join(["/r1", "/r2"]))
    assert locate.search_dirs("fashion-mnist", "/arg") == [
        Path("/arg"), Path("/arg/fashion-mnist"), Path("/r1/fashion-mnist"),
        Path("/r2/fashion-mnist"), isolated / "cache" / "refbnn" / "fashion-mnist"]
    monkeypatch.delenv("REFBNN_DATA_DIR")
    assert locate.search_dirs("mnist") == [isolated / "cache" / "refbnn" / "mnist"]


def test_argument_folder_without_files_falls_back_in_order(isolated):
    write_split(isolated / "env" / "mnist", 5)
    assert len(load_dataset("mnist", "train", data_dir=isolated / "empty", download=False)) == 5


def test_folder_with_one_of_the_two_files_is_skipped(isolated):
    write_split(isolated / "env" / "mnist", 2)
    write_split(isolated / "cache" / "refbnn" / "mnist", 3)
    (isolated / "env" / "mnist" / "train-labels-idx1-ubyte.gz").unlink()
    assert len(load_dataset("mnist", "train", download=False)) == 3


def test_plain_name_is_preferred_to_gz_in_one_folder(isolated):
    folder = isolated / "env" / "mnist"
    write_split(folder, 2, gz=True)
    write_split(folder, 6, gz=False)
    assert len(load_dataset("mnist", "train", download=False)) == 6


def test_cache_folder_follows_xdg_or_home(isolated, monkeypatch):
    assert locate.cache_dir("mnist") == isolated / "cache" / "refbnn" / "mnist"
    monkeypatch.setenv("HOME", str(isolated / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert locate.cache_dir("mnist") == isolated / "home" / ".cache" / "refbnn" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert locate.cache_dir("fashion-mnist") == \
        isolated / "home" / ".cache" / "refbnn" / "fashion-mnist"


def test_not_found_without_download_names_folders_and_env_var(isolated, monkeypatch):
    def opener(url, timeout):
        raise AssertionError("download=False must not touch the network")

    monkeypatch.setattr(dl, "OPENER", opener)
    with pytest.raises(DataError) as info:
        load_dataset("mnist", "test", download=False)
    msg = str(info.value)
    assert "\n" not in msg and "download disabled" in msg and "REFBNN_DATA_DIR" in msg
    for folder in locate.search_dirs("mnist"):
        assert str(folder) in msg
    assert "t10k-images-idx3-ubyte" in msg


# --- download ----------------------------------------------------------------------------------
def test_download_to_closed_port_fails_with_clear_message(isolated, monkeypatch):
    with_mirrors(monkeypatch, "mnist", f"http://127.0.0.1:{closed_port()}/")
    with pytest.raises(DataError) as info:
        load_dataset("mnist", "train")
    msg = str(info.value)
    assert "\n" not in msg and "download failed" in msg and "REFBNN_DATA_DIR" in msg
    assert "refused" in msg.lower() and str(locate.cache_dir("mnist")) in msg
    assert files_under(isolated / "cache") == [] and not (isolated / "cache").exists()


def test_download_read_timeout_is_short_and_reported(isolated, monkeypatch):
    # a socket that completes the TCP handshake (backlog) but never answers
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        with_mirrors(monkeypatch, "mnist", f"http://127.0.0.1:{server.getsockname()[1]}/")
        monkeypatch.setattr(dl, "TIMEOUT", 0.2)
        with pytest.raises(DataError, match="timed out"):
            load_dataset("mnist", "train")
    assert files_under(isolated / "cache") == []


def test_total_deadline_abandons_a_hanging_request(isolated, monkeypatch):
    release = threading.Event()
    calls = []

    def hanging_opener(url, timeout):
        calls.append(url)
        release.wait(30)  # far beyond the deadline; returning means the deadline was not enforced
        return b""

    monkeypatch.setattr(dl, "OPENER", hanging_opener)
    monkeypatch.setattr(dl, "DEADLINE", 0.3)
    try:
        with pytest.raises(DataError, match="deadline"):
            load_dataset("mnist", "train")
    finally:
        release.set()
    assert len(calls) == 1  # no further mirror or file is tried once the deadline has passed
    assert files_under(isolated / "cache") == []


def serve_from(folder: Path, corrupt: str | None = None):
    """An opener answering ``<mirror>/<file>.gz`` from ``folder``; ``corrupt`` names a file served
    with different (valid IDX) content."""
    served = []

    def opener(url, timeout):
        name = url.rsplit("/", 1)[1].removesuffix(".gz")
        served.append(name)
        if name == corrupt:
            return gzip.compress(idx_bytes(np.zeros(7, np.uint8)))
        path = locate.find_file(folder, name)
        if path is None:
            raise OSError(f"404 {name}")
        return path.read_bytes()

    return opener, served


@pytest.mark.parametrize("corrupt", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_checksum_mismatch_leaves_no_file(isolated, monkeypatch, data_dir, corrupt):
    opener, served = serve_from(data_dir / "mnist", corrupt=corrupt)
    monkeypatch.setattr(dl, "OPENER", opener)
    with pytest.raises(DataError, match="SHA-256 mismatch") as info:
        load_dataset("mnist", "train")
    assert corrupt in str(info.value)
    assert served.count(corrupt) == len(specs.MNIST.mirrors)  # every mirror tried
    assert files_under(isolated / "cache") == []


def test_download_verifies_and_stores_atomically_then_loads_from_cache(isolated, monkeypatch,
                                                                       data_dir):
    opener, served = serve_from(data_dir / "mnist")
    monkeypatch.setattr(dl, "OPENER", opener)
    cache = locate.cache_dir("mnist")
    write(cache / "t10k-labels-idx1-ubyte", b"stale raw file, replaced by the download")
    test = load_dataset("mnist", "test")
    assert sorted(p.name for p in files_under(cache)) == sorted(f + ".gz" for f in STD_FILES)
    assert sorted(served) == sorted(STD_FILES)
    direct = load_dataset("mnist", "test", data_dir=data_dir, download=False)
    np.testing.assert_array_equal(test.images, direct.images)
    np.testing.assert_array_equal(test.labels, direct.labels)
    monkeypatch.setattr(dl, "OPENER", serve_from(isolated / "nothing")[0])
    assert len(load_dataset("mnist", "train")) == 60000  # from the cache, no request


# --- batches -------------------------------------------------------------------------------------
def indexed_dataset(n: int, name: str = "mnist") -> Dataset:
    """Images whose pixels (0, 0) and (0, 1) hold the example index (high, low byte)."""
    images = np.zeros((n, 28, 28), np.uint8)
    images[:, 0, 0], images[:, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
    return Dataset(images, (np.arange(n) % 10).astype(np.uint8), tuple("0123456789"), name,
                   "train")


def decode(x: np.ndarray) -> np.ndarray:
    pix = np.rint(x[:, 0, 0, :2] * 255).astype(np.int64)  # normalize=None: x = v / 255
    return pix[:, 0] * 256 + pix[:, 1]


@given(n=st.integers(0, 300), batch_size=st.integers(1, 70), drop_last=st.booleans(),
       seed=st.integers(0, 2**32 - 1), shuffle=st.booleans())
def test_batches_cover_every_index_once_in_the_generators_order(n, batch_size, drop_last, seed,
                                                                shuffle):
    ds = indexed_dataset(n)
    got = list(batches(ds, batch_size, np.random.default_rng(seed), shuffle=shuffle,
                       drop_last=drop_last, normalize=None))
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    used = n - n % batch_size if drop_last else n
    assert [len(y) for _, y in got] == [min(batch_size, used - lo) for lo in
                                        range(0, used, batch_size)]
    seen = np.concatenate([decode(x) for x, _ in got]) if got else np.zeros(0, np.int64)
    np.testing.assert_array_equal(seen, order[:used])
    if not drop_last:
        assert sorted(seen.tolist()) == list(range(n))
    for x, y in got:
        assert x.dtype == np.float32 and x.shape == (len(y), 1, 28, 28) and x.flags.c_contiguous
        assert y.dtype == np.int64
        np.testing.assert_array_equal(y, decode(x) % 10)


def test_batches_are_deterministic_for_a_seed_and_differ_across_seeds():
    ds = indexed_dataset(200)

    def run(seed):
        return [(x, y) for x, y in batches(ds, 32, np.random.default_rng(seed), augment=3,
                                           normalize=None)]

    a, b, c = run(7), run(7), run(8)
    assert all(np.array_equal(xa, xb) and np.array_equal(ya, yb)
               for (xa, ya), (xb, yb) in zip(a, b))
    assert not all(np.array_equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))


def test_normalisation_values_are_exact():
    ds = indexed_dataset(300)
    ds.images[:, 5, 5] = np.arange(300) % 256  # every pixel value occurs
    for normalize, (mean, std) in (("dataset", (0.1307, 0.3081)), ((0.5, 0.25), (0.5, 0.25)),
                                   (None, (0.0, 1.0))):
        ds_named = replace(ds, name="mnist")
        (x, _), = batches(ds_named, 300, np.random.default_rng(0), shuffle=False,
                          normalize=normalize)
        expected = ((ds.images.astype(np.float64) / 255 - mean) / std).astype(np.float32)
        np.testing.assert_array_equal(x[:, 0], expected)
    fashion = replace(ds, name="fashion-mnist")
    (x, _), = batches(fashion, 300, np.random.default_rng(0), shuffle=False)
    assert x[0, 0, 27, 27] == np.float32((0 - 0.2860) / 0.3530)
    np.testing.assert_array_equal(normalization_table(0.0, 1.0),
                                  (np.arange(256) / 255).astype(np.float32))


def shift_oracle(images, shifts):
    out = np.zeros_like(images)
    _, h, w = images.shape
    for b, (dy, dx) in enumerate(shifts):
        for i in range(h):
            for j in range(w):
                if 0 <= i - dy < h and 0 <= j - dx < w:
                    out[b, i, j] = images[b, i - dy, j - dx]
    return out


@given(data=st.data(), b=st.integers(0, 4), h=st.integers(1, 7), w=st.integers(1, 7))
def test_shift_images_matches_loop_oracle(data, b, h, w):
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 256, size=(b, h, w), dtype=np.uint8)
    k = data.draw(st.integers(0, 9))
    shifts = rng.integers(-k, k + 1, size=(b, 2))
    np.testing.assert_array_equal(shift_images(images, shifts), shift_oracle(images, shifts))


def test_augmentation_uses_documented_draws_and_keeps_shape_dtype():
    ds = indexed_dataset(100)
    ds.images[:, 10:18, 10:18] = 200
    k, seed = 3, 11
    got = list(batches(ds, 30, np.random.default_rng(seed), augment=k, normalize=None))
    ref = np.random.default_rng(seed)
    order = ref.permutation(100)
    shifts = ref.integers(-k, k + 1, size=(100, 2))
    expected = shift_oracle(ds.images[order], shifts) / 255
    x = np.concatenate([x for x, _ in got])
    assert x.dtype == np.float32 and x.shape == (100, 1, 28, 28)
    np.testing.assert_array_equal(x[:, 0], expected.astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([y for _, y in got]), order % 10)
    assert np.abs(shifts).max() == k and (shifts != 0).any()


def test_start_resumes_mid_epoch_exactly():
    ds = indexed_dataset(130)
    rng = np.random.default_rng(5)
    saved = rng.bit_generator.state
    full = list(batches(ds, 16, rng, augment=2))
    state_after_full = rng.bit_generator.state
    rng.bit_generator.state = saved
    tail = list(batches(ds, 16, rng, augment=2, start=3))
    assert rng.bit_generator.state == state_after_full
    assert len(tail) == len(full) - 3
    for (xa, ya), (xb, yb) in zip(full[3:], tail):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_batches_rejects_bad_arguments():
    ds = indexed_dataset(10)
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match="Generator"):
        batches(ds, 4, np.random.RandomState(0))
    for kwargs, problem in (({"batch_size": 0}, "batch_size"), ({"augment": -1}, "augment"),
                            ({"normalize": "imagenet"}, "normalize"),
                            ({"normalize": (0.1, 0.0)}, "std"), ({"start": -1}, "start")):
        args = {"batch_size": 4, **kwargs}
        with pytest.raises(ValueError, match=problem):
            batches(ds, rng=rng, **args)
    with pytest.raises(ValueError, match="no default normalisation"):
        batches(indexed_dataset(10, name="toy"), 4, rng)  # no documented statistics


# --- subset --------------------------------------------------------------------------------------
def test_subset_first_n_and_seeded_random():
    ds = indexed_dataset(50)
    first = subset(ds, 7)
    np.testing.assert_array_equal(first.images, ds.images[:7])
    assert (first.name, first.split, first.class_names) == (ds.name, ds.split, ds.class_names)
    a, b, c = subset(ds, 20, seed=3), subset(ds, 20, seed=3), subset(ds, 20, seed=4)
    idx_a = (a.images[:, 0, 0].astype(int) * 256 + a.images[:, 0, 1])
    assert len(set(idx_a.tolist())) == 20 and np.all(np.diff(idx_a) > 0)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    np.testing.assert_array_equal(a.labels, ds.labels[idx_a])
    assert len(subset(ds, 0)) == 0 and len(subset(ds, 50, seed=1)) == 50
    with pytest.raises(ValueError, match="subset size"):
        subset(ds, 51)


def test_dataset_construction_checks():
    with pytest.raises(DataError, match="2 images but 3 labels"):
        Dataset(np.zeros((2, 28, 28), np.uint8), np.zeros(3, np.uint8), ("a",) * 10, "x", "train")
    with pytest.raises(DataError, match="uint8"):
        Dataset(np.zeros((2, 28, 28), np.float32), np.zeros(2, np.uint8), ("a",) * 10, "x", "t")


def test_library_code_names_no_local_data_path():
    source = "".join(p.read_text() for p in Path(locate.__file__).parent.glob("*.py"))
    assert "/work/" not in source and "shared/data" not in source
