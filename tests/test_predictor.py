"""``clusterformer.Predictor``: every input type, one image or a list, the five tasks' results in the image's own
pixels, the same outputs as ``clusterformer predict`` writes, clear errors for bad inputs, supervision's
``sv.Detections``, and README's Python section run as written."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clusterformer import Predictor
from clusterformer.cli import main
from clusterformer.data.images import ImageReadError
from clusterformer.metrics.panoptic import read_ids_png
from clusterformer.predictor import ImageInputError
from clusterformer.results import Classification, Detections, Instances, PanopticMap, SemanticMap
from clusterformer.weights import CheckpointError
from helpers import SIZE, train_one_step

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("classification", "detection", "instance", "semantic", "panoptic")
RESULT_TYPES = {"classification": Classification, "detection": Detections, "instance": Instances,
                "semantic": SemanticMap, "panoptic": PanopticMap}  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def shapes(shapes_dir):
    return shapes_dir(seed=4, num_train=8, num_val=5, size=SIZE)


@pytest.fixture(scope="module")
def checkpoints(shapes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    return {task: train_one_step(task, shapes, folder / f"{task}.ckpt") for task in TASKS}


@pytest.fixture(scope="module")
def predictors(checkpoints):
    """A predictor per task that keeps every detection (``score_threshold=0``), and the panoptic merging's every
    query, so that the tiny models' results are not empty."""
    return {task: Predictor.from_checkpoint(checkpoints[task], score_threshold=0.0) for task in TASKS}


def val_images(shapes) -> list[Path]:
    return sorted((shapes / "images" / "val").iterdir())


def same_result(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, SemanticMap | PanopticMap):
        return np.array_equal(a.segmentation, b.segmentation) and getattr(a, "segments_info", 0) == getattr(
            b, "segments_info", 0
        )
    same = np.array_equal(a.labels, b.labels) and np.allclose(a.scores, b.scores, atol=1e-6)
    if isinstance(a, Detections):
        same = same and np.allclose(a.boxes, b.boxes, atol=1e-4)
    if isinstance(a, Instances):
        same = same and np.array_equal(a.masks, b.masks)
    return same


# --- inputs -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["classification", "instance"])
def test_paths_pil_images_and_arrays_give_the_same_result(task, predictors, shapes, tmp_path):
    predictor = predictors[task]
    path = val_images(shapes)[0]
    image = Image.open(path).convert("RGB")
    reference = predictor(path)
    for given in (str(path), image, np.asarray(image), image.convert("RGBA"), np.asarray(image.convert("RGBA"))):
        assert same_result(predictor(given), reference), type(given)
    gray = np.asarray(image.convert("L"))
    Image.fromarray(gray).save(tmp_path / "gray.png")
    from_gray = predictor(tmp_path / "gray.png")
    assert same_result(predictor(gray), from_gray) and same_result(predictor(gray[..., None]), from_gray)
    assert same_result(predictor(Image.fromarray(gray)), from_gray)


def test_one_image_gives_one_result_and_a_list_a_list(predictors, shapes):
    predictor = predictors["semantic"]
    paths = val_images(shapes)[:3]
    single = predictor(paths[0])
    assert isinstance(single, SemanticMap)
    listed = predictor(paths, batch_size=2)
    assert isinstance(listed, list) and len(listed) == 3 and all(isinstance(r, SemanticMap) for r in listed)
    assert same_result(listed[0], predictor([paths[0]])[0])
    assert len(predictor(tuple(paths))) == 3 and predictor([]) == []
    one_by_one = [predictor(path) for path in paths]
    # batches pad to a common size; these images share one, so a batch gives what one image at a time gives
    assert all(same_result(a, b) for a, b in zip(listed, one_by_one, strict=True))


# --- the five tasks ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_every_task_gives_its_result_at_the_images_size(task, predictors, shapes):
    predictor = predictors[task]
    image = Image.open(val_images(shapes)[1]).convert("RGB").resize((90, 50))  # not the model's input size
    result = predictor(image)
    assert isinstance(result, RESULT_TYPES[task]) and result.image_size == (50, 90)
    assert predictor.task == task and result.classes.names == predictor.classes
    if task == "classification":
        assert len(result) == min(5, len(predictor.classes)) and np.all(np.diff(result.scores) <= 0)
        assert result.names == [predictor.classes[label] for label in result.labels]
    elif task in ("detection", "instance"):
        assert len(result) == 40 and result.boxes.shape == (40, 4)  # every one of the top 10 queries x 4 classes
        assert (result.boxes[:, 0::2] <= 90).all() and (result.boxes[:, 1::2] <= 50).all() and (result.boxes >= 0).all()
        assert result.names == [predictor.classes[label] for label in result.labels]
        if task == "instance":
            assert result.masks.shape == (40, 50, 90) and result.masks.dtype == bool
            assert np.array_equal(result.mask(3), result.masks[3])
    elif task == "semantic":
        assert result.segmentation.shape == (50, 90) and result.segmentation.min() >= 0
        assert result.segmentation.max() < len(predictor.classes)
    else:
        assert result.segmentation.shape == (50, 90) and result.segments_info
        for segment in result.segments_info:
            assert {"id", "label_id", "was_fused", "score"} <= set(segment)  # transformers' keys
            assert segment["area"] == int((result.segmentation == segment["id"]).sum()) > 0
            assert segment["was_fused"] == (not segment["isthing"])
            assert segment["name"] == predictor.classes[segment["label_id"]]
    picture = result.draw()
    assert isinstance(picture, Image.Image) and picture.height == 50 * 6  # enlarged for readable text: 6 x 90 >= 512


def test_boxes_and_masks_are_in_the_images_own_pixels(predictors, shapes):
    """A scene at 128 x 192 and the model's input made of it (64 x 96, the test transform's resize), given as an
    image: the model sees the same pixels, and the large image's boxes are the small one's doubled, its masks the
    small one's enlarged."""
    from torchvision.transforms.v2 import functional as F

    large_image = Image.open(val_images(shapes)[2]).convert("RGB").resize((192, 128), Image.BILINEAR)
    small_image = F.to_pil_image(F.resize(F.pil_to_tensor(large_image), [SIZE], antialias=True))
    assert small_image.size == (96, 64)
    for task in ("detection", "instance"):
        small, large = predictors[task]([small_image, large_image])
        assert large.image_size == (128, 192) and np.array_equal(large.scores, small.scores)
        assert np.array_equal(large.labels, small.labels) and len(large) == 40
        if task == "detection":  # the box head's boxes scaled to each image
            assert np.array_equal(large.boxes, 2 * small.boxes)
        else:  # computed at the model's input and enlarged; the boxes enclose the enlarged masks
            assert np.array_equal(large.masks, small.masks.repeat(2, axis=1).repeat(2, axis=2))
            drawn = small.masks.any((1, 2))
            assert drawn.any()
            doubled = small.boxes[drawn] * 2 + np.array([0, 0, 1, 1], np.float32)
            assert np.array_equal(large.boxes[drawn], doubled)


def test_detections_are_kept_from_the_score_threshold(checkpoints, shapes):
    image = val_images(shapes)[0]
    every = Predictor.from_checkpoint(checkpoints["detection"], score_threshold=0.0)(image)
    threshold = float(np.median(every.scores))
    kept = Predictor.from_checkpoint(checkpoints["detection"], score_threshold=threshold)(image)
    assert len(kept) == int((every.scores >= threshold).sum()) and (kept.scores >= threshold).all()
    assert Predictor.from_checkpoint(checkpoints["detection"]).score_threshold is None  # default 0.5 (documented)


def test_bf16_and_fp16_run_under_autocast(checkpoints, shapes):
    image = val_images(shapes)[0]
    reference = Predictor.from_checkpoint(checkpoints["classification"])(image)
    for precision in ("bf16", "fp16"):
        result = Predictor.from_checkpoint(checkpoints["classification"], precision=precision)(image)
        assert result.scores.dtype == np.float32 and np.allclose(result.scores, reference.scores, atol=0.05)
    semantic = Predictor.from_checkpoint(checkpoints["semantic"], precision="bf16")(image)
    assert semantic.segmentation.shape == (SIZE, SIZE)


# --- the same as clusterformer predict writes ------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_the_predictor_gives_what_predict_writes(task, checkpoints, shapes, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for path in val_images(shapes)[:2]:
        shutil.copy(path, images / path.name)
    Image.open(val_images(shapes)[2]).resize((100, 70)).save(images / "000009.png")  # another size
    out = tmp_path / "out"
    threshold = ["--score-threshold", "0"] if task == "panoptic" else []
    assert main(["predict", "--task", task, "--ckpt", str(checkpoints[task]), str(images), "--out", str(out),
                 *threshold]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    # the command keeps every detection in results.json (COCO AP) and draws those from 0.5
    predictor = Predictor.from_checkpoint(checkpoints[task], score_threshold=0.0)
    results = predictor([Path(entry["file"]) for entry in summary["images"]])
    for entry, result in zip(summary["images"], results, strict=True):
        drawn = result.draw(0.5) if task in ("detection", "instance") else result.draw()
        assert np.array_equal(np.asarray(drawn), np.asarray(Image.open(out / "overlays" / f"{entry['name']}.png")))
        assert result.image_size == (entry["height"], entry["width"])
    if task == "classification":
        written = json.loads((out / "predictions.json").read_text())
        assert [record["top_k"] for record in written] == [r.to_coco()["top_k"] for r in results]
    elif task in ("detection", "instance"):
        entries = [e for entry, r in zip(summary["images"], results, strict=True) for e in r.to_coco(entry["id"])]
        assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(entries))
    elif task == "semantic":
        for entry, result in zip(summary["images"], results, strict=True):
            written = np.asarray(Image.open(out / "labels" / f"{entry['name']}.png"))
            assert np.array_equal(written, result.to_coco()) and written.dtype == result.to_coco().dtype
    else:
        annotations = json.loads((out / "panoptic.json").read_text())["annotations"]
        for entry, result, annotation in zip(summary["images"], results, annotations, strict=True):
            assert annotation == result.to_coco(entry["id"], f"{entry['name']}.png")
            assert np.array_equal(read_ids_png(out / "panoptic" / annotation["file_name"]), result.segmentation)


# --- bad inputs -------------------------------------------------------------------------------------------------
def test_bad_inputs_are_clear_errors(predictors, checkpoints, tmp_path):
    predictor = predictors["semantic"]
    rgb = np.zeros((20, 30, 3), np.uint8)
    cases = [
        (rgb.astype(np.float32), ImageInputError, "must be uint8 (0-255), got dtype float32"),
        (np.zeros((3, 20, 30), np.uint8), ImageInputError, "got shape (3, 20, 30) (channels first?"),
        (np.zeros((2, 20, 30, 3), np.uint8), ImageInputError, "got shape (2, 20, 30, 3)"),
        (np.zeros((0, 30, 3), np.uint8), ImageInputError, "an empty image"),
        ([1, 2, 3], ImageInputError, "image 0 of the list: expected a file path, a PIL image or a numpy uint8 array"),
        (tmp_path / "missing.png", ImageReadError, f"{tmp_path / 'missing.png'}: image file not found"),
        ([rgb, tmp_path / "missing.png"], ImageReadError, "missing.png: image file not found"),
        ([rgb, rgb[..., 0].astype(bool)], ImageInputError, "image 1 of the list: a numpy image must be uint8"),
    ]
    (tmp_path / "broken.png").write_bytes(b"not an image")
    cases.append((tmp_path / "broken.png", ImageReadError, "broken.png: not a readable image"))
    for given, error, message in cases:
        with pytest.raises(error) as info:
            predictor(given)
        assert message in str(info.value)
    with pytest.raises(ValueError, match="precision 'fp8': expected one of fp32, bf16, fp16"):
        Predictor(predictor.model, precision="fp8")
    with pytest.raises(ValueError, match="device 'nowhere' cannot be used"):
        Predictor(predictor.model, device="nowhere")
    with pytest.raises(CheckpointError, match="a semantic checkpoint, not detection"):
        Predictor.from_checkpoint(checkpoints["semantic"], task="detection")


# --- supervision ------------------------------------------------------------------------------------------------
def test_supervision_detections_draw_where_the_boxes_are(predictors, shapes):
    sv = pytest.importorskip("supervision")
    image = Image.open(val_images(shapes)[0]).convert("RGB").resize((128, 128), Image.NEAREST)
    result = predictors["instance"](image)
    detections = result.to_supervision()
    assert isinstance(detections, sv.Detections) and len(detections) == len(result)
    assert np.array_equal(detections.xyxy, result.boxes) and np.array_equal(detections.mask, result.masks)
    assert detections.class_id.tolist() == result.labels.tolist()
    assert detections.data["class_name"].tolist() == result.names
    best = detections[np.argsort(-detections.confidence)[:3]]  # the three best
    scene = np.asarray(image).copy()
    drawn = sv.BoxAnnotator(thickness=1).annotate(scene=scene.copy(), detections=best)
    changed = np.any(drawn != scene, axis=-1)
    near = np.zeros(changed.shape, bool)
    for x0, y0, x1, y1 in best.xyxy.round().astype(int):
        assert changed[y0 : y1 + 1, x0 : x1 + 1].any()  # each box's outline is drawn
        near[max(y0 - 2, 0) : y1 + 3, max(x0 - 2, 0) : x1 + 3] = True
    assert not changed[~near].any()  # and nothing away from the boxes
    masked = sv.MaskAnnotator().annotate(scene=scene.copy(), detections=best)
    assert (np.any(masked != scene, axis=-1) <= best.mask.any(0)).all()  # colour only inside the masks
    semantic = predictors["semantic"](image).to_supervision()
    assert semantic.mask.any(0).all() and semantic.mask.sum(0).max() == 1  # every pixel in one class's mask
    panoptic = predictors["panoptic"](image)
    segments = panoptic.to_supervision()
    assert segments.data["segment_id"].tolist() == [s["id"] for s in panoptic.segments_info]


def test_to_supervision_without_supervision_says_how_to_install_it(predictors, shapes, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "supervision", None)  # as if it were not installed
    with pytest.raises(ImportError, match=re.escape("pip install 'clusterformer[supervision]'")):
        predictors["detection"](val_images(shapes)[0]).to_supervision()


# --- README ---------------------------------------------------------------------------------------------------
def readme_python_blocks() -> list[str]:
    """The ``python`` code blocks of README's "Python" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_the_readme_python_section_runs_as_written(checkpoints, shapes, tmp_path, monkeypatch):
    pytest.importorskip("supervision")
    blocks = readme_python_blocks()
    assert len(blocks) == 5 and all(len(block.strip().splitlines()) <= 8 for block in blocks)
    demo = tmp_path / "outputs" / "demo"  # where `clusterformer demo --out outputs/demo` leaves them
    for task in TASKS:
        (demo / task / "checkpoints").mkdir(parents=True)
        shutil.copy(checkpoints[task], demo / task / "checkpoints" / "last.ckpt")
    shutil.copytree(shapes / "images" / "val", demo / "data" / "images" / "val")
    monkeypatch.chdir(tmp_path)
    namespace = {}  # one after the other, as a reader would paste them
    for task, block in zip(TASKS, blocks, strict=True):
        exec(compile(block, f"README.md, Python, {task}", "exec"), namespace)
        assert isinstance(namespace["predictor"], Predictor) and namespace["predictor"].task == task
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["instances.png", "panoptic.png"]


def test_a_progress_bar_only_on_a_terminal(predictors, shapes, monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    paths = val_images(shapes)[:3]
    for stream, drawn in ((io.StringIO(), False), (Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        predictors["classification"](paths, progress=True)
        assert ("3/3" in stream.getvalue()) == drawn and ("predict classification" in stream.getvalue()) == drawn


@pytest.mark.parametrize("task", ["detection", "panoptic"])
def test_a_save_pretrained_folder_predicts_as_its_checkpoint(task, checkpoints, predictors, shapes, tmp_path):
    from clusterformer.hub import save_pretrained

    folder = save_pretrained(checkpoints[task], tmp_path / task)
    predictor = Predictor.from_pretrained(folder, score_threshold=0.0)
    assert predictor.task == task and predictor.classes == predictors[task].classes
    for path in val_images(shapes)[:2]:
        assert same_result(predictor(path), predictors[task](path)), path
    with pytest.raises(CheckpointError, match=f"a {task} model, not semantic"):
        Predictor.from_checkpoint(folder, task="semantic")
    names = [f"n{i}" for i in range(len(predictor.classes))]
    assert Predictor.from_checkpoint(folder, class_names=names).classes == names
    with pytest.raises(CheckpointError, match="1 class names given"):
        Predictor.from_checkpoint(folder, class_names=["x"])
