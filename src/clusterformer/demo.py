"""``clusterformer demo``: generate the shapes dataset, train ClusterFormer-Nano on it, evaluate it and
write a short report (metrics, training curve, predictions)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

PRESETS = {
    # images per split, image size, epochs
    "full": dict(num_train=1000, num_val=200, size=96, epochs=12),
    "quick": dict(num_train=300, num_val=80, size=96, epochs=3),
}


def run_demo(out: str | Path, quick: bool = False, seed: int = 0, num_workers: int = 2, **overrides) -> dict:
    """Run the demo into ``out``; ``overrides`` replace entries of the preset (num_train, num_val, size,
    epochs). Returns the metrics written to ``out/report/metrics.json``."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from .data import make_shapes
    from .tasks import ClassificationTask, ImageFolderData

    preset = {**PRESETS["quick" if quick else "full"], **overrides}
    out = Path(out)
    start = time.perf_counter()
    print(f"[1/4] generating the shapes dataset in {out / 'data'}")
    make_shapes(out / "data", seed, preset["num_train"], preset["num_val"], preset["size"])

    L.seed_everything(seed, verbose=False)
    data = ImageFolderData(
        str(out / "data" / "imagefolder"),
        img_size=64,
        eval_resize=64,
        batch_size=64,
        num_workers=num_workers,
        crop_scale=(0.6, 1.0),
        randaugment=False,
        random_erasing=0.0,
    )
    task = ClassificationTask("clusterformer_nano", num_classes=data.num_classes, lr=1e-3, warmup_epochs=0.5)
    common = dict(accelerator="cpu", devices=1, default_root_dir=str(out), enable_model_summary=False)

    print("[2/4] evaluating the untrained model")
    untrained = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, **common)
    before = untrained.validate(task, data, verbose=False)[0]

    print(f"[3/4] training clusterformer_nano for {preset['epochs']} epochs on the CPU")
    logger = CSVLogger(str(out), name="logs", version="")
    trainer = L.Trainer(
        max_epochs=preset["epochs"],
        logger=logger,
        log_every_n_steps=5,
        callbacks=[ModelCheckpoint(dirpath=str(out / "checkpoints"), save_last=True)],
        **common,
    )
    trainer.fit(task, data)
    after = trainer.validate(task, data, verbose=False)[0]

    print("[4/4] writing the report")
    metrics = {
        "model": "clusterformer_nano",
        "dataset": "shapes imagefolder crops",
        "classes": data.classes,
        "epochs": preset["epochs"],
        "untrained": before,
        "trained": after,
        "seconds": round(time.perf_counter() - start, 1),
    }
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    (report / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_training_curve(Path(logger.log_dir) / "metrics.csv", report / "training_curve.png")
    plot_predictions(task, data, report / "predictions.png")
    (report / "report.md").write_text(
        f"# ClusterFormer demo\n\nclusterformer_nano, {preset['epochs']} epochs on {preset['num_train']} generated "
        f"scenes (ImageFolder crops of {', '.join(data.classes)}), CPU, {metrics['seconds']} s.\n\n"
        f"| | top-1 | loss |\n| --- | --- | --- |\n"
        f"| untrained | {before['val/top1']:.3f} | {before['val/loss']:.3f} |\n"
        f"| trained | {after['val/top1']:.3f} | {after['val/loss']:.3f} |\n\n"
        "![training curve](training_curve.png)\n\n![predictions](predictions.png)\n"
    )
    print(f"top-1 {before['val/top1']:.3f} -> {after['val/top1']:.3f}; report in {report}")
    return metrics


def plot_training_curve(metrics_csv: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, val_steps, val_top1 = [], [], [], []
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                steps.append(int(row["step"]))
                losses.append(float(row["train/loss"]))
            if row.get("val/top1"):
                val_steps.append(int(row["step"]))
                val_top1.append(float(row["val/top1"]))
    fig, left = plt.subplots(figsize=(6, 3.5))
    left.plot(steps, losses, color="tab:blue", label="train loss")
    left.set_xlabel("step")
    left.set_ylabel("train loss", color="tab:blue")
    right = left.twinx()
    right.plot(val_steps, val_top1, "o-", color="tab:orange", label="val top-1")
    right.set_ylabel("val top-1", color="tab:orange")
    right.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_predictions(task, data, path: Path, count: int = 16) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    dataset = data._dataset(data.hparams.val_dir, train=False)
    index = torch.linspace(0, len(dataset) - 1, count).long().tolist()
    images = torch.stack([dataset[i][0] for i in index])
    labels = [dataset[i][1] for i in index]
    task.eval()
    with torch.no_grad():
        predicted = task(images).softmax(-1)
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None], torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    fig, axes = plt.subplots(2, count // 2, figsize=(count // 2 * 1.4, 3.4))
    for ax, image, label, probs in zip(axes.flat, images, labels, predicted, strict=True):
        ax.imshow((image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
        guess = int(probs.argmax())
        ok = guess == label
        ax.set_title(f"{data.classes[guess]} {probs[guess]:.2f}", fontsize=7, color="green" if ok else "red")
        ax.axis("off")
    fig.suptitle("validation crops: prediction and confidence (green = correct)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
