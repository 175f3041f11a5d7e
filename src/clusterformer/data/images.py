"""Reading images from disk with errors that name the file and the problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import DatasetError

# the files that a folder of images is read for: torchvision's list (what ImageFolder reads)
IMAGE_SUFFIXES = tuple(IMG_EXTENSIONS)
ImageSize = int | tuple[int, int]


def parse_img_size(text: str) -> ImageSize:
    """An image size on the command line: ``"512"`` -> ``512``; ``"800x1216"`` (height x width) -> ``(800, 1216)``;
    anything else is a ``ValueError``."""
    parts = text.lower().split("x")
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) <= 0:
        raise ValueError(f"image size must be N or HxW with positive integers, got {text!r}")
    return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])


def image_hw(img_size: ImageSize) -> tuple[int, int]:
    """``(height, width)`` of a size given as one side or as ``(height, width)``."""
    return (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))


class ImageReadError(DatasetError):
    """An image file that cannot be used; the message names the file and the problem."""


def to_rgb(image: Image.Image) -> Image.Image:
    """An image as 8-bit RGB: grayscale, palette, RGBA (alpha dropped) and 16/32-bit grayscale (scaled to 8 bits)
    converted, RGB as it is."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as 8-bit RGB (:func:`to_rgb`).

    Grayscale, palette, RGBA (alpha dropped) and 16-bit images are converted; a missing, corrupt
    or truncated file raises :class:`ImageReadError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            image.load()
            rgb = to_rgb(image)
            return rgb.copy() if rgb is image else rgb  # the opened file is closed on leaving the block
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"{path}: not a readable image ({error})") from error
