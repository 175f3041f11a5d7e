"""Classification end to end: the CLI on a config, resuming, faults, the demo."""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from timm.loss import SoftTargetCrossEntropy

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


def test_a_mixup_cutmix_batch_trains_on_soft_targets(crops, tmp_path):
    """One training step with Mixup/CutMix: the model sees the mixed images, the targets are soft (rows sum to
    1, smoothed), and the loss is timm's soft-target cross-entropy of those targets."""
    L.seed_everything(0, verbose=False)
    task = small_task(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    assert isinstance(task.soft_criterion, SoftTargetCrossEntropy)
    seen = {}
    mixup, criterion = task.mixup, task.soft_criterion.forward

    def watched_mixup(images, labels):
        seen["images"], seen["labels"] = images.clone(), labels.clone()
        seen["mixed"], seen["targets"] = (t.clone() for t in mixup(images, labels))
        return seen["mixed"], seen["targets"]

    def watched_criterion(logits, targets):
        seen["logits"], seen["criterion_targets"], seen["loss"] = logits, targets, criterion(logits, targets)
        return seen["loss"]

    task.mixup, task.soft_criterion.forward = watched_mixup, watched_criterion
    trainer(tmp_path, max_steps=1, num_sanity_val_steps=0).fit(task, small_data(crops, random_erasing=0.0))

    targets, labels = seen["targets"], seen["labels"]
    assert targets.shape == (4, 4) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    assert targets.min() >= 0.1 / 4 - 1e-6  # the smoothing's floor: every class keeps 0.1 / num_classes
    one_hot = torch.nn.functional.one_hot(labels, 4).float() * 0.9 + 0.1 / 4
    assert not torch.allclose(targets, one_hot)  # mixed: not the smoothed labels
    assert not torch.allclose(seen["mixed"], seen["images"])
    assert seen["criterion_targets"] is seen["targets"]
    expected = torch.sum(-targets * seen["logits"].log_softmax(-1), -1).mean()
    torch.testing.assert_close(seen["loss"], expected)


def test_mixing_is_off_by_default_and_the_loss_is_the_cross_entropy_of_the_labels(crops, tmp_path, monkeypatch):
    """The shapes config and the demo do not mix: hard labels reach the (label-smoothed) cross-entropy."""
    task = small_task()
    assert task.mixup is None and task.soft_criterion is None
    seen = []
    forward = task.criterion.forward
    monkeypatch.setattr(task.criterion, "forward", lambda logits, y: seen.append(y) or forward(logits, y))
    trainer(tmp_path, max_steps=1, num_sanity_val_steps=0).fit(task, small_data(crops, random_erasing=0.0))
    assert seen[0].dtype == torch.int64 and seen[0].shape == (4,)


def test_mixing_an_odd_batch_is_a_clear_error():
    task = small_task(mixup_alpha=0.8)
    with pytest.raises(ValueError, match="even training batch.*got 3 images"):
        task.training_step((torch.zeros(3, 3, 32, 32), torch.zeros(3, dtype=torch.int64)), 0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(mixup_alpha=-0.1), "must be >= 0"),
        (dict(cutmix_alpha=1.0, mix_prob=1.5), "mix_prob=1.5"),
        (dict(cutmix_alpha=1.0, mix_switch_prob=-1), "mix_switch_prob=-1"),
        (dict(cutmix_alpha=1.0, mix_mode="row"), "mix_mode='row'"),
    ],
)
def test_bad_mixing_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        small_task(**options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(randaugment="original-mstd0.5"), "randaugment='original-mstd0.5'"),
        (dict(interpolation="cubic"), "interpolation='cubic'"),
        (dict(random_erasing_mode="noise"), "random_erasing_mode='noise'"),
    ],
)
def test_bad_transform_options_are_refused_when_the_data_is_built(crops, options, message):
    with pytest.raises(ValueError, match=message):
        ImageFolderData(str(crops), num_workers=0, **options)
