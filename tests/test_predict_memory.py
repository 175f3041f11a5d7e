"""``clusterformer predict`` on an image larger than the model's input: the dense post-processing runs at the
model's input size and the result is enlarged by nearest neighbour, so no tensor of per-query masks at the image's
size is ever made; the results keep the image's size and agree with themselves (areas, boxes)."""

import json

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torchvision.ops import masks_to_boxes

import clusterformer.commands.predict
from clusterformer.cli import main
from clusterformer.commands.predict import NearestResize
from clusterformer.metrics.panoptic import read_ids_png
from clusterformer.tasks import CocoData, PanopticData, PanopticTask, SemanticData, SemanticTask, SetTask
from helpers import save_after_one_step

DECODER = dict(num_queries=10, dim=32, mask_dim=32, num_layers=1, num_heads=4, iterations=1, ffn_dim=64)
SIZE = 64  # the model's input (test_shorter_side)
LARGE = 1500  # the image predicted

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _task_and_data(task: str, root):
    dense = dict(crop=SIZE, scale_range=(0.8, 1.2), test_shorter_side=SIZE, batch_size=4, num_workers=0)
    if task == "instance":
        data = CocoData(str(root), "images/train", "annotations/instances_train.json", "images/val",
                        "annotations/instances_val.json", masks=True, **dense)  # fmt: skip
        return SetTask(task, "clusterformer_nano", num_classes=4, decoder=DECODER, loss={"num_points": 64}), data
    if task == "semantic":
        data = SemanticData(str(root), "images/train", "semantic/train", "images/val", "semantic/val", num_classes=7,
                            **dense)  # fmt: skip
        decoder = {k: v for k, v in DECODER.items() if k != "num_queries"}
        return SemanticTask("clusterformer_nano", num_classes=7, decoder=decoder, loss={"num_points": 64}), data
    data = PanopticData(str(root), "images/train", "annotations/panoptic_train.json", "annotations/panoptic_train",
                        "images/val", "annotations/panoptic_val.json", "annotations/panoptic_val", **dense)  # fmt: skip
    return PanopticTask("clusterformer_nano", num_classes=7, num_things=4, decoder=DECODER,
                        loss={"num_points": 64}), data  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(shapes_dir, tmp_path_factory):
    """``checkpoint(task)``: a checkpoint of ``task`` after one training step on 64-px shapes scenes."""
    root = shapes_dir(seed=4, num_train=8, num_val=5, size=SIZE)
    folder = tmp_path_factory.mktemp("checkpoints")

    def make(task: str):
        path = folder / f"{task}.ckpt"
        if not path.exists():
            L.seed_everything(0, verbose=False)
            save_after_one_step(*_task_and_data(task, root), path)
        return path

    return make


class LargestAtSize(TorchDispatchMode):
    """Records, over every tensor an operator returns whose last two dimensions are ``size``, the largest number of
    values per pixel (3 for an RGB image, ``Q`` for ``Q`` masks)."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size, self.most = size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[-2:]) == self.size:
                self.most = max(self.most, value.numel() // (self.size[0] * self.size[1]))
        return out


def test_nearest_resize_gives_the_areas_and_boxes_of_the_resized_maps():
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 7, 9, generator=generator) > 0.7
    masks[0] = False  # an empty mask: a zero box, as torchvision gives
    for size in [(23, 31), (7, 9), (50, 10)]:
        resize = NearestResize((7, 9), size)
        enlarged = resize(masks)
        expected = F.interpolate(masks[None].float(), size=size, mode="nearest-exact")[0].bool()
        assert torch.equal(enlarged, expected)
        assert torch.equal(resize.boxes(masks), masks_to_boxes(enlarged))
        ids = torch.randint(0, 5, (7, 9), generator=generator, dtype=torch.int32)
        assert torch.equal(resize.areas(ids, 6), torch.bincount(resize(ids).flatten().long(), minlength=6))


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_a_large_image_never_gets_per_query_masks_at_its_size(task, checkpoint, tmp_path, monkeypatch):
    ckpt = checkpoint(task)
    rng = np.random.default_rng(0)
    image = tmp_path / "large.png"
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), np.uint8)).resize((LARGE, LARGE), Image.BILINEAR).save(image)
    monkeypatch.setattr(clusterformer.commands.predict, "MAX_OVERLAY_SIDE", 600)  # the overlay drawn scaled down
    out = tmp_path / "out"
    threshold = ["--score-threshold", "0"] if task == "panoptic" else []  # every query in the merging
    with LargestAtSize((LARGE, LARGE)) as seen:
        assert main(["predict", "--task", task, "--ckpt", str(ckpt), str(image), "--out", str(out), *threshold]) == 0
    assert seen.most == 3  # the RGB image itself; (Q, H, W) masks would be Q
    overlay = Image.open(out / "overlays" / "large.png")
    assert overlay.height == 600 and overlay.width >= 600
    if task == "semantic":
        labels = np.asarray(Image.open(out / "labels" / "large.png"))
        assert labels.shape == (LARGE, LARGE) and labels.min() >= 1 and labels.max() <= 7
    elif task == "panoptic":
        ids = read_ids_png(out / "panoptic" / "large.png")
        segments = json.loads((out / "panoptic.json").read_text())["annotations"][0]["segments_info"]
        assert ids.shape == (LARGE, LARGE) and segments
        for segment in segments:  # the areas counted without the enlarged map, as the PNG holds them
            ys, xs = np.nonzero(ids == segment["id"])
            assert segment["area"] == len(xs) and segment["bbox"] == [
                xs.min(),
                ys.min(),
                xs.max() - xs.min() + 1,
                ys.max() - ys.min() + 1,
            ]
    else:
        results = json.loads((out / "results.json").read_text())
        assert len(results) == 40  # top 100 of 10 queries x 4 classes
        for result in results:  # the boxes enclose the masks at the image's size
            mask = torch.from_numpy(mask_utils.decode(result["segmentation"]).astype(bool))
            assert mask.shape == (LARGE, LARGE)
            x0, y0, x1, y1 = masks_to_boxes(mask[None])[0].tolist() if mask.any() else [0, 0, 0, 0]
            assert result["bbox"] == [x0, y0, x1 - x0, y1 - y0]
