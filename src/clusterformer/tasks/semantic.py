"""Semantic segmentation: a thin LightningModule around the clustering decoder with one query per class,
and an ADE20K-style data module.

Validation predicts at the test scale, resizes the prediction back to the label map's own size and
accumulates mmsegmentation's dataset-level intersections and unions (``metrics.semantic``); it logs
``val/mIoU``, ``val/mAcc`` and ``val/aAcc``.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import clusterformer  # noqa: F401  (registers the models with timm)

from ..data import transforms
from ..data.collate import collate_semantic
from ..data.semantic import IGNORE_INDEX, SemanticFolder
from ..heads import build_set_model, semantic_postprocess
from ..losses import SemanticLossSettings, semantic_criterion
from ..metrics.semantic import SemanticConfusion
from .base import (
    DenseData,
    DenseTask,
    check_loader_settings,
    check_model_name,
    check_task_settings,
    compile_options,
)
from .settings import DecoderSettings, as_settings


class ImageOnly:
    """Apply an image transform to the image of an ``(image, label)`` pair and keep the label as it is
    (evaluation scores predictions at the label's own resolution, as mmsegmentation)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, label):
        return self.transform(image), label


def _collate_eval(samples):
    return collate_semantic(samples, train=False)


class SemanticData(DenseData):
    """ADE20K layout: ``images/{training,validation}`` and ``annotations/{training,validation}`` label PNGs.

    Args:
        root: dataset folder; the sub-folders are relative to it.
        num_classes: classes (ADE20K: 150); ``reduce_zero_label``: file value 0 is "unlabelled".
        crop, scale_range: training scale jitter and crop (ADE20K: 640, [0.5, 2.0]).
        test_shorter_side, test_max_size: test resize (ADE20K: 640, 2560).
    """

    def __init__(
        self,
        root: str,
        train_images: str = "images/training",
        train_labels: str = "annotations/training",
        val_images: str = "images/validation",
        val_labels: str = "annotations/validation",
        num_classes: int = 150,
        reduce_zero_label: bool = True,
        crop: int = 640,
        scale_range: tuple[float, float] = (0.5, 2.0),
        test_shorter_side: int = 640,
        test_max_size: int = 2560,
        batch_size: int = 2,
        num_workers: int = 4,
    ):
        super().__init__()
        check_loader_settings(batch_size, num_workers)
        self.save_hyperparameters()
        self.root = Path(root)

    @property
    def num_classes(self) -> int:
        return self.hparams.num_classes

    def describe(self) -> str:
        return str(self.root / self.hparams.train_labels)

    def _collate(self, train: bool):
        return collate_semantic if train else _collate_eval

    def _dataset(self, train: bool) -> SemanticFolder:
        h = self.hparams
        if train:
            transform = transforms.dense_train(h.crop, tuple(h.scale_range), mask_fill=IGNORE_INDEX, boxes=False)
            images, labels = h.train_images, h.train_labels
        else:
            transform = ImageOnly(transforms.dense_eval(h.test_shorter_side, h.test_max_size))
            images, labels = h.val_images, h.val_labels
        return SemanticFolder(self.root / images, self.root / labels, h.num_classes, h.reduce_zero_label, transform)


class SemanticTask(DenseTask):
    """Semantic segmentation with ClusterFormer: one decoder query per class (``num_queries =
    num_classes``, initialised from the encoder's centers through a linear map over the center axis),
    per-pixel cross-entropy x5 + dice x1 + class-presence focal loss x2 (``losses.semantic_criterion``),
    and the prediction ``argmax_c sum_q p_q(c) m_q`` (``heads.semantic_postprocess``).

    Args: as ``SetTask`` (``backbone``, ``num_classes``, ``decoder``, ``backbone_kwargs``, ``lr``,
    ``backbone_lr_mult``, ``weight_decay``, ``warmup_steps``, ``lr_milestones``, ``compile``); the decoder's
    ``num_queries`` is the number of classes. ``loss``: options of ``semantic_criterion``
    (``losses.SemanticLossSettings``), or a dict of them.
    """

    class_word = "classes"
    task_name = "semantic"

    def __init__(
        self,
        backbone: str = "clusterformer_tiny",
        num_classes: int = 150,
        decoder: DecoderSettings | None = None,
        backbone_kwargs: dict | None = None,
        loss: SemanticLossSettings | None = None,
        lr: float = 1e-4,
        backbone_lr_mult: float = 0.1,
        weight_decay: float = 0.05,
        warmup_steps: int = 10,
        lr_milestones: tuple[float, ...] = (0.9, 0.95),
        compile: bool | dict[str, Any] = False,
    ):
        super().__init__()
        compile_options(compile)
        check_task_settings(lr, num_classes)
        check_model_name("backbone", backbone)
        decoder_settings = replace(as_settings(DecoderSettings, decoder, "decoder"), num_queries=num_classes)
        loss_settings = as_settings(SemanticLossSettings, loss, "loss")
        # the hyperparameters hold plain dicts: checkpoints are loaded weights-only, which refuses dataclasses
        decoder, loss = asdict(decoder_settings), asdict(loss_settings)
        self.save_hyperparameters()
        # under LightningCLI, save_hyperparameters stores the parsed config's values rather than the ones above: the
        # model and its checkpoint must both have one query per class, or the checkpoint rebuilds another model
        self.hparams["decoder"], self.hparams["loss"] = decoder, loss
        self.build()

    def build_model(self) -> nn.Module:
        h = self.hparams
        return build_set_model(
            h.backbone, h.num_classes, boxes=False, masks=True, backbone_kwargs=h.backbone_kwargs, **h.decoder
        )

    def build_criterion(self) -> nn.Module:
        return semantic_criterion(self.hparams.num_classes, **self.hparams.loss)

    def build_metrics(self, data) -> SemanticConfusion:
        return SemanticConfusion(self.hparams.num_classes)

    def predict_batch(self, images: torch.Tensor, targets: list[dict]) -> list[torch.Tensor]:
        """Per-image ``(H, W)`` class maps at each target's ``orig_size``."""
        outputs = self(images)
        sizes = [t["size"] for t in targets]
        return semantic_postprocess(outputs["logits"], outputs["masks"], sizes, [t["orig_size"] for t in targets])

    def _evaluate(self, batch, split: str) -> None:
        images, targets = batch
        for target, prediction in zip(targets, self.predict_batch(images, targets), strict=True):
            self.metrics.update(prediction, target["semantic"])

    def _score(self, split: str) -> None:
        result = self.metrics.compute()  # the counts of every process (torchmetrics' synchronisation)
        for key in ("mIoU", "mAcc", "aAcc"):
            self.log(f"{split}/{key}", float(result[key]), prog_bar=key == "mIoU", sync_dist=False)
