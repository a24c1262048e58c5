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
(:func:`refbnn.kernels.realconv.vectors_for`), :func:`host_has_avx512_popcount` the binary ones
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
