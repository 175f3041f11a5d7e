"""Building blocks of ClusterFormer. Depends on torch only."""

from .clustering import CENTER_UPDATES, M_STEPS, CenterInit, RecurrentClustering, assignment_maps, is_tracing
from .dispatching import DISPATCHES, FeatureDispatch

__all__ = [
    "CENTER_UPDATES",
    "DISPATCHES",
    "M_STEPS",
    "CenterInit",
    "FeatureDispatch",
    "RecurrentClustering",
    "assignment_maps",
    "is_tracing",
]
