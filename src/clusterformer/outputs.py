"""Writing output files: atomically, and never over earlier results without being asked.

Each file is written under a hidden temporary name in its own folder and renamed over the final name when
complete (``os.replace`` is atomic within one file system); on any error, an interruption included, the
temporary file is removed.

The commands refuse an output file that exists, or an output folder that is not empty, unless they are given
``--overwrite`` (:func:`check_output_file`, :func:`check_output_folder`); with it, a folder's previous results
are removed before the new ones are written (:func:`remove_outputs`), so that no stale file of an earlier run
stays beside them. Files that the command does not write are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
from PIL import Image


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix, so that writers that choose the format by the
    suffix still work); rename it to ``path`` when the block ends, remove it if the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes the file private
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# the temporary files of atomic_path, left behind only when a process is killed (SIGKILL, power loss)
TEMPORARY_PATTERN = ".*.tmp*"


class OutputExistsError(FileExistsError):
    """An output that holds earlier results and may not be replaced (no ``--overwrite``); the message names the
    path and says how to go on."""


def check_output_file(path: str | Path, overwrite: bool) -> Path:
    """``path`` as a :class:`Path`; an :class:`OutputExistsError` when it exists and ``overwrite`` is false, or
    when it is a folder."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{path}: is a folder; the output is a file")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: already exists; pass --overwrite to replace it")
    return path


def _shown(names: list[str], count: int = 3) -> str:
    return ", ".join(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "")


def check_output_folder(folder: str | Path, overwrite: bool) -> Path:
    """``folder`` as a :class:`Path`; an :class:`OutputExistsError` when it is not empty and ``overwrite`` is
    false, or when it is a file."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"{folder}: is a file; the output is a folder")
    entries = sorted(entry.name for entry in folder.iterdir()) if folder.is_dir() else []
    if entries and not overwrite:
        raise OutputExistsError(
            f"{folder}: output folder is not empty ({_shown(entries)}); pass --overwrite to replace its previous "
            "results, or choose another folder"
        )
    return folder


def remove_outputs(folder: str | Path, patterns: Iterable[str]) -> list[str]:
    """Delete the entries of ``folder`` (files, and folders with everything in them) whose names match one of the
    glob ``patterns``, and leftover temporary files; returns the names deleted. Other entries are kept."""
    folder = Path(folder)
    patterns = [*patterns, TEMPORARY_PATTERN]
    removed = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else ():
        if any(fnmatch(entry.name, pattern) for pattern in patterns):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry.name)
    return removed


def json_safe(value):
    """A JSON-ready copy: dicts (keys as strings), lists, str, int, float, bool and None; anything else
    becomes its string."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def write_json(path: str | Path, data, indent: int | None = 1) -> Path:
    """``data`` as JSON (``indent=None``: compact, for large files), atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=indent) + "\n")
    return Path(path)


def save_png(picture: Image.Image | np.ndarray, path: str | Path) -> Path:
    """A PIL image or a uint8 array as a PNG, atomically."""
    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(picture)
    with atomic_path(path) as temporary:
        picture.save(temporary, format="PNG")
    return Path(path)
