"""``clusterformer evaluate --task T --gt GT --pred PRED``: score a predictions file against the ground truth
offline with the reference tools (pycocotools, mmsegmentation's mIoU, panopticapi's PQ) and print the metrics as
JSON; ``--plot DIR`` also draws the per-class metrics as PNGs (``metrics.plots``). Standard output holds the JSON
alone; progress bars (standard error) show only on a terminal."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

# a handler's plots: the folder -> the PNGs written there (metrics.plots)
Plotter = Callable[[Path], list[Path]]


def _evaluate_coco(args: argparse.Namespace, iou_type: str, progress: bool) -> tuple[dict, Plotter]:
    from ..metrics.coco import per_class_ap, precision_recall_curves, run_cocoeval, stats_of
    from ..metrics.plots import plot_per_class_ap, plot_precision_recall

    _require(args, "gt", "pred")
    evaluator = run_cocoeval(args.gt, args.pred, iou_type, progress=progress)
    metrics = stats_of(evaluator)
    per_class = per_class_ap(evaluator)
    metrics["per_class"] = {str(category): values for category, values in per_class.items()}
    names = {c["id"]: str(c.get("name", c["id"])) for c in evaluator.cocoGt.dataset["categories"]}

    def plot(folder: Path) -> list[Path]:
        curves = precision_recall_curves(evaluator)
        return [
            plot_per_class_ap(per_class, names, metrics, folder / "per_class_ap.png", iou_type),
            plot_precision_recall(curves, names, metrics, folder / "precision_recall.png", iou_type),
        ]

    return metrics, plot


def _evaluate_detection(args: argparse.Namespace, progress: bool = False) -> tuple[dict, Plotter]:
    """COCO box AP/AR: ``--gt`` COCO instances JSON, ``--pred`` COCO results JSON (``bbox``)."""
    return _evaluate_coco(args, "bbox", progress)


def _evaluate_instance(args: argparse.Namespace, progress: bool = False) -> tuple[dict, Plotter]:
    """COCO mask AP/AR: ``--gt`` COCO instances JSON, ``--pred`` COCO results JSON (``segmentation`` RLE).
    Only the mask metrics; score the boxes of the same file with ``--task detection``."""
    return _evaluate_coco(args, "segm", progress)


def _finite(value):
    """NaN (a class absent from both prediction and ground truth) as JSON ``null``."""
    return None if isinstance(value, float) and math.isnan(value) else value


def read_class_names(path: str | Path, count: int) -> list[str]:
    """``count`` class names from a text file, one per line in class order (blank lines skipped)."""
    path = Path(path)
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read the class names ({error})") from None
    if len(names) != count:
        raise ValueError(f"{path}: {len(names)} class names for --num-classes {count} (one name per line)")
    return names


def _evaluate_semantic(args: argparse.Namespace, progress: bool = False) -> tuple[dict, Plotter]:
    """mmsegmentation's mIoU between two folders of label PNGs (``--gt DIR``, ``--pred DIR``, matched by
    file name): dataset-level intersections over unions, label 255 ignored; per-class IoU by class index."""
    from ..metrics.plots import plot_per_class_iou
    from ..metrics.semantic import evaluate_semantic

    _require(args, "gt", "pred", "num_classes")
    if args.num_classes < 1:
        raise ValueError(f"--num-classes must be positive, got {args.num_classes}")
    names = (
        read_class_names(args.class_names, args.num_classes)
        if args.class_names
        else [str(index) for index in range(args.num_classes)]
    )
    results = evaluate_semantic(
        args.gt, args.pred, args.num_classes, reduce_zero_label=args.reduce_zero_label, progress=progress
    )
    metrics = {
        "mIoU": _finite(results["mIoU"]),
        "mAcc": _finite(results["mAcc"]),
        "aAcc": _finite(results["aAcc"]),
        "IoU": {str(index): _finite(value) for index, value in enumerate(results["IoU"])},
    }

    def plot(folder: Path) -> list[Path]:
        return [plot_per_class_iou(results["IoU"], names, results, folder / "per_class_iou.png")]

    return metrics, plot


def _evaluate_panoptic(args: argparse.Namespace, progress: bool = False) -> tuple[dict, Plotter]:
    """panopticapi's PQ, SQ, RQ (all / things / stuff) and per-category PQ: ``--gt`` and ``--pred`` COCO
    panoptic JSONs, ``--gt-dir`` and ``--pred-dir`` their PNG folders (default: the JSON path without .json)."""
    from ..data.panoptic import read_panoptic_json
    from ..metrics.panoptic import pq_compute
    from ..metrics.plots import plot_per_class_pq

    _require(args, "gt", "pred")
    results = pq_compute(args.gt, args.pred, args.gt_dir, args.pred_dir, progress=progress)
    metrics = {}
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for key in ("pq", "sq", "rq"):
            metrics[key.upper() + suffix] = _finite(results[group][key])
        metrics["n" + suffix] = results[group]["n"]
    metrics["per_class"] = {str(category): values for category, values in results["per_class"].items()}

    def plot(folder: Path) -> list[Path]:
        categories = read_panoptic_json(args.gt)["categories"]
        return [plot_per_class_pq(results["per_class"], categories, metrics, folder / "per_class_pq.png")]

    return metrics, plot


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is None]
    if missing:
        raise ValueError(f"--task {args.task} needs {' and '.join(missing)}")


# task -> handler: the handler reads its inputs from the parsed arguments (and whether to show progress bars),
# returns the metrics and the function that draws their plots, and raises a ValueError (subclass) whose message
# names the file and the problem when an input is bad
EVALUATORS = {
    "detection": _evaluate_detection,
    "instance": _evaluate_instance,
    "semantic": _evaluate_semantic,
    "panoptic": _evaluate_panoptic,
}


def _check_plot_folder(folder: str | Path, task: str, overwrite: bool) -> list[Path]:
    """The PNGs that ``--plot folder`` will hold; an error when the folder is a file, or when one of them exists
    and ``overwrite`` is false."""
    from ..metrics.plots import PLOT_FILES
    from ..outputs import OutputExistsError, check_output_file

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"{folder}: is a file; --plot takes a folder")
    return [check_output_file(folder / name, overwrite) for name in PLOT_FILES[task]]


def run(args: argparse.Namespace) -> int:
    from ..outputs import atomic_path, check_output_file
    from ..progress import on_terminal

    try:
        if args.out:
            check_output_file(args.out, args.overwrite)  # before the (possibly long) evaluation
        if args.plot:
            _check_plot_folder(args.plot, args.task, args.overwrite)
        # the bars go to standard error, and only to a terminal: standard output holds the JSON, a log no bar
        metrics, plot = EVALUATORS[args.task](args, on_terminal(sys.stderr))
    except (ValueError, OSError) as error:  # bad input: one line, no traceback
        print(f"clusterformer evaluate: error: {error}", file=sys.stderr)
        return 2
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:
        try:
            with atomic_path(args.out) as temporary:
                temporary.write_text(text + "\n")
        except OSError as error:
            print(f"clusterformer evaluate: error: {args.out}: cannot write the metrics ({error})", file=sys.stderr)
            return 2
        print(f"wrote {args.out}", file=sys.stderr)
    if args.plot:
        try:
            written = plot(Path(args.plot))
        except OSError as error:
            print(f"clusterformer evaluate: error: {args.plot}: cannot write the plots ({error})", file=sys.stderr)
            return 2
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a predictions file against the ground truth offline and print the metrics as JSON",
        description="Score predictions offline with the reference tools and print the metrics as JSON. "
        "detection: COCO box AP/AR (pycocotools COCOeval, iouType bbox); instance: COCO mask AP/AR (iouType segm, "
        "areas from the masks). --gt is a COCO instances JSON, --pred a COCO results JSON (a list of image_id, "
        "category_id, score, bbox [x, y, w, h] and/or segmentation RLE). semantic: mmsegmentation's mIoU, mAcc, "
        "aAcc and per-class IoU between two folders of 8-bit label PNGs matched by file name (--gt DIR --pred DIR "
        "--num-classes N; ADE20K's convention by default: 0 unlabelled, 1..N the classes, 255 ignored). "
        "panoptic: panopticapi's PQ, SQ, RQ for all, things and stuff (--gt JSON --gt-dir DIR --pred JSON "
        "--pred-dir DIR, COCO panoptic format). Metrics are fractions (0-1); detection and instance also give AP, "
        "AP50 and AP75 per category (per_class, -1 without ground truth). --plot DIR draws the per-class metrics as "
        "PNGs, with the precision-recall curves of detection and instance. Bad input exits with status 2 and a "
        "one-line message naming the file.",
    )
    parser.add_argument("--task", required=True, choices=sorted(EVALUATORS))
    parser.add_argument("--gt", help="ground truth: COCO instances JSON, label PNG folder or COCO panoptic JSON")
    parser.add_argument("--pred", help="predictions: COCO results JSON, label PNG folder or COCO panoptic JSON")
    parser.add_argument("--gt-dir", help="panoptic: ground truth PNG folder (default: --gt without .json)")
    parser.add_argument("--pred-dir", help="panoptic: predicted PNG folder (default: --pred without .json)")
    parser.add_argument("--num-classes", type=int, help="semantic: number of classes (150 for ADE20K)")
    parser.add_argument(
        "--reduce-zero-label",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="semantic: file value 0 is 'unlabelled' and v is class v-1, as in ADE20K (default); "
        "--no-reduce-zero-label: file values are the classes 0..N-1",
    )
    parser.add_argument(
        "--class-names", help="semantic: text file, one class name per line in class order (names on the plot)"
    )
    parser.add_argument("--out", help="also write the metrics to this JSON file (an existing one is refused)")
    parser.add_argument(
        "--plot",
        metavar="DIR",
        help="also draw the per-class metrics as PNGs in this folder: per_class_ap.png and precision_recall.png "
        "(detection, instance), per_class_iou.png (semantic), per_class_pq.png (panoptic); existing ones are refused",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out or --plot PNGs")
    parser.set_defaults(func=run)
    return parser
