"""Semantic segmentation loss with one decoder query per class (paper §4.1.3: cross-entropy 5 + dice 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .matching import ClassQueryMatcher
from .sets import LOSS_TERMS, SetCriterion
from .terms import IGNORE_INDEX, dice_loss, sample_at_centres

__all__ = ["SemanticCriterion", "semantic_criterion"]


class SemanticCriterion(SetCriterion):
    """Semantic segmentation with one query per class (paper §4.1.3: cross-entropy 5 + dice 1):

    * ``loss_ce``: per-pixel cross-entropy of the mask logits read as class logits (softmax over the
      queries = classes), against the label map (255 ignored) sampled at the mask logits' pixel centres,
      averaged over the labelled pixels of the batch;
    * ``loss_dice``: dice of each present class's mask on importance-sampled points (as ``loss_mask``);
    * ``loss_class``: the class head's focal loss, one-hot at ``(c, c)`` for every class ``c`` present
      (it learns ``p_q(c)`` of the post-processing ``argmax_c sum_q p_q(c) m_q``).

    Targets: ``semantic (H, W)`` int64 with 255 ignored, ``labels`` (the classes present) and their
    ``masks (n, H, W)``, at the padded input size (``data.collate.collate_semantic`` builds them).
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
    """Semantic segmentation: pixel cross-entropy 5 + dice 1 + class presence 2, one query per class."""
    weights = {"loss_ce": ce_weight, "loss_dice": dice_weight, "loss_class": class_weight}
    return SemanticCriterion(
        num_classes, ClassQueryMatcher(), weights, losses=("labels", "ce", "dice"), focal_alpha=focal_alpha,
        focal_gamma=focal_gamma, num_points=num_points, oversample_ratio=oversample_ratio,
        importance_sample_ratio=importance_sample_ratio,
    )  # fmt: skip
