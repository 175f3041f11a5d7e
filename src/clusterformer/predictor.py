"""Predictions of a trained task checkpoint on images, from Python: the counterpart of detectron2's
``DefaultPredictor`` and of transformers' pipelines, and the code path of ``clusterformer predict``.

    >>> from clusterformer import Predictor
    >>> predictor = Predictor.from_checkpoint("instance.ckpt")       # any task; device="cuda", precision="bf16"
    >>> result = predictor("street.jpg")                             # a path, a PIL image or an (H, W, 3) uint8 array
    >>> result.boxes, result.names, result.scores, result.masks      # in the image's own pixels
    >>> result.draw().save("street_pred.png"); result.to_coco(image_id=1)

One image gives one result, a list gives a list (:mod:`clusterformer.results`: the result types). Images go through
the test transform of the data the checkpoint was trained with (classification: resize and centre crop; dense
tasks: the shorter side resized), in batches of ``batch_size`` padded to a common size, under
``torch.inference_mode`` and, for ``precision="bf16"`` / ``"fp16"``, autocast on the device. See
``docs/predict_explain.md``, "Python predictor".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.images import load_rgb, to_rgb
from .registry import TASKS
from .results import DEFAULT_SCORE_THRESHOLD, ClassInfo, Result, classification_result, computed_size, dense_result
from .weights import CheckpointError, TaskModel, load_task_model

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ImageInput = str | Path | Image.Image | np.ndarray


class ImageInputError(ValueError):
    """An image given to a :class:`Predictor` that it cannot use; the message names the image and the problem."""


def as_image(image: ImageInput, what: str = "image") -> Image.Image:
    """An input image as 8-bit RGB PIL: a path (read with ``data.images.load_rgb``: a missing or unreadable file is
    an ``ImageReadError`` naming it), a PIL image of any mode, or a numpy uint8 array ``(H, W, 3)`` RGB, ``(H, W)``
    grayscale, ``(H, W, 4)`` RGBA (alpha dropped) or ``(H, W, 1)``. Anything else is an :class:`ImageInputError`
    naming ``what`` and the problem."""
    if isinstance(image, str | Path):
        return load_rgb(image)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ImageInputError(
                f"{what}: a numpy image must be uint8 (0-255), got dtype {image.dtype}; for floats in [0, 1] pass "
                "(image * 255).round().astype(np.uint8)"
            )
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
            channels_first = image.ndim == 3 and image.shape[0] in (1, 3, 4)
            hint = " (channels first? pass image.transpose(1, 2, 0))" if channels_first else ""
            raise ImageInputError(
                f"{what}: a numpy image must be (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grayscale, got shape "
                f"{tuple(image.shape)}{hint}"
            )
        if 0 in image.shape[:2]:
            raise ImageInputError(f"{what}: an empty image (shape {tuple(image.shape)})")
        return to_rgb(Image.fromarray(np.ascontiguousarray(image)))
    raise ImageInputError(
        f"{what}: expected a file path, a PIL image or a numpy uint8 array, got {type(image).__module__}."
        f"{type(image).__qualname__}"
    )


def eval_transform(model: TaskModel, size: int | None = None):
    """The test transform of the checkpoint's data (``size`` overrides the classification crop or the dense
    shorter side): classification resize + centre crop; dense tasks resize of the shorter side."""
    from .data import transforms

    if not TASKS[model.task].dense:
        cfg = getattr(getattr(model.module, "model", None), "pretrained_cfg", None) or {}
        crop = size or model.data.get("img_size") or cfg.get("input_size", (3, 224, 224))[-1]
        resize = None if size else model.data.get("eval_resize")
        return transforms.classification_eval(crop, resize, interpolation=model.data.get("interpolation", "bicubic"))
    shorter = size or model.data.get("test_shorter_side") or 800
    longest = model.data.get("test_max_size") or 1333
    return transforms.dense_eval(shorter, max(longest, int(shorter * 5 / 3)) if size else longest)


def image_tensor(image: Image.Image, transform) -> torch.Tensor:
    """``(3, h, w)`` float: an RGB PIL image through a dense test ``transform`` (``transforms.dense_eval``)."""
    from torchvision import tv_tensors
    from torchvision.transforms.v2.functional import pil_to_tensor

    return transform(tv_tensors.Image(pil_to_tensor(image))).as_subclass(torch.Tensor)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


class Predictor:
    """A task model ready to predict images (:meth:`__call__`).

    Args:
        model: a task module with its classes and data settings (``weights.load_task_model``), or use
            :meth:`from_checkpoint`.
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``).
        precision: ``"fp32"``, or ``"bf16"`` / ``"fp16"``: the forward pass under ``torch.autocast`` on ``device``
            (the weights stay float32; the post-processing computes in float32).
        score_threshold: detection / instance: the objects kept (default :data:`DEFAULT_SCORE_THRESHOLD`, 0.5; 0
            keeps the model's top 100, what COCO AP needs); panoptic: the mask-wise merging's score threshold
            (default: the checkpoint's); not used by the other tasks.
        top_k: classification: the classes per image (default 5).
        size: the model input: classification crop, dense shorter side (default: the checkpoint's test size).
        batch_size: images per forward pass (default 1: padding to a common size changes the global clustering of
            the smaller images slightly).
    """

    def __init__(
        self,
        model: TaskModel,
        *,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        score_threshold: float | None = None,
        top_k: int = 5,
        size: int | None = None,
        batch_size: int = 1,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        if top_k < 1 or batch_size < 1 or (size is not None and size < 1):
            raise ValueError(f"top_k, batch_size and size must be at least 1, got {top_k}, {batch_size}, {size}")
        self.model = model
        self.precision = precision
        self.top_k, self.size, self.batch_size = top_k, size, batch_size
        try:
            self.device = torch.device(device)
            model.module.to(self.device).eval()
        except (RuntimeError, AssertionError) as error:  # no such device, CUDA not compiled in, ...
            raise ValueError(f"device {str(device)!r} cannot be used: {error}") from None
        self.score_threshold = score_threshold
        if model.task == "panoptic" and score_threshold is not None:  # the mask-wise merging's threshold
            model.module.hparams.score_threshold = score_threshold
        self.transform = eval_transform(model, size)
        self.class_info = ClassInfo(list(model.classes), list(model.categories))

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        task: str | None = None,
        class_names: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        **options,
    ) -> Predictor:
        """A predictor of the Lightning checkpoint at ``path`` (read weights-only: a checkpoint never runs code), or
        of a folder that ``save_pretrained`` wrote (``hub.from_pretrained``: ``config.json`` + ``model.safetensors``).
        ``task``: the task expected (``None``: the checkpoint's; another is a ``CheckpointError``);
        ``class_names``: names in label order, replacing the stored ones; ``options``: :class:`Predictor`'s."""
        if Path(path).is_dir():
            from .hub import from_pretrained

            model = from_pretrained(path)
            if task is not None and model.task != task:
                raise CheckpointError(f"{path}: a {model.task} model, not {task} (use --task {model.task})")
            if class_names is not None:
                if len(class_names) != len(model.classes):
                    raise CheckpointError(
                        f"{len(class_names)} class names given but the model in {path} has {len(model.classes)} classes"
                    )
                model.classes = list(class_names)
        else:
            model = load_task_model(task, path, class_names)
        return cls(model, device=device, precision=precision, **options)

    from_pretrained = from_checkpoint  # the same: a checkpoint file or a save_pretrained folder

    @property
    def task(self) -> str:
        """``classification``, ``detection``, ``instance``, ``semantic`` or ``panoptic``."""
        return self.model.task

    @property
    def classes(self) -> list[str]:
        """A class name per label."""
        return self.class_info.names

    @property
    def categories(self) -> list[dict]:
        """The COCO category of each label (``id``, ``name``, ``isthing``): the ``category_id`` of ``to_coco``."""
        return self.class_info.categories

    def __repr__(self) -> str:
        return (f"Predictor(task={self.task!r}, classes={len(self.classes)}, device={str(self.device)!r}, "
                f"precision={self.precision!r})")  # fmt: skip

    def __call__(
        self, images: ImageInput | Sequence[ImageInput], *, batch_size: int | None = None, progress: bool = False
    ) -> Result | list[Result]:
        """Predict one image (returns its result) or a list of images (returns a list of results, in order).

        An image is a path, a PIL image (any mode) or a numpy uint8 array (:func:`as_image`). Images are read and
        predicted ``batch_size`` at a time (default the predictor's); ``progress``: a progress bar on standard
        error when it is a terminal."""
        single = not isinstance(images, list | tuple)
        inputs = [images] if single else list(images)
        batch_size = batch_size or self.batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        from .progress import terminal_bar

        results = []
        bar = terminal_bar(len(inputs), f"predict {self.task}", enabled=progress)
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            names = ["image"] if single else [f"image {start + i} of the list" for i in range(len(chunk))]
            results += self.predict_images([as_image(image, name) for image, name in zip(chunk, names, strict=True)])
            bar.update(len(chunk))
        bar.close()
        return results[0] if single else results

    @torch.inference_mode()
    def predict_images(self, images: Sequence[Image.Image]) -> list[Result]:
        """The results of RGB PIL images, as one batch (padded to a common size for the dense tasks).

        The dense tasks' post-processing runs at the model's input size when the image is larger (the test
        transform shrank it; ``results.computed_size``), and the result is enlarged to the image's size by nearest
        neighbour: no query's mask is ever resized to a large image."""
        from .data.collate import pad_batch

        if not images:
            return []
        autocast = torch.autocast(self.device.type, dtype=PRECISIONS[self.precision] or torch.float32,
                                  enabled=self.precision != "fp32")  # fmt: skip
        if not TASKS[self.task].dense:
            batch = torch.stack([self.transform(image) for image in images]).to(self.device)
            with autocast:
                logits = self.model.module(batch)
            probabilities = logits.float().softmax(-1).cpu()
            return [classification_result(p, image, self.class_info, self.top_k)
                    for p, image in zip(probabilities, images, strict=True)]  # fmt: skip
        tensors = [image_tensor(image, self.transform) for image in images]
        sizes = [computed_size(self.task, t, (image.height, image.width)) for t, image in zip(tensors, images,
                                                                                              strict=True)]  # fmt: skip
        targets = [{"size": tuple(t.shape[-2:]), "orig_size": size} for t, size in zip(tensors, sizes, strict=True)]
        with autocast:
            outputs = self.model.module.predict_batch(pad_batch(tensors).to(self.device), targets)
        threshold = DEFAULT_SCORE_THRESHOLD if self.score_threshold is None else self.score_threshold
        reduce_zero_label = bool(self.model.data.get("reduce_zero_label", True))
        return [
            dense_result(self.task, _to_cpu(output), size, image, self.class_info, threshold, reduce_zero_label)
            for output, size, image in zip(outputs, sizes, images, strict=True)
        ]
