"""The panoptic figures of the paper's Table 5 over a split, from a panoptic model's predictions:

* ``PQ``, ``SQ``, ``RQ`` and their ``_th`` / ``_st`` versions: :class:`~clusterformer.metrics.panoptic.PanopticQuality`
  (panopticapi's ``pq_compute``) on the id maps;
* ``mIoU_pan``: mIoU (mmsegmentation's, :class:`~clusterformer.metrics.semantic.SemanticConfusion`) of the
  semantic map read off the panoptic prediction, with one extra class for the pixels the prediction leaves
  void: they are misses of their true class;
* ``mAP_pan_th``: COCO mask AP (pycocotools, :func:`~clusterformer.metrics.coco.coco_evaluate`) of the thing
  segments of the prediction (each with its segment's score) against the thing segments of the ground truth
  (crowds as ``iscrowd``).

PQ and mIoU_pan are summed ``torchmetrics`` states, added over the processes by torchmetrics; the COCO
results of mAP_pan_th are gathered with ``metrics.distributed.gather_objects`` (kept by image id, so that
the padding duplicates of the distributed sampler collapse).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from torch import nn

from ..data.masks import encode_rle, rle_to_bbox
from ..data.semantic import IGNORE_INDEX
from .coco import coco_evaluate
from .distributed import gather_objects
from .panoptic import PanopticQuality
from .semantic import SemanticConfusion

PANOPTIC_KEYS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")


def miou_with_void(confusion: SemanticConfusion) -> float:
    """mIoU over the real classes of a confusion whose last class stands for void predictions."""
    iou = np.array(confusion.compute()["IoU"][:-1], dtype=np.float64)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


class PanopticEvaluator(nn.Module):
    """Accumulates the evaluation of panoptic predictions image by image (``update``); ``compute`` gives the
    module docstring's figures, ``reset`` starts over. A module, so that its metric states follow the task to
    its device (they are not part of the ``state_dict``).

    Args:
        categories: the categories in label order (``id``, ``isthing``), e.g. a panoptic JSON's sorted by id.
        num_things: the labels ``0..num_things-1`` are things (the instances of mAP_pan_th).
    """

    def __init__(self, categories: Sequence[Mapping], num_things: int):
        super().__init__()
        self.categories = [dict(c) for c in categories]
        self.num_classes = len(self.categories)
        self.num_things = num_things
        self.pq = PanopticQuality(self.categories)
        self.semantic = SemanticConfusion(self.num_classes + 1)  # + "void prediction"
        self.reset()

    def reset(self) -> None:
        self.pq.reset()
        self.semantic.reset()
        self.images: dict[int, dict] = {}
        self.gt_instances: dict[int, list[dict]] = {}
        self.instances: dict[int, list[dict]] = {}

    def update(self, target: Mapping, result: Mapping) -> None:
        """One image. ``target``: the evaluation target of ``data.collate.collate_panoptic`` (``masks``
        ``(N, H, W)`` at the ground truth's size, ``labels``, ``iscrowd``, ``segment_ids``, ``image_id``);
        ``result``: ``heads.panoptic_postprocess``'s (``ids (H, W)``, ``segments_info`` with ``id``,
        ``category_id``, ``label``, ``isthing``, ``score``)."""
        categories = self.categories
        masks = target["masks"].cpu().numpy()
        labels = target["labels"].cpu().tolist()
        crowd = target["iscrowd"].cpu().tolist()
        gt_ids = np.zeros(masks.shape[1:], np.int64)
        gt_semantic = np.full(masks.shape[1:], IGNORE_INDEX, np.int64)
        gt_segments = []
        for mask, segment_id, label, is_crowd in zip(masks, target["segment_ids"].tolist(), labels, crowd, strict=True):
            gt_ids[mask] = segment_id
            gt_semantic[mask] = label
            gt_segments.append({"id": segment_id, "category_id": categories[label]["id"], "iscrowd": is_crowd})
        pred_ids = result["ids"].cpu().numpy().astype(np.int64)
        self.pq.update(gt_ids, gt_segments, pred_ids, result["segments_info"])
        # mIoU_pan: the panoptic prediction read as a semantic map (void -> no class)
        pred_semantic = np.full(pred_ids.shape, self.num_classes, np.int64)
        for segment in result["segments_info"]:
            pred_semantic[pred_ids == segment["id"]] = segment["label"]
        self.semantic.update(pred_semantic, gt_semantic)
        # mAP_pan^th: thing segments as instances
        image_id = int(target["image_id"])
        height, width = gt_ids.shape
        self.images[image_id] = {"id": image_id, "file_name": str(image_id), "height": height, "width": width}
        gt_instances = []
        for mask, label, is_crowd in zip(masks, labels, crowd, strict=True):
            if label >= self.num_things:
                continue
            rle = encode_rle(mask)
            gt_instances.append(
                {"image_id": image_id, "category_id": categories[label]["id"], "segmentation": rle,
                 "area": int(mask.sum()), "bbox": rle_to_bbox(rle), "iscrowd": is_crowd}
            )  # fmt: skip
        self.gt_instances[image_id] = gt_instances
        self.instances[image_id] = [
            {"image_id": image_id, "category_id": s["category_id"], "score": float(s["score"]),
             "segmentation": encode_rle(pred_ids == s["id"])}
            for s in result["segments_info"]
            if s["isthing"]
        ]  # fmt: skip

    def compute(self) -> dict[str, float] | None:
        """``PANOPTIC_KEYS``, ``mIoU_pan`` and ``mAP_pan_th`` over the images of every process, or ``None``
        when no process evaluated an image. A collective under DDP: every process calls it."""
        gt_instances, instances, images = {}, {}, {}
        for part in gather_objects((self.gt_instances, self.instances, self.images)):
            gt_instances.update(part[0])
            instances.update(part[1])
            images.update(part[2])
        if not images:
            return None
        result = self.pq.compute()
        values = {}
        for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            for key in ("pq", "sq", "rq"):
                values[f"{key.upper()}{suffix}"] = float(result[group][key])
        values["mIoU_pan"] = miou_with_void(self.semantic)
        gt = {
            "images": list(images.values()),
            "annotations": [dict(a, id=i + 1) for i, a in enumerate(a for v in gt_instances.values() for a in v)],
            # pycocotools wants a name; the default categories of a task without a data module have none
            "categories": [{"name": str(c["id"]), **c} for c in self.categories if c.get("isthing", 1)],
        }
        results = [r for v in instances.values() for r in v]
        values["mAP_pan_th"] = float(coco_evaluate(gt, results, "segm")["AP"])
        return values
