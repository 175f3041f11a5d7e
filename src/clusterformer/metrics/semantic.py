"""Semantic-segmentation metrics with mmsegmentation's definition: mIoU, mAcc, aAcc over a dataset.

mmsegmentation (``IoUMetric.intersect_and_union`` + ``total_area_to_metrics``) counts, per image and
per class, the intersection, union, predicted area and labelled area over the pixels whose label is
not ``ignore_index``, sums those counts over the dataset, and only then divides:

* ``IoU[c] = intersect[c] / union[c]``: NaN for a class with union 0 (neither labelled nor predicted
  anywhere); a class predicted but never labelled has IoU 0 and *does* count in the mean;
* ``Acc[c] = intersect[c] / label_area[c]``: NaN for a class never labelled;
* ``mIoU = nanmean(IoU)``, ``mAcc = nanmean(Acc)``, ``aAcc = sum(intersect) / sum(label_area)``.

Differences from mmsegmentation, none of which changes a number on valid input: the counts are exact
int64 (mmsegmentation's ``torch.histc`` counts in float32, which rounds once a class passes 2^24 pixels
over the dataset); values are fractions, not rounded percentages; and a label or prediction outside
``0..num_classes-1`` on a counted pixel is an error instead of being dropped by ``histc``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..data.semantic import IGNORE_INDEX  # one void label for the data, the losses and the metrics
from .distributed import SummedMetric


def _as_integer(values, what: str):
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise TypeError(f"{what} must hold integer class indices, got dtype {values.dtype}")
        return values.long()
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"{what} must hold integer class indices, got dtype {values.dtype}")
    return values.astype(np.int64, copy=False)


class SemanticConfusion(SummedMetric):
    """Dataset-level confusion matrix of a semantic segmentation, and mmsegmentation's metrics from it.

    ``confusion[label, prediction]`` (an int64 tensor state) counts the pixels whose label is not
    ``ignore_index``; its diagonal is the per-class intersection, its row sums the labelled areas, its column
    sums the predicted areas. ``update`` takes numpy arrays or torch tensors (on any device; counted there, one
    small transfer). A ``torchmetrics.Metric`` with a summed state: under DDP, ``compute`` adds the counts of
    every process before it divides (see ``metrics.distributed``); ``reset`` zeroes the counts.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, **kwargs):
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state("confusion", torch.zeros(num_classes, num_classes, dtype=torch.int64), dist_reduce_fx="sum")

    def _check_mergeable(self, other: SemanticConfusion) -> None:
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")

    def update(self, prediction, label) -> None:
        """Count one image or a batch: ``prediction`` and ``label`` of the same shape, e.g. ``(H, W)`` or
        ``(B, H, W)``, integer class indices ``0..num_classes-1``; pixels labelled ``ignore_index`` are
        skipped whatever their prediction."""
        prediction, label = _as_integer(prediction, "prediction"), _as_integer(label, "label")
        if tuple(prediction.shape) != tuple(label.shape):
            raise ValueError(f"prediction has shape {tuple(prediction.shape)} but label {tuple(label.shape)}")
        c = self.num_classes
        if isinstance(label, torch.Tensor) or isinstance(prediction, torch.Tensor):
            label = torch.as_tensor(label)
            prediction = torch.as_tensor(prediction, device=label.device)
            counted = label != self.ignore_index
            label, prediction = label[counted], prediction[counted]
            bad_label = label[(label < 0) | (label >= c)].unique().cpu().tolist()
            bad_prediction = prediction[(prediction < 0) | (prediction >= c)].unique().cpu().tolist()
            pairs = (label * c + prediction) if not (bad_label or bad_prediction) else None
            counts = None if pairs is None else torch.bincount(pairs, minlength=c * c)
        else:
            counted = label != self.ignore_index
            label, prediction = label[counted], prediction[counted]
            bad_label = np.unique(label[(label < 0) | (label >= c)]).tolist()
            bad_prediction = np.unique(prediction[(prediction < 0) | (prediction >= c)]).tolist()
            counts = None if bad_label or bad_prediction else np.bincount(label * c + prediction, minlength=c * c)
        if bad_label:
            raise ValueError(
                f"label values {bad_label[:10]} are neither classes 0..{c - 1} nor ignore_index {self.ignore_index}"
            )
        if bad_prediction:
            raise ValueError(f"predicted values {bad_prediction[:10]} are outside the classes 0..{c - 1}")
        self.confusion += torch.as_tensor(counts).reshape(c, c).to(self.confusion.device, torch.int64)

    def _areas(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-class ``(intersection, union, label_area)`` from one copy of the counts."""
        confusion = self.confusion.cpu().numpy()
        intersection, label_area = np.diag(confusion).copy(), confusion.sum(1)
        return intersection, label_area + confusion.sum(0) - intersection, label_area

    @property
    def intersection(self) -> np.ndarray:
        return self._areas()[0]

    @property
    def label_area(self) -> np.ndarray:
        return self._areas()[2]

    @property
    def prediction_area(self) -> np.ndarray:
        return self.confusion.cpu().numpy().sum(0)

    @property
    def union(self) -> np.ndarray:
        return self._areas()[1]

    def compute(self) -> dict:
        """``{"mIoU", "mAcc", "aAcc": float, "IoU", "Acc": list of num_classes floats}``, as fractions.

        Per-class values are NaN where undefined (see the module docstring); so is a mean over no
        defined class, and ``aAcc`` before any labelled pixel.
        """
        intersection, union, label_area = self._areas()
        intersection = intersection.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = intersection / union
            acc = intersection / label_area
            all_acc = intersection.sum() / label_area.sum()

        def nanmean(values: np.ndarray) -> float:
            return float(np.mean(values[~np.isnan(values)])) if not np.isnan(values).all() else float("nan")

        return {
            "mIoU": nanmean(iou),
            "mAcc": nanmean(acc),
            "aAcc": float(all_acc),
            "IoU": iou.tolist(),
            "Acc": acc.tolist(),
        }


def read_label_png(path: Path) -> np.ndarray:
    """The values of an 8-bit single-channel PNG (mode ``L``, or ``P`` read as palette indices)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with Image.open(path) as image:
            mode = image.mode
            values = np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{path}: not a readable label PNG ({error})") from error
    if mode not in ("L", "P"):
        raise ValueError(f"{path}: label PNG must be 8-bit single-channel (mode L or P), got mode {mode}")
    return values.astype(np.int64)


def _pngs(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() == ".png"}


def evaluate_semantic(
    gt_dir: str | Path,
    pred_dir: str | Path,
    num_classes: int,
    reduce_zero_label: bool = True,
    ignore_index: int = IGNORE_INDEX,
    progress: bool = False,
) -> dict:
    """mmsegmentation's metrics between two folders of label PNGs matched by file stem.

    Both folders hold 8-bit single-channel PNGs *in the same convention*:

    * ``reduce_zero_label=True`` (ADE20K's files): ``0`` = unlabelled, ``1..num_classes`` = the classes
      (file value ``v`` is class ``v - 1``), as mmsegmentation's ``IoUMetric`` writes predictions
      (``output_mask + 1``). In a ground truth file ``0`` and ``255`` are ignored (mmsegmentation maps
      ``0 -> 255`` and keeps ``255``); a prediction file must hold only ``1..num_classes``.
    * ``reduce_zero_label=False``: file values are the classes ``0..num_classes-1``; in the ground truth
      ``ignore_index`` is ignored; a prediction file must hold only ``0..num_classes-1``.

    Any other value, a prediction missing for a ground truth file or one without a ground truth file,
    a size difference or a PNG that is not 8-bit single-channel is an error naming the file.
    ``progress``: a progress bar over the images (tqdm, on standard error).
    Returns :meth:`SemanticConfusion.compute`'s dict.
    """
    from tqdm import tqdm

    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    gts, preds = _pngs(gt_dir), _pngs(pred_dir)
    if not gts:
        raise ValueError(f"{gt_dir}: no ground truth PNGs")
    missing = [stem for stem in gts if stem not in preds]
    if missing:
        raise FileNotFoundError(
            f"{pred_dir}: no prediction {missing[0]}.png for the ground truth {gts[missing[0]]}"
            + (f" ({len(missing)} predictions missing in all)" if len(missing) > 1 else "")
        )
    unknown = [stem for stem in preds if stem not in gts]
    if unknown:
        raise ValueError(f"{preds[unknown[0]]}: a prediction for an image without ground truth in {gt_dir}")
    first = 1 if reduce_zero_label else 0
    metric = SemanticConfusion(num_classes, ignore_index)
    for stem, gt_path in tqdm(gts.items(), desc="mIoU", unit="img", leave=False, disable=not progress, file=sys.stderr):
        label = read_label_png(gt_path)
        prediction = read_label_png(preds[stem])
        if prediction.shape != label.shape:
            raise ValueError(
                f"{preds[stem]}: prediction is {prediction.shape[1]}x{prediction.shape[0]} but its ground truth "
                f"{gt_path} is {label.shape[1]}x{label.shape[0]}"
            )
        bad = np.unique(prediction[(prediction < first) | (prediction >= num_classes + first)])
        if bad.size:
            raise ValueError(
                f"{preds[stem]}: predicted values {bad.tolist()[:10]} are outside the classes "
                f"{first}..{num_classes + first - 1}"
            )
        if reduce_zero_label:
            unlabelled = (label == 0) | (label == 255)
            label = np.where(unlabelled, ignore_index, label - 1)
            prediction = prediction - 1
        bad = np.unique(label[(label != ignore_index) & ((label < 0) | (label >= num_classes))])
        if bad.size:
            shown = (bad + first).tolist()[:10]
            raise ValueError(f"{gt_path}: label values {shown} are outside the {num_classes} classes")
        metric.update(prediction, label)
    return metric.compute()
