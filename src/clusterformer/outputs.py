"""Writing output files atomically: a reader (or a crash) never sees a half-written file.

Each file is written under a hidden temporary name in its own folder and renamed over the final name when
complete (``os.replace`` is atomic within one file system); on any error, an interruption included, the
temporary file is removed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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
