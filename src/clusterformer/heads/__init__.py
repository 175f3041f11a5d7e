"""Task heads on the ClusterFormer encoder: the shared clustering decoder and the set-prediction heads."""

from .cmt import CMTDecoderLayer
from .decoder import (
    DECODER_LAYERS,
    PIXEL_PATHS,
    QUERY_INITS,
    QUERY_POSITIONS,
    ClusteringDecoder,
    ClusteringDecoderLayer,
    PixelDecoder,
    box_sine,
    cluster_boxes,
    sine_position,
)
from .kmax import KMaXDecoderLayer
from .postprocess import (
    detection_postprocess,
    instance_postprocess,
    panoptic_postprocess,
    resize_mask_logits,
    semantic_postprocess,
)
from .sets import MLP, ClusterFormerSets, SetPredictionHead, build_set_model, grid_boxes

DECODER_LAYERS["cmt"] = CMTDecoderLayer  # heads.cmt builds on heads.decoder: registered once both are loaded

__all__ = [
    "DECODER_LAYERS",
    "MLP",
    "PIXEL_PATHS",
    "QUERY_INITS",
    "QUERY_POSITIONS",
    "ClusterFormerSets",
    "ClusteringDecoder",
    "CMTDecoderLayer",
    "ClusteringDecoderLayer",
    "KMaXDecoderLayer",
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
