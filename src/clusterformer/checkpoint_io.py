"""Checkpoints written atomically in their own folder.

Lightning's ``TorchCheckpointIO`` serialises a checkpoint in memory and writes it through an fsspec transaction,
whose temporary file lies in ``$TMPDIR``: when that is another file system, the final move is a copy, and a run
killed during it leaves a truncated checkpoint under the final name. :class:`AtomicCheckpointIO` writes the file
under a hidden temporary name in the checkpoint's own folder, flushes it to disk and renames it over the final
name (``os.replace``, atomic within one file system): a reader, or the next run, sees the old checkpoint or the
new one, never a part of one. A kill leaves at most the hidden temporary file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .outputs import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves go to a temporary file beside the checkpoint, renamed when complete
    (remote paths keep Lightning's own save)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(Path(path)) as temporary, open(temporary, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())


def use_atomic_checkpoints(trainer) -> None:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` unless it was configured with a checkpoint IO of its own."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
