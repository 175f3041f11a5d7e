"""Plain helpers shared by several test modules (fixtures are in ``conftest.py``): slow references of small
formulas and a task checkpoint after one training step."""

import math
import warnings

import torch


# ---------------------------------------------------------------- slow references (python floats)
def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def slow_point_sample(image: torch.Tensor, x: float, y: float) -> float:
    """Bilinear interpolation of an ``(H, W)`` map at ``(x, y)`` in [0, 1] relative to the map: pixel ``i``
    covers ``[i / W, (i + 1) / W)`` and its value sits at its center; beyond the outermost centers the
    border pixel's value holds."""
    height, width = image.shape
    px = min(max(x * width - 0.5, 0.0), width - 1.0)
    py = min(max(y * height - 0.5, 0.0), height - 1.0)
    x0, y0 = math.floor(px), math.floor(py)
    x1, y1 = min(x0 + 1, width - 1), min(y0 + 1, height - 1)
    fx, fy = px - x0, py - y0
    v = image.double()
    top = (1 - fx) * v[y0, x0].item() + fx * v[y0, x1].item()
    bottom = (1 - fx) * v[y1, x0].item() + fx * v[y1, x1].item()
    return (1 - fy) * top + fy * bottom


def corners(box) -> tuple[float, float, float, float]:
    """The ``xyxy`` corners of a ``cxcywh`` box."""
    cx, cy, w, h = (float(v) for v in box)
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


# ---------------------------------------------------------------- task checkpoints
SIZE = 64  # the shapes scenes and the dense models' input
DECODER = dict(num_queries=10, dim=32, mask_dim=32, num_layers=2, num_heads=4, ffn_dim=64)


def save_after_one_step(module, data, path):
    """Train ``module`` on ``data`` for one step on the CPU (the data module attached, so that the class names are
    stored) and save the checkpoint at ``path``; returns ``path``."""
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=str(path.parent),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    trainer.save_checkpoint(path)
    return path


def task_and_data(task: str, root):
    """A small ``task`` module (ClusterFormer-Nano, a small decoder) and its data module on the shapes dataset at
    ``root`` (scenes of :data:`SIZE` pixels)."""
    from clusterformer.tasks import (
        ClassificationTask,
        CocoData,
        ImageFolderData,
        PanopticData,
        PanopticTask,
        SemanticData,
        SemanticTask,
        SetTask,
    )

    dense = dict(crop=SIZE, scale_range=(0.8, 1.2), test_shorter_side=SIZE, batch_size=4, num_workers=0)
    if task == "classification":
        data = ImageFolderData(str(root / "imagefolder"), img_size=32, eval_resize=32, batch_size=4, num_workers=0,
                               randaugment=False)  # fmt: skip
        return ClassificationTask("clusterformer_nano", num_classes=4, model_kwargs=dict(center_grid=4)), data
    if task in ("detection", "instance"):
        data = CocoData(str(root), "images/train", "annotations/instances_train.json", "images/val",
                        "annotations/instances_val.json", masks=task == "instance", **dense)  # fmt: skip
        loss = {"num_points": 64} if task == "instance" else None
        return SetTask(task, "clusterformer_nano", num_classes=4, decoder=DECODER, loss=loss, warmup_steps=1), data
    if task == "semantic":
        data = SemanticData(str(root), "images/train", "semantic/train", "images/val", "semantic/val", num_classes=7,
                            **dense)  # fmt: skip
        decoder = {k: v for k, v in DECODER.items() if k != "num_queries"}
        return SemanticTask("clusterformer_nano", num_classes=7, decoder=decoder, loss={"num_points": 64},
                            warmup_steps=1), data  # fmt: skip
    data = PanopticData(str(root), "images/train", "annotations/panoptic_train.json", "annotations/panoptic_train",
                        "images/val", "annotations/panoptic_val.json", "annotations/panoptic_val", **dense)  # fmt: skip
    return PanopticTask("clusterformer_nano", num_classes=7, num_things=4, decoder=DECODER, loss={"num_points": 64},
                        warmup_steps=1), data  # fmt: skip


def train_one_step(task: str, root, path):
    """A checkpoint of ``task`` (:func:`task_and_data`) after one training step on the shapes data at ``root``."""
    import lightning as L

    L.seed_everything(0, verbose=False)
    return save_after_one_step(*task_and_data(task, root), path)


def set_losses_over_steps(model, criterion, images, targets, steps: int = 6) -> list[float]:
    """The loss of the matching queries (denoising terms left out) before each of ``steps`` AdamW steps (lr 1e-3) of
    a set model on one batch, the whole loss optimised; the criterion's random points drawn alike every step."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    values = []
    for _ in range(steps):
        torch.manual_seed(1)
        losses = criterion(model(images, targets), targets)
        values.append(criterion.weighted_total({k: v for k, v in losses.items() if "_dn" not in k}).item())
        optimizer.zero_grad()
        criterion.weighted_total(losses).backward()
        optimizer.step()
    return values
