"""Choice between the portable (scalar loops) and the fast (register-tiled vector) kernels.

``REFBNN_KERNEL=portable|fast|auto`` (default ``auto``) forces a path; the ``impl=`` argument of
``refbnn.bconv2d``, ``BConv2DPlan`` etc. overrides it. ``auto`` picks ``fast`` when the host CPU
reports ``avx512f`` with ``avx512vpopcntdq``, or ``avx2`` (llvmlite's host feature query, read
once), else ``portable``. Both paths are exact everywhere: ``fast`` is written in generic LLVM
vector IR, which LLVM lowers to whatever the host has. Measured on an AVX2-only AMD EPYC VM (no
AVX-512; ``tools/bench_kernels.py``, ResNet-18's 3x3 layers, batch 1, 1 thread): ``fast`` 124-163
G binary MACs/s against ``portable``'s 29-65, so AVX2 hosts get ``fast`` too. Hosts with neither
(other architectures) keep ``portable``: not measured.

The CPU features are those Numba compiles for: the host's (llvmlite's query), or, where
``NUMBA_CPU_FEATURES`` is set (Numba's own variable, e.g. to build code for another machine, or to
run an AVX2 build on an AVX-512 host for tests and benchmarks), that list (``+name`` on, ``-name``
off; names it does not mention are off). They also pick the micro-kernel shapes:
:func:`host_has_wide_vectors` (AVX-512F: 32 vector registers of 512 bits) the float32 ones
(:func:`refbnn.kernels.realconv.vectors_for`, with the CPU's name:
:func:`host_prefers_wide_float_tiles`), :func:`host_has_avx512_popcount` the binary ones
(wide or narrow family: :mod:`refbnn.kernels.bconv_tiles`).
"""

from __future__ import annotations

import functools
import os

KERNEL_CHOICES = ("auto", "portable", "fast")


def parse_features(text: str) -> dict:
    """``"+avx2,-avx512f,..."`` (LLVM's feature list, as ``NUMBA_CPU_FEATURES`` takes it) ->
    ``{"avx2": True, "avx512f": False, ...}``; entries without a sign count as on."""
    out = {}
    for item in text.split(","):
        item = item.strip()
        if item:
            out[item.lstrip("+-")] = not item.startswith("-")
    return out


@functools.lru_cache(maxsize=1)
def _host_features() -> dict:
    """The CPU feature flags Numba compiles for: ``NUMBA_CPU_FEATURES`` where set, else llvmlite's
    host query (empty where it cannot tell)."""
    override = os.environ.get("NUMBA_CPU_FEATURES", "").strip()
    if override:
        return parse_features(override)
    try:
        from llvmlite import binding

        return dict(binding.get_host_cpu_features())
    except Exception:  # pragma: no cover - llvmlite without host feature query
        return {}


def host_has_avx512_popcount() -> bool:
    """True if the host CPU has AVX-512F and AVX-512 VPOPCNTDQ."""
    f = _host_features()
    return bool(f.get("avx512f")) and bool(f.get("avx512vpopcntdq"))


def host_prefers_fast() -> bool:
    """True where ``auto`` picks the fast kernels: AVX-512 VPOPCNTDQ, or AVX2 (module docstring)."""
    return host_has_avx512_popcount() or bool(_host_features().get("avx2"))


def host_has_wide_vectors() -> bool:
    """True if the target has AVX-512F (32 registers of 512 bits); False on AVX2 hosts (16 of 256
    bits), where the float micro-kernels use their narrow shape."""
    return bool(_host_features().get("avx512f"))


#: LLVM CPU names whose AVX-512 units are 256 bits wide (a 512-bit FMA takes both halves: one
#: per cycle, as many multiply-adds as 256-bit code): AMD Zen 4.
HALF_WIDTH_AVX512_CPUS = frozenset({"znver4"})


@functools.lru_cache(maxsize=1)
def host_cpu_name() -> str:
    """The CPU Numba compiles for: ``NUMBA_CPU_NAME`` where set (``"host"`` means the host), else
    llvmlite's host CPU name (e.g. ``"znver4"``, ``"sapphirerapids"``; ``""`` where it cannot
    tell)."""
    name = os.environ.get("NUMBA_CPU_NAME", "").strip()
    if name and name != "host":
        return name
    try:
        from llvmlite import binding

        return str(binding.get_host_cpu_name())
    except Exception:  # pragma: no cover - llvmlite without host query
        return ""


def host_prefers_wide_float_tiles() -> bool:
    """True where the float32 micro-kernels take their wide shapes (32 or 64 channels per tile):
    AVX-512F on a CPU with full-width 512-bit units. False without AVX-512F (AVX2's 16 registers
    hold only the 6 x 16 tile's accumulators) and on :data:`HALF_WIDTH_AVX512_CPUS`, where the
    6 x 16 tile (7 loads per 6 FMAs) already keeps the one 512-bit FMA per cycle busy and wastes
    fewer lanes. Measured on a 2-core AMD EPYC (Zen 4), 1 thread, ``realconv.conv_taps_tiles``
    (G multiply-adds/s, 6 x 16 / 12 x 32 / 6 x 64 tiles): stem 7x7x3 -> 64 57.0 / 42.7 / 56.6;
    3x3x1 -> 24 26.2 / 21.7 / 15.9; 1x1 24 -> 48 50.1 / 27.8 / 37.0; 1x1 96 -> 192 54.2 / 37.4 /
    53.0; weights/ftbnn18.h5 in the engine, batch 32: 2.64 -> 2.29 ms (batch 256: 20-21 -> 18.1)."""
    return host_has_wide_vectors() and host_cpu_name() not in HALF_WIDTH_AVX512_CPUS


def host_has_avx512_bf16() -> bool:
    """True if the host CPU has AVX512-BF16 (VDPBF16PS: the bf16 stem's dot products)."""
    return bool(_host_features().get("avx512bf16"))


def resolve_kernel(impl: str | None = None) -> str:
    """Return ``"portable"`` or ``"fast"`` for ``impl`` (``None``: ``$REFBNN_KERNEL``, else auto)."""
    choice = impl if impl is not None else os.environ.get("REFBNN_KERNEL", "auto")
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernel must be one of {KERNEL_CHOICES} (or REFBNN_KERNEL), got {choice!r}")
    if choice == "auto":
        return "fast" if host_prefers_fast() else "portable"
    return choice
