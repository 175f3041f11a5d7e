"""The example pictures of ``clusterformer evaluate --plot`` in docs/heads.md (Evaluation): box detections made
from the shapes dataset's own ground truth, with the errors of a mediocre detector, scored by ``clusterformer
evaluate --task detection --plot``. No model is trained: the point is the figures, not the numbers.

The detections of each ground-truth object: its box jittered (more for the triangles and stars, so that the
categories differ), sometimes missed, sometimes given another category, sometimes duplicated; plus false
positives on every image. A detection's score falls with its error, as a detector's would::

    python benchmarks/evaluate_plots_example.py /tmp/evaluate_example
    # writes /tmp/evaluate_example/{shapes/, results.json, metrics.json, plots/per_class_ap.png,
    # plots/precision_recall.png}; docs/images/evaluate_precision_recall.png is plots/precision_recall.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from clusterformer.cli import main
from clusterformer.data import make_shapes

# per category id (circle, square, triangle, star): the box jitter, as a fraction of the box's size
JITTER = {1: 0.05, 2: 0.08, 3: 0.16, 4: 0.24}
MISSED, RELABELLED, DUPLICATED = 0.1, 0.08, 0.15
FALSE_POSITIVES = (0, 3)  # per image, drawn uniformly in [low, high)


def detections(gt: dict, seed: int) -> list[dict]:
    """COCO box results for every image of ``gt`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    categories = [c["id"] for c in gt["categories"]]
    sizes = {image["id"]: (image["width"], image["height"]) for image in gt["images"]}
    results = []
    for ann in gt["annotations"]:
        if ann["iscrowd"] or rng.uniform() < MISSED:
            continue
        category = ann["category_id"]
        for _ in range(1 + int(rng.uniform() < DUPLICATED)):
            x, y, w, h = ann["bbox"]
            error = rng.normal(0, JITTER[category], 4)
            box = [x + error[0] * w, y + error[1] * h, w * (1 + error[2]), h * (1 + error[3])]
            label = int(rng.choice(categories)) if rng.uniform() < RELABELLED else category
            score = float(np.clip(1 - 2.5 * np.abs(error).mean() + rng.normal(0, 0.1), 0.01, 1))
            results.append({"image_id": ann["image_id"], "category_id": label, "score": score, "bbox": box})
    for image_id, (width, height) in sizes.items():
        for _ in range(int(rng.integers(*FALSE_POSITIVES))):
            w, h = rng.uniform(0.1, 0.3) * width, rng.uniform(0.1, 0.3) * height
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            results.append({"image_id": image_id, "category_id": int(rng.choice(categories)),
                            "score": float(rng.uniform(0.01, 0.6)), "bbox": [x, y, w, h]})  # fmt: skip
    return results


def run(out: Path, seed: int, images: int) -> int:
    shapes = out / "shapes"
    make_shapes(shapes, seed=seed, num_train=1, num_val=images, size=96, progress=False, overwrite=True)
    gt_file = shapes / "annotations" / "instances_val.json"
    results_file = out / "results.json"
    results_file.write_text(json.dumps(detections(json.loads(gt_file.read_text()), seed)))
    argv = ["evaluate", "--task", "detection", "--gt", str(gt_file), "--pred", str(results_file),
            "--out", str(out / "metrics.json"), "--plot", str(out / "plots"), "--overwrite"]  # fmt: skip
    return main(argv)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=60, help="validation scenes (default 60)")
    arguments = parser.parse_args()
    raise SystemExit(run(arguments.out, arguments.seed, arguments.images))
