"""COCO instances (detection + instance segmentation) read into tv_tensors, with checked inputs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from ..errors import DatasetError, DatasetNotFoundError
from .images import load_rgb

log = logging.getLogger(__name__)

REQUIRED = {"images": ("id", "file_name"), "annotations": ("id", "image_id", "category_id", "bbox"),
            "categories": ("id", "name")}  # fmt: skip


class AnnotationError(DatasetError):
    """A problem in an annotation file; the message names the file and the entry."""


def load_json(path: Path):
    """The parsed content of an annotation file, or an :class:`AnnotationError` naming it."""
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AnnotationError(f"{path}: not valid JSON ({error})") from error


def read_coco(path: str | Path) -> dict:
    """Load and check a COCO JSON file: valid JSON and :func:`check_coco`."""
    path = Path(path)
    return check_coco(load_json(path), str(path))


def check_coco(data, name: str) -> dict:
    """``data`` (a COCO JSON's content, called ``name`` in the errors), checked: the three lists, their required
    keys, a category at least, and annotations of known images and categories. The one check of a COCO file, for
    the reader (:func:`read_coco`) and the metrics (:func:`coco_ground_truth`)."""
    if not isinstance(data, dict):
        raise AnnotationError(f"{name}: expected a JSON object with 'images', 'annotations', 'categories'")
    for key, fields in REQUIRED.items():
        if not isinstance(data.get(key), list):
            raise AnnotationError(f"{name}: missing the list '{key}'")
        for entry in data[key]:
            missing = [f for f in fields if f not in entry]
            if missing:
                raise AnnotationError(f"{name}: an entry of '{key}' lacks {missing}: {str(entry)[:200]}")
    if not data["categories"]:
        raise AnnotationError(f"{name}: the categories list is empty")
    images = {image["id"] for image in data["images"]}
    categories = {c["id"] for c in data["categories"]}
    for ann in data["annotations"]:
        if ann["category_id"] not in categories:
            raise AnnotationError(
                f"{name}: annotation {ann['id']} has category_id {ann['category_id']}, "
                f"which is not in the categories list {sorted(categories)}"
            )
        if ann["image_id"] not in images:
            raise AnnotationError(f"{name}: annotation {ann['id']} refers to image_id {ann['image_id']}, not in images")
    return data


def coco_ground_truth(gt: str | Path | dict) -> tuple[str, dict]:
    """``(name, data)`` of a COCO ground truth given as a file (read by :func:`read_coco`) or as its content (a
    dict, called ``ground truth (dict)`` in the errors; :func:`check_coco`)."""
    if isinstance(gt, dict):
        name = "ground truth (dict)"
        return name, check_coco(gt, name)
    return str(gt), read_coco(gt)


def check_evaluation_fields(name: str, data: dict, iou_type: str) -> None:
    """The fields that COCO evaluation (pycocotools' ``COCOeval``) reads beyond those :func:`check_coco` requires:
    ``area`` and ``iscrowd`` of every annotation, and for ``iou_type="segm"`` its ``segmentation`` and the images'
    ``height`` and ``width``."""
    needed = ("area", "iscrowd", "segmentation") if iou_type == "segm" else ("area", "iscrowd")
    for ann in data["annotations"]:
        missing = [f for f in needed if f not in ann]
        if missing:
            raise AnnotationError(f"{name}: annotation {ann['id']} lacks {missing}, needed for '{iou_type}' evaluation")
    if iou_type == "segm":
        for image in data["images"]:
            if "height" not in image or "width" not in image:
                raise AnnotationError(f"{name}: image {image['id']} lacks 'height'/'width', needed for masks")


class CocoInstances(torch.utils.data.Dataset):
    """Images and their COCO instances as ``(tv_tensors.Image, target)``.

    ``target``: ``boxes`` (``BoundingBoxes``, XYXY, clipped to the image), ``masks`` (``Mask``,
    ``(N, H, W)``, if ``with_masks``), ``labels`` (contiguous ``0..C-1`` in category-id order),
    ``iscrowd``, ``area``, ``image_id``.

    Handling (documented, tested): images without objects are kept with empty targets; boxes are
    clipped to the image and those left with zero width or height are dropped (and counted in
    ``dropped``); crowd regions are kept with ``iscrowd = 1`` (losses and metrics treat them).

    Args:
        images_dir: folder of the image files (``file_name`` is relative to it).
        annotation_file: COCO instances JSON.
        transforms: a torchvision v2 transform taking ``(image, target)``.
        with_masks: decode the segmentations (polygons or RLE) into masks.
    """

    def __init__(self, images_dir: str | Path, annotation_file: str | Path, transforms=None, with_masks: bool = True):
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        data = read_coco(self.annotation_file)
        if not data["images"]:
            raise AnnotationError(f"{self.annotation_file}: no images listed")
        if not self.images_dir.is_dir():
            raise DatasetNotFoundError(f"{self.images_dir}: image folder not found")
        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        self.label_of = {c["id"]: i for i, c in enumerate(self.categories)}
        self.images = sorted(data["images"], key=lambda image: image["id"])
        self.annotations = {image["id"]: [] for image in self.images}
        for ann in data["annotations"]:
            self.annotations[ann["image_id"]].append(ann)
        self.transforms = transforms
        self.with_masks = with_masks
        self.dropped = 0

    @property
    def classes(self) -> list[str]:
        return [c["name"] for c in self.categories]

    def __len__(self) -> int:
        return len(self.images)

    def _mask(self, ann: dict, h: int, w: int) -> np.ndarray:
        from pycocotools import mask as mask_utils

        segmentation = ann.get("segmentation")
        if not segmentation:
            raise AnnotationError(f"{self.annotation_file}: annotation {ann['id']} has no segmentation")
        if isinstance(segmentation, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
        elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, h, w)
        else:
            rle = segmentation
        return mask_utils.decode(rle).astype(bool)

    def __getitem__(self, index: int):
        info = self.images[index]
        pil = load_rgb(self.images_dir / info["file_name"])
        w, h = pil.size
        if (info.get("height", h), info.get("width", w)) != (h, w):
            raise AnnotationError(
                f"{self.annotation_file}: image {info['id']} is listed as {info.get('width')}x{info.get('height')} "
                f"but {self.images_dir / info['file_name']} is {w}x{h}"
            )
        boxes, keep = [], []
        for ann in self.annotations[info["id"]]:
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            box = [max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh)]
            if box[2] <= box[0] or box[3] <= box[1]:  # zero-area or entirely outside the image
                self.dropped += 1
                log.warning(
                    "%s: dropping annotation %s with an empty box %s", self.annotation_file, ann["id"], ann["bbox"]
                )
                continue
            boxes.append(box)
            keep.append(ann)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(h, w)
            ),
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in keep], dtype=torch.int64),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in keep], dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", 0.0)) for a in keep], dtype=torch.float32),
            "image_id": info["id"],
            "orig_size": (h, w),
        }
        if self.with_masks:
            masks = np.stack([self._mask(a, h, w) for a in keep]) if keep else np.zeros((0, h, w), bool)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
        image = tv_tensors.Image(TF.pil_to_tensor(pil))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
