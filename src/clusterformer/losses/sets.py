"""Set-prediction losses for the detection, instance and panoptic heads (DETR / Deformable DETR / Mask2Former,
MaX-DeepLab / kMaX-DeepLab).

``SetCriterion`` matches the queries to the targets with a ``HungarianMatcher`` and returns named loss
terms, each already divided by the number of targets in the batch (averaged over the distributed
processes, at least 1):

* ``loss_class``: sigmoid focal loss over all ``Q x C`` query-class pairs, one-hot targets at the matched
  queries (unmatched queries are pushed to background on every class);
* ``loss_bbox`` (L1 on ``cxcywh``) and ``loss_giou`` (``1 - GIoU`` on ``xyxy``) on matched pairs;
* ``loss_mask`` (sigmoid cross-entropy) and ``loss_dice`` on ``num_points`` points per matched mask, chosen
  by Mask2Former's uncertainty-based importance sampling.

The same terms are computed on every auxiliary decoder layer, suffixed ``_0``, ``_1``, ... All losses are
computed in float32 with autocast off.

``PanopticCriterion`` (``panoptic_criterion``) is ClusterFormer's panoptic loss (paper Eq. 7,
``5 L_th + 3 L_st + 1 L_aux``; decisions in ``docs/panoptic_losses.md``):

* ``L_th`` / ``L_st``: the set loss above with a plain sigmoid binary cross-entropy class loss, split between
  things and stuff: ``loss_class_thing`` / ``loss_class_stuff`` (the class loss of every query on the thing /
  stuff columns of the class head), ``loss_mask_thing``, ``loss_dice_thing`` / ``loss_mask_stuff``,
  ``loss_dice_stuff`` (point-sampled BCE and dice of the matched thing / stuff targets);
* ``L_aux``, MaX-DeepLab's and kMaX-DeepLab's auxiliary losses: ``loss_pq_class`` and ``loss_pq_dice`` (the
  PQ-style loss, 3), ``loss_mask_id`` (softmax over the queries at each pixel, 0.3),
  ``loss_instance_discrimination`` (pixel-wise contrastive loss on ``outputs["pixel_embeddings"]``, 1) and
  ``loss_semantic`` (cross-entropy of ``outputs["semantic_logits"]``, 1); the last two are left out when the
  outputs lack their input.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from clusterformer.matching import HungarianMatcher, point_sample

__all__ = [
    "ClassQueryMatcher",
    "IGNORE_INDEX",
    "LOSS_TERMS",
    "PANOPTIC_LOSS_TERMS",
    "PanopticCriterion",
    "SemanticCriterion",
    "SetCriterion",
    "detection_criterion",
    "dice_loss",
    "instance_criterion",
    "panoptic_criterion",
    "point_sample",
    "semantic_criterion",
    "sample_at_centres",
    "sigmoid_ce_loss",
    "uncertainty_points",
]

# loss name (as passed in ``losses``) -> the terms it produces
LOSS_TERMS = {
    "labels": ("loss_class",),
    "boxes": ("loss_bbox", "loss_giou"),
    "masks": ("loss_mask", "loss_dice"),
}
_LAYER_SUFFIX = re.compile(r"_\d+$")
GIOU_EPS = 1e-10


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float | torch.Tensor) -> torch.Tensor:
    """Dice loss ``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` per mask, summed and divided by ``num_masks``.

    ``logits (M, ...)`` and ``targets (M, ...)`` (in ``[0, 1]``) are flattened per mask.
    """
    prob = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def sigmoid_ce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float | torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over each mask's points, summed over masks, divided by
    ``num_masks``. ``logits (M, ...)``, ``targets (M, ...)`` in ``[0, 1]``."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.flatten(1).mean(1).sum() / num_masks


@torch.no_grad()
def uncertainty_points(
    mask_logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
) -> torch.Tensor:
    """Mask2Former's importance sampling of points (PointRend, Kirillov et al. 2020).

    Draw ``int(oversample_ratio * num_points)`` uniform random points per mask, keep the
    ``int(importance_sample_ratio * num_points)`` most uncertain ones (largest ``-|logit|``, the logit
    interpolated at the point), and fill up with uniform random points.

    Args:
        mask_logits: ``(M, h, w)`` mask logits.

    Returns:
        ``(M, num_points, 2)`` float32 points ``(x, y)`` in ``[0, 1]``, the uncertain ones first.
    """
    if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
        raise ValueError(
            f"uncertainty_points: need oversample_ratio >= 1 and importance_sample_ratio in [0, 1], got "
            f"{oversample_ratio} and {importance_sample_ratio}"
        )
    num_masks, device = mask_logits.shape[0], mask_logits.device
    num_oversampled = int(num_points * oversample_ratio)
    num_uncertain = int(num_points * importance_sample_ratio)
    candidates = torch.rand(num_masks, num_oversampled, 2, device=device, dtype=torch.float32)
    with torch.autocast(device.type, enabled=False):
        uncertainty = -point_sample(mask_logits.float()[:, None], candidates)[:, 0].abs()  # (M, kN)
    chosen = uncertainty.topk(num_uncertain, dim=1).indices
    points = candidates.gather(1, chosen[..., None].expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        random = torch.rand(num_masks, num_random, 2, device=device, dtype=torch.float32)
        points = torch.cat([points, random], dim=1)
    return points


def _matched_query_index(indices: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device):
    """``(image_idx, query_idx)`` of all matched queries, image by image."""
    images = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
    queries = torch.cat([src for src, _ in indices]).to(device)
    return images, queries


def _matched_targets(targets: list[dict], indices: list, key: str, device: torch.device) -> torch.Tensor:
    """``targets[i][key]`` of all matched targets, image by image, on ``device``."""
    return torch.cat([t[key][tgt.to(t[key].device)].to(device) for t, (_, tgt) in zip(targets, indices, strict=True)])


class SetCriterion(nn.Module):
    """Hungarian-matched set losses on the final decoder layer and on every auxiliary layer.

    Args:
        num_classes: classes of the (sigmoid) class head, ``C``.
        matcher: assigns queries to targets (``forward(outputs, targets) -> [(query_idx, target_idx)]``).
        weight_dict: weight of each loss term by its name without the layer suffix (``loss_class``,
            ``loss_bbox``, ``loss_giou``, ``loss_mask``, ``loss_dice``); every term that ``losses``
            produces needs one (a weight of 0 keeps a term for logging only).
        losses: which losses to compute: ``labels``, ``boxes``, ``masks``.
        focal_alpha, focal_gamma: parameters of the sigmoid focal class loss.
        num_points, oversample_ratio, importance_sample_ratio: point sampling of the mask losses.

    ``forward(outputs, targets)`` takes the predictions of the last layer, ``outputs["logits"] (B, Q, C)``,
    ``outputs["boxes"] (B, Q, 4)`` (normalised ``cxcywh``) and/or ``outputs["masks"] (B, Q, h, w)`` (mask
    logits), plus optionally ``outputs["aux"]``, a list of such dicts, one per earlier layer; and ``B``
    target dicts with ``labels (n,)``, ``boxes (n, 4)``, ``masks (n, H, W)``. It returns a dict of scalar
    float32 losses: ``loss_class``, ``loss_bbox``, ``loss_giou``, ``loss_mask``, ``loss_dice`` (those of
    the requested ``losses``), then the same names suffixed ``_0``, ``_1``, ... for ``outputs["aux"][0]``,
    ``outputs["aux"][1]``, ...

    Every term is divided by the number of target objects in the batch (averaged across processes when
    ``torch.distributed`` is initialised, at least 1), the DETR convention: with more targets than
    queries the unmatched targets still count. The point coordinates of the mask targets are relative
    to the whole map, so ``(h, w)`` must cover the same (padded) extent as ``(H, W)``.
    """

    # loss name -> the terms it produces; a subclass adds a loss ``x`` with a method ``loss_x`` and an entry here
    loss_terms: dict[str, tuple[str, ...]] = LOSS_TERMS

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: dict[str, float],
        losses: Iterable[str] = ("labels", "boxes", "masks"),
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ):
        super().__init__()
        losses = tuple(losses)
        unknown = [name for name in losses if name not in self.loss_terms]
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {unknown}; choose from {list(self.loss_terms)}")
        unweighted = [term for name in losses for term in self.loss_terms[name] if term not in weight_dict]
        if unweighted:
            raise ValueError(f"SetCriterion: weight_dict has no weight for {unweighted} (use 0 to log only)")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = losses
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, losses={self.losses}, weight_dict={self.weight_dict}"

    def loss_labels(self, outputs: dict, targets: list[dict], indices: list, num_targets) -> dict[str, torch.Tensor]:
        """``loss_class``: sigmoid focal loss summed over all queries and classes / ``num_targets``."""
        logits = outputs["logits"].float()
        one_hot = torch.zeros_like(logits)
        images, queries = _matched_query_index(indices, logits.device)
        one_hot[images, queries, _matched_targets(targets, indices, "labels", logits.device)] = 1
        loss = sigmoid_focal_loss(logits, one_hot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum")
        return {"loss_class": loss / num_targets}

    def loss_boxes(self, outputs: dict, targets: list[dict], indices: list, num_targets) -> dict[str, torch.Tensor]:
        """``loss_bbox``: L1 on matched ``cxcywh`` boxes; ``loss_giou``: ``1 - GIoU``; both / ``num_targets``."""
        _require(outputs, targets, "boxes")
        boxes = outputs["boxes"]
        images, queries = _matched_query_index(indices, boxes.device)
        predicted = boxes[images, queries].float()
        target = _matched_targets(targets, indices, "boxes", boxes.device).float()
        loss_bbox = F.l1_loss(predicted, target, reduction="none").sum()
        # eps well below torchvision's 1e-7: a perfect box keeps a loss of eps / area, and normalised areas
        # of small objects are ~1e-6 (a 1-pixel box at 1333 pixels is 5.6e-7)
        loss_giou = generalized_box_iou_loss(
            box_convert(predicted, "cxcywh", "xyxy"),
            box_convert(target, "cxcywh", "xyxy"),
            reduction="sum",
            eps=GIOU_EPS,
        )
        return {"loss_bbox": loss_bbox / num_targets, "loss_giou": loss_giou / num_targets}

    def loss_masks(self, outputs: dict, targets: list[dict], indices: list, num_targets) -> dict[str, torch.Tensor]:
        """``loss_mask`` (sigmoid cross-entropy) and ``loss_dice`` on uncertainty-sampled points of the
        matched masks, / ``num_targets``."""
        logits, labels = self.sampled_masks(outputs, targets, indices)
        return {
            "loss_mask": sigmoid_ce_loss(logits, labels, num_targets),
            "loss_dice": dice_loss(logits, labels, num_targets),
        }

    def sampled_masks(self, outputs: dict, targets: list[dict], indices: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits and target values ``(M, num_points)`` at uncertainty-sampled points of the ``M`` matched
        (prediction, target) pairs, image by image in matched order; float32.

        With nothing matched both are ``(0, num_points)``, the logits still part of the graph (DDP expects
        every output used), so that losses summed over them are zeros with a zero gradient.
        """
        _require(outputs, targets, "masks")
        masks = outputs["masks"]
        images, queries = _matched_query_index(indices, masks.device)
        predicted = masks[images, queries].float()  # (M, h, w), matched masks image by image
        if predicted.shape[0] == 0:
            empty = predicted.flatten(1)[:, :1].expand(0, self.num_points)
            return empty, torch.zeros(0, self.num_points, device=masks.device)
        points = uncertainty_points(predicted, self.num_points, self.oversample_ratio, self.importance_sample_ratio)
        with torch.no_grad():
            # image by image, so that only one image's target masks are converted to float at a time
            labels, start = [], 0
            for target, (_, tgt) in zip(targets, indices, strict=True):
                if len(tgt) == 0:
                    continue
                target_masks = target["masks"][tgt.to(target["masks"].device)].to(masks.device, torch.float32)
                labels.append(point_sample(target_masks[:, None], points[start : start + len(tgt)])[:, 0])
                start += len(tgt)
            labels = torch.cat(labels)  # (M, P)
        return point_sample(predicted[:, None], points)[:, 0], labels

    def num_targets(self, targets: list[dict], device: torch.device) -> torch.Tensor:
        """Number of target objects in the batch, averaged over the processes, at least 1 (a 0-d tensor)."""
        count = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        return count.clamp(min=1)

    def layer_losses(self, outputs: dict, targets: list[dict], num_targets) -> dict[str, torch.Tensor]:
        """The requested losses of one decoder layer (matching included), unsuffixed."""
        indices = self.matcher(outputs, targets)
        losses = {}
        for name in self.losses:
            losses.update(getattr(self, f"loss_{name}")(outputs, targets, indices, num_targets))
        return losses

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        device = outputs["logits"].device
        num_targets = self.num_targets(targets, device)
        with torch.autocast(device.type, enabled=False):
            losses = self.layer_losses(outputs, targets, num_targets)
            for i, aux in enumerate(outputs.get("aux", ())):
                losses.update({f"{k}_{i}": v for k, v in self.layer_losses(aux, targets, num_targets).items()})
        return losses

    def weighted_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """``sum(weight_dict[name without the _i suffix] * value)`` over all terms of ``losses``."""
        total = None
        for name, value in losses.items():
            base = _LAYER_SUFFIX.sub("", name)
            if base not in self.weight_dict:
                raise KeyError(f"SetCriterion.weighted_total: no weight for loss term {name!r} ({base!r})")
            term = self.weight_dict[base] * value
            total = term if total is None else total + term
        if total is None:
            raise ValueError("SetCriterion.weighted_total: no loss terms")
        return total


def _require(outputs: dict, targets: list[dict], key: str) -> None:
    if key not in outputs:
        raise KeyError(f"SetCriterion: the {key!r} loss needs outputs[{key!r}] on every decoder layer")
    missing = [i for i, t in enumerate(targets) if key not in t]
    if missing:
        raise KeyError(f"SetCriterion: the {key!r} loss needs targets[i][{key!r}]; missing for images {missing}")


def detection_criterion(
    num_classes: int,
    *,
    class_weight: float = 2.0,
    bbox_weight: float = 5.0,
    giou_weight: float = 2.0,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> SetCriterion:
    """Detection: focal class 2, L1 5, GIoU 2 (paper §4.1); the matcher uses the same weights as costs."""
    matcher = HungarianMatcher(
        cost_class=class_weight,
        cost_bbox=bbox_weight,
        cost_giou=giou_weight,
        cost_mask=0.0,
        cost_dice=0.0,
        focal_alpha=focal_alpha,
        focal_gamma=focal_gamma,
    )
    weights = {"loss_class": class_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}
    return SetCriterion(
        num_classes, matcher, weights, losses=("labels", "boxes"), focal_alpha=focal_alpha, focal_gamma=focal_gamma
    )


def instance_criterion(
    num_classes: int,
    *,
    class_weight: float = 2.0,
    mask_weight: float = 5.0,
    dice_weight: float = 5.0,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> SetCriterion:
    """Instance segmentation: focal class 2, point-sampled BCE 5 and dice 5 (Mask2Former); the matcher uses
    the same weights as costs on ``num_points`` uniform points."""
    matcher = HungarianMatcher(
        cost_class=class_weight,
        cost_bbox=0.0,
        cost_giou=0.0,
        cost_mask=mask_weight,
        cost_dice=dice_weight,
        num_points=num_points,
        focal_alpha=focal_alpha,
        focal_gamma=focal_gamma,
    )
    weights = {"loss_class": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
    return SetCriterion(
        num_classes,
        matcher,
        weights,
        losses=("labels", "masks"),
        focal_alpha=focal_alpha,
        focal_gamma=focal_gamma,
        num_points=num_points,
        oversample_ratio=oversample_ratio,
        importance_sample_ratio=importance_sample_ratio,
    )


# ---------------------------------------------------------------- panoptic segmentation (paper §4.1.5, Eq. 7)

# loss name -> the terms it produces, for ``PanopticCriterion``
PANOPTIC_LOSS_TERMS = {
    "labels": ("loss_class_thing", "loss_class_stuff"),
    "masks": ("loss_mask_thing", "loss_dice_thing", "loss_mask_stuff", "loss_dice_stuff"),
    "pq": ("loss_pq_class", "loss_pq_dice"),
    "mask_id": ("loss_mask_id",),
    "instance_discrimination": ("loss_instance_discrimination",),
    "semantic": ("loss_semantic",),
}
IGNORE_INDEX = 255  # void in semantic maps
_PER_SEGMENT_KEYS = ("labels", "masks", "isthing", "iscrowd", "segment_ids", "area", "boxes")
DICE_EPS = 1e-5  # of the (unsmoothed) dice similarity that weights the PQ-style class term, as deeplab2


def sample_at_centres(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resampling of ``(..., H, W)`` maps (any dtype) to ``(..., h, w)``: output cell ``(i, j)``
    takes the input pixel under its centre, ``floor((i + 1/2) H / h)`` (``F.interpolate``'s ``nearest-exact``;
    deeplab2's strided downsampling of the ground truth). Used to bring targets to a prediction's resolution."""
    height, width = maps.shape[-2:]

    def centres(count: int, extent: int) -> torch.Tensor:
        position = (torch.arange(count, device=maps.device, dtype=torch.float64) + 0.5) * (extent / count)
        return position.long().clamp_(max=extent - 1)

    return maps[..., centres(size[0], height), :][..., centres(size[1], width)]


def _class_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Element-wise sigmoid class loss: plain binary cross-entropy for ``gamma == 0`` (weighted by ``alpha`` on
    positives and ``1 - alpha`` on negatives when ``alpha >= 0``), torchvision's focal loss otherwise."""
    if gamma == 0:
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        return loss if alpha < 0 else (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")


def _first_cover(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, h, w)`` bool masks -> ``covered (h, w)`` (some mask holds the pixel) and ``index (h, w)``, the first
    mask holding it (0 where none does)."""
    if masks.shape[0] == 0:
        shape = masks.shape[1:]
        return torch.zeros(shape, dtype=torch.bool, device=masks.device), torch.zeros(
            shape, dtype=torch.int64, device=masks.device
        )
    return masks.any(0), masks.to(torch.uint8).argmax(0)


class PanopticCriterion(SetCriterion):
    """Panoptic losses of ClusterFormer (paper Eq. 7): ``λ_th L_th + λ_st L_st + λ_aux L_aux``.

    See ``docs/panoptic_losses.md`` for the decisions. ``L_th`` and ``L_st`` split the Hungarian-matched set loss
    of Mask2Former (sigmoid class loss over every query and class, point-sampled mask BCE and dice over the
    matched pairs) between things and stuff: the class loss of the thing columns of the class head and the mask
    losses of the thing targets form ``L_th``, those of the stuff columns and stuff targets ``L_st``; all are
    divided by the number of targets in the batch, so that with ``λ_th = λ_st`` the two add up to
    ``SetCriterion``'s ``labels`` + ``masks`` loss. ``L_aux`` is the weighted sum of MaX-DeepLab's / kMaX-DeepLab's
    four auxiliary losses.

    Args:
        num_classes: classes of the sigmoid class head, ``C`` (things and stuff, contiguous ids).
        matcher: assigns queries to targets (a ``HungarianMatcher`` with class and mask costs).
        weight_dict: weight of each term (``λ`` times the term's own weight), by name without layer suffix.
        thing_classes: the class ids in ``[0, C)`` that are things; the others are stuff.
        losses: which of ``labels``, ``masks`` (``L_th`` and ``L_st``), ``pq``, ``mask_id``,
            ``instance_discrimination``, ``semantic`` (``L_aux``) to compute.
        focal_alpha, focal_gamma: the class loss; the defaults (``-1``, ``0``) give the plain binary
            cross-entropy of the paper, ``0.25``, ``2.0`` the focal loss of the detection head.
        num_points, oversample_ratio, importance_sample_ratio: point sampling of the mask losses.
        pq_alpha: weight of the matched (positive) part of the PQ-style loss; ``1 - pq_alpha`` weighs the
            unmatched queries' "no object" part (MaX-DeepLab: 0.75).
        num_samples: pixels sampled per image for the instance discrimination loss (kMaX-DeepLab: 4096).
        sample_temperature: pixels are sampled with probability ``∝ area^-sample_temperature`` of their
            segment, favouring small segments (kMaX-DeepLab: 1.5).
        discrimination_temperature: temperature of the contrastive softmax (kMaX-DeepLab: 0.3).

    ``forward(outputs, targets)``:

    * ``outputs``: ``logits (B, Q, C)`` class logits, ``masks (B, Q, h, w)`` mask logits (covering the same
      padded extent as the target masks), ``aux`` (a list of such dicts for the earlier decoder layers), and
      optionally ``pixel_embeddings (B, E, h', w')`` (for ``loss_instance_discrimination``) and
      ``semantic_logits (B, C, h'', w'')`` (for ``loss_semantic``), on any layer's dict. A term whose input is
      absent from a layer's dict is left out for that layer.
    * ``targets``: ``B`` dicts with ``labels (n,) int64``, ``masks (n, H, W) bool`` (one per segment, things
      and stuff), and optionally ``isthing (n,)`` (checked against ``thing_classes``; derived from them when
      absent), ``iscrowd (n,)`` (crowd segments are dropped and their pixels count as void, as Mask2Former's
      and kMaX-DeepLab's data pipelines do) and ``semantic (H, W) int64`` with 255 for void (rendered from
      ``masks`` and ``labels`` when absent).

    Returns the scalar float32 terms of ``PANOPTIC_LOSS_TERMS`` for the requested losses, then the same names
    suffixed ``_0``, ``_1``, ... for ``outputs["aux"]``. The dense terms (``pq``, ``mask_id``,
    ``instance_discrimination``, ``semantic``) compare each prediction with the targets resampled to its
    resolution (``sample_at_centres``); a pixel covered by no (non-crowd) target is void.
    """

    loss_terms = PANOPTIC_LOSS_TERMS

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: dict[str, float],
        *,
        thing_classes: Iterable[int],
        losses: Iterable[str] = tuple(PANOPTIC_LOSS_TERMS),
        focal_alpha: float = -1.0,
        focal_gamma: float = 0.0,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        pq_alpha: float = 0.75,
        num_samples: int = 4096,
        sample_temperature: float = 1.5,
        discrimination_temperature: float = 0.3,
    ):
        super().__init__(
            num_classes,
            matcher,
            weight_dict,
            losses=losses,
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            num_points=num_points,
            oversample_ratio=oversample_ratio,
            importance_sample_ratio=importance_sample_ratio,
        )
        thing_classes = sorted(set(int(c) for c in thing_classes))
        outside = [c for c in thing_classes if not 0 <= c < num_classes]
        if outside:
            raise ValueError(f"PanopticCriterion: thing_classes {outside} are outside [0, {num_classes})")
        if not 0 <= pq_alpha <= 1 or num_samples < 1 or discrimination_temperature <= 0:
            raise ValueError(
                "PanopticCriterion: need pq_alpha in [0, 1], num_samples >= 1 and discrimination_temperature > 0, "
                f"got {pq_alpha}, {num_samples}, {discrimination_temperature}"
            )
        self.thing_classes = thing_classes
        columns = torch.zeros(num_classes, dtype=torch.bool)
        columns[thing_classes] = True
        self.register_buffer("thing_columns", columns, persistent=False)
        self.pq_alpha = pq_alpha
        self.num_samples = num_samples
        self.sample_temperature = sample_temperature
        self.discrimination_temperature = discrimination_temperature

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, thing_classes={self.thing_classes}"

    # ---------------------------------------------------------------- targets

    def prepare_targets(self, targets: list[dict]) -> list[dict]:
        """Drop crowd segments, add or check ``isthing`` (bool); the other keys are passed on unchanged."""
        labels = torch.cat([t["labels"] for t in targets]) if targets else torch.zeros(0, dtype=torch.int64)
        if labels.numel():
            low, high = (int(v) for v in labels.aminmax())
            if low < 0 or high >= self.num_classes:
                raise ValueError(
                    f"PanopticCriterion: target labels span [{low}, {high}] but the class head has "
                    f"{self.num_classes} classes"
                )
        prepared = []
        for i, target in enumerate(targets):
            target = dict(target)
            if "iscrowd" in target:
                keep = target["iscrowd"] == 0
                for key in _PER_SEGMENT_KEYS:
                    if key in target:
                        target[key] = target[key][keep.to(target[key].device)]
            derived = self.thing_columns.to(target["labels"].device)[target["labels"]]
            if "isthing" in target:
                given = target["isthing"].to(derived.device).bool()
                wrong = (given != derived).nonzero().flatten().tolist()
                if wrong:
                    raise ValueError(
                        f"PanopticCriterion: image {i}: segments {wrong[:10]} have isthing "
                        f"{given[wrong[:10]].int().tolist()} but labels {target['labels'][wrong[:10]].tolist()}, "
                        f"which thing_classes {self.thing_classes[:20]} make the opposite"
                    )
            target["isthing"] = derived
            prepared.append(target)
        return prepared

    def _isthing(self, target: dict) -> torch.Tensor:
        if "isthing" in target:
            return target["isthing"].bool()
        return self.thing_columns.to(target["labels"].device)[target["labels"]]

    # ---------------------------------------------------------------- L_th and L_st

    def loss_labels(self, outputs: dict, targets: list[dict], indices: list, num_targets) -> dict[str, torch.Tensor]:
        """``loss_class_thing`` / ``loss_class_stuff``: the sigmoid class loss of every query on the thing / stuff
        columns (one-hot at the matched queries' target classes, zero elsewhere), summed, / ``num_targets``."""
        logits = outputs["logits"].float()
        one_hot = torch.zeros_like(logits)
        images, queries = _matched_query_index(indices, logits.device)
        one_hot[images, queries, _matched_targets(targets, indices, "labels", logits.device)] = 1
        loss = _class_loss(logits, one_hot, self.focal_alpha, self.focal_gamma)
        things = self.thing_columns.to(logits.device)
        return {
            "loss_class_thing": loss[..., things].sum() / num_targets,
            "loss_class_stuff": loss[..., ~things].sum() / num_targets,
        }

    def loss_masks(self, outputs: dict, targets: list[dict], indices: list, num_targets) -> dict[str, torch.Tensor]:
        """``loss_mask_*`` (sigmoid cross-entropy) and ``loss_dice_*`` on uncertainty-sampled points of the matched
        thing / stuff masks, / ``num_targets`` (the same points as ``SetCriterion.loss_masks``)."""
        logits, labels = self.sampled_masks(outputs, targets, indices)
        isthing = torch.cat(
            [
                self._isthing(t)[tgt.to(t["labels"].device)].to(logits.device)
                for t, (_, tgt) in zip(targets, indices, strict=True)
            ]
        )
        losses = {}
        for kind, rows in (("thing", isthing), ("stuff", ~isthing)):
            losses[f"loss_mask_{kind}"] = sigmoid_ce_loss(logits[rows], labels[rows], num_targets)
            losses[f"loss_dice_{kind}"] = dice_loss(logits[rows], labels[rows], num_targets)
        return {name: losses[name] for name in PANOPTIC_LOSS_TERMS["masks"]}

    # ---------------------------------------------------------------- L_aux (MaX-DeepLab / kMaX-DeepLab)

    def loss_pq(self, outputs: dict, targets: list[dict], indices: list, num_targets) -> dict[str, torch.Tensor]:
        """MaX-DeepLab's PQ-style loss (Eq. 8-10), per image divided by ``Q``, averaged over the images.

        Mask probabilities are the softmax over the queries at each pixel, zeroed on void pixels. For a matched
        pair (query ``q``, target ``i`` of class ``c``), with ``dice = (2|p t| + 1) / (|p| + |t| + 1)``:

        * ``loss_pq_dice = α p_q(c)^sg (1 - dice)``, the class probability ``p_q(c) = sigmoid(logit_qc)`` a
          constant (stop-gradient);
        * ``loss_pq_class = α s^sg BCE_q(one-hot c)`` with ``s = 2|p t| / (|p| + |t| + 1e-5)`` the dice
          similarity, a constant, and ``BCE_q`` the binary cross-entropy summed over the ``C`` classes (the
          negative log-likelihood of the one-hot label vector under independent sigmoids); every unmatched query
          adds ``(1 - α) BCE_q(all zero)`` = ``-log p_q(no object)``, ``p(no object) = Π_c (1 - p_c)``.
        """
        _require(outputs, targets, "masks")
        logits, masks = outputs["logits"].float(), outputs["masks"].float()
        num_queries, size = masks.shape[1], masks.shape[-2:]
        alpha = self.pq_alpha
        class_terms, dice_terms = [], []
        for b, (target, (src, tgt)) in enumerate(zip(targets, indices, strict=True)):
            src, tgt = src.to(masks.device), tgt.to(masks.device)
            small = sample_at_centres(target["masks"], size).to(masks.device)  # (n, h, w)
            labels = target["labels"].to(masks.device)[tgt]
            non_void = small.any(0) if small.shape[0] else torch.zeros(size, dtype=torch.bool, device=masks.device)
            probs = (masks[b].softmax(0) * non_void).flatten(1)[src]  # (M, hw)
            truth = small[tgt].flatten(1).float()
            intersection = (probs * truth).sum(1)
            total = probs.sum(1) + truth.sum(1)
            dice = (2 * intersection + 1) / (total + 1)
            one_hot = torch.zeros_like(logits[b])
            one_hot[src, labels] = 1
            bce = F.binary_cross_entropy_with_logits(logits[b], one_hot, reduction="none").sum(1)  # (Q,)
            with torch.no_grad():
                similarity = 2 * intersection / (total + DICE_EPS)
                class_prob = logits[b, src, labels].sigmoid()
                weights = torch.full_like(bce, 1 - alpha)
                weights[src] = alpha * similarity
            class_terms.append((weights * bce).sum() / num_queries)
            dice_terms.append(alpha * (class_prob * (1 - dice)).sum() / num_queries)
        return {"loss_pq_class": torch.stack(class_terms).mean(), "loss_pq_dice": torch.stack(dice_terms).mean()}

    def loss_mask_id(self, outputs: dict, targets: list[dict], indices: list, num_targets) -> dict[str, torch.Tensor]:
        """``loss_mask_id``: cross-entropy of the softmax over the queries at each pixel against the query matched
        to the pixel's target (MaX-DeepLab), averaged over the image's pixels of matched targets, then over the
        images. Void pixels and those of unmatched targets are ignored; where targets overlap, the one matched to
        the lowest query wins."""
        _require(outputs, targets, "masks")
        masks = outputs["masks"].float()
        size = masks.shape[-2:]
        terms = []
        for b, (target, (src, tgt)) in enumerate(zip(targets, indices, strict=True)):
            src, tgt = src.to(masks.device), tgt.to(masks.device)
            matched = sample_at_centres(target["masks"], size).to(masks.device)[tgt]  # (M, h, w)
            covered, first = _first_cover(matched)
            ids = torch.where(covered, src[first] if len(src) else first, -100)
            loss = F.cross_entropy(masks[b][None], ids[None], ignore_index=-100, reduction="sum")
            terms.append(loss / covered.sum().clamp(min=1))
        return {"loss_mask_id": torch.stack(terms).mean()}

    def loss_instance_discrimination(
        self, outputs: dict, targets: list[dict], indices: list, num_targets
    ) -> dict[str, torch.Tensor]:
        """``loss_instance_discrimination``: kMaX-DeepLab's pixel-wise contrastive loss (CMT-DeepLab Eq. 14).

        Per image, the L2-normalised ``pixel_embeddings`` ``f`` of a set ``A`` of non-void pixels are compared
        with each other: ``-1/|A| Σ_a 1/|P(a)| Σ_{p ∈ P(a)} log softmax_{b ∈ A}(f_a · f_b / τ)_p``, ``P(a)`` the
        pixels of ``A`` in ``a``'s segment (``a`` included). ``A`` is every non-void pixel when there are at most
        ``num_samples``, otherwise ``num_samples`` of them drawn without replacement with probability
        ``∝ area^-sample_temperature`` of their segment (``torch.multinomial``). Averaged over the images; an image
        without non-void pixels adds 0. Left out when the outputs have no ``pixel_embeddings``.

        ``outputs["mask_embeddings"]`` is not needed: contrasting pixels with the matched queries' mask
        embeddings is what ``loss_mask_id`` does, the mask logits being their dot products.
        """
        if "pixel_embeddings" not in outputs:
            return {}
        embeddings = outputs["pixel_embeddings"].float()
        size = embeddings.shape[-2:]
        terms = []
        for b, target in enumerate(targets):
            small = sample_at_centres(target["masks"], size).to(embeddings.device)  # (n, h, w)
            covered, segment = _first_cover(small)
            candidates = covered.flatten().nonzero().flatten()
            if candidates.numel() == 0:
                terms.append(embeddings[b].sum() * 0)
                continue
            segment = segment.flatten()
            if candidates.numel() > self.num_samples:
                area = small.flatten(1).sum(1).float()[segment[candidates]]
                chosen = torch.multinomial(area.pow(-self.sample_temperature), self.num_samples, replacement=False)
                candidates = candidates[chosen]
            features = F.normalize(embeddings[b].flatten(1)[:, candidates], dim=0)  # (E, K)
            similarity = features.T @ features / self.discrimination_temperature
            same = (segment[candidates][:, None] == segment[candidates][None, :]).float()
            target_distribution = same / same.sum(1, keepdim=True)
            terms.append(-(target_distribution * similarity.log_softmax(1)).sum(1).mean())
        return {"loss_instance_discrimination": torch.stack(terms).mean()}

    def loss_semantic(self, outputs: dict, targets: list[dict], indices: list, num_targets) -> dict[str, torch.Tensor]:
        """``loss_semantic``: cross-entropy of ``semantic_logits (B, C, h, w)`` against the semantic map (255
        ignored), averaged over the image's labelled pixels, then over the images. The map is the target's
        ``semantic`` or, when absent, rendered from its masks and labels. Left out without ``semantic_logits``."""
        if "semantic_logits" not in outputs:
            return {}
        logits = outputs["semantic_logits"].float()
        num_classes, size = logits.shape[1], logits.shape[-2:]
        terms = []
        for b, target in enumerate(targets):
            if "semantic" in target:
                semantic = sample_at_centres(target["semantic"], size).to(logits.device, torch.int64)
            else:
                covered, first = _first_cover(sample_at_centres(target["masks"], size).to(logits.device))
                labels = target["labels"].to(logits.device)
                semantic = torch.where(covered, labels[first] if len(labels) else first, IGNORE_INDEX)
            labelled = semantic != IGNORE_INDEX
            bad = labelled & ((semantic < 0) | (semantic >= num_classes))
            if bad.any():
                raise ValueError(
                    f"PanopticCriterion: image {b}: semantic map values {semantic[bad].unique()[:10].tolist()} are "
                    f"neither classes of the {num_classes}-class semantic head nor {IGNORE_INDEX} (void)"
                )
            loss = F.cross_entropy(logits[b][None], semantic[None], ignore_index=IGNORE_INDEX, reduction="sum")
            terms.append(loss / labelled.sum().clamp(min=1))
        return {"loss_semantic": torch.stack(terms).mean()}

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        return super().forward(outputs, self.prepare_targets(targets))


def panoptic_criterion(
    num_classes: int,
    thing_classes: Iterable[int],
    *,
    thing_weight: float = 5.0,
    stuff_weight: float = 3.0,
    aux_weight: float = 1.0,
    class_weight: float = 1.0,
    mask_weight: float = 1.0,
    dice_weight: float = 1.0,
    pq_weight: float = 3.0,
    mask_id_weight: float = 0.3,
    instance_discrimination_weight: float = 1.0,
    semantic_weight: float = 1.0,
    cost_class: float = 2.0,
    cost_mask: float = 5.0,
    cost_dice: float = 5.0,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    focal_alpha: float = -1.0,
    focal_gamma: float = 0.0,
    pq_alpha: float = 0.75,
    num_samples: int = 4096,
    sample_temperature: float = 1.5,
    discrimination_temperature: float = 0.3,
    losses: Iterable[str] = tuple(PANOPTIC_LOSS_TERMS),
) -> PanopticCriterion:
    """Panoptic segmentation (paper Eq. 7): ``λ_th = 5``, ``λ_st = 3``, ``λ_aux = 1``.

    ``L_th`` / ``L_st`` = ``class_weight`` x class BCE + ``mask_weight`` x mask BCE + ``dice_weight`` x dice of the
    things / stuff (each 1: the paper gives no weights inside them); ``L_aux`` = 3 PQ-style + 0.3 mask-ID CE + 1
    instance discrimination + 1 semantic (MaX-DeepLab's and kMaX-DeepLab's weights). The matcher uses
    Mask2Former's costs: focal class 2, point-sampled mask BCE 5 and dice 5.
    """
    matcher = HungarianMatcher(
        cost_class=cost_class, cost_bbox=0.0, cost_giou=0.0, cost_mask=cost_mask, cost_dice=cost_dice,
        num_points=num_points,
    )  # fmt: skip
    weights = {
        "loss_class_thing": thing_weight * class_weight,
        "loss_mask_thing": thing_weight * mask_weight,
        "loss_dice_thing": thing_weight * dice_weight,
        "loss_class_stuff": stuff_weight * class_weight,
        "loss_mask_stuff": stuff_weight * mask_weight,
        "loss_dice_stuff": stuff_weight * dice_weight,
        "loss_pq_class": aux_weight * pq_weight,
        "loss_pq_dice": aux_weight * pq_weight,
        "loss_mask_id": aux_weight * mask_id_weight,
        "loss_instance_discrimination": aux_weight * instance_discrimination_weight,
        "loss_semantic": aux_weight * semantic_weight,
    }
    return PanopticCriterion(
        num_classes,
        matcher,
        weights,
        thing_classes=thing_classes,
        losses=losses,
        focal_alpha=focal_alpha,
        focal_gamma=focal_gamma,
        num_points=num_points,
        oversample_ratio=oversample_ratio,
        importance_sample_ratio=importance_sample_ratio,
        pq_alpha=pq_alpha,
        num_samples=num_samples,
        sample_temperature=sample_temperature,
        discrimination_temperature=discrimination_temperature,
    )


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


class SemanticCriterion(SetCriterion):
    """Semantic segmentation with one query per class (DESIGN §2: cross-entropy 5 + dice 1):

    * ``loss_ce``: per-pixel cross-entropy of the mask logits read as class logits (softmax over the
      queries = classes), against the label map (255 ignored) sampled at the mask logits' pixel centres,
      averaged over the labelled pixels of the batch;
    * ``loss_dice``: dice of each present class's mask on importance-sampled points (as ``loss_mask``);
    * ``loss_class``: the class head's focal loss, one-hot at ``(c, c)`` for every class ``c`` present
      (it learns ``p_q(c)`` of the post-processing ``argmax_c sum_q p_q(c) m_q``).

    Targets: ``semantic (H, W)`` int64 with 255 ignored, ``labels`` (the classes present) and their
    ``masks (n, H, W)``, at the padded input size (``tasks.semantic.collate_semantic`` builds them).
    """

    loss_terms = {**LOSS_TERMS, "ce": ("loss_ce",), "dice": ("loss_dice",)}

    def loss_ce(self, outputs: dict, targets: list[dict], indices: list, num_targets) -> dict[str, torch.Tensor]:
        logits = outputs["masks"].float()  # (B, C, h, w)
        labels = torch.stack([sample_at_centres(t["semantic"], logits.shape[-2:]) for t in targets]).to(logits.device)
        loss = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX, reduction="sum")
        return {"loss_ce": loss / (labels != IGNORE_INDEX).sum().clamp(min=1)}

    def loss_dice(self, outputs: dict, targets: list[dict], indices: list, num_targets) -> dict[str, torch.Tensor]:
        logits, labels = self.sampled_masks(outputs, targets, indices)
        return {"loss_dice": dice_loss(logits, labels, num_targets)}


def semantic_criterion(
    num_classes: int,
    *,
    ce_weight: float = 5.0,
    dice_weight: float = 1.0,
    class_weight: float = 2.0,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> SemanticCriterion:
    """Semantic segmentation: pixel cross-entropy 5 + dice 1 (DESIGN §2) + class presence 2, one query per class."""
    weights = {"loss_ce": ce_weight, "loss_dice": dice_weight, "loss_class": class_weight}
    return SemanticCriterion(
        num_classes, ClassQueryMatcher(), weights, losses=("labels", "ce", "dice"), focal_alpha=focal_alpha,
        focal_gamma=focal_gamma, num_points=num_points, oversample_ratio=oversample_ratio,
        importance_sample_ratio=importance_sample_ratio,
    )  # fmt: skip
