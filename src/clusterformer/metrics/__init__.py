"""Metrics that equal the reference tools: COCO detection and instance segmentation (pycocotools)."""

from .coco import ResultsError, coco_evaluate, to_coco_results

__all__ = ["ResultsError", "coco_evaluate", "to_coco_results"]
