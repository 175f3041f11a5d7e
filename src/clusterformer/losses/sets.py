"""The Hungarian-matched set loss of the detection and instance heads (DETR / Deformable DETR / Mask2Former).

``SetCriterion`` matches the queries to the targets with a ``HungarianMatcher`` and returns named loss
terms, each already divided by the number of targets in the batch (averaged over the distributed
processes, at least 1):

* ``loss_class``: sigmoid focal loss over all ``Q x C`` query-class pairs, one-hot targets at the matched
  queries (unmatched queries are pushed to background on every class);
* ``loss_bbox`` (L1 on ``cxcywh``) and ``loss_giou`` (``1 - GIoU`` on ``xyxy``) on matched pairs;
* ``loss_mask`` (sigmoid cross-entropy) and ``loss_dice`` on ``num_points`` points per matched mask, chosen
  by Mask2Former's uncertainty-based importance sampling.

The same terms are computed on every auxiliary decoder layer, suffixed ``_0``, ``_1``, ...; those of the
denoising queries (``heads.denoising``), when the outputs have them, are suffixed ``_dn`` (and ``_dn_0``, ...), and
the class (and box) terms of query selection's proposals ``_enc``. All losses are computed in float32 with autocast
off.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from .cmt import mask_approximation_loss
from .matching import HungarianMatcher, point_sample
from .terms import dice_loss, sigmoid_ce_loss, uncertainty_points

__all__ = ["LOSS_TERMS", "SetCriterion", "detection_criterion", "instance_criterion", "joint_criterion"]

# loss name (as passed in ``losses``) -> the terms it produces
LOSS_TERMS = {
    "labels": ("loss_class",),
    "boxes": ("loss_bbox", "loss_giou"),
    "masks": ("loss_mask", "loss_dice"),
    "points": ("loss_points",),
}
_LAYER_SUFFIX = re.compile(r"_\d+$")
GIOU_EPS = 1e-10


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

    def loss_points(self, outputs: dict, targets: list[dict], indices: list, num_targets) -> dict[str, torch.Tensor]:
        """``loss_points``: CMT-DeepLab's mask-approximation loss (its Eq. 13, ``losses.cmt``) between the reference
        points of the matched queries, ``outputs["points"] (B, Q, M, 2)``, and their target masks: the mean over the
        matched pairs, as the paper. Nothing for outputs without reference points (every decoder but CMT's)."""
        if "points" not in outputs:
            return {}
        points = outputs["points"]
        images, queries = _matched_query_index(indices, points.device)
        masks = _matched_targets(targets, indices, "masks", points.device)
        return {"loss_points": mask_approximation_loss(points[images, queries].float(), masks.bool())}

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

    def denoising_losses(self, outputs: dict, targets: list[dict], num_targets) -> dict[str, torch.Tensor]:
        """The ``labels`` / ``boxes`` / ``masks`` terms of the denoising queries (``outputs["dn"]``, every layer),
        each query paired with the target it was made from (``outputs["dn_indices"]``; the padding queries are
        background), named ``<term>_dn`` and ``<term>_dn_<i>``; divided by the number of (query, target) pairs,
        so that they weigh as the matching queries' terms whatever the number of groups."""
        indices = outputs["dn_indices"]
        pairs = sum(len(query) for query, _ in indices)
        groups = pairs / max(1, sum(len(t["labels"]) for t in targets))
        norm = num_targets * max(1.0, groups)
        names = [name for name in self.losses if name in LOSS_TERMS]
        dn = outputs["dn"]
        losses = {}
        for suffix, layer in [("", dn), *((f"_{i}", aux) for i, aux in enumerate(dn.get("aux", ())))]:
            for name in names:
                terms = getattr(self, f"loss_{name}")(layer, targets, indices, norm)
                losses.update({f"{key}_dn{suffix}": value for key, value in terms.items()})
        return losses

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        device = outputs["logits"].device
        num_targets = self.num_targets(targets, device)
        with torch.autocast(device.type, enabled=False):
            losses = self.layer_losses(outputs, targets, num_targets)
            for i, aux in enumerate(outputs.get("aux", ())):
                losses.update({f"{k}_{i}": v for k, v in self.layer_losses(aux, targets, num_targets).items()})
            if "dn" in outputs:
                losses.update(self.denoising_losses(outputs, targets, num_targets))
            if "proposals" in outputs:  # query selection's scores of the encoder centers, matched as a layer
                proposals = outputs["proposals"]
                wanted = ("labels", "boxes") if "boxes" in proposals else ("labels",)
                names = [name for name in wanted if name in self.losses]
                indices = self.matcher(proposals, targets)
                for name in names:
                    terms = getattr(self, f"loss_{name}")(proposals, targets, indices, num_targets)
                    losses.update({f"{key}_enc": value for key, value in terms.items()})
        return losses

    def weighted_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """``sum(weight_dict[name without the _i suffix] * value)`` over all terms of ``losses``."""
        total = None
        for name, value in losses.items():
            # the denoising and proposal terms weigh as the matching queries' ones
            base = _LAYER_SUFFIX.sub("", name).removesuffix("_dn").removesuffix("_enc")
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


def _matched_criterion(
    num_classes: int,
    losses: tuple[str, ...],
    class_weight: float,
    bbox_weight: float = 0.0,
    giou_weight: float = 0.0,
    mask_weight: float = 0.0,
    dice_weight: float = 0.0,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    points_weight: float = 1.0,
) -> SetCriterion:
    """A ``SetCriterion`` on ``losses`` whose weights are also the matcher's costs (a term left out costs 0); a mask
    criterion also has ``loss_points`` (CMT-DeepLab's reference points, when the outputs have them), not a cost."""
    boxes, masks = "boxes" in losses, "masks" in losses
    matcher = HungarianMatcher(
        cost_class=class_weight,
        cost_bbox=bbox_weight if boxes else 0.0,
        cost_giou=giou_weight if boxes else 0.0,
        cost_mask=mask_weight if masks else 0.0,
        cost_dice=dice_weight if masks else 0.0,
        num_points=num_points,
        focal_alpha=focal_alpha,
        focal_gamma=focal_gamma,
    )
    weights = {"loss_class": class_weight}
    if boxes:
        weights |= {"loss_bbox": bbox_weight, "loss_giou": giou_weight}
    if masks:
        weights |= {"loss_mask": mask_weight, "loss_dice": dice_weight, "loss_points": points_weight}
        losses = (*losses, "points")
    return SetCriterion(
        num_classes, matcher, weights, losses=losses, focal_alpha=focal_alpha, focal_gamma=focal_gamma,
        num_points=num_points, oversample_ratio=oversample_ratio, importance_sample_ratio=importance_sample_ratio,
    )  # fmt: skip


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
    return _matched_criterion(
        num_classes, ("labels", "boxes"), class_weight, bbox_weight=bbox_weight, giou_weight=giou_weight,
        focal_alpha=focal_alpha, focal_gamma=focal_gamma,
    )  # fmt: skip


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
    points_weight: float = 1.0,
) -> SetCriterion:
    """Instance segmentation: focal class 2, point-sampled BCE 5 and dice 5 (Mask2Former); the matcher uses
    the same weights as costs on ``num_points`` uniform points."""
    return _matched_criterion(
        num_classes, ("labels", "masks"), class_weight, mask_weight=mask_weight, dice_weight=dice_weight,
        num_points=num_points, oversample_ratio=oversample_ratio, importance_sample_ratio=importance_sample_ratio,
        focal_alpha=focal_alpha, focal_gamma=focal_gamma, points_weight=points_weight,
    )  # fmt: skip


def joint_criterion(
    num_classes: int,
    *,
    class_weight: float = 2.0,
    bbox_weight: float = 5.0,
    giou_weight: float = 2.0,
    mask_weight: float = 5.0,
    dice_weight: float = 5.0,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    points_weight: float = 1.0,
) -> SetCriterion:
    """Boxes and masks together (an instance model that also regresses boxes): the detection and instance
    weights, used as losses and as matching costs."""
    return _matched_criterion(
        num_classes, ("labels", "boxes", "masks"), class_weight, bbox_weight, giou_weight, mask_weight, dice_weight,
        num_points, oversample_ratio, importance_sample_ratio, focal_alpha, focal_gamma, points_weight,
    )  # fmt: skip
