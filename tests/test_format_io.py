"""Writing and converting refbnn files: a full disk is one clear error with nothing left behind and no
crash at exit, stale temporary files of killed writers are removed (only those), files honour the
umask, and version-1 files are refused at once and converted by `python -m refbnn.fileformat upgrade`
(also the damaged one on which HDF5 loops)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import v1files

from refbnn import atomicio, models
from refbnn import fileformat as ff
from refbnn.fileformat import FormatError
from refbnn.golden import fileio

REPO = Path(__file__).resolve().parent.parent
SPEC = {"shape": [1, 12, 12], "layout": "NCHW", "channel_order": "L", "mean": [0.5], "std": [0.25]}


def small(preset="ftbnn18", **kw):
    return models.build(preset, seed=0, input_shape=[1, 12, 12], num_classes=10,
                        width_multiplier=kw.pop("width", 0.125), **kw)


def save(path, model, **kw):
    ff.save_model(path, model.state_dict(), config=model.config,
                  binary_weights=model.binary_weights(), input_spec=SPEC, **kw)


def run(args, timeout=300, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=kw.pop("cwd", REPO), **kw)


def one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: ")


# --- a full disk ---------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root and mount(8)); skipped with the reason otherwise."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_raises_oserror_naming_the_file_and_leaves_nothing(small_disk):
    path = small_disk / "m.h5"
    save(path, small(width=0.0625))               # 0.27 MB: fits
    before = path.read_bytes()
    big = small(width=0.5)                        # 11.6 MB: does not
    with pytest.raises(OSError, match=r"cannot write .*m\.h5: no space left on the device"):
        save(path, big)
    assert sorted(p.name for p in small_disk.iterdir()) == ["m.h5"] and path.read_bytes() == before
    args = dict(config=big.config, binary_weights=big.binary_weights(), optimizer_state={},
                optimizer_hyperparameters={}, rng_state=None, epoch=0, history=[])
    with pytest.raises(OSError, match="no space left"):
        ff.save_checkpoint(small_disk / "c.h5", big.state_dict(), **args)
    assert sorted(p.name for p in small_disk.iterdir()) == ["m.h5"]


def test_full_disk_in_the_clis_is_one_line_and_no_crash_at_exit(small_disk, tmp_path):
    model = tmp_path / "m.h5"
    save(model, small("birealnet18", width=1.0))  # packed: 4.3 MB
    r = run(["-m", "refbnn.export", str(model), str(small_disk / "p.h5"), "--packed-only"])
    one_line_error(r)                             # exit 2, not SIGSEGV (-11) inside HDF5
    assert "no space left" in r.stderr
    r = run(["-m", "refbnn.golden", str(small_disk / "g")])
    one_line_error(r)
    files = [p for p in small_disk.rglob("*") if p.is_file()]
    assert not [p for p in files if ".tmp" in p.name], files
    for p in files:                               # what golden finished before the disk filled
        fileio.read(p)
    code = ("import numpy as np\nfrom refbnn import fileformat as ff, models\n"
            "m = models.build('ftbnn18', width_multiplier=0.5, input_shape=[1, 12, 12], num_classes=10)\n"
            f"try:\n    ff.save_model({str(small_disk / 'x.h5')!r}, m.state_dict(), config=m.config)\n"
            "except OSError as e:\n    print('caught', e.errno)\n")
    r = run(["-c", code])
    assert r.returncode == 0 and r.stdout.startswith("caught 28"), (r.returncode, r.stderr[-500:])


def test_golden_write_failure_leaves_nothing(small_disk):
    golden = fileio.GoldenFile("ops", 0, {}, [fileio.Case(
        "big", "sign", {}, {"x": np.zeros(400_000, np.float32)}, {"y": np.zeros(1, np.float32)})])
    with pytest.raises(OSError, match="no space left"):
        fileio.write(small_disk / "ops.h5", golden, "0")
    assert list(small_disk.iterdir()) == []


# --- temporary files of killed writers -----------------------------------------------------------

def fake_temp(folder, name, age_s=3600.0):
    p = folder / name
    p.write_bytes(b"half a file")
    t = time.time() - age_s
    os.utime(p, (t, t))
    return p


def test_next_write_removes_stale_temps_of_its_own_target_only(tmp_path):
    ours = [fake_temp(tmp_path, f"m.h5.tmp-{i:016x}") for i in range(3)]
    keep = [fake_temp(tmp_path, n) for n in (
        "other.h5.tmp-0123456789abcdef",          # another target's
        "m.h5.tmp-0123",                          # not the pattern (16 hex digits)
        "m.h5.tmp-0123456789ABCDEF",              # not lowercase hex
        "m.h5.1a2b3c.tmp",                        # mkstemp's pattern: another writer's
        "notes.txt")]
    young = fake_temp(tmp_path, "m.h5.tmp-ffffffffffffffff", age_s=0)   # maybe not yet locked
    save(tmp_path / "m.h5", small())
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in keep) and young.exists()
    ff.load(tmp_path / "m.h5")


def test_a_live_writers_locked_temp_is_kept_and_removed_once_it_is_killed(tmp_path):
    """A writer stopped inside its write (fsync made to block) holds its temp's lock: the next write
    keeps that temp; once the writer is killed (SIGKILL: no cleanup runs), the next write removes it."""
    code = ("import os, time, numpy as np\nfrom refbnn import atomicio\n"
            "atomicio.os.fsync = lambda fd: time.sleep(600)\n"
            f"atomicio.write_bytes_atomic({str(tmp_path / 'm.h5')!r}, b'x' * 1000)\n")
    child = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        deadline = time.time() + 60
        while not (temps := list(tmp_path.glob("m.h5.tmp-*"))) and time.time() < deadline:
            time.sleep(0.05)
        assert len(temps) == 1
        old = time.time() - 3600
        os.utime(temps[0], (old, old))           # old enough: only the lock protects it
        time.sleep(0.2)
        assert atomicio.remove_stale_temps(tmp_path / "m.h5") == [] and temps[0].exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert temps[0].exists()                     # a killed writer cannot clean up
    save(tmp_path / "m.h5", small())
    assert not temps[0].exists() and list(tmp_path.glob("m.h5.tmp-*")) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save(tmp_path / "m.h5", small())
        golden = fileio.GoldenFile("ops", 0, {}, [])
        fileio.write(tmp_path / "g.h5", golden, "0")
    finally:
        os.umask(old)
    assert (tmp_path / "m.h5").stat().st_mode & 0o777 == mode
    assert (tmp_path / "g.h5").stat().st_mode & 0o777 == mode


# --- version 1 -------------------------------------------------------------------------------------

def v1_model_file(path, preset="birealnet18", kind="model"):
    model = small(preset)
    state = model.state_dict()
    rng = np.random.default_rng(1)
    for v in state.values():
        if v.dtype == np.float32:
            v[...] = rng.standard_normal(v.shape)
            v[...] = np.abs(v) if v.ndim == 1 else v
    model.load_state_dict(state)
    checkpoint = None
    if kind == "checkpoint":
        checkpoint = {"epoch": 3, "rng_state": {"bit_generator": np.random.default_rng(5).bit_generator.state,
                                                "batches_done": 0},
                      "history": [{"epoch": 3, "loss": 0.5}],
                      "hyperparameters": {"type": "Adam", "lr": 0.003},
                      "optimizer_state": {"fc.weight.exp_avg": np.ones((10, 64), np.float32)}}
    v1files.write_v1(path, model, kind, input_spec=SPEC, class_names=[str(i) for i in range(10)],
                     provenance={"run": {"command": "python -m refbnn.train", "seed": 0}},
                     metrics={"test_accuracy": 0.5}, checkpoint=checkpoint)
    return model


@pytest.mark.parametrize("preset, kind", [("birealnet18", "model"), ("ftbnn18_g2", "checkpoint"),
                                          ("birealnet18", "packed")])
def test_upgrade_keeps_every_tensor_and_metadata_bit_for_bit(tmp_path, preset, kind):
    from refbnn.fileformat_v1 import load_v1

    v1_model_file(tmp_path / "old.h5", preset, kind)
    with pytest.raises(FormatError, match=r"format version 1 .*python -m refbnn.fileformat upgrade"):
        ff.load(tmp_path / "old.h5")
    old = load_v1(tmp_path / "old.h5")
    r = run(["-m", "refbnn.fileformat", "upgrade", str(tmp_path / "old.h5"), str(tmp_path / "new.h5")])
    assert r.returncode == 0, r.stderr
    new = ff.load(tmp_path / "new.h5")
    assert (new.kind, new.version) == (kind, 2)
    assert new.config == {**old.config, "bn_eps": 1e-5}
    for key in ("input_spec", "class_names", "dataset", "metrics", "provenance", "epoch",
                "rng_state", "history", "optimizer_hyperparameters"):
        assert getattr(new, key) == getattr(old, key), key
    for attr in ("state_dict", "packed", "optimizer_state"):
        a, b = getattr(old, attr) or {}, getattr(new, attr) or {}
        assert list(a) == list(b), attr
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), (attr, k)
    for k, b in old.binary.items():
        assert new.binary[k] == b
        assert (new.binary[k].scale is None) == (b.scale is None) == (preset != "birealnet18")
        if b.scale is not None:
            assert new.binary[k].scale.tobytes() == b.scale.tobytes()


def test_upgrade_in_place_and_of_an_upgraded_file(tmp_path):
    v1_model_file(tmp_path / "m.h5")
    r = run(["-m", "refbnn.fileformat", "upgrade", str(tmp_path / "m.h5"), str(tmp_path / "m.h5")])
    assert r.returncode == 0 and ff.load(tmp_path / "m.h5").version == 2
    r = run(["-m", "refbnn.fileformat", "upgrade", str(tmp_path / "m.h5"), str(tmp_path / "n.h5")])
    one_line_error(r)
    assert "already format version 2" in r.stderr and not (tmp_path / "n.h5").exists()


def test_damaged_global_heap_hangs_hdf5_but_not_refbnn(tmp_path):
    """The issue's hang, reproduced: a version-1 file whose global heap (string attributes, no HDF5
    checksum) is damaged behind a valid refbnn SHA-256. Version-2 readers refuse it from the user block
    at once; the converter reads it in a child process and gives up after --timeout with one line."""
    path = tmp_path / "bad.h5"
    v1_model_file(path, "ftbnn18")
    v1files.damage_global_heap(path)
    t = time.time()
    r = run(["-c", f"from refbnn import fileformat as ff\ntry:\n ff.load({str(path)!r})\n"
                   "except ff.FormatError as e:\n print(e.problem)"], timeout=60)
    assert "format version 1" in r.stdout and time.time() - t < 30
    t = time.time()
    r = run(["-m", "refbnn.fileformat", "upgrade", "--timeout", "5", str(path), str(tmp_path / "new.h5")],
            timeout=120)
    one_line_error(r)
    assert time.time() - t < 60 and not (tmp_path / "new.h5").exists()
    assert "took more than 5 s" in r.stderr or str(path) in r.stderr


def test_shipped_weights_are_version_2():
    f = ff.load(REPO / "weights" / "ftbnn18.h5")
    assert f.version == 2 and (REPO / "weights" / "ftbnn18.h5").read_bytes()[:14] == b"refbnn-hdf5 2\n"
