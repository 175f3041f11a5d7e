"""Do the demo's encoders tell the thing classes apart where the dense heads read them?

Linear probes (multinomial logistic regression, 500 Adam steps on standardised features) of the shape class
(circle, square, triangle, star) from encoder features of a finished ``clusterformer demo`` run:

* ``crops``: the classifier's ImageFolder crops at its input size (64 px, the object centred and filling the
  image), each stage's feature map averaged over the whole crop: what the classifier was trained on;
* ``crops 40 px``: the same crops scaled to 40 px and pasted at the centre of a 64-px canvas of one colour (the
  median of the crop's border pixels): the object smaller;
* ``crops shifted``: the same, pasted at a random place of the canvas (up to 12 px off the centre each way): the
  object smaller and off-centre;
* ``scenes``: the objects of the validation scenes (96 px), each stage's features averaged over the object's
  ground-truth mask: what a query's clustering reads in the dense models;

for the classifier's encoder and for the encoder of every dense stage; and the classifier itself (its own head) on
the centred and the shifted validation crops. ``--train-steps N`` also trains the
classifier's encoder with a linear head on the scene objects' mask-averaged features (stages 1-3, batch 8,
AdamW 3e-4) and prints the validation accuracy every 100 steps: whether the encoder learns the classes in
scenes when asked directly.

    python benchmarks/thing_class_probe.py outputs/demo [--train-steps 400] [--json OUT.json]

Chance is 0.25 (the validation objects are balanced within 0.23-0.26).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clusterformer.data.shapes import THINGS
from clusterformer.recipes import build_stage, classifier_encoder, load_encoder
from clusterformer.weights import task_from_checkpoint

DENSE = ("detection", "instance", "semantic", "panoptic")
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def encoder(demo: Path, stage: str):
    """The encoder of a demo stage's checkpoint (the classifier's, or a dense model's), in a dense task module."""
    task, _ = build_stage("instance", {"root": str(demo / "data"), "num_workers": 0})
    if stage == "classification":
        load_encoder(task, classifier_encoder(demo / "classification" / "checkpoints" / "last.ckpt"))
    else:
        state = torch.load(demo / stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        prefix = "model.backbone."
        task.model.backbone.load_state_dict(
            {k.removeprefix(prefix): v for k, v in state["state_dict"].items() if k.startswith(prefix)}
        )
    return task.model.backbone.eval()


def probe(train: list[torch.Tensor], train_labels, val: list[torch.Tensor], val_labels) -> list[float]:
    """Validation accuracy of a linear probe per stage."""
    torch.manual_seed(0)
    accuracies = []
    for a, b in zip(train, val, strict=True):
        mean, std = a.mean(0), a.std(0) + 1e-5
        a, b = (a - mean) / std, (b - mean) / std
        linear = torch.nn.Linear(a.shape[1], len(THINGS))
        optimiser = torch.optim.Adam(linear.parameters(), 1e-2, weight_decay=1e-4)
        for _ in range(500):
            optimiser.zero_grad()
            F.cross_entropy(linear(a), train_labels).backward()
            optimiser.step()
        with torch.no_grad():
            accuracies.append((linear(b).argmax(1) == val_labels).float().mean().item())
    return accuracies


def crop_images(data: Path, split: str, count: int, shifted: bool | None, rng: np.random.Generator):
    """The ImageFolder crops of ``split`` (``count`` per class) at 64 px; ``shifted``: scaled to 40 px and pasted
    at a random place (``True``) or the centre (``None``) of a 64-px canvas of the border's median colour."""
    images, labels = [], []
    for label, name in enumerate(THINGS):
        for path in sorted((data / "imagefolder" / split / name).glob("*.png"))[:count]:
            crop = np.asarray(Image.open(path).convert("RGB"))
            if shifted is not False:
                small = np.asarray(Image.fromarray(crop).resize((40, 40), Image.BICUBIC))
                y, x = rng.integers(0, 25, 2) if shifted else (12, 12)
                border = np.concatenate([crop[0], crop[-1], crop[:, 0], crop[:, -1]])
                canvas = np.empty((64, 64, 3), np.uint8)
                canvas[:] = np.median(border, axis=0).astype(np.uint8)
                canvas[y : y + 40, x : x + 40] = small
                crop = canvas
            else:
                crop = np.asarray(Image.fromarray(crop).resize((64, 64), Image.BICUBIC))
            images.append(((torch.from_numpy(crop.copy()).permute(2, 0, 1).float() / 255) - MEAN) / STD)
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


@torch.no_grad()
def crop_features(backbone, images: torch.Tensor) -> list[torch.Tensor]:
    features = [backbone.forward_intermediates(chunk, intermediates_only=True) for chunk in images.split(64)]
    return [torch.cat([f[s].mean((2, 3)) for f in features]) for s in range(len(features[0]))]


def scene_features(backbone, images, targets, stages=(0, 1, 2, 3)) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each non-crowd object's features averaged over its mask, per stage; its labels."""
    maps = backbone.forward_intermediates(images, intermediates_only=True)
    features, labels = [[] for _ in stages], []
    for b, target in enumerate(targets):
        keep = ~target["iscrowd"].bool() if "iscrowd" in target else torch.ones(len(target["labels"]), dtype=bool)
        masks = target["masks"][keep].float()
        if len(masks) == 0:
            continue
        labels.append(target["labels"][keep])
        for i, s in enumerate(stages):
            weights = F.interpolate(masks[None], maps[s].shape[-2:], mode="area")[0].flatten(1)
            weights = weights / weights.sum(1, keepdim=True).clamp(min=1e-6)
            features[i].append(weights @ maps[s][b].flatten(1).T)
    return [torch.cat(f) for f in features], torch.cat(labels)


def scene_loader(demo: Path, train: bool):
    _, data = build_stage(
        "instance",
        {"root": str(demo / "data"), "crop": 96, "test_shorter_side": 96, "num_workers": 0, "scale_range": [1, 1]},
    )
    data.setup("fit")
    return data.train_dataloader() if train else data.val_dataloader()


@torch.no_grad()
def scene_set(backbone, loader, batches: int):
    parts, labels = [], []
    for i, (images, targets) in enumerate(loader):
        if i >= batches:
            break
        features, label = scene_features(backbone, images, targets)
        parts.append(features)
        labels.append(label)
    return [torch.cat([p[s] for p in parts]) for s in range(len(parts[0]))], torch.cat(labels)


def train_on_scenes(demo: Path, steps: int) -> list[tuple[int, float]]:
    torch.manual_seed(0)
    backbone = encoder(demo, "classification").train()
    stages = (1, 2, 3)
    dims = [backbone.forward_intermediates(torch.zeros(1, 3, 64, 64), intermediates_only=True)[s].shape[1]
            for s in stages]  # fmt: skip
    head = torch.nn.Linear(sum(dims), len(THINGS))
    optimiser = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], 3e-4, weight_decay=0.05)
    train, val = scene_loader(demo, True), scene_loader(demo, False)
    curve, step = [], 0
    while step < steps:
        for images, targets in train:
            features, labels = scene_features(backbone, images, targets, stages)
            loss = F.cross_entropy(head(torch.cat(features, 1)), labels)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            step += 1
            if step % 100 == 0 or step == steps:
                backbone.eval()
                with torch.no_grad():
                    right = total = 0
                    for i, (val_images, val_targets) in enumerate(val):
                        if i >= 25:
                            break
                        features, labels = scene_features(backbone, val_images, val_targets, stages)
                        right += (head(torch.cat(features, 1)).argmax(1) == labels).sum().item()
                        total += len(labels)
                backbone.train()
                curve.append((step, right / total))
                print(f"  trained on the scenes' objects: step {step}, validation accuracy {right / total:.3f}")
            if step >= steps:
                break
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo", type=Path, help="the OUT folder of a finished `clusterformer demo` run")
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    began = time.perf_counter()
    rng = np.random.default_rng(0)
    results = {}
    scene_train, scene_val = scene_loader(args.demo, True), scene_loader(args.demo, False)
    for stage in ("classification", *DENSE):
        if not (args.demo / stage / "checkpoints" / "last.ckpt").is_file():
            continue
        backbone = encoder(args.demo, stage)
        rows = {}
        if stage == "classification":
            _, classifier = task_from_checkpoint(args.demo / "classification" / "checkpoints" / "last.ckpt")
            folder_order = sorted(THINGS)  # the ImageFolder's class order: the classifier's labels
            for name, shifted in (("crops", False), ("crops 40 px", None), ("crops shifted", True)):
                train_images, train_labels = crop_images(args.demo / "data", "train", 250, shifted, rng)
                val_images, val_labels = crop_images(args.demo / "data", "val", 100, shifted, rng)
                rows[name] = probe(
                    crop_features(backbone, train_images), train_labels, crop_features(backbone, val_images), val_labels
                )
                with torch.no_grad():
                    predicted = classifier.eval().model(val_images).argmax(1).tolist()
                right = [folder_order[p] == THINGS[t] for p, t in zip(predicted, val_labels.tolist(), strict=True)]
                rows[f"{name}, the classifier itself"] = [float(np.mean(right))]
                print(f"  the classifier itself on the validation {name}: top-1 {np.mean(right):.3f}")
        train, train_labels = scene_set(backbone, scene_train, 40)
        val, val_labels = scene_set(backbone, scene_val, 25)
        rows["scenes"] = probe(train, train_labels, val, val_labels)
        for name, accuracies in rows.items():
            if "itself" in name:
                continue
            shown = "  ".join(f"stage {i} {a:.3f}" for i, a in enumerate(accuracies))
            print(f"{stage:>14} encoder, {name:>13}: {shown}")
        results[stage] = rows
    if args.train_steps:
        results["trained_on_scenes"] = train_on_scenes(args.demo, args.train_steps)
    results["seconds"] = round(time.perf_counter() - began, 1)
    print(f"{results['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
