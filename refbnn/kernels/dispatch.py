"""Choice between the portable and the fast (AVX-512 VPOPCNTDQ) kernels.

``REFBNN_KERNEL=portable|fast|auto`` (default ``auto``) forces a path; the ``impl=`` argument of
``refbnn.bconv2d``, ``BConv2DPlan`` etc. overrides it. ``auto`` picks ``fast`` when the host CPU
reports both ``avx512f`` and ``avx512vpopcntdq`` (llvmlite's host feature query, read once).
Both paths are exact everywhere: ``fast`` is written in generic LLVM vector IR, so forcing it on
another CPU is only slower.
"""

from __future__ import annotations

import functools
import os

KERNEL_CHOICES = ("auto", "portable", "fast")


@functools.lru_cache(maxsize=1)
def _host_features() -> dict:
    """llvmlite's host CPU feature flags (empty where it cannot tell)."""
    try:
        from llvmlite import binding

        return dict(binding.get_host_cpu_features())
    except Exception:  # pragma: no cover - llvmlite without host feature query
        return {}


def host_has_avx512_popcount() -> bool:
    """True if the host CPU has AVX-512F and AVX-512 VPOPCNTDQ."""
    f = _host_features()
    return bool(f.get("avx512f")) and bool(f.get("avx512vpopcntdq"))


def host_has_avx512_bf16() -> bool:
    """True if the host CPU has AVX512-BF16 (VDPBF16PS: the bf16 stem's dot products)."""
    return bool(_host_features().get("avx512bf16"))


def resolve_kernel(impl: str | None = None) -> str:
    """Return ``"portable"`` or ``"fast"`` for ``impl`` (``None``: ``$REFBNN_KERNEL``, else auto)."""
    choice = impl if impl is not None else os.environ.get("REFBNN_KERNEL", "auto")
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernel must be one of {KERNEL_CHOICES} (or REFBNN_KERNEL), got {choice!r}")
    if choice == "auto":
        return "fast" if host_has_avx512_popcount() else "portable"
    return choice
