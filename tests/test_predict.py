"""``clusterformer predict``: every task writes valid standard outputs for image files of any size and mode;
unreadable images are skipped and listed; bad inputs exit with status 2 and one line; no partial files."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from clusterformer.cli import main
from clusterformer.commands.predict import image_ids, is_lightning_predict, output_names
from clusterformer.data import CATEGORIES, THINGS
from clusterformer.metrics.coco import coco_evaluate
from clusterformer.metrics.panoptic import pq_compute, read_ids_png
from clusterformer.metrics.semantic import evaluate_semantic
from clusterformer.outputs import atomic_path
from helpers import SIZE, train_one_step

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def shapes(shapes_dir):
    return shapes_dir(seed=4, num_train=8, num_val=5, size=SIZE)  # the semantic / panoptic tests' data


@pytest.fixture(scope="module")
def checkpoints(shapes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    tasks = ("classification", "detection", "instance", "semantic", "panoptic")
    return {task: train_one_step(task, shapes, folder / f"{task}.ckpt") for task in tasks}


def predict(*args) -> int:
    return main(["predict", *map(str, args)])


def no_temporary_files(out) -> bool:
    return not [p for p in out.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


def test_checkpoints_store_the_class_names(checkpoints):
    for task, names in (("classification", sorted(THINGS)), ("panoptic", [c["name"] for c in CATEGORIES])):
        checkpoint = torch.load(checkpoints[task], weights_only=True)
        assert checkpoint["clusterformer_classes"] == names
    categories = torch.load(checkpoints["instance"], weights_only=True)["clusterformer_categories"]
    assert [c["id"] for c in categories] == [1, 2, 3, 4]


def test_classification_writes_the_top_k_classes(checkpoints, shapes, tmp_path):
    images = shapes / "images" / "val"
    assert predict("--task", "classification", "--ckpt", checkpoints["classification"], images, "--out", tmp_path,
                   "--top-k", "3") == 0  # fmt: skip
    records = json.loads((tmp_path / "predictions.json").read_text())
    assert [r["name"] for r in records] == sorted(p.stem for p in images.iterdir())
    for record in records:
        scores = [entry["score"] for entry in record["top_k"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True) and sum(scores) <= 1 + 1e-6
        assert all(entry["class"] == sorted(THINGS)[entry["label"]] for entry in record["top_k"])
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 5
    assert no_temporary_files(tmp_path)


@pytest.mark.parametrize("task", ["detection", "instance"])
def test_coco_results_load_against_the_ground_truth(task, checkpoints, shapes, tmp_path):
    gt = shapes / "annotations" / "instances_val.json"
    assert predict("--task", task, "--ckpt", checkpoints[task], shapes / "images" / "val", "--out", tmp_path,
                   "--image-ids", gt, "--score-threshold", "0.05") == 0  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 5 * 40  # top_k = all 10 queries x 4 classes of every image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = COCO(str(gt)).loadRes(str(tmp_path / "results.json"))  # ids and categories match the ground truth
    assert len(loaded.getAnnIds()) == len(results)
    assert {r["category_id"] for r in results} <= {1, 2, 3, 4}
    if task == "instance":
        assert all(r["segmentation"]["size"] == [SIZE, SIZE] for r in results)
        assert 0 <= coco_evaluate(gt, results, "segm")["AP"] <= 1
    assert 0 <= coco_evaluate(gt, results, "bbox")["AP"] <= 1
    images = COCO(str(tmp_path / "images.json"))
    assert sorted(images.getImgIds()) == [1, 2, 3, 4, 5] and len(images.getCatIds()) == 4
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 5 and no_temporary_files(tmp_path)


def test_semantic_label_pngs_have_the_image_size_and_evaluate(checkpoints, shapes, tmp_path):
    assert predict("--task", "semantic", "--ckpt", checkpoints["semantic"], shapes / "images" / "val", "--out",
                   tmp_path) == 0  # fmt: skip
    labels = sorted((tmp_path / "labels").glob("*.png"))
    assert len(labels) == 5
    for path in labels:
        values = np.asarray(Image.open(path))
        assert values.shape == (SIZE, SIZE) and values.min() >= 1 and values.max() <= 7  # ADE20K: class + 1
    result = evaluate_semantic(shapes / "semantic" / "val", tmp_path / "labels", num_classes=7)
    assert 0 <= result["mIoU"] <= 1


def test_panoptic_pngs_match_their_segments_and_score_with_pq(checkpoints, shapes, tmp_path):
    gt = shapes / "annotations" / "panoptic_val.json"
    assert predict("--task", "panoptic", "--ckpt", checkpoints["panoptic"], shapes / "images" / "val", "--out",
                   tmp_path, "--image-ids", gt, "--score-threshold", "0") == 0  # fmt: skip
    data = json.loads((tmp_path / "panoptic.json").read_text())
    assert len(data["annotations"]) == 5 and len(data["categories"]) == 7
    segments = 0
    for annotation in data["annotations"]:
        ids = read_ids_png(tmp_path / "panoptic" / annotation["file_name"])
        present, counts = np.unique(ids[ids > 0], return_counts=True)
        listed = {s["id"]: s["area"] for s in annotation["segments_info"]}
        assert dict(zip(present.tolist(), counts.tolist(), strict=True)) == listed
        segments += len(listed)
    assert segments > 0
    assert 0 <= pq_compute(gt, tmp_path / "panoptic.json")["All"]["pq"] <= 1


def test_any_size_and_mode_and_unreadable_files_are_skipped_and_listed(checkpoints, tmp_path, capsys):
    folder = tmp_path / "inputs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70), np.uint8)).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (90, 41, 4), np.uint8)).save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (33, 47), np.uint16)).save(folder / "deep.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(folder / "small.jpg")
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "truncated.jpg").write_bytes((folder / "small.jpg").read_bytes()[:60])
    (folder / "notes.txt").write_text("not an image file")  # not an image suffix: not read at all
    out = tmp_path / "out"
    assert predict("--task", "semantic", "--ckpt", checkpoints["semantic"], folder, "--out", out,
                   "--batch-size", "3") == 0  # fmt: skip
    sizes = {p.stem: Image.open(p).size for p in (out / "labels").glob("*.png")}
    assert sizes == {"gray": (70, 50), "rgba": (41, 90), "deep": (47, 33), "small": (20, 20)}
    skipped = json.loads((out / "summary.json").read_text())["skipped"]
    assert sorted(s["file"] for s in skipped) == [str(folder / "broken.png"), str(folder / "truncated.jpg")]
    err = capsys.readouterr().err
    assert "skipped 2 unreadable images" in err and f"{folder / 'broken.png'}: not a readable image" in err
    assert no_temporary_files(out)


def test_a_checkpoint_of_another_task_is_refused(checkpoints, shapes, tmp_path, capsys):
    out = tmp_path / "out"
    code = predict("--task", "detection", "--ckpt", checkpoints["classification"], shapes / "images" / "val",
                   "--out", out)  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "classification" in err and "Traceback" not in err
    assert not out.exists()


def test_missing_files_are_one_line_errors(checkpoints, shapes, tmp_path, capsys):
    image = shapes / "images" / "val" / "000000.png"
    for args, named in (
        (["--ckpt", checkpoints["semantic"], tmp_path / "missing.png"], "missing.png"),
        (["--ckpt", tmp_path / "missing.ckpt", image], "missing.ckpt"),
    ):
        assert predict("--task", "semantic", *args, "--out", tmp_path / "out") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err and err.startswith("clusterformer predict: error:")
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_is_refused_and_overwrite_replaces_the_previous_results(checkpoints, shapes, tmp_path,
                                                                                  capsys):  # fmt: skip
    out = tmp_path / "out"
    images = shapes / "images" / "val"
    assert predict("--task", "classification", "--ckpt", checkpoints["classification"], images, "--out", out) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    two = tmp_path / "two"
    two.mkdir()
    for path in sorted(images.iterdir())[:2]:
        (two / path.name).write_bytes(path.read_bytes())
    args = ["--task", "semantic", "--ckpt", checkpoints["semantic"], two, "--out", out]
    assert predict(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"clusterformer predict: error: {out}: output folder is not empty (")
    assert "--overwrite" in err and len(err.splitlines()) == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written
    (out / "notes.txt").write_text("not a result")
    assert predict(*args, "--overwrite") == 0
    # the classification run's overlays and predictions.json are gone: only this run's results are there
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["000000.png", "000001.png"]
    assert sorted(p.name for p in out.iterdir()) == ["labels", "notes.txt", "overlays", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "semantic" and len(summary["images"]) == 2


def test_predict_routes_to_lightning_only_with_its_arguments(capsys):
    config = ROOT / "configs" / "classification" / "clusterformer_nano_shapes.yaml"
    with pytest.raises(SystemExit) as exit_info:  # LightningCLI's predict, as before
        main(["predict", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0 and "trainer:" in capsys.readouterr().out
    assert is_lightning_predict(["predict", "--config", "c.yaml", "--ckpt_path", "x.ckpt"])
    assert is_lightning_predict(["predict", "-c", "c.yaml"])
    assert is_lightning_predict(["predict", "--trainer.accelerator=cpu", "--model.class_path=X"])
    assert not is_lightning_predict(["predict", "--task", "semantic", "--ckpt", "x.ckpt", "a.png", "--out", "o"])


def test_image_ids_and_output_names(tmp_path):
    paths = [tmp_path / "a" / "000000000139.jpg", tmp_path / "b" / "000000000285.png"]
    assert image_ids(paths) == [139, 285]  # COCO file names
    assert image_ids([tmp_path / "cat.png", tmp_path / "7.png"]) == [1, 2]
    names = output_names([tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "x.jpg"])
    assert names == ["x", "x_png", "x_jpg"]


def test_an_interrupted_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "result.json") as temporary:
        temporary.write_text("[1, 2")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_classification_predictions_resize_with_the_checkpoints_interpolation():
    from torchvision.transforms import InterpolationMode

    from clusterformer.commands.predict import eval_transform
    from clusterformer.weights import TaskModel

    stored = {"img_size": 32, "eval_resize": 40, "interpolation": "bilinear"}
    resize, crop = eval_transform(TaskModel("classification", torch.nn.Identity(), [], [], stored)).transforms[:2]
    assert (resize.size, resize.interpolation, crop.size) == ([40], InterpolationMode.BILINEAR, (32, 32))
    older = TaskModel("classification", torch.nn.Identity(), [], [], {"img_size": 32})  # saved before the option
    assert eval_transform(older).transforms[0].interpolation == InterpolationMode.BICUBIC
