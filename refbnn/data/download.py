"""Fetch a data set's four IDX files from its public mirrors, verify, and store them atomically.

Contract:
* each file is tried on each mirror in order (URL = mirror + file name + ``".gz"``); a mirror's
  answer counts only if its DECOMPRESSED content has the SHA-256 listed in the spec;
* all four files are fetched and verified in memory before anything is written; then each is
  written to a temp file in the destination folder and moved into place with ``os.replace``, so
  a failed or rejected download leaves no file (and creates no folder);
* time is bounded: every request gets a connect/read timeout of ``timeout`` seconds, and the
  whole download a total ``deadline`` (enforced by running each request in a daemon thread and
  abandoning it when the deadline passes; an abandoned request never writes anything).

``OPENER`` (module attribute, replaceable in tests) is the function ``(url, timeout) -> bytes``
that performs one request.
"""

from __future__ import annotations

import gzip
import hashlib
import threading
import time
import urllib.request
import zlib
from pathlib import Path

from refbnn.atomicio import write_bytes_atomic

from .idx import GZIP_MAGIC, DataError
from .specs import DatasetSpec

TIMEOUT = 5.0            # seconds, per connect and per read
DEADLINE = 120.0         # seconds, for the whole download (4 files, ~11 MB MNIST, ~30 MB Fashion)
MAX_BYTES = 64 << 20     # a mirror answer larger than this is rejected


def urlopen_bytes(url: str, timeout: float) -> bytes:
    """GET ``url`` with urllib (``timeout`` per socket operation); at most ``MAX_BYTES``."""
    request = urllib.request.Request(url, headers={"User-Agent": "refbnn"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data = response.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise OSError(f"answer larger than {MAX_BYTES} bytes")
    return data


OPENER = urlopen_bytes


def _call_with_deadline(fn, args, remaining: float):
    """``fn(*args)`` in a daemon thread; TimeoutError if it has not returned in ``remaining`` s."""
    box = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # reported to the caller below
            box["error"] = e

    thread = threading.Thread(target=run, name="refbnn-download", daemon=True)
    thread.start()
    thread.join(max(remaining, 0.0))
    if thread.is_alive():
        raise TimeoutError("total download deadline passed")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _content(data: bytes) -> bytes:
    """The decompressed content of ``data`` (gzip detected by magic bytes)."""
    return gzip.decompress(data) if data[:2] == GZIP_MAGIC else data


def _fetch_verified(spec: DatasetSpec, file_name: str, opener, timeout: float,
                    deadline_at: float) -> bytes:
    reasons = []
    for mirror in spec.mirrors:
        url = mirror + file_name + ".gz"
        remaining = deadline_at - time.monotonic()
        if remaining <= 0:
            reasons.append(f"{url}: total download deadline passed")
            break
        try:
            data = _call_with_deadline(opener, (url, min(timeout, remaining)), remaining)
            digest = hashlib.sha256(_content(data)).hexdigest()
        except TimeoutError as e:
            reasons.append(f"{url}: {str(e) or 'timed out'}")
            continue
        except (OSError, EOFError, zlib.error, ValueError) as e:
            reasons.append(f"{url}: {getattr(e, 'reason', None) or e}")
            continue
        if digest != spec.sha256[file_name]:
            reasons.append(f"{url}: SHA-256 mismatch (got {digest[:16]}..., expected "
                           f"{spec.sha256[file_name][:16]}...)")
            continue
        return data
    raise DataError(f"could not download {file_name} for {spec.name}: " + "; ".join(reasons))


def download_dataset(spec: DatasetSpec, dest: Path, opener=None, timeout: float | None = None,
                     deadline: float | None = None) -> list[Path]:
    """Download, verify and store the four files of ``spec`` in folder ``dest``; their paths.

    Files are stored under their standard names, with ``.gz`` when the mirror served gzip; a
    same-named file with the other suffix is removed so the lookup finds the new one. Raises
    :class:`DataError` (one line, every mirror's reason) on any failure, leaving ``dest`` as it was.
    """
    opener = OPENER if opener is None else opener
    timeout = TIMEOUT if timeout is None else float(timeout)
    deadline_at = time.monotonic() + (DEADLINE if deadline is None else float(deadline))
    fetched = {f: _fetch_verified(spec, f, opener, timeout, deadline_at) for f in spec.sha256}
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        paths = []
        for file_name, data in fetched.items():
            gz = data[:2] == GZIP_MAGIC
            path, other = dest / (file_name + ".gz"), dest / file_name
            if not gz:
                path, other = other, path
            write_bytes_atomic(path, data)
            if other.exists():
                other.unlink()
            paths.append(path)
    except OSError as e:
        raise DataError(f"cannot write {spec.name} files into {dest}: {e}") from None
    return paths
