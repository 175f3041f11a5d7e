"""Panoptic segmentation losses (paper §4.1.5, Eq. 7; MaX-DeepLab / kMaX-DeepLab).

``PanopticCriterion`` (``panoptic_criterion``) is ClusterFormer's panoptic loss (paper Eq. 7,
``5 L_th + 3 L_st + 1 L_aux``; decisions in ``docs/panoptic_losses.md``):

* ``L_th`` / ``L_st``: the set loss of ``SetCriterion`` (``losses.sets``) with a plain sigmoid binary
  cross-entropy class loss, split between things and stuff: ``loss_class_thing`` / ``loss_class_stuff`` (the
  class loss of every query on the thing / stuff columns of the class head), ``loss_mask_thing``,
  ``loss_dice_thing`` / ``loss_mask_stuff``, ``loss_dice_stuff`` (point-sampled BCE and dice of the matched
  thing / stuff targets);
* ``L_aux``, MaX-DeepLab's and kMaX-DeepLab's auxiliary losses: ``loss_pq_class`` and ``loss_pq_dice`` (the
  PQ-style loss, 3), ``loss_mask_id`` (softmax over the queries at each pixel, 0.3),
  ``loss_instance_discrimination`` (pixel-wise contrastive loss on ``outputs["pixel_embeddings"]``, 1) and
  ``loss_semantic`` (cross-entropy of ``outputs["semantic_logits"]``, 1); the last two are left out when the
  outputs lack their input.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from .matching import HungarianMatcher
from .sets import SetCriterion, _matched_query_index, _matched_targets, _require
from .terms import IGNORE_INDEX, dice_loss, sample_at_centres, sigmoid_ce_loss

__all__ = ["PANOPTIC_LOSS_TERMS", "PanopticCriterion", "panoptic_criterion"]

# loss name -> the terms it produces, for ``PanopticCriterion``
PANOPTIC_LOSS_TERMS = {
    "labels": ("loss_class_thing", "loss_class_stuff"),
    "masks": ("loss_mask_thing", "loss_dice_thing", "loss_mask_stuff", "loss_dice_stuff"),
    "pq": ("loss_pq_class", "loss_pq_dice"),
    "mask_id": ("loss_mask_id",),
    "instance_discrimination": ("loss_instance_discrimination",),
    "semantic": ("loss_semantic",),
    "points": ("loss_points",),  # CMT-DeepLab's reference points (decoder kind "cmt"), when the outputs have them
}
_PER_SEGMENT_KEYS = ("labels", "masks", "isthing", "iscrowd", "segment_ids", "area", "boxes")
DICE_EPS = 1e-5  # of the (unsmoothed) dice similarity that weights the PQ-style class term, as deeplab2


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
    points_weight: float = 1.0,
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
        "loss_points": points_weight,
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
