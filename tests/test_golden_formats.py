"""Golden vectors in their other forms (docs/golden.md sections 8-11): .npz and .bin + manifest
hold exactly the HDF5 cases and check clean; the manifest is readable from the spec with json and
raw bytes alone; the C headers compile into a library-free testbench that passes, while broken
variants of it fail exactly where they are broken; the model size cap and the stacks per case."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from refbnn import golden
from refbnn.golden import binio, fileio, npzio, stacks
from refbnn.golden import cli as golden_cli

ARGS = ["--model", "birealnet18", "--batch", "2", "--seed", "3", "--input-shape", "1,9,9"]
C_TESTBENCH = Path(__file__).parent / "c" / "golden_check.c"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    for fmt in golden.FORMATS:
        assert golden_cli.main([str(d), *ARGS, "--format", fmt]) == 0
    return d


def _same(a: fileio.GoldenFile, b: fileio.GoldenFile):
    assert (a.kind, a.seed, a.meta) == (b.kind, b.seed, b.meta)
    assert [c.name for c in a.cases] == [c.name for c in b.cases]
    for ca, cb in zip(a.cases, b.cases):
        assert (ca.op, ca.params, ca.stacks, ca.tolerance) == (cb.op, cb.params, cb.stacks, cb.tolerance)
        for x, y in ((ca.inputs, cb.inputs), (ca.outputs, cb.outputs)):
            assert list(x) == list(y)
            for k in x:
                assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), (ca.name, k)
                assert np.array_equal(np.signbit(x[k]), np.signbit(y[k])) if x[k].dtype.kind == "f" \
                    else True  # -0.0 kept
    assert list(a.arrays) == list(b.arrays)
    assert all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)


def test_npz_and_bin_hold_the_hdf5_cases_and_check_clean(out, capsys):
    from_bin = {g.kind: g for g in binio.read(out / "bin" / "manifest.json")}
    for kind in fileio.KINDS:
        h5 = fileio.read(out / f"{kind}.h5")
        _same(h5, npzio.read(out / f"{kind}.npz"))
        _same(h5, from_bin[kind])
    paths = [str(out / f"{k}.npz") for k in fileio.KINDS] + [str(out / "bin" / "manifest.json")]
    assert golden_cli.main(["--check", *paths]) == 0
    assert capsys.readouterr().out.count(": OK") == 4


def test_manifest_read_from_the_spec_alone(out):
    """docs/golden.md section 10 with json and raw little-endian bytes; packed twins recomputed
    independently (np.packbits, least significant bit first, bit 1 = negative)."""
    root = out / "bin"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["byte_order"] == "little" and manifest["format"] == "refbnn-golden-bin"
    ops = {d["kind"]: d for d in manifest["files"]}["ops"]
    case = {c["name"]: c for c in ops["cases"]}["bconv_groups2_cg32_same"]

    def load(e):
        raw = (root / e["file"]).read_bytes()
        assert len(raw) == e["nbytes"]
        return np.frombuffer(raw, np.dtype(e["dtype"]).newbyteorder("<")).reshape(e["shape"])

    arrays = {e["name"]: load(e) for e in case["inputs"] + case["outputs"] + case["derived"]}
    x = arrays["x"]  # (1, 6, 6, 64), 2 groups of 32
    negative = (x < 0).reshape(1, 6, 6, 2, 32)  # sign_at_zero +1: -0.0 and 0.0 are +1
    words = np.packbits(negative, axis=-1, bitorder="little").view("<u4")
    assert np.array_equal(arrays["x.words32"], words)
    assert arrays["x.words64"].shape == (1, 6, 6, 2, 1)
    assert np.array_equal(arrays["x.words64"] & 0xFFFFFFFF, words.astype(np.uint64))
    k = arrays["kernel"].transpose(3, 0, 1, 2) < 0  # OHWI
    assert np.array_equal(arrays["kernel.words32"], np.packbits(k, -1, bitorder="little").view("<u4"))
    assert case["resolved"] == {"pad_top": 1, "pad_bottom": 1, "pad_left": 1, "pad_right": 1,
                                "cg": 32, "k_taps": 288}
    assert {e["name"]: (e["rtol"], e["atol"]) for e in case["outputs"]} == {"acc": (0.0, 0.0)}


def _compile(c_dir, tmp_path, broken):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler (cc, gcc or clang) on PATH")
    exe = tmp_path / f"check{broken}"
    subprocess.run([cc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O1",
                    f"-DBROKEN={broken}", f"-I{c_dir}", "-o", str(exe), str(C_TESTBENCH)],
                   check=True, capture_output=True, text=True, timeout=300)
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)


BROKEN = {0: set(),
          1: {"sign_saz+1/y", "pack_c100_w32_saz+1/words"},
          2: {"bconv_same_plus1_s2_odd_c40/acc", "bconv_explicit_minus1_dil2/acc",
              "bconv_output_plus1_s2_odd_c64/acc", "bconv_output_plus1_s2_odd_c64/y"},
          3: {"linear_bias/y"}}


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_c_testbench_passes_and_broken_variants_fail(out, tmp_path, broken):
    run = _compile(out / "c", tmp_path, broken)
    failed = {line.split()[1].rstrip(":") for line in run.stdout.splitlines()
              if line.startswith("MISMATCH")}
    assert failed == BROKEN[broken], run.stdout
    assert run.returncode == (1 if broken else 0), run.stdout


def test_c_headers_are_exact_and_complete(out):
    text = (out / "c" / "ops" / "sign_sazp1.h").read_text()
    assert "-0e+00f" in text and "1e-45f" in text and "-INFINITY" in text  # edges kept exactly
    text = (out / "c" / "ops" / "bconv_output_plus1_s2_odd_c64.h").read_text()
    for name in ("in_x", "in_kernel", "derived_x_words32", "derived_x_words64",
                 "derived_kernel_words32", "derived_bits_words32", "out_bits", "out_y_lce"):
        assert f"rg_ops_bconv_output_plus1_s2_odd_c64_{name}[" in text
    assert "UINT64_C(0x" in text and "#define RG_OPS_BCONV_OUTPUT_PLUS1_S2_ODD_C64_P_K_TAPS 576" in text
    assert " * stacks: keras lce torch onnx openvino qonnx" in text
    includes = (out / "c" / "model.h").read_text()
    assert '#include "model/eval.h"' in includes and '#include "model/weights.h"' in includes


def test_max_bytes_caps_the_model_and_writes_nothing(tmp_path, capsys):
    dest = tmp_path / "capped"
    assert golden_cli.main([str(dest), *ARGS, "--max-bytes", "1000", "--format", "bin"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the model cases hold ") and "--max-bytes 1000" in err
    assert not dest.exists() or list(dest.iterdir()) == []
    for bad in (["--max-bytes", "0"], ["--format", "xml"]):
        assert _status([str(dest), *ARGS, *bad]) == 2


def _status(argv) -> int:
    try:
        return golden_cli.main(argv)
    except SystemExit as e:  # argparse's usage errors
        return e.code


def test_bin_problems_are_one_line_errors(out, tmp_path, capsys):
    root = tmp_path / "bin"
    shutil.copytree(out / "bin", root)
    victim = root / "ops" / "bgemm_k7_saz+1" / "outputs" / "acc.bin"
    acc = np.fromfile(victim, "<i4")
    acc[3] += 2
    acc.tofile(victim)
    assert golden_cli.main(["--check", str(root / "manifest.json")]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    victim.write_bytes(victim.read_bytes()[:-4])
    assert golden_cli.main(["--check", str(root / "manifest.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "acc.bin has" in err


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("keep")
    assert golden_cli.main([str(tmp_path), *ARGS, "--format", "c"]) == 2
    assert "not a golden folder" in capsys.readouterr().err
    assert (tmp_path / "c" / "mine.txt").read_text() == "keep"


def test_every_stack_has_its_share(out):
    ops = fileio.read(out / "ops.h5").cases
    convs = [c for c in ops if c.op in ("bconv2d", "bconv2d_output")]
    share = {s: sum(s in c.stacks for c in convs) for s in stacks.STACKS}
    assert share["torch"] == share["onnx"] == len(convs) == 18
    assert min(share.values()) >= 8, share
    by = {c.name: c for c in ops}
    # the rules of docs/golden.md section 8, on cases built for them
    assert by["bconv_same_zero_reach_past_input"].stacks == ["keras", "torch", "onnx", "openvino", "qonnx"]
    grouped = by["bconv_groups2_cg32_same"].stacks
    assert "lce" in grouped and "openvino" not in grouped
    assert "lce" not in by["bconv_groups2_cg35_caffe"].stacks  # Caffe sign and Cg = 35
    assert by["bconv_explicit_minus1_dil2"].stacks == ["torch", "onnx", "openvino", "qonnx"]
    assert "keras" in by["bconv_sym_pad_plus1"].stacks  # symmetric 1 = TensorFlow "same" here
    assert by["pack_c100_w32_saz+1"].stacks == ["lce"] and by["pack_c100_w64_saz-1"].stacks == []
    assert all(c.stacks for c in fileio.read(out / "layers.h5").cases)
    model = {c.name: c.stacks for c in fileio.read(out / "model.h5").cases}
    assert model == {"eval": ["torch", "onnx", "qonnx"], "train_step": ["torch"]}


def test_tf_padding_rule():
    assert stacks.tf_padding([1, 1], (7, 7), (3, 3), (2, 2)) == "same"  # 7 -> 4: one each side
    assert stacks.tf_padding([1, 1], (8, 8), (3, 3), (2, 2)) is None  # TF pads 0 top, 1 bottom
    assert stacks.tf_padding([0, 1, 0, 1], (8, 8), (3, 3), (2, 2)) == "same"
    assert stacks.tf_padding("valid", (5, 5), (1, 1), (1, 1)) == "valid"
    assert os.path.basename(str(C_TESTBENCH)) == "golden_check.c"
