"""Task heads on the ClusterFormer encoder: the shared clustering decoder and the set-prediction heads."""

from .decoder import (
    QUERY_INITS,
    QUERY_POSITIONS,
    ClusteringDecoder,
    ClusteringDecoderLayer,
    PixelDecoder,
    box_sine,
    cluster_boxes,
    sine_position,
)
from .postprocess import (
    detection_postprocess,
    instance_postprocess,
    panoptic_postprocess,
    resize_mask_logits,
    semantic_postprocess,
)
from .sets import MLP, ClusterFormerSets, SetPredictionHead, build_set_model, grid_boxes

__all__ = [
    "MLP",
    "QUERY_INITS",
    "QUERY_POSITIONS",
    "ClusterFormerSets",
    "ClusteringDecoder",
    "ClusteringDecoderLayer",
    "PixelDecoder",
    "SetPredictionHead",
    "box_sine",
    "build_set_model",
    "cluster_boxes",
    "grid_boxes",
    "detection_postprocess",
    "instance_postprocess",
    "panoptic_postprocess",
    "resize_mask_logits",
    "semantic_postprocess",
    "sine_position",
]
