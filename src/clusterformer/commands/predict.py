"""``clusterformer predict --task T --ckpt CKPT IMAGES_OR_FOLDERS... --out OUT``: run a trained task checkpoint
on image files and write a picture of every prediction and the standard result files.

``OUT`` receives (every file written under a temporary name and renamed when complete):

* every task: ``overlays/<name>.png``, the image with its prediction drawn on it (scaled down to
  :data:`MAX_OVERLAY_SIDE` pixels on the longer side for larger images), and ``summary.json`` (task,
  checkpoint, every image with its id and size, the skipped files with the reason);
* classification: ``predictions.json``, the top-k classes of every image;
* detection / instance: ``results.json``, COCO results (``image_id``, ``category_id``, ``score``, ``bbox``
  ``[x, y, w, h]`` and, for instance segmentation, ``segmentation`` as compressed RLE), and ``images.json``, a
  COCO file with the ``images`` and ``categories`` and no annotations (``COCO("images.json").loadRes(...)``);
* semantic: ``labels/<name>.png``, label maps at the image's size, in the checkpoint data's convention;
* panoptic: ``panoptic.json`` and ``panoptic/<name>.png``, the COCO panoptic format.

A non-empty ``OUT`` is refused unless ``overwrite`` (``--overwrite``), which first deletes the previous results
(:func:`all_outputs`, whatever the task that wrote them), so that no overlay of an earlier run stays beside the new
results; other files are kept. Details and decisions: ``docs/predict_explain.md``.

Each task has its :class:`Writer` (``registry.TASKS[task].writer``): it writes the task's files and draws its
overlays, and says where a dense result is computed and how it is brought to the image's size.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import pictures
from ..data.images import IMAGE_SUFFIXES, ImageReadError, load_rgb
from ..outputs import atomic_path, check_output_folder, remove_outputs, save_png, write_json
from ..registry import TASKS as TASK_SPECS
from ..weights import TaskModel, load_task_model

TASKS = tuple(TASK_SPECS)  # the task names
DEFAULT_SCORE_THRESHOLD = 0.5  # detection / instance overlays
MAX_OVERLAY_SIDE = 2048  # overlays of larger images are drawn on the image scaled down to this longer side
COMMON_OUTPUTS = ("overlays", "summary.json")  # what predict writes for every task


class PredictError(ValueError):
    """Bad input to ``predict``: the message names the file and the problem."""


# --- inputs ---------------------------------------------------------------------------------------------------
def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given and the image files (by suffix, not hidden, sorted) of the folders given; a path that
    does not exist, or a folder without images, is an error."""
    paths: list[Path] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.name[0] != "."
            )
            if not found:
                raise PredictError(f"{path}: no image files in this folder ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise PredictError(f"{path}: no such file or folder")
    return list(dict.fromkeys(paths))  # a file given twice is predicted once


def output_names(paths: Sequence[Path]) -> list[str]:
    """One output name per input: its stem, made unique with the suffix (``a_jpg``) or a count (``a_2``)."""
    names, used = [], set()
    for path in paths:
        name = path.stem
        if name in used:
            name = f"{path.stem}_{path.suffix.lstrip('.').lower()}"
        count = 2
        while name in used:
            name, count = f"{path.stem}_{count}", count + 1
        used.add(name)
        names.append(name)
    return names


def image_ids(paths: Sequence[Path], id_file: str | Path | None = None) -> list[int]:
    """COCO image ids of the inputs: from ``id_file`` (a COCO JSON; its ``images`` matched by file name) if
    given; else the file stems when they are all distinct integers (COCO's ``000000397133.jpg`` -> 397133);
    else 1, 2, ... in input order."""
    if id_file is not None:
        id_file = Path(id_file)
        try:
            data = json.loads(id_file.read_text())
            by_name = {Path(image["file_name"]).name: int(image["id"]) for image in data["images"]}
        except FileNotFoundError:
            raise PredictError(f"{id_file}: file not found") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise PredictError(f"{id_file}: not a COCO JSON with 'images' (file_name, id): {error!r}") from error
        missing = [path.name for path in paths if path.name not in by_name]
        if missing:
            more = f" ({len(missing)} inputs unlisted)" if len(missing) > 1 else ""
            raise PredictError(f"{id_file}: no image named {missing[0]}{more}")
        return [by_name[path.name] for path in paths]
    stems = [path.stem for path in paths]
    if all(stem.isascii() and stem.isdigit() for stem in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(stem) for stem in stems]
    return list(range(1, len(paths) + 1))


def read_class_names(path: str | Path) -> list[str]:
    """Class names, one per line in label order (blank lines ignored)."""
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as error:
        raise PredictError(f"{path}: cannot read the class names ({error.strerror or error})") from None
    if not names:
        raise PredictError(f"{path}: no class names (expected one name per line)")
    return names


def eval_transform(model: TaskModel, size: int | None = None):
    """The test transform of the checkpoint's data (``size`` overrides the classification crop or the dense
    shorter side): classification resize + centre crop; dense tasks resize of the shorter side."""
    from ..data import transforms

    if not TASK_SPECS[model.task].dense:
        cfg = getattr(getattr(model.module, "model", None), "pretrained_cfg", None) or {}
        crop = size or model.data.get("img_size") or cfg.get("input_size", (3, 224, 224))[-1]
        resize = None if size else model.data.get("eval_resize")
        return transforms.classification_eval(crop, resize, interpolation=model.data.get("interpolation", "bicubic"))
    shorter = size or model.data.get("test_shorter_side") or 800
    longest = model.data.get("test_max_size") or 1333
    return transforms.dense_eval(shorter, max(longest, int(shorter * 5 / 3)) if size else longest)


@torch.inference_mode()
def predict_images(model: TaskModel, images: Sequence[Image.Image], transform, device, top_k: int = 5) -> list:
    """Predictions for RGB images in their own pixels, on the CPU: classification ``{"scores", "labels"}`` of the
    top ``top_k``; otherwise what the task's ``predict_batch`` returns (``heads.postprocess``).

    The dense tasks' post-processing runs at the model's input size when the image is larger (the test transform
    shrank it; :func:`working_size`), and the result is enlarged to the image's size by nearest neighbour (the
    task writer's ``to_image_size``): no query's mask is ever resized to a large image. Images no larger than the
    model's input get exactly what they got before."""
    from torchvision import tv_tensors
    from torchvision.transforms.v2.functional import pil_to_tensor

    from ..data.collate import pad_batch

    spec = TASK_SPECS[model.task]
    if not spec.dense:
        batch = torch.stack([transform(image) for image in images]).to(device)
        probs = model.module(batch).float().softmax(-1).cpu()
        scores, labels = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        return [{"scores": s, "labels": label} for s, label in zip(scores, labels, strict=True)]
    tensors = [transform(tv_tensors.Image(pil_to_tensor(image))) for image in images]
    sizes = [(image.height, image.width) for image in images]
    writer = spec.writer_class
    targets = [
        {"size": tuple(t.shape[-2:]), "orig_size": writer.result_size(model, t, size)}
        for t, size in zip(tensors, sizes, strict=True)
    ]
    results = [_to_cpu(result) for result in model.module.predict_batch(pad_batch(tensors).to(device), targets)]
    return [
        result if tuple(target["orig_size"]) == size else writer.to_image_size(result, target["orig_size"], size)
        for result, target, size in zip(results, targets, sizes, strict=True)
    ]


def working_size(tensor: torch.Tensor, image_size: tuple[int, int]) -> tuple[int, int]:
    """Where a dense result is computed: the image's size, or the model input's where that is smaller."""
    return min(tensor.shape[-2], image_size[0]), min(tensor.shape[-1], image_size[1])


class NearestResize:
    """Nearest-neighbour resampling of ``(..., h, w)`` maps to ``output_size`` ``(H, W)``: output pixel ``(y, x)``
    takes input pixel ``(rows[y], cols[x])``, ``rows[y] = floor((y + 0.5) h / H)`` (torch's ``nearest-exact``).
    When enlarging, every input pixel becomes a block of output pixels, which gives the exact areas and boxes of
    the enlarged maps without making them (:meth:`areas`, :meth:`boxes`)."""

    def __init__(self, size: tuple[int, int], output_size: tuple[int, int]):
        self.size, self.output_size = (int(size[0]), int(size[1])), (int(output_size[0]), int(output_size[1]))
        self.rows, self.cols = (
            ((torch.arange(n, dtype=torch.float64) + 0.5) * (m / n)).long().clamp_(max=m - 1)
            for m, n in zip(self.size, self.output_size, strict=True)
        )

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        return values.index_select(-2, self.rows).index_select(-1, self.cols)

    def areas(self, ids: torch.Tensor, count: int) -> torch.Tensor:
        """``(count,)`` int64: the pixels of each id ``0..count-1`` of the ``(h, w)`` map ``ids`` once resampled."""
        rows = torch.bincount(self.rows, minlength=self.size[0])
        cols = torch.bincount(self.cols, minlength=self.size[1])
        weights = (rows[:, None] * cols[None, :]).flatten().double()
        return torch.bincount(ids.flatten().long(), weights=weights, minlength=count).round().long()

    def boxes(self, masks: torch.Tensor) -> torch.Tensor:
        """``(k, 4)`` xyxy: ``torchvision.ops.masks_to_boxes`` of the enlarged ``(k, h, w)`` masks (output size at
        least the input size); an empty mask's box is zeros, as there."""
        from torchvision.ops import masks_to_boxes

        if not len(masks):
            return torch.zeros(0, 4)
        x0, y0, x1, y1 = masks_to_boxes(masks).long().unbind(1)
        (h, w), cols, rows = self.size, self.cols, self.rows
        first_col, last_col = (
            torch.searchsorted(cols, torch.arange(w)),
            torch.searchsorted(cols, torch.arange(w), right=True) - 1,
        )
        first_row, last_row = (
            torch.searchsorted(rows, torch.arange(h)),
            torch.searchsorted(rows, torch.arange(h), right=True) - 1,
        )
        boxes = torch.stack([first_col[x0], first_row[y0], last_col[x1], last_row[y1]], 1).float()
        boxes[~masks.flatten(1).any(1)] = 0
        return boxes


class ResizedMasks:
    """``(k, h, w)`` bool masks read as ``(k, H, W)`` one mask at a time (``masks[i]``, resampled by ``resize``), so
    that the masks at a large image's size are never all in memory."""

    def __init__(self, masks: torch.Tensor, resize: NearestResize):
        self.masks, self.resize = masks, resize

    def __len__(self) -> int:
        return len(self.masks)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.masks), *self.resize.output_size)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.resize(self.masks[index])

    def resized(self, size: tuple[int, int]) -> ResizedMasks:
        return ResizedMasks(self.masks, NearestResize(self.masks.shape[-2:], size))


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


# --- writers: one per task --------------------------------------------------------------------------------------
@dataclass
class Item:
    path: Path
    name: str
    image_id: int


class Writer:
    """Writes one image's outputs as it comes (``add``) and the files over all images at the end (``finish``).

    ``outputs``: the files and folders it writes into the output folder besides ``overlays/`` and ``summary.json``
    (what ``--overwrite`` deletes). A dense task's writer also says where the post-processing runs
    (:meth:`result_size`) and brings its result from there to the image's size (:meth:`to_image_size`)."""

    outputs: tuple[str, ...] = ()

    @classmethod
    def result_size(cls, model: TaskModel, tensor: torch.Tensor, image_size: tuple[int, int]) -> tuple[int, int]:
        """The size at which the dense result of an image of ``image_size`` (``tensor``: the model's input) is
        computed: :func:`working_size`."""
        return working_size(tensor, image_size)

    @classmethod
    def to_image_size(cls, result, size: tuple[int, int], image_size: tuple[int, int]):
        """A dense ``result`` computed at ``size`` at the larger ``image_size``."""
        return result

    def __init__(self, out: Path, model: TaskModel, score_threshold: float | None):
        self.out = out
        self.model = model
        self.colours = model.colours
        self.score_threshold = DEFAULT_SCORE_THRESHOLD if score_threshold is None else score_threshold

    def add(self, item: Item, image: Image.Image, result) -> None:
        save_png(self.overlay(*self.for_picture(image, result)), self.out / "overlays" / f"{item.name}.png")

    def overlay(self, image: Image.Image, result) -> Image.Image:
        raise NotImplementedError

    def for_picture(self, image: Image.Image, result) -> tuple[Image.Image, object]:
        """The image and result that the overlay draws: as they are, or, for an image whose longer side exceeds
        :data:`MAX_OVERLAY_SIDE`, both scaled down to it (the result files keep the image's size)."""
        if max(image.size) <= MAX_OVERLAY_SIDE:
            return image, result
        scale = MAX_OVERLAY_SIDE / max(image.size)
        size = (max(1, round(image.height * scale)), max(1, round(image.width * scale)))
        return image.resize(size[::-1], Image.BILINEAR), self.shrink(result, (image.height, image.width), size)

    def shrink(self, result, image_size: tuple[int, int], size: tuple[int, int]):
        """``result`` (at ``image_size``) at the smaller ``size``, for the overlay."""
        return result

    def finish(self, images: list[dict]) -> None:
        pass

    def _name(self, label: int) -> str:
        return self.model.classes[label]

    def _canvas(self, image: Image.Image) -> tuple[np.ndarray, int]:
        factor = pictures.display_factor(image.height, image.width)
        return pictures.enlarge(np.asarray(image), factor), factor


class ClassificationWriter(Writer):
    outputs = ("predictions.json",)

    def __init__(self, *args):
        super().__init__(*args)
        self.records = []

    def add(self, item, image, result):
        super().add(item, image, result)
        top = [
            {"label": int(label), "class": self._name(int(label)), "score": float(score)}
            for score, label in zip(result["scores"], result["labels"], strict=True)
        ]
        self.records.append({"file": str(item.path), "name": item.name, "top_k": top})

    def overlay(self, image, result):
        canvas, _ = self._canvas(image)
        lines = [
            f"{i + 1}. {self._name(int(label))}  {float(score):.2f}"
            for i, (score, label) in enumerate(zip(result["scores"], result["labels"], strict=True))
        ]
        return pictures.draw_text_block(Image.fromarray(canvas), lines)

    def finish(self, images):
        write_json(self.out / "predictions.json", self.records)


class SetWriter(Writer):
    """Detection and instance segmentation: COCO results; boxes (and masks) above the score threshold drawn."""

    outputs = ("results.json", "images.json")

    @classmethod
    def result_size(cls, model, tensor, image_size):
        """Detection only scales its boxes: its results are at the image's size."""
        return tuple(image_size) if model.task == "detection" else working_size(tensor, image_size)

    @classmethod
    def to_image_size(cls, result, size, image_size):
        """Instance masks as :class:`ResizedMasks` with their exact boxes; the box head's boxes scaled."""
        if "masks" not in result:
            return result
        resize = NearestResize(size, image_size)
        result = {**result, "boxes": resize.boxes(result["masks"]), "masks": ResizedMasks(result["masks"], resize)}
        if "box_results" in result:
            (h, w), (height, width) = size, image_size
            scale = torch.tensor([width / w, height / h, width / w, height / h])
            result["box_results"] = {**result["box_results"], "boxes": result["box_results"]["boxes"] * scale}
        return result

    def __init__(self, *args):
        super().__init__(*args)
        self.results = []

    def add(self, item, image, result):
        from ..metrics.coco import to_coco_results

        super().add(item, image, result)
        category_ids = [int(c["id"]) for c in self.model.categories]
        masks = result.get("masks")
        for i in range(len(result["scores"])):  # one mask at a time: a large image's masks are made one by one
            self.results += to_coco_results(
                item.image_id, result["boxes"][i : i + 1], result["scores"][i : i + 1], result["labels"][i : i + 1],
                masks=None if masks is None else masks[i][None], label_to_category=category_ids,
            )  # fmt: skip

    def shrink(self, result, image_size, size):
        (height, width), (h, w) = image_size, size
        shrunk = {**result, "boxes": result["boxes"] * torch.tensor([w / width, h / height, w / width, h / height])}
        if "masks" in result:
            masks = result["masks"]
            shrunk["masks"] = (
                masks.resized(size)
                if isinstance(masks, ResizedMasks)
                else ResizedMasks(masks, NearestResize(masks.shape[-2:], size))
            )
        return shrunk

    def overlay(self, image, result):
        canvas, factor = self._canvas(image)
        keep = (result["scores"] >= self.score_threshold).nonzero().flatten().tolist()
        keep.sort(key=lambda i: float(result["scores"][i]))  # the best drawn last, on top
        labels = [int(result["labels"][i]) for i in keep]
        if "masks" in result:
            for i, label in zip(keep, labels, strict=True):  # one mask at a time, each with its outline
                mask = pictures.enlarge(result["masks"][i].numpy(), factor)
                canvas = pictures.draw_mask(canvas, mask, self.colours[label], 0.5)
                canvas[pictures.boundaries(mask) & mask] = self.colours[label]
        boxes = [(result["boxes"][i] * factor).tolist() for i in keep]
        texts = [f"{self._name(label)} {float(result['scores'][i]):.2f}" for i, label in zip(keep, labels, strict=True)]
        return pictures.draw_boxes(Image.fromarray(canvas), boxes, texts, [self.colours[label] for label in labels])

    def finish(self, images):
        write_json(self.out / "results.json", self.results, indent=None)
        write_json(
            self.out / "images.json",
            {"images": [{k: image[k] for k in ("id", "file_name", "width", "height")} for image in images],
             "annotations": [], "categories": self.model.categories},
        )  # fmt: skip


class SemanticWriter(Writer):
    """Label PNGs: class ``c`` is written as ``c + 1`` (0 = unlabelled) when the checkpoint's data reduces the
    zero label (ADE20K, the default), as ``c`` otherwise; 16-bit PNGs when the values exceed 255."""

    outputs = ("labels",)

    @classmethod
    def to_image_size(cls, result, size, image_size):
        """The label map enlarged by nearest neighbour."""
        return NearestResize(size, image_size)(result)

    def add(self, item, image, result):
        super().add(item, image, result)
        offset = 1 if self.model.data.get("reduce_zero_label", True) else 0
        dtype = np.uint8 if len(self.model.classes) - 1 + offset <= 255 else np.uint16
        labels = result.numpy().astype(dtype)  # the classes fit in dtype with the offset
        labels += dtype(offset)
        save_png(Image.fromarray(labels), self.out / "labels" / f"{item.name}.png")

    def shrink(self, result, image_size, size):
        return NearestResize(image_size, size)(result)

    def overlay(self, image, result):
        canvas, factor = self._canvas(image)
        classes = pictures.enlarge(result.numpy(), factor)
        canvas = pictures.blend(canvas, pictures.colour_map(classes, self.colours), 0.55)
        canvas[pictures.boundaries(classes)] = pictures.WHITE
        counts = np.bincount(result.numpy().ravel())
        present = np.flatnonzero(counts)
        entries = [
            (self._name(int(c)), self.colours[int(c)]) for c in present[np.argsort(-counts[present], kind="stable")]
        ]
        return pictures.with_legend(Image.fromarray(canvas), entries)


class PanopticWriter(Writer):
    """COCO panoptic PNGs (id = R + 256 G + 256^2 B, 0 = void) and one JSON for all images. A score threshold given
    to ``predict`` is the mask-wise merging's."""

    outputs = ("panoptic", "panoptic.json")

    @classmethod
    def to_image_size(cls, result, size, image_size):
        """The id map enlarged by nearest neighbour, the segments' areas counted at the image's size."""
        resize = NearestResize(size, image_size)
        ids = result["ids"]
        areas = resize.areas(ids, int(ids.max()) + 1).tolist()
        segments = [{**segment, "area": int(areas[segment["id"]])} for segment in result["segments_info"]]
        return {"ids": resize(ids), "segments_info": segments}

    def __init__(self, out, model, score_threshold):
        super().__init__(out, model, score_threshold)
        if score_threshold is not None:  # the mask-wise merging's threshold
            model.module.hparams.score_threshold = score_threshold
        self.annotations = []

    def add(self, item, image, result):
        from ..metrics.panoptic import write_panoptic

        super().add(item, image, result)
        ids = result["ids"].numpy()
        file_name = f"{item.name}.png"
        path = self.out / "panoptic" / file_name
        with atomic_path(path) as temporary:
            write_panoptic(temporary.parent, temporary.name, ids)
        category_ids = [int(c["id"]) for c in self.model.categories]
        segments = []
        for segment in result["segments_info"]:
            mask = ids == segment["id"]
            ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))  # not every pixel's coordinates
            bbox = [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]
            segments.append(
                {"id": int(segment["id"]), "category_id": category_ids[int(segment["label"])], "iscrowd": 0,
                 "bbox": bbox, "area": int(np.count_nonzero(mask)), "isthing": int(segment["isthing"]),
                 "score": float(segment["score"])}
            )  # fmt: skip
        self.annotations.append({"image_id": item.image_id, "file_name": file_name, "segments_info": segments})

    def shrink(self, result, image_size, size):
        return {**result, "ids": NearestResize(image_size, size)(result["ids"])}

    def overlay(self, image, result):
        canvas, factor = self._canvas(image)
        ids = pictures.enlarge(result["ids"].numpy(), factor)
        colours = np.zeros(ids.shape + (3,), np.uint8)
        seen: dict[int, int] = {}
        for segment in result["segments_info"]:
            label = int(segment["label"])
            colour = self.colours[label].astype(np.int32)
            if segment["isthing"]:  # instances of one class in shades of its colour
                shade = seen.get(label, 0)
                seen[label] = shade + 1
                colour = np.clip(colour + (shade * 53 % 100 - 50) * (shade > 0), 0, 255)
            colours[ids == segment["id"]] = colour
        canvas = pictures.blend(canvas, colours, 0.55, ids > 0)
        canvas[pictures.boundaries(ids)] = pictures.WHITE
        area: dict[int, int] = {}
        for segment in result["segments_info"]:
            area[int(segment["label"])] = area.get(int(segment["label"]), 0) + int(segment["area"])
        entries = [(self._name(c), self.colours[c]) for c in sorted(area, key=lambda c: -area[c])]
        return pictures.with_legend(Image.fromarray(canvas), entries)

    def finish(self, images):
        write_json(
            self.out / "panoptic.json",
            {"images": [{k: image[k] for k in ("id", "file_name", "width", "height")} for image in images],
             "annotations": self.annotations, "categories": self.model.categories},
        )  # fmt: skip


def all_outputs() -> tuple[str, ...]:
    """What ``predict`` writes into its folder, for every task: the previous results that ``--overwrite`` deletes."""
    writers = [spec.writer_class for spec in TASK_SPECS.values()]
    return tuple(dict.fromkeys([*COMMON_OUTPUTS, *(name for writer in writers for name in writer.outputs)]))


# --- the command ------------------------------------------------------------------------------------------------
def run_predict(
    task: str,
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    score_threshold: float | None = None,
    device: str | None = None,
    batch_size: int = 1,
    top_k: int = 5,
    size: int | None = None,
    class_names: Sequence[str] | None = None,
    id_file: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Predict every image of ``inputs`` (files and folders) with the ``task`` checkpoint and write the outputs
    to ``out`` (see the module docstring). An unreadable image is skipped with a warning. Returns the summary
    (also written to ``out/summary.json``). Bad inputs raise :class:`PredictError` (or ``ValueError`` /
    ``OSError`` from the checkpoint loader) before anything is written; so does a non-empty ``out`` without
    ``overwrite`` (an :class:`~clusterformer.outputs.OutputExistsError`). With ``overwrite``, the previous results
    in ``out`` are deleted once the inputs and the checkpoint have been checked."""
    from tqdm import tqdm

    if task not in TASKS:
        raise PredictError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if batch_size < 1 or top_k < 1:
        raise PredictError(f"--batch-size and --top-k must be at least 1, got {batch_size} and {top_k}")
    out = check_output_folder(out, overwrite)
    paths = collect_images(inputs)
    ids = image_ids(paths, id_file)
    model = load_task_model(task, checkpoint, class_names)
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model.module.to(device)
    except (RuntimeError, AssertionError) as error:
        raise PredictError(f"device {device!r} cannot be used: {error}") from None
    transform = eval_transform(model, size)
    remove_outputs(out, all_outputs())  # only with overwrite can the folder hold anything
    out.mkdir(parents=True, exist_ok=True)
    writer = TASK_SPECS[task].writer_class(out, model, score_threshold)
    items = [Item(p, n, i) for p, n, i in zip(paths, output_names(paths), ids, strict=True)]
    images, skipped = [], []
    bar = tqdm(total=len(items), unit="img", desc=f"predict {task}", disable=not progress or len(items) < 2)
    for start in range(0, len(items), batch_size):
        loaded = []
        for item in items[start : start + batch_size]:
            try:
                loaded.append((item, load_rgb(item.path)))
            except ImageReadError as error:
                skipped.append({"file": str(item.path), "error": str(error)})
                tqdm.write(f"clusterformer predict: warning: {error}; skipped", file=sys.stderr)
        if loaded:
            results = predict_images(model, [image for _, image in loaded], transform, device, top_k)
            for (item, image), result in zip(loaded, results, strict=True):
                writer.add(item, image, result)
                images.append({"id": item.image_id, "file_name": item.path.name, "width": image.width,
                               "height": image.height, "file": str(item.path), "name": item.name})  # fmt: skip
        bar.update(len(items[start : start + batch_size]))
    bar.close()
    if not images:
        raise PredictError(f"none of the {len(items)} input images could be read")
    writer.finish(images)
    summary = {"task": task, "checkpoint": str(checkpoint), "images": images, "skipped": skipped}
    write_json(out / "summary.json", summary)
    return summary


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "predict",
        help="predict image files with a task checkpoint; write overlays and COCO / PNG results "
        "(with --config: LightningCLI's predict over a data module)",
        description="Run a trained checkpoint on image files and folders (any size; grayscale, RGBA and 16-bit "
        "images are converted to RGB) and write to --out: overlays/<name>.png for every image and the results: "
        "classification predictions.json (top-k classes); detection / instance results.json (COCO results, bbox "
        "and segmentation RLE) and images.json; semantic labels/<name>.png; panoptic panoptic.json + "
        "panoptic/<name>.png (COCO panoptic); summary.json. Unreadable images are skipped with a warning and "
        "listed. 'clusterformer predict --config FILE ...' (no --task) is LightningCLI's predict instead. "
        "See docs/predict_explain.md.",
    )
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint of a model trained for --task")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and folders of images")
    parser.add_argument("--out", required=True, help="output folder (empty or new, unless --overwrite)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out: the previous results there (overlays/, labels/, panoptic/, the JSON "
        "files) are deleted first; other files are kept",
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        help=f"detection / instance: draw predictions from this score (default {DEFAULT_SCORE_THRESHOLD}; the "
        "results JSON keeps all of the model's top-k); panoptic: the mask-wise merging's score threshold "
        "(default: the checkpoint's)",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    parser.add_argument("--top-k", type=int, default=5, help="classification: classes listed per image (default 5)")
    parser.add_argument(
        "--size", type=int, help="model input: classification crop / dense shorter side (default: the checkpoint's)"
    )
    parser.add_argument("--class-names", help="text file, one class name per line in label order")
    parser.add_argument(
        "--image-ids", help="COCO JSON whose 'images' give the image ids by file name (default: numeric stems, or 1..N)"
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        names = read_class_names(args.class_names) if args.class_names else None
        summary = run_predict(
            args.task, args.ckpt, args.inputs, args.out, score_threshold=args.score_threshold, device=args.device,
            batch_size=args.batch_size, top_k=args.top_k, size=args.size, class_names=names, id_file=args.image_ids,
            overwrite=args.overwrite,
        )  # fmt: skip
    except (ValueError, OSError) as error:  # bad input: one line, no traceback
        print(f"clusterformer predict: error: {error}", file=sys.stderr)
        return 2
    print(f"predicted {len(summary['images'])} images; wrote {args.out}", file=sys.stderr)
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} unreadable images:", file=sys.stderr)
        for entry in summary["skipped"]:
            print(f"  {entry['error']}", file=sys.stderr)
    return 0


LIGHTNING_ARGUMENTS = ("-c", "--config", "--model", "--data", "--trainer", "--ckpt_path", "--print_config")


def is_lightning_predict(argv: Sequence[str]) -> bool:
    """``predict`` with a LightningCLI argument (``--config``, ``--model.*``, ``--trainer.*``, ``--ckpt_path``,
    ...) is LightningCLI's predict over a data module; otherwise it is this module's image-file command."""
    return any(arg.split("=", 1)[0].split(".", 1)[0] in LIGHTNING_ARGUMENTS for arg in argv[1:])
