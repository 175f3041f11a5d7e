"""The criteria's options as typed settings: frozen dataclasses whose fields are the keyword arguments of the
criterion factories, with the same defaults.

* ``PointSampling``: the points of the mask losses (``uncertainty_points``) and of the matcher's mask costs;
* ``FocalSettings``: the sigmoid focal class loss (and the matcher's focal class cost);
* ``SetLossSettings``: ``detection_criterion``, ``instance_criterion`` and ``joint_criterion`` (each takes the
  fields of its losses: boxes, masks or both);
* ``SemanticLossSettings``: ``semantic_criterion``; ``PanopticLossSettings``: ``panoptic_criterion``.

The tasks take them as their ``loss`` option, so that a config's keys and value types are checked by LightningCLI
(a misspelled key is an error that names it); ``dataclasses.asdict`` gives the factory's keyword arguments back.
"""

from __future__ import annotations

from dataclasses import dataclass

from .panoptic import PANOPTIC_LOSS_TERMS

__all__ = ["FocalSettings", "PanopticLossSettings", "PointSampling", "SemanticLossSettings", "SetLossSettings"]


@dataclass(frozen=True)
class PointSampling:
    """Points of the mask losses and mask matching costs (Mask2Former).

    Args:
        num_points: points per mask for the losses (importance-sampled) and per image for the matching costs
            (uniform).
        oversample_ratio: the loss draws ``oversample_ratio * num_points`` uniform candidates per mask...
        importance_sample_ratio: ...and keeps the ``importance_sample_ratio * num_points`` most uncertain ones.
    """

    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75


@dataclass(frozen=True)
class FocalSettings:
    """The sigmoid focal class loss ``alpha (1 - p)^gamma`` (and the matcher's focal class cost).

    Args:
        focal_alpha: weight of the positives (``1 - focal_alpha`` of the negatives).
        focal_gamma: focusing exponent.
    """

    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


@dataclass(frozen=True)
class SetLossSettings(FocalSettings, PointSampling):
    """Options of the detection / instance criteria (``detection_criterion``, ``instance_criterion``,
    ``joint_criterion``): the weights, used as loss weights and matching costs, point sampling and focal loss.
    The box weights apply to models with boxes, the mask weights and point sampling to models with masks.

    Args:
        class_weight: focal class loss.
        bbox_weight: L1 box loss.
        giou_weight: GIoU box loss.
        mask_weight: point-sampled mask cross-entropy.
        dice_weight: point-sampled dice loss.
        points_weight: CMT-DeepLab's mask-approximation loss of the reference points (``decoder.kind: cmt``).
    """

    class_weight: float = 2.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    points_weight: float = 1.0


@dataclass(frozen=True)
class SemanticLossSettings(FocalSettings, PointSampling):
    """Options of ``semantic_criterion``.

    Args:
        ce_weight: per-pixel cross-entropy.
        dice_weight: point-sampled dice loss of each present class.
        class_weight: focal class-presence loss.
    """

    ce_weight: float = 5.0
    dice_weight: float = 1.0
    class_weight: float = 2.0


@dataclass(frozen=True)
class PanopticLossSettings(FocalSettings, PointSampling):
    """Options of ``panoptic_criterion`` (paper Eq. 7, ``λ_th L_th + λ_st L_st + λ_aux L_aux``); the class loss
    is the plain binary cross-entropy by default (``focal_alpha=-1``, ``focal_gamma=0``).

    Args:
        thing_weight: ``λ_th``.
        stuff_weight: ``λ_st``.
        aux_weight: ``λ_aux``.
        class_weight: class loss within ``L_th`` and ``L_st``.
        mask_weight: point-sampled mask cross-entropy within ``L_th`` and ``L_st``.
        dice_weight: point-sampled dice within ``L_th`` and ``L_st``.
        pq_weight: PQ-style loss within ``L_aux``.
        mask_id_weight: mask-ID cross-entropy within ``L_aux``.
        instance_discrimination_weight: pixel-wise contrastive loss within ``L_aux``.
        semantic_weight: semantic cross-entropy within ``L_aux``.
        cost_class: matching cost of the focal class cost.
        cost_mask: matching cost of the point-sampled mask cross-entropy.
        cost_dice: matching cost of the point-sampled dice.
        pq_alpha: weight of the matched part of the PQ-style loss.
        num_samples: pixels sampled per image for the instance discrimination loss.
        sample_temperature: pixels are sampled with probability ``∝ area^-sample_temperature`` of their segment.
        discrimination_temperature: temperature of the contrastive softmax.
        points_weight: CMT-DeepLab's mask-approximation loss of the reference points (``decoder.kind: cmt``).
        losses: which losses to compute (``PANOPTIC_LOSS_TERMS``).
    """

    focal_alpha: float = -1.0
    focal_gamma: float = 0.0
    thing_weight: float = 5.0
    stuff_weight: float = 3.0
    aux_weight: float = 1.0
    class_weight: float = 1.0
    mask_weight: float = 1.0
    dice_weight: float = 1.0
    pq_weight: float = 3.0
    mask_id_weight: float = 0.3
    instance_discrimination_weight: float = 1.0
    semantic_weight: float = 1.0
    cost_class: float = 2.0
    cost_mask: float = 5.0
    cost_dice: float = 5.0
    pq_alpha: float = 0.75
    num_samples: int = 4096
    sample_temperature: float = 1.5
    discrimination_temperature: float = 0.3
    points_weight: float = 1.0
    losses: tuple[str, ...] = tuple(PANOPTIC_LOSS_TERMS)
