"""What :class:`~clusterformer.Predictor` returns: one result per image, typed by task, in the image's own pixels.

============== ======================= ============================================================================
task           result                  fields
============== ======================= ============================================================================
classification :class:`Classification` ``labels (k,)``, ``names``, ``scores (k,)``: the top ``k`` classes, best first
detection      :class:`Detections`     ``boxes (n, 4)`` xyxy pixels, ``labels (n,)``, ``names``, ``scores (n,)``
instance       :class:`Instances`      the same and ``masks (n, H, W)`` bool (``mask(i)``: one at a time)
semantic       :class:`SemanticMap`    ``segmentation (H, W)``: the class of every pixel
panoptic       :class:`PanopticMap`    ``segmentation (H, W)``: segment ids (0 = void); ``segments_info``
============== ======================= ============================================================================

Arrays are numpy. Every result keeps its ``image`` (RGB PIL) and draws its prediction on it (:meth:`Result.draw`:
the overlays of ``clusterformer predict``), gives the entries of the standard result files that ``clusterformer
predict`` writes and ``clusterformer evaluate`` reads (``to_coco``), and the dense ones become supervision's
``sv.Detections`` (``to_supervision``, with ``pip install clusterformer[supervision]``).

A result computed at the model's input size for an image larger than it is enlarged by nearest neighbour
(:mod:`clusterformer.resampling`); an instance result keeps its masks at the computed size and makes each one at the
image's size when it is read (:meth:`Instances.mask`), so that a large image's masks are never all in memory unless
:attr:`Instances.masks` is asked for. Decisions: ``docs/predict_explain.md``, "Python predictor".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from PIL import Image

from . import pictures
from .resampling import NearestResize, ResizedMasks, working_size

DEFAULT_SCORE_THRESHOLD = 0.5  # detection / instance: the detections a Predictor keeps by default
MAX_OVERLAY_SIDE = 2048  # a larger image is drawn scaled down to this longer side


@dataclass(eq=False)
class ClassInfo:
    """The classes of a model: ``names`` (one per label), COCO ``categories`` (dicts with ``id``, ``name``,
    ``isthing`` per label) and, computed once, a ``colours`` ``(C, 3)`` uint8 per label."""

    names: list[str]
    categories: list[dict]

    @cached_property
    def colours(self) -> np.ndarray:
        return pictures.class_colours(len(self.names), self.categories)

    @cached_property
    def category_ids(self) -> list[int]:
        return [int(c["id"]) for c in self.categories]

    def name(self, label: int) -> str:
        return self.names[int(label)]


def _supervision():
    try:
        import supervision
    except ImportError:
        raise ImportError(
            "to_supervision() needs the supervision package: pip install 'clusterformer[supervision]' "
            "(or pip install 'supervision>=0.20')"
        ) from None
    return supervision


def _mask_boxes(masks: np.ndarray) -> np.ndarray:
    """``(n, 4)`` float32 xyxy boxes enclosing ``(n, H, W)`` bool masks (``torchvision.ops.masks_to_boxes``'s
    convention: the last pixel's index, not one past it)."""
    from torchvision.ops import masks_to_boxes

    if not len(masks):
        return np.zeros((0, 4), np.float32)
    return masks_to_boxes(torch.from_numpy(masks)).numpy().astype(np.float32)


@dataclass(kw_only=True, eq=False)
class Result:
    """One image's prediction. ``image``: the RGB image predicted; ``classes``: the model's classes."""

    image: Image.Image = field(repr=False)
    classes: ClassInfo = field(repr=False)

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the image, the size of every map and of the pixels of every box."""
        return self.image.height, self.image.width

    def draw(self, *, max_side: int | None = MAX_OVERLAY_SIDE, **options) -> Image.Image:
        """The image with the prediction drawn on it (``clusterformer predict``'s overlay): a new PIL image,
        enlarged by an integer factor when the image's longer side is under 512 pixels (readable text), and, when
        it is over ``max_side`` (``None``: no limit), drawn on the image scaled down to it, the prediction resampled
        by nearest neighbour. ``options``: the task's (:meth:`Detections.draw`'s ``score_threshold``)."""
        result = self
        if max_side and max(self.image.size) > max_side:
            scale = max_side / max(self.image.size)
            size = (max(1, round(self.image.height * scale)), max(1, round(self.image.width * scale)))
            result = self._shrunk(size, self.image.resize(size[::-1], Image.BILINEAR))
        return result._overlay(**options)

    def _shrunk(self, size: tuple[int, int], image: Image.Image) -> Result:
        """This result for ``image``, this one's image scaled down to ``size`` ``(h, w)``."""
        return dataclasses.replace(self, image=image)

    def _overlay(self) -> Image.Image:
        raise NotImplementedError

    def _canvas(self) -> tuple[np.ndarray, int]:
        factor = pictures.display_factor(self.image.height, self.image.width)
        return pictures.enlarge(np.asarray(self.image), factor), factor

    def to_coco(self, image_id: int):
        raise NotImplementedError


# --- classification ---------------------------------------------------------------------------------------------
@dataclass(kw_only=True, eq=False)
class Classification(Result):
    """The top ``k`` classes of an image, best first: ``labels (k,)`` int64, ``names``, ``scores (k,)`` float32
    (softmax probabilities)."""

    labels: np.ndarray
    names: list[str]
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def _overlay(self) -> Image.Image:
        canvas, _ = self._canvas()
        ranked = enumerate(zip(self.names, self.scores, strict=True))
        lines = [f"{i + 1}. {name}  {float(score):.2f}" for i, (name, score) in ranked]
        return pictures.draw_text_block(Image.fromarray(canvas), lines)

    def to_coco(self, image_id: int | None = None) -> dict:
        """``{"image_id", "top_k": [{"label", "class", "score"}]}``: ``predict``'s ``predictions.json`` entry (which
        names the file instead of the id)."""
        top = [
            {"label": int(label), "class": name, "score": float(score)}
            for label, name, score in zip(self.labels, self.names, self.scores, strict=True)
        ]
        return {"image_id": image_id, "top_k": top}


# --- detection and instance segmentation -----------------------------------------------------------------------
@dataclass(kw_only=True, eq=False)
class Detections(Result):
    """Objects, best first: ``boxes (n, 4)`` float32 ``xyxy`` in the image's pixels, ``labels (n,)`` int64,
    ``names``, ``scores (n,)`` float32."""

    boxes: np.ndarray
    labels: np.ndarray
    names: list[str]
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def mask(self, index: int) -> np.ndarray | None:
        """Detection has no masks."""
        return None

    def draw(self, score_threshold: float | None = None, *, max_side: int | None = MAX_OVERLAY_SIDE) -> Image.Image:
        """:meth:`Result.draw` of the objects scoring at least ``score_threshold`` (``None``: every one)."""
        return super().draw(max_side=max_side, score_threshold=score_threshold)

    def _shrunk(self, size, image):
        (height, width), (h, w) = self.image_size, size
        scale = np.array([w / width, h / height, w / width, h / height], np.float32)
        return dataclasses.replace(self, image=image, boxes=self.boxes * scale)

    def _overlay(self, score_threshold: float | None = None) -> Image.Image:
        canvas, factor = self._canvas()
        threshold = -np.inf if score_threshold is None else score_threshold
        keep = np.flatnonzero(self.scores >= threshold).tolist()
        keep.sort(key=lambda i: float(self.scores[i]))  # the best drawn last, on top
        colours = [self.classes.colours[int(self.labels[i])] for i in keep]
        for i, colour in zip(keep, colours, strict=True):  # one mask at a time, each with its outline
            mask = self.mask(i)
            if mask is not None:
                mask = pictures.enlarge(mask, factor)
                canvas = pictures.draw_mask(canvas, mask, colour, 0.5)
                canvas[pictures.boundaries(mask) & mask] = colour
        boxes = [(self.boxes[i] * factor).tolist() for i in keep]
        texts = [f"{self.names[i]} {float(self.scores[i]):.2f}" for i in keep]
        return pictures.draw_boxes(Image.fromarray(canvas), boxes, texts, colours)

    def to_coco(self, image_id: int) -> list[dict]:
        """COCO results, one dict per object: ``image_id``, ``category_id`` (the model's categories), ``score``,
        ``bbox`` ``[x, y, w, h]`` and, for instances, ``segmentation`` (compressed RLE at the image's size): what
        ``predict`` writes in ``results.json`` and ``clusterformer evaluate --task detection|instance`` reads."""
        from .metrics.coco import to_coco_results

        boxes, scores, labels = (torch.from_numpy(np.ascontiguousarray(a)) for a in (self.boxes, self.scores,
                                                                                     self.labels))  # fmt: skip
        entries = []
        for i in range(len(self)):  # one mask at a time: a large image's masks are made one by one
            mask = self.mask(i)
            entries += to_coco_results(
                image_id, boxes[i : i + 1], scores[i : i + 1], labels[i : i + 1],
                masks=None if mask is None else torch.from_numpy(mask)[None],
                label_to_category=self.classes.category_ids,
            )  # fmt: skip
        return entries

    def to_supervision(self):
        """supervision's ``sv.Detections``: ``xyxy``, ``mask`` (instances), ``confidence``, ``class_id`` and
        ``data["class_name"]``."""
        sv = _supervision()
        masks = self.masks if isinstance(self, Instances) else None
        return sv.Detections(
            xyxy=self.boxes.astype(np.float32).reshape(-1, 4), mask=masks, confidence=self.scores.astype(np.float32),
            class_id=self.labels.astype(int), data={"class_name": np.array(self.names, dtype=str)},
        )  # fmt: skip


@dataclass(kw_only=True, eq=False)
class Instances(Detections):
    """:class:`Detections` with a mask per object: :attr:`masks` ``(n, H, W)`` bool at the image's size, or
    :meth:`mask` one at a time (what the overlay and ``to_coco`` read, so that a large image's masks are never all
    in memory); ``boxes`` enclose the masks."""

    mask_source: ResizedMasks = field(repr=False)

    def mask(self, index: int) -> np.ndarray:
        """``(H, W)`` bool: the mask of object ``index`` at the image's size."""
        return self.mask_source[index].numpy()

    @cached_property
    def masks(self) -> np.ndarray:
        """``(n, H, W)`` bool: every object's mask at the image's size (made on first use)."""
        if not len(self):
            return np.zeros((0, *self.image_size), bool)
        return np.stack([self.mask(i) for i in range(len(self))])

    def _shrunk(self, size, image):
        shrunk = super()._shrunk(size, image)
        shrunk.mask_source = self.mask_source.resized(size)
        return shrunk


# --- semantic and panoptic segmentation ------------------------------------------------------------------------
def _legend(classes: ClassInfo, area: dict[int, int]) -> list[tuple[str, np.ndarray]]:
    """The legend's entries: the classes of ``area`` (label -> pixels), largest first."""
    return [(classes.name(c), classes.colours[c]) for c in sorted(area, key=lambda c: -area[c])]


@dataclass(kw_only=True, eq=False)
class SemanticMap(Result):
    """``segmentation (H, W)`` int64: the class of every pixel of the image. ``reduce_zero_label``: the convention
    of the checkpoint's data, which :meth:`to_coco`'s label PNG follows."""

    segmentation: np.ndarray
    reduce_zero_label: bool = True

    @property
    def labels(self) -> np.ndarray:
        """The classes present, largest first."""
        counts = np.bincount(self.segmentation.ravel())
        present = np.flatnonzero(counts)
        return present[np.argsort(-counts[present], kind="stable")]

    @property
    def names(self) -> list[str]:
        """The names of :attr:`labels`."""
        return [self.classes.name(label) for label in self.labels]

    def _shrunk(self, size, image):
        resized = NearestResize(self.image_size, size)(torch.from_numpy(self.segmentation))
        return dataclasses.replace(self, image=image, segmentation=resized.numpy())

    def _overlay(self) -> Image.Image:
        canvas, factor = self._canvas()
        classes = pictures.enlarge(self.segmentation, factor)
        canvas = pictures.blend(canvas, pictures.colour_map(classes, self.classes.colours), 0.55)
        canvas[pictures.boundaries(classes)] = pictures.WHITE
        entries = [(self.classes.name(int(c)), self.classes.colours[int(c)]) for c in self.labels]
        return pictures.with_legend(Image.fromarray(canvas), entries)

    def to_coco(self, image_id: int | None = None) -> np.ndarray:
        """The label PNG's pixels (``predict``'s ``labels/<name>.png``, what ``clusterformer evaluate --task
        semantic`` reads): class ``c`` as ``c + 1`` (0 = unlabelled) with ``reduce_zero_label`` (ADE20K), as ``c``
        otherwise; uint8, or uint16 when the values exceed 255. ``image_id`` is not used (a PNG per image)."""
        offset = 1 if self.reduce_zero_label else 0
        dtype = np.uint8 if len(self.classes.names) - 1 + offset <= 255 else np.uint16
        labels = self.segmentation.astype(dtype)  # the classes fit in dtype with the offset
        labels += dtype(offset)
        return labels

    def to_supervision(self):
        """supervision's ``sv.Detections`` with one mask per class present (largest first): ``xyxy`` enclosing it,
        ``class_id``, ``data["class_name"]``, no confidence."""
        sv = _supervision()
        labels = self.labels
        masks = self.segmentation[None] == labels[:, None, None]  # (n, H, W) bool
        return sv.Detections(
            xyxy=_mask_boxes(masks), mask=masks, class_id=labels.astype(int),
            data={"class_name": np.array(self.names, dtype=str)},
        )  # fmt: skip


@dataclass(kw_only=True, eq=False)
class PanopticMap(Result):
    """``segmentation (H, W)`` int32: the segment id of every pixel (0 = void, no segment), and ``segments_info``:
    per segment ``id``, ``label_id``, ``was_fused`` (a stuff segment, which merges the queries of its class),
    ``score`` (transformers' ``post_process_panoptic_segmentation``), and ``name``, ``isthing``, ``area`` (pixels).
    """

    segmentation: np.ndarray
    segments_info: list[dict]

    @property
    def labels(self) -> np.ndarray:
        """The class of every segment, in ``segments_info``'s order."""
        return np.array([s["label_id"] for s in self.segments_info], dtype=np.int64)

    @property
    def names(self) -> list[str]:
        """The class name of every segment, in ``segments_info``'s order."""
        return [s["name"] for s in self.segments_info]

    def _shrunk(self, size, image):
        resized = NearestResize(self.image_size, size)(torch.from_numpy(self.segmentation))
        return dataclasses.replace(self, image=image, segmentation=resized.numpy())

    def _overlay(self) -> Image.Image:
        canvas, factor = self._canvas()
        ids = pictures.enlarge(self.segmentation, factor)
        colours = np.zeros(ids.shape + (3,), np.uint8)
        seen: dict[int, int] = {}
        area: dict[int, int] = {}
        for segment in self.segments_info:
            label = int(segment["label_id"])
            colour = self.classes.colours[label].astype(np.int32)
            if segment["isthing"]:  # instances of one class in shades of its colour
                shade = seen.get(label, 0)
                seen[label] = shade + 1
                colour = np.clip(colour + (shade * 53 % 100 - 50) * (shade > 0), 0, 255)
            colours[ids == segment["id"]] = colour
            area[label] = area.get(label, 0) + int(segment["area"])
        canvas = pictures.blend(canvas, colours, 0.55, ids > 0)
        canvas[pictures.boundaries(ids)] = pictures.WHITE
        return pictures.with_legend(Image.fromarray(canvas), _legend(self.classes, area))

    def to_coco(self, image_id: int, file_name: str | None = None) -> dict:
        """The COCO panoptic annotation of the image (``predict``'s ``panoptic.json`` entry; the PNG of
        :attr:`segmentation` is ``metrics.panoptic.write_panoptic``'s): ``image_id``, ``file_name`` (default
        ``<image_id>.png``), ``segments_info`` with ``id``, ``category_id``, ``iscrowd`` 0, ``bbox`` ``[x, y, w, h]``,
        ``area``, ``isthing`` and ``score``."""
        segments = []
        for segment in self.segments_info:
            mask = self.segmentation == segment["id"]
            ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))  # not every pixel's coordinates
            bbox = [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]
            segments.append(
                {"id": int(segment["id"]), "category_id": self.classes.category_ids[int(segment["label_id"])],
                 "iscrowd": 0, "bbox": bbox, "area": int(np.count_nonzero(mask)), "isthing": int(segment["isthing"]),
                 "score": float(segment["score"])}
            )  # fmt: skip
        return {"image_id": image_id, "file_name": file_name or f"{image_id}.png", "segments_info": segments}

    def to_supervision(self):
        """supervision's ``sv.Detections`` with one mask per segment: ``xyxy`` enclosing it, ``confidence`` (the
        segment's score), ``class_id``, ``data["class_name"]`` and ``data["segment_id"]``."""
        sv = _supervision()
        ids = np.array([s["id"] for s in self.segments_info], dtype=np.int64)
        masks = self.segmentation[None] == ids[:, None, None]
        return sv.Detections(
            xyxy=_mask_boxes(masks), mask=masks, class_id=self.labels.astype(int),
            confidence=np.array([s["score"] for s in self.segments_info], dtype=np.float32),
            data={"class_name": np.array(self.names, dtype=str), "segment_id": ids},
        )  # fmt: skip


# --- from a task module's output to a result --------------------------------------------------------------------
def computed_size(task: str, tensor: torch.Tensor, image_size: tuple[int, int]) -> tuple[int, int]:
    """Where a dense task's result for an image of ``image_size`` (``tensor``: the model's input) is computed:
    detection at the image's size (it only scales its boxes); the others at :func:`~resampling.working_size`, the
    model input's size when the image is larger, so that no query's mask is ever resized to a large image."""
    return tuple(image_size) if task == "detection" else working_size(tensor, image_size)


def dense_result(
    task: str,
    output,
    size: tuple[int, int],
    image: Image.Image,
    classes: ClassInfo,
    score_threshold: float = 0.0,
    reduce_zero_label: bool = True,
) -> Result:
    """The result of ``image`` from what the task module's ``predict_batch`` returned for it (on the CPU; computed
    at ``size``, :func:`computed_size`), brought to the image's size by nearest neighbour. Detection / instance:
    the objects scoring at least ``score_threshold``."""
    image_size = (image.height, image.width)
    resize = None if tuple(size) == image_size else NearestResize(size, image_size)
    if task == "semantic":
        labels = output if resize is None else resize(output)
        return SemanticMap(image=image, classes=classes, segmentation=labels.numpy().astype(np.int64),
                           reduce_zero_label=reduce_zero_label)  # fmt: skip
    if task == "panoptic":
        ids = output["ids"]
        segments = output["segments_info"]
        if resize is not None:  # the areas counted at the image's size without the enlarged map
            areas = resize.areas(ids, int(ids.max()) + 1).tolist()
            segments = [{**segment, "area": int(areas[segment["id"]])} for segment in segments]
            ids = resize(ids)
        info = [{"id": int(s["id"]), "label_id": int(s["label"]), "was_fused": not s["isthing"],
                 "score": float(s["score"]), "name": classes.name(s["label"]), "isthing": bool(s["isthing"]),
                 "area": int(s["area"])} for s in segments]  # fmt: skip
        return PanopticMap(image=image, classes=classes, segmentation=ids.numpy().astype(np.int32), segments_info=info)
    keep = (output["scores"] >= score_threshold).nonzero().flatten()
    labels = output["labels"][keep]
    fields = dict(image=image, classes=classes, labels=labels.numpy().astype(np.int64),
                  names=[classes.name(label) for label in labels.tolist()],
                  scores=output["scores"][keep].float().numpy())  # fmt: skip
    if "masks" not in output:
        return Detections(boxes=output["boxes"][keep].float().numpy(), **fields)
    masks = output["masks"][keep]
    boxes = output["boxes"][keep] if resize is None else resize.boxes(masks)  # the enlarged masks' exact boxes
    return Instances(boxes=boxes.float().numpy(), mask_source=ResizedMasks(masks, resize), **fields)


def classification_result(probabilities: torch.Tensor, image: Image.Image, classes: ClassInfo, top_k: int) -> Result:
    """The top ``top_k`` classes of ``probabilities (C,)``."""
    scores, labels = probabilities.topk(min(top_k, probabilities.shape[-1]))
    return Classification(image=image, classes=classes, labels=labels.numpy().astype(np.int64),
                          names=[classes.name(label) for label in labels.tolist()],
                          scores=scores.float().numpy())  # fmt: skip
