"""ImageFolder / ImageNet-style classification datasets with checked inputs."""

from __future__ import annotations

import logging
from pathlib import Path

from torchvision.datasets import ImageFolder

from ..errors import DatasetError, DatasetNotFoundError
from .images import IMAGE_SUFFIXES, ImageReadError, load_rgb

log = logging.getLogger(__name__)


class CheckedImageFolder(ImageFolder):
    """``torchvision.datasets.ImageFolder`` whose errors name the folder or file and the problem.

    Args:
        root: one sub-folder per class.
        transform: applied to the RGB PIL image.
        skip_unreadable: instead of failing on a corrupt image, warn, count it in ``skipped`` and
            use the next readable image.
    """

    def __init__(self, root: str | Path, transform=None, skip_unreadable: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise DatasetNotFoundError(f"{root}: dataset folder not found")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise DatasetError(f"{root}: no class folders (expected one sub-folder per class)")
        for name in classes:
            if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in (root / name).rglob("*") if p.is_file()):
                raise DatasetError(f"{root / name}: empty class folder (no files with an image extension)")
        super().__init__(str(root), transform=transform, loader=load_rgb)
        self.skip_unreadable = skip_unreadable
        self.skipped: set[str] = set()

    def __getitem__(self, index: int):
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = self.loader(path)
            except ImageReadError as error:
                if not self.skip_unreadable:
                    raise
                if path not in self.skipped:
                    self.skipped.add(path)
                    log.warning("skipping unreadable image (%d so far): %s", len(self.skipped), error)
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, target
        raise ImageReadError(f"{self.root}: no readable image at all")
