"""The embedded shapes dataset: every format validates and all formats describe the same scenes."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from clusterformer.cli import main
from clusterformer.data import CATEGORIES, STUFF, THINGS, make_shapes

SIZE = 64


@pytest.fixture(scope="module")
def shapes(shapes_dir):
    return shapes_dir(3, 24, 6, SIZE)


def panoptic_ids(path):
    rgb = np.asarray(Image.open(path), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_instances_validate_with_pycocotools(shapes, split):
    coco = COCO(str(shapes / "annotations" / f"instances_{split}.json"))
    assert sorted(coco.getCatIds()) == list(range(1, len(THINGS) + 1))
    assert len(coco.getImgIds()) == (24 if split == "train" else 6)
    assert coco.getAnnIds(), "no instances"
    for ann in coco.loadAnns(coco.getAnnIds()):
        image = coco.loadImgs(ann["image_id"])[0]
        assert (shapes / "images" / split / image["file_name"]).exists()
        mask = coco.annToMask(ann)
        assert mask.shape == (image["height"], image["width"])
        assert mask.sum() == ann["area"] > 0
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["iscrowd"] in (0, 1)


def test_some_images_have_crowd_regions(shapes):
    annotations = json.loads((shapes / "annotations" / "instances_train.json").read_text())["annotations"]
    assert any(a["iscrowd"] for a in annotations) and not all(a["iscrowd"] for a in annotations)


@pytest.mark.parametrize("split", ["train", "val"])
def test_panoptic_follows_the_format_rules(shapes, split):
    data = json.loads((shapes / "annotations" / f"panoptic_{split}.json").read_text())
    categories = {c["id"]: c for c in data["categories"]}
    assert {c["name"] for c in categories.values() if c["isthing"]} == set(THINGS)
    assert {c["name"] for c in categories.values() if not c["isthing"]} == set(STUFF)
    images = {i["id"]: i for i in data["images"]}
    assert len(data["annotations"]) == len(images)
    for ann in data["annotations"]:
        ids = panoptic_ids(shapes / "annotations" / f"panoptic_{split}" / ann["file_name"])
        assert ids.shape == (images[ann["image_id"]]["height"], images[ann["image_id"]]["width"])
        segment_ids = [s["id"] for s in ann["segments_info"]]
        assert len(set(segment_ids)) == len(segment_ids), "duplicate segment ids"
        assert set(np.unique(ids)) - {0} == set(segment_ids), "PNG and segments_info disagree"
        stuff_seen = []
        for s in ann["segments_info"]:
            mask = ids == s["id"]
            assert s["area"] == mask.sum() and s["category_id"] in categories
            ys, xs = np.nonzero(mask)
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            if not categories[s["category_id"]]["isthing"]:
                assert s["iscrowd"] == 0
                stuff_seen.append(s["category_id"])
        assert len(stuff_seen) == len(set(stuff_seen)), "one segment per stuff class"


@pytest.mark.parametrize("split", ["train", "val"])
def test_all_formats_describe_the_same_scenes(shapes, split):
    instances = COCO(str(shapes / "annotations" / f"instances_{split}.json"))
    panoptic = json.loads((shapes / "annotations" / f"panoptic_{split}.json").read_text())
    for ann in panoptic["annotations"]:
        ids = panoptic_ids(shapes / "annotations" / f"panoptic_{split}" / ann["file_name"])
        semantic = np.asarray(Image.open(shapes / "semantic" / split / ann["file_name"]))
        assert semantic.dtype == np.uint8 and semantic.shape == ids.shape
        assert set(np.unique(semantic)) <= set(range(len(CATEGORIES) + 1))
        things = []
        for s in ann["segments_info"]:
            mask = ids == s["id"]
            assert (semantic[mask] == s["category_id"]).all()  # ADE20K style: 0 unlabelled, 1..C
            if s["category_id"] <= len(THINGS):
                things.append((s["category_id"], s["iscrowd"], s["area"]))
        coco_things = [
            (a["category_id"], a["iscrowd"], a["area"])
            for a in instances.loadAnns(instances.getAnnIds(imgIds=[ann["image_id"]]))
        ]
        assert sorted(things) == sorted(coco_things)
        image = np.asarray(Image.open(shapes / "images" / split / ann["file_name"]))
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8


def test_imagefolder_crops_load_with_torchvision(shapes):
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(shapes / "imagefolder" / "train"))
    assert dataset.classes == sorted(THINGS)
    assert len(dataset) > 24
    image, label = dataset[0]
    assert image.mode == "RGB" and 0 <= label < len(THINGS)


def tree_digest(root):
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_generation_is_deterministic(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        make_shapes(tmp_path / name, seed=seed, num_train=3, num_val=2, size=48, progress=False)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_cli(tmp_path, capsys):
    assert main(["make-shapes", "--out", str(tmp_path), "--num-train", "2", "--num-val", "1", "--size", "40"]) == 0
    assert "train: 2 images" in capsys.readouterr().out
    assert len(list((tmp_path / "images" / "train").glob("*.png"))) == 2


@pytest.mark.parametrize("args", [dict(size=16), dict(num_train=0)])
def test_bad_arguments_are_rejected(tmp_path, args):
    with pytest.raises(ValueError):
        make_shapes(tmp_path, progress=False, **args)


# --- rerunning into a folder that holds a dataset -----------------------------------------------------------------
def make_shapes_cli(out, *options) -> int:
    return main(["make-shapes", "--out", str(out), "--size", "40", "--num-val", "2", *map(str, options)])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_rerun_with_the_same_options_gives_the_files_of_a_fresh_folder(tmp_path):
    assert make_shapes_cli(tmp_path / "fresh", "--num-train", 6) == 0
    assert make_shapes_cli(tmp_path / "again", "--num-train", 6) == 0
    stale = tmp_path / "again" / "imagefolder" / "train" / "circle" / "999999_999999.png"
    stale.write_bytes((tmp_path / "fresh" / "images" / "train" / "000000.png").read_bytes())
    assert make_shapes_cli(tmp_path / "again", "--num-train", 6) == 0
    assert not stale.exists()
    assert tree_digest(tmp_path / "again") == tree_digest(tmp_path / "fresh")
    manifest = json.loads((tmp_path / "fresh" / "shapes.json").read_text())
    assert manifest["options"] == {"seed": 0, "num_train": 6, "num_val": 2, "size": 40} and manifest["complete"]
    written = sorted(p.relative_to(tmp_path / "fresh").as_posix() for p in (tmp_path / "fresh").rglob("*.*"))
    assert manifest["files"] == [name for name in written if name != "shapes.json"]


def test_other_options_into_a_dataset_folder_are_refused_naming_overwrite(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert make_shapes_cli(out, "--num-train", 6) == 0
    before = tree_digest(out)
    capsys.readouterr()
    assert make_shapes_cli(out, "--num-train", 3, "--seed", 1) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"clusterformer make-shapes: error: {out}: holds another shapes dataset (seed 0, 6 train")
    assert "--overwrite" in err
    assert tree_digest(out) == before  # nothing written


def test_overwrite_replaces_the_earlier_dataset_completely(tmp_path):
    out = tmp_path / "shapes"
    assert make_shapes_cli(out, "--num-train", 6) == 0
    (out / "notes.txt").write_text("not part of the dataset")
    crops = len(list((out / "imagefolder").rglob("*.png")))
    assert make_shapes_cli(out, "--num-train", 3, "--overwrite") == 0
    assert make_shapes_cli(tmp_path / "fresh", "--num-train", 3) == 0
    assert len(list((out / "imagefolder").rglob("*.png"))) < crops
    assert (out / "notes.txt").read_text() == "not part of the dataset"  # files make-shapes did not write stay
    (out / "notes.txt").unlink()
    assert tree_digest(out) == tree_digest(tmp_path / "fresh")


def test_a_dataset_without_manifest_and_foreign_folders_are_refused(tmp_path, capsys):
    earlier = tmp_path / "earlier"  # written before shapes.json existed: its options are unknown
    assert make_shapes_cli(earlier, "--num-train", 3) == 0
    (earlier / "shapes.json").unlink()
    capsys.readouterr()
    assert make_shapes_cli(earlier, "--num-train", 3) == 2
    assert "without shapes.json" in one_line_error(capsys)
    assert make_shapes_cli(earlier, "--num-train", 3, "--overwrite") == 0
    assert (earlier / "shapes.json").is_file()
    coco = tmp_path / "coco"
    (coco / "images").mkdir(parents=True)
    (coco / "images" / "photo.jpg").write_bytes(b"someone else's")
    for extra in ((), ("--overwrite",)):
        capsys.readouterr()
        assert make_shapes_cli(coco, "--num-train", 3, *extra) == 2
        assert f"{coco}: holds images/ that make-shapes did not write" in one_line_error(capsys)
    assert (coco / "images" / "photo.jpg").exists()
    (tmp_path / "file").write_text("x")
    assert make_shapes_cli(tmp_path / "file", "--num-train", 3) == 2
    assert "is a file" in one_line_error(capsys)
