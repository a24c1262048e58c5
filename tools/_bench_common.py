"""Helpers shared by the benchmark scripts in tools/: the JSON record and where it came from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON to a temp file beside ``path``, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cpu_name() -> str:
    """The first ``model name`` of /proc/cpuinfo, or ``"unknown"``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


#: The ISA extensions that decide which of refbnn's kernels run (a VM may hide some of its CPU's).
ISA_FEATURES = ("avx2", "fma", "avx512f", "avx512vpopcntdq", "avx512bf16")


#: ``--isa avx2``: AVX-512 off for every engine in the process (a Zen 4 or Xeon host stands in for
#: an AVX2-only one): Numba compiles without it, oneDNN (OpenVINO's and PyTorch's kernels) stops
#: at AVX2, PyTorch's own kernels too. Frequencies and caches stay the host's.
EMULATED_ISA_ENV = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}


def emulate_isa(isa: str) -> dict:
    """Set the environment for ``isa`` (``"native"``: nothing; ``"avx2"``:
    :data:`EMULATED_ISA_ENV` plus ``NUMBA_CPU_FEATURES`` = the host's features with every AVX-512
    and AMX one off) before numba, torch or openvino is imported; returns what was set."""
    if isa == "native":
        return {}
    if isa not in EMULATED_ISA_ENV:
        raise ValueError(f"unknown isa {isa!r}")
    if "numba" in sys.modules:
        raise RuntimeError("emulate_isa must run before numba is imported")
    from llvmlite import binding

    feats = binding.get_host_cpu_features()
    off = ("avx512", "amx", "evex512", "avx10")
    flags = ",".join(("+" if on and not name.startswith(off) else "-") + name
                     for name, on in feats.items())
    env = {**EMULATED_ISA_ENV[isa], "NUMBA_CPU_FEATURES": flags}
    os.environ.update(env)
    return env


def host_isa() -> dict:
    """The :data:`ISA_FEATURES` LLVM sees on this host, and the kernel the ops API's ``auto`` picks
    (``ops_auto_kernel``; the engine always runs the tiled kernels)."""
    from refbnn.kernels.dispatch import _host_features, resolve_kernel
    feats = _host_features()
    return {**{f: bool(feats.get(f, False)) for f in ISA_FEATURES},
            "ops_auto_kernel": resolve_kernel("auto")}


def source_revision() -> str:
    """The checkout's git commit (``+dirty`` when refbnn/ or tools/ has uncommitted edits), or
    ``"unknown"`` outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "refbnn", "tools"],
                               cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def save_results(path, meta: dict, rows: list) -> int:
    """Write ``{"meta": meta, "results": rows}`` to ``path`` (:func:`write_json`), with the CPU,
    the source revision and the Python version added to ``meta``; print what happened. Returns
    the exit status: 0, or 1 when the file cannot be written."""
    import sys

    meta = {"cpu": cpu_name(), "source": source_revision(), "python": sys.version.split()[0],
            **meta}
    try:
        write_json(path, {"meta": meta, "results": rows})
    except OSError as e:
        print(f"error: cannot write {path}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


_LIMIT_JOB = """
import sys, time
import numpy as np
a = np.random.default_rng(0).standard_normal((384, 384)).astype(np.float32)
b = a.copy()
a @ b
n, t = 0, time.perf_counter()
while time.perf_counter() - t < float(sys.argv[1]):
    a @ b
    n += 1
print(n / (time.perf_counter() - t))
"""


def parallel_limit(jobs: int = 2, seconds: float = 3.0) -> float:
    """The machine's own limit for ``jobs`` threads: the combined throughput of ``jobs``
    independent single-threaded processes, each a float32 384x384 GEMM loop (OpenBLAS on one
    thread, operands in the core's cache), over the throughput of one alone. 2.0 for two real
    cores; what a framework's 2-thread speed-up can be held against."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-c", _LIMIT_JOB, str(seconds)]

    def rates(k):
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(k)]
        return [float(p.communicate()[0]) for p in procs]

    one = rates(1)[0]
    return sum(rates(jobs)) / one
