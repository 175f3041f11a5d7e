"""Checkpoints written atomically in their own folder.

Lightning's ``TorchCheckpointIO`` serialises a checkpoint in memory and writes it through an fsspec transaction,
whose temporary file lies in ``$TMPDIR``: when that is another file system, the final move is a copy, and a run
killed during it leaves a truncated checkpoint under the final name. :class:`AtomicCheckpointIO` writes the file
under a hidden temporary name in the checkpoint's own folder, flushes it to disk and renames it over the final
name (``os.replace``, atomic within one file system): a reader, or the next run, sees the old checkpoint or the
new one, never a part of one. A kill leaves at most the hidden temporary file.

:func:`use_atomic_checkpoints` gives a trainer that IO and makes its ``ModelCheckpoint`` callbacks keep one file
per step: a resumed run that saves a step again replaces that step's file (Lightning would add
``epoch=E-step=S-v1.ckpt`` beside it, two files claiming one step).
"""

from __future__ import annotations

import os
import re
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


def one_file_per_step(callback) -> bool:
    """Make a ``ModelCheckpoint`` whose file names hold the step (the default ``epoch=E-step=S``) replace the file of
    a step that it saves again instead of writing ``epoch=E-step=S-v1.ckpt`` (and ``last-v1.ckpt``) beside it, as
    a resumed run does when it passes a step that the run saved before it was stopped. With
    :class:`AtomicCheckpointIO` the replacement is atomic. Callbacks with other file names keep Lightning's version
    counter: two of their saves in one step would otherwise share a name. Returns whether the callback was
    changed."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    if not isinstance(callback, ModelCheckpoint):
        return False
    if callback.filename is not None and not re.search(r"\{step[:}]", callback.filename):
        return False
    callback._enable_version_counter = False  # ModelCheckpoint(enable_version_counter=False)
    return True


def use_atomic_checkpoints(trainer) -> None:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` unless it was configured with a checkpoint IO of its own, and
    make its checkpoint callbacks keep one file per step (:func:`one_file_per_step`)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    for callback in trainer.checkpoint_callbacks:
        one_file_per_step(callback)
