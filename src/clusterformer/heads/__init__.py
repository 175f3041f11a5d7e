"""Task heads on the ClusterFormer encoder: the shared clustering decoder and the set-prediction heads."""

from .decoder import QUERY_INITS, ClusteringDecoder, ClusteringDecoderLayer, PixelDecoder, sine_position
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
    "ClusterFormerSets",
    "ClusteringDecoder",
    "ClusteringDecoderLayer",
    "PixelDecoder",
    "SetPredictionHead",
    "build_set_model",
    "grid_boxes",
    "detection_postprocess",
    "instance_postprocess",
    "panoptic_postprocess",
    "resize_mask_logits",
    "semantic_postprocess",
    "sine_position",
]
