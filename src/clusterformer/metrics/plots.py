"""Pictures of the per-class metrics that ``clusterformer evaluate --plot DIR`` writes, one PNG per figure:

* detection, instance: ``per_class_ap.png`` (AP50, AP75 and AP 0.5:0.95 per category) and
  ``precision_recall.png`` (pycocotools' precision-recall curves at IoU 0.5, 0.75 and averaged over 0.5:0.95,
  area "all", 100 detections: one curve per category and their mean), from
  :func:`~clusterformer.metrics.coco.per_class_ap` and :func:`~clusterformer.metrics.coco.precision_recall_curves`;
* semantic: ``per_class_iou.png`` (IoU per class);
* panoptic: ``per_class_pq.png`` (PQ per category, things and stuff in two colours, with SQ and RQ).

Every figure names the classes on its axis, writes each value beside its bar and gives the overall metric in its
title. The figures are drawn on ``matplotlib.figure.Figure`` objects (no pyplot, so no global backend or state)
and saved atomically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..outputs import atomic_path

# file names, by task
PLOT_FILES = {
    "detection": ("per_class_ap.png", "precision_recall.png"),
    "instance": ("per_class_ap.png", "precision_recall.png"),
    "semantic": ("per_class_iou.png",),
    "panoptic": ("per_class_pq.png",),
}
IOU_TYPE_NAMES = {"bbox": "box", "segm": "mask"}
BAR_COLOUR, THING_COLOUR, STUFF_COLOUR, ABSENT_COLOUR = "#4C72B0", "#DD8452", "#55A868", "#999999"
# the bars of per_class_ap.png, top to bottom within a category
AP_BARS = {"AP50": "#A1C9F4", "AP75": "#5A9BD5", "AP": "#1F4E79"}
AP_LABELS = {"AP50": "AP50", "AP75": "AP75", "AP": "AP 0.50:0.95"}
MAX_LEGEND = 20  # categories named in the legend of the precision-recall curves; beyond, only the mean is
DPI = 100


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(figure, path: str | Path) -> Path:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    return Path(path)


def _bars_height(count: int) -> float:
    """Inches for ``count`` horizontal bars and the title."""
    return max(2.5, 0.32 * count + 1.4)


def _number(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _horizontal_bars(axes, names: Sequence[str], values: Sequence[float | None], colours, texts: Sequence[str]):
    """Bars from the top down in the order given, ``None`` / NaN as an empty place marked n/a, each ``text``
    written right of its bar; the value axis spans 0-1 (the metrics are fractions)."""
    rows = np.arange(len(names))
    shown = [0.0 if v is None or math.isnan(v) else float(v) for v in values]
    axes.barh(rows, shown, color=colours, height=0.7)
    for row, value, text in zip(rows, values, texts, strict=True):
        missing = value is None or math.isnan(value)
        axes.text(0.005 if missing else shown[row] + 0.01, row, text, va="center", fontsize=8,
                  color=ABSENT_COLOUR if missing else "black")  # fmt: skip
    axes.set_yticks(rows, labels=list(names))
    axes.invert_yaxis()
    axes.set_xlim(0, 1.25)  # room for the texts right of a bar at 1
    axes.set_xticks(np.linspace(0, 1, 6))
    axes.grid(axis="x", alpha=0.3)
    axes.set_axisbelow(True)


def plot_per_class_ap(
    per_class: Mapping[int, Mapping[str, float]],
    names: Mapping[int, str],
    overall: Mapping[str, float],
    path: str | Path,
    iou_type: str = "bbox",
) -> Path:
    """``per_class``: :func:`~clusterformer.metrics.coco.per_class_ap`'s ``{category_id: {AP, AP50, AP75}}``
    (-1: no ground truth, written as such); ``names``: category id -> name; ``overall``: the ``coco_evaluate``
    metrics (AP, AP50, AP75 in the title). Three bars per category, each with its value. Writes ``path`` (PNG),
    returns it."""
    categories = list(per_class)
    figure = _figure(8, max(2.5, 0.62 * len(categories) + 1.4))
    axes = figure.subplots()
    rows = np.arange(len(categories))
    height = 0.27
    for offset, (key, colour) in zip((-height, 0, height), AP_BARS.items(), strict=True):
        values = [per_class[c][key] for c in categories]
        shown = [max(value, 0.0) for value in values]
        axes.barh(rows + offset, shown, height=height * 0.92, color=colour, label=AP_LABELS[key])
        for row, value in zip(rows, values, strict=True):
            if value >= 0:
                axes.text(value + 0.01, row + offset, f"{value:.3f}", va="center", fontsize=7)
        absent = [row for row, value in zip(rows, values, strict=True) if value < 0]
        for row in absent if key == "AP50" else ():
            axes.text(0.01, row, "no ground truth", va="center", fontsize=8, color=ABSENT_COLOUR)
    axes.set_yticks(rows, labels=[str(names.get(c, c)) for c in categories])
    axes.invert_yaxis()
    axes.set_xlim(0, 1.1)
    axes.set_xticks(np.linspace(0, 1, 6))
    axes.grid(axis="x", alpha=0.3)
    axes.set_axisbelow(True)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside the axes, over no bar
    axes.set_xlabel("average precision (area all, 100 detections)")
    kind = IOU_TYPE_NAMES.get(iou_type, iou_type)
    axes.set_title(
        f"{kind} AP per category: AP {_number(overall.get('AP'))}, AP50 {_number(overall.get('AP50'))}, "
        f"AP75 {_number(overall.get('AP75'))}",
        fontsize=10,
    )
    return _save(figure, path)


def plot_precision_recall(
    curves: Mapping, names: Mapping[int, str], overall: Mapping[str, float], path: str | Path, iou_type: str = "bbox"
) -> Path:
    """``curves``: :func:`~clusterformer.metrics.coco.precision_recall_curves`'s dict; three panels (IoU 0.5,
    0.75, the mean over 0.5:0.95), one thin curve per category with ground truth and their mean in black, the
    overall AP of each in its title (``overall``: the ``coco_evaluate`` metrics). Writes ``path``, returns it."""
    from ..pictures import distinct_colours

    recall = curves["recall"]
    categories = list(next(iter(curves["precision"].values())))
    colours = distinct_colours(max(len(categories), 1)) / 255.0
    figure = _figure(15, 5.2)
    panels = figure.subplots(1, 3, sharey=True)
    for axes, (key, label) in zip(panels, (("AP50", "IoU 0.50"), ("AP75", "IoU 0.75"), ("AP", "IoU 0.50:0.95")),
                                  strict=True):  # fmt: skip
        for index, category in enumerate(categories):
            precision = curves["precision"][key][category]
            if precision is None:
                continue
            name = str(names.get(category, category))
            legend = f"{name} ({float(np.mean(precision)):.3f})" if len(categories) <= MAX_LEGEND else None
            axes.plot(recall, precision, color=colours[index], linewidth=1.2, alpha=0.85, label=legend)
        mean = curves["mean"][key]
        if mean is not None:
            axes.plot(recall, mean, color="black", linewidth=2.4, label=f"mean ({float(np.mean(mean)):.3f})")
        else:
            axes.text(0.5, 0.5, "no ground truth", ha="center", va="center", color=ABSENT_COLOUR)
        axes.set_title(f"{label}: {key} {_number(overall.get(key))}", fontsize=10)
        axes.set_xlabel("recall")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.02)
        axes.grid(alpha=0.3)
        axes.legend(loc="lower left", fontsize=7, title="category (AP)", title_fontsize=7)
    panels[0].set_ylabel("precision")
    kind = IOU_TYPE_NAMES.get(iou_type, iou_type)
    figure.suptitle(f"{kind} precision-recall (pycocotools, area all, 100 detections)", fontsize=11)
    return _save(figure, path)


def plot_per_class_iou(
    iou: Sequence[float | None], names: Sequence[str], metrics: Mapping[str, float], path: str | Path
) -> Path:
    """``iou``: per-class IoU in class order (``None`` / NaN: neither labelled nor predicted, drawn as n/a);
    ``names``: one per class; ``metrics``: mIoU, mAcc, aAcc for the title. Writes ``path``, returns it."""
    values = [None if v is None or math.isnan(v) else float(v) for v in iou]
    texts = ["n/a (absent)" if v is None else f"{v:.3f}" for v in values]
    figure = _figure(7, _bars_height(len(values)))
    axes = figure.subplots()
    _horizontal_bars(axes, [str(n) for n in names], values, BAR_COLOUR, texts)
    axes.set_xlabel("IoU (dataset-level intersection / union)")
    axes.set_title(
        f"IoU per class: mIoU {_number(metrics.get('mIoU'))}, mAcc {_number(metrics.get('mAcc'))}, "
        f"aAcc {_number(metrics.get('aAcc'))}",
        fontsize=10,
    )
    return _save(figure, path)


def plot_per_class_pq(
    per_class: Mapping[int, Mapping[str, float]],
    categories: Sequence[Mapping],
    metrics: Mapping[str, float],
    path: str | Path,
) -> Path:
    """``per_class``: ``{category_id: {pq, sq, rq}}`` (``pq_compute``'s); ``categories``: the ground truth's
    (``id``, ``name``, ``isthing``), in the order drawn; ``metrics``: PQ, SQ, RQ and the ``_th`` / ``_st``
    figures for the title. Things and stuff in two colours. Writes ``path``, returns it."""
    from matplotlib.patches import Patch

    shown = [c for c in categories if c["id"] in per_class]
    labels = [str(c.get("name", c["id"])) for c in shown]
    values = [per_class[c["id"]]["pq"] for c in shown]
    colours = [THING_COLOUR if c.get("isthing") == 1 else STUFF_COLOUR for c in shown]
    texts = [
        f"{per_class[c['id']]['pq']:.3f}  (SQ {per_class[c['id']]['sq']:.3f}, RQ {per_class[c['id']]['rq']:.3f})"
        for c in shown
    ]
    figure = _figure(8, _bars_height(len(shown)))
    axes = figure.subplots()
    _horizontal_bars(axes, labels, values, colours, texts)
    axes.legend(handles=[Patch(color=THING_COLOUR, label="things"), Patch(color=STUFF_COLOUR, label="stuff")],
                loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # fmt: skip
    axes.set_xlabel("panoptic quality PQ = SQ x RQ")

    def group(suffix: str) -> str:
        return ", ".join(f"{key} {_number(metrics.get(key + suffix))}" for key in ("PQ", "SQ", "RQ"))

    axes.set_title(
        f"PQ per category: {group('')}\nthings: {group('_th')}; stuff: {group('_st')}",
        fontsize=10,
    )
    return _save(figure, path)
