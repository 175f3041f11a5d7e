"""Distributed training is real: 2-process DDP on the CPU (gloo) equals one process with the same
global batch."""

import json
import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from clusterformer.tasks import ClassificationTask


class FixedData(L.LightningDataModule):
    def __init__(self, batch_size: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(48, 3, 32, 32, generator=g)
        self.labels = torch.randint(0, 4, (48,), generator=g)
        self.batch_size = batch_size

    def train_dataloader(self):
        # No shuffling (Lightning's own sampler always shuffles the training set, so it is turned off):
        # rank r gets the items r, r + 2, ..., and each pair of per-rank batches holds exactly the items
        # of one single-process batch.
        dataset = TensorDataset(self.images, self.labels)
        sampler = DistributedSampler(dataset, shuffle=False) if torch.distributed.is_initialized() else None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, shuffle=False)


class SGDTask(ClassificationTask):
    """Plain SGD: its update is linear in the gradient, so the weights must agree to rounding. (AdamW
    divides by the root of the squared gradient, which turns rounding noise in near-zero gradients
    into full-size steps of either sign.) The step is one at which the loss falls (1.37 -> 0.83 in 3 steps) and the
    two runs stay within the tolerance: with the classifier on the cluster centers, at lr 0.02 the all-reduce's
    rounding grows past it in 3 steps, and at lr 0.1 the nano model diverges."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def train(devices: int, tmp_path, task_class=ClassificationTask) -> ClassificationTask:
    L.seed_everything(0, verbose=False)
    task = task_class(
        "clusterformer_nano", num_classes=4, model_kwargs=dict(center_grid=4), warmup_epochs=0, label_smoothing=0.0
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        use_distributed_sampler=False,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(task, FixedData(batch_size=16 // devices))
    return task


def full_loss(task) -> torch.Tensor:
    data = FixedData(48)
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(task.eval()(data.images), data.labels)


def test_two_process_ddp_matches_one_process(tmp_path):
    single = train(1, tmp_path / "single", SGDTask)
    ddp = train(2, tmp_path / "ddp", SGDTask)
    fresh = SGDTask("clusterformer_nano", num_classes=4, model_kwargs=dict(center_grid=4))
    assert not torch.allclose(fresh.model.head.weight, single.model.head.weight)  # training did something
    assert full_loss(single) < 0.8 * full_loss(fresh)  # and it learnt
    for (name, a), b in zip(single.state_dict().items(), ddp.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(full_loss(single), full_loss(ddp))


def test_two_process_ddp_with_adamw_reaches_the_same_loss(tmp_path):
    single, ddp = train(1, tmp_path / "single"), train(2, tmp_path / "ddp")
    torch.testing.assert_close(full_loss(single), full_loss(ddp), rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# The metrics' synchronisation: two processes (gloo) that each evaluate half the images give the figures of one
# process that evaluates them all: the summed torchmetrics states (semantic mIoU, PQ), the COCO results gathered by
# metrics.distributed.gather_objects (detection AP, the panoptic mAP), and the panoptic evaluator that uses both.

PANOPTIC_CATEGORIES = [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 1}, {"id": 5, "isthing": 0}]
NUM_IMAGES = 8


def blocky_segments(rng, size=12):
    """An id map of 3x3 blocks (ids 1..9, some void pixels) and a label per id."""
    ids = np.kron(rng.integers(1, 10, (size // 3, size // 3)), np.ones((3, 3), np.int64))
    ids[rng.uniform(size=ids.shape) < 0.05] = 0
    return ids, {i: int(rng.integers(0, 3)) for i in range(1, 10)}


def panoptic_case(index):
    """A ground truth target (``collate_panoptic``'s evaluation layout) and a prediction that partly follows it."""
    rng = np.random.default_rng(index)
    gt_ids, label_of = blocky_segments(rng)
    present = sorted(set(np.unique(gt_ids).tolist()) - {0})
    target = {
        "masks": torch.from_numpy(np.stack([gt_ids == i for i in present])),
        "labels": torch.tensor([label_of[i] for i in present]),
        "iscrowd": torch.tensor([int(rng.uniform() < 0.15) for _ in present]),
        "segment_ids": torch.tensor(present),
        "image_id": 100 + index,
    }
    pred = np.where(rng.uniform(size=gt_ids.shape) < 0.85, gt_ids, rng.integers(0, 10, gt_ids.shape))
    pred = np.roll(pred, int(rng.integers(-1, 2)), 1)
    segments = []
    for i in sorted(set(np.unique(pred).tolist()) - {0}):
        label = label_of[i] if rng.uniform() < 0.8 else int(rng.integers(0, 3))
        category = PANOPTIC_CATEGORIES[label]
        segments.append({"id": i, "category_id": category["id"], "label": label, "isthing": bool(category["isthing"]),
                         "score": float(rng.uniform())})  # fmt: skip
    return target, {"ids": torch.from_numpy(pred), "segments_info": segments}


def coco_ground_truth():
    from clusterformer.data.masks import encode_rle

    rng = np.random.default_rng(0)
    images, annotations, detections = [], [], {}
    for image_id in range(1, NUM_IMAGES + 1):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": 32, "width": 32})
        boxes, labels = [], []
        for _ in range(int(rng.integers(1, 4))):
            x, y = rng.integers(0, 20, 2)
            w, h = rng.integers(4, 12, 2)
            mask = np.zeros((32, 32), bool)
            mask[y : y + h, x : x + w] = True
            category = int(rng.integers(1, 3))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "segmentation": encode_rle(mask), "area": int(mask.sum()),
                                "bbox": [float(x), float(y), float(w), float(h)], "iscrowd": 0})  # fmt: skip
            shift = rng.integers(-2, 3, 2)
            boxes.append([x + shift[0], y + shift[1], x + shift[0] + w, y + shift[1] + h])
            labels.append(category if rng.uniform() < 0.8 else 3 - category)
        boxes = torch.tensor(boxes, dtype=torch.float32).clamp(0, 32)
        masks = torch.zeros(len(boxes), 32, 32, dtype=torch.bool)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist(), strict=True):
            mask[y0:y1, x0:x1] = True
        detections[image_id] = {"boxes": boxes, "scores": torch.from_numpy(rng.uniform(size=len(boxes))),
                                "labels": torch.tensor(labels), "masks": masks}  # fmt: skip
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def evaluate_share(rank: int, world: int, folder: Path) -> dict:
    """The figures of the images ``rank, rank + world, ...`` (with the other processes' under DDP)."""
    from clusterformer.metrics.coco import CocoEvaluator
    from clusterformer.metrics.distributed import gather_objects
    from clusterformer.metrics.panoptic import PanopticQuality
    from clusterformer.metrics.panoptic_eval import PanopticEvaluator
    from clusterformer.metrics.semantic import SemanticConfusion

    rng = np.random.default_rng(0)
    labels = [np.where(rng.uniform(size=(9, 11)) < 0.2, 255, rng.integers(0, 5, (9, 11))) for _ in range(NUM_IMAGES)]
    predictions = [np.where(rng.uniform(size=(9, 11)) < 0.7, np.minimum(lab, 4), rng.integers(0, 5, (9, 11)))
                   for lab in labels]  # fmt: skip
    semantic = SemanticConfusion(5)
    quality = PanopticQuality(PANOPTIC_CATEGORIES)
    panoptic = PanopticEvaluator(PANOPTIC_CATEGORIES, num_things=2)
    _, detections = coco_ground_truth()
    coco = CocoEvaluator(folder / "instances.json", ("segm", "bbox"))
    for index in range(rank, NUM_IMAGES, world):
        semantic.update(torch.from_numpy(predictions[index]), torch.from_numpy(labels[index]))
        target, result = panoptic_case(index)
        panoptic.update(target, result)
        gt_ids = np.zeros(target["masks"].shape[1:], np.int64)
        for mask, segment_id in zip(target["masks"].numpy(), target["segment_ids"].tolist(), strict=True):
            gt_ids[mask] = segment_id
        gt_segments = [{"id": i, "category_id": PANOPTIC_CATEGORIES[label]["id"], "iscrowd": crowd}
                       for i, label, crowd in zip(target["segment_ids"].tolist(), target["labels"].tolist(),
                                                  target["iscrowd"].tolist(), strict=True)]  # fmt: skip
        quality.update(gt_ids, gt_segments, result["ids"], result["segments_info"])
        detected = detections[index + 1]
        coco.update(index + 1, bbox=detected, segm=detected)
    return {
        "gathered": gather_objects(("rank", rank)),
        "semantic": semantic.compute(),
        "pq": quality.compute(),
        "panoptic": panoptic.compute(),
        "coco": coco.compute(),
        "semantic_counts_after": int(semantic.confusion.sum()),  # each process keeps its own counts
    }


def _metrics_process(rank: int, world: int, folder: Path) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=world
    )
    try:
        with open(folder / f"rank{rank}.pkl", "wb") as f:
            pickle.dump(evaluate_share(rank, world, folder), f)
    finally:
        torch.distributed.destroy_process_group()


def assert_close_figures(got, expected, path=""):
    if isinstance(expected, dict):
        assert list(got) == list(expected), path
        for key in expected:
            assert_close_figures(got[key], expected[key], f"{path}/{key}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), path
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_close_figures(a, b, f"{path}/{i}")
    else:
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12, nan_ok=True), path


def test_metrics_of_two_processes_equal_one_process(tmp_path):
    ground_truth, _ = coco_ground_truth()
    (tmp_path / "instances.json").write_text(json.dumps(ground_truth))
    single = evaluate_share(0, 1, tmp_path)
    assert single["gathered"] == [("rank", 0)]
    assert single["pq"]["All"]["n"] == 3 and 0 < single["pq"]["All"]["pq"] < 1
    assert 0 < single["coco"]["segm"]["AP"] < 1 and 0 < single["panoptic"]["mAP_pan_th"] < 1
    torch.multiprocessing.spawn(_metrics_process, args=(2, tmp_path), nprocs=2)
    counts = []
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
            ddp = pickle.load(f)
        assert ddp["gathered"] == [("rank", 0), ("rank", 1)]
        assert ddp["semantic"]["IoU"] == pytest.approx(single["semantic"]["IoU"], nan_ok=True)  # integer counts
        for key in ("semantic", "pq", "panoptic", "coco"):
            assert_close_figures(ddp[key], single[key], key)
        counts.append(ddp["semantic_counts_after"])
    assert sum(counts) == single["semantic_counts_after"] and 0 < counts[0] < sum(counts)


def validate_panoptic(root, devices: int, tmp_path) -> dict:
    from clusterformer.tasks import PanopticData, PanopticTask

    torch.manual_seed(0)
    decoder = dict(num_queries=10, dim=32, mask_dim=32, num_layers=2, num_heads=4, ffn_dim=64)
    task = PanopticTask("clusterformer_nano", num_classes=7, num_things=4, decoder=decoder, score_threshold=0.05)
    data = PanopticData(
        str(root), "images/train", "annotations/panoptic_train.json", "annotations/panoptic_train", "images/val",
        "annotations/panoptic_val.json", "annotations/panoptic_val", test_shorter_side=48, batch_size=2, num_workers=0,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    return trainer.validate(task, data, verbose=False)[0]


def test_panoptic_validation_of_two_processes_equals_one_process(shapes_dir, tmp_path):
    """In a Lightning run: the task's metrics follow it to each process, and every process logs the figures of
    all the images (6 images: the distributed sampler pads none)."""
    root = shapes_dir(seed=4, num_train=2, num_val=6, size=64)
    single = validate_panoptic(root, 1, tmp_path / "single")
    ddp = validate_panoptic(root, 2, tmp_path / "ddp")
    assert set(single) == {"val/PQ", "val/SQ", "val/RQ", "val/PQ_th", "val/SQ_th", "val/RQ_th", "val/PQ_st",
                           "val/SQ_st", "val/RQ_st", "val/mIoU_pan", "val/mAP_pan_th"}  # fmt: skip
    assert single["val/mIoU_pan"] > 0
    for key, value in single.items():
        assert float(ddp[key]) == pytest.approx(float(value), rel=1e-6, abs=1e-9), key
