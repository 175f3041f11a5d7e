"""The ImageNet configs carry mmclassification's Swin recipe: each setting, parsed as LightningCLI parses the
config, is in effect in the task, the schedule, the trainer and the transforms that the loaders use."""

import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.layers import DropPath
from timm.loss import SoftTargetCrossEntropy
from torchvision.transforms import InterpolationMode, v2

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"tiny": 0.2, "small": 0.3}  # size -> mmcls's stochastic depth (models/swin_transformer/{size}_224.py)
# timm's "inc1" operations: the same 15 as mmclassification's "timm_increasing" RandAugment policies
INCREASING = [
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
]  # fmt: skip


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    for split in ("train", "val"):
        for name, colour in (("n01", (200, 30, 30)), ("n02", (30, 30, 200))):
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (40, 30), colour).save(root / split / name / "0.png")
    return root


def parse(size: str, imagefolder: Path):
    """Task, data module and trainer of the config, built by LightningCLI as ``clusterformer fit`` builds them
    (the nano model in place of the config's, so the test stays small; the config's model options apply)."""
    args = [
        "--config", str(ROOT / f"configs/classification/clusterformer_{size}_imagenet.yaml"),
        "--model.init_args.model", "clusterformer_nano", f"--data.init_args.root={imagefolder}",
        "--data.init_args.num_workers", "0",
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        warnings.filterwarnings("ignore", message=".*bf16.*")
        cli = LightningCLI(
            LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
            args=args,
        )  # fmt: skip
    return cli.model, cli.datamodule, cli.trainer


def config(size: str) -> dict:
    return yaml.safe_load((ROOT / f"configs/classification/clusterformer_{size}_imagenet.yaml").read_text())


@pytest.mark.parametrize("size", CONFIGS)
def test_the_paper_states_these_and_the_config_has_them(size):
    """§4.1.1: 300 epochs, lr 1e-3, cosine (the task's only schedule), total batch 1024 (8 devices x 128)."""
    cfg = config(size)
    assert cfg["model"]["init_args"]["model"] == f"clusterformer_{size}"
    assert cfg["model"]["init_args"]["num_classes"] == 1000
    assert cfg["trainer"]["max_epochs"] == 300
    assert cfg["model"]["init_args"]["lr"] == 1e-3
    assert 8 * cfg["data"]["init_args"]["batch_size"] == 1024


@pytest.mark.parametrize("size", CONFIGS)
def test_task_trainer_and_schedule_follow_mmcls_swin(size, imagefolder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the loggers' folders
    task, data, trainer = parse(size, imagefolder)

    # models/swin_transformer/{size}_224.py: stochastic depth, label smoothing 0.1, Mixup 0.8 / CutMix 1.0
    assert max(m.drop_prob for m in task.model.modules() if isinstance(m, DropPath)) == pytest.approx(CONFIGS[size])
    mixup = task.mixup
    assert isinstance(mixup, Mixup) and mixup.mixup_enabled
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.mix_prob, mixup.switch_prob) == (0.8, 1.0, 1.0, 0.5)
    assert (mixup.mode, mixup.label_smoothing, mixup.num_classes) == ("batch", 0.1, 1000)
    assert isinstance(task.soft_criterion, SoftTargetCrossEntropy)

    # swin-{size}_16xb64_in1k.py: gradient clipping at norm 5
    assert trainer.gradient_clip_val == 5.0 and trainer.gradient_clip_algorithm == "norm"
    assert trainer.max_epochs == 300

    # schedules/imagenet_bs1024_adamw_swin.py: AdamW 1e-3, wd 0.05, 20 epochs of warm-up, cosine down to 1e-5
    steps_per_epoch = 10
    fake = SimpleNamespace(estimated_stepping_batches=300 * steps_per_epoch, max_epochs=300)
    monkeypatch.setattr(type(task), "trainer", property(lambda self: fake))
    setup = task.configure_optimizers()
    optimizer, schedule = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW) and setup["lr_scheduler"]["interval"] == "step"
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}
    assert all(g["betas"] == (0.9, 0.999) and g["initial_lr"] == 1e-3 for g in optimizer.param_groups)
    lrs = []
    for _ in range(300 * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    warmup = 20 * steps_per_epoch
    assert lrs[0] < 1e-5 and all(a < b for a, b in zip(lrs[: warmup - 1], lrs[1:warmup], strict=True))
    assert lrs[warmup] == pytest.approx(1e-3)
    assert lrs[warmup + (len(lrs) - warmup) // 2] == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-2)  # cosine midpoint
    assert lrs[-1] == pytest.approx(1e-5, rel=1e-2)


@pytest.mark.parametrize("size", CONFIGS)
def test_training_transforms_follow_mmcls_swin(size, imagefolder, tmp_path, monkeypatch):
    """datasets/imagenet_bs64_swin_224.py, in the transform of the training loader's dataset."""
    monkeypatch.chdir(tmp_path)
    _, data, _ = parse(size, imagefolder)
    transform = data.train_dataloader().dataset.transform
    crop, flip, randaugment, *_, normalize, erasing = transform.transforms
    assert isinstance(crop, v2.RandomResizedCrop) and crop.size == (224, 224)
    assert tuple(crop.scale) == (0.08, 1.0) and crop.interpolation == InterpolationMode.BICUBIC
    assert isinstance(flip, v2.RandomHorizontalFlip) and flip.p == 0.5

    assert isinstance(randaugment, RandAugment) and randaugment.num_layers == 2
    assert [op.name for op in randaugment.ops] == INCREASING
    for op in randaugment.ops:
        assert (op.magnitude, op.magnitude_std, op.prob) == (9, 0.5, 0.5)
        assert op.kwargs["resample"] == Image.Resampling.BICUBIC
        assert op.kwargs["fillcolor"] == tuple(round(255 * m) for m in IMAGENET_DEFAULT_MEAN)  # pad with the mean

    assert isinstance(normalize, v2.Normalize)
    assert (tuple(normalize.mean), tuple(normalize.std)) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert isinstance(erasing, RandomErasing) and erasing.probability == 0.25
    assert erasing.per_pixel and (erasing.min_count, erasing.max_count) == (1, 1)
    assert (erasing.min_area, erasing.max_area) == (0.02, pytest.approx(1 / 3))

    image, label = data.train_dataloader().dataset[0]
    assert image.shape == (3, 224, 224) and label == 0


@pytest.mark.parametrize("size", CONFIGS)
def test_test_transform_resizes_to_256_and_crops_224(size, imagefolder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, data, _ = parse(size, imagefolder)
    transform = data.val_dataloader().dataset.transform
    resize, center = transform.transforms[:2]
    assert resize.size == [256] and resize.interpolation == InterpolationMode.BICUBIC
    assert center.size == (224, 224)
    assert resize(Image.new("RGB", (400, 300))).size == (341, 256)  # the shorter side
    assert data.val_dataloader().dataset[0][0].shape == (3, 224, 224)
