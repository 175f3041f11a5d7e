"""``clusterformer fit --ckpt_path`` checks the file before Lightning reads it: a checkpoint of another task (which
used to fail deep in the loss), a truncated file, a text file and a pickle that would run code are refused with one
line naming the file, exit status 2, and nothing written."""

import os
from pathlib import Path

import lightning as L
import pytest
import torch

from clusterformer.cli import main
from clusterformer.tasks import ClassificationTask, SetTask

ROOT = Path(__file__).resolve().parents[1]
DETECTION = ROOT / "configs" / "detection" / "clusterformer_nano_shapes.yaml"
DECODER = dict(num_queries=10, dim=32, mask_dim=32, num_layers=1, num_heads=4, iterations=1, ffn_dim=64)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def save_checkpoint(module: L.LightningModule, path: Path) -> Path:
    """A checkpoint as ``clusterformer fit`` writes it during training (with the class LightningCLI records in the
    hyperparameters, from which Lightning rebuilds the model it resumes), without training."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)  # fmt: skip
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path, weights_only=False)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = f"clusterformer.tasks.{type(module).__name__}"
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def shapes(shapes_dir):
    return shapes_dir(seed=3, num_train=12, num_val=7, size=64)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    classifier = save_checkpoint(ClassificationTask(model="clusterformer_nano", num_classes=4), folder / "cls.ckpt")
    instance = SetTask("instance", "clusterformer_nano", num_classes=4, decoder=DECODER)
    return {"classification": classifier, "instance": save_checkpoint(instance, folder / "instance.ckpt")}


def fit_detection(shapes, *args) -> int:
    return main(
        ["fit", "--config", str(DETECTION), "--trainer.max_steps=1", f"--data.init_args.root={shapes}",
         "--data.init_args.num_workers=0", "--data.init_args.batch_size=2", "--data.init_args.crop=64",
         "--data.init_args.test_shorter_side=64", "--trainer.enable_progress_bar=false", *map(str, args)]
    )  # fmt: skip


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("task", ["classification", "instance"])
def test_a_checkpoint_of_another_task_is_refused(task, checkpoints, shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert fit_detection(shapes, "--run_dir", "run", "--ckpt_path", checkpoints[task]) == 2
    assert one_line_error(capsys) == (
        f"clusterformer fit: error: {checkpoints[task]}: a {task} checkpoint, but the config trains a detection "
        "model; resume from a checkpoint of a detection run, or start a new run from another task's encoder through "
        "its weights ('clusterformer convert --backbone-only', docs/deployment.md)"
    )
    assert not Path("run").exists()


def test_last_of_another_task_is_refused(checkpoints, shapes, tmp_path, monkeypatch, capsys):
    """``--ckpt_path last``: the newest last / on_exception checkpoint of the run's folder, checked the same way."""
    monkeypatch.chdir(tmp_path)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(checkpoints["classification"].read_bytes())
    capsys.readouterr()
    assert fit_detection(shapes, "--run_dir", "run", "--ckpt_path", "last") == 2
    assert one_line_error(capsys).startswith(
        f"clusterformer fit: error: {last}: a classification checkpoint, but the config trains a detection model; "
    )
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == ["checkpoints", "last.ckpt"]


class RunsCode:
    """A pickle payload that would leave a marker file if unpickling ran it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["truncated", "text", "code"])
def test_a_file_that_is_no_checkpoint_is_refused(kind, checkpoints, shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        whole = checkpoints["classification"].read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
        problem = "not a PyTorch checkpoint"
    elif kind == "text":
        path.write_text("epoch: 3\nloss: 0.25\n")
        problem = "not a PyTorch checkpoint"
    else:
        torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": RunsCode(tmp_path / "ran")}, path)
        problem = "refused: the file holds pickled objects that a weights-only load does not allow"
    capsys.readouterr()
    assert fit_detection(shapes, "--run_dir", "run", "--ckpt_path", path) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"clusterformer fit: error: {path}: {problem}")
    assert err.endswith("; --ckpt_path takes a checkpoint that 'clusterformer fit' wrote")
    assert not Path("run").exists() and not (tmp_path / "ran").exists()
