"""Panoptic quality against a transcription of panopticapi's pq_compute, and bad panoptic inputs."""

import copy
import json
import math
import os
import shutil
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from clusterformer.data import CATEGORIES
from clusterformer.data.coco import AnnotationError
from clusterformer.metrics.panoptic import PanopticQuality, pq_compute, write_panoptic

# ---------------------------------------------------------------------------------------------------------------------
# Reference: panopticapi/evaluation.py (pq_compute_single_core, PQStat.pq_average), transcribed line by line, with
# counters of what happened so that the tests can check that their cases occur.

REF_OFFSET = 256 * 256 * 256
REF_VOID = 0


def reference_rgb2id(color):
    if color.dtype == np.uint8:
        color = color.astype(np.int32)
    return color[:, :, 0] + 256 * color[:, :, 1] + 256 * 256 * color[:, :, 2]


def reference_single_image(gt_ann, pred_ann, pan_gt, pan_pred, categories, stat, events):
    gt_segms = {el["id"]: dict(el) for el in gt_ann["segments_info"]}
    pred_segms = {el["id"]: dict(el) for el in pred_ann["segments_info"]}

    pred_labels_set = set(el["id"] for el in pred_ann["segments_info"])
    labels, labels_cnt = np.unique(pan_pred, return_counts=True)
    for label, label_cnt in zip(labels, labels_cnt, strict=True):
        if label not in pred_segms:
            if label == REF_VOID:
                continue
            raise KeyError(f"segment {label} in PNG and not in JSON")
        pred_segms[label]["area"] = label_cnt
        pred_labels_set.remove(label)
        if pred_segms[label]["category_id"] not in categories:
            raise KeyError("unknown category_id")
    if len(pred_labels_set) != 0:
        raise KeyError("segments in JSON and not in PNG")

    pan_gt_pred = pan_gt.astype(np.uint64) * REF_OFFSET + pan_pred.astype(np.uint64)
    gt_pred_map = {}
    labels, labels_cnt = np.unique(pan_gt_pred, return_counts=True)
    for label, intersection in zip(labels, labels_cnt, strict=True):
        gt_id = label // REF_OFFSET
        pred_id = label % REF_OFFSET
        gt_pred_map[(gt_id, pred_id)] = intersection

    gt_matched = set()
    pred_matched = set()
    for label_tuple, intersection in gt_pred_map.items():
        gt_label, pred_label = label_tuple
        if gt_label not in gt_segms:
            continue
        if pred_label not in pred_segms:
            continue
        if gt_segms[gt_label]["iscrowd"] == 1:
            continue
        if gt_segms[gt_label]["category_id"] != pred_segms[pred_label]["category_id"]:
            continue
        union = (
            pred_segms[pred_label]["area"]
            + gt_segms[gt_label]["area"]
            - intersection
            - gt_pred_map.get((REF_VOID, pred_label), 0)
        )
        iou = intersection / union
        if iou > 0.5:
            stat[gt_segms[gt_label]["category_id"]]["tp"] += 1
            stat[gt_segms[gt_label]["category_id"]]["iou"] += iou
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)
            events["tp"] += 1
            events["tp_imperfect"] += iou < 1

    crowd_labels_dict = {}
    for gt_label, gt_info in gt_segms.items():
        if gt_label in gt_matched:
            continue
        if gt_info["iscrowd"] == 1:
            crowd_labels_dict[gt_info["category_id"]] = gt_label
            events["crowd"] += 1
            continue
        stat[gt_info["category_id"]]["fn"] += 1
        events["fn"] += 1

    for pred_label, pred_info in pred_segms.items():
        if pred_label in pred_matched:
            continue
        intersection = gt_pred_map.get((REF_VOID, pred_label), 0)
        if pred_info["category_id"] in crowd_labels_dict:
            crowd = gt_pred_map.get((crowd_labels_dict[pred_info["category_id"]], pred_label), 0)
            events["on_crowd"] += crowd > 0
            intersection += crowd
        if intersection / pred_info["area"] > 0.5:
            events["ignored"] += 1
            continue
        stat[pred_info["category_id"]]["fp"] += 1
        events["fp"] += 1


def reference_average(stat, categories):
    results = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        pq, sq, rq, n = 0, 0, 0, 0
        per_class_results = {}
        for label, label_info in categories.items():
            if isthing is not None:
                cat_isthing = label_info["isthing"] == 1
                if isthing != cat_isthing:
                    continue
            iou, tp, fp, fn = (stat[label][k] for k in ("iou", "tp", "fp", "fn"))
            if tp + fp + fn == 0:
                per_class_results[label] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            n += 1
            pq_class = iou / (tp + 0.5 * fp + 0.5 * fn)
            sq_class = iou / tp if tp != 0 else 0
            rq_class = tp / (tp + 0.5 * fp + 0.5 * fn)
            per_class_results[label] = {"pq": pq_class, "sq": sq_class, "rq": rq_class}
            pq += pq_class
            sq += sq_class
            rq += rq_class
        results[name] = {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}
        if name == "All":
            results["per_class"] = per_class_results
    return results


def new_stat():
    return defaultdict(lambda: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0})


def reference_pq_compute(gt_json_file, pred_json_file, gt_folder, pred_folder):
    """panopticapi's pq_compute (single core); returns (results, events)."""
    with open(gt_json_file) as f:
        gt_json = json.load(f)
    with open(pred_json_file) as f:
        pred_json = json.load(f)
    categories = {el["id"]: el for el in gt_json["categories"]}
    pred_annotations = {el["image_id"]: el for el in pred_json["annotations"]}
    stat, events = new_stat(), defaultdict(int)
    for gt_ann in gt_json["annotations"]:
        pred_ann = pred_annotations[gt_ann["image_id"]]
        pan_gt = reference_rgb2id(np.array(Image.open(os.path.join(gt_folder, gt_ann["file_name"])), dtype=np.uint32))
        pan_pred = reference_rgb2id(
            np.array(Image.open(os.path.join(pred_folder, pred_ann["file_name"])), dtype=np.uint32)
        )
        reference_single_image(gt_ann, pred_ann, pan_gt, pan_pred, categories, stat, events)
    return reference_average(stat, categories), events


def reference_on_arrays(images, categories):
    """``images``: (gt_ids, gt_segments, pred_ids, pred_segments) tuples; returns (results, events)."""
    categories = {c["id"]: c for c in categories}
    stat, events = new_stat(), defaultdict(int)
    for gt_ids, gt_segments, pred_ids, pred_segments in images:
        gt_segments = [dict(s, area=int((gt_ids == s["id"]).sum())) for s in gt_segments]
        gt_ann, pred_ann = {"segments_info": gt_segments}, {"segments_info": pred_segments}
        reference_single_image(gt_ann, pred_ann, gt_ids, pred_ids, categories, stat, events)
    return reference_average(stat, categories), events


def assert_same(results, expected):
    assert set(results) == set(expected) == {"All", "Things", "Stuff", "per_class"}
    for name in ("All", "Things", "Stuff"):
        assert results[name]["n"] == expected[name]["n"], name
        for key in ("pq", "sq", "rq"):
            assert results[name][key] == pytest.approx(expected[name][key], abs=1e-6), (name, key)
    assert list(results["per_class"]) == list(expected["per_class"])
    for category, values in expected["per_class"].items():
        for key in ("pq", "sq", "rq"):
            assert results["per_class"][category][key] == pytest.approx(values[key], abs=1e-6), (category, key)


# ---------------------------------------------------------------------------------------------------------------------
# Panoptic files: the shapes dataset's val split made harder (void, crowds, several stuff segments of one class), and
# predictions perturbed from it.


def read_ids(path):
    rgb = np.asarray(Image.open(path)).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def save_split(root, name, annotations, categories, images=None):
    data = {"annotations": annotations, "categories": categories}
    if images is not None:
        data["images"] = images
    (root / f"{name}.json").write_text(json.dumps(data))


def harden_ground_truth(ids, segments, rng):
    """Add a void rectangle, split one stuff segment into two of the same class, turn things into crowds
    (sometimes two crowds of one category)."""
    ids = ids.copy()
    segments = [dict(s) for s in segments]
    h, w = ids.shape
    if rng.uniform() < 0.8:
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        ids[y : y + int(rng.integers(4, 12)), x : x + int(rng.integers(4, 12))] = 0
    next_id = max(s["id"] for s in segments) + 1
    stuff = [s for s in segments if s["category_id"] > 4 and (ids == s["id"]).sum() > 20]
    if stuff and rng.uniform() < 0.7:
        segment = stuff[int(rng.integers(len(stuff)))]
        ys, xs = np.nonzero(ids == segment["id"])
        right = xs > np.median(xs)
        ids[ys[right], xs[right]] = next_id
        segments.append(dict(segment, id=next_id))
        next_id += 1
    things = [s for s in segments if s["category_id"] <= 4]
    if things and rng.uniform() < 0.6:
        crowd = things[int(rng.integers(len(things)))]
        crowd["iscrowd"] = 1
        same = [s for s in things if s is not crowd and s["category_id"] == crowd["category_id"]]
        if same and rng.uniform() < 0.5:
            same[0]["iscrowd"] = 1
        elif rng.uniform() < 0.5:  # a second crowd of the same category, placed in a corner
            ids[:5, :5] = next_id
            segments.append(dict(crowd, id=next_id))
    present = set(np.unique(ids).tolist())
    segments = [dict(s, area=int((ids == s["id"]).sum())) for s in segments if s["id"] in present]
    return ids, segments


def perturb_prediction(ids, segments, rng):
    """A prediction from the ground truth: new ids; segments eroded, shifted, dropped, merged, split and relabelled;
    spurious blobs on void, on crowds and elsewhere."""
    h, w = ids.shape
    pred = np.zeros_like(ids)
    pred_category = {}
    next_id = 1000
    for segment in segments:
        mask = ids == segment["id"]
        op = rng.choice(["keep", "erode", "shift", "drop", "relabel", "split"], p=[0.3, 0.2, 0.2, 0.1, 0.1, 0.1])
        if op == "erode":
            inner = mask.copy()
            for axis in (0, 1):
                for step in (1, -1):
                    inner &= np.roll(mask, step, axis)
            mask = inner
        elif op == "shift":
            mask = np.roll(mask, tuple(rng.integers(-4, 5, 2)), (0, 1))
        elif op == "drop":
            continue
        new_category = int(rng.integers(1, 8)) if op == "relabel" else segment["category_id"]
        if op == "split" and mask.sum() > 4:
            ys, xs = np.nonzero(mask)
            lower = ys > np.median(ys)
            pred[ys[lower], xs[lower]] = next_id
            pred_category[next_id] = new_category
            next_id += 1
            mask = mask.copy()
            mask[ys[lower], xs[lower]] = False
        pred[mask] = next_id
        pred_category[next_id] = new_category
        next_id += 1
    if rng.uniform() < 0.3:  # merge two segments of the same category
        by_category = defaultdict(list)
        for pred_id, c in pred_category.items():
            by_category[c].append(pred_id)
        pairs = [v for v in by_category.values() if len(v) > 1]
        if pairs:
            a, b = pairs[0][:2]
            pred[pred == b] = a
    for _ in range(int(rng.integers(0, 3))):  # blobs: somewhere, or on void, or on a crowd with its category
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        blob_category = int(rng.integers(1, 8))
        crowds = [s for s in segments if s["iscrowd"]]
        if rng.uniform() < 0.4 and (ids == 0).any():
            ys, xs = np.nonzero(ids == 0)
            y, x = max(0, ys[len(ys) // 2] - 2), max(0, xs[len(xs) // 2] - 2)
        elif rng.uniform() < 0.5 and crowds:
            ys, xs = np.nonzero(ids == crowds[0]["id"])
            y, x = max(0, ys[len(ys) // 2] - 2), max(0, xs[len(xs) // 2] - 2)
            blob_category = crowds[0]["category_id"]
        pred[y : y + int(rng.integers(2, 8)), x : x + int(rng.integers(2, 8))] = next_id
        pred_category[next_id] = blob_category
        next_id += 1
    if rng.uniform() < 0.2:
        pred = np.roll(pred, 1, 1)
    present = sorted(set(np.unique(pred).tolist()) - {0})
    return pred, [{"id": i, "category_id": pred_category[i]} for i in present]


@pytest.fixture(scope="module")
def panoptic_case(shapes_dir, tmp_path_factory):
    """``(gt_json, pred_json, gt_folder, pred_folder)``: hardened shapes val ground truth, perturbed predictions."""
    shapes = shapes_dir(3, 1, 10, 48)
    root = tmp_path_factory.mktemp("panoptic_metric")
    source = json.loads((shapes / "annotations" / "panoptic_val.json").read_text())
    rng = np.random.default_rng(0)
    (root / "gt").mkdir()
    (root / "pred").mkdir()
    gt_annotations, pred_annotations = [], []
    for ann in source["annotations"]:
        ids = read_ids(shapes / "annotations" / "panoptic_val" / ann["file_name"])
        ids, segments = harden_ground_truth(ids, ann["segments_info"], rng)
        write_panoptic(root / "gt", ann["file_name"], ids)
        gt_annotations.append(dict(ann, segments_info=segments))
        pred, pred_segments = perturb_prediction(ids, segments, rng)
        name = f"pred_{ann['file_name']}"
        write_panoptic(root / "pred", name, pred)
        pred_annotations.append({"image_id": ann["image_id"], "file_name": name, "segments_info": pred_segments})
    save_split(root, "gt", gt_annotations, source["categories"], source["images"])
    save_split(root, "pred", pred_annotations[::-1], source["categories"])  # order of predictions does not matter
    return root / "gt.json", root / "pred.json", root / "gt", root / "pred"


def test_perturbed_shapes_predictions_equal_panopticapi(panoptic_case):
    expected, events = reference_pq_compute(*map(str, panoptic_case))
    # the cases the comparison is meant to cover do occur
    for event in ("tp_imperfect", "fp", "fn", "crowd", "on_crowd", "ignored"):
        assert events[event] > 0, event
    gt = json.loads(panoptic_case[0].read_text())
    assert any(s["iscrowd"] for a in gt["annotations"] for s in a["segments_info"])
    stuff = [[s["category_id"] for s in a["segments_info"] if s["category_id"] > 4] for a in gt["annotations"]]
    assert any(len(categories) > len(set(categories)) for categories in stuff)  # several segments of a stuff class
    assert_same(pq_compute(*panoptic_case), expected)


def test_default_folders_are_the_json_paths_without_suffix(panoptic_case):
    gt_json, pred_json, _, _ = panoptic_case
    assert_same(pq_compute(gt_json, pred_json), reference_pq_compute(*map(str, panoptic_case))[0])


def test_perfect_prediction_gives_pq_one(panoptic_case, tmp_path):
    gt_json, _, gt_folder, _ = panoptic_case
    gt = json.loads(gt_json.read_text())
    (tmp_path / "pred").mkdir()
    for ann in gt["annotations"]:  # the ground truth without its crowd segments, which become void
        ids = read_ids(gt_folder / ann["file_name"])
        for segment in ann["segments_info"]:
            if segment["iscrowd"]:
                ids[ids == segment["id"]] = 0
        write_panoptic(tmp_path / "pred", ann["file_name"], ids)
        ann["segments_info"] = [s for s in ann["segments_info"] if not s["iscrowd"]]
    save_split(tmp_path, "pred", gt["annotations"], gt["categories"])
    results = pq_compute(gt_json, tmp_path / "pred.json", gt_folder, tmp_path / "pred")
    for name in ("All", "Things", "Stuff"):
        assert (results[name]["pq"], results[name]["sq"], results[name]["rq"]) == (1.0, 1.0, 1.0)
    assert results["All"]["n"] == results["Things"]["n"] + results["Stuff"]["n"] == len(CATEGORIES)


def test_ground_truth_as_prediction_counts_all_but_the_last_crowd_of_a_category(panoptic_case):
    """panopticapi excuses a prediction on a crowd only for the last crowd segment of its category in the image:
    predicting the ground truth itself, crowds included, costs a FP per extra crowd segment of a category."""
    gt_json, _, gt_folder, _ = panoptic_case
    expected, events = reference_pq_compute(str(gt_json), str(gt_json), str(gt_folder), str(gt_folder))
    gt = json.loads(gt_json.read_text())
    crowds = [[s["category_id"] for s in a["segments_info"] if s["iscrowd"]] for a in gt["annotations"]]
    assert events["fp"] == sum(len(c) - len(set(c)) for c in crowds) > 0
    results = pq_compute(gt_json, gt_json, gt_folder, gt_folder)
    assert_same(results, expected)
    assert results["All"]["sq"] == 1.0 and results["All"]["pq"] < 1.0


def random_image(rng, size=12):
    """A blocky ground truth with void and crowds, and a prediction that partly follows it."""
    blocks = rng.integers(0, 7, (size // 3, size // 3))
    gt = np.kron(blocks, np.ones((3, 3), np.int64))
    gt[rng.uniform(size=gt.shape) < 0.05] = 0
    gt_segments = []
    for segment_id in sorted(set(np.unique(gt).tolist()) - {0}):
        category = int(rng.integers(1, 6))
        gt_segments.append({"id": segment_id, "category_id": category, "iscrowd": int(rng.uniform() < 0.2)})
    pred = np.where(rng.uniform(size=gt.shape) < 0.8, gt * 3 + 1, rng.integers(0, 25, gt.shape))
    pred[gt == 0] = np.where(rng.uniform(size=pred[gt == 0].shape) < 0.5, 0, pred[gt == 0])
    pred = np.roll(pred, tuple(rng.integers(-1, 2, 2)), (0, 1))
    gt_category = {s["id"]: s["category_id"] for s in gt_segments}
    pred_segments = []
    for segment_id in sorted(set(np.unique(pred).tolist()) - {0}):
        origin = (segment_id - 1) // 3 if (segment_id - 1) % 3 == 0 else None
        category = gt_category.get(origin) if rng.uniform() < 0.8 else None
        pred_segments.append({"id": segment_id, "category_id": category or int(rng.integers(1, 7))})
    return gt, gt_segments, pred, pred_segments


def test_random_maps_equal_panopticapi():
    # category 6 is only ever predicted (FP only), category 7 never appears
    categories = [{"id": i, "isthing": int(i in (1, 2, 3, 6))} for i in range(1, 8)]
    rng = np.random.default_rng(1)
    images = [random_image(rng) for _ in range(60)]
    expected, events = reference_on_arrays(images, categories)
    for event in ("tp_imperfect", "fp", "fn", "crowd", "on_crowd", "ignored"):
        assert events[event] > 0, event
    metric = PanopticQuality(categories)
    for image in images:
        metric.update(*image)
    results = metric.compute()
    assert_same(results, expected)
    assert results["per_class"][7] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert results["per_class"][6]["pq"] == 0.0 and metric.fp[5] > 0


def test_torch_maps_and_merged_accumulators():
    import torch

    categories = [{"id": i, "isthing": int(i < 4)} for i in range(1, 8)]
    rng = np.random.default_rng(2)
    images = [random_image(rng) for _ in range(10)]
    whole, first, second = PanopticQuality(categories), PanopticQuality(categories), PanopticQuality(categories)
    for i, (gt, gt_segments, pred, pred_segments) in enumerate(images):
        whole.update(gt, gt_segments, pred, pred_segments)
        (first if i % 2 else second).update(torch.from_numpy(gt), gt_segments, torch.from_numpy(pred), pred_segments)
    assert_same(first.merge(second).compute(), whole.compute())


def test_metric_update_compute_reset_round_trip():
    """A torchmetrics Metric with summed states: the same images after ``reset`` give the same figures, and the
    counts are no part of a ``state_dict``."""
    categories = [{"id": i, "isthing": int(i in (1, 2, 3, 6))} for i in range(1, 8)]
    rng = np.random.default_rng(4)
    images = [random_image(rng) for _ in range(20)]
    metric = PanopticQuality(categories)
    for image in images:
        metric.update(*image)
    first = metric.compute()
    assert_same(first, reference_on_arrays(images, categories)[0])
    metric.reset()
    assert metric.tp.sum() == metric.fp.sum() == metric.fn.sum() == 0 and metric.iou.sum() == 0
    for image in images:
        metric.update(*image)
    assert_same(metric.compute(), first)
    assert metric.state_dict() == {}
    assert {name: fx.__name__ for name, fx in metric._reductions.items()} == dict.fromkeys(
        ("tp", "fp", "fn", "iou"), "dim_zero_sum"
    )
    with pytest.raises(ValueError, match="different categories"):
        metric.merge(PanopticQuality(categories[:3]))


# ---------------------------------------------------------------------------------------------------------------------
# Hand-computed cases

TWO_CATEGORIES = [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 0}, {"id": 3, "isthing": 1}]


def test_hand_computed_ious():
    gt = np.array([[1, 1, 2, 2]] * 4)
    pred = np.array([[5, 5, 5, 6], [5, 5, 5, 6], [5, 5, 6, 6], [5, 5, 6, 6]])
    metric = PanopticQuality(TWO_CATEGORIES[:2])
    metric.update(gt, [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2}],
                  pred, [{"id": 5, "category_id": 1}, {"id": 6, "category_id": 2}])  # fmt: skip
    results = metric.compute()
    # thing: 8 / 10; stuff: 6 / 8
    assert results["Things"] == pytest.approx({"pq": 0.8, "sq": 0.8, "rq": 1.0, "n": 1})
    assert results["Stuff"] == pytest.approx({"pq": 0.75, "sq": 0.75, "rq": 1.0, "n": 1})
    assert results["All"] == pytest.approx({"pq": 0.775, "sq": 0.775, "rq": 1.0, "n": 2})


def test_hand_computed_void_crowd_and_two_stuff_segments():
    gt = np.array([
        [0, 0, 3, 3, 3, 3],
        [0, 0, 3, 3, 3, 3],
        [1, 1, 4, 4, 5, 5],
        [1, 1, 4, 4, 5, 5],
    ])  # fmt: skip
    gt_segments = [{"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 3, "category_id": 1, "iscrowd": 1},
                   {"id": 4, "category_id": 2, "iscrowd": 0}, {"id": 5, "category_id": 2, "iscrowd": 0}]  # fmt: skip
    pred = np.array([
        [7, 7, 8, 8, 0, 0],
        [11, 11, 8, 8, 6, 0],
        [11, 11, 9, 9, 10, 10],
        [11, 11, 9, 9, 10, 10],
    ])  # fmt: skip
    pred_segments = [{"id": i, "category_id": 1} for i in (7, 8, 11)] + [
        {"id": i, "category_id": 2} for i in (6, 9, 10)
    ]
    metric = PanopticQuality(TWO_CATEGORIES)
    metric.update(gt, gt_segments, pred, pred_segments)
    # 11 covers thing 1 and 2 void pixels: IoU 4 / (6 + 4 - 4 - 2) = 1. 7 lies on void and 8 on the crowd of its
    # category: ignored. 9 and 10 match the two stuff segments of category 2. 6 lies on a crowd of another category: FP.
    assert metric.tp.tolist() == [1, 2, 0] and metric.fp.tolist() == [0, 1, 0] and metric.fn.tolist() == [0, 0, 0]
    results = metric.compute()
    assert results["All"] == pytest.approx({"pq": 0.9, "sq": 1.0, "rq": 0.9, "n": 2})
    assert results["Things"] == pytest.approx({"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1})
    assert results["Stuff"] == pytest.approx({"pq": 0.8, "sq": 1.0, "rq": 0.8, "n": 1})
    assert list(results["per_class"]) == [1, 2, 3]
    assert results["per_class"][2] == pytest.approx({"pq": 0.8, "sq": 1.0, "rq": 0.8})
    assert results["per_class"][3] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert_same(results, reference_on_arrays([(gt, gt_segments, pred, pred_segments)], TWO_CATEGORIES)[0])


@pytest.mark.parametrize("order, false_positives", [((3, 4), 1), ((4, 3), 0)])
def test_only_the_last_crowd_of_a_category_excuses_predictions(order, false_positives):
    gt = np.array([[3, 3, 4, 4], [3, 3, 4, 4]])
    gt_segments = [{"id": i, "category_id": 1, "iscrowd": 1} for i in order]
    pred = np.array([[5, 5, 0, 0], [5, 5, 0, 0]])  # on crowd 3 only
    metric = PanopticQuality(TWO_CATEGORIES)
    metric.update(gt, gt_segments, pred, [{"id": 5, "category_id": 1}])
    assert metric.fp.tolist() == [false_positives, 0, 0]
    assert metric.compute()["All"]["n"] == false_positives


def test_iou_of_one_half_is_not_a_match():
    gt = np.array([[1, 1, 2, 2]])
    pred = np.array([[1, 1, 1, 1]])
    metric = PanopticQuality(TWO_CATEGORIES)
    metric.update(gt, [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2}], pred, [{"id": 1, "category_id": 1}])
    assert (metric.tp.tolist(), metric.fp.tolist(), metric.fn.tolist()) == ([0, 0, 0], [1, 0, 0], [1, 1, 0])


def test_group_without_categories_is_nan():
    metric = PanopticQuality([{"id": 1, "isthing": 1}])
    ids = np.ones((2, 2), np.int64)
    metric.update(ids, [{"id": 1, "category_id": 1}], ids, [{"id": 1, "category_id": 1}])
    results = metric.compute()
    assert results["All"] == results["Things"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}
    assert results["Stuff"]["n"] == 0 and math.isnan(results["Stuff"]["pq"])


# ---------------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture
def small_files(tmp_path):
    """A valid one-image gt / prediction pair on disk; returns a function writing an edited prediction."""
    gt = np.array([[1, 1, 2, 2]] * 4)
    pred = np.array([[5, 5, 5, 6]] * 4)
    for name in ("gt", "pred"):
        (tmp_path / name).mkdir()
    write_panoptic(tmp_path / "gt", "a.png", gt)
    write_panoptic(tmp_path / "pred", "a.png", pred)
    gt_ann = {
        "image_id": 7,
        "file_name": "a.png",
        "segments_info": [
            {"id": 1, "category_id": 1, "iscrowd": 0, "area": 8},
            {"id": 2, "category_id": 2, "iscrowd": 0, "area": 8},
        ],
    }
    pred_ann = {"image_id": 7, "file_name": "a.png",
                "segments_info": [{"id": 5, "category_id": 1}, {"id": 6, "category_id": 2}]}  # fmt: skip
    images = [{"id": 7, "file_name": "a.jpg", "width": 4, "height": 4}]
    save_split(tmp_path, "gt", [gt_ann], TWO_CATEGORIES, images)
    save_split(tmp_path, "pred", [pred_ann], TWO_CATEGORIES)

    def run(edit_pred=None, edit_gt=None):
        gt_data, pred_data = json.loads((tmp_path / "gt.json").read_text()), {"annotations": [copy.deepcopy(pred_ann)]}
        if edit_pred:
            edit_pred(pred_data)
        if edit_gt:
            edit_gt(gt_data)
        (tmp_path / "pred_edited.json").write_text(json.dumps(pred_data))
        (tmp_path / "gt_edited.json").write_text(json.dumps(gt_data))
        return pq_compute(
            tmp_path / "gt_edited.json", tmp_path / "pred_edited.json", tmp_path / "gt", tmp_path / "pred"
        )

    return tmp_path, run


def test_valid_small_files(small_files):
    _, run = small_files
    results = run()  # thing: IoU 8 / 12; stuff: IoU 4 / 8 is no match, so a FP and a FN
    assert results["Things"]["pq"] == pytest.approx(2 / 3) and results["Stuff"]["pq"] == 0.0
    assert results["All"] == pytest.approx({"pq": 1 / 3, "sq": 1 / 3, "rq": 0.5, "n": 2})


def test_prediction_for_unknown_image(small_files):
    _, run = small_files
    extra = {"image_id": 99, "file_name": "b.png", "segments_info": []}
    with pytest.raises(AnnotationError, match=r"pred_edited.json: predictions for image ids \[99\]"):
        run(lambda d: d["annotations"].append(extra))


def test_image_without_prediction(small_files):
    _, run = small_files
    with pytest.raises(AnnotationError, match=r"pred_edited.json: no prediction for the ground truth image ids \[7\]"):
        run(lambda d: d["annotations"].clear())


def test_png_ids_not_in_segments_info(small_files):
    _, run = small_files
    with pytest.raises(ValueError, match=r"pred/a.png .*pred_edited.json\): segment ids \[6\] are in the id map"):
        run(lambda d: d["annotations"][0]["segments_info"].pop())


def test_segments_info_ids_absent_from_png(small_files):
    _, run = small_files
    with pytest.raises(ValueError, match=r"pred/a.png .*: segments_info lists ids \[9\] that are absent"):
        run(lambda d: d["annotations"][0]["segments_info"].append({"id": 9, "category_id": 1}))


def test_duplicate_segment_ids(small_files):
    _, run = small_files
    with pytest.raises(ValueError, match=r"pred/a.png .*: segment id 5 appears twice"):
        run(lambda d: d["annotations"][0]["segments_info"].append({"id": 5, "category_id": 2}))


def test_unknown_category(small_files):
    _, run = small_files
    with pytest.raises(ValueError, match=r"pred/a.png .*: segment 6 has category_id 42, which is not in the categ"):
        run(lambda d: d["annotations"][0]["segments_info"][1].update(category_id=42))


def test_void_id_in_segments_info(small_files):
    _, run = small_files
    with pytest.raises(ValueError, match=r"pred/a.png .*: segments_info lists id 0, which is void"):
        run(lambda d: d["annotations"][0]["segments_info"].append({"id": 0, "category_id": 1}))


def test_png_size_differs_from_ground_truth(small_files):
    root, run = small_files
    write_panoptic(root / "pred", "a.png", np.array([[5, 5, 5, 6]] * 3))
    with pytest.raises(ValueError, match=r"pred/a.png .*: the prediction is 4x3 but the ground truth .*gt/a.png"):
        run()


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_png_not_rgb(small_files, mode):
    root, run = small_files
    Image.new(mode, (4, 4)).save(root / "pred" / "a.png")
    with pytest.raises(ValueError, match=rf"pred/a.png: a panoptic PNG must be 8-bit RGB, got mode {mode}"):
        run()


def test_missing_and_corrupt_png(small_files):
    root, run = small_files
    with pytest.raises(FileNotFoundError, match=r"pred/b.png: panoptic PNG not found"):
        run(lambda d: d["annotations"][0].update(file_name="b.png"))
    (root / "pred" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match=r"pred/a.png: not a readable panoptic PNG"):
        run()


def test_ground_truth_area_differs_from_png(small_files):
    _, run = small_files
    with pytest.raises(AnnotationError, match=r"gt_edited.json: segment 2 of a.png has area 9, but .*gt/a.png has 8"):
        run(edit_gt=lambda d: d["annotations"][0]["segments_info"][1].update(area=9))


def test_ground_truth_png_ids_not_in_segments_info(small_files):
    _, run = small_files

    def drop(d):
        d["annotations"][0]["segments_info"].pop()

    with pytest.raises(ValueError, match=r"gt/a.png .*gt_edited.json\): segment ids \[2\] are in the id map"):
        run(edit_gt=drop)


def test_bad_json(small_files):
    root, _ = small_files
    (root / "pred_bad.json").write_text("{not json")
    with pytest.raises(AnnotationError, match=r"pred_bad.json: not valid JSON"):
        pq_compute(root / "gt.json", root / "pred_bad.json", root / "gt", root / "pred")
    (root / "pred_bad.json").write_text(json.dumps({"annotations": [{"image_id": 7}]}))
    with pytest.raises(AnnotationError, match=r"pred_bad.json: an annotation lacks 'file_name'"):
        pq_compute(root / "gt.json", root / "pred_bad.json", root / "gt", root / "pred")
    shutil.rmtree(root / "pred")
    with pytest.raises(FileNotFoundError, match=r"pred: folder of panoptic PNGs not found"):
        pq_compute(root / "gt.json", root / "pred.json", root / "gt", root / "pred")


def test_cli_equals_panopticapi(panoptic_case, tmp_path, capsys):
    from clusterformer.cli import main

    gt_json, pred_json, gt_folder, pred_folder = panoptic_case
    expected, _ = reference_pq_compute(*map(str, panoptic_case))
    out = tmp_path / "pq.json"
    argv = [
        "evaluate",
        "--task",
        "panoptic",
        "--gt",
        str(gt_json),
        "--gt-dir",
        str(gt_folder),
        "--pred",
        str(pred_json),
    ]
    assert main([*argv, "--pred-dir", str(pred_folder), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for key in ("pq", "sq", "rq"):
            assert printed[key.upper() + suffix] == pytest.approx(expected[group][key], abs=1e-6), (group, key)
        assert printed["n" + suffix] == expected[group]["n"]
    assert set(printed["per_class"]) == {str(c) for c in expected["per_class"]}
    for category, values in expected["per_class"].items():
        assert printed["per_class"][str(category)]["pq"] == pytest.approx(values["pq"], abs=1e-6)
    # bad input: one line naming the file, exit status 2
    assert main([*argv, "--pred-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere: folder of panoptic PNGs not found" in err
