"""Safe weights: task checkpoints loaded without running code, and the safetensors + JSON weight format.

* :func:`load_checkpoint` reads a Lightning checkpoint with ``torch.load(weights_only=True)`` only: a file whose
  pickle would build other objects than tensors and plain containers (a pickle that runs code) is refused.
* :func:`task_from_checkpoint` rebuilds the task's LightningModule from the checkpoint's ``hyper_parameters``
  and loads its state dict. The task is the ``clusterformer_task`` key that every task writes into its
  checkpoints (Lightning itself records no class); older checkpoints are recognised by their hyperparameters.
* :func:`load_task_model` is the checkpoint as the commands that run it take it (``predict``, ``explain``): the
  module in eval mode with its class names, COCO categories and the data settings stored with it (:class:`TaskModel`).
* :func:`convert_checkpoint` writes ``PREFIX.safetensors`` (the task model's state dict, keys without the task's
  ``model.`` prefix; with ``backbone_only`` just the encoder, keys without ``backbone.``) and ``PREFIX.json``
  (task, model name, number of classes and the task's hyperparameters); :func:`load_weights` rebuilds the model
  from the pair (``encoder=True``: a dense model's encoder alone). ``hub.save_pretrained`` writes the same pair as a
  Hugging Face-style folder (``model.safetensors``, ``config.json``). A classifier's file (and any ``backbone_only``
  file) loads with timm::

      timm.create_model("clusterformer_nano", pretrained=True, num_classes=N,
                        pretrained_cfg_overlay=dict(file="PREFIX.safetensors", num_classes=N))

  (timm drops the head of a file whose ``num_classes`` is not the overlay's, 1000 by default) and the encoder of
  a dense task through ``backbone_kwargs={"pretrained": True, "pretrained_cfg_overlay": {"file": ...}}``. Either
  way everything but the classifier must fit (``backbone.checkpoint_filter_fn``): a file that lacks encoder
  weights, holds keys of no part of the encoder or tensors of another shape is a :class:`CheckpointError`.

See ``docs/deployment.md``.
"""

from __future__ import annotations

import inspect
import json
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .outputs import atomic_path, check_output_file, json_safe
from .registry import TASKS as TASK_SPECS
from .registry import task_of_class_name

TASKS = tuple(TASK_SPECS)  # the task names
TASK_KEY = "clusterformer_task"  # written by every task's on_save_checkpoint
WEIGHTS_FORMAT = "clusterformer-weights"
WEIGHTS_VERSION = 1
# constructor options that would load other weights when the model is rebuilt; the weights come from the file
_PRETRAINED_OPTIONS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")


class CheckpointError(ValueError):
    """A checkpoint or weight file that cannot be used; the message names the file and the problem."""


def load_checkpoint(path: str | Path) -> dict:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with a :class:`CheckpointError` that names
    the file when it is missing, is not a PyTorch checkpoint, or holds objects a weights-only load refuses."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (the file is empty)")
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols: the error below says what matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" in str(error):  # a class or function to call, not in the weights-only allow-list
            raise CheckpointError(
                f"{path}: refused: the file holds pickled objects that a weights-only load does not allow and that "
                f"could run code ({_reason(error)}); load it with torch.load(weights_only=False) only if you trust "
                "its origin"
            ) from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({_reason(error)})") from None
    except EOFError:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (the file ends early: truncated?)") from None
    except Exception as error:  # torch.load raises all kinds of errors on files that are not checkpoints
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(error).__name__}: {_reason(error)})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a checkpoint (it holds a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


def _reason(error: Exception) -> str:
    """The line of a load error that says what went wrong (e.g. ``Trying to load unsupported GLOBAL posix.system
    ...``), without torch's advice around it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    advice = ("weights only load failed", "check the documentation", "please file an issue")
    useful = [line for line in lines if "unsupported" in line.lower()]
    useful += [line for line in lines if not line.lower().startswith(advice)]
    return useful[0].split(". ")[0].rstrip(".") if useful else type(error).__name__


# --- tasks --------------------------------------------------------------------------------------------------------
def task_class(task: str) -> type:
    """The LightningModule class of ``task`` (one of :data:`TASKS`)."""
    if task not in TASK_SPECS:
        raise CheckpointError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return TASK_SPECS[task].module_class


def checkpoint_task(checkpoint: dict, path: str | Path = "checkpoint") -> str:
    """The task of a loaded checkpoint: its ``clusterformer_task`` key, else the class LightningCLI recorded
    (``_class_path``), else the task whose constructor takes exactly its hyperparameters."""
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(checkpoint.get("state_dict"), dict) or not isinstance(hparams, dict):
        raise CheckpointError(f"{path}: not a task checkpoint (no state_dict and hyper_parameters; a Lightning "
                              "checkpoint written by 'clusterformer fit' is expected)")  # fmt: skip
    task = checkpoint.get(TASK_KEY)
    if task is None:
        class_name = str(hparams.get("_class_path", "")).rsplit(".", 1)[-1]
        if class_name:
            task = task_of_class_name(class_name, hparams.get("task")) or class_name
        else:
            task = _task_from_hparams(hparams)
    if task not in TASKS:
        raise CheckpointError(f"{path}: a checkpoint of an unknown task {task!r} (expected one of {', '.join(TASKS)})")
    return task


def _task_from_hparams(hparams: dict) -> str | None:
    """The task whose constructor takes every one of ``hparams`` and the argument only it takes (its
    ``signature_key``; tasks without one are tried last), for checkpoints written before tasks recorded
    ``clusterformer_task``."""
    keys = {k for k in hparams if not str(k).startswith("_")}
    for spec in sorted(TASK_SPECS.values(), key=lambda spec: spec.signature_key is None):
        accepted = set(inspect.signature(spec.module_class.__init__).parameters)
        if keys <= accepted and (spec.signature_key is None or spec.signature_key in keys):
            return spec.resolve(hparams.get("task"))
    return None


def rebuild_kwargs(hparams: dict) -> dict:
    """A task's constructor arguments from its stored hyperparameters: without LightningCLI's private keys and
    without options that would load pretrained weights (the weights come from the checkpoint)."""
    kwargs = {k: v for k, v in hparams.items() if not str(k).startswith("_")}
    for key in ("model_kwargs", "backbone_kwargs"):
        if isinstance(kwargs.get(key), dict):
            kwargs[key] = {k: v for k, v in kwargs[key].items() if k not in _PRETRAINED_OPTIONS}
    return kwargs


def build_task(task: str, hparams: dict, path: str | Path = "checkpoint"):
    """The ``task`` LightningModule built from ``hparams`` (see :func:`rebuild_kwargs`), randomly initialised."""
    try:
        return task_class(task)(**rebuild_kwargs(hparams))
    except (TypeError, ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(f"{path}: cannot rebuild the {task} model from its hyperparameters ({error})") from None


def load_state(module: nn.Module, state: dict, path: str | Path, what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise CheckpointError(
            f"{path}: the weights do not fit the {what} rebuilt from its settings (another architecture?): "
            f"{detail[:400]}{'...' if len(detail) > 400 else ''}"
        ) from None


def task_from_checkpoint(path: str | Path, task: str | None = None):
    """``(task_name, module)``: the task's LightningModule rebuilt from a Lightning checkpoint's hyperparameters,
    with its weights, in eval mode. With ``task``, a checkpoint of another task is a :class:`CheckpointError`."""
    checkpoint = load_checkpoint(path)
    found = checkpoint_task(checkpoint, path)
    if task is not None and found != task:
        raise CheckpointError(f"{path}: a {found} checkpoint, not {task}")
    state = checkpoint["state_dict"]
    module = build_task(found, older_weights_settings(found, checkpoint["hyper_parameters"], state), path)
    load_state(module, state, path, f"{found} model")
    return found, module.eval()


def older_weights_settings(task: str, hparams: dict, state: dict) -> dict:
    """The hyperparameters that rebuild the model of weights written before a default changed:
    :func:`literal_m_step_settings`, then :func:`token_head_settings`."""
    return token_head_settings(task, literal_m_step_settings(task, hparams, state), state)


def token_head_settings(task: str, hparams: dict, state: dict) -> dict:
    """The hyperparameters of a classifier written before the classification head read the cluster centers: its
    state has a classifier (``head.weight``) but no ``head_norm``, so it is rebuilt with ``head="tokens"``, unless
    its settings name a head. The keys may carry the task's ``model.`` prefix (a Lightning checkpoint)."""
    keys = {key.removeprefix("model.") for key in state}
    spec = TASK_SPECS[task]
    if spec.dense or "head.weight" not in keys or "head_norm.weight" in keys:
        return hparams
    hparams = dict(hparams)
    hparams[spec.encoder_options] = {"head": "tokens", **(hparams.get(spec.encoder_options) or {})}
    return hparams


def literal_m_step_settings(task: str, hparams: dict, state: dict) -> dict:
    """The hyperparameters of a checkpoint (or a converted weight file) written before the EM reading of the
    clustering became the default: its clustering layers have query projections but no QK-norm weights, so it
    was trained with Algorithm 1's literal M-step and is rebuilt with ``m_step="sum"`` (encoder and decoder),
    unless its settings name one."""
    projections = [k for k in state if k.endswith("clustering.q.weight")]
    if not projections or any(k.endswith("clustering.q_norm.weight") for k in state):
        return hparams
    hparams = dict(hparams)
    spec = TASK_SPECS[task]
    hparams[spec.encoder_options] = {"m_step": "sum", **(hparams.get(spec.encoder_options) or {})}
    if spec.dense:
        hparams["decoder"] = {"m_step": "sum", **(hparams.get("decoder") or {})}
    return hparams


# --- safetensors + JSON -----------------------------------------------------------------------------------------
def _prefix(out: str | Path) -> Path:
    out = Path(out)
    return out.with_suffix("") if out.suffix in (".safetensors", ".json") else out


def convert_checkpoint(
    ckpt: str | Path, out: str | Path, backbone_only: bool = False, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write the model of a task checkpoint as ``OUT.safetensors`` and ``OUT.json`` (``out`` is the prefix; a
    ``.safetensors`` or ``.json`` suffix is dropped). Returns the two paths. When either file exists, an
    :class:`~clusterformer.outputs.OutputExistsError` unless ``overwrite``.

    ``backbone_only`` keeps only the encoder (keys without ``backbone.``; for a classifier, the model without its
    head) to initialise another task's backbone.
    """
    weights, info = output_paths(out)
    for path in (weights, info):
        check_output_file(path, overwrite)
    task, module = task_from_checkpoint(ckpt)
    state, description = task_weights(task, module, backbone_only)
    write_weights(state, weights, description)
    with atomic_path(info) as tmp:
        tmp.write_text(json.dumps({**description, "weights": weights.name}, indent=2) + "\n")
    return weights, info


def task_weights(task: str, module, backbone_only: bool = False) -> tuple[dict, dict]:
    """``(state, description)`` of a task's LightningModule: the state dict of its model (keys without the task's
    ``model.`` prefix; with ``backbone_only`` the encoder alone, keys without ``backbone.``, for a classifier the
    model without its head) and its JSON description without the ``weights`` file name (:func:`describe_weights`)."""
    hparams = dict(module.hparams)
    spec = TASK_SPECS[task]
    model = module.model
    encoder = model.backbone if spec.dense else model
    if backbone_only:
        from .backbone import CLASSIFIER_KEYS

        state = {k: v for k, v in encoder.state_dict().items() if not k.startswith(CLASSIFIER_KEYS)}
        num_classes = 0
    else:
        state = model.state_dict()
        num_classes = int(hparams["num_classes"])
    task_class = f"{type(module).__module__}.{type(module).__qualname__}"
    return state, describe_weights(task, hparams[spec.model_key], num_classes, backbone_only, task_class, hparams)


def describe_weights(
    task: str, model: str, num_classes: int, backbone_only: bool, task_class: str, hparams: dict
) -> dict:
    """The JSON description of a weight file (what :func:`load_weights` reads): format, version, task, model name,
    number of classes (0 for an encoder alone), ``backbone_only``, the task's class and its constructor arguments
    (``hyper_parameters``, without options that would load other weights: :func:`rebuild_kwargs`)."""
    return {
        "format": WEIGHTS_FORMAT,
        "version": WEIGHTS_VERSION,
        "task": task,
        "model": model,
        "num_classes": num_classes,
        "backbone_only": backbone_only,
        "task_class": task_class,
        "hyper_parameters": json_safe(rebuild_kwargs(hparams)),
    }


def write_weights(state: dict, path: Path, description: dict) -> Path:
    """``state`` as a safetensors file at ``path``, atomically, with the description's task, model and number of
    classes as metadata. The tensors are copied to the CPU, contiguous (safetensors refuses shared storage)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    metadata = {"format": "pt", **{k: str(description[k]) for k in ("task", "model", "num_classes")}}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path


def output_paths(out: str | Path) -> tuple[Path, Path]:
    """``PREFIX.safetensors`` and ``PREFIX.json`` of an output prefix (a ``.safetensors`` or ``.json`` suffix is
    dropped)."""
    prefix = _prefix(out)
    return prefix.with_name(prefix.name + ".safetensors"), prefix.with_name(prefix.name + ".json")


def read_description(path: str | Path) -> tuple[dict, Path]:
    """The JSON description of a weight file and the safetensors path: ``path`` is the prefix, the
    ``.safetensors`` file or the ``.json`` file."""
    prefix = _prefix(path)
    info = prefix.with_name(prefix.name + ".json")
    if not info.is_file():
        raise CheckpointError(f"{info}: not found (the JSON that 'clusterformer convert' writes beside the "
                              f"weights says what model to build; for plain timm weights use --model)")  # fmt: skip
    description = read_description_file(info)
    return description, info.with_name(description.get("weights") or prefix.name + ".safetensors")


def read_description_file(info: Path) -> dict:
    """The checked contents of a weight file's JSON description (``PREFIX.json``, or a pretrained folder's
    ``config.json``): a :class:`CheckpointError` naming the file when it is not JSON, not a description, or of an
    unknown task."""
    try:
        description = json.loads(info.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{info}: not a readable JSON description ({error})") from None
    if not isinstance(description, dict) or description.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(f'{info}: not a {WEIGHTS_FORMAT} description (no "format": "{WEIGHTS_FORMAT}")')
    if description.get("task") not in TASKS:
        raise CheckpointError(f"{info}: unknown task {description.get('task')!r}")
    for key, kind in (("model", str), ("num_classes", int), ("hyper_parameters", dict)):
        if not isinstance(description.get(key), kind) or isinstance(description.get(key), bool):
            raise CheckpointError(f"{info}: {key!r} is missing or not a {kind.__name__}")
    return description


def read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: weights not found")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a safetensors file ({error})") from None


def load_weights(path: str | Path, encoder: bool = False) -> nn.Module:
    """The model (not the LightningModule) described by a ``convert_checkpoint`` pair, with its weights, in eval
    mode: a timm classifier, a dense ``ClusterFormerSets``, or the encoder alone for a ``backbone_only`` file.
    ``encoder``: of a dense model's file, only its encoder (the timm model under ``backbone.``, without head)."""
    import timm

    import clusterformer  # noqa: F401  (registers the models with timm)

    description, weights = read_description(path)
    state = read_safetensors(weights)
    hparams = older_weights_settings(description["task"], description["hyper_parameters"], state)
    spec = TASK_SPECS[description["task"]]
    num_classes = description["num_classes"]
    if spec.dense and encoder and not description.get("backbone_only"):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        if not state:
            raise CheckpointError(f"{weights}: no encoder weights (no keys under 'backbone.')")
        num_classes = 0
    if not spec.dense or description.get("backbone_only") or encoder:
        options = rebuild_kwargs(hparams).get(spec.encoder_options) or {}
        try:
            model = timm.create_model(description["model"], num_classes=num_classes, **options)
        except (RuntimeError, ValueError, TypeError) as error:
            raise CheckpointError(f"{weights}: cannot build {description['model']!r} ({error})") from None
    else:
        model = build_task(description["task"], hparams, weights).model
    load_state(model, state, weights, description["model"])
    return model.eval()


def load_timm_weights(name: str, weights: str | Path, num_classes: int | None = None) -> nn.Module:
    """``timm.create_model(name, pretrained=True, num_classes=..., pretrained_cfg_overlay=dict(file=weights))``,
    strict: with the file's own head (``num_classes`` defaults to the rows of its ``head.weight``, 0 without)."""
    import timm

    import clusterformer  # noqa: F401

    path = Path(weights)
    state = read_safetensors(path)  # checks the file and gives the head size
    head = state.get("head.weight")
    found = int(head.shape[0]) if head is not None else 0
    num_classes = found if num_classes is None else num_classes
    if num_classes != found:
        raise CheckpointError(f"{path}: the weights have {found} classes, not --num-classes {num_classes}")
    # a classifier written before the head read the cluster centers (no head_norm): the token head
    options = (
        {"head": "tokens"} if found and "head_norm.weight" not in state and name.startswith("clusterformer") else {}
    )
    try:
        model = timm.create_model(
            name, pretrained=True, num_classes=num_classes, pretrained_strict=True,
            pretrained_cfg_overlay=dict(file=str(path), num_classes=num_classes), **options,
        )  # fmt: skip
    except CheckpointError:  # the encoder does not fit (backbone.checkpoint_filter_fn): names the file already
        raise
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise CheckpointError(f"{path}: the weights do not fit {name} ({detail[:300]})") from None
    except Exception as error:  # unknown model name and the like, raised by timm
        raise CheckpointError(f"cannot build {name!r} with {path}: {error}") from None
    return model.eval()


# --- a task module for predictions ----------------------------------------------------------------------------------
@dataclass
class TaskModel:
    """A task module with what predictions need from its checkpoint.

    ``classes``: a name per label; ``categories``: COCO category dicts per label (``id``, ``name``, ``isthing``);
    ``data``: the data module's hyperparameters stored with the checkpoint (test sizes), ``{}`` if none."""

    task: str
    module: torch.nn.Module
    classes: list[str]
    categories: list[dict]
    data: dict = field(default_factory=dict)

    @property
    def colours(self):
        """An RGB colour per label (``pictures.class_colours``)."""
        from .pictures import class_colours

        return class_colours(len(self.classes), self.categories)


def load_task_model(
    task: str | None, checkpoint_path: str | Path, class_names: Sequence[str] | None = None
) -> TaskModel:
    """Rebuild the task module of a Lightning checkpoint (``weights.task_from_checkpoint``: weights only,
    never code), with its class names (``class_names`` overrides those stored in the checkpoint) and data
    settings. A checkpoint of another task than ``task`` (``None``: any) is an error."""
    from .tasks.dataset_info import CATEGORIES_KEY, CLASSES_KEY

    path = Path(checkpoint_path)
    checkpoint = load_checkpoint(path)  # names and data settings; the task is checked before building the model
    found = checkpoint_task(checkpoint, path)
    if task is not None and found != task:
        raise CheckpointError(f"{path}: a {found} checkpoint, not {task} (use --task {found})")
    _, module = task_from_checkpoint(path, found)
    hparams = dict(module.hparams)
    if class_names is not None and len(class_names) != int(hparams["num_classes"]):
        raise CheckpointError(
            f"{len(class_names)} class names given but the checkpoint {path} has {hparams['num_classes']} classes"
        )
    names, categories = task_labels(hparams, class_names or checkpoint.get(CLASSES_KEY), checkpoint.get(CATEGORIES_KEY))
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    return TaskModel(found, module.eval(), names, categories, dict(data))


def task_labels(
    hparams: dict, classes: Sequence[str] | None = None, categories: Sequence[dict] | None = None
) -> tuple[list[str], list[dict]]:
    """``(names, categories)``: a name and a COCO category dict per label of a task with ``hparams``. The stored
    ``categories`` when there is one per class, else ids ``label + 1`` (the first ``num_things`` labels things);
    the names from ``classes``, else from the categories, else ``class 0``, ``class 1``, ..."""
    num_classes = int(hparams["num_classes"])
    stored = categories or []
    categories = [dict(c) for c in stored] if len(stored) == num_classes else []
    names = list(classes or [c.get("name") for c in categories])
    if len(names) != num_classes or not all(names):
        names = [f"class {i}" for i in range(num_classes)]
    if not categories:  # COCO category ids: label + 1
        things = hparams.get("num_things", num_classes)
        categories = [{"id": i + 1, "name": names[i], "isthing": int(i < things)} for i in range(num_classes)]
    return names, categories
