"""Atomic file writes: readers see the old file or the new one, never a half-written one.

:func:`write_bytes_atomic` writes ``data`` to ``<target>.tmp-<16 hex digits>`` in the target's
folder (created with mode ``0o666`` minus the umask, like ``open``), fsyncs it and renames it over the
target (``os.replace``). On any error (a full disk, a signal) the temporary file is removed and the
target is untouched; the error is re-raised as an ``OSError`` naming the target. A target that
exists and is not a regular file (a folder, a FIFO, a device such as ``/dev/null``, a socket) is
refused before anything is written (:func:`check_target`): a rename would replace it.

A writer killed in the middle (SIGKILL, power loss) cannot remove its temporary file. Each writer
holds an exclusive ``flock`` on its temporary file while it writes, and every write first removes
the unlocked temporary files *of the same target* matching exactly that name pattern
(:func:`remove_stale_temps`): those of a dead writer, never another live writer's, never any other
file. Without ``fcntl`` (Windows) only temporary files older than a day are removed.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

TEMP_SUFFIX = ".tmp-"
_HEX = 16
_FRESH_S = 10.0          # a temp younger than this may be a live writer's not yet locked one
_OLD_WITHOUT_LOCKS_S = 86400.0


def temp_pattern(path) -> re.Pattern:
    """The names of ``path``'s temporary files: ``<name>.tmp-`` and 16 lowercase hex digits."""
    return re.compile(re.escape(Path(path).name) + re.escape(TEMP_SUFFIX) + f"[0-9a-f]{{{_HEX}}}")


def remove_stale_temps(path) -> list[Path]:
    """Remove the temporary files a killed writer of ``path`` left (unlocked, older than a few
    seconds, named by :func:`temp_pattern`); return them. Errors are ignored (best effort)."""
    path = Path(path)
    pattern = temp_pattern(path)
    removed = []
    try:
        names = os.listdir(path.parent if str(path.parent) else ".")
    except OSError:
        return removed
    now = time.time()
    for name in names:
        if not pattern.fullmatch(name):
            continue
        tmp = path.with_name(name)
        try:
            if _is_stale(tmp, now):
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            continue
    return removed


def _is_stale(tmp: Path, now: float) -> bool:
    st = os.lstat(tmp)
    if not os.path.isfile(tmp) or os.path.islink(tmp):
        return False
    age = now - st.st_mtime
    if fcntl is None:
        return age > _OLD_WITHOUT_LOCKS_S
    if age < _FRESH_S:
        return False
    fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False          # a live writer holds it
    finally:
        os.close(fd)          # closing releases the probe's lock
    return True


def check_target(path) -> None:
    """Raise ``OSError`` (naming ``path``) if ``path`` exists and is not a regular file (a link to
    one is fine): an atomic write renames over its target, which would replace a folder's name, a
    FIFO, a device node (``/dev/null``, as root) or a socket by a plain file."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError:
        return  # absent (or unreachable: the write itself reports that)
    if stat.S_ISREG(st.st_mode):
        return
    what = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, device or socket)"
    code = errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EEXIST
    raise OSError(code, f"cannot write {path}: it is {what}; refusing to replace it (nothing "
                        "written)")


def write_bytes_atomic(path, data) -> None:
    """Replace ``path`` by ``data`` (bytes-like) atomically, see the module docstring."""
    path = Path(path)
    check_target(path)
    remove_stale_temps(path)
    tmp = path.with_name(f"{path.name}{TEMP_SUFFIX}{secrets.token_hex(_HEX // 2)}")
    view = memoryview(data).cast("B")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        raise _named(e, path) from None
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:done + (1 << 24)])
        os.fsync(fd)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _named(e, path) from None
        raise
    finally:
        os.close(fd)
    _fsync_folder(path.parent)


def _named(e: OSError, path: Path) -> OSError:
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        reason = "no space left on the device"
    return type(e)(e.errno, f"cannot write {path}: {reason} (nothing written, {path.name} "
                            "left as it was)")


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX); best effort."""
    try:
        fd = os.open(folder if str(folder) else ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
