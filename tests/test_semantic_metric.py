"""Semantic-segmentation metrics against mmsegmentation's formulas, and bad label files."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from clusterformer.data import CATEGORIES
from clusterformer.metrics.semantic import SemanticConfusion, evaluate_semantic

# ---------------------------------------------------------------------------------------------------------------------
# Reference: mmsegmentation's IoUMetric.intersect_and_union (per image) and total_area_to_metrics (dataset sums),
# written with per-class loops.


def reference_intersect_and_union(pred_label, label, num_classes, ignore_index):
    mask = label != ignore_index
    pred_label, label = pred_label[mask], label[mask]
    intersect = pred_label[pred_label == label]
    area_intersect = np.array([(intersect == c).sum() for c in range(num_classes)], np.float64)
    area_pred_label = np.array([(pred_label == c).sum() for c in range(num_classes)], np.float64)
    area_label = np.array([(label == c).sum() for c in range(num_classes)], np.float64)
    area_union = area_pred_label + area_label - area_intersect
    return area_intersect, area_union, area_pred_label, area_label


def reference_metrics(pairs, num_classes, ignore_index=255):
    """``pairs``: (prediction, label) per image."""
    results = [reference_intersect_and_union(p, lab, num_classes, ignore_index) for p, lab in pairs]
    total_intersect, total_union, _, total_label = (sum(r[i] for r in results) for i in range(4))
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = total_intersect / total_union
        acc = total_intersect / total_label
        all_acc = total_intersect.sum() / total_label.sum()
    return {"aAcc": all_acc, "mIoU": np.nanmean(iou), "mAcc": np.nanmean(acc), "IoU": iou, "Acc": acc}


def assert_same(results, expected):
    for key in ("aAcc", "mIoU", "mAcc"):
        assert results[key] == pytest.approx(expected[key], abs=1e-12), key
    for key in ("IoU", "Acc"):
        np.testing.assert_allclose(results[key], expected[key], atol=1e-12, equal_nan=True)


def random_pairs(rng, count=6, num_classes=6, used=4):
    """Label maps with 255 regions over ``used`` of ``num_classes`` classes; predictions mostly right."""
    pairs = []
    for _ in range(count):
        h, w = rng.integers(5, 30, 2)
        label = rng.integers(0, used, (h, w))
        label[rng.uniform(size=(h, w)) < 0.2] = 255
        label[: h // 3, : w // 3] = 255
        prediction = np.where(
            rng.uniform(size=(h, w)) < 0.7, np.minimum(label, used - 1), rng.integers(0, used, (h, w))
        )
        label[-1, -1] = 0
        prediction[-1, -1] = used  # class `used` is predicted but never labelled: IoU 0, no accuracy
        pairs.append((prediction, label))
    return pairs


def test_random_maps_equal_mmsegmentation():
    rng = np.random.default_rng(0)
    pairs = random_pairs(rng, num_classes=6, used=4)
    expected = reference_metrics(pairs, 6)
    metric = SemanticConfusion(6)
    for prediction, label in pairs:
        metric.update(prediction, label)
    results = metric.compute()
    assert_same(results, expected)
    # class 4: predicted only, IoU 0, counts in mIoU; class 5: in neither, NaN, skipped by the means
    assert results["IoU"][4] == 0.0 and math.isnan(results["Acc"][4])
    assert math.isnan(results["IoU"][5]) and math.isnan(results["Acc"][5])
    assert results["mIoU"] == pytest.approx(np.mean(results["IoU"][:5]))


def test_dataset_level_sums_not_a_mean_over_images():
    metric = SemanticConfusion(2)
    metric.update(np.array([[0, 0, 0, 1]]), np.array([[0, 0, 0, 0]]))  # class 0: IoU 3/4
    metric.update(np.array([[0, 1]]), np.array([[1, 1]]))  # class 0: IoU 0/1, class 1: IoU 1/3
    results = metric.compute()
    assert results["IoU"] == pytest.approx([3 / 5, 1 / 3])
    assert results["mIoU"] == pytest.approx((3 / 5 + 1 / 3) / 2)
    assert results["Acc"] == pytest.approx([3 / 4, 1 / 2])
    assert results["aAcc"] == pytest.approx(4 / 6)


def test_ignored_pixels_count_nowhere_whatever_their_prediction():
    metric = SemanticConfusion(3, ignore_index=7)
    metric.update(np.array([[2, 2, 1]]), np.array([[7, 7, 1]]))
    assert metric.confusion.tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert metric.compute()["mIoU"] == 1.0


def test_torch_batches_equal_numpy_images():
    rng = np.random.default_rng(1)
    pairs = [(rng.integers(0, 5, (8, 9)), np.where(rng.uniform(size=(8, 9)) < 0.2, 255, rng.integers(0, 5, (8, 9))))
             for _ in range(4)]  # fmt: skip
    one_by_one, batched = SemanticConfusion(5), SemanticConfusion(5)
    for prediction, label in pairs:
        one_by_one.update(prediction, label)
    batched.update(
        torch.from_numpy(np.stack([p for p, _ in pairs])), torch.from_numpy(np.stack([lab for _, lab in pairs]))
    )
    assert (batched.confusion == one_by_one.confusion).all()
    merged = SemanticConfusion(5).merge(one_by_one).merge(batched)
    assert (merged.confusion == 2 * one_by_one.confusion).all()
    assert_same(merged.compute(), reference_metrics(pairs, 5))


def test_metric_update_compute_reset_round_trip():
    """A torchmetrics Metric with one summed state: the same images after ``reset`` give the same figures, and
    the counts are no part of a ``state_dict`` (a task's checkpoint keeps its keys)."""
    rng = np.random.default_rng(3)
    pairs = random_pairs(rng, num_classes=6, used=4)
    metric = SemanticConfusion(6)
    for prediction, label in pairs:
        metric.update(torch.from_numpy(prediction), torch.from_numpy(label))
    first = metric.compute()
    assert_same(first, reference_metrics(pairs, 6))
    metric.reset()
    assert metric.confusion.shape == (6, 6) and metric.confusion.sum() == 0
    for prediction, label in pairs:
        metric.update(prediction, label)
    assert_same(metric.compute(), first)
    assert metric.state_dict() == {} and metric._reductions["confusion"].__name__ == "dim_zero_sum"
    with pytest.raises(ValueError, match="cannot merge 5 classes into 6"):
        metric.merge(SemanticConfusion(5))


def test_empty_metric_is_nan():
    results = SemanticConfusion(3).compute()
    assert math.isnan(results["mIoU"]) and math.isnan(results["aAcc"]) and len(results["IoU"]) == 3


@pytest.mark.parametrize(
    "prediction, label, message",
    [
        (np.zeros((2, 2), np.int64), np.zeros((2, 3), np.int64), r"prediction has shape \(2, 2\) but label \(2, 3\)"),
        (
            np.zeros((2, 2)),
            np.zeros((2, 2), np.int64),
            r"prediction must hold integer class indices, got dtype (torch\.)?float64",
        ),
        (np.array([[0, 3]]), np.array([[0, 1]]), r"predicted values \[3\] are outside the classes 0..2"),
        (np.array([[0, -1]]), np.array([[0, 1]]), r"predicted values \[-1\] are outside the classes 0..2"),
        (np.array([[0, 1]]), np.array([[0, 5]]), r"label values \[5\] are neither classes 0..2 nor ignore_index 255"),
    ],
)
def test_bad_arrays(prediction, label, message):
    with pytest.raises((ValueError, TypeError), match=message):
        SemanticConfusion(3).update(prediction, label)
    with pytest.raises((ValueError, TypeError), match=message):
        SemanticConfusion(3).update(torch.from_numpy(prediction), torch.from_numpy(label))


# ---------------------------------------------------------------------------------------------------------------------
# Folders of label PNGs


def write_folder(folder, maps):
    folder.mkdir(exist_ok=True)
    for name, values in maps.items():
        Image.fromarray(np.asarray(values, np.uint8)).save(folder / f"{name}.png")


def test_shapes_folders_with_reduce_zero_label(shapes_dir, tmp_path):
    """The shapes dataset's ADE20K-style files (0 = unlabelled) against predictions written the same way."""
    shapes = shapes_dir(3, 1, 10, 48)
    num_classes = len(CATEGORIES)
    rng = np.random.default_rng(2)
    files, pairs = {}, []
    for path in sorted((shapes / "semantic" / "val").glob("*.png")):
        raw = np.asarray(Image.open(path)).astype(np.int64)
        row, column = rng.integers(0, 40, 2)
        raw[row : row + 5] = 0  # unlabelled
        raw[:, column : column + 3] = 255  # also ignored by mmsegmentation's reduce_zero_label
        label = np.where((raw == 0) | (raw == 255), 255, raw - 1)
        prediction = np.roll(np.where(label == 255, 0, label), int(rng.integers(-3, 4)), 1)
        wrong = rng.uniform(size=prediction.shape) < 0.1
        prediction[wrong] = rng.integers(0, num_classes, wrong.sum())
        files[path.stem] = (raw, prediction + 1)
        pairs.append((prediction, label))
    write_folder(tmp_path / "gt", {stem: raw for stem, (raw, _) in files.items()})
    write_folder(tmp_path / "pred", {stem: pred for stem, (_, pred) in files.items()})
    results = evaluate_semantic(tmp_path / "gt", tmp_path / "pred", num_classes)
    assert_same(results, reference_metrics(pairs, num_classes))
    assert 0.3 < results["mIoU"] < 1.0
    perfect = evaluate_semantic(shapes / "semantic" / "val", shapes / "semantic" / "val", num_classes + 1, False)
    assert perfect["mIoU"] == 1.0 and perfect["aAcc"] == 1.0


def test_folders_without_reduce_zero_label(tmp_path):
    label = np.array([[0, 1, 2, 255], [2, 2, 1, 0]])
    prediction = np.array([[0, 2, 2, 1], [2, 1, 1, 0]])
    write_folder(tmp_path / "gt", {"a": label})
    write_folder(tmp_path / "pred", {"a": prediction})
    results = evaluate_semantic(tmp_path / "gt", tmp_path / "pred", 4, reduce_zero_label=False)
    assert_same(results, reference_metrics([(prediction, label)], 4))
    # class 0: 2/2; class 1: 1/(2 + 2 - 1); class 2: 2/(3 + 3 - 2); class 3: never present
    assert results["IoU"][:3] == pytest.approx([1.0, 1 / 3, 1 / 2]) and math.isnan(results["IoU"][3])


def test_reduce_zero_label_by_hand(tmp_path):
    write_folder(tmp_path / "gt", {"a": [[0, 1, 2, 255]]})
    write_folder(tmp_path / "pred", {"a": [[2, 1, 1, 2]]})  # the prediction on unlabelled pixels does not count
    results = evaluate_semantic(tmp_path / "gt", tmp_path / "pred", 2)
    assert results["IoU"] == pytest.approx([1 / 2, 0.0])
    assert results["aAcc"] == 0.5


@pytest.fixture
def folders(tmp_path):
    write_folder(tmp_path / "gt", {"a": [[1, 2, 0]], "b": [[3, 3, 3]]})
    write_folder(tmp_path / "pred", {"a": [[1, 1, 1]], "b": [[3, 2, 1]]})
    return tmp_path / "gt", tmp_path / "pred"


def test_prediction_missing(folders):
    gt, pred = folders
    (pred / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"pred: no prediction b.png for the ground truth .*gt/b.png"):
        evaluate_semantic(gt, pred, 3)


def test_prediction_for_unknown_image(folders):
    gt, pred = folders
    write_folder(pred, {"c": [[1, 1, 1]]})
    with pytest.raises(ValueError, match=r"pred/c.png: a prediction for an image without ground truth"):
        evaluate_semantic(gt, pred, 3)


def test_size_mismatch(folders):
    gt, pred = folders
    write_folder(pred, {"b": [[3, 2], [1, 1]]})
    with pytest.raises(ValueError, match=r"pred/b.png: prediction is 2x2 but its ground truth .*gt/b.png is 3x1"):
        evaluate_semantic(gt, pred, 3)


@pytest.mark.parametrize("mode", ["RGB", "I;16", "RGBA"])
def test_wrong_png_mode(folders, mode):
    gt, pred = folders
    Image.new(mode, (3, 1)).save(gt / "a.png")
    with pytest.raises(ValueError, match=rf"gt/a.png: label PNG must be 8-bit single-channel .*got mode {mode}"):
        evaluate_semantic(gt, pred, 3)


def test_unreadable_png(folders):
    gt, pred = folders
    (pred / "a.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"pred/a.png: not a readable label PNG"):
        evaluate_semantic(gt, pred, 3)


def test_values_outside_the_classes(folders):
    gt, pred = folders
    write_folder(gt, {"b": [[3, 4, 3]]})
    with pytest.raises(ValueError, match=r"gt/b.png: label values \[4\] are outside the 3 classes"):
        evaluate_semantic(gt, pred, 3)
    write_folder(gt, {"b": [[3, 3, 3]]})
    write_folder(pred, {"b": [[0, 3, 3]]})  # 0 (unlabelled) is no prediction
    with pytest.raises(ValueError, match=r"pred/b.png: predicted values \[0\] are outside the classes 1..3"):
        evaluate_semantic(gt, pred, 3)
    write_folder(pred, {"b": [[2, 3, 3]]})
    with pytest.raises(ValueError, match=r"pred/b.png: predicted values \[3\] are outside the classes 0..2"):
        evaluate_semantic(gt, pred, 3, reduce_zero_label=False)


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: folder not found"):
        evaluate_semantic(tmp_path / "nowhere", tmp_path, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no ground truth PNGs"):
        evaluate_semantic(tmp_path / "empty", tmp_path, 3)


# ---------------------------------------------------------------------------------------------------------------------
# clusterformer evaluate --task semantic


def test_cli_equals_mmsegmentation(tmp_path, capsys):
    import json

    from clusterformer.cli import main

    rng = np.random.default_rng(5)
    pairs = random_pairs(rng, num_classes=6, used=4)
    write_folder(tmp_path / "gt", {f"img{i}": label for i, (_, label) in enumerate(pairs)})
    write_folder(tmp_path / "pred", {f"img{i}": prediction for i, (prediction, _) in enumerate(pairs)})
    out = tmp_path / "metrics" / "semantic.json"
    argv = ["evaluate", "--task", "semantic", "--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "pred")]
    assert main([*argv, "--num-classes", "6", "--no-reduce-zero-label", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    expected = reference_metrics(pairs, 6)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert printed[key] == pytest.approx(expected[key], abs=1e-12), key
    assert list(printed["IoU"]) == [str(c) for c in range(6)]
    assert printed["IoU"]["5"] is None  # never labelled nor predicted: NaN in mmsegmentation, null in JSON
    np.testing.assert_allclose([printed["IoU"][str(c)] for c in range(5)], expected["IoU"][:5], atol=1e-12)
    # the default is ADE20K's convention, where 0 is unlabelled and the same files give other numbers
    assert main([*argv, "--num-classes", "6"]) == 2
    assert "predicted values [0] are outside the classes 1..6" in capsys.readouterr().err


def test_cli_bad_input_is_one_line(folders, capsys):
    from clusterformer.cli import main

    gt, pred = folders
    assert main(["evaluate", "--task", "semantic", "--gt", str(gt), "--pred", str(pred)]) == 2
    assert "--task semantic needs --num-classes" in capsys.readouterr().err
    assert (
        main(["evaluate", "--task", "semantic", "--gt", str(gt / "x"), "--pred", str(pred), "--num-classes", "3"]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gt/x: folder not found" in err
