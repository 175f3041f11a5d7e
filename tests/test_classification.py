"""Classification end to end: the CLI on a config, resuming, faults, the demo."""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from clusterformer.cli import main
from clusterformer.data import THINGS, make_shapes
from clusterformer.errors import SettingError
from clusterformer.tasks import ClassificationTask, ImageFolderData

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, seed=1, num_train=16, num_val=6, size=48, progress=False)
    root = out / "imagefolder"
    for split in ("train", "val"):
        assert all(any((root / split / name).iterdir()) for name in THINGS), "every class needs a crop"
    return root


def small_data(root, **kwargs):
    return ImageFolderData(
        str(root), img_size=32, eval_resize=32, batch_size=4, num_workers=0, randaugment=False, **kwargs
    )


def small_task(**kwargs):
    return ClassificationTask("clusterformer_nano", num_classes=4, model_kwargs=dict(center_grid=4), **kwargs)


def trainer(tmp_path, **kwargs):
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        limit_train_batches=3,
        limit_val_batches=1,
        **kwargs,
    )


def test_cli_fit_with_the_demo_config(crops, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(
        ["fit", "--config", str(ROOT / "configs/classification/clusterformer_nano_shapes.yaml"),
         "--trainer.fast_dev_run=true", f"--data.init_args.root={crops}", "--data.init_args.num_workers=0",
         "--data.init_args.batch_size=4"]
    )  # fmt: skip
    assert code == 0


@pytest.mark.parametrize("name", ["clusterformer_tiny_imagenet", "clusterformer_small_imagenet"])
def test_paper_configs_parse(name, crops, tmp_path, monkeypatch):
    """The ImageNet recipes are valid LightningCLI configs (checked with --print_config)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / f"configs/classification/{name}.yaml"), "--print_config"])
    assert exit_info.value.code == 0


def test_class_count_mismatch_is_a_clear_error(crops, tmp_path):
    task = ClassificationTask("clusterformer_nano", num_classes=7)
    with pytest.raises(SettingError, match=r"num_classes: 7, but the dataset .* has 4 classes \(circle.*; set it to 4"):
        trainer(tmp_path, max_epochs=1).fit(task, small_data(crops))


def test_nan_loss_stops_with_a_message(crops, tmp_path, monkeypatch):
    task = small_task()
    monkeypatch.setattr(task.criterion, "forward", lambda logits, labels: logits.sum() * float("nan"))
    with pytest.raises(FloatingPointError, match="training loss is nan at step 0"):
        trainer(tmp_path, max_epochs=1).fit(task, small_data(crops))


def test_resume_continues_exactly(crops, tmp_path):
    """Two epochs in one run equal one epoch, a stop, and a resumed second epoch."""

    def run(epochs, ckpt_dir, resume=None):
        L.seed_everything(0, verbose=False)
        task = small_task(warmup_epochs=1)
        data = small_data(crops, random_erasing=0.5)
        fit = trainer(tmp_path, max_epochs=epochs, callbacks=[ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True)])
        fit.fit(task, data, ckpt_path=resume)
        return task, fit

    straight, _ = run(2, tmp_path / "straight")
    _, first = run(1, tmp_path / "first")
    last = tmp_path / "first" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)  # no pickled code in our checkpoints
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == 3
    assert {"optimizer_states", "lr_schedulers", "rng_states"} <= set(checkpoint)
    resumed, second = run(2, tmp_path / "second", resume=str(last))
    assert second.global_step == 6 and second.current_epoch == 2
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_missing_training_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="training folder not found") as info:
        ImageFolderData(str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere" / "train") in str(info.value)
