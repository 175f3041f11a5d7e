"""Hugging Face-style folders: :func:`save_pretrained`, :func:`from_pretrained`, :func:`load_backbone` and
:func:`push_to_hub`.

A folder is the project's one weight format (``weights.convert_checkpoint``) under the names the Hugging Face Hub
and timm look for:

* ``model.safetensors``: the model's state dict, keys without the task's ``model.`` prefix (a classifier's keys are
  timm's; a dense model's are ``backbone.*``, ``decoder.*``, ``head.*``);
* ``config.json``: the JSON description of ``convert_checkpoint`` (``format: "clusterformer-weights"``, task, model,
  num_classes, hyper_parameters, ...), so that ``weights.load_weights(folder / "config.json")`` reads the folder too;
  besides it the class names, COCO categories, the data settings that inference needs (image sizes, interpolation,
  normalisation; no local paths), the metrics, the training data, the command, the library version, and the fields
  that timm reads from a ``local-dir:`` or ``hf-hub:`` model (``architecture``, ``pretrained_cfg``,
  ``model_args``): ``timm.create_model("local-dir:FOLDER")`` builds the classifier, or a dense model's encoder;
* ``README.md``: a model card, with the YAML front matter of Hugging Face model cards (``library_name``,
  ``license``, ``pipeline_tag``, ``tags``), the task, classes, training data, metrics and command.

``from_pretrained(save_pretrained(model, folder))`` reproduces the model's outputs bit for bit. See
``docs/deployment.md``, "Save and load (Hugging Face style)".
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .outputs import atomic_path, check_output_folder, json_safe
from .registry import TASKS as TASK_SPECS
from .weights import (
    CheckpointError,
    TaskModel,
    build_task,
    describe_weights,
    load_checkpoint,
    load_state,
    load_task_model,
    load_weights,
    older_weights_settings,
    read_description_file,
    read_safetensors,
    rebuild_kwargs,
    task_labels,
    task_weights,
    write_weights,
)

__all__ = ["from_pretrained", "load_backbone", "push_to_hub", "save_pretrained"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FOLDER_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)

# the Hub's pipeline tag of each task; an encoder without head extracts features
PIPELINE_TAGS = {
    "classification": "image-classification",
    "detection": "object-detection",
    "instance": "image-segmentation",
    "semantic": "image-segmentation",
    "panoptic": "image-segmentation",
}
ENCODER_PIPELINE_TAG = "image-feature-extraction"
DEFAULT_LICENSE = "apache-2.0"
# the data module settings that name local files: left out of config.json (the folder is meant to be shared)
_PATH_SETTINGS = ("root", "_dir", "_images", "_annotations", "_labels", "_masks")
# the pretrained_cfg fields that timm reads back from a folder
_TIMM_CFG_KEYS = ("input_size", "interpolation", "crop_pct", "mean", "std", "first_conv", "classifier", "license")
_SHOWN_CLASSES = 100  # rows of the model card's class table


@dataclass
class _Export:
    """What a folder is written from, whatever it was given as."""

    state: dict
    description: dict  # weights.describe_weights
    classes: list[str]
    categories: list[dict]
    data: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    metrics_source: str = ""
    num_parameters: int = 0


# --- writing -------------------------------------------------------------------------------------------------------
def save_pretrained(
    model_or_checkpoint,
    folder: str | Path,
    *,
    metrics: Mapping | None = None,
    command: str | None = None,
    training_data: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model as a Hugging Face-style folder (``config.json``, ``model.safetensors``, ``README.md``); returns
    the folder.

    Args:
        model_or_checkpoint: a task's LightningModule, a :class:`~clusterformer.weights.TaskModel`, a timm
            ``ClusterFormer`` (a classifier, or an encoder without head) or the path of a task checkpoint (loaded
            weights-only).
        folder: the output folder; one that is not empty is an :class:`~clusterformer.outputs.OutputExistsError`
            unless ``overwrite`` (its three files are then replaced, each atomically; other files stay).
        metrics: metric names and numbers for the model card and ``config.json`` (nested dicts, as
            ``clusterformer evaluate`` prints them, are flattened to ``outer/inner``); without them, the last
            validation metrics stored with the checkpoint (or logged by the module's trainer), if any.
        command: the command that made the model, for the model card.
        training_data: a description of the training data (default: what the stored data settings say).
    """
    folder = check_output_folder(folder, overwrite)
    export = _export_of(model_or_checkpoint)
    if metrics is not None:
        export.metrics, export.metrics_source = metric_values(metrics, "metrics"), "given when the folder was written"
    config = {
        **export.description,
        "weights": WEIGHTS_NAME,
        "classes": export.classes,
        "categories": export.categories,
        "data": export.data,
        "metrics": export.metrics,
        "metrics_source": export.metrics_source if export.metrics else "",
        "training_data": training_data or _describe_training_data(export),
        "command": command or "",
        "num_parameters": export.num_parameters,
        "library_name": "clusterformer",
        "library_version": _version(),
        "license": _license(),
        **_timm_fields(export),
    }
    config = json_safe(config)
    folder.mkdir(parents=True, exist_ok=True)
    write_weights(export.state, folder / WEIGHTS_NAME, export.description)
    with atomic_path(folder / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    with atomic_path(folder / CARD_NAME) as tmp:
        tmp.write_text(model_card(config))
    return folder


def _export_of(source) -> _Export:
    from .backbone import ClusterFormer

    if isinstance(source, str | Path):
        return _from_checkpoint(Path(source))
    if isinstance(source, TaskModel):
        return _from_module(source.module, source.classes, source.categories, source.data)
    if isinstance(source, ClusterFormer):
        return _from_encoder(source)
    from .tasks.base import BaseTask

    if isinstance(source, BaseTask):
        return _from_module(source)
    raise TypeError(
        "save_pretrained takes a task module, a TaskModel, a timm ClusterFormer or the path of a task checkpoint, "
        f"not a {type(source).__name__}"
    )


def _from_checkpoint(path: Path) -> _Export:
    from .tasks.base import METRICS_KEY

    loaded = load_task_model(None, path)
    export = _from_module(loaded.module, loaded.classes, loaded.categories, loaded.data)
    checkpoint = load_checkpoint(path)
    export.metrics = metric_values(checkpoint.get(METRICS_KEY) or {}, str(path))
    for state in (checkpoint.get("callbacks") or {}).values():  # ModelCheckpoint's best score of its monitor
        if isinstance(state, dict) and state.get("monitor") and state.get("best_model_score") is not None:
            export.metrics.setdefault(f"{state['monitor']} (best)", float(state["best_model_score"]))
    step, epoch = checkpoint.get("global_step"), checkpoint.get("epoch")
    export.metrics_source = f"stored in the checkpoint: the last validation before step {step} (epoch {epoch})"
    return export


def _from_module(module, classes=None, categories=None, data=None) -> _Export:
    from .tasks.base import validation_metrics
    from .tasks.dataset_info import CATEGORIES_KEY, CLASSES_KEY, save_dataset_info

    stored = {}
    save_dataset_info(module, stored)  # the trainer's data module, else what the module was loaded with
    classes, categories = task_labels(
        dict(module.hparams), classes or stored.get(CLASSES_KEY), categories or stored.get(CATEGORIES_KEY)
    )
    if data is None:
        datamodule = module._datamodule()
        data = dict(datamodule.hparams) if datamodule is not None else getattr(module, "pretrained_data", {})
    state, description = task_weights(module.task_name, module)
    metrics = validation_metrics(module)
    source = f"logged by the trainer at step {module.global_step}" if metrics else ""
    return _Export(
        state, description, classes, categories, inference_settings(module.task_name, data), metrics, source,
        sum(p.numel() for p in module.model.parameters()),
    )  # fmt: skip


def _from_encoder(model: nn.Module) -> _Export:
    """A timm ClusterFormer: a classifier (task ``classification``) or, without head, an encoder alone
    (``backbone_only``), rebuilt from its constructor's arguments (``init_args``)."""
    name = _timm_name(model)
    args = {**model.init_args, "num_classes": model.num_classes, "global_pool": model.global_pool}
    if args.pop("norm_layer") is not None:
        raise ValueError("save_pretrained: a ClusterFormer with a custom norm_layer cannot be described in config.json")
    options = {k: v for k, v in args.items() if k != "num_classes"}
    num_classes = int(model.num_classes)
    if num_classes:
        hparams = {"model": name, "num_classes": num_classes, "model_kwargs": options}
        task_class = TASK_SPECS["classification"].module
    else:
        hparams = {"model": name, "model_kwargs": options}
        task_class = f"{type(model).__module__}.{type(model).__qualname__}"
    description = describe_weights("classification", name, num_classes, not num_classes, task_class, hparams)
    classes, categories = task_labels({"num_classes": num_classes}) if num_classes else ([], [])
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = int((cfg.get("input_size") or (3, 224, 224))[-1])
    data = {"img_size": size, "eval_resize": round(size / cfg.get("crop_pct", 1.0))}
    data["interpolation"] = cfg.get("interpolation", "bicubic")
    return _Export(
        model.state_dict(), description, classes, categories, inference_settings("classification", data),
        num_parameters=sum(p.numel() for p in model.parameters()),
    )  # fmt: skip


def _timm_name(model: nn.Module) -> str:
    """The timm name of a ClusterFormer: the architecture timm built it as, else the size its widths and depths
    are."""
    from .backbone import SIZES

    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if name:
        return name
    args = model.init_args
    for size, settings in SIZES.items():
        if tuple(args["embed_dims"]) == settings["embed_dims"] and tuple(args["depths"]) == settings["depths"]:
            return size
    return "clusterformer_tiny"  # config.json holds every argument, widths and depths included


def inference_settings(task: str, data: Mapping) -> dict:
    """The data settings that inference reads (sizes, interpolation, ...), without those that name local files,
    with the normalisation of the transforms (ImageNet's mean and std)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    def names_files(key: str) -> bool:
        return key == "root" or key.endswith(_PATH_SETTINGS)

    settings = {k: v for k, v in data.items() if not str(k).startswith("_") and not names_files(str(k))}
    if isinstance(data.get("root"), str | Path) and "dataset_name" not in settings:
        settings["dataset_name"] = Path(data["root"]).name  # the dataset folder's name, not where it lies
    settings.setdefault("mean", list(IMAGENET_DEFAULT_MEAN))
    settings.setdefault("std", list(IMAGENET_DEFAULT_STD))
    return json_safe(settings)


def metric_values(metrics, source: str) -> dict[str, float | None]:
    """``metrics`` as a flat dict of names and numbers (``None`` for a metric without value, as JSON's ``null``);
    nested dicts become ``outer/inner``. Anything else is a ``ValueError`` naming ``source``."""
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{source}: metrics must be a mapping of names to numbers, not a {type(metrics).__name__}")
    values = {}
    for name, value in metrics.items():
        if isinstance(value, Mapping):
            values.update({f"{name}/{inner}": v for inner, v in metric_values(value, source).items()})
        elif value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
            values[str(name)] = None if value is None else float(value)
        elif hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:  # a tensor of one value
            values[str(name)] = float(value.item())
        else:
            raise ValueError(f"{source}: metric {name!r} is {value!r}, not a number")
    return values


def read_metrics_json(path: str | Path) -> dict[str, float | None]:
    """The metrics of a JSON file (an object of names and numbers, such as ``clusterformer evaluate`` prints)."""
    path = Path(path)
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON file of metrics ({error})") from None
    return metric_values(metrics, str(path))


def _timm_fields(export: _Export) -> dict:
    """The ``config.json`` fields of a timm model folder: the encoder (with its head for a classifier), its
    constructor options and data config, so that ``timm.create_model("local-dir:FOLDER")`` (or ``hf-hub:``)
    builds it and loads ``model.safetensors`` (``backbone.checkpoint_filter_fn`` finds a dense model's encoder
    under ``backbone.``)."""
    import timm

    description = export.description
    name = description["model"]
    if not timm.is_model(name):
        return {}
    spec = TASK_SPECS[description["task"]]
    options = dict(rebuild_kwargs(description["hyper_parameters"]).get(spec.encoder_options) or {})
    whole_dense_model = spec.dense and not description["backbone_only"]
    if whole_dense_model:
        options["num_classes"] = 0  # the encoder; config.json's num_classes are the task's
    default = timm.models.get_pretrained_cfg(name)
    cfg = {k: v for k, v in (default.to_dict() if default else {}).items() if k in _TIMM_CFG_KEYS}
    data = export.data
    cfg.update(mean=data["mean"], std=data["std"])
    if not spec.dense and data.get("img_size"):
        size = int(data["img_size"])
        cfg.update(input_size=[3, size, size], crop_pct=size / int(data.get("eval_resize") or size))
        cfg["interpolation"] = data.get("interpolation", cfg.get("interpolation", "bicubic"))
    if whole_dense_model:
        cfg.pop("classifier", None)
    fields = {"architecture": name, "pretrained_cfg": cfg, "model_args": options}
    if not spec.dense and export.classes:
        fields["label_names"] = export.classes
    return fields


# --- reading -------------------------------------------------------------------------------------------------------
def read_folder(folder: str | Path) -> tuple[dict, Path]:
    """The checked ``config.json`` of a pretrained folder and the path of its weights, which must be there and be
    the weights it describes (task, model and number of classes in the safetensors metadata)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not found, or not a folder (save_pretrained writes a folder)")
    config = folder / CONFIG_NAME
    if not config.is_file():
        raise CheckpointError(
            f"{config}: not found; a pretrained folder holds {CONFIG_NAME} and {WEIGHTS_NAME} (written by "
            "save_pretrained or 'clusterformer convert --format pretrained')"
        )
    description = read_description_file(config)
    name = description.get("weights") or WEIGHTS_NAME
    if not isinstance(name, str) or Path(name).name != name:  # a file of the folder, nowhere else
        raise CheckpointError(f"{config}: 'weights' must name a file of the folder, not {name!r}")
    weights = folder / name
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights not found ({CONFIG_NAME} names {name!r})")
    _check_metadata(weights, description, config)
    return description, weights


def _check_metadata(weights: Path, description: dict, config: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as file:
            metadata = file.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{weights}: not a safetensors file ({error})") from None
    for key in ("task", "model", "num_classes"):
        if key in metadata and metadata[key] != str(description[key]):
            raise CheckpointError(
                f"{weights}: the weights are of another model than {config.name} describes ({key} "
                f"{metadata[key]!r} in the weights, {description[key]!r} in {config.name})"
            )


def from_pretrained(folder: str | Path) -> TaskModel:
    """The task model of a folder written by :func:`save_pretrained`, in eval mode: a
    :class:`~clusterformer.weights.TaskModel` (``task``, ``module`` (the task's LightningModule), ``classes``,
    ``categories``, ``data``), as ``weights.load_task_model`` returns for a checkpoint. Weights only, never code; a
    folder without ``config.json``, with missing weights, weights of another model, or keys and shapes that do not
    fit is a :class:`~clusterformer.weights.CheckpointError` that names the file. An encoder without head
    (``backbone_only``) is not a task model: :func:`load_backbone` loads it."""
    from .tasks.dataset_info import CATEGORIES_KEY, CLASSES_KEY

    folder = Path(folder)
    description, weights = read_folder(folder)
    if description.get("backbone_only"):
        raise CheckpointError(
            f"{folder / CONFIG_NAME}: an encoder without a task head (backbone_only); load it with "
            "clusterformer.hub.load_backbone (ClusterFormer.from_pretrained) or timm.create_model('local-dir:...')"
        )
    task = description["task"]
    state = read_safetensors(weights)
    hparams = older_weights_settings(task, description["hyper_parameters"], state)
    module = build_task(task, hparams, folder / CONFIG_NAME)
    load_state(module.model, state, weights, f"{task} model")
    classes, categories = task_labels(dict(module.hparams), description.get("classes"), description.get("categories"))
    data = description.get("data") if isinstance(description.get("data"), dict) else {}
    # the module's next checkpoints and folders keep the class names and data settings
    module._dataset_info = {CLASSES_KEY: classes, CATEGORIES_KEY: categories}
    module.pretrained_data = data
    return TaskModel(task, module.eval(), classes, categories, dict(data))


def load_backbone(folder: str | Path) -> nn.Module:
    """The timm model of a pretrained folder, in eval mode: a classifier with its head, an encoder without head, or
    the encoder of a dense task's model (its ``backbone.*`` weights)."""
    read_folder(folder)
    return load_weights(Path(folder) / CONFIG_NAME, encoder=True)


# --- the Hub -------------------------------------------------------------------------------------------------------
def push_to_hub(
    model_or_folder,
    repo_id: str,
    *,
    metrics: Mapping | None = None,
    command: str | None = None,
    training_data: str | None = None,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload ClusterFormer model",
):
    """Upload a model to the Hugging Face Hub repository ``repo_id`` (created if needed) with
    ``huggingface_hub.HfApi.upload_folder``; returns what ``upload_folder`` returns (the commit's information).

    ``model_or_folder``: what :func:`save_pretrained` takes (the folder is written to a temporary folder), or a
    folder it wrote (checked: it must load; its three files are uploaded, nothing else). ``metrics``, ``command``
    and ``training_data`` go to :func:`save_pretrained`; a folder has its card already."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ImportError("push_to_hub needs huggingface_hub (pip install huggingface_hub)") from None
    with tempfile.TemporaryDirectory(prefix="clusterformer-hub-") as temporary:
        upload = Path(temporary) / "model"
        if isinstance(model_or_folder, str | Path) and Path(model_or_folder).is_dir():
            if metrics is not None or command is not None or training_data is not None:
                raise ValueError(
                    f"{model_or_folder}: metrics, command and training_data are written with the folder "
                    "(save_pretrained); pass the model or checkpoint instead of the folder"
                )
            source = Path(model_or_folder)
            description, _ = read_folder(source)
            (load_backbone if description.get("backbone_only") else from_pretrained)(source)  # it loads
            upload.mkdir()
            for name in FOLDER_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, upload / name)
        else:
            save_pretrained(model_or_folder, upload, metrics=metrics, command=command, training_data=training_data)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id, folder_path=str(upload), commit_message=commit_message, revision=revision
        )


# --- the model card ------------------------------------------------------------------------------------------------
def model_card(config: dict) -> str:
    """The ``README.md`` of a folder: YAML front matter (``library_name``, ``license``, ``pipeline_tag``, ``tags``)
    and a body with the task, the classes, the training data, the metrics, the command and how to load it."""
    task = config["task"]
    encoder_only = bool(config.get("backbone_only"))
    title = TASK_SPECS[task].title
    pipeline = ENCODER_PIPELINE_TAG if encoder_only else PIPELINE_TAGS[task]
    tags = ["clusterformer", "vision", pipeline, "safetensors"]
    if "architecture" in config:
        tags.insert(1, "timm")
    front = [
        "---",
        "library_name: clusterformer",
        f"license: {json.dumps(config.get('license') or DEFAULT_LICENSE)}",
        f"pipeline_tag: {pipeline}",
        "tags:",
        *[f"- {tag}" for tag in tags],
        "---",
    ]
    model = config["model"]
    what = f"the encoder of a {title} model" if encoder_only and task != "classification" else title
    if encoder_only and task == "classification":
        what = "an image encoder (no classification head)"
    lines = [*front, "", f"# {model}: {what}", ""]
    lines.append(
        f"A [ClusterFormer](https://arxiv.org/abs/2309.13196) model for {what}, written by clusterformer "
        f"{config.get('library_version', '')}: encoder `{model}`"
        + ("" if encoder_only else f", {config['num_classes']} classes")
        + (f", {config['num_parameters'] / 1e6:.2f}M parameters" if config.get("num_parameters") else "")
        + "."
    )
    hparams = config.get("hyper_parameters") or {}
    if TASK_SPECS[task].dense and isinstance(hparams.get("decoder"), dict):
        decoder = hparams["decoder"]
        shown = ", ".join(f"{k} {decoder[k]}" for k in ("num_layers", "num_queries", "dim") if k in decoder)
        if shown:
            lines[-1] += f" Clustering decoder: {shown}."
    if not encoder_only:
        lines += ["", "## Classes", "", *_class_table(config)]
    lines += ["", "## Training data", "", _sentence(config.get("training_data") or "not recorded")]
    lines += ["", "## Metrics", ""]
    if config.get("metrics"):
        lines += [_sentence(config.get("metrics_source") or "given", ":"), "", "| metric | value |", "| --- | --- |"]
        for name, value in config["metrics"].items():
            shown = "n/a" if value is None else f"{value:.4g}"
            lines.append(f"| {_escape(name)} | {shown} |")
    else:
        lines.append("None recorded.")
    lines += ["", "## How it was made", ""]
    command = config.get("command") or ""
    lines += _code_block(command, "bash") if command else ["Not recorded."]
    lines += ["", "## How to use", "", *_usage(config)]
    lines += [
        "",
        "## Files",
        "",
        f"* `{WEIGHTS_NAME}`: the weights (safetensors; loading them runs no code).",
        f"* `{CONFIG_NAME}`: what rebuilds the model (task, model, hyperparameters), the classes, the data "
        "settings of inference, the metrics; timm's `architecture`, `pretrained_cfg` and `model_args`.",
        "",
    ]
    return "\n".join(lines)


def _class_table(config: dict) -> list[str]:
    categories = config.get("categories") or []
    classes = config.get("classes") or []
    coco = TASK_SPECS[config["task"]].dense and len(categories) == len(classes)
    if coco:
        rows = ["| label | name | COCO id | thing |", "| --- | --- | --- | --- |"]
    else:
        rows = ["| label | name |", "| --- | --- |"]
    for label, name in enumerate(classes[:_SHOWN_CLASSES]):
        if coco:
            category = categories[label]
            thing = "yes" if category.get("isthing", 1) else "no"
            rows.append(f"| {label} | {_escape(str(name))} | {category.get('id', '')} | {thing} |")
        else:
            rows.append(f"| {label} | {_escape(str(name))} |")
    if len(classes) > _SHOWN_CLASSES:
        rows += ["", f"... and {len(classes) - _SHOWN_CLASSES} more (all of them in `{CONFIG_NAME}`)."]
    return rows


def _usage(config: dict) -> list[str]:
    python = ["import clusterformer.hub", ""]
    if config.get("backbone_only"):
        python.append("encoder = clusterformer.hub.load_backbone(FOLDER)  # a timm ClusterFormer, in eval mode")
    else:
        python += [
            "model = clusterformer.hub.from_pretrained(FOLDER)  # TaskModel: task, module, classes, categories, data",
            "outputs = model.module(images)  # images (B, 3, H, W), normalised with data['mean'] and data['std']",
        ]
    if "architecture" in config:
        classifier = config["task"] == "classification" and not config.get("backbone_only")
        loaded = "classifier" if classifier else "encoder"
        python += ["", "import timm", "", f'{loaded} = timm.create_model("local-dir:FOLDER", pretrained=True)']
    text = ["`FOLDER` is this folder (downloaded from the Hub, for example, with huggingface_hub's "
            "`snapshot_download`).", ""]  # fmt: skip
    return text + _code_block("\n".join(python), "python")


def _code_block(text: str, language: str) -> list[str]:
    fence = "```"
    while fence in text:
        fence += "`"
    return [f"{fence}{language}", text, fence]


def _sentence(text: str, end: str = ".") -> str:
    """``text`` as a paragraph: a capital first letter, ``end`` at its end (unless it ends with a full stop)."""
    text = _escape(text)
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else end)


def _escape(text: str) -> str:
    """Text for a Markdown table cell or paragraph: no line breaks, ``|`` escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _describe_training_data(export: _Export) -> str:
    """What the stored data settings say about the training data: its kind, the dataset folder's name (not its
    path) and the number of classes; ``""`` when nothing is known."""
    name = export.data.get("dataset_name")
    if not name:
        return ""
    kinds = {
        "classification": "an ImageFolder dataset",
        "detection": "a COCO instances dataset",
        "instance": "a COCO instances dataset",
        "semantic": "a dataset of label PNGs (ADE20K style)",
        "panoptic": "a COCO panoptic dataset",
    }
    return f"{kinds[export.description['task']]} (folder `{name}`) of {len(export.classes)} classes"


def _version() -> str:
    from . import __version__

    return __version__


def _license() -> str:
    """The package's license as a Hub license identifier (``apache-2.0``), from its metadata (pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        found = metadata("clusterformer")
    except PackageNotFoundError:
        return DEFAULT_LICENSE
    return str(found.get("License-Expression") or found.get("License") or DEFAULT_LICENSE).lower()
