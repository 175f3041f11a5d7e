"""Detection and instance segmentation end to end: batching, the task's training step on awkward batches,
validation metrics equal to an offline pycocotools run, the CLI on the configs."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torchvision import tv_tensors
from torchvision.ops import box_convert

from clusterformer.cli import main
from clusterformer.data.collate import collate_sets, pad_batch
from clusterformer.errors import SettingError
from clusterformer.metrics.coco import coco_evaluate, to_coco_results
from clusterformer.tasks import CocoData, SetTask

ROOT = Path(__file__).resolve().parents[1]
SMALL_DECODER = dict(num_queries=10, dim=32, mask_dim=32, num_layers=2, num_heads=4, ffn_dim=64)


@pytest.fixture(scope="module")
def shapes(shapes_dir):
    return shapes_dir(seed=3, num_train=12, num_val=7, size=64)


def small_data(root, masks, **kwargs):
    return CocoData(
        str(root), "images/train", "annotations/instances_train.json", "images/val", "annotations/instances_val.json",
        masks=masks, crop=64, scale_range=(0.8, 1.2), test_shorter_side=64, batch_size=3, num_workers=0, **kwargs,
    )  # fmt: skip


def small_task(task, **kwargs):
    decoder = kwargs.pop("decoder", SMALL_DECODER)
    return SetTask(task, "clusterformer_nano", num_classes=4, decoder=decoder, warmup_steps=1, **kwargs)


def trainer(tmp_path, **kwargs):
    return L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


def sample(h, w, boxes, labels, iscrowd, masks=True):
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY",
                                          canvas_size=(h, w)),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "iscrowd": torch.tensor(iscrowd, dtype=torch.int64),
        "image_id": 7,
        "orig_size": (2 * h, 2 * w),
    }  # fmt: skip
    if masks:
        m = torch.zeros(len(labels), h, w, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            m[i, int(y0) : int(y1), int(x0) : int(x1)] = True
        target["masks"] = tv_tensors.Mask(m)
    return torch.randn(3, h, w), target


def test_pad_batch_pads_to_a_multiple_of_32_at_bottom_right():
    a, b = torch.ones(3, 40, 50), torch.full((3, 70, 20), 2.0)
    batch = pad_batch([a, b])
    assert batch.shape == (2, 3, 96, 64)
    assert torch.equal(batch[0, :, :40, :50], a) and batch[0, :, 40:].abs().sum() == 0
    assert torch.equal(batch[1, :, :70, :20], b) and batch[1, :, :, 20:].abs().sum() == 0


def test_collate_normalises_boxes_pads_masks_and_drops_crowds():
    images, targets = collate_sets(
        [sample(40, 50, [[0, 0, 25, 20], [10, 10, 50, 40]], [1, 2], [0, 1]), sample(30, 30, [], [], [])]
    )
    assert images.shape == (2, 3, 64, 64)
    first, empty = targets
    assert first["labels"].tolist() == [1]  # the crowd is not a training target
    torch.testing.assert_close(first["boxes"], torch.tensor([[12.5 / 50, 10 / 40, 25 / 50, 20 / 40]]))
    assert first["masks"].shape == (1, 64, 64) and first["masks"][0, :20, :25].all() and first["masks"].sum() == 500
    assert first["size"] == (40, 50) and first["orig_size"] == (80, 100) and first["image_id"] == 7
    assert empty["labels"].shape == (0,) and empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 64, 64)


@pytest.mark.parametrize("task", ["detection", "instance"])
def test_training_step_on_empty_images_and_more_objects_than_queries(task):
    """An image without objects and one with more objects than queries give a finite loss and gradients."""
    torch.manual_seed(0)
    module = small_task(
        task, decoder={**SMALL_DECODER, "num_queries": 2}, loss={"num_points": 64} if task == "instance" else None
    )
    boxes = [[i * 6, i * 6, i * 6 + 10, i * 6 + 12] for i in range(5)]
    batch = collate_sets([sample(64, 64, boxes, [0, 1, 2, 3, 0], [0] * 5), sample(64, 64, [], [], [])])
    losses = module.criterion(module(batch[0]), batch[1])
    total = module.criterion.weighted_total(losses)
    assert torch.isfinite(total)
    total.backward()
    assert module.model.head.class_embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("task", ["detection", "instance"])
def test_validation_metrics_equal_an_offline_pycocotools_run(task, shapes, tmp_path):
    """The AP the task logs equals `coco_evaluate` on the same predictions written as a COCO results file."""
    torch.manual_seed(0)
    data = small_data(shapes, masks=task == "instance")
    module = small_task(task, loss={"num_points": 64} if task == "instance" else None, top_k=10)
    fitter = trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    fitter.fit(module, data)
    logged = fitter.validate(module, data, verbose=False)[0]

    iou_type = "segm" if task == "instance" else "bbox"
    results = []
    module.eval()
    with torch.no_grad():
        for images, targets in data.val_dataloader():
            for target, result in zip(targets, module.predict_batch(images, targets), strict=True):
                results += to_coco_results(
                    target["image_id"], result["boxes"], result["scores"], result["labels"],
                    masks=result.get("masks"), label_to_category=[1, 2, 3, 4],
                )  # fmt: skip
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    offline = coco_evaluate(shapes / "annotations/instances_val.json", path, iou_type)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert logged[f"val/{iou_type}_{key}"] == pytest.approx(offline[key], abs=1e-6)
    assert offline["AP"] >= 0  # there is ground truth in the split


def test_instance_model_with_a_box_head_reports_the_box_head_boxes(shapes, tmp_path):
    torch.manual_seed(0)
    module = small_task("instance", predict_boxes=True, loss={"num_points": 64})
    assert set(module.criterion.weight_dict) == {
        "loss_class", "loss_bbox", "loss_giou", "loss_mask", "loss_dice", "loss_points"
    }  # fmt: skip
    images, targets = collate_sets([sample(64, 64, [[4, 4, 30, 30]], [1], [0])])
    (result,) = module.eval().predict_batch(images, targets)
    box = result["box_results"]
    outputs = module(images)
    from clusterformer.heads import detection_postprocess

    (expected,) = detection_postprocess(outputs["logits"], outputs["boxes"], [(128, 128)], module.hparams.top_k)
    torch.testing.assert_close(box["boxes"], expected["boxes"])
    assert torch.equal(box["labels"], result["labels"])  # the same (query, class) pairs in the same order


def test_class_count_mismatch_is_a_clear_error(shapes, tmp_path):
    module = SetTask("detection", "clusterformer_nano", num_classes=80, decoder=SMALL_DECODER)
    expected = r"num_classes: 80, but .*instances_val.json has 4 categories \(circle, .*; set it to 4"
    with pytest.raises(SettingError, match=expected):
        trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(module, small_data(shapes, masks=False))


def test_unknown_task_is_refused():
    with pytest.raises(SettingError, match="task: must be one of detection, instance, got 'segmentation'"):
        SetTask("segmentation", "clusterformer_nano", num_classes=4)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs").glob("*/clusterformer_*_coco.yaml")), ids=lambda p: p.parent.name + "/" + p.stem
)
def test_paper_configs_parse(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0


class OracleTask(SetTask):
    """Predicts the ground-truth boxes, shifted by half a box on even image ids: an AP strictly between 0
    and 1 that changes if any image is lost or counted twice."""

    def predict_batch(self, images, targets):
        results = []
        for target in targets:
            h, w = target["orig_size"]
            boxes = box_convert(target["boxes"], "cxcywh", "xyxy") * torch.tensor([w, h, w, h])
            if target["image_id"] % 2 == 0:
                boxes = boxes + (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2) / 2
            n = len(boxes)
            results.append({"boxes": boxes, "scores": torch.linspace(0.9, 0.5, n), "labels": target["labels"]})
        return results


def test_distributed_validation_gathers_every_image_once(shapes, tmp_path):
    """Two processes (gloo) with 7 validation images (the sampler pads one rank with a duplicate) give
    the AP of one process, which is the AP of an offline pycocotools run over all images."""
    data = small_data(shapes, masks=False)
    data.hparams.batch_size = 2
    module = OracleTask("detection", "clusterformer_nano", num_classes=4, decoder=SMALL_DECODER)
    single = trainer(tmp_path, devices=1).validate(module, data, verbose=False)[0]
    double = trainer(tmp_path, devices=2, strategy="ddp_spawn").validate(module, data, verbose=False)[0]
    assert 0.05 < single["val/bbox_AP"] < 0.95
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert double[f"val/bbox_{key}"] == pytest.approx(single[f"val/bbox_{key}"], abs=1e-9), key
