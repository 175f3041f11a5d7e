"""``clusterformer explain``: the cluster assignments of every encoder stage drawn over the image, as the
paper's Figure 3, and for dense models the decoder's query-to-pixel assignment.

For each stage, the soft assignment of its last block's last E-step (``ClusterFormer.forward_clusters``:
``(heads, K, H_i, W_i)``, a softmax over the K clusters) becomes a hard one, ``argmax`` over K; every token
then covers its ``stride x stride`` input pixels, which are mapped back to the image's own pixels. One colour
per cluster, blended with the image, white lines between clusters. The decoder's picture is the same for the
last decoder layer's clustering of the pixel features into the queries (``ClusteringDecoderLayer.cluster``:
a softmax over the queries), read with a forward hook, so the decoder itself is unchanged.

Writes ``stage<i>.png`` (the image's size), ``decoder.png`` (dense models), ``summary.png`` (all of them with
the image) and ``clusters.json`` (cluster sizes and, per map, whether the model clusters: clusters used, mean
largest assignment and mean center cosine, averaged over the heads); see ``docs/predict_explain.md``. A
non-empty output folder is refused unless ``overwrite`` (``--overwrite``), which first deletes the pictures and
JSON of the previous run (:data:`OUTPUTS`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import pictures
from ..layers.clustering import cluster_statistics
from ..outputs import atomic_path, check_output_folder, remove_outputs, save_png, write_json
from ..predictor import ImageInput, Predictor, as_image, eval_transform, image_tensor

# what explain writes into its folder: the previous results that --overwrite deletes
OUTPUTS = ("stage*.png", "decoder*.png", "summary.png", "clusters.json")


class ExplainError(ValueError):
    """Bad input to ``explain``: the message names the file or model and the problem."""


@dataclass
class ExplainModel:
    """A ClusterFormer encoder, the whole dense model when there is one (``None``: encoder only), the default
    input size (shorter side), the normalisation and the class names of the dense model's labels."""

    backbone: torch.nn.Module
    dense: torch.nn.Module | None
    description: str
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] = field(default_factory=list)
    predictor: Predictor | None = None  # a dense checkpoint's: its test transform is the model input's

    def transform(self, size: int | None = None):
        """The model input of an image: a dense checkpoint's test transform (:class:`~clusterformer.Predictor`'s,
        ``size`` its shorter side), else the shorter side resized to ``size`` (default :attr:`size`), without the
        classification crop, so that the maps cover the whole image."""
        from ..data import transforms

        if self.predictor is not None and self.dense is not None:
            return self.predictor.transform if size is None else eval_transform(self.predictor.model, size)
        size = size or self.size
        return transforms.dense_eval(size, max(1333, int(size * 5 / 3)), self.mean, self.std)


def _normalisation(backbone) -> tuple[tuple, tuple]:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD))


def _check_backbone(backbone, what: str) -> None:
    if not hasattr(backbone, "forward_clusters"):
        raise ExplainError(f"{what}: {type(backbone).__name__} is not a ClusterFormer encoder (no cluster maps)")


def model_from_checkpoint(path: str | Path) -> ExplainModel:
    """The encoder (and dense model) of a task checkpoint of any task, read by :meth:`Predictor.from_checkpoint`."""
    return model_from_predictor(Predictor.from_checkpoint(path), f"checkpoint {path}")


def model_from_predictor(predictor: Predictor, source: str = "checkpoint") -> ExplainModel:
    """The encoder (and dense model) of a :class:`~clusterformer.Predictor`'s task model, shared with it (the same
    modules, on its device); ``source`` names where the model came from in error messages and the description."""
    from ..registry import TASKS

    model = predictor.model
    if not TASKS[model.task].dense:
        backbone, dense = model.module.model, None
        size = model.data.get("eval_resize") or model.data.get("img_size")
    else:
        backbone, dense = model.module.model.backbone, model.module.model
        size = model.data.get("test_shorter_side")
    _check_backbone(backbone, source)
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    size = size or cfg.get("input_size", (3, 224, 224))[-1]
    mean, std = _normalisation(backbone)
    return ExplainModel(backbone, dense, f"{model.task} {source}", int(size), mean, std, model.classes,
                        predictor)  # fmt: skip


def model_from_timm(name: str, weights: str | Path | None = None) -> ExplainModel:
    """A bare timm ClusterFormer (``clusterformer_{nano,tiny,small}``), random or with the weights of a
    safetensors file (``weights.load_timm_weights``: strict, with the file's own head, if any)."""
    import timm

    import clusterformer  # noqa: F401  (registers the models)

    if weights is not None:
        from ..weights import load_timm_weights

        backbone = load_timm_weights(name, weights)
    else:
        try:
            backbone = timm.create_model(name, num_classes=0)
        except RuntimeError as error:  # unknown model name
            raise ExplainError(f"{name}: {str(error).splitlines()[0]}") from None
    _check_backbone(backbone, name)
    mean, std = _normalisation(backbone)
    size = backbone.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    description = f"{name}" + (f" with {weights}" if weights else " (random weights)")
    return ExplainModel(backbone, None, description, int(size), mean, std)


def token_grid_to_image(
    labels: np.ndarray, stride: int, input_size: tuple[int, int], image_size: tuple[int, int]
) -> np.ndarray:
    """``labels (h, w)`` of tokens that each cover ``stride x stride`` pixels of the model input (the image,
    resized to ``input_size``, at the top-left of the padded input) -> ``(H, W)`` at the image's own size: every
    image pixel takes the token under its centre."""
    (ih, iw), (height, width) = input_size, image_size
    ys = np.clip(((np.arange(height) + 0.5) * ih / height // stride).astype(int), 0, labels.shape[0] - 1)
    xs = np.clip(((np.arange(width) + 0.5) * iw / width // stride).astype(int), 0, labels.shape[1] - 1)
    return labels[ys][:, xs]


def cluster_picture(image: np.ndarray, clusters: np.ndarray, num_clusters: int, alpha: float = 0.5) -> np.ndarray:
    """The image with one colour per cluster blended in and white lines between clusters."""
    colours = pictures.colour_map(clusters, pictures.distinct_colours(num_clusters))
    picture = pictures.blend(image, colours, alpha)
    picture[pictures.boundaries(clusters)] = pictures.WHITE
    return picture


def draw_clusters(
    image: np.ndarray,
    labels: np.ndarray,
    num_clusters: int,
    stride: int,
    input_size: tuple[int, int],
    alpha: float = 0.5,
) -> np.ndarray:
    """One head's hard assignment ``labels (h, w)`` (tokens of ``stride`` pixels of a model input of ``input_size``)
    drawn over ``image (H, W, 3)``, the image the model input was made from at any size: :func:`cluster_picture`
    of :func:`token_grid_to_image`."""
    clusters = token_grid_to_image(labels, stride, input_size, image.shape[:2])
    return cluster_picture(image, clusters, num_clusters, alpha)


@torch.no_grad()
def compute_assignments(model: ExplainModel, image: ImageInput, size: int | None = None, device="cpu") -> dict:
    """Run the model on ``image`` (a path, PIL image or uint8 array, as a :class:`~clusterformer.Predictor` takes
    it; shorter side resized to ``size``, default the model's: :meth:`ExplainModel.transform`) and return
    ``input_size`` and ``maps``: per encoder stage (then the decoder) ``name``, ``stride``, soft ``assignments``
    ``(heads, K, h, w)`` cropped to the tokens that cover the image, and for the decoder ``query_scores``
    ``(Q,)`` and ``query_labels`` ``(Q,)``, each query's best class."""
    from ..data.collate import pad_batch

    tensor = image_tensor(as_image(image), model.transform(size))
    input_size = tuple(tensor.shape[-2:])
    batch = (pad_batch([tensor]) if model.dense is not None else tensor[None]).to(device)
    backbone = model.backbone.to(device).eval()
    strides = [info["reduction"] for info in backbone.feature_info]
    maps = []
    for i, (stage, stride) in enumerate(zip(backbone.forward_clusters(batch), strides, strict=True)):
        if stage["assignments"] is None:
            raise ExplainError(f"{model.description}: stage {i + 1} does not update its centers (no assignments)")
        maps.append({"name": f"stage {i + 1}", "file": f"stage{i + 1}", "stride": stride,
                     "assignments": _crop(stage["assignments"][0], stride, input_size),
                     "centers": stage["centers"][0].float().cpu()})  # fmt: skip
    if model.dense is not None:
        maps.append(_decoder_assignments(model.dense.to(device).eval(), batch, maps, input_size))
    return {"input_size": input_size, "maps": maps}


def _crop(assignments: torch.Tensor, stride: int, input_size: tuple[int, int]) -> np.ndarray:
    """The tokens of ``(heads, K, h, w)`` that cover some of the (unpadded) input, as float32 numpy."""
    rows, cols = -(-input_size[0] // stride), -(-input_size[1] // stride)
    return assignments[..., :rows, :cols].float().cpu().numpy()


def _decoder_assignments(dense, batch: torch.Tensor, stages: list[dict], input_size) -> dict:
    """The last decoder layer's query-to-pixel assignment, through forward hooks on its clustering (output:
    centers and the last E-step's ``(B * heads, N, Q)``) and on the pixel decoder (output: the levels)."""
    from ..layers.clustering import assignment_maps

    decoder = dense.decoder
    captured = {}
    last = decoder.layers[-1]
    if hasattr(last, "clustering"):
        hook = last.clustering.register_forward_hook(lambda m, i, out: captured.update(centers=out[0], assign=out[1]))
    else:  # kMaX's layer (one head): the argmax of its affinity logits, its output queries as the centers
        hook = last.register_forward_hook(lambda m, i, out: captured.update(affinity=m.last_affinity, queries=out))
    hooks = [hook, decoder.pixel_decoder.register_forward_hook(lambda m, i, out: captured.update(levels=out[1]))]
    keep, decoder.keep_assignments = decoder.keep_assignments, True  # the layers compute their last assignment
    try:
        outputs = dense(batch)
    finally:
        decoder.keep_assignments = keep
        for hook in hooks:
            hook.remove()
    layer = len(decoder.layers) - 1
    if "affinity" in captured:
        affinity = captured["affinity"]  # (B, Q, N)
        captured["assign"] = F.one_hot(affinity.argmax(1), affinity.shape[1]).to(affinity.dtype)  # (B, N, Q)
        captured["centers"] = captured["queries"].transpose(1, 2)  # (B, D, Q)
    level = captured["levels"][decoder.level_order[layer]]
    h, w = level.shape[-2:]
    # the pixel decoder's levels have the sizes of the encoder stages at strides 32, 16, 8
    padded = batch.shape[-2:]
    stride = next(s["stride"] for s in stages if (-(-padded[0] // s["stride"]), -(-padded[1] // s["stride"])) == (h, w))
    assignments = assignment_maps(captured["assign"], batch.shape[0], (h, w))[0]  # (heads, Q, h, w)
    heads = assignments.shape[0]
    centers = captured["centers"].reshape(batch.shape[0], heads, *captured["centers"].shape[1:])[0]  # (heads, d, Q)
    scores, labels = outputs["logits"][0].float().sigmoid().max(-1)
    return {"name": f"decoder layer {layer + 1}", "file": "decoder", "stride": stride,
            "assignments": _crop(assignments, stride, input_size), "centers": centers.transpose(1, 2).float().cpu(),
            "query_scores": scores.cpu().numpy(),
            "query_labels": labels.cpu().numpy()}  # fmt: skip


def explain_image(
    model: ExplainModel,
    image_path: str | Path,
    out: str | Path,
    size: int | None = None,
    head: int = 0,
    all_heads: bool = False,
    alpha: float = 0.5,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Write the cluster pictures of ``image_path`` to ``out`` and return what ``clusters.json`` holds. A
    non-empty ``out`` is an :class:`~clusterformer.outputs.OutputExistsError` unless ``overwrite``, which deletes
    the previous pictures and JSON (:data:`OUTPUTS`) once the image has been read and the model has run.
    ``progress``: a progress bar over the pictures on standard error when it is a terminal."""
    from ..progress import terminal_bar  # imports Lightning: not at module level

    out = check_output_folder(out, overwrite)
    image = as_image(image_path)  # as the predictor reads it: a missing or unreadable file names itself
    result = compute_assignments(model, image, size, device)
    heads = min(m["assignments"].shape[0] for m in result["maps"])
    if not 0 <= head < heads:
        raise ExplainError(f"--head {head}: the model has heads 0..{heads - 1} (in every stage)")
    remove_outputs(out, OUTPUTS)  # only with overwrite can the folder hold anything
    out.mkdir(parents=True, exist_ok=True)
    pixels = np.asarray(image)
    image_size = (image.height, image.width)
    report = {"image": str(image_path), "model": model.description, "image_size": list(image_size),
              "input_size": list(result["input_size"]), "head": head, "maps": []}  # fmt: skip
    panels = []
    pictures_made = sum(1 + (m["assignments"].shape[0] if all_heads else 0) for m in result["maps"]) + 1
    bar = terminal_bar(pictures_made, "explain", unit="picture", enabled=progress)
    for entry in result["maps"]:
        soft = entry["assignments"]  # (heads, K, h, w)
        hard = soft.argmax(1)  # (heads, h, w)
        k = soft.shape[1]
        picture = draw_clusters(pixels, hard[head], k, entry["stride"], result["input_size"], alpha)
        save_png(picture, out / f"{entry['file']}.png")
        bar.update()
        if all_heads:
            for h in range(soft.shape[0]):
                head_picture = draw_clusters(pixels, hard[h], k, entry["stride"], result["input_size"], alpha)
                save_png(head_picture, out / f"{entry['file']}_head{h}.png")
                bar.update()
        sizes = np.bincount(hard[head].ravel(), minlength=k)
        record = {
            "name": entry["name"], "file": f"{entry['file']}.png", "stride": entry["stride"],
            "grid": list(hard.shape[1:]), "heads": soft.shape[0], "clusters": k,
            "used": int((sizes > 0).sum()), "used_per_head": [int(len(np.unique(h))) for h in hard],
            "mean_max_assignment": float(soft[head].max(0).mean()),
            "sizes": sizes.tolist(), "soft_sizes": np.round(soft[head].sum((1, 2)), 4).tolist(),
            "statistics": cluster_statistics(torch.from_numpy(soft), entry["centers"]),
        }  # fmt: skip
        if "query_labels" in entry:
            record["queries"] = [
                {"query": int(q), "tokens": int(sizes[q]), "class": _class_name(model, int(entry["query_labels"][q])),
                 "score": round(float(entry["query_scores"][q]), 4)}
                for q in np.flatnonzero(sizes)
            ]  # fmt: skip
        report["maps"].append(record)
        panels.append((f"{entry['name']}: {record['grid'][0]}x{record['grid'][1]} tokens, {record['used']}/{k} used",
                       picture))  # fmt: skip
    save_summary([("image", pixels), *panels], out / "summary.png", f"{Path(image_path).name}, head {head}")
    bar.update()
    bar.close()
    write_json(out / "clusters.json", report)
    return report


def _class_name(model: ExplainModel, label: int) -> str:
    return model.classes[label] if label < len(model.classes) else f"class {label}"


def save_summary(panels: list[tuple[str, np.ndarray]], path: Path, title: str) -> None:
    """The pictures side by side (three per row) with their titles, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    height, width = panels[0][1].shape[:2]
    cell = 4.0
    fig, axes = plt.subplots(rows, columns, figsize=(columns * cell, rows * cell * height / width + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, picture) in zip(axes.flat, panels, strict=False):
        ax.imshow(picture)
        ax.set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=100, format="png")
    plt.close(fig)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "explain",
        help="draw the cluster assignment of every encoder stage (and the decoder's) over an image (paper Fig. 3)",
        description="Draw each encoder stage's hard cluster assignment (argmax over the K clusters of the last "
        "block's soft assignment; one colour per cluster, white lines between clusters) over IMAGE, and for "
        "detection / segmentation checkpoints the last decoder layer's assignment of pixels to queries. Writes "
        "OUT/stage<i>.png (the image's size), OUT/decoder.png, OUT/summary.png and OUT/clusters.json (cluster "
        "sizes), and prints per map the clusters used, the mean largest assignment and the mean center cosine. "
        "The model: a task checkpoint (--ckpt) or a timm ClusterFormer (--model, random or --weights).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="Lightning checkpoint of any ClusterFormer task")
    source.add_argument("--model", help="timm model name, e.g. clusterformer_tiny")
    parser.add_argument("--weights", help="with --model: local weights (.safetensors or a state dict)")
    parser.add_argument("image", metavar="IMAGE", help="image file (any size or mode)")
    parser.add_argument("--out", required=True, help="output folder (empty or new, unless --overwrite)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out: the pictures and JSON of the previous run there are deleted first",
    )
    parser.add_argument("--size", type=int, help="shorter side of the model input (default: the model's test size)")
    parser.add_argument("--head", type=int, default=0, help="clustering head drawn (default 0, the first)")
    parser.add_argument("--all-heads", action="store_true", help="also write <map>_head<h>.png for every head")
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the cluster colours (default 0.5)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        if args.weights and not args.model:
            raise ExplainError("--weights goes with --model (a checkpoint carries its own weights)")
        if not Path(args.image).is_file():
            raise ExplainError(f"{args.image}: image file not found")
        check_output_folder(args.out, args.overwrite)  # before the model is built
        model = model_from_checkpoint(args.ckpt) if args.ckpt else model_from_timm(args.model, args.weights)
        report = explain_image(model, args.image, args.out, args.size, args.head, args.all_heads, args.alpha,
                               args.device, overwrite=args.overwrite, progress=True)  # fmt: skip
    except (ValueError, OSError) as error:  # bad input: one line, no traceback
        print(f"clusterformer explain: error: {error}", file=sys.stderr)
        return 2
    print(f"{'map':<16} {'tokens':>7} {'clusters used':>13} {'max assignment':>14} {'center cosine':>13}  picture")
    for record in report["maps"]:
        stats = record["statistics"]
        print(f"{record['name']:<16} {record['grid'][0]:>3}x{record['grid'][1]:<3} "
              f"{stats['clusters_used']:>6.1f} / {record['clusters']:<4} {stats['mean_max_assignment']:>14.3f} "
              f"{stats['center_cosine']:>13.3f}  {Path(args.out) / record['file']}")  # fmt: skip
    print("(averages over the heads; uniform assignment = 1/K; cosine 1 = identical centers)")
    print(f"wrote {Path(args.out) / 'summary.png'} and {Path(args.out) / 'clusters.json'}")
    return 0
