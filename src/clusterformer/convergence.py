"""Learning speed of ClusterFormer's dense heads against DETR and Mask2Former on the same encoder and data.

``clusterformer benchmark --task convergence`` trains, for each of three pairings, ClusterFormer's head and its
peer from the ``transformers`` package side by side and scores both every ``eval_every`` optimizer steps:

* detection: ClusterFormer's detection task (``configs/detection/clusterformer_nano_shapes.yaml``, the demo's
  recipe) against ``DetrForObjectDetection``; box AP50;
* instance: ClusterFormer's instance task (the demo's recipe) against ``Mask2FormerForUniversalSegmentation``;
  mask AP50;
* panoptic: ClusterFormer's panoptic task against ``Mask2FormerForUniversalSegmentation``; PQ, PQ_th, PQ_st.

What is the same within a pairing, so that the curves differ by the head alone:

* the encoder: ``clusterformer_nano``, built by ``transformers`` through timm for the peers
  (``TimmBackboneConfig(backbone="clusterformer_nano", features_only=True, ...)``), initialised with the same
  weights as ClusterFormer's encoder (random from the seed, or a classifier's with ``encoder=CKPT``: the demo's
  dense stages start from its classification stage). timm's feature net drops the encoder's final norm; it is
  put back (:func:`_keep_final_norm`), so that the peer reads exactly the features ClusterFormer's head reads
  (``ClusterFormer.forward_dense``: the stride-32 stage normalised);
* the batches: one data loader (the task's dataset, training transforms, batch size and seed) feeds every
  batch to both models in turn (lockstep), so both see the same images, crops and flips in the same order
  (``batches`` in the report records their dataset indices);
* the optimisation: AdamW over the same four groups (encoder or not, decayed or not; the encoder at
  ``lr * backbone_lr_mult``) with the task's lr, weight decay and per-step schedule (linear warm-up, x0.1 at
  the milestones), gradient norms clipped at 1.0 (the demo's ``gradient_clip_val``);
* the evaluation: the same validation loader and the project's metric code. The peers' softmax class
  probabilities (no-object column dropped) are turned into logits, ``logit(p)``, so that the project's
  post-processing (``heads.postprocess``: its top-k, its mask scores, its panoptic merging with the task's
  thresholds), whose ``sigmoid`` gives ``p`` back, scores the peers' predictions exactly as it scores
  ClusterFormer's; then ``metrics.coco.CocoEvaluator`` (box / mask AP) and ``metrics.panoptic_eval``
  (PQ).

The peers' sizes follow ClusterFormer's dense heads in the nano shapes configs (width 64, 3 decoder layers,
4 heads, FFN 256, the same number of queries: 100 for detection, 20 for instance and panoptic); each peer is
trained with its own loss (``transformers`` computes it when the labels are passed: DETR's Hungarian loss with
auxiliary losses, Mask2Former's point-sampled mask loss with 1024 points, as the project's).

Time: the steps per run (:data:`PRESETS`) come from step times measured on the 2-core development machine (Intel
Xeon; CPU seconds of one torch thread, since other jobs shared the machine; batch 8 of 96-pixel scenes, the quick
data): a training step takes 0.26 s (ClusterFormer detection), 0.23 s (DETR), 0.26 s (ClusterFormer instance),
0.37 s (Mask2Former instance), 0.33 s (ClusterFormer panoptic) and 0.38 s (Mask2Former panoptic); scoring the
80 validation scenes takes 1.1 s per detection model, 2.4-2.8 s per instance model and 0.9-1.2 s per panoptic
model. The quick run (3 pairings x 100 steps, evaluated at 50 and 100) then needs about 3 minutes of training and
evaluation plus the data (400 + 80 scenes, about 7 s), under 5 minutes; the full run (3 x 400 steps, evaluated
every 100 on 200 scenes) about 13.5 minutes plus the data (1000 + 200 scenes), under 20 minutes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

PAIRINGS = ("detection", "instance", "panoptic")
# the data (the demo's: ``commands.demo.PRESETS``), steps and evaluation period of a run
PRESETS = {
    "quick": dict(num_train=400, num_val=80, size=96, steps=100, eval_every=50),
    "full": dict(num_train=1000, num_val=200, size=96, steps=400, eval_every=100),
}
BENCH_EXTRA = "pip install clusterformer[bench]"
# the metrics of each pairing (the first one is the curve's), as the project's evaluators name them
METRICS = {
    "detection": {"box AP50": ("bbox", "AP50")},
    "instance": {"mask AP50": ("segm", "AP50"), "box AP50": ("bbox", "AP50")},
    "panoptic": {"PQ": "PQ", "PQ_th": "PQ_th", "PQ_st": "PQ_st"},
}
PEER_NAMES = {"detection": "detr", "instance": "mask2former", "panoptic": "mask2former"}
CLIP = 1.0  # gradient-norm clipping of both models (the demo's gradient_clip_val)
ENCODER = "clusterformer_nano"


# --- the peers -------------------------------------------------------------------------------------------------------
def import_transformers():
    """The ``transformers`` package, or an ``ImportError`` saying how to install it."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"the DETR and Mask2Former peers need the transformers package: {BENCH_EXTRA}") from error
    return transformers


def _timm_backbone_config(transformers, out_indices: list[int]):
    """``transformers``' timm backbone of ``clusterformer_nano`` (random weights; the stages ``out_indices``)."""
    import clusterformer  # noqa: F401  (registers clusterformer_nano with timm)

    return transformers.TimmBackboneConfig(
        backbone=ENCODER, features_only=True, out_indices=out_indices, num_channels=3
    )


def peer_config(kind: str, decoder: dict, num_classes: int):
    """The ``transformers`` config of the peer of the pairing ``kind``, sized as ClusterFormer's decoder settings
    ``decoder`` (``dim``, ``num_layers``, ``num_heads``, ``ffn_dim``, ``num_queries``).

    DETR: a transformer encoder and decoder of ``num_layers`` layers each on the stride-32 stage, width ``dim``,
    dropout 0 (as ClusterFormer's decoder), auxiliary losses on. Mask2Former: the deformable pixel decoder
    (``num_layers`` layers) on the four stages, ``num_layers`` masked-attention decoder layers
    (``decoder_layers`` counts one more, the prediction from the initial queries), 1024 points in the mask loss
    (the shapes configs' ``num_points``)."""
    transformers = import_transformers()
    sizes = dict(num_queries=decoder["num_queries"], num_labels=num_classes, use_pretrained_backbone=False)
    if kind == "detection":
        return transformers.DetrConfig(
            backbone_config=_timm_backbone_config(transformers, [3]), d_model=decoder["dim"],
            encoder_layers=decoder["num_layers"], decoder_layers=decoder["num_layers"],
            encoder_attention_heads=decoder["num_heads"], decoder_attention_heads=decoder["num_heads"],
            encoder_ffn_dim=decoder["ffn_dim"], decoder_ffn_dim=decoder["ffn_dim"], dropout=0.0, auxiliary_loss=True,
            **sizes,
        )  # fmt: skip
    return transformers.Mask2FormerConfig(
        backbone_config=_timm_backbone_config(transformers, [0, 1, 2, 3]), hidden_dim=decoder["dim"],
        feature_size=decoder["dim"], mask_feature_size=decoder["dim"], encoder_layers=decoder["num_layers"],
        encoder_feedforward_dim=decoder["ffn_dim"], decoder_layers=decoder["num_layers"] + 1,
        num_attention_heads=decoder["num_heads"], dim_feedforward=decoder["ffn_dim"], train_num_points=1024,
        **sizes,
    )  # fmt: skip


def _keep_final_norm(getter: nn.Module) -> None:
    """Put back the encoder's final norm that timm's ``features_only`` net (``FeatureGetterNet``) prunes, and
    apply it (``norm=True``: to the last stage, as ``ClusterFormer.forward_intermediates`` does)."""
    encoder = getter.model
    encoder.norm = encoder._norm_layer(encoder.embed_dims[-1])
    getter.norm = True


class PeerModel(nn.Module):
    """A ``transformers`` DETR or Mask2Former on ``clusterformer_nano``, behind the project's conventions:
    ``loss(images, targets)`` from the project's collated targets, and ``forward(images, targets)`` returning
    ``{"logits", "boxes"}`` or ``{"logits", "masks"}`` as ClusterFormer's set models do (class logits whose
    sigmoid is the peer's class probability; boxes normalised ``cxcywh``; mask logits at stride 4)."""

    def __init__(self, kind: str, config):
        super().__init__()
        transformers = import_transformers()
        self.kind = kind
        if kind == "detection":
            self.net = transformers.DetrForObjectDetection(config)
        else:
            self.net = transformers.Mask2FormerForUniversalSegmentation(config)
        _keep_final_norm(self.features)

    @property
    def features(self) -> nn.Module:
        """timm's feature net of the encoder, as ``transformers`` built it (``FeatureGetterNet``)."""
        if self.kind == "detection":
            return self.net.model.backbone.model  # DetrConvEncoder unwraps TimmBackbone's timm model
        return self.net.model.pixel_level_module.encoder._backbone  # TimmBackbone's timm model

    @property
    def backbone(self) -> nn.Module:
        """The encoder (``clusterformer.backbone.ClusterFormer``) inside the peer."""
        return self.features.model

    @staticmethod
    def pixel_mask(images: torch.Tensor, targets: list[dict]) -> torch.Tensor | None:
        """1 inside each image of the padded batch, 0 in the padding; ``None`` (no padding known: the panoptic
        training targets do not carry the image sizes; Mask2Former does not read the mask) without sizes."""
        if not all("size" in t for t in targets):
            return None
        mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.long, device=images.device)
        for row, target in zip(mask, targets, strict=True):
            h, w = target["size"]
            row[:h, :w] = 1
        return mask

    def loss(self, images: torch.Tensor, targets: list[dict]) -> torch.Tensor:
        """The peer's own training loss (``transformers`` computes it from the labels)."""
        mask = self.pixel_mask(images, targets)
        if self.kind == "detection":
            labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
            return self.net(pixel_values=images, pixel_mask=mask, labels=labels).loss
        keep = [~t["iscrowd"].bool() if "iscrowd" in t else slice(None) for t in targets]  # crowds: not learnt
        masks = [t["masks"][k].float() for t, k in zip(targets, keep, strict=True)]
        labels = [t["labels"][k] for t, k in zip(targets, keep, strict=True)]
        return self.net(pixel_values=images, pixel_mask=mask, mask_labels=masks, class_labels=labels).loss

    def forward(self, images: torch.Tensor, targets: list[dict]) -> dict:
        out = self.net(pixel_values=images, pixel_mask=self.pixel_mask(images, targets))
        logits = out.logits if self.kind == "detection" else out.class_queries_logits
        probs = logits.float().softmax(-1)[..., :-1]  # the last column: no object
        result = {"logits": torch.logit(probs, eps=1e-6)}
        if self.kind == "detection":
            result["boxes"] = out.pred_boxes
        else:
            result["masks"] = out.masks_queries_logits
        return result


def build_peer(kind: str, task, seed: int) -> PeerModel:
    """The peer of ``task`` (ClusterFormer's detection, instance or panoptic task), its heads initialised from
    ``seed``, its encoder holding the weights of ``task``'s encoder."""
    torch.manual_seed(seed)
    peer = PeerModel(kind, peer_config(kind, task.hparams.decoder, task.hparams.num_classes))
    peer.backbone.load_state_dict(task.model.backbone.state_dict())
    return peer


# --- the contenders --------------------------------------------------------------------------------------------------
def peer_param_groups(model: PeerModel, lr: float, backbone_lr_mult: float, weight_decay: float) -> list[dict]:
    """``DenseTask.param_groups``'s four groups over a peer: encoder or not, decayed or not (no decay on norms,
    biases and the encoder's ``no_weight_decay()``)."""
    encoder = {id(p): f"backbone.{n}" for n, p in model.backbone.named_parameters()}
    no_decay = {f"backbone.{n}" for n in model.backbone.no_weight_decay()}
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_backbone = id(param) in encoder
        decay = not (param.ndim <= 1 or name.endswith(".bias") or encoder.get(id(param)) in no_decay)
        if (is_backbone, decay) not in groups:
            group_lr = lr * (backbone_lr_mult if is_backbone else 1.0)
            groups[is_backbone, decay] = {"params": [], "lr": group_lr, "weight_decay": weight_decay if decay else 0.0}
        groups[is_backbone, decay]["params"].append(param)
    return list(groups.values())


@dataclass
class Contender:
    """One model of a pairing: how it trains on a batch and predicts, its optimizer and what it recorded."""

    name: str
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, list[dict]], torch.Tensor]
    predict_fn: Callable[[torch.Tensor, list[dict]], list]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    description: str
    record: dict = field(default_factory=dict)

    def train_step(self, images: torch.Tensor, targets: list[dict]) -> float:
        self.model.train()
        loss = self.loss_fn(images, targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.name}: training loss {loss.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], CLIP)
        self.optimizer.step()
        self.schedule.step()
        return loss.item()


def _optimizer(groups: list[dict], lr: float, schedule: Callable[[int], float]):
    optimizer = torch.optim.AdamW(groups, lr=lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step))


def _params_m(model: nn.Module) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 3)


def build_pairing(
    kind: str, data_root: Path, size: int, steps: int, seed: int, batch_size: int | None = None,
    encoder: str | Path | None = None, num_workers: int = 0,
):  # fmt: skip
    """The data module and the two contenders (ClusterFormer, then its peer) of the pairing ``kind``: the demo's
    stage (``recipes.build_stage`` with the demo's overrides) and the peer on the same encoder weights."""
    from .recipes import DEMO_MODEL_OVERRIDES, build_stage, classifier_encoder, load_encoder

    torch.manual_seed(seed)
    data_overrides = {"root": str(data_root), "crop": size, "test_shorter_side": size, "num_workers": num_workers}
    if batch_size:
        data_overrides["batch_size"] = batch_size
    task, data = build_stage(kind, data_overrides, DEMO_MODEL_OVERRIDES[kind])
    if encoder is not None:
        load_encoder(task, classifier_encoder(Path(encoder)))
    task.metrics = task.build_metrics(data)
    peer = build_peer(kind, task, seed)
    h = task.hparams
    schedule = task.lr_schedule(steps)

    def peer_predict(images, targets):
        return _project_postprocess(kind, task, data, peer(images, targets), targets)

    decoder = ", ".join(f"{k} {h.decoder[k]}" for k in ("num_queries", "dim", "num_layers", "num_heads", "ffn_dim"))
    ours_groups = task.param_groups()
    peer_groups = peer_param_groups(peer, h.lr, h.backbone_lr_mult, h.weight_decay)
    ours_text = f"clusterformer.tasks.{type(task).__name__} ({decoder}; {_params_m(task.model)} M parameters)"
    peer_text = f"transformers.{type(peer.net).__name__} ({_params_m(peer)} M parameters)"
    contenders = [
        Contender("clusterformer", task, lambda images, targets: task.training_loss(images, targets)[0],
                  task.predict_batch, *_optimizer(ours_groups, h.lr, schedule),
                  ours_text),
        Contender(PEER_NAMES[kind], peer, peer.loss, peer_predict, *_optimizer(peer_groups, h.lr, schedule),
                  peer_text),
    ]  # fmt: skip
    return data, contenders


def _project_postprocess(kind: str, task, data, outputs: dict, targets: list[dict]) -> list:
    """The peer's ``outputs`` (project layout) post-processed as ``task.predict_batch`` does ClusterFormer's."""
    from .heads import detection_postprocess, instance_postprocess, panoptic_postprocess

    h = task.hparams
    output_sizes = [t["orig_size"] for t in targets]
    input_sizes = [t["size"] for t in targets]
    if kind == "detection":
        return detection_postprocess(outputs["logits"], outputs["boxes"], output_sizes, h.top_k)
    if kind == "instance":
        return instance_postprocess(outputs["logits"], outputs["masks"], input_sizes, output_sizes, h.top_k)
    return panoptic_postprocess(
        outputs["logits"], outputs["masks"], input_sizes, output_sizes, set(range(h.num_things)),
        score_threshold=h.score_threshold, overlap_threshold=h.overlap_threshold, mask_threshold=h.mask_threshold,
        category_ids=[c["id"] for c in data.categories],
    )  # fmt: skip


@torch.no_grad()
def evaluate(kind: str, task, data, contender: Contender) -> dict[str, float]:
    """Score ``contender`` on the validation set with the metric code of ClusterFormer's task ``task``."""
    metrics = task.build_metrics(data)
    contender.model.eval()
    for images, targets in data.val_dataloader():
        for target, result in zip(targets, contender.predict_fn(images, targets), strict=True):
            if kind == "panoptic":
                metrics.update(target, result)
            else:
                metrics.update(target["image_id"], bbox=result, segm=result if "masks" in result else None)
    values = metrics.compute()
    scored = {}
    for name, key in METRICS[kind].items():
        if kind == "panoptic":
            scored[name] = float(values[key]) if values else 0.0
        else:
            scored[name] = float(values[key[0]][key[1]])
    return scored


class _Indexed(torch.utils.data.Dataset):
    """A dataset whose samples come with their index (recorded as the batches each model saw)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index], index


class _IndexedCollate:
    """The task's collate function over the samples, and the list of their indices."""

    def __init__(self, collate: Callable):
        self.collate = collate

    def __call__(self, items: list):
        return self.collate([sample for sample, _ in items]), [index for _, index in items]


def _batches(data, seed: int) -> Iterator:
    """``((images, targets), indices)`` of the training batches, epoch after epoch: the task's training dataset,
    transforms and collate, shuffled by a generator of its own (``seed``), so that the order does not depend on
    what the models draw."""
    from torch.utils.data import DataLoader

    h = data.hparams
    dataset = _Indexed(data._dataset(train=True))
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset, batch_size=h.batch_size, shuffle=True, drop_last=len(dataset) > h.batch_size,
        num_workers=h.num_workers, collate_fn=_IndexedCollate(data._collate(True)), generator=generator,
        persistent_workers=h.num_workers > 0,
    )  # fmt: skip
    while True:
        yield from loader


def eval_steps(steps: int, eval_every: int) -> list[int]:
    """The steps after which both models are evaluated: every ``eval_every`` steps and the last one."""
    return sorted({*range(eval_every, steps + 1, eval_every), steps})


def run_pairing(
    kind: str, data_root: Path, size: int, steps: int, eval_every: int, seed: int, batch_size: int | None = None,
    encoder: str | Path | None = None, num_workers: int = 0, log: Callable[[str], None] | None = None,
    progress: bool = False, built: tuple | None = None,
) -> dict:  # fmt: skip
    """Train ClusterFormer and its peer in lockstep on the same batches for ``steps`` optimizer steps, both scored
    after every step of :func:`eval_steps`; returns the pairing's record (see :func:`run_convergence`).
    ``built``: what :func:`build_pairing` returned for these options (default: built here)."""
    from tqdm import tqdm

    log = log or (lambda line: print(line, flush=True))  # flushed: the lines are the progress in a log file
    if built is None:
        built = build_pairing(kind, data_root, size, steps, seed, batch_size, encoder, num_workers)
    data, contenders = built
    task = contenders[0].model
    evaluated = eval_steps(steps, eval_every)
    for c in contenders:
        c.record = {"model": c.description, "params_m": _params_m(c.model), "steps": [], "loss": [],
                    "batches": [], "metrics": {name: [] for name in METRICS[kind]}, "train_seconds": 0.0,
                    "eval_seconds": 0.0, "step_seconds": []}  # fmt: skip
    first = next(iter(METRICS[kind]))
    batches = _batches(data, seed)
    bar = tqdm(total=steps, desc=kind, disable=not progress, leave=False)
    for step in range(1, steps + 1):
        (images, targets), indices = next(batches)
        for c in contenders:
            began = time.perf_counter()
            c.record["loss"].append(c.train_step(images, targets))
            took = time.perf_counter() - began
            c.record["step_seconds"].append(round(took, 4))
            c.record["train_seconds"] += took
            c.record["batches"].append(indices)
        bar.update(1)
        if step in evaluated:
            for c in contenders:
                began = time.perf_counter()
                values = evaluate(kind, task, data, c)
                c.record["eval_seconds"] += time.perf_counter() - began
                c.record["steps"].append(step)
                for name, value in values.items():
                    c.record["metrics"][name].append(value)
                shown = " ".join(f"{name} {values[name]:.3f}" for name in METRICS[kind])
                (tqdm.write if progress else log)(f"{kind} {c.name} step {step}/{steps} {shown}")
    bar.close()
    for c in contenders:
        c.record["train_seconds"] = round(c.record["train_seconds"], 2)
        c.record["eval_seconds"] = round(c.record["eval_seconds"], 2)
    return {"metric": first, "models": {c.name: c.record for c in contenders}}


def run_convergence(
    out: str | Path = "runs/convergence", quick: bool = False, seed: int = 0, steps: int | None = None,
    eval_every: int | None = None, data: str | Path | None = None, encoder: str | Path | None = None,
    pairings=PAIRINGS, batch_size: int | None = None, num_workers: int = 0, progress: bool | None = None,
    data_sizes: dict | None = None, machine: str | None = None,
) -> dict:  # fmt: skip
    """Run the pairings (:data:`PAIRINGS`) and write ``OUT/convergence.json`` and ``OUT/convergence_<task>.png``.

    ``data``: a generated shapes folder to reuse; otherwise one is generated into ``OUT/data`` with the sizes of
    the preset (``quick`` or full, :data:`PRESETS`; ``data_sizes`` overrides ``num_train``,
    ``num_val``, ``size``). ``steps`` and ``eval_every`` override the preset's. ``encoder``: a classification checkpoint
    whose encoder starts every model (default: random weights from ``seed``). ``machine``: its description in
    the report (``clusterformer benchmark`` gives the CPU's name). Returns the report written to
    ``convergence.json``: per pairing, per model, the evaluation steps, the metrics there, the loss and the training
    samples (dataset indices) of every step, the seconds spent training and evaluating."""
    from .data import make_shapes
    from .data.shapes import MANIFEST
    from .outputs import write_json

    preset = {**PRESETS["quick" if quick else "full"], **(data_sizes or {})}
    steps = steps or preset["steps"]
    eval_every = eval_every or preset["eval_every"]
    progress = sys.stderr.isatty() if progress is None else progress
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if data is None:
        data = out / "data"
        print(f"generating the shapes dataset in {data}", flush=True)
        make_shapes(data, seed, preset["num_train"], preset["num_val"], preset["size"], progress=False)
        size = preset["size"]
    else:
        data = Path(data)
        size = json.loads((data / MANIFEST).read_text())["options"]["size"]
    threads = torch.get_num_threads()
    report = {
        "machine": machine or f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "seed": seed,
        "steps": steps,
        "eval_every": eval_every,
        "data": str(data),
        "image_size": size,
        "encoder": str(encoder) if encoder else f"random ({ENCODER}, seed {seed})",
        "torch_threads": threads,
        "pairings": {},
    }
    for kind in pairings:
        began = time.perf_counter()
        result = run_pairing(kind, data, size, steps, eval_every, seed, batch_size, encoder, num_workers,
                             progress=progress)  # fmt: skip
        result["seconds"] = round(time.perf_counter() - began, 1)
        report["pairings"][kind] = result
        plot_pairing(kind, result, out / f"convergence_{kind}.png")
        report["seconds"] = round(time.perf_counter() - started, 1)
        write_json(out / "convergence.json", report, indent=2)
    print(table(report), flush=True)
    print(f"wrote {out / 'convergence.json'} and the curves {out}/convergence_<task>.png", flush=True)
    return report


def table(report: dict) -> str:
    """Markdown table: one row per pairing, model and metric, one column per evaluation step."""
    lines = []
    for kind, result in report["pairings"].items():
        models = result["models"]
        steps = next(iter(models.values()))["steps"]
        lines += [
            "",
            f"{kind} (training s per step: "
            + ", ".join(f"{name} {statistics_median(m['step_seconds']):.3f}" for name, m in models.items())
            + ")",
            "",
            "| model | metric | " + " | ".join(f"step {s}" for s in steps) + " |",
            "| --- | --- |" + " --- |" * len(steps),
        ]
        for name, record in models.items():
            for metric, values in record["metrics"].items():
                lines.append(f"| {name} | {metric} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines).lstrip("\n")


def statistics_median(values: list[float]) -> float:
    import statistics

    return statistics.median(values) if values else math.nan


def plot_pairing(kind: str, result: dict, path: Path) -> None:
    """The validation metrics of both models against the optimizer step: the main metric solid, the others
    dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    colours = {"clusterformer": "tab:blue", "detr": "tab:orange", "mask2former": "tab:green"}
    for name, record in result["models"].items():
        for i, (metric, values) in enumerate(record["metrics"].items()):
            ax.plot(record["steps"], values, "o-" if i == 0 else "--", color=colours.get(name),
                    alpha=1 if i == 0 else 0.6, label=f"{name} {metric}", markersize=3)  # fmt: skip
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation")
    ax.set_ylim(0, 1)
    ax.set_title(f"{kind}: same encoder (clusterformer_nano), data, batches and schedule", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
