"""Batching: pad images of different sizes into one batch and bring each task's targets into the layout of its
loss (training) or of its evaluation (``train=False``). Used by the tasks' data loaders and by the commands that run
a model on images (``predict``, ``explain``, the demo's pictures)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert

from .semantic import IGNORE_INDEX

__all__ = ["collate_panoptic", "collate_semantic", "collate_sets", "pad_batch"]


def pad_batch(images: list[torch.Tensor], divisor: int = 32) -> torch.Tensor:
    """Stack ``(3, H_i, W_i)`` images into ``(B, 3, H, W)``, zero-padded at the bottom and right to
    the largest size rounded up to ``divisor`` (so every stride of the model divides the batch)."""
    h = math.ceil(max(image.shape[-2] for image in images) / divisor) * divisor
    w = math.ceil(max(image.shape[-1] for image in images) / divisor) * divisor
    batch = images[0].new_zeros(len(images), images[0].shape[0], h, w)
    for out, image in zip(batch, images, strict=True):
        out[:, : image.shape[-2], : image.shape[-1]].copy_(image)
    return batch


def collate_sets(samples: list[tuple[torch.Tensor, dict]], drop_crowds: bool = True) -> tuple[torch.Tensor, list[dict]]:
    """Pad the images (``pad_batch``) and turn each target into the loss' layout: ``labels``,
    ``boxes`` normalised ``cxcywh`` relative to the image, ``masks`` bool at the padded size, plus
    ``size`` (the image's ``(h, w)`` in the batch), ``orig_size`` and ``image_id``. Crowd regions are
    left out of the training targets (as DETR and Mask2Former do) when ``drop_crowds``."""
    images = pad_batch([image for image, _ in samples])
    _, _, ph, pw = images.shape
    targets = []
    for image, target in samples:
        h, w = image.shape[-2:]
        keep = target["iscrowd"] == 0 if drop_crowds else torch.ones_like(target["labels"], dtype=torch.bool)
        boxes = box_convert(target["boxes"].as_subclass(torch.Tensor)[keep].float(), "xyxy", "cxcywh")
        out = {
            "labels": target["labels"][keep],
            "boxes": boxes / torch.tensor([w, h, w, h], dtype=boxes.dtype),
            "size": (h, w),
            "orig_size": target.get("orig_size", (h, w)),
            "image_id": target["image_id"],
        }
        if "masks" in target:
            masks = target["masks"].as_subclass(torch.Tensor)[keep].bool()
            out["masks"] = F.pad(masks, (0, pw - w, 0, ph - h))
        targets.append(out)
    return images, targets


def collate_semantic(samples: list[tuple[torch.Tensor, torch.Tensor]], train: bool = True):
    """Pad the images (``pad_batch``). Training targets: ``semantic`` (the label map padded with 255 to
    the batch size), ``labels`` (the classes present) and their ``masks``. Evaluation targets keep the
    label map unpadded at its own size (``orig_size``) with the image's ``size`` in the batch."""
    images = pad_batch([image for image, _ in samples])
    _, _, ph, pw = images.shape
    targets = []
    for image, label in samples:
        label = label.as_subclass(torch.Tensor).long()
        h, w = image.shape[-2:]
        if not train:
            targets.append({"semantic": label, "size": (h, w), "orig_size": tuple(label.shape[-2:])})
            continue
        semantic = F.pad(label, (0, pw - w, 0, ph - h), value=IGNORE_INDEX)
        classes = semantic.unique()
        classes = classes[classes != IGNORE_INDEX]
        targets.append({"semantic": semantic, "labels": classes, "masks": semantic[None] == classes[:, None, None]})
    return images, targets


def collate_panoptic(samples: list[tuple[torch.Tensor, dict]], train: bool = True):
    """Pad the images (``pad_batch``). Training targets: ``labels``, ``masks`` (padded, segments that left
    the crop dropped), ``isthing``, ``iscrowd``. Evaluation targets keep the segments unpadded at the
    ground truth's size plus ``segment_ids``, ``image_id``, the image's ``size`` in the batch and
    ``orig_size``."""
    images = pad_batch([image for image, _ in samples])
    _, _, ph, pw = images.shape
    targets = []
    for image, target in samples:
        h, w = image.shape[-2:]
        masks = target["masks"].as_subclass(torch.Tensor).bool()
        out = {k: target[k] for k in ("labels", "isthing", "iscrowd", "segment_ids") if k in target}
        if train:
            keep = masks.flatten(1).any(1)
            out = {k: v[keep] for k, v in out.items()}
            out["masks"] = F.pad(masks[keep], (0, pw - w, 0, ph - h))
        else:
            out.update(masks=masks, size=(h, w), orig_size=tuple(masks.shape[-2:]), image_id=target["image_id"])
        targets.append(out)
    return images, targets
