"""ADE20K-style semantic segmentation (image folder + label PNG folder) read into tv_tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from ..errors import DatasetError, DatasetNotFoundError
from .images import IMAGE_SUFFIXES, ImageReadError, load_rgb

IGNORE_INDEX = 255  # void in semantic label maps: the one definition (losses and metrics import it)


class SemanticFolder(torch.utils.data.Dataset):
    """``images_dir/NAME.{jpg,png,...}`` with ``labels_dir/NAME.png`` as ``(Image, Mask)``.

    Label PNGs are 8-bit single-channel. With ``reduce_zero_label`` (ADE20K's files: 0 = unlabelled,
    1..C the classes) labels become ``0..C-1`` and unlabelled pixels ``255``, mmsegmentation's
    convention; without it the file values are used as they are. Any other value outside
    ``0..num_classes-1`` is an error naming the file and the values.
    """

    def __init__(
        self,
        images_dir: str | Path,
        labels_dir: str | Path,
        num_classes: int,
        reduce_zero_label: bool = True,
        transforms=None,
    ):
        self.images_dir, self.labels_dir = Path(images_dir), Path(labels_dir)
        for folder in (self.images_dir, self.labels_dir):
            if not folder.is_dir():
                raise DatasetNotFoundError(f"{folder}: folder not found")
        self.images = sorted(p for p in self.images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise DatasetError(f"{self.images_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
        self.labels = [self.labels_dir / f"{p.stem}.png" for p in self.images]
        missing = [str(label) for label in self.labels if not label.is_file()]
        if missing:
            raise DatasetNotFoundError(f"{self.labels_dir}: {len(missing)} label PNGs are missing, e.g. {missing[0]}")
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.images)

    def read_label(self, path: Path, size: tuple[int, int]) -> np.ndarray:
        """The checked label map of ``path`` for an image of ``size = (width, height)``."""
        try:
            with Image.open(path) as label:
                mode = label.mode
                array = np.asarray(label)
        except OSError as error:
            raise ImageReadError(f"{path}: not a readable label image ({error})") from error
        if mode not in ("L", "P"):
            raise DatasetError(f"{path}: label PNG must be 8-bit single-channel (mode L or P), got mode {mode}")
        if array.shape != (size[1], size[0]):
            raise DatasetError(
                f"{path}: label is {array.shape[1]}x{array.shape[0]} but its image is {size[0]}x{size[1]}"
            )
        labels = array.astype(np.int64)
        if self.reduce_zero_label:
            labels = np.where(labels == 0, IGNORE_INDEX, labels - 1)
        bad = np.unique(labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.num_classes))])
        if bad.size:
            shown = (bad + 1 if self.reduce_zero_label else bad).tolist()[:10]
            raise DatasetError(f"{path}: label values {shown} are outside the {self.num_classes} classes")
        return labels

    def __getitem__(self, index: int):
        pil = load_rgb(self.images[index])
        labels = self.read_label(self.labels[index], pil.size)
        image, mask = tv_tensors.Image(TF.pil_to_tensor(pil)), tv_tensors.Mask(torch.from_numpy(labels))
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image, mask
