"""The ablations of paper Table 6 (§4.2): train every variant of one table on a dataset and write the table.

Each table is data: a list of ``(row label as printed in the paper, overrides)``. The overrides of tables
6a-6e are ClusterFormer constructor options (``docs/architecture.md``, "Variants") and go into the
classifier's ``model_kwargs``; those of 6f are decoder options and go into ``SetTask``'s ``decoder``. The
supplement's Table S1 repeats the six parts on panoptic segmentation: the rows of S1a-S1f are those of 6a-6f,
with encoder options going into ``PanopticTask``'s ``backbone_kwargs`` and decoder options (the ``"decoder"`` entry
of a row) into its ``decoder``. A row whose overrides are ``None`` is a method of the paper that this
implementation does not have; it is listed in the output as not reproduced, never trained as a stand-in.

``run_ablation`` reads the same LightningCLI config that ``clusterformer fit`` takes, builds the task, the
data and the trainer of every row from it (same seed for every row), trains, validates and writes
``table_<id>.md`` (the paper's layout) and ``table_<id>.json``. Each row logs and checkpoints into its own
sub-folder of the output folder.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from argparse import ArgumentError
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import yaml
from jsonargparse import Namespace
from torch.overrides import TorchFunctionMode

from ..registry import TASKS

# --- the tables ---------------------------------------------------------------------------------------

Rows = list[tuple[str, dict | None]]

TABLES: dict[str, Rows] = {
    # (a) Key Component Analysis. The paper's counts (21.73M < 23.46M < 26.27M < 27.85M) and 6e's "None"
    # row (26.27M, as "+ Recurrent ...") say that "+ X" means X alone on top of the BASELINE.
    "6a": [
        ("BASELINE", {"baseline": True}),
        (
            "+ Recurrent Cross-Attention Clustering",
            {"baseline": False, "center_update": "recurrent", "dispatch": "none"},
        ),
        ("+ Feature Dispatching", {"baseline": False, "center_update": "none", "dispatch": "ours"}),
        ("ClusterFormer (both)", {"baseline": False, "center_update": "recurrent", "dispatch": "ours"}),
    ],
    # (b) the number of E/M iterations T
    "6b": [(str(t), {"iterations": t}) for t in (1, 2, 3, 4)],
    # (c) Recurrent Cross-Attention Clustering: the center update. Each comparator is the cited method
    # (layers/comparators.py); "Cosine Similarity" is Context Cluster's clustering with its own dispatch.
    "6c": [
        ("Cosine Similarity", {"center_update": "cosine", "dispatch": "fc_similarity"}),
        ("Vanilla Cross-Attention [81]", {"center_update": "vanilla"}),
        ("Criss Cross-Attention [35]", {"center_update": "criss_cross"}),
        ("K-Means [95]", {"center_update": "kmeans"}),
        ("Recurrent Cross-Attention", {"center_update": "recurrent"}),
    ],
    # (d) head dimension (the number of heads fixed, so the width of the clustering grows; no sizing rule gives
    # the paper's counts: docs/architecture.md, "Table 6d")
    "6d": [(str(d), {"head_dim": d}) for d in (16, 24, 32, 40, 48)],
    # (e) Feature Dispatching
    "6e": [
        ("None", {"dispatch": "none"}),
        ("Vanilla FC Layer", {"dispatch": "fc"}),
        ("Confidence-Based [68]", {"dispatch": "confidence"}),
        ("FC w/ Similarity [58]", {"dispatch": "fc_similarity"}),
        ("Ours (Eq. 6)", {"dispatch": "ours"}),
    ],
    # (f) Decoder Query Initialization for instance segmentation
    "6f": [
        ("Free Parameters", {"query_init": "free"}),
        ("Direct Feature Embedding [17]", None),
        ("Mixed Query Selection [44]", None),
        ("Scene-Adoptive Embedding [47]", None),
        ("Centers from Encoder (Ours)", {"query_init": "encoder"}),
    ],
}

# Supplement Table S1: the same six parts on COCO panoptic segmentation. Encoder options as in 6a-6e, decoder
# options under "decoder". The BASELINE encoder has no clustering, so no centers to start the decoder's queries
# from: its row learns free queries. T counts the E/M iterations of the encoder's and the decoder's clustering.
TABLES |= {
    "s1a": [
        ("BASELINE", {"baseline": True, "decoder": {"query_init": "free"}}),
        *((label, dict(overrides)) for label, overrides in TABLES["6a"][1:]),
    ],
    "s1b": [(str(t), {"iterations": t, "decoder": {"iterations": t}}) for t in (1, 2, 3, 4)],
    "s1c": [(label, dict(overrides)) for label, overrides in TABLES["6c"]],
    "s1d": [(label, dict(overrides)) for label, overrides in TABLES["6d"]],
    "s1e": [(label, dict(overrides)) for label, overrides in TABLES["6e"]],
    "s1f": [(label, None if overrides is None else {"decoder": dict(overrides)}) for label, overrides in TABLES["6f"]],
}

# The clustering decoders ClusterFormer builds on, as switches of the same panoptic model (docs/heads.md): the same
# backbone, data, budget and seed for every row. Not a table of the paper.
TABLES["seeds"] = [
    ("ClusterFormer (recurrent cross-attention clustering)", {"decoder": {}}),
    ("kMaX-DeepLab (k-means cross-attention)", {"decoder": {"kind": "kmax"}}),
    ("CMT-DeepLab (clustering center update)", {"decoder": {"kind": "cmt"}}),
    ("HCFormer (hierarchical clustering pixel path)", {"decoder": {"pixel_path": "hcformer"}}),
]

# the row of each table that the paper adopts (marked in red there, in bold here)
ADOPTED = {
    "6a": 3,
    "6b": 2,
    "6c": 4,
    "6d": 2,
    "6e": 4,
    "6f": 4,
    "s1a": 3,
    "s1b": 2,
    "s1c": 4,
    "s1d": 2,
    "s1e": 4,
    "s1f": 4,
    "seeds": 0,
}

# "#Params" of the paper's Table 6, row by row, in millions: ClusterFormer-Tiny with the 1000-class head (6b prints
# one count for every T). ``markdown_table`` sets each row's variant of ClusterFormer-Tiny beside them.
PAPER_PARAMS = {
    "6a": (21.73, 26.27, 23.46, 27.85),
    "6b": (27.85, 27.85, 27.85, 27.85),
    "6c": (23.88, 35.48, 34.16, 27.71, 27.85),
    "6d": (17.25, 22.88, 27.85, 32.81, 38.14),
    "6e": (26.27, 27.14, 26.81, 27.46, 27.85),
}
PAPER_MODEL = "clusterformer_tiny"


@dataclass(frozen=True)
class Layout:
    caption: str  # the paper's sub-caption
    first_column: str  # header of the row-label column
    columns: tuple[tuple[str, str], ...]  # (header, key in the row's metrics); "#Params" is added for 6a-6e
    percent_digits: int  # decimals of the percentages, as printed in the paper


CLASSIFICATION = (("top-1", "top1"), ("top-5", "top5"))
PANOPTIC = (("PQ", "PQ"), ("PQ Th", "PQ_th"), ("PQ St", "PQ_st"))
LAYOUTS = {
    "6a": Layout("(a) Key Component Analysis", "Algorithm Component", CLASSIFICATION, 2),
    "6b": Layout("(b) Number of iterations T", "Numbers (T)", CLASSIFICATION, 2),
    "6c": Layout("(c) Recurrent Cross-Attention Clustering", "Cluster Center Updating Strategy", CLASSIFICATION, 2),
    "6d": Layout("(d) Head Dimension", "Head Dimension", CLASSIFICATION, 2),
    "6e": Layout("(e) Feature Dispatching", "Feature Dispatching", CLASSIFICATION, 2),
    "6f": Layout(
        "(f) Decoder Query Initialization for instance segmentation",
        "Decoder Query Initialization",
        (("mAP", "mAP"), ("AP50", "AP50"), ("AP75", "AP75")),
        1,
    ),
    "s1a": Layout("(a) Key Component Analysis", "Algorithm Component", PANOPTIC, 1),
    "s1b": Layout("(b) Number of iterations T", "Numbers (T)", PANOPTIC, 1),
    "s1c": Layout("(c) Recurrent Cross-Attention Clustering", "Variant Cluster Center Updating Strategy", PANOPTIC, 1),
    "s1d": Layout("(d) Head Dimension", "Head Dimension", PANOPTIC, 1),
    "s1e": Layout("(e) Feature Dispatching", "Feature Dispatching", PANOPTIC, 1),
    "s1f": Layout(
        "(f) Decoder Query Initialization for panoptic segmentation", "Decoder Query Initialization", PANOPTIC, 1
    ),
    "seeds": Layout(
        "The clustering decoders ClusterFormer builds on, on one panoptic model",
        "Decoder",
        (*PANOPTIC, ("mask AP Th", "mAP_th"), ("mIoU", "mIoU")),
        1,
    ),
}

# the logged validation metric behind each reported key (one of the task's ``registry.TASKS[task].metrics``)
METRICS = {
    "classification": {"top1": "val/top1", "top5": "val/top5"},
    "instance": {"mAP": "val/segm_AP", "AP50": "val/segm_AP50", "AP75": "val/segm_AP75"},
    "panoptic": {"PQ": "val/PQ", "PQ_th": "val/PQ_th", "PQ_st": "val/PQ_st"},
}
# tables that report more of their task's metrics
TABLE_METRICS = {"seeds": {**METRICS["panoptic"], "mAP_th": "val/mAP_pan_th", "mIoU": "val/mIoU_pan"}}
# tables that also report each row's parameters and speed (images per second of its training steps and of its
# validation batches, timed in the run)
WITH_SPEED = ("seeds",)

NOT_REPRODUCED = (
    "not reproduced: the clustering decoder has no such query initialisation (only learnt free queries and the "
    "encoder's centers), and this table does not train a stand-in for it"
)


def check_table(table: str) -> str:
    """``table`` normalised (``"6A"``, ``"table6a"`` -> ``"6a"``); a ``ValueError`` naming the choices if unknown."""
    key = str(table).lower().removeprefix("table").strip().lstrip("_ ")
    if key not in TABLES:
        raise ValueError(
            f"unknown ablation table {table!r}; choose one of {', '.join(map(table_name, TABLES))} (paper Table 6, "
            "supplement Table S1)"
        )
    return key


def table_name(table: str) -> str:
    """The table as the paper names it: ``"6a"``, ``"S1a"``."""
    return table.upper()[:2] + table[2:] if table.startswith("s1") else table


def table_task(table: str) -> str:
    """``"classification"`` (6a-6e, ImageNet in the paper), ``"instance"`` (6f, COCO) or ``"panoptic"`` (S1a-S1f,
    COCO panoptic; ``seeds``, the clustering decoders side by side)."""
    table = check_table(table)
    if table.startswith("s1") or table == "seeds":
        return "panoptic"
    return "instance" if table == "6f" else "classification"


# --- building one row ---------------------------------------------------------------------------------


def _config_args(overrides: Sequence[str]) -> list[str]:
    """``["data.init_args.root=/x", ...]`` -> ``["--data.init_args.root", "/x", ...]`` (LightningCLI arguments)."""
    args = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"config override {item!r} is not KEY=VALUE (e.g. data.init_args.root=data/shapes)")
        args += [f"--{key.strip().removeprefix('--')}", value]
    return args


def redirect_outputs(trainer_config, row_dir: Path) -> None:
    """Point the trainer's root, every logger's ``save_dir`` and every callback's ``dirpath`` (checkpoints)
    at ``row_dir``, keeping the classes and the other settings of the config."""
    trainer_config.default_root_dir = str(row_dir)
    for name, key, path in (("logger", "save_dir", row_dir), ("callbacks", "dirpath", row_dir / "checkpoints")):
        entries = trainer_config.get(name)
        for entry in entries if isinstance(entries, list) else [entries]:
            init_args = getattr(entry, "init_args", None)
            if init_args is not None and key in init_args:
                init_args[key] = str(path)


def _merge(init_args, key: str, overrides: dict) -> None:
    current = init_args.get(key)
    if isinstance(current, Namespace):  # a typed option (the tasks' DecoderSettings), parsed field by field
        for name, value in overrides.items():
            current[name] = value
    else:
        init_args[key] = {**(current or {}), **overrides}


# the decoder's convergence accelerators (docs/heads.md), which the shapes configs switch on, are off in every row:
# the tables ablate the paper's decoder
PAPER_DECODER = {"masked_attention": False, "denoising": 0, "query_selection": False}


def _apply_row(model_config, task: str, overrides: dict, config_path: Path) -> None:
    """Merge a row's overrides into the task's constructor options (in place): the encoder's options of the
    classifier (6a-6e), the decoder's of the instance model (6f), or both of the panoptic model's (S1a-S1f)."""
    init_args = model_config.init_args
    class_path = model_config.class_path
    spec = TASKS[task]
    if task == "panoptic":
        if spec.encoder_options not in init_args or "decoder" not in init_args:
            raise ValueError(
                f"{config_path}: supplement Table S1 ablates panoptic segmentation (PQ on COCO panoptic in the "
                f"paper); the config's model must be {spec.module}, got {class_path}"
            )
        encoder = {name: value for name, value in overrides.items() if name != "decoder"}
        if encoder:
            _merge(init_args, spec.encoder_options, encoder)
        _merge(init_args, "decoder", {**PAPER_DECODER, **(overrides.get("decoder") or {})})
        return
    if task == "classification":
        key = spec.encoder_options
        if key not in init_args:
            raise ValueError(
                f"{config_path}: this table ablates the image classifier (top-1 / top-5 on ImageNet in the paper); "
                f"the config's model must be {spec.module}, got {class_path}"
            )
    else:
        key = "decoder"
        if key not in init_args or init_args.get("task") != task:
            raise ValueError(
                f"{config_path}: table 6f ablates instance segmentation (mask AP on COCO in the paper); the config's "
                f"model must be {spec.module} with task: {task}, got {class_path}"
                + (f" with task: {init_args.get('task')}" if "task" in init_args else "")
            )
    _merge(init_args, key, {**PAPER_DECODER, **overrides} if key == "decoder" else overrides)


EPOCH_PREFIX = "    "  # a log's epoch lines, under the line of their row


def build_row(
    table: str,
    row: int,
    config: str | Path,
    row_dir: str | Path,
    *,
    seed: int = 0,
    max_epochs: int | None = None,
    limit_train_batches: float | None = None,
    limit_val_batches: float | None = None,
    config_overrides: Sequence[str] = (),
    progress_bar: bool = True,
):
    """The ``(task, data, trainer)`` of row ``row`` (0-based) of ``table``, from a LightningCLI config.

    The config is parsed by ``LightningCLI`` exactly as ``clusterformer fit --config config`` would (classes,
    types, defaults), with ``config_overrides`` (``"KEY=VALUE"``, e.g. ``"data.init_args.root=..."``) and the
    trainer limits on top, then the row's overrides are merged into the task's options, the seed is set to
    ``seed`` before anything is built, and every output path of the trainer is moved into ``row_dir``. The trainer
    writes its checkpoints as ``fit`` does (:func:`~clusterformer.checkpoint_io.use_atomic_checkpoints`) and shows
    its progress as ``fit`` does: Lightning's bar on a terminal, one line per epoch into a log (``progress_bar``:
    either; false: neither, and no model summary).
    """
    from lightning import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    from ..checkpoint_io import use_atomic_checkpoints

    table = check_table(table)
    label, overrides = TABLES[table][row]
    if overrides is None:
        raise ValueError(f"table {table}, row {label!r}: {NOT_REPRODUCED}")
    config_path = Path(config)
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: config file not found")
    row_dir = Path(row_dir)
    task = table_task(table)
    args = ["--config", str(config_path), *_config_args(config_overrides), "--seed_everything", str(seed)]
    for name, value in (
        ("max_epochs", max_epochs),
        ("limit_train_batches", limit_train_batches),
        ("limit_val_batches", limit_val_batches),
    ):
        if value is not None:
            args += [f"--trainer.{name}", str(value)]
    if not progress_bar:
        args += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]

    class RowCLI(LightningCLI):
        def before_instantiate_classes(self) -> None:
            _apply_row(self.config.model, task, overrides, config_path)
            redirect_outputs(self.config.trainer, row_dir)

        def _instantiate_trainer(self, config: dict, callbacks: list):
            # as `clusterformer fit`: into a log, one line per epoch (indented under the row's line) instead of
            # Lightning's progress bar, whose redraws are carriage returns there (progress.py)
            from ..progress import progress_callbacks

            configured = config.get("callbacks") or []
            configured = configured if isinstance(configured, list) else [configured]
            extra = progress_callbacks(
                config.get("enable_progress_bar"), [*configured, *callbacks], prefix=EPOCH_PREFIX
            )
            return super()._instantiate_trainer(config, [*callbacks, *extra])

    try:
        with warnings.catch_warnings():
            # LightningCLI warns when ``args`` is given while sys.argv holds the ``clusterformer ablate`` arguments
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli = RowCLI(
                LightningModule,
                LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                run=False,
                args=args,
                save_config_kwargs={"overwrite": True},  # each row's full config lands in its log folder
                parser_kwargs={"exit_on_error": False},
            )
    except (ArgumentError, TypeError, ValueError) as error:  # jsonargparse's errors, prefixed with the config
        if str(config_path) in str(error):
            raise
        raise ValueError(f"{config_path}: {error}") from error
    use_atomic_checkpoints(cli.trainer)  # as `clusterformer fit`: whole checkpoints, one file per step
    return cli.model, cli.datamodule, cli.trainer


def count_parameters(module: torch.nn.Module, img_size: int = 64) -> tuple[int, int]:
    """``(used, total)`` parameters of ``module``: ``used`` counts those that the forward pass of one
    ``(1, 3, img_size, img_size)`` image computes with (every torch operation is watched for them).

    A classifier holds parameters that its forward pass never touches (ClusterFormer's
    ``parameters_unused_by_head``: the center head reads the last block's centers, not that block's dispatching
    and channel MLP or the token norm; without dispatching the clustering of the other blocks is idle; see
    ``docs/architecture.md``); ``used`` is the size of the classifier that the variant actually is. A gradient
    would not do: the one-hot assignments of ``kmeans`` pass none to the projections they depend on.
    """
    names = {id(p): p.numel() for p in module.parameters()}
    # a fixed, non-constant image: no random numbers drawn, so training sees the same generator state
    image = torch.linspace(-1.0, 1.0, 3 * img_size * img_size).view(1, 3, img_size, img_size)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), _ParameterUse(names) as watch:
            module(image)
    finally:
        module.train(was_training)
    return sum(names[i] for i in watch.used), sum(names.values())


def paper_model_parameters(overrides: dict) -> int:
    """All the parameters of ClusterFormer-Tiny with the 1000-class head (the model of the paper's Table 6) built
    with a row's ``overrides``; built on the meta device, so nothing is allocated or initialised."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(PAPER_MODEL, **overrides)
    return sum(p.numel() for p in model.parameters())


def paper_comparison(table: str) -> list[dict]:
    """Per row of ``table`` (6a-6e): ``tiny`` (:func:`paper_model_parameters`), ``paper`` (``PAPER_PARAMS``, in
    parameters) and ``percent``, ``100 * (tiny - paper) / paper``."""
    table = check_table(table)
    rows = []
    for (_, overrides), paper in zip(TABLES[table], PAPER_PARAMS[table], strict=True):
        tiny, paper = paper_model_parameters(overrides), paper * 1e6
        rows.append({"tiny": tiny, "paper": paper, "percent": 100 * (tiny - paper) / paper})
    return rows


class _ParameterUse(TorchFunctionMode):
    """Records which of the tensors with the given ids enter a torch operation (attribute reads excluded)."""

    def __init__(self, ids):
        super().__init__()
        self.ids = ids
        self.used = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") != "__get__":  # ``param.shape`` and the like are not a use
            self.used.update(id(t) for t in _tensors((args, kwargs)) if id(t) in self.ids)
        return func(*args, **kwargs)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for item in value for t in _tensors(item)] if isinstance(value, list | tuple) else []


# --- running a table ----------------------------------------------------------------------------------


NO_RESUME_NOTES = (
    r".*\.fit\(ckpt_path=None\)` was called without a model",
    r'.*ckpt_path="last"\) is set, but there is no last',
)


def _slug(index: int, label: str) -> str:
    return f"{index + 1}_" + (re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") or "row")


def _read_seed(config: Path) -> int:
    """The config's ``seed_everything`` if it is a number, else 0: every row must start from the same seed."""
    try:
        seed = (yaml.safe_load(config.read_text()) or {}).get("seed_everything")
    except (OSError, yaml.YAMLError, AttributeError):
        return 0
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else 0


def run_ablation(
    table: str,
    config: str | Path,
    out_dir: str | Path = "runs/ablate",
    *,
    max_epochs: int | None = None,
    limit_train_batches: float | None = None,
    limit_val_batches: float | None = None,
    seed: int | None = None,
    config_overrides: Sequence[str] = (),
    progress_bar: bool = True,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train and validate every row of ``table`` with the settings of ``config`` and write the table.

    Args:
        table: ``"6a"``, ``"6b"``, ``"6c"``, ``"6d"``, ``"6e"`` (classification config), ``"6f"`` (instance
            segmentation config) or ``"s1a"`` ... ``"s1f"`` (supplement Table S1: panoptic segmentation config).
        config: a LightningCLI YAML (what ``clusterformer fit --config`` takes).
        out_dir: ``table_<id>.md``, ``table_<id>.json`` and one sub-folder per row (logs, checkpoints, config).
        max_epochs, limit_train_batches, limit_val_batches: override the config's trainer settings.
        seed: the seed of every row (default: the config's ``seed_everything``, or 0).
        config_overrides: ``"KEY=VALUE"`` config settings, as LightningCLI arguments without the dashes
            (e.g. ``"data.init_args.root=/data/shapes/imagefolder"``).
        progress_bar: the progress of each row's training (Lightning's bar on a terminal, one line per epoch
            into a log) and its model summary.
        resume: continue the rows of an earlier run in ``out_dir`` from their last checkpoints (rows that
            finished are only validated again). Without it, checkpoints found there are an error: the
            configs' ``OnExceptionCheckpoint`` would make Lightning resume from them silently.
        log: where the progress lines and the final table go (default: ``print``, flushed).

    Returns the report that is written as JSON: the settings and, per row, its label, overrides, parameter
    counts (``params``: used by the forward pass; ``params_total``), metrics (fractions in [0, 1]; ``None``
    where not defined), seconds and folder.
    """
    table = check_table(table)
    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"{config}: config file not found")
    log = log or partial(print, flush=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = _read_seed(config) if seed is None else seed
    task = table_task(table)
    rows = TABLES[table]
    row_dirs = [out_dir / f"table_{table}" / _slug(index, label) for index, (label, _) in enumerate(rows)]
    earlier = [path for row_dir in row_dirs for path in sorted(row_dir.rglob("*.ckpt"))[:1]]
    if earlier and not resume:
        raise FileExistsError(
            f"{earlier[0].parent}: checkpoints of an earlier ablation run; pass --resume (resume=True) to continue "
            "those runs, or choose another output folder"
        )
    report = {
        "table": table,
        "caption": LAYOUTS[table].caption,
        "task": task,
        "config": str(config),
        "config_overrides": list(config_overrides),
        "seed": seed,
        "max_epochs": None,
        "limit_train_batches": limit_train_batches,
        "limit_val_batches": limit_val_batches,
        "rows": [],
    }
    for index, (label, overrides) in enumerate(rows):
        prefix = f"[{index + 1}/{len(rows)}] Table {table_name(table)}: {label}"
        entry = {"label": label, "overrides": overrides, "adopted": index == ADOPTED[table]}
        if overrides is None:
            log(f"{prefix}: not reproduced")
            report["rows"].append({**entry, "reproduced": False})
            continue
        row_dir = row_dirs[index]
        log(f"{prefix} ({', '.join(f'{k}={v}' for k, v in overrides.items())}): training in {row_dir}")
        start = time.perf_counter()
        model, data, trainer = build_row(
            table,
            index,
            config,
            row_dir,
            seed=seed,
            max_epochs=max_epochs,
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
            config_overrides=config_overrides,
            progress_bar=progress_bar,
        )
        used, total = count_parameters(model)
        timer = _batch_timer()
        trainer.callbacks.append(timer)
        with warnings.catch_warnings():
            if not resume:  # nothing to resume (checked above): Lightning's notes on the "last" checkpoint it looks
                # for, which the configs' OnExceptionCheckpoint names, do not apply (as in `clusterformer fit`)
                for note in NO_RESUME_NOTES:
                    warnings.filterwarnings("ignore", message=note)
            trainer.fit(model, datamodule=data, ckpt_path="last" if resume else None)
        timer.validation = [0, 0.0]  # the final validation's batches only
        logged = trainer.validate(model, datamodule=data, verbose=False)[0]
        metrics = {key: _fraction(logged.get(name)) for key, name in TABLE_METRICS.get(table, METRICS[task]).items()}
        seconds = time.perf_counter() - start
        report.update(
            model=_model_name(model),
            dataset=data.describe() if hasattr(data, "describe") else type(data).__name__,
            num_classes=getattr(data, "num_classes", None),
            max_epochs=trainer.max_epochs,
        )
        report["rows"].append(
            {
                **entry,
                "reproduced": True,
                "params": used,
                "params_total": total,
                "metrics": metrics,
                "train_images_per_second": timer.rate(timer.training),
                "val_images_per_second": timer.rate(timer.validation),
                "seconds": round(seconds, 1),
                "dir": str(row_dir),
            }
        )
        shown = ", ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in metrics.items())
        log(f"{prefix}: {shown}, {used / 1e6:.2f}M params, {seconds:.0f} s")
    markdown = markdown_table(report)
    (out_dir / f"table_{table}.md").write_text(markdown)
    (out_dir / f"table_{table}.json").write_text(json.dumps(report, indent=2) + "\n")
    log(markdown)
    log(f"wrote {out_dir / f'table_{table}.md'} and {out_dir / f'table_{table}.json'}")
    return report


def _batch_timer():
    """A Lightning callback that times the training steps and the validation batches: its ``training`` and
    ``validation`` are ``[images, seconds]``, ``rate(totals)`` their images per second."""
    from lightning.pytorch.callbacks import Callback

    class BatchTimer(Callback):
        def __init__(self):
            self.training, self.validation, self._start = [0, 0.0], [0, 0.0], 0.0

        @staticmethod
        def rate(totals: list) -> float | None:
            return round(totals[0] / totals[1], 2) if totals[1] > 0 else None

        def _begin(self) -> None:
            self._start = time.perf_counter()

        def _end(self, totals: list, batch) -> None:
            totals[0] += len(batch[0])
            totals[1] += time.perf_counter() - self._start

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            self._begin()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self._end(self.training, batch)

        def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
            self._begin()

        def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            self._end(self.validation, batch)

    return BatchTimer()


def _fraction(value) -> float | None:
    return None if value is None else float(value)


def _model_name(model) -> str:
    hparams = getattr(model, "hparams", {})
    return str(hparams.get("model") or hparams.get("backbone") or type(model).__name__)


def markdown_table(report: dict) -> str:
    """The paper's layout of one Table 6 part, from ``run_ablation``'s report, with a header saying what
    data it was measured on and footnotes for what differs from the paper."""
    table = report["table"]
    layout = LAYOUTS[table]
    with_params = report["task"] == "classification"
    with_speed = table in WITH_SPEED
    comparison_headers = ["ClusterFormer-T", "paper", "Δ"] if with_params else []
    headers = [
        layout.first_column,
        *(["#Params"] if with_params or with_speed else []),
        *(h for h, _ in layout.columns),
        *(["train img/s", "val img/s"] if with_speed else []),
        *comparison_headers,
    ]
    comparison = paper_comparison(table) if with_params else []
    paper_data = {"classification": "ImageNet-1K", "instance": "COCO"}.get(report["task"], "COCO panoptic")
    limits = ", ".join(
        f"{name} {report[key]}"
        for name, key in (("limit_train_batches", "limit_train_batches"), ("limit_val_batches", "limit_val_batches"))
        if report.get(key) is not None
    )
    epochs = report.get("max_epochs")
    lines = [
        f"**Table {table_name(table)}** {layout.caption}: `{report.get('model', '?')}` "
        f"on `{report.get('dataset', '?')}`, "
        f"{epochs} epoch{'' if epochs == 1 else 's'}{f' ({limits})' if limits else ''}, seed {report['seed']}, "
        f"config `{report['config']}`. These are not {paper_data} numbers: compare the rows with each other, "
        "not with the paper.",
        "",
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(headers) - 1)) + " |",
    ]
    notes = []
    unused_mark, missing_mark, skipped_mark = "†", "‡", "§"
    for index, row in enumerate(report["rows"]):
        label = f"**{row['label']}**" if row["adopted"] else row["label"]
        if not row["reproduced"]:
            cells = [f"{label}{skipped_mark}", *(["—"] if with_params else []), *("—" for _ in layout.columns)]
            lines.append("| " + " | ".join(cells + ["—" for _ in comparison_headers]) + " |")
            continue
        cells = [label]
        if with_params:
            mark = unused_mark if row["params_total"] != row["params"] else ""
            cells.append(f"{row['params'] / 1e6:.2f}M{mark}")
        if with_speed:
            cells.append(f"{row['params'] / 1e6:.2f}M")
        for _, key in layout.columns:
            value = row["metrics"].get(key)
            cells.append(f"—{missing_mark}" if value is None else f"{100 * value:.{layout.percent_digits}f}")
        if with_speed:
            cells += [_shown_rate(row.get("train_images_per_second")), _shown_rate(row.get("val_images_per_second"))]
        if with_params:
            paper = comparison[index]
            cells += [f"{paper['tiny'] / 1e6:.2f}M", f"{paper['paper'] / 1e6:.2f}M", f"{paper['percent']:+.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    body = "\n".join(lines)
    if unused_mark in body:
        totals = ", ".join(
            f"{row['label']} {row['params_total'] / 1e6:.2f}M"
            for row in report["rows"]
            if row["reproduced"] and row["params_total"] != row["params"]
        )
        notes.append(
            f"#Params counts the parameters that the forward pass computes with. {unused_mark} The module also holds "
            f"parameters that it never touches (in all: {totals}): the classifier reads the centers of the last block, "
            "not that block's dispatching and channel MLP or the token norm (the dense tasks use them), and without "
            "dispatching the clustering of the other blocks is idle (docs/architecture.md, Classification head)."
        )
    if missing_mark in body:
        notes.append(
            f"{missing_mark} not defined here: the dataset has {report.get('num_classes')} classes "
            "(top-5 needs at least 5)."
        )
    if skipped_mark in body:
        notes.append(f"{skipped_mark} {NOT_REPRODUCED}.")
    if with_params:
        notes.append(
            "ClusterFormer-T: all the parameters of this row's variant of ClusterFormer-Tiny with the 1000-class head, "
            "the model of the paper's Table 6; paper: the #Params printed there; Δ: their difference relative to the "
            "paper's. Where and why they differ: docs/architecture.md, Variants."
        )
        notes.append("Accuracies in %, on the validation split. The adopted design of the paper in bold.")
    elif with_speed:
        notes.append(
            "PQ, PQ of things and of stuff, mask AP of the things (pycocotools) and mIoU in %, on the validation "
            "split; #Params: the parameters the forward pass computes with; img/s: images per second of the "
            "training steps and of the validation batches (forward, post-processing and metric update), timed in "
            "this run on its machine: compare the rows with each other. ClusterFormer's decoder, the paper's, in "
            "bold; the others are switches of the same model (docs/heads.md), each with the paper's mechanism and "
            "this model's sizes."
        )
    else:
        what = "Mask AP in % (pycocotools)" if report["task"] == "instance" else "PQ, PQ of things and of stuff in %"
        notes.append(f"{what}, on the validation split. The adopted design of the paper in bold.")
    return body + "\n\n" + "\n\n".join(notes) + "\n"


def _shown_rate(value) -> str:
    return "—" if value is None else f"{value:.1f}"


# --- the command -----------------------------------------------------------------------------------------------------
# --quick: every row trained briefly (the seeds table on the shapes panoptic config in minutes on a 2-core CPU)
QUICK = {"max_epochs": 1, "limit_train_batches": 100, "limit_val_batches": 10}


def _batches(text: str) -> int | float:
    """Lightning's ``limit_*_batches``: an integer is a number of batches, a fraction a share of them."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of batches or a fraction, got {text!r}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "ablate",
        help="train the variants of one of the paper's ablation tables (Table 6a-6f, S1a-S1f) and write the table",
        description="Train and validate every variant of one part of the paper's Table 6 with the task, data and "
        "trainer of a LightningCLI config (the file that 'clusterformer fit' takes), same seed for every row, and "
        "write OUT/table_<id>.md (the paper's layout, parameter counts measured from each model) and "
        "OUT/table_<id>.json; each row logs and checkpoints into OUT/table_<id>/<row>. 6a components, 6b "
        "iterations T, 6c center update, 6d head dimension, 6e feature dispatching: a classification config; 6f "
        "decoder query initialisation: an instance segmentation config; S1a-S1f, the same six parts of the "
        "supplement's Table S1: a panoptic segmentation config. See docs/training.md, Ablations.",
    )
    parser.add_argument(
        "--table", required=True, help="6a, 6b, 6c, 6d, 6e, 6f, S1a ... S1f, or seeds (the clustering decoders)"
    )
    parser.add_argument("--config", required=True, help="LightningCLI YAML config of the task and data")
    parser.add_argument("--out", default="runs/ablate", help="output folder (default: runs/ablate)")
    parser.add_argument("--max-epochs", type=int, help="default: the config's trainer.max_epochs")
    parser.add_argument("--limit-train-batches", type=_batches, help="batches (integer) or share (fraction) per epoch")
    parser.add_argument("--limit-val-batches", type=_batches, help="batches (integer) or share (fraction)")
    parser.add_argument("--seed", type=int, help="seed of every row (default: the config's seed_everything, or 0)")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config setting, as LightningCLI's --KEY VALUE (repeatable), e.g. "
        "--set data.init_args.root=/tmp/shapes/imagefolder",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the rows of an earlier run in --out from their checkpoints"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a short run of every row: {QUICK['max_epochs']} epoch of {QUICK['limit_train_batches']} training "
        f"batches, {QUICK['limit_val_batches']} validation batches (options given explicitly win)",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..progress import quiet_lightning

    try:
        table = check_table(args.table)
        if args.quick:
            for name, value in QUICK.items():
                if getattr(args, name) is None:
                    setattr(args, name, value)
        with quiet_lightning():  # the rows, their progress and metrics; not Lightning's notes (progress.py)
            run_ablation(
                table,
                args.config,
                args.out,
                max_epochs=args.max_epochs,
                limit_train_batches=args.limit_train_batches,
                limit_val_batches=args.limit_val_batches,
                seed=args.seed,
                config_overrides=args.set or (),
                resume=args.resume,
            )
    except (ValueError, OSError) as error:  # bad table, config or output folder: one line, no traceback
        print(f"clusterformer ablate: error: {error}", file=sys.stderr)
        return 2
    return 0
