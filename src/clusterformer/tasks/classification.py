"""Image classification: a thin LightningModule around a timm model, and an ImageFolder data module."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import timm
import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

import clusterformer  # noqa: F401  (registers the models with timm)

from ..data import transforms
from ..data.folder import CheckedImageFolder
from ..errors import DatasetError, DatasetNotFoundError
from .base import (
    check_finite,
    check_loader_settings,
    check_model_name,
    check_num_classes,
    check_task_settings,
    load_checkpoint_extras,
    make_loader,
    save_checkpoint_extras,
)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate factor: linear warm-up, then cosine annealing down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ClassificationTask(L.LightningModule):
    """Train / evaluate a timm classifier (ClusterFormer by default) with top-1 / top-5.

    Args:
        model: timm model name.
        num_classes: classes of the head; must match the dataset.
        model_kwargs: extra constructor options (e.g. ClusterFormer variants, ``drop_path_rate``).
        lr, weight_decay, betas: AdamW (no decay on norms, biases and ``no_weight_decay()``).
        warmup_epochs: linear warm-up, then cosine annealing to ``lr * min_lr_ratio`` (per step).
        label_smoothing: of the cross-entropy.
    """

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
    ):
        super().__init__()
        check_task_settings(lr, num_classes)
        check_model_name("model", model)
        self.save_hyperparameters()
        self.model = timm.create_model(model, num_classes=num_classes, **(model_kwargs or {}))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        top_k = min(5, num_classes)
        self.metrics = nn.ModuleDict(
            {
                f"{split}_{name}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
                for split in ("val", "test")
                for name, k in (("top1", 1), (f"top{top_k}", top_k))
            }
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def check_data(self, data) -> None:
        """A :class:`~clusterformer.errors.SettingError` when the data module ``data`` has another number of classes;
        the ``clusterformer`` command calls it before it runs anything, ``setup`` for every other caller."""
        check_num_classes(self, data, "classes")

    def setup(self, stage: str) -> None:
        self.check_data(getattr(self.trainer, "datamodule", None) if self._trainer is not None else None)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = self.criterion(self(images), labels)
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

    def configure_optimizers(self):
        no_decay = set(getattr(self.model, "no_weight_decay", set)())
        groups = param_groups_weight_decay(self.model, self.hparams.weight_decay, no_weight_decay_list=no_decay)
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, betas=self.hparams.betas)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = int(self.hparams.warmup_epochs * total / epochs)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, self.hparams.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        save_checkpoint_extras(self, checkpoint, "classification")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        load_checkpoint_extras(self, checkpoint)


class ImageFolderData(L.LightningDataModule):
    """ImageFolder / ImageNet layout: ``root/{train,val}/{class}/*``, with the paper's transforms.

    Args:
        root: dataset folder.
        train_dir, val_dir, test_dir: sub-folders (``test_dir`` defaults to ``val_dir``).
        img_size: training crop and test crop; ``eval_resize``: shorter side before the test crop.
        crop_scale, randaugment, random_erasing: training augmentation (RandomResizedCrop with
            ``crop_scale`` and a horizontal flip always).
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
        randaugment: bool = True,
        random_erasing: float = 0.25,
        skip_unreadable: bool = False,
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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        return str(self.root / self.hparams.train_dir)

    def _dataset(self, folder: str, train: bool) -> CheckedImageFolder:
        h = self.hparams
        transform = (
            transforms.classification_train(h.img_size, h.crop_scale, h.randaugment, h.random_erasing)
            if train
            else transforms.classification_eval(h.img_size, h.eval_resize)
        )
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
