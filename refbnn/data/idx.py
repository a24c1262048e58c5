"""The IDX file format (MNIST's): a strict reader, gzip-compressed or raw.

Layout (all integers big-endian): bytes ``00 00 <type> <ndim>``, then ``ndim`` dimensions as
unsigned 32-bit integers, then exactly ``prod(dims)`` values of the type, row-major (C order).
Type codes: ``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32,
``0x0E`` float64 (multi-byte types are big-endian in the file).
"""

from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np

GZIP_MAGIC = b"\x1f\x8b"
IDX_TYPES = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
_CHUNK = 1 << 20


class DataError(ValueError):
    """A data file or data set is missing, malformed or fails its checks (one-line message)."""


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    return data if data is not None else b""


def read_idx(path) -> np.ndarray:
    """Read the IDX file at ``path`` (gzip detected by its magic bytes ``1f 8b``, not the name).

    Returns a writable, C-contiguous array of shape ``dims`` in the type's native-endian dtype
    (uint8 for MNIST). The payload is read once, straight into the result (multi-byte types are
    byte-swapped in place). Raises :class:`DataError` naming the file if it is missing, empty,
    not IDX (wrong magic, unknown type code, ``ndim`` 0), truncated (header or payload),
    over-long (bytes after the payload) or a corrupt gzip stream.
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")  # closed by the with-block below
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror or e})") from None
    with f:
        head = f.read(2)
        if not head:
            raise DataError(f"{path}: empty file, not an IDX file")
        f.seek(0)
        compressed = head == GZIP_MAGIC
        stream = gzip.GzipFile(fileobj=f, mode="rb") if compressed else f
        try:
            return _read_idx_stream(stream, path, None if compressed else os.fstat(f.fileno()).st_size)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt gzip stream ({e})") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e})") from None


def _read_idx_stream(f, path: str, file_size: int | None) -> np.ndarray:
    magic = _read_exact(f, 4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
        raise DataError(f"{path}: not an IDX file (starts with {magic.hex(' ') or 'nothing'}, "
                        "expected 00 00 <type> <ndim>)")
    type_code, ndim = magic[2], magic[3]
    if type_code not in IDX_TYPES:
        raise DataError(f"{path}: unknown IDX type code 0x{type_code:02x} "
                        f"(known: {', '.join(f'0x{c:02x}' for c in IDX_TYPES)})")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    raw_dims = _read_exact(f, 4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header ({4 + len(raw_dims)} of {4 + 4 * ndim} "
                        "bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4"))
    dtype = IDX_TYPES[type_code]
    n_bytes = math.prod(dims) * dtype.itemsize
    header = 4 + 4 * ndim
    if file_size is not None and file_size != header + n_bytes:
        kind = "truncated" if file_size < header + n_bytes else "over-long"
        raise DataError(f"{path}: {kind}: dims {dims} need {n_bytes} payload bytes, "
                        f"file has {file_size - header}")
    try:
        out = np.empty(dims, dtype=dtype)
    except (MemoryError, ValueError):
        raise DataError(f"{path}: IDX dims {dims} declare {n_bytes} bytes, too large") from None
    view = memoryview(out).cast("B") if n_bytes else memoryview(b"")
    pos = 0
    while pos < n_bytes:
        got = f.readinto(view[pos:pos + _CHUNK])
        if not got:
            raise DataError(f"{path}: truncated: dims {dims} need {n_bytes} payload bytes, "
                            f"file has {pos}")
        pos += got
    if _read_exact(f, 1):
        raise DataError(f"{path}: over-long: bytes follow the {n_bytes}-byte payload of dims "
                        f"{dims}")
    if dtype.byteorder == ">":
        out = out.byteswap(inplace=True).view(dtype.newbyteorder("="))
    return out
