"""tools/fuzz_format.py: its HDF5 checksum equals HDF5's, and a small seeded sample (load in a
limited worker; the export CLI on an accepted file) has no hang, crash, exception or CLI failure."""

import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import fuzz_format as fz  # noqa: E402


def test_lookup3_equals_the_checksums_hdf5_wrote(tmp_path):
    """Every object header and continuation chunk of a file HDF5 wrote carries lookup3 of its bytes,
    so the fuzzer's re-stamped headers are ones HDF5 accepts."""
    base = fz.make_bases(tmp_path)[0]
    data = base.read_bytes()
    chunks = fz.object_header_chunks(data)
    assert len(chunks) > 50 and any(data[s:s + 4] == b"OCHK" for s, _ in chunks)
    for start, end in chunks:
        assert struct.unpack_from("<I", data, end)[0] == fz.lookup3(data[start:end])
    assert fz.lookup3(b"") == 0xDEADBEEF and fz.lookup3(b"Four score and seven years ago") == 0x17770551


def test_small_seeded_sample_has_only_format_errors_and_runnable_files(tmp_path):
    report = fz.fuzz(40, 7, tmp_path / "work", cli_files=1, clis=("export",), timeout_s=20)
    outcomes = report["outcomes"]
    assert set(outcomes) <= {"format_error", "accepted"}, report["failures"]
    assert outcomes.get("format_error", 0) > 20 and sum(outcomes.values()) == 40
    assert len(report["by_recipe"]) >= 5            # byte-level, meta and structure recipes ran
    assert report["cli_failures"] == [], report["cli_failures"]


def test_a_file_that_hangs_the_loader_is_counted_as_a_hang(tmp_path, monkeypatch):
    """The worker protocol: no answer within the time limit is a hang, and the next file gets a
    fresh worker."""
    fake = tmp_path / "slow.py"
    fake.write_text("import sys, time\nfor line in sys.stdin:\n"
                    "    time.sleep(3600 if 'slow' in line else 0)\n"
                    "    print('{\"outcome\": \"format_error\", \"hdf5_path\": \"/\", \"problem\": \"x\"}',"
                    " flush=True)\n")
    monkeypatch.setattr(fz, "__file__", str(fake))
    worker = fz.Worker(1024, 0.5)
    try:
        assert worker.load(Path("ok"))["outcome"] == "format_error"   # a fresh worker's grace period
        assert worker.load(Path("slow"))["outcome"] == "hang"
        assert worker.load(Path("ok"))["outcome"] == "format_error"
    finally:
        worker.stop()
