"""Building blocks of ClusterFormer. Depends on torch only."""

from .clustering import CENTER_UPDATES, M_STEPS, CenterInit, RecurrentClustering, assignment_maps, is_tracing
from .comparators import ContextClusterUpdate, CrissCrossUpdate, CrossAttentionUpdate
from .dispatching import DISPATCHES, FeatureDispatch
from .fused import set_fused

__all__ = [
    "CENTER_UPDATES",
    "DISPATCHES",
    "M_STEPS",
    "CenterInit",
    "ContextClusterUpdate",
    "CrissCrossUpdate",
    "CrossAttentionUpdate",
    "FeatureDispatch",
    "RecurrentClustering",
    "assignment_maps",
    "is_tracing",
    "set_fused",
]
