"""Drawing predictions and cluster maps on images: colours, label maps with boundaries, boxes, text, legends.

Shared by ``clusterformer predict`` (overlays), ``clusterformer explain`` (cluster maps) and the demo's report.
Pictures are ``(H, W, 3)`` uint8 arrays or PIL images; nothing here runs a model. Boxes and single masks are drawn
by torchvision (``draw_bounding_boxes``, ``draw_segmentation_masks``); label and cluster maps, which colour every
pixel by its class, are blended here (:func:`blend`), without one full-size mask per class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

GOLDEN = 0.618033988749895
WHITE = (255, 255, 255)


def distinct_colours(count: int) -> np.ndarray:
    """``(count, 3)`` uint8 colours that stay apart: hues stepped by the golden ratio, saturation and
    brightness cycling over three levels so that neighbours in the list differ in more than hue."""
    from matplotlib.colors import hsv_to_rgb

    index = np.arange(count)
    hsv = np.stack([(index * GOLDEN) % 1.0, np.array([0.85, 0.6, 0.95])[index % 3],
                    np.array([0.95, 0.8, 0.65])[(index // 3) % 3]], -1)  # fmt: skip
    return np.round(hsv_to_rgb(hsv) * 255).astype(np.uint8).reshape(count, 3)


def class_colours(num_classes: int, categories: Sequence[Mapping] | None = None) -> np.ndarray:
    """``(num_classes, 3)`` uint8: each category's ``color`` where the dataset gives one (COCO panoptic,
    the shapes dataset), :func:`distinct_colours` otherwise."""
    colours = distinct_colours(num_classes)
    for i, category in enumerate((categories or [])[:num_classes]):
        if isinstance(category.get("color"), list | tuple) and len(category["color"]) == 3:
            colours[i] = category["color"]
    return colours


def boundaries(ids: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: pixels whose upper or left neighbour has another id (1-pixel lines between regions)."""
    edge = np.zeros(ids.shape, bool)
    edge[1:] |= ids[1:] != ids[:-1]
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    return edge


def colour_map(values: np.ndarray, colours: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
    """``(H, W)`` class (or cluster) indices -> ``(H, W, 3)`` uint8; values outside ``0..len(colours)-1``
    (void, 255, negative) are black; with ``ids``, the boundaries between ids are white."""
    values = np.asarray(values)
    valid = (values >= 0) & (values < len(colours))
    picture = colours[np.where(valid, values, 0)]
    picture[~valid] = 0
    if ids is not None:
        picture[boundaries(ids)] = WHITE
    return picture


def blend(image: np.ndarray, colours: np.ndarray, alpha: float, where: np.ndarray | None = None) -> np.ndarray:
    """``(1 - alpha) * image + alpha * colours`` (uint8), only ``where`` (bool ``(H, W)``) if given."""
    mixed = np.round((1 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)).astype(np.uint8)
    if where is None:
        return mixed
    out = image.copy()
    out[where] = mixed[where]
    return out


def draw_mask(picture: np.ndarray, mask, colour: Sequence[int], alpha: float) -> np.ndarray:
    """``picture`` (``(H, W, 3)``, uint8, or float in [0, 1]) with the bool ``(H, W)`` ``mask`` blended in
    ``colour`` (RGB, 0-255) at opacity ``alpha``: torchvision's ``draw_segmentation_masks``. A new array."""
    from torchvision.utils import draw_segmentation_masks

    image = torch.from_numpy(np.ascontiguousarray(picture)).permute(2, 0, 1)
    mask = torch.as_tensor(np.asarray(mask), dtype=torch.bool)[None]
    drawn = draw_segmentation_masks(image, mask, alpha=alpha, colors=tuple(int(c) for c in colour))
    return np.ascontiguousarray(drawn.permute(1, 2, 0).numpy())


def display_factor(height: int, width: int, min_side: int = 512) -> int:
    """Integer enlargement that brings the longer side of a small image to at least ``min_side`` pixels,
    so that text drawn on it stays readable (1 for images that are large enough)."""
    return max(1, math.ceil(min_side / max(height, width, 1)))


def enlarge(array: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement of the first two axes by an integer factor."""
    return array if factor == 1 else np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's built-in font at ``size`` pixels."""
    return ImageFont.load_default(size=max(8, int(size)))


def font_size(height: int, width: int) -> int:
    """Text height for a picture: about 1/30 of the shorter side, 12 to 40 pixels."""
    return int(min(40, max(12, min(height, width) / 30)))


def text_colour(background: Sequence[int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``background``."""
    r, g, b = (int(c) for c in background[:3])
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else WHITE


def draw_label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill, text_font, above: bool = True):
    """``text`` on a filled box whose bottom-left (``above``) or top-left corner is ``xy``, kept inside the picture."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=text_font)
    w, h = right - left + 4, bottom - top + 4
    width, height = draw.im.size
    x = min(max(0.0, xy[0]), max(0.0, width - w))
    y = xy[1] - h if above else xy[1]
    y = min(max(0.0, y), max(0.0, height - h))
    draw.rectangle((x, y, x + w, y + h), fill=tuple(int(c) for c in fill))
    draw.text((x + 2 - left, y + 2 - top), text, fill=text_colour(fill), font=text_font)


def draw_boxes(
    picture: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[str], colours: Sequence[Sequence[int]]
) -> Image.Image:
    """Rectangles (``xyxy`` pixels of ``picture``; torchvision's ``draw_bounding_boxes``), each with its label on a
    box of its colour above it, kept inside the picture; returns the picture drawn."""
    from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image
    from torchvision.utils import draw_bounding_boxes

    text_font = font(font_size(picture.height, picture.width))
    line = max(1, round(min(picture.size) / 250))
    if len(boxes):
        xyxy = torch.tensor([[float(v) for v in box] for box in boxes]).reshape(-1, 4)
        xyxy = torch.cat([xyxy[:, :2].minimum(xyxy[:, 2:]), xyxy[:, :2].maximum(xyxy[:, 2:])], 1)  # corners in order
        colors = [tuple(int(c) for c in colour) for colour in colours]
        picture = to_pil_image(draw_bounding_boxes(pil_to_tensor(picture), xyxy, colors=colors, width=line))
    draw = ImageDraw.Draw(picture)
    for (x0, y0, _, _), text, colour in zip(boxes, labels, colours, strict=True):  # text above every box
        draw_label(draw, (x0, y0), text, colour, text_font)
    return picture


def draw_text_block(picture: Image.Image, lines: Sequence[str]) -> Image.Image:
    """Lines of text on a dark box in the top-left corner; returns ``picture``, drawn in place."""
    draw = ImageDraw.Draw(picture, "RGBA")
    text_font = font(font_size(picture.height, picture.width))
    boxes = [draw.textbbox((0, 0), line, font=text_font) for line in lines]
    step = max(b[3] - b[1] for b in boxes) + 6
    width = max(b[2] - b[0] for b in boxes) + 12
    draw.rectangle((0, 0, width, step * len(lines) + 8), fill=(0, 0, 0, 170))
    for i, line in enumerate(lines):
        draw.text((6, 4 + i * step), line, fill=WHITE, font=text_font)
    return picture


def legend(entries: Sequence[tuple[str, Sequence[int]]], height: int, text_font) -> Image.Image:
    """A white panel of ``height`` pixels listing ``(name, colour)`` entries as swatches and names; entries that
    do not fit are summarised as "+ n more"."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = max(probe.textbbox((0, 0), name or " ", font=text_font)[3] for name, _ in entries) if entries else 12
    step = line + 8
    width = 16 + line + max((probe.textbbox((0, 0), name, font=text_font)[2] for name, _ in entries), default=40)
    panel = Image.new("RGB", (int(width) + 8, height), WHITE)
    draw = ImageDraw.Draw(panel)
    fits = max(1, (height - 8) // step)
    shown = entries if len(entries) <= fits else entries[: fits - 1]
    for i, (name, colour) in enumerate(shown):
        y = 6 + i * step
        draw.rectangle((6, y, 6 + line, y + line), fill=tuple(int(c) for c in colour), outline=(0, 0, 0))
        draw.text((12 + line, y), name, fill=(0, 0, 0), font=text_font)
    if len(shown) < len(entries):
        draw.text((6, 6 + len(shown) * step), f"+ {len(entries) - len(shown)} more", fill=(0, 0, 0), font=text_font)
    return panel


def with_legend(picture: Image.Image, entries: Sequence[tuple[str, Sequence[int]]]) -> Image.Image:
    """``picture`` with a :func:`legend` of ``entries`` on its right."""
    panel = legend(entries, picture.height, font(font_size(picture.height, picture.width)))
    out = Image.new("RGB", (picture.width + panel.width, picture.height), WHITE)
    out.paste(picture, (0, 0))
    out.paste(panel, (picture.width, 0))
    return out
