"""COCO panoptic (JSON + PNG folder) read into tv_tensors, with checked inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from ..errors import DatasetNotFoundError
from .coco import AnnotationError, load_json
from .images import ImageReadError, load_rgb
from .masks import rgb_to_ids


def read_panoptic_json(path: str | Path) -> dict:
    """Load and check a COCO panoptic JSON: keys, known categories, unique segment ids per image."""
    path = Path(path)
    data = load_json(path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise AnnotationError(f"{path}: missing the list '{key}'")
    categories = {c["id"] for c in data["categories"]}
    for ann in data["annotations"]:
        for key in ("image_id", "file_name", "segments_info"):
            if key not in ann:
                raise AnnotationError(f"{path}: an annotation lacks '{key}': {str(ann)[:200]}")
        seen = set()
        for segment in ann["segments_info"]:
            if segment.get("id") in seen:
                raise AnnotationError(f"{path}: {ann['file_name']} has segment id {segment['id']} twice")
            seen.add(segment.get("id"))
            if segment.get("category_id") not in categories:
                raise AnnotationError(
                    f"{path}: {ann['file_name']} segment {segment.get('id')} has category_id "
                    f"{segment.get('category_id')}, which is not in the categories list {sorted(categories)}"
                )
    return data


class CocoPanoptic(torch.utils.data.Dataset):
    """Images with their panoptic segments as ``(tv_tensors.Image, target)``.

    ``target``: ``masks`` (``Mask``, ``(N, H, W)``, one per segment of ``segments_info``), ``labels``
    (contiguous ``0..C-1`` in category-id order), ``isthing``, ``iscrowd``, ``segment_ids``,
    ``image_id``. Void pixels (id 0) belong to no mask.
    """

    def __init__(self, images_dir: str | Path, annotation_file: str | Path, png_dir: str | Path, transforms=None):
        self.images_dir, self.png_dir = Path(images_dir), Path(png_dir)
        self.annotation_file = Path(annotation_file)
        data = read_panoptic_json(self.annotation_file)
        if not data["annotations"]:
            raise AnnotationError(f"{self.annotation_file}: no annotations listed")
        for folder, what in ((self.images_dir, "image"), (self.png_dir, "panoptic PNG")):
            if not folder.is_dir():
                raise DatasetNotFoundError(f"{folder}: {what} folder not found")
        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        self.label_of = {c["id"]: i for i, c in enumerate(self.categories)}
        self.isthing = {c["id"]: int(c.get("isthing", 1)) for c in self.categories}
        files = {image["id"]: image["file_name"] for image in data["images"]}
        self.annotations = sorted(data["annotations"], key=lambda a: a["image_id"])
        unknown = [a["image_id"] for a in self.annotations if a["image_id"] not in files]
        if unknown:
            raise AnnotationError(f"{self.annotation_file}: annotations for unknown image ids {unknown[:10]}")
        self.image_files = [files[a["image_id"]] for a in self.annotations]
        self.transforms = transforms

    @property
    def classes(self) -> list[str]:
        return [c["name"] for c in self.categories]

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, index: int):
        ann = self.annotations[index]
        pil = load_rgb(self.images_dir / self.image_files[index])
        png = self.png_dir / ann["file_name"]
        try:
            with Image.open(png) as panoptic:
                ids = rgb_to_ids(np.asarray(panoptic.convert("RGB")))
        except (FileNotFoundError, OSError) as error:
            raise ImageReadError(f"{png}: cannot read the panoptic PNG ({error})") from error
        if ids.shape != (pil.height, pil.width):
            raise AnnotationError(
                f"{png}: PNG is {ids.shape[1]}x{ids.shape[0]} but its image is {pil.width}x{pil.height}"
            )
        segments = ann["segments_info"]
        listed = {s["id"] for s in segments}
        present = set(np.unique(ids).tolist()) - {0}
        if present - listed:
            raise AnnotationError(f"{png}: segment ids {sorted(present - listed)[:10]} are not in segments_info")
        if listed - present:
            raise AnnotationError(f"{png}: segments_info lists ids {sorted(listed - present)[:10]} absent from the PNG")
        h, w = ids.shape
        masks = np.stack([ids == s["id"] for s in segments]) if segments else np.zeros((0, h, w), bool)
        target = {
            "masks": tv_tensors.Mask(torch.from_numpy(masks)),
            "labels": torch.tensor([self.label_of[s["category_id"]] for s in segments], dtype=torch.int64),
            "isthing": torch.tensor([self.isthing[s["category_id"]] for s in segments], dtype=torch.int64),
            "iscrowd": torch.tensor([int(s.get("iscrowd", 0)) for s in segments], dtype=torch.int64),
            "segment_ids": torch.tensor([s["id"] for s in segments], dtype=torch.int64),
            "image_id": ann["image_id"],
        }
        image = tv_tensors.Image(TF.pil_to_tensor(pil))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
