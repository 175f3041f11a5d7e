"""Hungarian matching of decoder queries to ground-truth objects (DETR, Deformable DETR, Mask2Former).

The matcher builds, for every image, a ``(Q, n)`` cost matrix between its ``Q`` queries and its ``n``
target objects, a weighted sum of named terms, and solves the assignment with
``scipy.optimize.linear_sum_assignment``:

* ``class``: the focal-style cost of Deformable DETR / DINO at the target class,
  ``alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log (1 - p))`` with ``p = sigmoid(logit)``
  (classification is sigmoid, there is no "no object" class);
* ``bbox``: L1 distance between normalised ``cxcywh`` boxes; ``giou``: ``-GIoU`` of the ``xyxy`` boxes;
* ``mask``: mean sigmoid binary cross-entropy and ``dice``: dice loss between the predicted mask logits and
  the target masks, both on ``num_points`` random points shared by the predictions and targets of an
  image (Mask2Former).

A term is used only if its weight is positive and both the outputs and the targets carry what it needs.
Everything is computed in float32 with autocast off.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["ClassQueryMatcher", "HungarianMatcher", "point_sample"]


def point_sample(
    input: torch.Tensor,
    coords: torch.Tensor,
    *,
    mode: str = "bilinear",
    padding_mode: str = "border",
    align_corners: bool = False,
) -> torch.Tensor:
    """Sample maps at continuous points (Mask2Former's ``point_sample``, a wrapper of ``F.grid_sample``).

    Args:
        input: ``(N, C, H, W)`` maps.
        coords: ``(N, P, 2)`` points as ``(x, y)`` in ``[0, 1]`` relative to the whole map (``0`` is the
            left/top edge of the first pixel, ``1`` the right/bottom edge of the last one), or
            ``(N, Hg, Wg, 2)``.

    Returns:
        ``(N, C, P)`` (or ``(N, C, Hg, Wg)``) sampled values.

    Unlike Mask2Former (zero padding), points within half a pixel of the border take the border pixel's
    value (``padding_mode="border"``) instead of being blended with zeros: a point inside the map
    should not be pulled toward logit 0 / background because the map is coarse.
    """
    flat = coords.dim() == 3
    grid = coords.unsqueeze(2) if flat else coords
    sampled = F.grid_sample(input, 2.0 * grid - 1.0, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    return sampled.squeeze(3) if flat else sampled


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


def focal_class_cost(logits: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """``(Q, C)`` logits, ``(n,)`` labels -> ``(Q, n)`` focal positive minus negative cost at the labels.

    As torchvision's ``sigmoid_focal_loss``: a negative ``alpha`` weights neither side, and ``gamma = 0`` with
    ``alpha < 0`` is the binary cross-entropy cost ``-log p + log(1 - p) = -logit``."""
    logits = logits[:, labels]
    prob = logits.sigmoid()
    positive_weight, negative_weight = (alpha, 1 - alpha) if alpha >= 0 else (1.0, 1.0)
    # -log(p) = softplus(-x) and -log(1 - p) = softplus(x): exact where log(sigmoid) would underflow
    positive = positive_weight * (1 - prob).pow(gamma) * F.softplus(-logits)
    negative = negative_weight * prob.pow(gamma) * F.softplus(logits)
    return positive - negative


def pairwise_sigmoid_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(Q, P)`` logits, ``(n, P)`` targets in [0, 1] -> ``(Q, n)`` mean binary cross-entropy over points."""
    positive = F.softplus(-logits)  # loss where the target is 1
    negative = F.softplus(logits)  # loss where the target is 0
    return (positive @ targets.T + negative @ (1 - targets).T) / logits.shape[1]


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(Q, P)`` logits, ``(n, P)`` targets -> ``(Q, n)`` dice loss ``1 - (2|p t| + 1) / (|p| + |t| + 1)``."""
    prob = logits.sigmoid()
    numerator = 2 * prob @ targets.T
    denominator = prob.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising a weighted sum of costs.

    Args:
        cost_class: weight of the focal class cost.
        cost_bbox: weight of the L1 box cost (``cxcywh``); 0 turns it off.
        cost_giou: weight of the ``-GIoU`` box cost; 0 turns it off.
        cost_mask: weight of the point-sampled sigmoid cross-entropy mask cost; 0 turns it off.
        cost_dice: weight of the point-sampled dice mask cost; 0 turns it off.
        num_points: points per image for the mask costs.
        focal_alpha, focal_gamma: parameters of the focal class cost.

    ``forward(outputs, targets)``:

    * ``outputs["logits"] (B, Q, C)`` class logits; optionally ``outputs["boxes"] (B, Q, 4)`` normalised
      ``cxcywh`` and ``outputs["masks"] (B, Q, h, w)`` mask logits (any resolution: masks are compared on
      points in coordinates relative to the map).
    * ``targets``: ``B`` dicts with ``labels (n,) int64`` and, as needed, ``boxes (n, 4)`` normalised
      ``cxcywh`` and ``masks (n, H, W)`` (bool or float).

    Returns ``B`` pairs ``(query_idx, target_idx)`` of CPU int64 tensors of length ``min(Q, n)``, sorted by
    query. With more targets than queries, the ``n - Q`` targets that would cost the most go unmatched
    (a rectangular assignment); an image without targets gets two empty tensors.

    When a mask cost is on, each image with targets draws its points as ``torch.rand(num_points, 2)``
    (float32, on the masks' device, in image order) from the global generator.

    Raises ``ValueError`` naming the cost term(s) if a cost matrix holds NaN or Inf (usually a diverged
    prediction), and if a label is outside ``[0, C)``.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        weights = dict(
            cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou, cost_mask=cost_mask, cost_dice=cost_dice
        )
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ValueError(f"HungarianMatcher: cost weights must be >= 0 and not all 0, got {weights}")
        if num_points < 1:
            raise ValueError(f"HungarianMatcher: num_points must be >= 1, got {num_points}")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
            f"cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, num_points={self.num_points}"
        )

    def cost_terms(
        self,
        logits: torch.Tensor,
        target: dict[str, torch.Tensor],
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Weighted ``(Q, n)`` cost terms of one image, by name (``class``, ``bbox``, ``giou``, ``mask``,
        ``dice``); only the terms in use are present.

        ``logits (Q, C)``, ``boxes (Q, 4)``, ``masks (Q, h, w)`` are one image's predictions; ``points
        (P, 2)`` are the ``(x, y)`` points in ``[0, 1]`` for the mask costs (required if they are used).
        Computed in float32 with autocast off.
        """
        with _no_autocast(logits.device):
            labels = target["labels"].to(logits.device)
            terms = {}
            if self.cost_class > 0:
                terms["class"] = self.cost_class * focal_class_cost(
                    logits.float(), labels, self.focal_alpha, self.focal_gamma
                )
            if boxes is not None and "boxes" in target:
                out_boxes = boxes.float()
                tgt_boxes = target["boxes"].to(out_boxes)
                if self.cost_bbox > 0:
                    terms["bbox"] = self.cost_bbox * torch.cdist(out_boxes, tgt_boxes, p=1)
                if self.cost_giou > 0:
                    terms["giou"] = -self.cost_giou * generalized_box_iou(
                        box_convert(out_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
                    )
            if masks is not None and "masks" in target and (self.cost_mask > 0 or self.cost_dice > 0):
                if points is None:
                    raise ValueError("HungarianMatcher.cost_terms: the mask costs need points")
                # the queries (and the targets) are the channels of one map, so one grid serves all of them
                out_points = point_sample(masks.float()[None], points[None])[0]  # (Q, P)
                tgt_masks = target["masks"].to(points.device, torch.float32)
                tgt_points = point_sample(tgt_masks[None], points[None])[0]  # (n, P)
                if self.cost_mask > 0:
                    terms["mask"] = self.cost_mask * pairwise_sigmoid_ce(out_points, tgt_points)
                if self.cost_dice > 0:
                    terms["dice"] = self.cost_dice * pairwise_dice(out_points, tgt_points)
        return terms

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        logits = outputs["logits"]
        batch, num_queries, num_classes = logits.shape
        if len(targets) != batch:
            raise ValueError(f"HungarianMatcher: {batch} images of predictions but {len(targets)} target dicts")
        labels = torch.cat([t["labels"] for t in targets])
        if labels.numel():
            low, high = (int(v) for v in labels.aminmax())
            if low < 0 or high >= num_classes:
                raise ValueError(
                    f"HungarianMatcher: target labels span [{low}, {high}] but the class head has {num_classes} "
                    "classes (labels must be contiguous ids in [0, num_classes))"
                )
        boxes, masks = outputs.get("boxes"), outputs.get("masks")
        uses_masks = masks is not None and (self.cost_mask > 0 or self.cost_dice > 0)
        empty = torch.empty(0, dtype=torch.int64)
        costs: list[torch.Tensor | None] = []
        terms: list[dict[str, torch.Tensor]] = []
        with _no_autocast(logits.device):
            for i, target in enumerate(targets):
                if len(target["labels"]) == 0:
                    costs.append(None)
                    terms.append({})
                    continue
                points = None
                if uses_masks and "masks" in target:
                    points = torch.rand(self.num_points, 2, device=masks.device, dtype=torch.float32)
                image_terms = self.cost_terms(
                    logits[i],
                    target,
                    boxes=None if boxes is None else boxes[i],
                    masks=None if masks is None else masks[i],
                    points=points,
                )
                if not image_terms:
                    raise ValueError(
                        "HungarianMatcher: no cost term applies (class cost weight is 0 and the outputs or "
                        "targets lack boxes/masks)"
                    )
                costs.append(sum(image_terms.values()))
                terms.append(image_terms)
        # one device-to-host copy for the whole batch
        present = [c for c in costs if c is not None]
        flat = torch.cat([c.flatten() for c in present]).cpu().numpy() if present else np.empty(0, np.float32)
        indices, offset = [], 0
        for i, cost in enumerate(costs):
            if cost is None:
                indices.append((empty, empty.clone()))
                continue
            matrix = flat[offset : offset + cost.numel()].reshape(cost.shape)
            offset += cost.numel()
            if not np.isfinite(matrix).all():
                bad = [name for name, term in terms[i].items() if not torch.isfinite(term).all()]
                raise ValueError(
                    f"HungarianMatcher: the {', '.join(bad) or 'total'} cost of image {i} is not finite (NaN or "
                    "Inf); the predictions (or targets) for that term hold NaN/Inf or degenerate boxes"
                )
            rows, cols = linear_sum_assignment(matrix)
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


class ClassQueryMatcher(nn.Module):
    """Semantic segmentation with one query per class: query ``c`` is matched to the target of class ``c``
    (each target is one class present in the image), no Hungarian search."""

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        num_queries = outputs["logits"].shape[1]
        indices = []
        for b, target in enumerate(targets):
            labels = target["labels"].cpu().long()
            if len(labels) and (labels.min() < 0 or labels.max() >= num_queries):
                raise ValueError(f"ClassQueryMatcher: image {b} has classes {labels.tolist()}, {num_queries} queries")
            indices.append((labels, torch.arange(len(labels))))
        return indices
