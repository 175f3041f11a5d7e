"""COCO detection and instance-segmentation metrics: pycocotools' ``COCOeval``, behind checked inputs.

The numbers are pycocotools' own (``COCOeval.stats``); this module only checks the inputs, so that a bad
results file gives an error naming the file and the entry instead of an ``AssertionError`` or a
``KeyError`` from inside pycocotools, and handles the two cases pycocotools does not:

* **No results at all.** ``COCO.loadRes`` fails on an empty list (it reads ``anns[0]``), so the results
  object is built directly, with no annotations, and ``COCOeval`` runs as usual: every area range
  with ground truth gets AP and AR 0, and those without keep pycocotools' -1.
* **Mask results that also carry boxes.** ``loadRes`` then takes the *box* area as the area of each
  segmentation result, which moves results between the small / medium / large ranges. For
  ``iou_type="segm"`` the boxes are dropped first, so that the areas are the mask areas (as
  detectron2's COCO evaluator does); results without boxes are evaluated exactly as pycocotools would.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import numbers
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_convert

from ..data.coco import check_evaluation_fields as _check_ground_truth
from ..data.coco import coco_ground_truth as _load_ground_truth
from ..data.coco import read_coco
from ..data.masks import encode_rles
from .distributed import gather_objects

IOU_TYPES = ("bbox", "segm")
# names of COCOeval.stats[0:12], in its order
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
RESULT_KEYS = {"bbox": ("image_id", "category_id", "score", "bbox"),
               "segm": ("image_id", "category_id", "score", "segmentation")}  # fmt: skip
MAX_NAMED = 10  # at most this many offending ids are listed in an error


class ResultsError(ValueError):
    """A problem in a results file (or list); the message names it and the offending entry."""


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _listed(ids: set[str]) -> str:
    ids = sorted(ids)
    more = f" and {len(ids) - MAX_NAMED} more" if len(ids) > MAX_NAMED else ""
    return ", ".join(ids[:MAX_NAMED]) + more


def _load_results(results: str | Path | list) -> tuple[str, list]:
    """``(name, results)``, the list read from a results JSON file or given directly."""
    if isinstance(results, str | Path):
        path = Path(results)
        if not path.is_file():
            raise ResultsError(f"{path}: results file not found")
        try:
            results = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ResultsError(f"{path}: not valid JSON ({error})") from error
        name = str(path)
    else:
        name = "results (list)"
    if not isinstance(results, list):
        raise ResultsError(
            f"{name}: expected a JSON list of results (objects with image_id, category_id, score and bbox or "
            f"segmentation), got {type(results).__name__}"
        )
    return name, results


def _check_results(name: str, results: list, gt: dict, iou_type: str) -> None:
    """Every result is an object with the keys of ``iou_type``, valid values, and known image and category
    ids (pycocotools would assert on unknown images and silently skip unknown categories)."""
    images = {image["id"]: image for image in gt["images"]}
    categories = {c["id"] for c in gt["categories"]}
    unknown_images, unknown_categories = set(), set()
    for index, result in enumerate(results):
        where = f"{name}: result {index}"
        if not isinstance(result, dict):
            raise ResultsError(f"{where} is not an object: {str(result)[:200]}")
        missing = [key for key in RESULT_KEYS[iou_type] if key not in result]
        if missing:
            raise ResultsError(f"{where} lacks {missing} (needed for '{iou_type}' evaluation): {str(result)[:200]}")
        if not _is_number(result["score"]):
            raise ResultsError(f"{where} has score {result['score']!r}, not a finite number")
        image = images.get(result["image_id"]) if _hashable(result["image_id"]) else None
        if image is None:
            unknown_images.add(repr(result["image_id"]))
            continue
        if not _hashable(result["category_id"]) or result["category_id"] not in categories:
            unknown_categories.add(repr(result["category_id"]))
        if iou_type == "bbox":
            bbox = result["bbox"]
            if not (isinstance(bbox, list | tuple) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                raise ResultsError(f"{where} has bbox {str(bbox)[:200]}, not 4 finite numbers [x, y, width, height]")
            if bbox[2] < 0 or bbox[3] < 0:
                raise ResultsError(f"{where} has bbox {list(bbox)} with a negative width or height")
        else:
            rle = result["segmentation"]
            if not (
                isinstance(rle, dict)
                and isinstance(rle.get("counts"), str | bytes)
                and isinstance(rle.get("size"), list | tuple)
            ):
                raise ResultsError(
                    f"{where} has segmentation {str(rle)[:100]}, not a compressed RLE {{'size': [h, w], 'counts': str}}"
                )
            if list(rle["size"]) != [image["height"], image["width"]]:
                raise ResultsError(
                    f"{where} has a mask of size {rle['size']} for image {image['id']} of size "
                    f"{[image['height'], image['width']]} (height, width)"
                )
    if unknown_images:
        raise ResultsError(f"{name}: image_id {_listed(unknown_images)} not in the ground-truth images")
    if unknown_categories:
        raise ResultsError(
            f"{name}: category_id {_listed(unknown_categories)} not in the categories {sorted(categories)}"
        )


def run_cocoeval(
    gt: str | Path | dict,
    results: str | Path | list,
    iou_type: str,
    verbose: bool = False,
    progress: bool = False,
):
    """pycocotools' ``COCOeval`` of ``results`` against ``gt``, evaluated, accumulated and summarised: its
    ``stats`` are :func:`coco_evaluate`'s numbers, its ``eval["precision"]`` the precision-recall curves
    (:func:`per_class_ap`, :func:`precision_recall_curves`). Arguments and errors as :func:`coco_evaluate`;
    ``progress``: a progress bar (tqdm, on standard error) over the (image, category) pairs that pycocotools
    matches, then its accumulation."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from tqdm import tqdm

    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    gt_name, gt_data = _load_ground_truth(gt)
    _check_ground_truth(gt_name, gt_data, iou_type)
    results_name, results = _load_results(results)
    _check_results(results_name, results, gt_data, iou_type)

    # pycocotools writes into both (ids, areas, RLEs): work on copies of what the caller passed in
    if isinstance(gt, dict):
        gt_data = copy.deepcopy(gt_data)
    results = copy.deepcopy(results)
    if iou_type == "segm":  # mask areas, not box areas, for the area ranges (see the module docstring)
        for result in results:
            result.pop("bbox", None)
    # pycocotools prints its steps ("Loading and preparing results...", "DONE (t=0.01s).") and the summary table
    # on standard output, where `clusterformer evaluate` prints its JSON
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_gt = COCO()
        coco_gt.dataset = gt_data
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes fails on an empty list
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(gt_data["images"]),
                "categories": gt_data["categories"],
                "annotations": [],
            }
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        params = evaluator.params
        pairs = len(set(params.imgIds)) * len(set(params.catIds))
        # evaluate() calls computeIoU once per (image, category) and evaluateImg once per (image, category, area)
        bar = tqdm(total=pairs * (1 + len(params.areaRng)), desc=f"COCO {iou_type}", unit="pair", leave=False,
                   disable=not progress, file=sys.stderr)  # fmt: skip
        for name in ("computeIoU", "evaluateImg"):
            setattr(evaluator, name, _ticking(getattr(evaluator, name), bar))
        try:
            evaluator.evaluate()
            bar.set_description(f"COCO {iou_type} accumulate")
            evaluator.accumulate()
        finally:
            bar.close()
        evaluator.summarize()
    return evaluator


def _ticking(method, bar):
    def ticked(*args, **kwargs):
        result = method(*args, **kwargs)
        bar.update()
        return result

    return ticked


def coco_evaluate(
    gt: str | Path | dict, results: str | Path | list, iou_type: str, verbose: bool = False, progress: bool = False
) -> dict[str, float]:
    """COCO AP and AR of ``results`` against ``gt``, computed by pycocotools' ``COCOeval``.

    Args:
        gt: COCO instances JSON file, or its content as a dict.
        results: COCO results JSON file, or its content: a list of dicts with ``image_id``,
            ``category_id``, ``score`` and ``bbox`` ``[x, y, w, h]`` (``iou_type="bbox"``) or
            ``segmentation`` (compressed RLE, ``iou_type="segm"``). Not modified.
        iou_type: ``"bbox"`` or ``"segm"``.
        verbose: let pycocotools print its progress and summary table.
        progress: a progress bar on standard error (see :func:`run_cocoeval`).

    Returns:
        ``AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl``: ``COCOeval.stats`` in that
        order, as floats in [0, 1], or -1 where pycocotools gives -1 (no ground truth in that area range).

    Raises:
        AnnotationError: a bad ground-truth file. ResultsError: a bad results file or entry.
        Both are ``ValueError``s whose message names the file and the problem.
    """
    return stats_of(run_cocoeval(gt, results, iou_type, verbose=verbose, progress=progress))


def stats_of(evaluator) -> dict[str, float]:
    """``COCOeval.stats`` by name (:data:`METRIC_NAMES`), as floats."""
    return {name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats, strict=True)}


# the IoU thresholds of the per-class figures: COCOeval's params.iouThrs are 0.50, 0.55, ..., 0.95
PER_CLASS_IOUS = {"AP": None, "AP50": 0.5, "AP75": 0.75}


def _precision(evaluator) -> tuple[object, np.ndarray]:
    """``(params, precision (T, R, K))``: pycocotools' precision at area range "all" and the largest maxDets
    (100), the slice that its AP, AP50 and AP75 average."""
    if not getattr(evaluator, "eval", None):
        raise ValueError("the COCOeval has not been accumulated: run evaluate() and accumulate() first")
    params = evaluator.eval["params"]
    area = [tuple(a) for a in params.areaRng].index(tuple(params.areaRng[params.areaRngLbl.index("all")]))
    return params, evaluator.eval["precision"][:, :, :, area, len(params.maxDets) - 1]


def _iou_rows(params, threshold: float | None) -> np.ndarray:
    """The rows of ``params.iouThrs`` for one threshold (``None``: all, 0.5:0.95)."""
    if threshold is None:
        return np.arange(len(params.iouThrs))
    return np.where(np.isclose(params.iouThrs, threshold))[0]


def per_class_ap(evaluator) -> dict[int, dict[str, float]]:
    """``{category_id: {"AP", "AP50", "AP75"}}`` from an accumulated ``COCOeval``, as pycocotools' summary
    computes AP but for one category: the mean of ``eval["precision"]`` over the recall thresholds (and, for
    ``AP``, the IoU thresholds 0.5:0.95) at area "all" and 100 detections, entries of -1 left out; -1 for a
    category without ground truth (all its entries are -1). The mean over the categories that are not -1 is
    pycocotools' AP, AP50 and AP75."""
    params, precision = _precision(evaluator)
    values = {}
    for k, category in enumerate(params.catIds):
        values[int(category)] = {}
        for name, threshold in PER_CLASS_IOUS.items():
            entries = precision[_iou_rows(params, threshold), :, k]
            entries = entries[entries > -1]
            values[int(category)][name] = float(np.mean(entries)) if entries.size else -1.0
    return values


def precision_recall_curves(evaluator) -> dict:
    """The precision-recall curves of an accumulated ``COCOeval`` (area "all", 100 detections):
    ``{"recall": (R,) recall thresholds (0, 0.01, ..., 1), "precision": {"AP50" | "AP75" | "AP":
    {category_id: (R,) precision or None}}, "mean": {"AP50" | "AP75" | "AP": (R,) or None}}``. A category's
    ``AP`` curve is its precision averaged over the IoU thresholds 0.5:0.95; ``None`` where the category has
    no ground truth; ``mean`` averages the curves of the categories that have one (its mean over recall is
    pycocotools' AP, AP50, AP75)."""
    params, precision = _precision(evaluator)
    curves, mean = {}, {}
    for name, threshold in PER_CLASS_IOUS.items():
        rows = precision[_iou_rows(params, threshold)]  # (t, R, K)
        valid = (rows > -1).all(axis=(0, 1))
        per_category = rows.mean(axis=0)  # (R, K)
        curves[name] = {
            int(category): per_category[:, k] if valid[k] else None for k, category in enumerate(params.catIds)
        }
        mean[name] = per_category[:, valid].mean(axis=1) if valid.any() else None
    return {"recall": np.asarray(params.recThrs, dtype=np.float64), "precision": curves, "mean": mean}


def to_coco_results(
    image_id: int,
    boxes_xyxy: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor | None = None,
    label_to_category: Sequence[int] | Mapping[int, int] | None = None,
) -> list[dict]:
    """One image's predictions as COCO result dicts, ready for :func:`coco_evaluate` or ``json.dump``.

    Args:
        image_id: the image's id in the COCO ground truth.
        boxes_xyxy: ``(N, 4)`` boxes, XYXY in absolute pixels.
        scores: ``(N,)`` confidences.
        labels: ``(N,)`` contiguous labels ``0..C-1``.
        masks: optional ``(N, H, W)`` boolean masks (``H, W`` the image's size in the ground truth).
        label_to_category: the COCO category id of each label, as a list (indexed by label) or a dict;
            ``None``: the labels are the category ids.

    Returns:
        ``N`` dicts: ``image_id``, ``category_id`` (int), ``score`` (float), ``bbox`` ``[x, y, w, h]``
        (floats) and, with ``masks``, ``segmentation``: compressed RLE ``{"size": [H, W], "counts": str}``.
    """
    n = len(scores)
    masks_ok = masks is None or (masks.ndim == 3 and len(masks) == n)
    if boxes_xyxy.shape != (n, 4) or labels.shape != (n,) or not masks_ok:
        raise ValueError(
            f"expected boxes (N, 4), scores (N,), labels (N,), masks (N, H, W); got {tuple(boxes_xyxy.shape)}, "
            f"{tuple(scores.shape)}, {tuple(labels.shape)}, {None if masks is None else tuple(masks.shape)}"
        )
    if n == 0:
        return []
    if label_to_category is None:
        categories = [int(label) for label in labels.tolist()]
    else:
        lookup = label_to_category if isinstance(label_to_category, Mapping) else dict(enumerate(label_to_category))
        unmapped = sorted(set(labels.tolist()) - set(lookup))
        if unmapped:
            raise ValueError(f"labels {unmapped} have no category in label_to_category (keys {sorted(lookup)})")
        categories = [int(lookup[label]) for label in labels.tolist()]
    boxes_xywh = box_convert(boxes_xyxy.detach().to("cpu", torch.float64), "xyxy", "xywh").tolist()
    results = [
        {"image_id": int(image_id), "category_id": category, "score": float(score), "bbox": box}
        for category, score, box in zip(categories, scores.tolist(), boxes_xywh, strict=True)
    ]
    if masks is not None:
        for result, rle in zip(results, encode_rles(masks), strict=True):
            result["segmentation"] = rle
    return results


class CocoEvaluator:
    """COCO AP of a detection or instance model over a split: the predictions of every image as COCO result
    dicts (:func:`to_coco_results`), gathered from every process at ``compute`` (``metrics.distributed``;
    duplicates of the distributed sampler's padding collapse, results being kept by image id) and scored by
    :func:`coco_evaluate` against the ground truth restricted to the evaluated images.

    Args:
        annotation_file: the split's COCO instances JSON (the data module's ``val_annotation_file``, handed over
            by the task's ``setup``); read at each ``compute``. ``None``: ``compute`` is an error.
        iou_types: what ``compute`` scores, ``"bbox"`` and / or ``"segm"``.
        label_to_category: the COCO category id of each contiguous label (see :func:`to_coco_results`).
    """

    def __init__(
        self,
        annotation_file: str | Path | None,
        iou_types: Sequence[str] = ("bbox",),
        label_to_category: Sequence[int] | Mapping[int, int] | None = None,
    ):
        unknown = [t for t in iou_types if t not in IOU_TYPES]
        if unknown:
            raise ValueError(f"iou_types must be among {IOU_TYPES}, got {unknown}")
        self.annotation_file = annotation_file
        self.iou_types = tuple(iou_types)
        self.label_to_category = label_to_category
        self.reset()

    def reset(self) -> None:
        self.results: dict[int, dict[str, list[dict]]] = {}

    def update(self, image_id: int, bbox: Mapping | None = None, segm: Mapping | None = None) -> None:
        """One image's detections: ``bbox`` and ``segm`` are ``heads.postprocess`` results (``boxes`` XYXY in
        pixels, ``scores``, ``labels``; ``segm`` also ``masks`` at the ground truth's size) for the box and the
        mask results; each is left out when ``None``."""
        records = {iou_type: [] for iou_type in IOU_TYPES}
        for iou_type, result in (("bbox", bbox), ("segm", segm)):
            if result is None:
                continue
            records[iou_type] = to_coco_results(
                image_id, result["boxes"].cpu(), result["scores"].cpu(), result["labels"].cpu(),
                masks=result["masks"].cpu() if iou_type == "segm" else None, label_to_category=self.label_to_category,
            )  # fmt: skip
        self.results[int(image_id)] = records

    def compute(self) -> dict[str, dict[str, float]]:
        """``{iou_type: coco_evaluate's dict}`` over the images of every process. A collective under DDP."""
        predictions = {k: v for part in gather_objects(self.results) for k, v in part.items()}
        if self.annotation_file is None:
            raise ValueError(
                "COCO evaluation needs the ground truth: give the task a data module with a val_annotation_file"
            )
        gt = read_coco(self.annotation_file)
        seen = set(predictions)
        gt = {**gt, "images": [im for im in gt["images"] if im["id"] in seen]}
        gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in seen]
        return {
            iou_type: coco_evaluate(gt, [r for records in predictions.values() for r in records[iou_type]], iou_type)
            for iou_type in self.iou_types
        }
