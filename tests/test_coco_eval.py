"""COCO box and mask AP/AR equal pycocotools' COCOeval; bad results files give errors naming the file."""

import contextlib
import copy
import io
import json
import re

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from clusterformer.cli import main
from clusterformer.data.coco import AnnotationError
from clusterformer.metrics import ResultsError, coco_evaluate, to_coco_results

SIZE = 96  # large enough for some medium (> 32^2) objects; no large ones, so APl is -1
EMPTY_IMAGE_IDS = (1001, 1002, 1003)
NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


@pytest.fixture(scope="module")
def gt_file(shapes_dir, tmp_path_factory):
    """The shapes train split (30 images, several crowds) plus images without objects."""
    data = json.loads((shapes_dir(6, 30, 1, SIZE) / "annotations" / "instances_train.json").read_text())
    data["images"] += [dict(id=i, file_name=f"{i}.png", width=SIZE, height=SIZE) for i in EMPTY_IMAGE_IDS]
    path = tmp_path_factory.mktemp("coco_eval") / "instances.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def gt(gt_file):
    return json.loads(gt_file.read_text())


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def box_of(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def rectangle(rng, size_range=(3, 30)) -> np.ndarray:
    w, h = rng.integers(*size_range, 2)
    x, y = rng.integers(0, SIZE - w), rng.integers(0, SIZE - h)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[y : y + h, x : x + w] = True
    return mask


def perturbed_predictions(gt: dict, seed: int) -> list[dict]:
    """Results with both ``bbox`` and ``segmentation``: jittered ground truth, some missed, some with the wrong
    class, duplicates, false positives (also on the images without objects) and detections on crowds."""
    rng = np.random.default_rng(seed)
    categories = [c["id"] for c in gt["categories"]]
    results = []

    def add(image_id, category_id, box, mask):
        score = float(rng.uniform())
        results.append(dict(image_id=image_id, category_id=category_id, score=score, bbox=box, segmentation=rle(mask)))

    for ann in gt["annotations"]:
        mask = mask_utils.decode(ann["segmentation"]).astype(bool)
        if ann["iscrowd"]:  # small detections inside the crowd: matched to it, so ignored
            ys, xs = np.nonzero(mask)
            for pixel in rng.integers(0, len(ys), 3):
                y, x = ys[pixel], xs[pixel]
                part = mask & (np.abs(np.arange(SIZE)[:, None] - y) < 4) & (np.abs(np.arange(SIZE) - x) < 4)
                add(ann["image_id"], ann["category_id"], box_of(part), part)
            continue
        for copy_index in range(1 + (rng.uniform() < 0.2)):  # sometimes a duplicate
            if rng.uniform() < 0.15:  # missed
                continue
            shift = rng.integers(-2 - 2 * copy_index, 3 + 2 * copy_index, 2)
            moved = np.roll(mask, tuple(shift), axis=(0, 1))
            x, y, w, h = ann["bbox"]
            box = [
                x + rng.normal(0, 1.5),
                y + rng.normal(0, 1.5),
                max(1.0, w + rng.normal(0, 2)),
                max(1.0, h + rng.normal(0, 2)),
            ]
            category = ann["category_id"] if rng.uniform() > 0.1 else int(rng.choice(categories))
            add(ann["image_id"], category, box, moved if moved.any() else mask)
    for image in gt["images"]:
        for _ in range(int(rng.integers(1, 3))):  # false positives
            mask = rectangle(rng)
            add(image["id"], int(rng.choice(categories)), box_of(mask), mask)
    return results


def for_iou_type(results: list[dict], iou_type: str) -> list[dict]:
    """The results as one would write them for pycocotools: only the box or only the mask."""
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    return [{k: v for k, v in r.items() if k != drop} for r in results]


def reference_stats(gt_file, results: list[dict], iou_type: str) -> np.ndarray:
    """pycocotools used directly, as its own example does."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_shapes_ground_truth_has_crowds_and_medium_objects(gt):
    # the comparisons below only mean something if these cases are present
    assert sum(a["iscrowd"] for a in gt["annotations"]) >= 3
    assert any(a["area"] > 32**2 and not a["iscrowd"] for a in gt["annotations"])
    assert not any(a["area"] > 96**2 for a in gt["annotations"])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_equals_cocoeval(gt_file, gt, iou_type, seed):
    results = perturbed_predictions(gt, seed)
    assert {r["image_id"] for r in results} >= set(EMPTY_IMAGE_IDS)
    original = copy.deepcopy(results)
    metrics = coco_evaluate(gt_file, results, iou_type)
    assert results == original  # the caller's list is not modified
    expected = reference_stats(gt_file, for_iou_type(results, iou_type), iou_type)
    assert list(metrics) == NAMES
    np.testing.assert_allclose([metrics[name] for name in NAMES], expected, rtol=0, atol=1e-6)
    assert 0.1 < metrics["AP"] < 0.95 and metrics["APl"] == -1 and metrics["ARl"] == -1


def test_file_and_dict_inputs_agree(gt_file, gt, tmp_path):
    results = perturbed_predictions(gt, 2)
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    gt_copy = copy.deepcopy(gt)
    for iou_type in ("bbox", "segm"):
        assert coco_evaluate(gt_copy, results_file, iou_type) == coco_evaluate(gt_file, results, iou_type)
    assert gt_copy == gt


def test_segm_areas_are_mask_areas_even_when_results_carry_boxes(gt_file, gt):
    results = perturbed_predictions(gt, 3)
    for result in results:  # boxes far larger than the masks would put the results in other area ranges
        result["bbox"] = [0.0, 0.0, float(SIZE), float(SIZE)]
    assert coco_evaluate(gt_file, results, "segm") == coco_evaluate(gt_file, for_iou_type(results, "segm"), "segm")


def ground_truth_as_predictions(gt: dict) -> list[dict]:
    """Every non-crowd object as a prediction, through :func:`to_coco_results` as the training loop will."""
    category_ids = [c["id"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    results = []
    for image in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == image["id"] and not a["iscrowd"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
        masks = [torch.from_numpy(mask_utils.decode(a["segmentation"]).astype(bool)) for a in anns]
        masks = torch.stack(masks) if masks else torch.zeros((0, SIZE, SIZE), dtype=torch.bool)
        labels = torch.tensor([category_ids.index(a["category_id"]) for a in anns], dtype=torch.int64)
        scores = torch.linspace(1.0, 0.5, len(anns))
        results += to_coco_results(image["id"], boxes, scores, labels, masks, label_to_category=category_ids)
    return results


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perfect_predictions_give_ap_1(gt_file, gt, iou_type):
    metrics = coco_evaluate(gt_file, ground_truth_as_predictions(gt), iou_type)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "AR100", "ARs", "ARm"):
        assert metrics[name] == pytest.approx(1.0, abs=1e-12), name
    assert metrics["APl"] == -1


def test_to_coco_results_round_trips_boxes_masks_and_categories():
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(np.stack([rectangle(rng) for _ in range(3)]))
    boxes = torch.tensor([[1.5, 2.0, 11.0, 22.25], [0.0, 0.0, 96.0, 96.0], [40.0, 30.0, 41.0, 31.0]])
    results = to_coco_results(
        7, boxes, torch.tensor([0.9, 0.5, 0.1]), torch.tensor([0, 2, 1]), masks, {0: 1, 1: 5, 2: 9}
    )
    json.dumps(results)  # plain JSON types only
    assert [r["category_id"] for r in results] == [1, 9, 5]
    assert results[0]["bbox"] == [1.5, 2.0, 9.5, 20.25] and results[0]["image_id"] == 7
    assert results[1]["score"] == pytest.approx(0.5)
    for result, mask in zip(results, masks, strict=True):
        assert isinstance(result["segmentation"]["counts"], str)
        assert (mask_utils.decode(result["segmentation"]).astype(bool) == mask.numpy()).all()
    assert "segmentation" not in to_coco_results(1, boxes, torch.ones(3), torch.tensor([0, 1, 2]))[0]
    assert to_coco_results(1, torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.int64)) == []
    with pytest.raises(ValueError, match=r"labels \[3\]"):
        to_coco_results(1, boxes, torch.ones(3), torch.tensor([0, 1, 3]), label_to_category=[1, 2, 3])


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_no_results_give_zero_where_there_is_ground_truth(gt_file, tmp_path, iou_type):
    # pycocotools' loadRes fails on an empty list; with no detections, every AP and AR over ground truth is 0
    empty_file = tmp_path / "results.json"
    empty_file.write_text("[]")
    expected = {name: -1.0 if name in ("APl", "ARl") else 0.0 for name in NAMES}
    assert coco_evaluate(gt_file, [], iou_type) == expected
    assert coco_evaluate(gt_file, empty_file, iou_type) == expected


def test_no_ground_truth_objects_gives_minus_one_as_cocoeval(gt_file, gt, tmp_path):
    no_objects = tmp_path / "no_objects.json"
    no_objects.write_text(json.dumps({**gt, "annotations": []}))
    results = for_iou_type(perturbed_predictions(gt, 4), "bbox")
    np.testing.assert_allclose(list(coco_evaluate(no_objects, results, "bbox").values()), -1.0)
    np.testing.assert_allclose(reference_stats(no_objects, results, "bbox"), -1.0)
    assert list(coco_evaluate(no_objects, [], "segm").values()) == [-1.0] * len(NAMES)


GOOD = dict(image_id=1, category_id=1, score=0.5, bbox=[1.0, 2.0, 10.0, 10.0])
BAD_RESULTS = {
    "not_json": ("[{'image_id': 1", "not valid JSON"),
    "not_a_list": ({"annotations": [GOOD]}, "expected a JSON list"),
    "not_an_object": ([GOOD, [1, 2]], "result 1 is not an object"),
    "missing_score": ([GOOD, {k: v for k, v in GOOD.items() if k != "score"}], r"result 1 lacks \['score'\]"),
    "missing_bbox": ([{k: v for k, v in GOOD.items() if k != "bbox"}], r"result 0 lacks \['bbox'\]"),
    "score_not_number": ([{**GOOD, "score": "high"}], "score 'high', not a finite number"),
    "unknown_image": ([GOOD, {**GOOD, "image_id": 999}, {**GOOD, "image_id": 998}], "image_id 998, 999 not in the"),
    "unknown_category": ([{**GOOD, "category_id": 77}], r"category_id 77 not in the categories \[1, 2, 3, 4\]"),
    "bbox_three_numbers": ([{**GOOD, "bbox": [1, 2, 3]}], r"bbox \[1, 2, 3\], not 4 finite numbers"),
    "bbox_not_numbers": ([{**GOOD, "bbox": [1, 2, "3", 4]}], "not 4 finite numbers"),
    "negative_width": ([{**GOOD, "bbox": [5.0, 5.0, -2.0, 4.0]}], "negative width"),
}


@pytest.mark.parametrize("case", list(BAD_RESULTS))
def test_bad_results_file_names_file_and_problem(gt_file, tmp_path, case):
    content, problem = BAD_RESULTS[case]
    path = tmp_path / f"{case}.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ResultsError, match=f"^{re.escape(str(path))}: .*{problem}"):
        coco_evaluate(gt_file, path, "bbox")


def test_bad_segm_results_and_missing_files(gt_file, tmp_path):
    good = dict(image_id=1, category_id=1, score=0.5, segmentation=rle(rectangle(np.random.default_rng(0))))
    with pytest.raises(ResultsError, match="not a compressed RLE"):
        coco_evaluate(gt_file, [{**good, "segmentation": [[1, 2, 3, 4, 5, 6]]}], "segm")
    small = rle(np.ones((10, 12), bool))
    with pytest.raises(ResultsError, match=r"mask of size \[10, 12\] for image 1 of size \[96, 96\]"):
        coco_evaluate(gt_file, [{**good, "segmentation": small}], "segm")
    with pytest.raises(ResultsError, match=r"lacks \['segmentation'\]"):
        coco_evaluate(gt_file, [GOOD], "segm")
    with pytest.raises(ResultsError, match=re.escape(f"{tmp_path / 'absent.json'}: results file not found")):
        coco_evaluate(gt_file, tmp_path / "absent.json", "bbox")
    with pytest.raises(AnnotationError, match=re.escape(f"{tmp_path / 'absent.json'}: annotation file not found")):
        coco_evaluate(tmp_path / "absent.json", [], "bbox")
    with pytest.raises(ValueError, match="iou_type"):
        coco_evaluate(gt_file, [], "keypoints")


@pytest.mark.parametrize(("task", "iou_type"), [("detection", "bbox"), ("instance", "segm")])
def test_cli_prints_the_metrics_as_json(gt_file, gt, tmp_path, capsys, task, iou_type):
    results_file, out = tmp_path / "results.json", tmp_path / "metrics" / "metrics.json"
    results_file.write_text(json.dumps(perturbed_predictions(gt, 5)))
    assert main(["evaluate", "--task", task, "--gt", str(gt_file), "--pred", str(results_file), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    per_class = printed.pop("per_class")  # AP, AP50, AP75 of each category (tests/test_evaluate_plots.py)
    assert printed == coco_evaluate(gt_file, results_file, iou_type)
    assert list(per_class) == [str(c["id"]) for c in gt["categories"]]
    assert all(list(values) == ["AP", "AP50", "AP75"] for values in per_class.values())


@pytest.mark.parametrize("case", ["unknown_category", "not_json", "missing_pred"])
def test_cli_bad_input_exits_2_with_one_line(gt_file, tmp_path, capsys, case):
    argv = ["evaluate", "--task", "detection", "--gt", str(gt_file)]
    if case != "missing_pred":
        content, _ = BAD_RESULTS[case]
        path = tmp_path / "results.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        argv += ["--pred", str(path)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clusterformer evaluate: error: ")
    assert (str(path) if case != "missing_pred" else "needs --pred") in lines[0]


def test_cli_refuses_an_existing_out_unless_overwrite(gt_file, gt, tmp_path, capsys):
    results_file, out = tmp_path / "results.json", tmp_path / "metrics.json"
    results_file.write_text(json.dumps(perturbed_predictions(gt, 5)))
    out.write_text("earlier metrics\n")
    argv = ["evaluate", "--task", "detection", "--gt", str(gt_file), "--pred", str(results_file), "--out", str(out)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and out.read_text() == "earlier metrics\n"  # refused before evaluating
    assert captured.err == f"clusterformer evaluate: error: {out}: already exists; pass --overwrite to replace it\n"
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out)
