"""Post-processing of set predictions into per-image detections and instance masks.

* detection: the ``top_k`` highest of the ``Q x C`` sigmoid scores (a query may give several
  classes), boxes scaled from normalised ``cxcywh`` to absolute ``xyxy`` in the output size;
* instance: the same ``top_k`` selection; each mask is upsampled to the padded input, cropped to the
  image, resized to the output size and thresholded at probability 0.5; the score is the class
  probability times the mean mask probability inside the mask (Mask2Former); boxes enclose the masks;
* semantic: ``argmax_c Σ_q sigmoid(class)_qc · sigmoid(mask)_q`` (Mask2Former's semantic inference with
  sigmoid class scores), on the masks resized as for instances;
* panoptic: Mask2Former's mask-wise merging (also kMaX-DeepLab's): queries whose best class score exceeds
  ``score_threshold`` compete for every pixel by ``score · mask probability``; a query keeps the pixels it
  wins where its mask probability is at least ``mask_threshold``, unless it wins less than
  ``overlap_threshold`` of its own mask; queries of one stuff class form one segment.

All mask logits are at stride 4 of the padded batch: ``(B, Q, h, w)`` covers ``(4h, 4w)`` input pixels.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, masks_to_boxes


def resize_mask_logits(
    masks: torch.Tensor, padded_size: tuple[int, int], input_size: tuple[int, int], output_size: tuple[int, int]
) -> torch.Tensor:
    """``(k, h, w)`` mask logits -> ``(k, H, W)`` float32 logits in the output size: bilinearly upsampled to the
    padded input, cropped to the image's ``input_size`` (top-left), bilinearly resized to ``output_size``
    (Mask2Former's ``sem_seg_postprocess``)."""
    ih, iw = input_size
    resized = F.interpolate(masks.float()[None], size=padded_size, mode="bilinear", align_corners=False)
    resized = resized[..., :ih, :iw]
    return F.interpolate(resized, size=tuple(output_size), mode="bilinear", align_corners=False)[0]


def _top_k(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logits (Q, C)`` -> scores, query indices and labels of the ``top_k`` best (query, class) pairs."""
    num_classes = logits.shape[-1]
    scores = logits.float().sigmoid().flatten()
    scores, index = scores.topk(min(top_k, scores.numel()))
    return scores, torch.div(index, num_classes, rounding_mode="floor"), index % num_classes


@torch.no_grad()
def detection_postprocess(
    logits: torch.Tensor, boxes: torch.Tensor, output_sizes: Sequence[tuple[int, int]], top_k: int = 100
) -> list[dict[str, torch.Tensor]]:
    """``logits (B, Q, C)``, ``boxes (B, Q, 4)`` normalised ``cxcywh``, ``output_sizes`` ``(h, w)`` per
    image -> per image ``scores (k,)``, ``labels (k,)``, ``boxes (k, 4)`` absolute ``xyxy``."""
    results = []
    for image_logits, image_boxes, (h, w) in zip(logits, boxes, output_sizes, strict=True):
        scores, queries, labels = _top_k(image_logits, top_k)
        xyxy = box_convert(image_boxes[queries].float(), "cxcywh", "xyxy")
        xyxy = xyxy * torch.tensor([w, h, w, h], dtype=xyxy.dtype, device=xyxy.device)
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
        results.append({"scores": scores, "labels": labels, "boxes": xyxy})
    return results


@torch.no_grad()
def instance_postprocess(
    logits: torch.Tensor,
    masks: torch.Tensor,
    input_sizes: Sequence[tuple[int, int]],
    output_sizes: Sequence[tuple[int, int]],
    top_k: int = 100,
    threshold: float = 0.5,
) -> list[dict[str, torch.Tensor]]:
    """``logits (B, Q, C)``, ``masks (B, Q, h, w)`` logits at stride 4 of the padded batch;
    ``input_sizes``: each image's ``(h, w)`` inside the padded batch; ``output_sizes``: the size to
    report masks in (the original image). Returns per image ``scores``, ``labels``, ``masks (k, H, W)``
    bool and ``boxes (k, 4)`` xyxy."""
    padded = (masks.shape[-2] * 4, masks.shape[-1] * 4)
    results = []
    for image_logits, image_masks, (ih, iw), (oh, ow) in zip(logits, masks, input_sizes, output_sizes, strict=True):
        scores, queries, labels = _top_k(image_logits, top_k)
        probs = resize_mask_logits(image_masks[queries], padded, (ih, iw), (oh, ow)).sigmoid()
        binary = probs > threshold
        mask_scores = (probs * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        boxes = masks_to_boxes(binary) if len(binary) else torch.zeros(0, 4, device=binary.device)
        results.append({"scores": scores * mask_scores, "labels": labels, "masks": binary, "boxes": boxes})
    return results


@torch.no_grad()
def semantic_postprocess(
    logits: torch.Tensor,
    masks: torch.Tensor,
    input_sizes: Sequence[tuple[int, int]],
    output_sizes: Sequence[tuple[int, int]],
) -> list[torch.Tensor]:
    """``logits (B, Q, C)`` sigmoid class logits, ``masks (B, Q, h, w)`` mask logits at stride 4 of the padded
    batch, each image's ``input_sizes`` ``(h, w)`` inside the padded batch and ``output_sizes`` -> per image an
    ``(H, W)`` int64 map of ``argmax_c Σ_q sigmoid(logits)_qc · sigmoid(mask)_q`` (every pixel gets a class).

    Computed at the output size on the resized mask logits, as Mask2Former: ``C x H x W`` float32 scores."""
    padded = (masks.shape[-2] * 4, masks.shape[-1] * 4)
    results = []
    for image_logits, image_masks, input_size, output_size in zip(
        logits, masks, input_sizes, output_sizes, strict=True
    ):
        probs = resize_mask_logits(image_masks, padded, input_size, output_size).sigmoid()  # (Q, H, W)
        scores = torch.einsum("qc,qhw->chw", image_logits.float().sigmoid(), probs)
        results.append(scores.argmax(0))
    return results


@torch.no_grad()
def panoptic_postprocess(
    logits: torch.Tensor,
    masks: torch.Tensor,
    input_sizes: Sequence[tuple[int, int]],
    output_sizes: Sequence[tuple[int, int]],
    thing_classes: Collection[int],
    score_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    mask_threshold: float = 0.5,
    category_ids: Sequence[int] | None = None,
) -> list[dict]:
    """Mask-wise merging of Mask2Former's ``panoptic_inference`` into one segment map per image.

    Args:
        logits: ``(B, Q, C)`` sigmoid class logits.
        masks: ``(B, Q, h, w)`` mask logits at stride 4 of the padded batch.
        input_sizes: each image's ``(h, w)`` inside the padded batch; output_sizes: the size to report.
        thing_classes: the class ids (``0..C-1``) that are things; the others are stuff.
        score_threshold: a query takes part if its best sigmoid class score is above this (Mask2Former's
            ``object_mask_threshold`` for COCO panoptic, 0.8).
        overlap_threshold: a query whose won pixels are fewer than this fraction of its own mask
            (``mask probability >= mask_threshold``) is dropped (Mask2Former's 0.8).
        mask_threshold: mask probability from which a pixel belongs to a query's mask (0.5).
        category_ids: dataset category id of each class, for ``category_id`` (default: the class id itself).

    Each kept query ``k`` (class ``c_k``, score ``s_k``, mask probabilities ``m_k``, in query order) claims the
    pixels where it has the largest ``s_k m_k`` (ties: the lowest query) and ``m_k >= mask_threshold``. A
    query with no such pixel or with fewer won pixels (before the ``mask_threshold`` cut, as Mask2Former) than
    ``overlap_threshold`` times its mask area is dropped; a stuff query whose class already has a segment
    joins it. Pixels claimed by nobody are void (0).

    Returns per image ``{"ids": (H, W) int32, "segments_info": [...]}``, segment ids ``1, 2, ...`` in query
    order, each segment ``{"id", "label", "category_id", "isthing", "score", "area"}``: ``label`` the class
    id, ``score`` the query's class score (the highest of a merged stuff segment), ``area`` its pixel count.
    ``ids`` and ``segments_info`` are what ``metrics.PanopticQuality.update`` takes.
    """
    things = {int(c) for c in thing_classes}
    padded = (masks.shape[-2] * 4, masks.shape[-1] * 4)
    results = []
    for image_logits, image_masks, input_size, (oh, ow) in zip(logits, masks, input_sizes, output_sizes, strict=True):
        scores, labels = image_logits.float().sigmoid().max(-1)
        keep = scores > score_threshold
        ids = torch.zeros((oh, ow), dtype=torch.int32, device=masks.device)
        segments = []
        if not keep.any():
            results.append({"ids": ids, "segments_info": segments})
            continue
        scores, labels = scores[keep], labels[keep]
        probs = resize_mask_logits(image_masks[keep], padded, input_size, (oh, ow)).sigmoid()  # (k, H, W)
        winner = (scores[:, None, None] * probs).argmax(0)
        stuff_segment: dict[int, dict] = {}
        for k, (score, label) in enumerate(zip(scores.tolist(), labels.tolist(), strict=True)):
            own = probs[k] >= mask_threshold
            won = winner == k
            won_area, own_area = int(won.sum()), int(own.sum())
            claimed = won & own
            if won_area == 0 or own_area == 0 or not claimed.any() or won_area / own_area < overlap_threshold:
                continue
            isthing = label in things
            if not isthing and label in stuff_segment:
                segment = stuff_segment[label]
                segment["score"] = max(segment["score"], score)
            else:
                segment = {
                    "id": len(segments) + 1,
                    "label": label,
                    "category_id": label if category_ids is None else int(category_ids[label]),
                    "isthing": isthing,
                    "score": score,
                    "area": 0,
                }
                segments.append(segment)
                if not isthing:
                    stuff_segment[label] = segment
            ids[claimed] = segment["id"]
            segment["area"] += int(claimed.sum())
        results.append({"ids": ids, "segments_info": segments})
    return results
