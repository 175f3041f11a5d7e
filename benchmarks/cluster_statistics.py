"""Whether trained models cluster: the statistics of ``clusterformer explain`` averaged over many images.

For every model (task checkpoints, or ``timm:NAME`` for a randomly initialised timm ClusterFormer) and every
image, ``explain.compute_assignments`` gives the soft assignments of the last block of each encoder stage (and
of a dense model's last decoder layer); ``layers.clustering.cluster_statistics`` turns each into clusters used,
mean largest assignment and mean center cosine, averaged over the heads. This script averages them over the
images and, with ``--panoptic-json``, counts the segments of each scene, to compare with the queries the
decoder gives pixels to. Example (the demo's data and checkpoints)::

    python benchmarks/cluster_statistics.py outputs/demo/classification/checkpoints/last.ckpt \\
        outputs/demo/panoptic/checkpoints/last.ckpt --images outputs/demo/data/images/val --size 96 \\
        --panoptic-json outputs/demo/data/annotations/panoptic_val.json --out cluster_statistics.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import timm
import torch
import yaml

from clusterformer.commands.explain import compute_assignments, model_from_checkpoint, model_from_timm
from clusterformer.data.images import load_rgb
from clusterformer.layers.clustering import cluster_statistics

KEYS = ("clusters_used", "mean_max_assignment", "center_cosine")


def measure(model_spec: str, images: list[Path], size: int | None) -> dict:
    if model_spec.startswith("timm:"):  # timm:NAME[,key=value...], random weights (seed 0)
        name, *options = model_spec[len("timm:") :].split(",")
        torch.manual_seed(0)
        model = model_from_timm(name)
        if options:
            kwargs = {key: yaml.safe_load(value) for key, value in (option.split("=", 1) for option in options)}
            torch.manual_seed(0)
            model.backbone = timm.create_model(name, num_classes=0, **kwargs)
            model.description = f"{name} ({', '.join(options)}, random weights)"
    else:
        model = model_from_checkpoint(model_spec)
    per_map: dict[str, dict[str, list]] = {}
    for path in images:
        result = compute_assignments(model, load_rgb(path), size)
        for entry in result["maps"]:
            stats = cluster_statistics(torch.from_numpy(entry["assignments"]), entry["centers"])
            record = per_map.setdefault(entry["name"], {key: [] for key in KEYS} | {"tokens": [], "clusters": 0})
            for key in KEYS:
                record[key].append(stats[key])
            record["tokens"].append(int(np.prod(entry["assignments"].shape[2:])))
            record["clusters"] = int(entry["assignments"].shape[1])
    maps = {
        name: {"clusters": r["clusters"], "tokens": float(np.mean(r["tokens"]))}
        | {key: float(np.mean(r[key])) for key in KEYS}
        for name, r in per_map.items()
    }
    return {"model": model.description, "images": len(images), "maps": maps}


def segments_per_scene(panoptic_json: Path, images: list[Path]) -> float:
    annotations = {Path(a["file_name"]).stem: a for a in json.loads(panoptic_json.read_text())["annotations"]}
    return float(np.mean([len(annotations[p.stem]["segments_info"]) for p in images]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "models", nargs="+", help="task checkpoints, or timm:NAME[,key=value...] for a random timm ClusterFormer"
    )
    parser.add_argument("--images", required=True, nargs="+", help="image files or folders (*.png, *.jpg)")
    parser.add_argument("--limit", type=int, default=40, help="first N images (default 40)")
    parser.add_argument("--size", type=int, help="shorter side of the model input (default: each model's)")
    parser.add_argument("--panoptic-json", type=Path, help="COCO panoptic JSON of the images: segments per scene")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    images = []
    for item in map(Path, args.images):
        images += sorted(p for p in item.iterdir() if p.suffix.lower() in (".png", ".jpg")) if item.is_dir() else [item]
    images = images[: args.limit]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = {"images": [str(p) for p in images], "size": args.size, "models": []}
    if args.panoptic_json:
        report["segments_per_scene"] = segments_per_scene(args.panoptic_json, images)
    print(
        f"{len(images)} images"
        + (f", {report['segments_per_scene']:.2f} segments per scene" if args.panoptic_json else "")
    )
    print(f"{'model / map':<48} {'tokens':>7} {'used':>6} {'max assign':>10} {'cosine':>7}")
    for spec in args.models:
        result = measure(spec, images, args.size)
        report["models"].append(result)
        print(result["model"])
        for name, m in result["maps"].items():
            print(f"  {name:<46} {m['tokens']:>7.0f} {m['clusters_used']:>6.1f} {m['mean_max_assignment']:>10.3f} "
                  f"{m['center_cosine']:>7.3f}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
