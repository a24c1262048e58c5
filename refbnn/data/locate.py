"""Where a data set's files are looked for, in order, and how a file name is matched.

Folders searched for data set ``name`` (first folder holding BOTH files of the split wins):

1. the explicit ``data_dir`` argument itself, then ``data_dir/<name>/``;
2. ``<root>/<name>/`` for each root in ``$REFBNN_DATA_DIR``, a list of folders separated by
   ``os.pathsep`` (``:`` on POSIX) like ``PATH``, searched left to right (empty entries ignored);
   a system-wide copy, such as the one a distribution package installs, is named here;
3. the user cache: ``$XDG_CACHE_HOME/refbnn/<name>/`` (``XDG_CACHE_HOME`` used only when set to an
   absolute path) or else ``~/.cache/refbnn/<name>/`` (downloads go here).

No other place is searched: the library names no system folder of its own.

In a folder, file ``F`` (a standard name such as ``train-images-idx3-ubyte``) is matched as ``F``,
else ``F.gz``; the reader detects compression from the content, not from the name.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "REFBNN_DATA_DIR"


def cache_dir(name: str) -> Path:
    """The user-cache folder of data set ``name`` (see the module docstring); not created here."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return root / "refbnn" / name


def env_roots() -> list[Path]:
    """The folders listed in ``$REFBNN_DATA_DIR`` (``os.pathsep``-separated), in order."""
    return [Path(r) for r in os.environ.get(ENV_VAR, "").split(os.pathsep) if r]


def search_dirs(name: str, data_dir=None) -> list[Path]:
    """The folders searched for data set ``name``, in lookup order (they need not exist)."""
    dirs = []
    if data_dir is not None:
        dirs += [Path(data_dir), Path(data_dir) / name]
    dirs += [Path(root) / name for root in env_roots()]
    dirs.append(cache_dir(name))
    return dirs


def find_file(folder: Path, file_name: str) -> Path | None:
    """``folder/file_name`` if it is a file, else ``folder/file_name.gz`` if that is, else None."""
    for candidate in (folder / file_name, folder / (file_name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def find_files(dirs, file_names) -> tuple[Path, ...] | None:
    """The paths of all ``file_names`` in the first folder of ``dirs`` that holds every one."""
    for folder in dirs:
        paths = tuple(find_file(Path(folder), f) for f in file_names)
        if all(p is not None for p in paths):
            return paths
    return None
