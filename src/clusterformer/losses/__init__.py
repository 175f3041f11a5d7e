"""Set-prediction losses: the criteria of the detection, instance, semantic and panoptic heads.

* ``terms``: loss terms shared by the criteria (dice, sigmoid cross-entropy, uncertainty point sampling);
* ``sets``: ``SetCriterion``, the Hungarian-matched set loss, and its factories ``detection_criterion``,
  ``instance_criterion`` and ``joint_criterion`` (boxes and masks);
* ``panoptic``: ``PanopticCriterion`` (paper Eq. 7) and ``panoptic_criterion``;
* ``semantic``: ``SemanticCriterion`` (one query per class) and ``semantic_criterion``;
* ``settings``: the factories' keyword arguments as typed dataclasses (``SetLossSettings``,
  ``SemanticLossSettings``, ``PanopticLossSettings``, built from ``PointSampling`` and ``FocalSettings``).

The matchers are in ``matching`` (``HungarianMatcher``, ``ClassQueryMatcher``; the latter re-exported here as well).
"""

from .matching import ClassQueryMatcher
from .panoptic import PANOPTIC_LOSS_TERMS, PanopticCriterion, panoptic_criterion
from .semantic import SemanticCriterion, semantic_criterion
from .sets import LOSS_TERMS, SetCriterion, detection_criterion, instance_criterion, joint_criterion
from .settings import FocalSettings, PanopticLossSettings, PointSampling, SemanticLossSettings, SetLossSettings
from .terms import IGNORE_INDEX, dice_loss, point_sample, sample_at_centres, sigmoid_ce_loss, uncertainty_points

__all__ = [
    "ClassQueryMatcher",
    "FocalSettings",
    "IGNORE_INDEX",
    "LOSS_TERMS",
    "PANOPTIC_LOSS_TERMS",
    "PanopticCriterion",
    "PanopticLossSettings",
    "PointSampling",
    "SemanticCriterion",
    "SemanticLossSettings",
    "SetCriterion",
    "SetLossSettings",
    "detection_criterion",
    "dice_loss",
    "instance_criterion",
    "joint_criterion",
    "panoptic_criterion",
    "point_sample",
    "sample_at_centres",
    "semantic_criterion",
    "sigmoid_ce_loss",
    "uncertainty_points",
]
