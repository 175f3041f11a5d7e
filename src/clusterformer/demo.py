"""``clusterformer demo``: generate the shapes dataset, train ClusterFormer-Nano on it task after task,
evaluate every model before and after training and write a short report (metrics, training curves,
pictures of predictions).

1. classification of the shape crops (top-1);
2. detection and instance segmentation of the scenes with one model (box head + mask head on the
   clustering decoder), its encoder initialised from step 1's classifier, as the paper initialises the
   dense models from the ImageNet encoder (box AP and mask AP, pycocotools).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

PRESETS = {
    # images per split, scene size, epochs per task
    "full": dict(num_train=1000, num_val=200, size=96, epochs=12, set_epochs=6),
    "quick": dict(num_train=300, num_val=80, size=96, epochs=3, set_epochs=2),
}
SET_DECODER = dict(num_queries=20, dim=64, mask_dim=64, num_layers=3, num_heads=4, iterations=3, ffn_dim=256)


def _trainer_kwargs(out: Path) -> dict:
    return dict(accelerator="cpu", devices=1, default_root_dir=str(out), enable_model_summary=False)


def run_demo(out: str | Path, quick: bool = False, seed: int = 0, num_workers: int = 2, **overrides) -> dict:
    """Run the demo into ``out``; ``overrides`` replace entries of the preset (num_train, num_val, size,
    epochs, set_epochs). Returns the metrics written to ``out/report/metrics.json``."""
    from .data import make_shapes

    preset = {**PRESETS["quick" if quick else "full"], **overrides}
    out = Path(out)
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"[1/3] generating the shapes dataset in {out / 'data'}")
    make_shapes(out / "data", seed, preset["num_train"], preset["num_val"], preset["size"])

    print(f"[2/3] classification: clusterformer_nano, {preset['epochs']} epochs on the shape crops")
    classification, classifier = run_classification(out, preset, seed, num_workers)
    print(f"      top-1 {classification['untrained']['val/top1']:.3f} -> {classification['trained']['val/top1']:.3f}")

    print(f"[3/3] detection + instance segmentation: {preset['set_epochs']} epochs on the scenes")
    sets = run_sets(out, preset, seed, num_workers, classifier.model.state_dict())
    for key in ("bbox_AP50", "segm_AP50"):
        print(f"      {key} {sets['untrained'][f'val/{key}']:.3f} -> {sets['trained'][f'val/{key}']:.3f}")

    metrics = {
        "model": "clusterformer_nano",
        "scenes": {"train": preset["num_train"], "val": preset["num_val"], "size": preset["size"]},
        "classification": classification,
        "detection_instance": sets,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (report / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_report(report / "report.md", metrics)
    print(f"done in {metrics['seconds']:.0f} s; report in {report}")
    return metrics


def run_classification(out: Path, preset: dict, seed: int, num_workers: int):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from .tasks import ClassificationTask, ImageFolderData

    L.seed_everything(seed, verbose=False)
    data = ImageFolderData(
        str(out / "data" / "imagefolder"), img_size=64, eval_resize=64, batch_size=64, num_workers=num_workers,
        crop_scale=(0.6, 1.0), randaugment=False, random_erasing=0.0,
    )  # fmt: skip
    task = ClassificationTask("clusterformer_nano", num_classes=data.num_classes, lr=1e-3, warmup_epochs=0.5)
    common = _trainer_kwargs(out / "classification")
    untrained = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, **common)
    before = untrained.validate(task, data, verbose=False)[0]
    logger = CSVLogger(str(out / "classification"), name="logs", version="")
    trainer = L.Trainer(
        max_epochs=preset["epochs"], logger=logger, log_every_n_steps=5,
        callbacks=[ModelCheckpoint(dirpath=str(out / "classification" / "checkpoints"), save_last=True)], **common,
    )  # fmt: skip
    trainer.fit(task, data)
    after = trainer.validate(task, data, verbose=False)[0]
    report = out / "report"
    plot_curves(Path(logger.log_dir) / "metrics.csv", report / "classification_curve.png", ["val/top1"])
    plot_classification(task, data, report / "classification_predictions.png")
    metrics = {"classes": data.classes, "epochs": preset["epochs"], "untrained": before, "trained": after}
    return metrics, task


def run_sets(out: Path, preset: dict, seed: int, num_workers: int, encoder_state: dict | None) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from .tasks import CocoData, SetTask

    L.seed_everything(seed, verbose=False)
    size = preset["size"]
    data = CocoData(
        str(out / "data"), "images/train", "annotations/instances_train.json", "images/val",
        "annotations/instances_val.json", masks=True, crop=size, scale_range=(0.5, 1.5), test_shorter_side=size,
        batch_size=8, num_workers=num_workers,
    )  # fmt: skip
    task = SetTask(
        "instance", "clusterformer_nano", num_classes=data.num_classes, decoder=SET_DECODER,
        loss={"num_points": 1024}, lr=1e-3, backbone_lr_mult=1.0, warmup_steps=20, lr_milestones=(0.9,),
        predict_boxes=True,
    )  # fmt: skip
    if encoder_state is not None:  # the classifier's encoder, without its classification head
        encoder_state = {k: v for k, v in encoder_state.items() if not k.startswith("head.")}
        task.model.backbone.load_state_dict(encoder_state)
    common = _trainer_kwargs(out / "detection_instance")
    untrained = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, **common)
    before = untrained.validate(task, data, verbose=False)[0]
    logger = CSVLogger(str(out / "detection_instance"), name="logs", version="")
    trainer = L.Trainer(
        max_epochs=preset["set_epochs"], logger=logger, log_every_n_steps=5, gradient_clip_val=1.0,
        check_val_every_n_epoch=max(1, preset["set_epochs"] // 2),
        callbacks=[ModelCheckpoint(dirpath=str(out / "detection_instance" / "checkpoints"), save_last=True)],
        **common,
    )  # fmt: skip
    trainer.fit(task, data)
    after = trainer.validate(task, data, verbose=False)[0]
    report = out / "report"
    plot_curves(Path(logger.log_dir) / "metrics.csv", report / "detection_instance_curve.png",
                ["val/bbox_AP50", "val/segm_AP50"])  # fmt: skip
    plot_instances(task, data, report / "detection_instance_predictions.png")
    return {"epochs": preset["set_epochs"], "untrained": before, "trained": after}


def write_report(path: Path, metrics: dict) -> None:
    cls, sets = metrics["classification"], metrics["detection_instance"]
    scenes = metrics["scenes"]
    rows = [
        ("classification top-1", cls["untrained"]["val/top1"], cls["trained"]["val/top1"]),
        *(
            (f"{name} {key}", sets["untrained"][f"val/{prefix}_{key}"], sets["trained"][f"val/{prefix}_{key}"])
            for name, prefix in (("box", "bbox"), ("mask", "segm"))
            for key in ("AP", "AP50")
        ),
    ]
    lines = [
        "# ClusterFormer demo",
        "",
        f"clusterformer_nano on {scenes['train']} generated {scenes['size']}-pixel scenes ({scenes['val']} for "
        f"validation), CPU, {metrics['seconds']:.0f} s in all. Classification of the shape crops "
        f"({', '.join(cls['classes'])}) for {cls['epochs']} epochs; then one detection + instance model "
        f"(clustering decoder, box and mask heads, encoder from the classifier) for {sets['epochs']} epochs.",
        "",
        "| metric (validation) | untrained | trained |",
        "| --- | --- | --- |",
        *(f"| {name} | {a:.3f} | {b:.3f} |" for name, a, b in rows),
        "",
        "![classification curve](classification_curve.png)",
        "",
        "![classification predictions](classification_predictions.png)",
        "",
        "![detection and instance curve](detection_instance_curve.png)",
        "",
        "![detection and instance predictions](detection_instance_predictions.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def plot_curves(metrics_csv: Path, path: Path, val_keys: list[str]) -> None:
    """Training loss (left axis) and validation metrics (right axis) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [], []
    val = {key: ([], []) for key in val_keys}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                steps.append(int(row["step"]))
                losses.append(float(row["train/loss"]))
            for key in val_keys:
                if row.get(key):
                    val[key][0].append(int(row["step"]))
                    val[key][1].append(float(row[key]))
    fig, left = plt.subplots(figsize=(6, 3.5))
    left.plot(steps, losses, color="tab:blue", label="train loss")
    left.set_xlabel("step")
    left.set_ylabel("train loss", color="tab:blue")
    right = left.twinx()
    for key, color in zip(val_keys, ("tab:orange", "tab:green", "tab:red"), strict=False):
        right.plot(*val[key], "o-", color=color, label=key)
    right.set_ylabel("validation")
    right.set_ylim(0, 1)
    right.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _denormalise(image):
    import torch
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None], torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def plot_classification(task, data, path: Path, count: int = 16) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    dataset = data._dataset(data.hparams.val_dir, train=False)
    index = torch.linspace(0, len(dataset) - 1, count).long().tolist()
    images = torch.stack([dataset[i][0] for i in index])
    labels = [dataset[i][1] for i in index]
    task.eval()
    with torch.no_grad():
        predicted = task(images).softmax(-1)
    fig, axes = plt.subplots(2, count // 2, figsize=(count // 2 * 1.4, 3.4))
    for ax, image, label, probs in zip(axes.flat, images, labels, predicted, strict=True):
        ax.imshow(_denormalise(image))
        guess = int(probs.argmax())
        ax.set_title(
            f"{data.classes[guess]} {probs[guess]:.2f}", fontsize=7, color="green" if guess == label else "red"
        )
        ax.axis("off")
    fig.suptitle("validation crops: prediction and confidence (green = correct)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_instances(task, data, path: Path, count: int = 6, min_score: float = 0.3) -> None:
    """Validation scenes: ground truth (left of each pair) and the model's masks and boxes above
    ``min_score`` (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from matplotlib.patches import Rectangle

    from .data import CATEGORIES
    from .tasks.sets import collate_sets

    dataset = data._dataset(train=False)
    index = torch.linspace(0, len(dataset) - 1, count).long().tolist()
    images, targets = collate_sets([dataset[i] for i in index], drop_crowds=False)
    task.eval()
    with torch.no_grad():
        results = task.predict_batch(images, targets)
    colours = {i: np.array(c["color"]) / 255 for i, c in enumerate(CATEGORIES)}
    names = data.classes
    fig, axes = plt.subplots(2, count, figsize=(count * 1.9, 4.2))
    for column, (image, target, result) in enumerate(zip(images, targets, results, strict=True)):
        h, w = target["size"]
        picture = _denormalise(image[:, :h, :w])
        for row, (masks, boxes, labels, scores) in enumerate(
            [
                (target["masks"][:, :h, :w], None, target["labels"], None),
                (result["masks"], result["box_results"]["boxes"], result["labels"], result["scores"]),
            ]
        ):
            ax = axes[row, column]
            overlay = picture.copy()
            keep = range(len(labels)) if scores is None else (scores >= min_score).nonzero().flatten().tolist()
            for i in keep:
                mask = masks[i].numpy()
                overlay[mask] = 0.45 * overlay[mask] + 0.55 * colours[int(labels[i])]
            ax.imshow(overlay)
            for i in keep:
                label = names[int(labels[i])] + ("" if scores is None else f" {scores[i]:.2f}")
                if boxes is not None:
                    x0, y0, x1, y1 = boxes[i].tolist()
                    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="white", linewidth=0.8))
                    ax.text(x0, y0, label, fontsize=5, color="white", va="bottom")
            ax.set_title("ground truth" if row == 0 else f"prediction (score >= {min_score})", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
