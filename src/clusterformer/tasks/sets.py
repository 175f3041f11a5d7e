"""Object detection and instance segmentation: a thin LightningModule around ``ClusterFormerSets`` and a
COCO data module.

Validation gathers the COCO-format predictions of every process, scores them with pycocotools
(``metrics.coco.CocoEvaluator``) on the images that were evaluated, and logs AP, AP50, AP75, APs, APm, APl
under ``val/bbox_*`` (detection) or ``val/segm_*`` and ``val/bbox_*`` (instance; boxes enclose the masks).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

import clusterformer  # noqa: F401  (registers the models with timm)

from ..data import transforms
from ..data.coco import CocoInstances, read_coco
from ..data.collate import collate_sets
from ..errors import SettingError
from ..heads import build_set_model, detection_postprocess, instance_postprocess
from ..losses import SetCriterion, SetLossSettings, detection_criterion, instance_criterion, joint_criterion
from ..metrics.coco import CocoEvaluator
from .base import (
    DenseData,
    DenseTask,
    check_loader_settings,
    check_model_name,
    check_task_settings,
    compile_options,
)
from .settings import DecoderSettings, as_settings

TASKS = ("detection", "instance")
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class CocoData(DenseData):
    """COCO instances (boxes, and masks for instance segmentation) with the paper's dense transforms.

    Args:
        root: dataset folder; the other paths are relative to it.
        train_images, train_annotations, val_images, val_annotations: COCO layout.
        masks: decode the instance masks (instance segmentation).
        crop, scale_range: training scale jitter and crop (COCO: 1024, [0.1, 2.0]).
        test_shorter_side, test_max_size: test resize (COCO: 800, 1333).
    """

    def __init__(
        self,
        root: str,
        train_images: str = "train2017",
        train_annotations: str = "annotations/instances_train2017.json",
        val_images: str = "val2017",
        val_annotations: str = "annotations/instances_val2017.json",
        masks: bool = False,
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
        self.categories = sorted(read_coco(self.val_annotation_file)["categories"], key=lambda c: c["id"])

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def classes(self) -> list[str]:
        return [c["name"] for c in self.categories]

    def describe(self) -> str:
        return str(self.val_annotation_file)

    def _collate(self, train: bool):
        return collate_sets

    def _dataset(self, train: bool) -> CocoInstances:
        h = self.hparams
        if train:
            transform = transforms.dense_train(h.crop, tuple(h.scale_range))
            return CocoInstances(self.root / h.train_images, self.root / h.train_annotations, transform, h.masks)
        transform = transforms.dense_eval(h.test_shorter_side, h.test_max_size)
        return CocoInstances(self.root / h.val_images, self.val_annotation_file, transform, h.masks)


def set_criterion(num_classes: int, boxes: bool, masks: bool, loss: SetLossSettings) -> SetCriterion:
    """The criterion of a model with ``boxes`` and / or ``masks``: ``detection_criterion``,
    ``instance_criterion`` or ``joint_criterion``, with the fields of ``loss`` that it takes. A field that it
    does not take (the mask settings of a detection model, the box weights of an instance model) must keep its
    default: setting it is a ``ValueError`` rather than silently ignored."""
    factory = joint_criterion if boxes and masks else instance_criterion if masks else detection_criterion
    accepted = inspect.signature(factory).parameters
    defaults = SetLossSettings()
    unused = [
        f"{field.name}={getattr(loss, field.name)!r}"
        for field in fields(loss)
        if field.name not in accepted and getattr(loss, field.name) != getattr(defaults, field.name)
    ]
    if unused:
        kind = "boxes and masks" if boxes and masks else "masks" if masks else "boxes"
        raise ValueError(f"loss: {', '.join(unused)} not used by {factory.__name__} (a model with {kind})")
    return factory(num_classes, **{k: v for k, v in asdict(loss).items() if k in accepted})


class SetTask(DenseTask):
    """Detection (``task="detection"``: boxes, focal class loss + L1 + GIoU) or instance segmentation
    (``task="instance"``: masks, focal class loss + point-sampled BCE + dice) with ClusterFormer.

    Args:
        task: ``"detection"`` or ``"instance"``.
        backbone: a registered ClusterFormer (``clusterformer_{nano,tiny,small}``).
        num_classes: thing classes; must match the dataset.
        decoder: the decoder's options (``DecoderSettings``: ``num_queries``, ``dim``, ``mask_dim``, ``num_layers``,
            ``num_heads``, ``iterations``, ``ffn_dim``, ``dropout``, ``query_init``, ...), or a dict of them.
        backbone_kwargs: options of the backbone (``drop_path_rate``; ImageNet weights via
            ``pretrained: true`` and ``pretrained_cfg_overlay: {file: ...}``).
        loss: the criterion's options (``losses.SetLossSettings``: weights, ``num_points``, focal loss, ...), or
            a dict of them; the mask options apply to instance models, the box weights to models with boxes.
        lr, backbone_lr_mult, weight_decay: AdamW; the backbone learns at ``lr * backbone_lr_mult``.
        warmup_steps, lr_milestones: linear warm-up, then x0.1 at these fractions of training.
        top_k: detections kept per image.
        predict_boxes: for ``task="instance"``, also regress boxes (box head, L1 + GIoU losses and costs)
            and report the box head's AP as the detection result; otherwise the instance model's boxes
            are the boxes enclosing its masks. One model then does both tasks (used by the demo).
        compile: ``torch.compile`` the network when training starts: ``true`` (inductor), or a dict of
            ``torch.compile``'s options (``backend``, ``mode``, ``fullgraph``, ``dynamic``, ``options``); off by
            default. Checkpoints keep the plain module's keys (``BaseTask.compile_model``).
    """

    def __init__(
        self,
        task: str = "detection",
        backbone: str = "clusterformer_tiny",
        num_classes: int = 80,
        decoder: DecoderSettings | None = None,
        backbone_kwargs: dict | None = None,
        loss: SetLossSettings | None = None,
        lr: float = 1e-4,
        backbone_lr_mult: float = 0.1,
        weight_decay: float = 0.05,
        warmup_steps: int = 10,
        lr_milestones: tuple[float, ...] = (0.9, 0.95),
        top_k: int = 100,
        predict_boxes: bool = False,
        compile: bool | dict[str, Any] = False,
    ):
        super().__init__()
        compile_options(compile)
        if task not in TASKS:
            raise SettingError("task", f"must be one of {', '.join(TASKS)}, got {task!r}", "model")
        check_task_settings(lr, num_classes)
        check_model_name("backbone", backbone)
        decoder_settings = as_settings(DecoderSettings, decoder, "decoder")
        loss_settings = as_settings(SetLossSettings, loss, "loss")
        # the hyperparameters hold plain dicts: checkpoints are loaded weights-only, which refuses dataclasses
        decoder, loss = asdict(decoder_settings), asdict(loss_settings)
        self.save_hyperparameters()
        self.build()

    @property
    def task_name(self) -> str:
        return self.hparams.task

    def _outputs(self) -> tuple[bool, bool]:
        """``(boxes, masks)``: the heads of the model."""
        masks = self.hparams.task == "instance"
        return not masks or self.hparams.predict_boxes, masks

    def build_model(self) -> nn.Module:
        h = self.hparams
        boxes, masks = self._outputs()
        return build_set_model(
            h.backbone, h.num_classes, boxes=boxes, masks=masks, backbone_kwargs=h.backbone_kwargs, **h.decoder
        )

    def build_criterion(self) -> nn.Module:
        boxes, masks = self._outputs()
        loss = as_settings(SetLossSettings, self.hparams.loss, "loss")
        return set_criterion(self.hparams.num_classes, boxes, masks, loss)

    def build_metrics(self, data) -> CocoEvaluator:
        """COCO AP against the data module's ``val_annotation_file``, with its category ids."""
        categories = getattr(data, "categories", None)
        return CocoEvaluator(
            getattr(data, "val_annotation_file", None),
            ("segm", "bbox") if self.hparams.task == "instance" else ("bbox",),
            {i: c["id"] for i, c in enumerate(categories)} if categories else None,
        )

    # --- evaluation -------------------------------------------------------------------------------
    def predict_batch(self, images: torch.Tensor, targets: list[dict]) -> list[dict]:
        """Per-image detections in original-image pixels (see ``heads.postprocess``)."""
        outputs = self(images)
        output_sizes = [t["orig_size"] for t in targets]
        top_k = self.hparams.top_k
        if self.hparams.task == "detection":
            return detection_postprocess(outputs["logits"], outputs["boxes"], output_sizes, top_k)
        input_sizes = [t["size"] for t in targets]
        results = instance_postprocess(outputs["logits"], outputs["masks"], input_sizes, output_sizes, top_k)
        if "boxes" in outputs:  # the box head's boxes for the box results, with the class scores
            for result, box_result in zip(
                results, detection_postprocess(outputs["logits"], outputs["boxes"], output_sizes, top_k), strict=True
            ):
                result["box_results"] = box_result
        return results

    def _evaluate(self, batch, split: str) -> None:
        images, targets = batch
        for target, result in zip(targets, self.predict_batch(images, targets), strict=True):
            # box results: the box head's when an instance model has one
            segm = result if "masks" in result else None
            self.metrics.update(target["image_id"], bbox=result.get("box_results", result), segm=segm)

    def _score(self, split: str) -> None:
        for iou_type, stats in self.metrics.compute().items():
            for key in METRIC_KEYS:
                self.log(f"{split}/{iou_type}_{key}", float(stats[key]), prog_bar=key == "AP50", sync_dist=False)
