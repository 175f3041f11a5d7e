"""The tasks, in one place: for each task name, its LightningModule, data module, ``predict`` writer and metrics.

:data:`TASKS` maps ``classification``, ``detection``, ``instance``, ``semantic`` and ``panoptic`` to a
:class:`TaskSpec`. The commands read it instead of listing the tasks themselves: ``weights`` (rebuilding a
checkpoint's module, converting weights), ``predict`` (``--task`` choices, the writer of each task), ``explain``,
``ablate``, ``demo`` and ``cli`` (which task a config trains). Classes are named by their import path and imported
only when asked for (:meth:`TaskSpec.module_class` and the like), so this module imports nothing heavy and every
module may import it. Adding a task: ``docs/architecture.md``, "Adding a task".
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["TASKS", "TaskSpec", "load_class", "task_of_class_name"]


def load_class(path: str) -> type:
    """The class at ``path`` (``"package.module.Class"``)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class TaskSpec:
    """What makes up one task.

    Attributes:
        name: the task's name, as ``--task`` and checkpoints (``clusterformer_task``) write it.
        title: what the task is called in text (the demo's stages).
        module: import path of its LightningModule, as a config's ``model.class_path`` writes it.
        data: import path of its LightningDataModule (``data.class_path``).
        writer: import path of its ``clusterformer predict`` writer (a ``commands.predict.Writer``).
        metrics: the validation metrics its module logs (``val/...``; a classifier of fewer than five classes logs
            ``val/topK``, K its number of classes, in place of ``val/top5``).
        monitor: the metric of ``metrics`` that a best checkpoint follows (the paper configs' ``ModelCheckpoint``),
            better when higher (``mode="max"``) or lower (``"min"``).
        dense: an encoder with a decoder: the task model's encoder is ``model.backbone``, named by the ``backbone``
            argument and built with ``backbone_kwargs``; otherwise the model is the timm encoder itself, with its
            head (``model``, ``model_kwargs``).
        task_argument: the module class serves several tasks and takes the task's name as its ``task`` argument
            (``SetTask``: detection and instance segmentation).
        signature_key: an argument that only this task's module takes (its constructor takes every other one too):
            recognises checkpoints written before tasks recorded their name. ``None``: the task whose module takes
            exactly the hyperparameters, tried last.
    """

    name: str
    title: str
    module: str
    data: str
    writer: str
    metrics: tuple[str, ...]
    monitor: str
    mode: str = "max"
    dense: bool = True
    task_argument: bool = False
    signature_key: str | None = None

    @property
    def module_class(self) -> type:
        return load_class(self.module)

    @property
    def data_class(self) -> type:
        return load_class(self.data)

    @property
    def writer_class(self) -> type:
        return load_class(self.writer)

    @property
    def class_name(self) -> str:
        """The module class's name (LightningCLI records it in the hyperparameters as ``_class_path``)."""
        return self.module.rpartition(".")[2]

    @property
    def model_key(self) -> str:
        """The module's argument that names the timm model of the encoder."""
        return "backbone" if self.dense else "model"

    @property
    def encoder_options(self) -> str:
        """The module's argument that holds the encoder's ``timm.create_model`` options."""
        return "backbone_kwargs" if self.dense else "model_kwargs"

    def resolve(self, task: str | None) -> str:
        """The task of a module of this spec's class whose ``task`` argument is ``task`` (a class that serves one
        task: this spec's)."""
        return (task or self.name) if self.task_argument else self.name


def _coco(kind: str) -> tuple[str, ...]:
    return tuple(f"val/{kind}_{key}" for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"))


_PQ = tuple(f"val/{key}{group}" for group in ("", "_th", "_st") for key in ("PQ", "SQ", "RQ"))

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "classification", "classification", "clusterformer.tasks.ClassificationTask",
            "clusterformer.tasks.ImageFolderData", "clusterformer.commands.predict.ClassificationWriter",
            ("val/top1", "val/top5", "val/loss"), "val/top1", dense=False, signature_key="model",
        ),
        TaskSpec(
            "detection", "object detection", "clusterformer.tasks.SetTask", "clusterformer.tasks.CocoData",
            "clusterformer.commands.predict.SetWriter", _coco("bbox"), "val/bbox_AP", task_argument=True,
            signature_key="task",
        ),
        TaskSpec(
            "instance", "instance segmentation", "clusterformer.tasks.SetTask", "clusterformer.tasks.CocoData",
            "clusterformer.commands.predict.SetWriter", _coco("segm") + _coco("bbox"), "val/segm_AP",
            task_argument=True, signature_key="task",
        ),
        TaskSpec(
            "semantic", "semantic segmentation", "clusterformer.tasks.SemanticTask", "clusterformer.tasks.SemanticData",
            "clusterformer.commands.predict.SemanticWriter", ("val/mIoU", "val/mAcc", "val/aAcc"), "val/mIoU",
        ),
        TaskSpec(
            "panoptic", "panoptic segmentation", "clusterformer.tasks.PanopticTask", "clusterformer.tasks.PanopticData",
            "clusterformer.commands.predict.PanopticWriter", (*_PQ, "val/mIoU_pan", "val/mAP_pan_th"), "val/PQ",
            signature_key="num_things",
        ),
    )
}  # fmt: skip


def task_of_class_name(class_name: str, task: str | None = None) -> str | None:
    """The task of a module whose class is called ``class_name`` (``task``: its ``task`` argument, for a class that
    serves several tasks); ``None`` for a class that is none of the tasks'."""
    for spec in TASKS.values():
        if spec.class_name == class_name:
            return spec.resolve(task)
    return None
