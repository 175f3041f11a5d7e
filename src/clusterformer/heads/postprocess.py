"""Post-processing of set predictions into per-image detections and instance masks.

* detection: the ``top_k`` highest of the ``Q x C`` sigmoid scores (a query may give several
  classes), boxes scaled from normalised ``cxcywh`` to absolute ``xyxy`` in the output size;
* instance: the same ``top_k`` selection; each mask is upsampled to the padded input, cropped to the
  image, resized to the output size and thresholded at probability 0.5; the score is the class
  probability times the mean mask probability inside the mask (Mask2Former); boxes enclose the masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, masks_to_boxes


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
        selected = image_masks[queries].float()[None]  # (1, k, h, w)
        selected = F.interpolate(selected, size=padded, mode="bilinear", align_corners=False)[..., :ih, :iw]
        selected = F.interpolate(selected, size=(oh, ow), mode="bilinear", align_corners=False)[0]
        probs = selected.sigmoid()
        binary = probs > threshold
        mask_scores = (probs * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        boxes = masks_to_boxes(binary) if len(binary) else torch.zeros(0, 4, device=binary.device)
        results.append({"scores": scores * mask_scores, "labels": labels, "masks": binary, "boxes": boxes})
    return results
