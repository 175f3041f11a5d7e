"""Into a log (a pipe or a file), ``clusterformer fit`` and the demo print one line per epoch with the metrics,
without Lightning's tips, accelerator lines, advice warnings or carriage-return progress bars (``progress.py``)."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.callbacks import TQDMProgressBar

from clusterformer.progress import EpochLines, epoch_line, progress_callbacks, quiet_lightning

ROOT = Path(__file__).resolve().parents[1]
EPOCH = re.compile(r"^epoch (\d+)/2  step \d+  ")


def test_the_epoch_line_names_the_epoch_the_step_the_metrics_and_the_seconds():
    metrics = {"train/loss": torch.tensor(1.23449), "val/bbox_AP50": 0.1234}
    assert (
        epoch_line(3, 5, 150, metrics, 12.34) == "epoch 3/5  step 150  train/loss 1.234  val/bbox_AP50 0.123  (12.3 s)"
    )
    # training bounded by steps or time: no number of epochs; tiny and huge numbers keep their digits
    assert epoch_line(2, -1, 7, {"lr": 2e-5, "loss": 123456.0, "top1": 0}, 0.04) == (
        "epoch 2  step 7  lr 2e-05  loss 1.23e+05  top1 0.000  (0.0 s)"
    )
    assert epoch_line(1, None, 1, {}, 1.0) == "epoch 1  step 1  (1.0 s)"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_epoch_lines_replace_the_bar_only_in_a_log():
    (callback,) = progress_callbacks(True, stream=io.StringIO(), prefix="  ")
    assert isinstance(callback, EpochLines)
    assert progress_callbacks(None, stream=io.StringIO())  # Lightning's default: a progress bar
    assert progress_callbacks(True, stream=_Terminal()) == []  # Lightning's own bar on a terminal
    assert progress_callbacks(False, stream=io.StringIO()) == []  # no progress bar asked for
    assert progress_callbacks(True, [TQDMProgressBar()], stream=io.StringIO()) == []  # a bar of the config's own


def test_the_demo_trains_with_the_epoch_lines_in_a_log(tmp_path, monkeypatch):
    from clusterformer.commands.demo import _callbacks

    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert [type(callback) for callback in _callbacks(tmp_path)][-1] is EpochLines


def test_quiet_lightning_drops_lightnings_notes_and_nothing_else():
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_lightning():
                logger.info("💡 Tip: For seamless cloud logging, try installing litlogger")
                logger.info("GPU available: False, used: False")
                logger.info("`Trainer.fit` stopped: `max_epochs=2` reached.")
                logger.info("Restoring states from the checkpoint path at last.ckpt")
                warnings.warn("The 'train_dataloader' does not have many workers", PossibleUserWarning, stacklevel=1)
                warnings.warn("The 'train_dataloader' does not have many workers", UserWarning, stacklevel=1)
                warnings.warn("a warning of the task's own", UserWarning, stacklevel=1)
            logger.info("GPU available: False, used: False")  # outside the block: as before
            warnings.warn("The 'val_dataloader' does not have many workers", PossibleUserWarning, stacklevel=1)
    finally:
        logger.removeHandler(handler)
    assert seen == ["Restoring states from the checkpoint path at last.ckpt", "GPU available: False, used: False"]
    assert [(type(w.message), str(w.message)) for w in caught] == [
        (UserWarning, "The 'train_dataloader' does not have many workers"),  # the category counts too
        (UserWarning, "a warning of the task's own"),
        (PossibleUserWarning, "The 'val_dataloader' does not have many workers"),
    ]


@pytest.fixture(scope="module")
def shapes(shapes_dir):
    return shapes_dir(seed=4, num_train=8, num_val=5, size=64)  # the data of test_cli_fit.py


def test_fit_into_a_pipe_prints_one_line_per_epoch_and_no_lightning_notes(shapes, tmp_path):
    """Two epochs, validated in the second only (its line alone has the validation metrics); the config's
    logging interval (longer than the run) and the loader without workers would each make Lightning warn."""
    command = [
        sys.executable, "-m", "clusterformer.cli", "fit",
        "--config", str(ROOT / "configs/classification/clusterformer_nano_shapes.yaml"),
        f"--data.init_args.root={shapes / 'imagefolder'}", "--data.init_args.img_size=32",
        "--data.init_args.eval_resize=32", "--data.init_args.batch_size=2", "--data.init_args.num_workers=0",
        "--trainer.max_epochs=2", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=1", "--trainer.check_val_every_n_epoch=2",
        "--trainer.enable_model_summary=false", "--run_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)  # a busy CPU is slow
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "\r" not in output
    for noise in ("Tip:", "GPU available", "TPU available", "Trainer.fit` stopped", "Seed set", "does not have many"):
        assert noise not in output, (noise, output)
    assert not [line for line in output.splitlines() if re.search("warn", line, re.IGNORECASE)], output
    lines = [line for line in output.splitlines() if EPOCH.match(line)]
    assert [EPOCH.match(line)[1] for line in lines] == ["1", "2"], output
    assert "train/loss " in lines[0] and "val/" not in lines[0]  # not validated: no validation metrics
    assert "train/loss " in lines[1] and "val/top1 " in lines[1] and "val/loss " in lines[1]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
