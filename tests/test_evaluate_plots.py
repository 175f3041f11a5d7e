"""clusterformer evaluate --plot: the per-class numbers it draws are the metrics' own (per-class AP as pycocotools
computes it for one category, the precision-recall curves behind AP, per-class IoU and PQ), the PNGs are written
and not blank; and evaluate's output: JSON alone on stdout, progress bars on a terminal only."""

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from clusterformer.cli import main
from clusterformer.data import CATEGORIES
from clusterformer.metrics import plots
from clusterformer.metrics.coco import per_class_ap, precision_recall_curves, run_cocoeval, stats_of
from clusterformer.metrics.panoptic import pq_compute, write_panoptic
from clusterformer.metrics.semantic import evaluate_semantic
from test_coco_eval import perturbed_predictions
from test_panoptic_metric import harden_ground_truth, perturb_prediction, read_ids, save_split
from test_semantic_metric import random_pairs, write_folder

SIZE = 96
ABSENT = 99  # a category without ground truth


@pytest.fixture(scope="module")
def gt(shapes_dir):
    """The shapes train split (12 images) with one more category that no object has."""
    data = json.loads((shapes_dir(6, 12, 1, SIZE) / "annotations" / "instances_train.json").read_text())
    data["categories"].append({"id": ABSENT, "name": "hexagon", "supercategory": "shape"})
    return data


@pytest.fixture(scope="module")
def results(gt):
    """Perturbed ground truth, and false positives of the category without ground truth."""
    results = perturbed_predictions(gt, 3)
    return results + [dict(result, category_id=ABSENT, score=0.5) for result in results[:3]]


@pytest.fixture(scope="module")
def gt_file(gt, tmp_path_factory):
    path = tmp_path_factory.mktemp("evaluate_plots") / "instances.json"
    path.write_text(json.dumps(gt))
    return path


@pytest.fixture
def figures(monkeypatch):
    """The figures that metrics.plots saves, by file name, for their bars and curves."""
    drawn, save = {}, plots._save

    def recording(figure, path):
        drawn[path.name] = figure
        return save(figure, path)

    monkeypatch.setattr(plots, "_save", recording)
    return drawn


def one_category_stats(gt, results, iou_type, category):
    """pycocotools itself, restricted to one category (params.catIds), as its own example runs it."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        drop = "segmentation" if iou_type == "bbox" else "bbox"
        coco_dt = coco_gt.loadRes([{k: v for k, v in r.items() if k != drop} for r in copy.deepcopy(results)])
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.catIds = [category]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def assert_picture(path, min_width=400, min_height=200):
    """A PNG of a plausible size that is not one flat colour."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_width and image.height >= min_height, image.size
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
    assert (pixels.min(axis=-1) < 128).mean() > 0.01  # text, axes and bars, not a white page


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_per_class_ap_is_pycocotools_ap_of_each_category(gt, results, iou_type):
    evaluator = run_cocoeval(gt, results, iou_type)
    per_class = per_class_ap(evaluator)
    assert list(per_class) == [c["id"] for c in gt["categories"]]
    for category, values in per_class.items():
        expected = one_category_stats(gt, results, iou_type, category)
        got = [values["AP"], values["AP50"], values["AP75"]]
        np.testing.assert_allclose(got, expected[:3], rtol=0, atol=1e-12, err_msg=str(category))
    assert per_class[ABSENT] == {"AP": -1.0, "AP50": -1.0, "AP75": -1.0}
    # pycocotools' AP is the mean over the categories with ground truth
    stats = stats_of(evaluator)
    for key in ("AP", "AP50", "AP75"):
        present = [values[key] for category, values in per_class.items() if category != ABSENT]
        assert np.mean(present) == pytest.approx(stats[key], abs=1e-12)
    assert 0.1 < stats["AP"] < 0.95


def test_precision_recall_curves_average_to_the_ap(gt, results):
    evaluator = run_cocoeval(gt, results, "bbox")
    curves = precision_recall_curves(evaluator)
    per_class, stats = per_class_ap(evaluator), stats_of(evaluator)
    np.testing.assert_allclose(curves["recall"], np.linspace(0, 1, 101))
    for key in ("AP", "AP50", "AP75"):
        assert curves["precision"][key][ABSENT] is None
        for category, precision in curves["precision"][key].items():
            if category != ABSENT:
                assert precision.shape == (101,) and precision.min() >= 0
                assert precision.mean() == pytest.approx(per_class[category][key], abs=1e-12)
        assert curves["mean"][key].mean() == pytest.approx(stats[key], abs=1e-12)
    # precision at IoU 0.5 is pycocotools' own array at area "all", 100 detections
    params = evaluator.eval["params"]
    k = params.catIds.index(1)
    np.testing.assert_array_equal(curves["precision"]["AP50"][1], evaluator.eval["precision"][0, :, k, 0, 2])


def test_evaluate_plot_draws_the_coco_metrics(gt, results, gt_file, tmp_path, capsys, figures):
    results_file, folder = tmp_path / "results.json", tmp_path / "plots"
    results_file.write_text(json.dumps(results))
    argv = ["evaluate", "--task", "instance", "--gt", str(gt_file), "--pred", str(results_file), "--plot", str(folder)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)  # stdout is the JSON and nothing else: no pycocotools chatter
    for chatter in ("Loading and preparing", "DONE (t=", "Running per image", "Accumulating", "Average Precision"):
        assert chatter not in captured.out + captured.err
    assert "\r" not in captured.err  # not a terminal: no progress bar
    written = [folder / "per_class_ap.png", folder / "precision_recall.png"]
    assert captured.err.splitlines() == [f"wrote {path}" for path in written]
    for path in written:
        assert_picture(path)
    evaluator = run_cocoeval(gt, results, "segm")
    per_class = per_class_ap(evaluator)
    assert printed["per_class"] == {str(c): v for c, v in per_class.items()}
    # the bars are the per-class numbers, in the categories' order, under their names
    axes = figures["per_class_ap.png"].axes[0]
    names = [c["name"] for c in gt["categories"]]
    assert [label.get_text() for label in axes.get_yticklabels()] == names
    widths = [bar.get_width() for bar in axes.patches]
    expected = [max(per_class[c["id"]][key], 0) for key in ("AP50", "AP75", "AP") for c in gt["categories"]]
    np.testing.assert_allclose(widths, expected, atol=1e-12)
    assert f"AP {printed['AP']:.3f}" in axes.get_title()
    # the curves: one per category with ground truth and the mean, whose value each panel's title gives
    curves = precision_recall_curves(evaluator)
    for panel, key in zip(figures["precision_recall.png"].axes, ("AP50", "AP75", "AP"), strict=True):
        lines = panel.get_lines()
        assert len(lines) == len(gt["categories"])  # the category without ground truth has no curve
        np.testing.assert_allclose(lines[-1].get_ydata(), curves["mean"][key], atol=1e-12)
        assert f"{key} {printed[key]:.3f}" in panel.get_title()
    # an existing picture is refused before evaluating, and replaced with --overwrite
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"clusterformer evaluate: error: {written[0]}: already exists; pass --overwrite to replace it\n"
    assert main([*argv, "--overwrite"]) == 0


def test_evaluate_shows_progress_bars_only_on_a_terminal(gt_file, results, tmp_path, capsys, monkeypatch):
    from clusterformer import progress

    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    argv = ["evaluate", "--task", "detection", "--gt", str(gt_file), "--pred", str(results_file)]
    monkeypatch.setattr(progress, "on_terminal", lambda stream=None: True)
    assert main(argv) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # the bars are on stderr
    assert "COCO bbox" in captured.err and "\r" in captured.err


def test_evaluate_plot_refuses_a_file_as_folder(gt_file, tmp_path, capsys):
    (tmp_path / "plots").write_text("")
    argv = ["evaluate", "--task", "detection", "--gt", str(gt_file), "--pred", str(gt_file)]
    assert main([*argv, "--plot", str(tmp_path / "plots")]) == 2
    assert (
        capsys.readouterr().err
        == f"clusterformer evaluate: error: {tmp_path / 'plots'}: is a file; --plot takes a folder\n"
    )


def test_evaluate_plot_draws_the_per_class_iou(tmp_path, capsys, figures):
    pairs = random_pairs(np.random.default_rng(5), num_classes=6, used=4)
    write_folder(tmp_path / "gt", {f"img{i}": label for i, (_, label) in enumerate(pairs)})
    write_folder(tmp_path / "pred", {f"img{i}": prediction for i, (prediction, _) in enumerate(pairs)})
    names = ["road", "tree", "sky", "car", "person", "boat"]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    argv = ["evaluate", "--task", "semantic", "--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "pred"),
            "--num-classes", "6", "--no-reduce-zero-label", "--plot", str(tmp_path / "plots")]  # fmt: skip
    assert main([*argv, "--class-names", str(tmp_path / "names.txt")]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert captured.err == f"wrote {tmp_path / 'plots' / 'per_class_iou.png'}\n"
    assert_picture(tmp_path / "plots" / "per_class_iou.png", min_height=150)
    axes = figures["per_class_iou.png"].axes[0]
    assert [label.get_text() for label in axes.get_yticklabels()] == names
    iou = [printed["IoU"][str(c)] for c in range(6)]
    assert iou[5] is None  # neither labelled nor predicted: no bar, written n/a
    np.testing.assert_allclose([bar.get_width() for bar in axes.patches], [v or 0.0 for v in iou], atol=1e-12)
    assert "n/a (absent)" in [text.get_text() for text in axes.texts]
    assert f"mIoU {printed['mIoU']:.3f}" in axes.get_title()
    # the names must be one per class
    (tmp_path / "names.txt").write_text("road\ntree\n")
    assert main([*argv, "--overwrite", "--class-names", str(tmp_path / "names.txt")]) == 2
    assert "names.txt: 2 class names for --num-classes 6" in capsys.readouterr().err
    # on a terminal, a bar over the label maps, on stderr
    evaluate_semantic(tmp_path / "gt", tmp_path / "pred", 6, reduce_zero_label=False, progress=True)
    err = capsys.readouterr().err
    assert "mIoU:" in err and f"0/{len(pairs)}" in err and "\r" in err  # drawn at the start, cleared at the end


def test_evaluate_plot_draws_the_per_class_pq(shapes_dir, tmp_path, capsys, figures):
    shapes = shapes_dir(3, 1, 10, 48)
    source = json.loads((shapes / "annotations" / "panoptic_val.json").read_text())
    rng = np.random.default_rng(0)
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    gt_annotations, pred_annotations = [], []
    for ann in source["annotations"][:5]:
        ids = read_ids(shapes / "annotations" / "panoptic_val" / ann["file_name"])
        ids, segments = harden_ground_truth(ids, ann["segments_info"], rng)
        write_panoptic(tmp_path / "gt", ann["file_name"], ids)
        gt_annotations.append(dict(ann, segments_info=segments))
        pred, pred_segments = perturb_prediction(ids, segments, rng)
        write_panoptic(tmp_path / "pred", ann["file_name"], pred)
        pred_annotations.append(
            {"image_id": ann["image_id"], "file_name": ann["file_name"], "segments_info": pred_segments}
        )
    save_split(tmp_path, "gt", gt_annotations, source["categories"], source["images"][:5])
    save_split(tmp_path, "pred", pred_annotations, source["categories"])
    argv = ["evaluate", "--task", "panoptic", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json"),
            "--plot", str(tmp_path / "plots")]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert captured.err == f"wrote {tmp_path / 'plots' / 'per_class_pq.png'}\n"
    assert_picture(tmp_path / "plots" / "per_class_pq.png")
    axes = figures["per_class_pq.png"].axes[0]
    assert [label.get_text() for label in axes.get_yticklabels()] == [c["name"] for c in CATEGORIES]
    bars = axes.patches
    expected = [printed["per_class"][str(c["id"])]["pq"] for c in CATEGORIES]
    np.testing.assert_allclose([bar.get_width() for bar in bars], expected, atol=1e-12)
    colours = [bar.get_facecolor() for bar in bars]
    things = [colour for colour, c in zip(colours, CATEGORIES, strict=True) if c["isthing"]]
    stuff = [colour for colour, c in zip(colours, CATEGORIES, strict=True) if not c["isthing"]]
    assert len(set(things)) == 1 and len(set(stuff)) == 1 and things[0] != stuff[0]
    texts = [text.get_text() for text in axes.texts]
    for c in CATEGORIES:
        values = printed["per_class"][str(c["id"])]
        assert f"{values['pq']:.3f}  (SQ {values['sq']:.3f}, RQ {values['rq']:.3f})" in texts
    assert f"PQ {printed['PQ']:.3f}" in axes.get_title() and f"PQ {printed['PQ_st']:.3f}" in axes.get_title()
    # on a terminal, a bar over the PNGs, on stderr
    pq_compute(tmp_path / "gt.json", tmp_path / "pred.json", progress=True)
    err = capsys.readouterr().err
    assert "PQ:" in err and "0/5" in err and "\r" in err  # drawn at the start, cleared at the end
