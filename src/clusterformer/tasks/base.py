"""What the Lightning tasks share.

``BaseTask``: the base of every task, classification included. The subclass's constructor checks its
settings, saves its hyperparameters and calls ``build()``, which makes ``model``, ``criterion`` and ``metrics``
from the subclass's ``build_model``, ``build_criterion`` and ``build_metrics``; ``setup`` checks the data module
against the model (``check_data``: its number of classes) and builds the metrics again with it (the COCO
categories, the annotation file of the evaluation); AdamW over the subclass's ``param_groups`` with its per-step
``lr_schedule``; the checkpoint extras (RNG states, the task name, the class names, the last validation metrics);
``save_pretrained`` / ``from_pretrained`` (Hugging Face-style folders, ``clusterformer.hub``); the ``compile``
setting of every task (``compile_options``: ``torch.compile`` of the network when training starts). The checks of
the settings (``check_task_settings``, ``check_loader_settings``, ``check_model_name``, ``compile_options``) and of
the data (``check_num_classes``) raise :class:`~clusterformer.errors.SettingError`.

For the dense tasks (detection / instance, semantic, panoptic): ``DenseData``, the data loaders (shuffled,
``drop_last`` training batches; the subclass gives the dataset and the collate function); ``DenseTask``, the
forward pass, the training step (the criterion's weighted total, a stop on a non-finite loss, loss logging), the
validation / test / predict hooks around the subclass's ``_evaluate(batch, split)`` (post-process, update the
metrics) and ``_score(split)`` (log the metrics; they are reset after it), and the four AdamW groups with the
step schedule.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable
from numbers import Integral, Real
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import SettingError
from .dataset_info import load_dataset_info, save_dataset_info
from .rng import restore_rng_states, rng_states


def check_task_settings(lr: float, num_classes: int) -> None:
    """A :class:`SettingError` of the model's section for a learning rate that is not a positive number or fewer
    than one class: the optimizer would refuse the first, mid-way into ``fit``."""
    if not (isinstance(lr, Real) and 0 < lr < float("inf")):
        raise SettingError("lr", f"must be a positive number, got {lr!r}", "model")
    if not (isinstance(num_classes, Integral) and num_classes >= 1):
        raise SettingError("num_classes", f"must be at least 1, got {num_classes!r}", "model")


def check_model_name(key: str, name: str) -> None:
    """A :class:`SettingError` of the model's section when timm has no model ``name`` (``key``: ``model`` or
    ``backbone``); Hugging Face Hub and local-folder names (``hf-hub:...``, ``local-dir:...``) are not checked."""
    import timm

    if not isinstance(name, str) or not (timm.is_model(name) or name.startswith(("hf-hub:", "hf_hub:", "local-dir:"))):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=3, cutoff=0.8)
        hint = f"; did you mean {' or '.join(close)}?" if close else "; see timm.list_models()"
        raise SettingError(key, f"no model named {name!r}{hint}", "model")


# the keyword arguments of torch.compile that a task's ``compile`` setting may give
COMPILE_KEYS = ("backend", "mode", "fullgraph", "dynamic", "options")


def compile_options(value) -> dict | None:
    """The keyword arguments of ``torch.compile`` that a task's ``compile`` setting asks for: ``None`` (off) for
    ``False`` or ``None``; ``{}`` (``torch.compile``'s defaults: inductor) for ``True``; for a mapping, its entries,
    whose keys are among :data:`COMPILE_KEYS` (``{backend: aot_eager}``, ``{mode: max-autotune}``, ...). Anything
    else, or another key, is a :class:`SettingError` of the model's section."""
    from collections.abc import Mapping

    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        raise SettingError(
            "compile", f"must be true, false or a dict of torch.compile's options, got {value!r}", "model"
        )  # fmt: skip
    unknown = [str(key) for key in value if key not in COMPILE_KEYS]
    if unknown:
        raise SettingError(
            "compile", f"unknown option {', '.join(map(repr, unknown))}; the options are {', '.join(COMPILE_KEYS)}",
            "model",
        )  # fmt: skip
    return dict(value)


def check_loader_settings(batch_size: int, num_workers: int) -> None:
    """A :class:`SettingError` of the data's section for a batch size below 1 or a negative number of workers."""
    if not (isinstance(batch_size, Integral) and batch_size >= 1):
        raise SettingError("batch_size", f"must be at least 1, got {batch_size!r}", "data")
    if not (isinstance(num_workers, Integral) and num_workers >= 0):
        raise SettingError("num_workers", f"must be 0 or more, got {num_workers!r}", "data")


def check_num_classes(module: L.LightningModule, data, class_word: str = "categories") -> None:
    """A :class:`SettingError` (``num_classes``) when ``data`` (a data module with ``num_classes`` and
    ``describe()``; anything else is not checked) has another number of classes than ``module``."""
    found = getattr(data, "num_classes", None)
    expected = module.hparams.num_classes
    if found is None or found == expected:
        return
    names = list(getattr(data, "classes", None) or [])
    listed = f" ({', '.join(map(str, names[:10]))}{', ...' if len(names) > 10 else ''})" if names else ""
    problem = f"{expected}, but the dataset {data.describe()} has {found} {class_word}{listed}; set it to {found}"
    raise SettingError("num_classes", problem, "model")


def make_loader(
    dataset: Dataset, batch_size: int, num_workers: int, train: bool, collate_fn: Callable | None = None
) -> DataLoader:
    """Training: shuffled, the last partial batch dropped (when there is more than one batch); evaluation:
    in order, every sample. Workers persist between epochs."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) > batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=collate_fn,
    )


# HCFormer's weight of the regularisation of its clustering temperatures (its training loss: L_mask + λ_cls L_cls +
# λ_reg Σ|s|, λ_reg = 0.1), for the tasks whose pixel path is HCFormer's
HCFORMER_REG_WEIGHT = 0.1


class DenseData(L.LightningDataModule):
    """Loaders over ``_dataset(train)`` with ``_collate(train)``; ``hparams.batch_size`` and ``num_workers``
    (checked by the subclass's constructor: ``check_loader_settings``)."""

    def _dataset(self, train: bool) -> Dataset:
        raise NotImplementedError

    def _collate(self, train: bool) -> Callable:
        raise NotImplementedError

    def _loader(self, train: bool) -> DataLoader:
        h = self.hparams
        return make_loader(self._dataset(train), h.batch_size, h.num_workers, train, self._collate(train))

    def train_dataloader(self) -> DataLoader:
        return self._loader(train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(train=False)


def step_decay(step: int, warmup_steps: int, total_steps: int, milestones: tuple[float, ...]) -> float:
    """Learning-rate factor: linear warm-up, then x0.1 at each milestone (fractions of the run)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.1 ** sum(step >= m * total_steps for m in milestones)


def check_finite(module: L.LightningModule, loss: torch.Tensor) -> None:
    """Stop with a message naming the step and epoch when the training loss is NaN or infinite."""
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"training loss is {loss.item()} at step {module.global_step} (epoch {module.current_epoch}); "
            "stopping. Resume from the last checkpoint with a lower learning rate or with gradient clipping."
        )


METRICS_KEY = "clusterformer_metrics"  # the last validation metrics, in the task checkpoints


def validation_metrics(module: L.LightningModule) -> dict[str, float]:
    """The validation metrics (``val/...``) that ``module`` logged last, as floats; ``{}`` without a trainer."""
    if module._trainer is None:
        return {}
    metrics = module.trainer.callback_metrics
    return {name: float(value) for name, value in sorted(metrics.items()) if name.startswith("val/")}


class BaseTask(L.LightningModule, ABC):
    """Base of the Lightning tasks: ``model``, ``criterion`` and ``metrics`` from the subclass's builders, the
    class-count check of the data, AdamW with a per-step schedule, and the checkpoint extras.

    The subclass sets ``task_name`` (what ``weights.task_from_checkpoint`` reads back) and, for the mismatch
    error, ``class_word`` (what its dataset calls its classes); its constructor calls ``build()`` after
    ``save_hyperparameters()``, so that the builders read ``self.hparams``, and takes the ``compile`` setting
    (checked with :func:`compile_options`; :meth:`compile_model` applies it when ``fit`` starts).
    """

    #: the task's name in its checkpoints (``clusterformer_task``)
    task_name: str
    #: what the dataset calls its classes, for the mismatch error
    class_word = "categories"

    def build(self) -> None:
        """Make ``self.model``, ``self.criterion`` and ``self.metrics`` (without a data module)."""
        self.model = self.build_model()
        self.criterion = self.build_criterion()
        self.metrics = self.build_metrics(None)

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The network, from the hyperparameters."""

    @abstractmethod
    def build_criterion(self) -> nn.Module:
        """The training loss, from the hyperparameters."""

    @abstractmethod
    def build_metrics(self, data: L.LightningDataModule | None):
        """The evaluation's metrics (modules follow the task to its device; their states are not saved). ``data``:
        the data module of the run (``setup``), ``None`` in the constructor and without one."""

    @abstractmethod
    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups (``params``, ``weight_decay``, and ``lr`` where it differs)."""

    @abstractmethod
    def lr_schedule(self, total_steps: int) -> Callable[[int], float]:
        """The learning-rate factor of each optimizer step, for a run of ``total_steps`` steps."""

    def forward(self, images: torch.Tensor):
        return self.model(images)

    def _datamodule(self):
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def check_data(self, data) -> None:
        """A :class:`SettingError` when the data module ``data`` does not fit the model (its number of classes);
        the ``clusterformer`` command calls it before it runs anything, ``setup`` for every other caller."""
        check_num_classes(self, data, self.class_word)

    def setup(self, stage: str) -> None:
        data = self._datamodule()
        self.check_data(data)
        self.metrics = self.build_metrics(data)  # before Lightning moves the task to its device

    def on_fit_start(self) -> None:
        self.compile_model()

    def compile_model(self) -> bool:
        """Compile the network (``self.model``) with ``torch.compile`` and the options of the ``compile`` setting
        (:func:`compile_options`), unless it is off or the network is compiled already; whether it is compiled.
        ``fit`` calls it when training starts (``on_fit_start``, before the sanity check); evaluation, prediction
        and export run a loaded checkpoint in eager mode. The compilation is ``nn.Module.compile``, in place: the
        task's state dict, and so its checkpoints, keep the plain module's keys (no ``_orig_mod.``)."""
        options = compile_options(self.hparams.get("compile"))
        if options is None:
            return False
        if getattr(self.model, "_compiled_call_impl", None) is None:
            self.model.compile(**options)
        return True

    # --- optimisation and checkpoints -------------------------------------------------------------
    def optimizer_options(self) -> dict:
        """Keyword arguments of AdamW besides the groups and ``lr`` (none: PyTorch's defaults)."""
        return {}

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.param_groups(), lr=self.hparams.lr, **self.optimizer_options())
        factor = self.lr_schedule(max(1, int(self.trainer.estimated_stepping_batches)))
        # a lambda, not a callable object, so that the scheduler's state_dict stores no schedule
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """RNG states (exact resume), the task name (``weights.task_from_checkpoint``), the class names
        (``clusterformer predict``) and the last validation metrics (the model card of ``save_pretrained``).

        A task built in Python (the demo, a notebook) also gets the ``_class_path`` that LightningCLI records for the
        tasks it builds: ``validate``/``test``/``predict --ckpt_path`` read the checkpoint's hyperparameters as the
        task's ``init_args`` only with it, and stop with ``not an option of LightningModule`` without."""
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict) and "_class_path" not in hparams:
            hparams["_class_path"] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["rng_states"] = rng_states()
        checkpoint["clusterformer_task"] = self.task_name
        save_dataset_info(self, checkpoint)
        metrics = validation_metrics(self)
        if metrics:
            checkpoint[METRICS_KEY] = metrics

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        load_dataset_info(self, checkpoint)
        if "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])

    # --- Hugging Face-style folders -----------------------------------------------------------------
    def save_pretrained(
        self,
        folder: str | Path,
        *,
        metrics: dict | None = None,
        command: str | None = None,
        training_data: str | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write the task's model as a folder of ``config.json``, ``model.safetensors`` and a model card
        ``README.md`` (:func:`clusterformer.hub.save_pretrained`); :meth:`from_pretrained` reads it back."""
        from ..hub import save_pretrained

        return save_pretrained(
            self, folder, metrics=metrics, command=command, training_data=training_data, overwrite=overwrite
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> BaseTask:
        """The task module of a folder written by :meth:`save_pretrained`, in eval mode, with its class names
        (:func:`clusterformer.hub.from_pretrained` returns them with the data settings). A folder of another
        task's model is a :class:`~clusterformer.weights.CheckpointError`."""
        from ..hub import from_pretrained
        from ..weights import CheckpointError

        loaded = from_pretrained(folder)
        if not isinstance(loaded.module, cls):
            raise CheckpointError(f"{folder}: holds a {loaded.task} model, not a {cls.__name__}")
        return loaded.module


class DenseTask(BaseTask):
    """Base of the dense Lightning tasks: the subclass builds a criterion with ``weighted_total`` and
    implements ``predict_batch(images, targets)``, ``_evaluate(batch, split)`` and ``_score(split)``."""

    def training_loss(self, images: torch.Tensor, targets: list[dict]) -> tuple[torch.Tensor, dict]:
        """The weighted training loss of a batch and its named terms (a model with denoising queries builds them
        from the targets); what ``training_step`` optimises, and the learning-speed comparison too."""
        outputs = self.model(images, targets) if getattr(self.model, "denoiser", None) is not None else self(images)
        losses = self.criterion(outputs, targets)
        total = self.criterion.weighted_total(losses)
        pixel_path = getattr(getattr(self.model, "decoder", None), "pixel_decoder", None)
        if hasattr(pixel_path, "regularization"):  # HCFormer's L_reg = sum |s| of its temperatures, weight 0.1
            losses["loss_reg"] = pixel_path.regularization()
            total = total + HCFORMER_REG_WEIGHT * losses["loss_reg"]
        return total, losses

    def training_step(self, batch, batch_idx):
        images, targets = batch
        loss, losses = self.training_loss(images, targets)
        check_finite(self, loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(targets))
        for name, value in losses.items():
            if not name[-1].isdigit():  # the final layer's terms (aux layers end in _0, _1, ...)
                self.log(f"train/{name}", value, batch_size=len(targets))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=len(targets))
        return loss

    # --- evaluation hooks -------------------------------------------------------------------------
    def predict_batch(self, images: torch.Tensor, targets: list[dict]):
        raise NotImplementedError

    def _evaluate(self, batch, split: str) -> None:
        raise NotImplementedError

    def _score(self, split: str) -> None:
        raise NotImplementedError

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:  # the sanity check's batches are not scored
            self._score("val")
        self.metrics.reset()

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._score("test")
        self.metrics.reset()

    def predict_step(self, batch, batch_idx):
        images, targets = batch
        return self.predict_batch(images, targets)

    # --- optimisation -----------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Four groups over ``self.model`` — backbone or not, decayed or not (no decay on norms, biases and the
        backbone's ``no_weight_decay()``) — the backbone at ``lr * backbone_lr_mult``; reads ``lr``,
        ``backbone_lr_mult`` and ``weight_decay`` from the hyperparameters."""
        h = self.hparams
        model = self.model
        backbone_no_decay = {f"backbone.{n}" for n in getattr(model.backbone, "no_weight_decay", set)()}
        groups = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            is_backbone = name.startswith("backbone.")
            decay = not (param.ndim <= 1 or name.endswith(".bias") or name in backbone_no_decay)
            key = (is_backbone, decay)
            if key not in groups:
                lr = h.lr * (h.backbone_lr_mult if is_backbone else 1.0)
                groups[key] = {"params": [], "lr": lr, "weight_decay": h.weight_decay if decay else 0.0}
            groups[key]["params"].append(param)
        return list(groups.values())

    def lr_schedule(self, total_steps: int) -> Callable[[int], float]:
        """``step_decay`` with ``warmup_steps`` and ``lr_milestones`` from the hyperparameters."""
        h = self.hparams
        return lambda step: step_decay(step, h.warmup_steps, total_steps, tuple(h.lr_milestones))
