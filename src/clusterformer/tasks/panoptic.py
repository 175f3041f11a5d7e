"""Panoptic segmentation: a thin LightningModule around the clustering decoder with kMaX-DeepLab's auxiliary
heads, and a COCO panoptic data module.

Validation turns every image into a panoptic prediction (``heads.panoptic_postprocess``: mask-wise
merging) at the ground truth's own size and logs, as the paper's Table 5 (``metrics.panoptic_eval``):

* ``val/PQ``, ``val/SQ``, ``val/RQ`` and their ``_th`` / ``_st`` versions (``metrics.panoptic``, equal to
  panopticapi's ``pq_compute``);
* ``val/mIoU_pan``: mIoU of the semantic map read off the panoptic prediction (void = no class);
* ``val/mAP_pan_th``: COCO mask AP of the thing segments of the panoptic prediction (each segment's score)
  against the thing segments of the ground truth (crowds as ``iscrowd``), with pycocotools.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

import clusterformer  # noqa: F401  (registers the models with timm)

from ..data import transforms
from ..data.collate import collate_panoptic
from ..data.panoptic import CocoPanoptic, read_panoptic_json
from ..errors import SettingError
from ..heads import build_set_model, panoptic_postprocess
from ..losses import PanopticLossSettings, panoptic_criterion
from ..metrics.panoptic_eval import PanopticEvaluator
from .base import (
    DenseData,
    DenseTask,
    check_loader_settings,
    check_model_name,
    check_task_settings,
    compile_options,
)
from .semantic import ImageOnly
from .settings import DecoderSettings, as_settings


def _collate_eval(samples):
    return collate_panoptic(samples, train=False)


class PanopticData(DenseData):
    """COCO panoptic: images, ``panoptic_{split}.json`` and the PNG folder, with the dense transforms.

    Args:
        root: dataset folder; the other paths are relative to it.
        crop, scale_range: training scale jitter and crop (COCO: 1024, [0.1, 2.0]).
        test_shorter_side, test_max_size: test resize (COCO: 800, 1333).
    """

    def __init__(
        self,
        root: str,
        train_images: str = "train2017",
        train_annotations: str = "annotations/panoptic_train2017.json",
        train_masks: str = "annotations/panoptic_train2017",
        val_images: str = "val2017",
        val_annotations: str = "annotations/panoptic_val2017.json",
        val_masks: str = "annotations/panoptic_val2017",
        crop: int = 1024,
        scale_range: tuple[float, float] = (0.1, 2.0),
        test_shorter_side: int = 800,
        test_max_size: int = 1333,
        batch_size: int = 2,
        num_workers: int = 4,
    ):
        super().__init__()
        check_loader_settings(batch_size, num_workers)
        self.save_hyperparameters()
        self.root = Path(root)
        self.val_annotation_file = self.root / val_annotations
        self.categories = sorted(read_panoptic_json(self.val_annotation_file)["categories"], key=lambda c: c["id"])

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def thing_classes(self) -> list[int]:
        return [i for i, c in enumerate(self.categories) if c.get("isthing", 1)]

    def describe(self) -> str:
        return str(self.val_annotation_file)

    def _collate(self, train: bool):
        return collate_panoptic if train else _collate_eval

    def _dataset(self, train: bool) -> CocoPanoptic:
        h = self.hparams
        if train:
            transform = transforms.dense_train(h.crop, tuple(h.scale_range), boxes=False)
            return CocoPanoptic(
                self.root / h.train_images, self.root / h.train_annotations, self.root / h.train_masks, transform
            )
        transform = ImageOnly(transforms.dense_eval(h.test_shorter_side, h.test_max_size))
        return CocoPanoptic(self.root / h.val_images, self.val_annotation_file, self.root / h.val_masks, transform)


class PanopticTask(DenseTask):
    """Panoptic segmentation with ClusterFormer (paper §4.1.5): queries from the encoder's centers, the
    loss ``5 L_th + 3 L_st + 1 L_aux`` (``losses.panoptic_criterion``), mask-wise merging.

    Args:
        backbone, decoder, backbone_kwargs, lr, backbone_lr_mult, weight_decay, warmup_steps, lr_milestones,
            compile: as ``SetTask``.
        num_classes: thing + stuff classes (COCO: 133); ``num_things``: the first ``num_things`` contiguous
            labels (categories sorted by id) are things (COCO: 80); checked against the dataset.
        loss: options of ``panoptic_criterion`` (``losses.PanopticLossSettings``), or a dict of them.
        score_threshold, overlap_threshold, mask_threshold: of the mask-wise merging.
    """

    task_name = "panoptic"

    def __init__(
        self,
        backbone: str = "clusterformer_tiny",
        num_classes: int = 133,
        num_things: int = 80,
        decoder: DecoderSettings | None = None,
        backbone_kwargs: dict | None = None,
        loss: PanopticLossSettings | None = None,
        lr: float = 1e-4,
        backbone_lr_mult: float = 0.1,
        weight_decay: float = 0.05,
        warmup_steps: int = 10,
        lr_milestones: tuple[float, ...] = (0.9, 0.95),
        score_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        mask_threshold: float = 0.5,
        compile: bool | dict[str, Any] = False,
    ):
        super().__init__()
        compile_options(compile)
        check_task_settings(lr, num_classes)
        check_model_name("backbone", backbone)
        if not 0 <= num_things <= num_classes:
            problem = f"must be between 0 and num_classes ({num_classes}), got {num_things}"
            raise SettingError("num_things", problem, "model")
        # the hyperparameters hold plain dicts: checkpoints are loaded weights-only, which refuses dataclasses
        decoder = asdict(as_settings(DecoderSettings, decoder, "decoder"))
        loss = asdict(as_settings(PanopticLossSettings, loss, "loss"))
        self.save_hyperparameters()
        self.thing_classes = list(range(num_things))
        self.build()

    def build_model(self) -> nn.Module:
        h = self.hparams
        return build_set_model(
            h.backbone, h.num_classes, boxes=False, masks=True, backbone_kwargs=h.backbone_kwargs, semantic_head=True,
            **h.decoder,
        )  # fmt: skip

    def build_criterion(self) -> nn.Module:
        return panoptic_criterion(self.hparams.num_classes, self.thing_classes, **self.hparams.loss)

    def build_metrics(self, data) -> PanopticEvaluator:
        """PQ, mIoU_pan and mAP_pan_th (``metrics.panoptic_eval``) with the data module's categories."""
        return PanopticEvaluator(self._categories(data), self.hparams.num_things)

    def check_data(self, data) -> None:
        """``num_classes`` (``BaseTask.check_data``), and ``num_things``: the dataset's thing categories must be
        the model's things, labels ``0..num_things-1`` (categories sorted by id)."""
        super().check_data(data)
        found = getattr(data, "thing_classes", None)
        if getattr(data, "num_classes", None) is None or found is None or found == self.thing_classes:
            return
        contiguous = found == list(range(len(found)))
        raise SettingError(
            "num_things",
            f"{self.hparams.num_things} (things = labels 0..{self.hparams.num_things - 1}), but {data.describe()} has "
            f"things at labels {found[:10]}{'...' if len(found) > 10 else ''} (categories sorted by id); "
            + (f"set it to {len(found)}" if contiguous else "the thing categories must come first (by id)"),
            "model",
        )

    # --- evaluation -------------------------------------------------------------------------------
    def _categories(self, data=None) -> list[dict]:
        """The categories of ``data`` (default: the trainer's data module), or ids ``1..num_classes`` with the
        first ``num_things`` things when there is none (``clusterformer predict``)."""
        data = data if data is not None else self._datamodule()
        categories = getattr(data, "categories", None)
        if categories is None:
            categories = [
                {"id": i + 1, "isthing": int(i < self.hparams.num_things)} for i in range(self.hparams.num_classes)
            ]
        return categories

    def predict_batch(self, images: torch.Tensor, targets: list[dict]) -> list[dict]:
        """Per-image ``ids (H, W)`` and ``segments_info`` at each target's ``orig_size``."""
        h = self.hparams
        outputs = self(images)
        return panoptic_postprocess(
            outputs["logits"], outputs["masks"], [t["size"] for t in targets], [t["orig_size"] for t in targets],
            set(self.thing_classes), score_threshold=h.score_threshold, overlap_threshold=h.overlap_threshold,
            mask_threshold=h.mask_threshold, category_ids=[c["id"] for c in self._categories()],
        )  # fmt: skip

    def _evaluate(self, batch, split: str) -> None:
        images, targets = batch
        for target, result in zip(targets, self.predict_batch(images, targets), strict=True):
            self.metrics.update(target, result)

    def _score(self, split: str) -> None:
        values = self.metrics.compute()  # every process's images (a collective under DDP)
        if values is None:  # no image evaluated
            return
        for key, value in values.items():
            self.log(f"{split}/{key}", value, prog_bar=key == "PQ", sync_dist=False)
