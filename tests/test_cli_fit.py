"""``clusterformer fit`` on the shapes configs of every task leaves a checkpoint of its task and logs the task's
validation metrics (``registry.TASKS``); ``validate`` and ``test`` with ``--ckpt_path`` on that checkpoint log the
metrics that ``fit`` logged for it."""

import csv
import math
from pathlib import Path

import pytest
import torch

from clusterformer.cli import main
from clusterformer.registry import TASKS
from clusterformer.weights import task_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def shapes(shapes_dir):
    return shapes_dir(seed=4, num_train=8, num_val=5, size=64)


def run(command: str, task: str, root: Path, run_dir: Path, *args) -> int:
    """``clusterformer COMMAND`` with the task's shapes config on tiny data: one training batch, two validation
    batches, no sanity check, outputs in ``run_dir``."""
    data = ["--data.init_args.batch_size=2"]
    if task == "classification":
        data += [f"--data.init_args.root={root / 'imagefolder'}", "--data.init_args.img_size=32",
                 "--data.init_args.eval_resize=32"]  # fmt: skip
    else:
        data += [f"--data.init_args.root={root}", "--data.init_args.crop=64", "--data.init_args.test_shorter_side=64"]
    return main(
        [command, "--config", str(ROOT / f"configs/{task}/clusterformer_nano_shapes.yaml"), *data,
         "--data.init_args.num_workers=0", "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
         "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2", "--trainer.num_sanity_val_steps=0",
         "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", "--run_dir", str(run_dir), *map(str, args)]
    )  # fmt: skip


def logged(run_dir: Path) -> dict[str, float]:
    """The last value of every metric in the run's CSV log (one log per run folder)."""
    (path,) = run_dir.rglob("metrics.csv")
    values = {}
    with open(path) as file:
        for row in csv.DictReader(file):
            values.update({key: float(value) for key, value in row.items() if value and key not in ("epoch", "step")})
    return values


def test_validate_and_test_reproduce_the_metrics_that_fit_logged(shapes, tmp_path):
    assert run("fit", "classification", shapes, tmp_path / "fit") == 0
    checkpoint = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    stored = torch.load(checkpoint, weights_only=True)
    assert stored["global_step"] == 1 and stored["clusterformer_task"] == "classification"
    assert task_from_checkpoint(checkpoint)[0] == "classification"  # a checkpoint that the commands load
    fitted = logged(tmp_path / "fit")
    assert "train/loss" in fitted and math.isfinite(fitted["val/loss"]) and 0 <= fitted["val/top1"] <= 1
    for command in ("validate", "test"):
        assert run(command, "classification", shapes, tmp_path / command, "--ckpt_path", checkpoint) == 0
        again = logged(tmp_path / command)
        prefix = "val" if command == "validate" else "test"  # the test split is the validation folder
        for key in ("loss", "top1"):
            assert again[f"{prefix}/{key}"] == pytest.approx(fitted[f"val/{key}"], rel=1e-5, abs=1e-6), (command, key)


@pytest.mark.parametrize("written_by", ["this version", "an earlier version"])
def test_validate_reads_a_checkpoint_of_a_task_built_in_python(written_by, shapes, tmp_path):
    """A checkpoint of a task that ``clusterformer demo`` (or a notebook) built and a plain Trainer saved, whose
    settings differ from the config's (the demo's token head and 4 x 4 centers): ``validate --ckpt_path`` rebuilds
    the checkpoint's model and reproduces its metrics. Checkpoints written before tasks recorded ``_class_path``
    (LightningCLI's record of the task class) failed with ``not an option of lightning.LightningModule``."""
    import lightning as L

    from clusterformer.recipes import build_stage

    data_settings = {"root": str(shapes / "imagefolder"), "num_workers": 0, "batch_size": 2, "img_size": 32,
                     "eval_resize": 32}  # fmt: skip
    demo_model = {"model_kwargs": {"head": "tokens", "center_grid": [4, 4]}}
    task, data = build_stage("classification", data_settings, demo_model)
    trainer = L.Trainer(max_steps=1, limit_val_batches=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path / "python")  # fmt: skip
    trainer.fit(task, data)
    expected = trainer.validate(task, data, verbose=False)[0]
    (checkpoint,) = (tmp_path / "python").rglob("*.ckpt")
    stored = torch.load(checkpoint, weights_only=True)
    assert stored["hyper_parameters"]["_class_path"] == "clusterformer.tasks.classification.ClassificationTask"
    if written_by == "an earlier version":
        del stored["hyper_parameters"]["_class_path"]
        torch.save(stored, checkpoint)
    assert run("validate", "classification", shapes, tmp_path / "validate", "--ckpt_path", checkpoint) == 0
    again = logged(tmp_path / "validate")
    for key in ("val/loss", "val/top1"):
        assert again[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("task", ["detection", "instance", "semantic", "panoptic"])
def test_fit_with_the_shapes_config_leaves_a_checkpoint_and_the_tasks_metrics(task, shapes, tmp_path):
    spec = TASKS[task]
    assert run("fit", task, shapes, tmp_path / "run") == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 1 and checkpoint["clusterformer_task"] == task
    values = logged(tmp_path / "run")
    validation = {key for key in values if key.startswith("val/")}
    assert validation == set(spec.metrics)  # what the registry says the task logs
    # the checkpoint rebuilds the model it was saved from (the semantic task's one query per class included)
    _, module = task_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    if task == "semantic":
        assert module.model.decoder.num_queries == module.hparams.num_classes == 7
    assert 0 <= values[spec.monitor] <= 1


SEED_DECODERS = {  # decoder settings -> the class of the decoder's layers and of its pixel path
    "kind: kmax": ("KMaXDecoderLayer", "PixelDecoder"),
    "kind: cmt": ("CMTDecoderLayer", "PixelDecoder"),
    "pixel_path: hcformer": ("ClusteringDecoderLayer", "HCFormerPixelPath"),
}


@pytest.mark.parametrize("setting", list(SEED_DECODERS))
@pytest.mark.parametrize("task", ["instance", "semantic", "panoptic"])
def test_fit_trains_and_evaluates_the_seed_decoders(task, setting, shapes, tmp_path):
    """``decoder.kind: kmax`` / ``cmt``, ``decoder.pixel_path: hcformer`` (kMaX-DeepLab's k-means cross-attention,
    CMT-DeepLab's clustering center update, HCFormer's hierarchical clustering; docs/heads.md) through
    ``clusterformer fit``."""
    assert run("fit", task, shapes, tmp_path / "run", "--model.init_args.decoder", f"{{{setting}}}") == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    key, value = setting.split(": ")
    assert checkpoint["hyper_parameters"]["decoder"][key] == value
    _, module = task_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    layer, path = SEED_DECODERS[setting]
    assert type(module.model.decoder.layers[0]).__name__ == layer
    assert type(module.model.decoder.pixel_decoder).__name__ == path
    if path == "HCFormerPixelPath":  # its temperatures' regularisation is in the loss
        assert "train/loss_reg" in logged(tmp_path / "run")
    values = logged(tmp_path / "run")
    assert {key for key in values if key.startswith("val/")} == set(TASKS[task].metrics)
    assert all(math.isfinite(value) for value in values.values())
