"""Panoptic segmentation end to end: batching, validation PQ equal to an offline pq_compute of written
PNGs + JSON, mIoU_pan with void predictions, the CLI on the configs."""

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from clusterformer.cli import main
from clusterformer.data.collate import collate_panoptic
from clusterformer.errors import SettingError
from clusterformer.metrics.panoptic import pq_compute, write_panoptic
from clusterformer.metrics.panoptic_eval import miou_with_void
from clusterformer.metrics.semantic import SemanticConfusion
from clusterformer.tasks import PanopticData, PanopticTask

ROOT = Path(__file__).resolve().parents[1]
SMALL_DECODER = dict(num_queries=10, dim=32, mask_dim=32, num_layers=2, num_heads=4, ffn_dim=64)


@pytest.fixture(scope="module")
def shapes(shapes_dir):
    return shapes_dir(seed=4, num_train=8, num_val=5, size=64)


def small_data(root):
    return PanopticData(
        str(root), "images/train", "annotations/panoptic_train.json", "annotations/panoptic_train", "images/val",
        "annotations/panoptic_val.json", "annotations/panoptic_val", crop=64, scale_range=(0.8, 1.2),
        test_shorter_side=48, batch_size=2, num_workers=0,
    )  # fmt: skip


def trainer(tmp_path, **kwargs):
    return L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


def test_collate_drops_segments_cropped_away_and_pads():
    masks = torch.zeros(3, 40, 30, dtype=torch.bool)
    masks[0, :10] = True
    masks[2, 20:] = True  # segment 1 is empty after the crop
    target = {"masks": masks, "labels": torch.tensor([0, 1, 5]), "isthing": torch.tensor([1, 1, 0]),
              "iscrowd": torch.tensor([0, 0, 0]), "segment_ids": torch.tensor([3, 4, 5]), "image_id": 9}  # fmt: skip
    images, (train,) = collate_panoptic([(torch.randn(3, 40, 30), target)])
    assert images.shape == (1, 3, 64, 32)
    assert train["labels"].tolist() == [0, 5] and train["isthing"].tolist() == [1, 0]
    assert train["masks"].shape == (2, 64, 32) and train["masks"][0].sum() == 300
    _, (evaluation,) = collate_panoptic([(torch.randn(3, 40, 30), target)], train=False)
    assert evaluation["masks"].shape == (3, 40, 30) and evaluation["orig_size"] == (40, 30)


def test_miou_pan_counts_void_predictions_as_misses():
    confusion = SemanticConfusion(3)  # 2 classes + "void prediction"
    label = np.array([[0, 0, 1, 1]])
    confusion.update(np.array([[0, 2, 1, 1]]), label)  # one class-0 pixel left void
    # class 0: intersection 1, union 2; class 1: 2 / 2
    assert miou_with_void(confusion) == pytest.approx((0.5 + 1.0) / 2)


def test_validation_pq_equals_offline_pq_compute(shapes, tmp_path):
    torch.manual_seed(0)
    data = small_data(shapes)
    module = PanopticTask("clusterformer_nano", num_classes=7, num_things=4, decoder=SMALL_DECODER,
                          loss={"num_points": 64}, warmup_steps=1, score_threshold=0.05)  # fmt: skip
    fitter = trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    fitter.fit(module, data)
    logged = fitter.validate(module, data, verbose=False)[0]
    for key in ("val/PQ", "val/PQ_th", "val/PQ_st", "val/SQ", "val/RQ", "val/mIoU_pan", "val/mAP_pan_th"):
        assert key in logged

    gt_json = shapes / "annotations/panoptic_val.json"
    gt = json.loads(gt_json.read_text())
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    annotations = []
    module.eval()
    with torch.no_grad():
        for images, targets in data.val_dataloader():
            for target, result in zip(targets, module.predict_batch(images, targets), strict=True):
                file_name = next(a["file_name"] for a in gt["annotations"] if a["image_id"] == target["image_id"])
                write_panoptic(pred_dir, file_name, result["ids"].numpy())
                segments = [{"id": s["id"], "category_id": s["category_id"]} for s in result["segments_info"]]
                annotations.append({"image_id": target["image_id"], "file_name": file_name, "segments_info": segments})
    pred_json = tmp_path / "pred.json"
    pred_json.write_text(json.dumps({"annotations": annotations}))
    offline = pq_compute(gt_json, pred_json, shapes / "annotations/panoptic_val", pred_dir)
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for key in ("pq", "sq", "rq"):
            expected = offline[group][key]
            got = logged[f"val/{key.upper()}{suffix}"]
            assert got == pytest.approx(expected, abs=1e-6, nan_ok=True), (group, key)


def test_class_and_thing_mismatch_are_clear_errors(shapes, tmp_path):
    wrong_things = PanopticTask("clusterformer_nano", num_classes=7, num_things=3, decoder=SMALL_DECODER)
    with pytest.raises(SettingError, match=r"num_things: 3 .*; set it to 4"):
        trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(wrong_things, small_data(shapes))
    wrong_classes = PanopticTask("clusterformer_nano", num_classes=133, num_things=80, decoder=SMALL_DECODER)
    with pytest.raises(SettingError, match=r"num_classes: 133, but .*panoptic_val.json has 7 categories"):
        trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(wrong_classes, small_data(shapes))


@pytest.mark.parametrize("name", ["clusterformer_tiny_coco_panoptic", "clusterformer_small_coco_panoptic"])
def test_paper_configs_parse(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / f"configs/panoptic/{name}.yaml"), "--print_config"])
    assert exit_info.value.code == 0
