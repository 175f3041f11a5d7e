"""Set-prediction losses: the criteria of the detection, instance, semantic and panoptic heads."""

from .sets import (
    IGNORE_INDEX,
    LOSS_TERMS,
    PANOPTIC_LOSS_TERMS,
    ClassQueryMatcher,
    PanopticCriterion,
    SemanticCriterion,
    SetCriterion,
    detection_criterion,
    dice_loss,
    instance_criterion,
    panoptic_criterion,
    point_sample,
    sample_at_centres,
    semantic_criterion,
    sigmoid_ce_loss,
    uncertainty_points,
)

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
