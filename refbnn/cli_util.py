"""Helpers shared by the command-line tools: one-line errors and argument parsing."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


class UserError(Exception):
    """A problem with what the user asked for; printed as one line, exit status 2."""


def fail(error: BaseException, status: int = 2) -> int:
    """Print ``error`` as a single line on stderr and return ``status``."""
    text = " ".join(str(error).split()) or type(error).__name__
    print(f"error: {text}", file=sys.stderr)
    return status


def parse_shape(text: str) -> list[int]:
    """``"1,28,28"`` -> ``[1, 28, 28]`` (argparse type)."""
    try:
        shape = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W integers, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers C,H,W, got {text!r}")
    return shape


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``: readers
    see the old file or the new one, never a half-written one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
