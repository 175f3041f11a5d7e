"""Panoptic quality (PQ, SQ, RQ for all / things / stuff) equal to panopticapi's ``pq_compute``.

The counting is that of ``panopticapi/evaluation.py`` (``pq_compute_single_core`` + ``PQStat``), per
image, on segment id maps (``id = R + 256 G + 256^2 B``; ``0`` is void):

* every (ground truth segment, predicted segment) pair of the same category whose ground truth is not a
  crowd is a true positive when ``IoU > 0.5``, with ``union = pred_area + gt_area - intersection -
  (pred ∩ void)``, i.e. the predicted pixels on void ground truth are left out of the union;
* an unmatched, non-crowd ground truth segment is a false negative; a crowd one (``iscrowd == 1``) is
  never matched nor counted;
* an unmatched predicted segment is ignored when more than half of it lies on void plus the crowd region
  of its category, and is a false positive otherwise. As in panopticapi, the crowd region of a category
  is the *last* crowd segment of that category in ``segments_info`` when an image has several;
* each segment is its own segment, stuff included: two segments of one stuff class (in the ground truth
  or the prediction) are matched and counted separately, never merged per class;
* per category ``PQ = sum(IoU of TPs) / (TP + FP/2 + FN/2)``, ``SQ = sum(IoU) / TP`` (0 without TP),
  ``RQ = TP / (TP + FP/2 + FN/2)``; All / Things / Stuff average over the categories (of the ground
  truth's ``categories``, ``isthing == 1`` for things) with ``TP + FP + FN > 0``, whose number is ``n``.
  ``per_class`` gives every category, 0 for those not counted.

Where panopticapi fails or reads invalid input silently, this module raises an error naming the file
(``pq_compute``) or the image (``PanopticQuality.update``) and what is wrong, so that every result it
returns is panopticapi's: ids in a map but not in its ``segments_info``, listed ids absent from the map,
duplicate segment ids, segment id 0 (void) in ``segments_info``, unknown category ids, maps of different
sizes, non-RGB PNGs, ground truth ``area`` fields that differ from the PNG, predictions for unknown images,
duplicate image ids. A group with no counted category (e.g. Stuff in a dataset without stuff classes)
gets NaN with ``n = 0`` where panopticapi divides by zero.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..data.coco import AnnotationError, load_json
from ..data.masks import ID_LIMIT, ids_to_rgb, rgb_to_ids
from ..data.panoptic import read_panoptic_json
from .distributed import SummedMetric

OFFSET = ID_LIMIT  # ids are 24-bit (256^3 values), so gt_id * OFFSET + pred_id identifies a pair
VOID = 0


def _ids(ids, what: str) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what}: expected a 2-d integer id map, got shape {ids.shape} and dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and (ids.min() < 0 or ids.max() >= OFFSET):
        raise ValueError(f"{what}: segment ids must lie in 0..{OFFSET - 1}, got {ids.min()}..{ids.max()}")
    return ids


class PanopticQuality(SummedMetric):
    """Accumulates panopticapi's per-category TP, FP, FN and IoU sums over images; ``compute`` averages.

    A ``torchmetrics.Metric`` whose states ``tp``, ``fp``, ``fn`` (int64) and ``iou`` (float64), one entry per
    category, are sums: under DDP, ``compute`` adds those of every process first (as panopticapi adds the
    ``PQStat`` of its worker processes), see ``metrics.distributed``; ``reset`` zeroes them.

    Args:
        categories: the categories (``id``, ``isthing``), e.g. a panoptic JSON's ``categories``; the
            averages and ``per_class`` follow this order.
    """

    def __init__(self, categories: Sequence[Mapping], **kwargs):
        super().__init__(**kwargs)
        self.categories = [dict(c) for c in categories]
        self.index = {}
        for i, category in enumerate(self.categories):
            if "id" not in category or "isthing" not in category:
                raise ValueError(f"category {category} lacks 'id' or 'isthing'")
            if category["id"] in self.index:
                raise ValueError(f"category id {category['id']} appears twice in the categories")
            self.index[category["id"]] = i
        self.isthing = np.array([c["isthing"] == 1 for c in self.categories], bool)
        count = len(self.categories)
        for name in ("tp", "fp", "fn"):
            self.add_state(name, torch.zeros(count, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("iou", torch.zeros(count, dtype=torch.float64), dist_reduce_fx="sum")

    def _check_mergeable(self, other: PanopticQuality) -> None:
        if [c["id"] for c in other.categories] != [c["id"] for c in self.categories]:
            raise ValueError("cannot merge PanopticQuality objects with different categories")

    def _segments(self, segments: Sequence[Mapping], present: np.ndarray, what: str) -> dict[int, Mapping]:
        """``segments_info`` by id, checked against the ids ``present`` in the map (void excluded)."""
        by_id = {}
        for segment in segments:
            if "id" not in segment or "category_id" not in segment:
                raise ValueError(f"{what}: a segment lacks 'id' or 'category_id': {str(segment)[:200]}")
            segment_id = segment["id"]
            if segment_id == VOID:
                raise ValueError(f"{what}: segments_info lists id 0, which is void")
            if segment_id in by_id:
                raise ValueError(f"{what}: segment id {segment_id} appears twice in segments_info")
            if segment["category_id"] not in self.index:
                raise ValueError(
                    f"{what}: segment {segment_id} has category_id {segment['category_id']}, "
                    f"which is not in the categories {sorted(self.index)}"
                )
            by_id[segment_id] = segment
        present = set(present.tolist()) - {VOID}
        unlisted = sorted(present - set(by_id))
        if unlisted:
            raise ValueError(f"{what}: segment ids {unlisted[:10]} are in the id map but not in segments_info")
        absent = sorted(set(by_id) - present)
        if absent:
            raise ValueError(f"{what}: segments_info lists ids {absent[:10]} that are absent from the id map")
        return by_id

    def update(
        self,
        gt_ids,
        gt_segments: Sequence[Mapping],
        pred_ids,
        pred_segments: Sequence[Mapping],
        gt_name: str = "ground truth",
        pred_name: str = "prediction",
    ) -> None:
        """Count one image.

        Args:
            gt_ids, pred_ids: ``(H, W)`` integer segment id maps (numpy or torch), 0 = void.
            gt_segments: the ground truth's ``segments_info``: ``id``, ``category_id``, ``iscrowd``
                (missing = 0; only ``iscrowd == 1`` is a crowd). Areas are counted from ``gt_ids``.
            pred_segments: the prediction's ``segments_info``: ``id``, ``category_id``.
            gt_name, pred_name: how error messages name the two (e.g. their file names).
        """
        gt_ids, pred_ids = _ids(gt_ids, gt_name), _ids(pred_ids, pred_name)
        if gt_ids.shape != pred_ids.shape:
            raise ValueError(
                f"{pred_name}: the prediction is {pred_ids.shape[1]}x{pred_ids.shape[0]} but the ground truth "
                f"{gt_name} is {gt_ids.shape[1]}x{gt_ids.shape[0]}"
            )
        # (gt_id, pred_id) pairs and their intersections, in increasing gt_id * OFFSET + pred_id as panopticapi
        pairs, intersections = np.unique(gt_ids * OFFSET + pred_ids, return_counts=True)
        pair_gt, pair_pred = pairs // OFFSET, pairs % OFFSET
        gt_present, gt_inverse = np.unique(pair_gt, return_inverse=True)
        gt_area = np.bincount(gt_inverse, weights=intersections).astype(np.int64)
        pred_present, pred_inverse = np.unique(pair_pred, return_inverse=True)
        pred_area = np.bincount(pred_inverse, weights=intersections).astype(np.int64)
        gt_segms = self._segments(gt_segments, gt_present, gt_name)
        pred_segms = self._segments(pred_segments, pred_present, pred_name)
        area_of_gt = dict(zip(gt_present.tolist(), gt_area.tolist(), strict=True))
        area_of_pred = dict(zip(pred_present.tolist(), pred_area.tolist(), strict=True))
        intersection = dict(zip(zip(pair_gt.tolist(), pair_pred.tolist(), strict=True), intersections.tolist(),
                                strict=True))  # fmt: skip

        def is_crowd(segment: Mapping) -> bool:
            return segment.get("iscrowd", 0) == 1

        count = len(self.categories)
        tp, fp, fn = (np.zeros(count, np.int64) for _ in range(3))
        iou_sum = np.zeros(count, np.float64)
        gt_matched, pred_matched = set(), set()
        for (gt_id, pred_id), overlap in intersection.items():
            if gt_id == VOID or pred_id == VOID:
                continue
            gt, pred = gt_segms[gt_id], pred_segms[pred_id]
            if is_crowd(gt) or gt["category_id"] != pred["category_id"]:
                continue
            union = area_of_pred[pred_id] + area_of_gt[gt_id] - overlap - intersection.get((VOID, pred_id), 0)
            iou = overlap / union
            if iou > 0.5:
                category = self.index[gt["category_id"]]
                tp[category] += 1
                iou_sum[category] += iou
                gt_matched.add(gt_id)
                pred_matched.add(pred_id)

        crowd_of_category = {}  # the last crowd segment of each category, as panopticapi's crowd_labels_dict
        for gt_id, gt in gt_segms.items():
            if gt_id in gt_matched:
                continue
            if is_crowd(gt):
                crowd_of_category[gt["category_id"]] = gt_id
                continue
            fn[self.index[gt["category_id"]]] += 1

        for pred_id, pred in pred_segms.items():
            if pred_id in pred_matched:
                continue
            ignored = intersection.get((VOID, pred_id), 0)
            if pred["category_id"] in crowd_of_category:
                ignored += intersection.get((crowd_of_category[pred["category_id"]], pred_id), 0)
            if ignored / area_of_pred[pred_id] > 0.5:
                continue
            fp[self.index[pred["category_id"]]] += 1
        for name, counts in (("tp", tp), ("fp", fp), ("fn", fn), ("iou", iou_sum)):
            state = getattr(self, name)
            state += torch.from_numpy(counts).to(state.device)

    def compute(self) -> dict:
        """panopticapi's result: ``{"All", "Things", "Stuff": {"pq", "sq", "rq": float, "n": int},
        "per_class": {category_id: {"pq", "sq", "rq"}}}``, as fractions."""
        tp, fp, fn, iou = (state.cpu().numpy() for state in (self.tp, self.fp, self.fn, self.iou))
        results = {}
        per_class = {}
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            pq = sq = rq = 0.0
            n = 0
            for i, category in enumerate(self.categories):
                if isthing is not None and bool(self.isthing[i]) != isthing:
                    continue
                if tp[i] + fp[i] + fn[i] == 0:
                    if isthing is None:
                        per_class[category["id"]] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                    continue
                n += 1
                denominator = tp[i] + 0.5 * fp[i] + 0.5 * fn[i]
                pq_class = float(iou[i] / denominator)
                sq_class = float(iou[i] / tp[i]) if tp[i] != 0 else 0.0
                rq_class = float(tp[i] / denominator)
                if isthing is None:
                    per_class[category["id"]] = {"pq": pq_class, "sq": sq_class, "rq": rq_class}
                pq += pq_class
                sq += sq_class
                rq += rq_class
            nan = float("nan")
            results[name] = {"pq": pq / n if n else nan, "sq": sq / n if n else nan, "rq": rq / n if n else nan,
                             "n": n}  # fmt: skip
        results["per_class"] = per_class
        return results


def read_ids_png(path: Path) -> np.ndarray:
    """The segment ids of an RGB panoptic PNG, ``R + 256 G + 256^2 B``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: panoptic PNG not found")
    try:
        with Image.open(path) as image:
            mode = image.mode
            rgb = np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{path}: not a readable panoptic PNG ({error})") from error
    if mode != "RGB":
        raise ValueError(f"{path}: a panoptic PNG must be 8-bit RGB, got mode {mode}")
    return rgb_to_ids(rgb)


def _read_predictions(path: Path) -> list[dict]:
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise AnnotationError(f"{path}: missing the list 'annotations'")
    for ann in data["annotations"]:
        for key in ("image_id", "file_name", "segments_info"):
            if not isinstance(ann, dict) or key not in ann:
                raise AnnotationError(f"{path}: an annotation lacks '{key}': {str(ann)[:200]}")
    return data["annotations"]


def _by_image(annotations: list[dict], path: Path) -> dict:
    by_image = {}
    for ann in annotations:
        if ann["image_id"] in by_image:
            raise AnnotationError(f"{path}: image_id {ann['image_id']} has two annotations")
        by_image[ann["image_id"]] = ann
    return by_image


def pq_compute(
    gt_json: str | Path,
    pred_json: str | Path,
    gt_folder: str | Path | None = None,
    pred_folder: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """panopticapi's ``pq_compute`` on COCO panoptic files, with checked inputs.

    Args:
        gt_json, pred_json: COCO panoptic JSONs. The prediction needs only ``annotations`` (``image_id``,
            ``file_name``, ``segments_info`` with ``id`` and ``category_id``), one per ground truth
            annotation; the categories are the ground truth's.
        gt_folder, pred_folder: the PNG folders; by default the JSON path without ``.json``.
        progress: a progress bar over the images (tqdm, on standard error).

    Returns:
        :meth:`PanopticQuality.compute`'s dict.
    """
    gt_json, pred_json = Path(gt_json), Path(pred_json)
    gt_folder = Path(gt_folder) if gt_folder is not None else gt_json.with_suffix("")
    pred_folder = Path(pred_folder) if pred_folder is not None else pred_json.with_suffix("")
    for folder in (gt_folder, pred_folder):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: folder of panoptic PNGs not found")
    gt_data = read_panoptic_json(gt_json)
    gt_annotations = _by_image(gt_data["annotations"], gt_json)
    predictions = _by_image(_read_predictions(pred_json), pred_json)
    unknown = [image_id for image_id in predictions if image_id not in gt_annotations]
    if unknown:
        raise AnnotationError(f"{pred_json}: predictions for image ids {unknown[:10]} that the ground truth lacks")
    missing = [image_id for image_id in gt_annotations if image_id not in predictions]
    if missing:
        raise AnnotationError(f"{pred_json}: no prediction for the ground truth image ids {missing[:10]}")

    from tqdm import tqdm

    metric = PanopticQuality(gt_data["categories"])
    images = tqdm(gt_annotations.items(), desc="PQ", unit="img", leave=False, disable=not progress, file=sys.stderr)
    for image_id, gt_ann in images:
        pred_ann = predictions[image_id]
        gt_png, pred_png = gt_folder / gt_ann["file_name"], pred_folder / pred_ann["file_name"]
        gt_ids, pred_ids = read_ids_png(gt_png), read_ids_png(pred_png)
        # panopticapi takes the ground truth areas from the JSON: they must be the PNG's
        listed_area = {s["id"]: s["area"] for s in gt_ann["segments_info"] if "area" in s}
        if listed_area:
            counted, counts = np.unique(gt_ids, return_counts=True)
            area = dict(zip(counted.tolist(), counts.tolist(), strict=True))
            wrong = [(i, a, area.get(i, 0)) for i, a in listed_area.items() if a != area.get(i, 0)]
            if wrong:
                i, a, real = wrong[0]
                raise AnnotationError(
                    f"{gt_json}: segment {i} of {gt_ann['file_name']} has area {a}, "
                    f"but {gt_png} has {real} pixels of it"
                )
        metric.update(
            gt_ids,
            gt_ann["segments_info"],
            pred_ids,
            pred_ann["segments_info"],
            gt_name=f"{gt_png} (segments_info in {gt_json})",
            pred_name=f"{pred_png} (segments_info in {pred_json})",
        )
    return metric.compute()


def write_panoptic(folder: str | Path, file_name: str, ids: np.ndarray) -> None:
    """Write an id map as a COCO panoptic RGB PNG ``folder/file_name``."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        ids = ids.astype(np.int64)
    if ids.ndim != 2 or (ids.size and (ids.min() < 0 or ids.max() >= OFFSET)):
        raise ValueError(f"{file_name}: expected a 2-d map of ids in 0..{OFFSET - 1}")
    Image.fromarray(ids_to_rgb(ids)).save(Path(folder) / file_name)
