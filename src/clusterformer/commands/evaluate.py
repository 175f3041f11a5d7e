"""``clusterformer evaluate --task T --gt GT --pred PRED``: score a predictions file against the ground truth
offline with the reference tools (pycocotools, mmsegmentation's mIoU, panopticapi's PQ) and print the metrics as
JSON."""

from __future__ import annotations

import argparse
import json
import math
import sys


def _evaluate_detection(args: argparse.Namespace) -> dict[str, float]:
    """COCO box AP/AR: ``--gt`` COCO instances JSON, ``--pred`` COCO results JSON (``bbox``)."""
    from ..metrics import coco_evaluate

    _require(args, "gt", "pred")
    return coco_evaluate(args.gt, args.pred, "bbox")


def _evaluate_instance(args: argparse.Namespace) -> dict[str, float]:
    """COCO mask AP/AR: ``--gt`` COCO instances JSON, ``--pred`` COCO results JSON (``segmentation`` RLE).
    Only the mask metrics; score the boxes of the same file with ``--task detection``."""
    from ..metrics import coco_evaluate

    _require(args, "gt", "pred")
    return coco_evaluate(args.gt, args.pred, "segm")


def _finite(value):
    """NaN (a class absent from both prediction and ground truth) as JSON ``null``."""
    return None if isinstance(value, float) and math.isnan(value) else value


def _evaluate_semantic(args: argparse.Namespace) -> dict:
    """mmsegmentation's mIoU between two folders of label PNGs (``--gt DIR``, ``--pred DIR``, matched by
    file name): dataset-level intersections over unions, label 255 ignored; per-class IoU by class index."""
    from ..metrics.semantic import evaluate_semantic

    _require(args, "gt", "pred", "num_classes")
    if args.num_classes < 1:
        raise ValueError(f"--num-classes must be positive, got {args.num_classes}")
    results = evaluate_semantic(args.gt, args.pred, args.num_classes, reduce_zero_label=args.reduce_zero_label)
    return {
        "mIoU": _finite(results["mIoU"]),
        "mAcc": _finite(results["mAcc"]),
        "aAcc": _finite(results["aAcc"]),
        "IoU": {str(index): _finite(value) for index, value in enumerate(results["IoU"])},
    }


def _evaluate_panoptic(args: argparse.Namespace) -> dict:
    """panopticapi's PQ, SQ, RQ (all / things / stuff) and per-category PQ: ``--gt`` and ``--pred`` COCO
    panoptic JSONs, ``--gt-dir`` and ``--pred-dir`` their PNG folders (default: the JSON path without .json)."""
    from ..metrics.panoptic import pq_compute

    _require(args, "gt", "pred")
    results = pq_compute(args.gt, args.pred, args.gt_dir, args.pred_dir)
    metrics = {}
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for key in ("pq", "sq", "rq"):
            metrics[key.upper() + suffix] = _finite(results[group][key])
        metrics["n" + suffix] = results[group]["n"]
    metrics["per_class"] = {str(category): values for category, values in results["per_class"].items()}
    return metrics


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is None]
    if missing:
        raise ValueError(f"--task {args.task} needs {' and '.join(missing)}")


# task -> handler: the handler reads its inputs from the parsed arguments, returns the metrics, and raises a
# ValueError (subclass) whose message names the file and the problem when an input is bad
EVALUATORS = {
    "detection": _evaluate_detection,
    "instance": _evaluate_instance,
    "semantic": _evaluate_semantic,
    "panoptic": _evaluate_panoptic,
}


def run(args: argparse.Namespace) -> int:
    from ..outputs import atomic_path, check_output_file

    try:
        if args.out:
            check_output_file(args.out, args.overwrite)  # before the (possibly long) evaluation
        metrics = EVALUATORS[args.task](args)
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
        "--pred-dir DIR, COCO panoptic format). Metrics are fractions (0-1). Bad input exits with status 2 and a "
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
    parser.add_argument("--out", help="also write the metrics to this JSON file (an existing one is refused)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.set_defaults(func=run)
    return parser
