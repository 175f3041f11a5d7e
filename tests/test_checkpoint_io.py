"""Checkpoints are written to a temporary file in their own folder and renamed: a run killed during a save
leaves the previous checkpoint whole."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from clusterformer import checkpoint_io
from clusterformer.checkpoint_io import AtomicCheckpointIO
from clusterformer.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "classification" / "clusterformer_nano_shapes.yaml"

# trains a few steps with a checkpoint after every step (the step's file, then last.ckpt); the 4th save (step 2's
# last.ckpt) writes part of the file and kills the process
SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import lightning as L, torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from clusterformer import checkpoint_io
    from clusterformer.checkpoint_io import AtomicCheckpointIO

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    saves, save = [], torch.save
    def killed_in_the_fourth_save(obj, file):
        saves.append(1)
        if len(saves) == 4:
            file.write(b"PK half a checkpoint")
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        save(obj, file)

    checkpoint_io.torch.save = killed_in_the_fourth_save
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=sys.argv[1], save_last=True, every_n_train_steps=1, save_top_k=-1)],
    )
    trainer.fit(Tiny(), data)
    """
)


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path):
    folder = tmp_path / "checkpoints"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(folder)], capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    last = torch.load(folder / "last.ckpt", weights_only=True)  # step 1's, complete
    assert last["global_step"] == 1
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"
    ]  # fmt: skip
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.")  # the killed save's temporary file
    assert (folder / leftovers[0]).read_bytes() == b"PK half a checkpoint"


def test_the_temporary_file_is_in_the_checkpoint_folder(tmp_path, monkeypatch):
    seen = []
    save = torch.save

    def recording(obj, file):
        seen.append(file.name)
        save(obj, file)

    monkeypatch.setattr(torch, "save", recording)
    AtomicCheckpointIO().save_checkpoint({"step": 3}, tmp_path / "sub" / "last.ckpt")
    assert len(seen) == 1 and Path(seen[0]).parent == tmp_path / "sub"
    assert torch.load(tmp_path / "sub" / "last.ckpt", weights_only=True) == {"step": 3}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["last.ckpt"]


def test_a_resumed_fit_replaces_the_file_of_a_step_it_saves_again(shapes_dir, one_thread, tmp_path, monkeypatch):
    """A save that fails after the step's file and before ``last.ckpt`` (a full disk, a kill) leaves ``last.ckpt`` a
    step behind: ``fit --ckpt_path last`` then saves that step again, into the same file, not ``...-v1.ckpt``."""
    root = shapes_dir(seed=1, num_train=16, num_val=6, size=48) / "imagefolder"
    config = yaml.safe_load(CONFIG.read_text())
    folder = tmp_path / "run" / "checkpoints"
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(folder), "every_n_train_steps": 1, "save_last": True}},
    ]  # fmt: skip
    config["trainer"]["logger"] = False
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    def fit(*args) -> int:
        return main(
            ["fit", "--config", str(tmp_path / "config.yaml"), f"--data.init_args.root={root}",
             "--data.init_args.num_workers=0", "--data.init_args.batch_size=4", "--trainer.max_steps=2",
             "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
             "--trainer.enable_model_summary=false", *args]
        )  # fmt: skip

    saves, save = [], torch.save

    def full_disk_at_the_fourth_save(obj, file):  # step 1's file and last.ckpt, step 2's file, then last.ckpt
        saves.append(file.name)
        if len(saves) == 4:
            raise OSError(28, "No space left on device")
        save(obj, file)

    monkeypatch.setattr(checkpoint_io.torch, "save", full_disk_at_the_fourth_save)
    with pytest.raises(OSError, match="No space left"):
        fit()
    monkeypatch.setattr(checkpoint_io.torch, "save", save)
    step_file = folder / "epoch=0-step=2.ckpt"
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 1
    first = step_file.stat()
    assert fit("--ckpt_path", "last") == 0  # from step 1: saves step 2 again
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]  # no -v1 file
    assert (step_file.stat().st_ino, step_file.stat().st_mtime_ns) != (first.st_ino, first.st_mtime_ns)
    assert {torch.load(path, weights_only=True)["global_step"] for path in folder.iterdir()} == {2}


def test_only_file_names_that_hold_the_step_lose_the_version_counter():
    from lightning.pytorch.callbacks import ModelCheckpoint

    from clusterformer.checkpoint_io import one_file_per_step

    for filename, changed in ((None, True), ("{epoch}-{step:05d}", True), ("best", False), ("{epoch}", False)):
        callback = ModelCheckpoint(filename=filename)
        assert one_file_per_step(callback) is changed, filename
        assert callback._enable_version_counter is not changed, filename
