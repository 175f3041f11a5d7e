"""Image classification: a thin LightningModule around a timm model, and an ImageFolder data module."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import timm
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

import clusterformer  # noqa: F401  (registers the models with timm)

from ..data import transforms
from ..data.folder import CheckedImageFolder
from ..errors import DatasetError, DatasetNotFoundError
from .base import (
    BaseTask,
    check_finite,
    check_loader_settings,
    check_model_name,
    check_task_settings,
    compile_options,
    make_loader,
)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate factor: linear warm-up, then cosine annealing down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def mixing(
    num_classes: int,
    label_smoothing: float,
    mixup_alpha: float,
    cutmix_alpha: float,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    mode: str = "batch",
) -> Mixup | None:
    """timm's batch Mixup / CutMix with the label smoothing folded into the soft targets, or ``None`` when both
    alphas are 0. mmclassification's Swin recipe is ``mixing(1000, 0.1, 0.8, 1.0)``: every batch mixed, by
    Mixup or CutMix with equal chance."""
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha}: must be >= 0 (0 turns one off)")
    for name, value in (("mix_prob", prob), ("mix_switch_prob", switch_prob)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name}={value}: must be a probability in [0, 1]")
    if mode not in ("batch", "pair", "elem"):
        raise ValueError(f"mix_mode={mode!r}: expected 'batch', 'pair' or 'elem'")
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return None
    return Mixup(
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        prob=prob,
        switch_prob=switch_prob,
        mode=mode,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )


class ClassificationTask(BaseTask):
    """Train / evaluate a timm classifier (ClusterFormer by default) with top-1 / top-5.

    Args:
        model: timm model name.
        num_classes: classes of the head; must match the dataset.
        model_kwargs: extra constructor options (e.g. ClusterFormer variants, ``drop_path_rate``).
        lr, weight_decay, betas: AdamW (no decay on norms, biases and ``no_weight_decay()``).
        warmup_epochs: linear warm-up, then cosine annealing to ``lr * min_lr_ratio`` (per step).
        label_smoothing: of the cross-entropy (of the mixed targets when mixing is on).
        mixup_alpha, cutmix_alpha: Beta parameters of timm's Mixup and CutMix on each training batch (0 turns
            one off; both 0: plain cross-entropy on the labels). With either on, the batch's targets become
            soft (mixed, then smoothed) and the training loss is timm's ``SoftTargetCrossEntropy``.
        mix_prob: probability that a batch is mixed; ``mix_switch_prob``: probability of CutMix rather than
            Mixup when both are on; ``mix_mode``: timm's ``"batch"`` (one mix per batch), ``"pair"``, ``"elem"``.
        compile: ``torch.compile`` the network when training starts: ``true`` (inductor), or a dict of
            ``torch.compile``'s options (``backend``, ``mode``, ``fullgraph``, ``dynamic``, ``options``); off by
            default. Checkpoints keep the plain module's keys (``BaseTask.compile_model``).
    """

    task_name = "classification"
    class_word = "classes"

    def __init__(
        self,
        model: str = "clusterformer_tiny",
        num_classes: int = 1000,
        model_kwargs: dict | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 20,
        min_lr_ratio: float = 1e-3,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        mix_switch_prob: float = 0.5,
        mix_mode: str = "batch",
        compile: bool | dict[str, Any] = False,
    ):
        super().__init__()
        check_task_settings(lr, num_classes)
        compile_options(compile)
        check_model_name("model", model)
        self.save_hyperparameters()
        self.build()
        self.mixup = mixing(
            num_classes, label_smoothing, mixup_alpha, cutmix_alpha, mix_prob, mix_switch_prob, mix_mode
        )  # fmt: skip
        self.soft_criterion = SoftTargetCrossEntropy() if self.mixup is not None else None

    def build_model(self) -> nn.Module:
        h = self.hparams
        model = timm.create_model(h.model, num_classes=h.num_classes, **(h.model_kwargs or {}))
        # parameters the classifier does not reach (ClusterFormer's parameters_unused_by_head: with the center head
        # the last block's dispatching and MLP and the token norm, which the dense tasks train; an idle clustering;
        # the k-means projections) are frozen: they would get no gradient, which DDP refuses
        unused = set(getattr(model, "parameters_unused_by_head", list)())
        for name, parameter in model.named_parameters():
            if name in unused:
                parameter.requires_grad_(False)
        return model

    def build_criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss(label_smoothing=self.hparams.label_smoothing)

    def build_metrics(self, data) -> nn.ModuleDict:
        num_classes = self.hparams.num_classes
        top_k = min(5, num_classes)
        return nn.ModuleDict(
            {
                f"{split}_{name}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
                for split in ("val", "test")
                for name, k in (("top1", 1), (f"top{top_k}", top_k))
            }
        )

    def training_step(self, batch, batch_idx):
        images, labels = batch
        if self.mixup is None:
            loss = self.criterion(self(images), labels)
        else:
            if len(images) % 2:
                raise ValueError(
                    f"Mixup/CutMix needs an even training batch (timm mixes sample i with sample n-1-i), got "
                    f"{len(images)} images: use an even batch_size (a last partial batch is dropped when the "
                    "training set holds more than one batch)"
                )
            images, targets = self.mixup(images, labels)  # targets: (B, num_classes), rows sum to 1
            loss = self.soft_criterion(self(images), targets)
        check_finite(self, loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def _evaluate(self, batch, split: str) -> None:
        images, labels = batch
        logits = self(images)
        self.log(f"{split}/loss", self.criterion(logits, labels), prog_bar=True, sync_dist=True)
        for name, metric in self.metrics.items():
            if name.startswith(split):
                metric(logits, labels)
                self.log(f"{split}/{name.split('_', 1)[1]}", metric, prog_bar=name.endswith("top1"))

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx):
        images = batch[0] if isinstance(batch, list | tuple) else batch
        probs = self(images).softmax(-1)
        return probs.topk(min(5, probs.shape[-1]), dim=-1)

    def param_groups(self) -> list[dict]:
        """timm's two groups: no weight decay on norms, biases and the model's ``no_weight_decay()``."""
        no_decay = set(getattr(self.model, "no_weight_decay", set)())
        return param_groups_weight_decay(self.model, self.hparams.weight_decay, no_weight_decay_list=no_decay)

    def optimizer_options(self) -> dict:
        return {"betas": self.hparams.betas}

    def lr_schedule(self, total_steps: int):
        """``warmup_cosine`` with ``warmup_epochs`` (as steps) and ``min_lr_ratio``."""
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = int(self.hparams.warmup_epochs * total_steps / epochs)
        return lambda step: warmup_cosine(step, warmup, total_steps, self.hparams.min_lr_ratio)


class ImageFolderData(L.LightningDataModule):
    """ImageFolder / ImageNet layout: ``root/{train,val}/{class}/*``, with the paper's transforms.

    Args:
        root: dataset folder.
        train_dir, val_dir, test_dir: sub-folders (``test_dir`` defaults to ``val_dir``).
        img_size: training crop and test crop; ``eval_resize``: shorter side before the test crop.
        crop_scale, randaugment, random_erasing: training augmentation (RandomResizedCrop with
            ``crop_scale`` and a horizontal flip always); ``randaugment`` is a timm RandAugment string
            (``True``: ``"rand-m9-mstd0.5-inc1"``; ``False``: off), ``random_erasing`` the probability.
        random_erasing_mode: fill of the erased rectangle (timm's ``"pixel"``, ``"rand"``, ``"const"``).
        interpolation: of every resize (training crop, RandAugment, test resize).
        skip_unreadable: warn about and skip corrupt images instead of stopping.
    """

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str | None = None,
        img_size: int = 224,
        eval_resize: int | None = None,
        batch_size: int = 64,
        num_workers: int = 4,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        randaugment: bool | str | None = True,
        random_erasing: float = 0.25,
        skip_unreadable: bool = False,
        random_erasing_mode: str = "pixel",
        interpolation: str = "bicubic",
    ):
        super().__init__()
        check_loader_settings(batch_size, num_workers)
        self.save_hyperparameters()
        self.root = Path(root)
        train_root = self.root / train_dir
        if not train_root.is_dir():
            raise DatasetNotFoundError(f"{train_root}: training folder not found")
        # class names only (cheap); the files are listed and checked when the datasets are built
        self.classes = sorted(p.name for p in train_root.iterdir() if p.is_dir())
        if not self.classes:
            raise DatasetError(f"{train_root}: no class folders (expected one sub-folder per class)")
        self.train_transform(), self.eval_transform()  # bad transform settings fail here, not at the first batch

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        return str(self.root / self.hparams.train_dir)

    def train_transform(self):
        h = self.hparams
        return transforms.classification_train(
            h.img_size, h.crop_scale, h.randaugment, h.random_erasing,
            interpolation=h.interpolation, random_erasing_mode=h.random_erasing_mode,
        )  # fmt: skip

    def eval_transform(self):
        h = self.hparams
        return transforms.classification_eval(h.img_size, h.eval_resize, interpolation=h.interpolation)

    def _dataset(self, folder: str, train: bool) -> CheckedImageFolder:
        h = self.hparams
        transform = self.train_transform() if train else self.eval_transform()
        dataset = CheckedImageFolder(self.root / folder, transform, h.skip_unreadable)
        if dataset.classes != self.classes:
            raise DatasetError(
                f"{self.root / folder}: classes {dataset.classes} differ from {self.describe()}: {self.classes}"
            )
        return dataset

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        return make_loader(dataset, self.hparams.batch_size, self.hparams.num_workers, train=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._dataset(self.hparams.train_dir, train=True), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset(self.hparams.val_dir, train=False), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset(self.hparams.test_dir or self.hparams.val_dir, train=False), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
