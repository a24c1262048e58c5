"""Helpers shared by the command-line tools: one rule for flags, one-line errors, atomic writes.

The rule every refbnn CLI follows: every flag is checked before any work starts (data loading,
training, writing); a bad one prints ``error: argument --flag: <what it accepts>, got 'value'``
on one line and exits with status 2, never a traceback. Each CLI declares a flag's accepted range
once, as its argparse ``type=`` (:func:`int_in`, :func:`float_in`, :data:`positive_int`,
:data:`probability`, ...), and parses with :class:`ArgumentParser`, whose errors are that one line.
Checks that involve two flags (or the file system) call :meth:`ArgumentParser.fail_flag`.

Writes (:func:`atomic_open`, :func:`write_text_atomic`) go to a temporary file
``<name>.<8 characters>.tmp`` in the target's folder, created with mode ``0o666`` minus the umask
(as ``open`` does), synced and renamed over the target: readers see the old file or the new one.
A target that exists and is not a regular file (a folder, a FIFO, ``/dev/null``) is refused
before anything is written. On any error (a full disk included) the temporary file is removed and
the error re-raised; temps of the same target left by a killed process are removed by the next
write to that target.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import re
import secrets
import signal
import sys
from pathlib import Path


class UserError(Exception):
    """A problem with what the user asked for; printed as one line, exit status 2."""


def one_line(text) -> str:
    return " ".join(str(text).split())


def fail(error: BaseException | str, status: int = 2) -> int:
    """Print ``error`` as a single line on stderr and return ``status``."""
    text = one_line(error) or type(error).__name__
    print(f"error: {text}", file=sys.stderr)
    return status


def command(main):
    """Decorator of a CLI's ``main(argv=None) -> int``: a ``SystemExit`` raised inside (a flag
    refused by :class:`ArgumentParser`, ``--help``) becomes the return value, so in-process
    callers get the exit status back as from any other failure."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)

    return wrapper


def run_main(main) -> None:
    """``sys.exit(main())`` for a CLI's ``__main__``: a Ctrl-C that reaches it (outside the places
    that handle it themselves) is one line and exit status 130, never a traceback or a death by
    the signal, also in the moment between ``main`` returning and the interpreter exiting."""
    try:
        status = main()
    except KeyboardInterrupt:
        status = fail("interrupted", 130)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(status)


# --- flags -----------------------------------------------------------------------------------------
class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line, ``error: <message>``, exit status 2
    (argparse's own prints the usage first)."""

    def error(self, message):
        print(f"error: {one_line(message)} (see --help)", file=sys.stderr)
        raise SystemExit(2)

    def fail_flag(self, flag: str, message: str):
        """Reject ``flag`` after parsing (checks across flags): ``error: argument FLAG: ...``."""
        self.error(f"argument {flag}: {message}")


def _bounds(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return ""


def int_in(lo: int | None = None, hi: int | None = None):
    """argparse type: a decimal integer in ``[lo, hi]`` (``None``: unbounded on that side)."""
    what = " ".join(["an integer", _bounds(lo, hi, False, False)]).strip()

    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except (ValueError, AttributeError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = f"int {_bounds(lo, hi, False, False)}".strip()
    parse.accepts = what
    return parse


def float_in(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
             hi_open: bool = False):
    """argparse type: a finite number in the interval from ``lo`` to ``hi`` (open ends with
    ``lo_open`` / ``hi_open``; ``None``: unbounded). NaN and +-inf are always refused."""
    what = " ".join(["a finite number", _bounds(lo, hi, lo_open, hi_open)]).strip()

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        bad = not math.isfinite(value)
        bad = bad or (lo is not None and (value <= lo if lo_open else value < lo))
        bad = bad or (hi is not None and (value >= hi if hi_open else value > hi))
        if bad:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = "number"
    parse.accepts = what
    return parse


positive_int = int_in(1)
nonnegative_int = int_in(0)
positive_float = float_in(0.0, lo_open=True)
nonnegative_float = float_in(0.0)
probability = float_in(0.0, 1.0)
seed = int_in(0, 2**63 - 1)
#: ``--threads``: at least one, at most what any machine refbnn runs on has
threads = int_in(1, 1024)
#: a width multiplier: positive, at most 4 (4x ResNet-18 widths: stages of up to 2048 channels)
width_multiplier = float_in(0.0, 4.0, lo_open=True)
MAX_SIDE = 4096


def parse_shape(text: str) -> list[int]:
    """``"1,28,28"`` -> ``[1, 28, 28]`` (argparse type): three integers in [1, 4096]."""
    try:
        shape = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W integers, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1 or max(shape) > MAX_SIDE:
        raise argparse.ArgumentTypeError(f"expected three integers C,H,W in [1, {MAX_SIDE}], "
                                         f"got {text!r}")
    return shape


def existing_file(text: str) -> str:
    """argparse type: a path naming an existing regular file."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: not a regular file")
    return text


def existing_dir(text: str) -> str:
    """argparse type: a path naming an existing folder."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    return text


def same_file(a, b) -> bool:
    """Whether paths ``a`` and ``b`` name the same file: the same inode when both exist (symlinks
    and hard links included), else the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def check_writable(folder) -> None:
    """Create ``folder`` and prove a file can be written there (raises ``OSError``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{secrets.token_hex(4)}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    os.unlink(probe)


# --- data ------------------------------------------------------------------------------------------
def load_split(name: str, split: str, data_dir=None, download: bool = True):
    """``(dataset, folder)``: split ``split`` of data set ``name`` and the folder it was read from.

    With ``data_dir`` the files must be in ``data_dir`` itself or in ``data_dir/<name>/``: a folder
    that does not hold them is a :class:`~refbnn.data.DataError`, never silently replaced by
    ``$REFBNN_DATA_DIR``, the cache or a download. Without it, the lookup of
    :mod:`refbnn.data.locate` applies (downloading into the cache when ``download``)."""
    from refbnn.data import DataError, load_dataset, locate
    from refbnn.data.specs import SPLIT_FILES, check_split, get_spec

    spec = get_spec(name)
    files = SPLIT_FILES[check_split(split)]
    if data_dir is not None:
        dirs = [Path(data_dir), Path(data_dir) / spec.name]
    else:
        dirs = locate.search_dirs(spec.name)
    found = locate.find_files(dirs, files)
    if found is None and data_dir is not None:
        raise DataError(f"--data-dir {data_dir}: holds no {spec.name} {split} files "
                        f"({' and '.join(f + '[.gz]' for f in files)}), neither in it nor in "
                        f"{Path(data_dir) / spec.name}")
    folder = found[0].parent if found is not None else locate.cache_dir(spec.name)
    dataset = load_dataset(spec.name, split, data_dir=folder if found is not None else None,
                           download=download)
    return dataset, folder


# --- atomic writes ---------------------------------------------------------------------------------
def _temp_re(target: Path) -> re.Pattern:
    # 8 characters: secrets.token_hex(4) here; mkstemp's alphabet for the files older versions left
    return re.compile(re.escape(target.name) + r"\.[a-z0-9_]{8}\.tmp")


def remove_stale_temps(target) -> list[Path]:
    """Remove the temporary files of earlier (killed) writes to ``target``: only names of this
    module's pattern ``<name>.<8 characters>.tmp`` in the target's folder. Returns them."""
    target = Path(target)
    pattern = _temp_re(target)
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def create_temp(target) -> tuple[int, Path]:
    """``(fd, path)`` of a new, empty temporary file for a write of ``target``: in its folder,
    named ``<name>.<8 hex digits>.tmp``, mode ``0o666 & ~umask``; stale temps of ``target`` are
    removed first (:func:`remove_stale_temps`). The caller writes, renames or unlinks it."""
    from refbnn.atomicio import check_target

    target = Path(target)
    check_target(target)  # a folder, FIFO or device node is refused, not replaced
    remove_stale_temps(target)
    while True:
        tmp = target.with_name(f"{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 1 in 4 billion
            continue


@contextlib.contextmanager
def atomic_open(path, binary: bool = False):
    """``with atomic_open(path) as f: f.write(...)``: write ``path`` atomically (module docstring).
    Text is UTF-8. The file gets mode ``0o666 & ~umask``, like any file ``open`` creates."""
    path = Path(path)
    fd, tmp = create_temp(path)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: readers see the old file or the new one."""
    with atomic_open(path) as f:
        f.write(text)
