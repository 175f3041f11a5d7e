"""Boxes and masks drawn with torchvision look as they did when drawn by hand: the same rectangles and labels, the
same blend of a mask (to one level of rounding), and ``predict``'s instance overlays show both."""

import numpy as np
import torch
from PIL import Image, ImageDraw

from clusterformer import pictures
from clusterformer.commands.predict import SetWriter
from clusterformer.resampling import ResizedMasks
from clusterformer.results import ClassInfo, Instances
from clusterformer.weights import TaskModel

RED, BLUE = (230, 20, 40), (20, 60, 220)


def grey(height: int, width: int) -> Image.Image:
    return Image.fromarray(np.full((height, width, 3), 128, np.uint8))


def hand_drawn_boxes(picture: Image.Image, boxes, labels, colours) -> Image.Image:
    """What ``pictures.draw_boxes`` drew before it used torchvision: PIL rectangles, then the labels."""
    draw = ImageDraw.Draw(picture)
    text_font = pictures.font(pictures.font_size(picture.height, picture.width))
    line = max(1, round(min(picture.size) / 250))
    for box, colour in zip(boxes, colours, strict=True):
        draw.rectangle(box, outline=colour, width=line)
    for (x0, y0, _, _), text, colour in zip(boxes, labels, colours, strict=True):
        pictures.draw_label(draw, (x0, y0), text, colour, text_font)
    return picture


def test_boxes_and_their_labels_are_drawn_as_before():
    boxes, labels, colours = [(40, 60, 200, 300), (250, 30, 500, 120)], ["circle 0.91", "star 0.55"], [RED, BLUE]
    drawn = np.asarray(pictures.draw_boxes(grey(400, 600), boxes, labels, colours))
    assert np.array_equal(drawn, np.asarray(hand_drawn_boxes(grey(400, 600), boxes, labels, colours)))
    line = max(1, round(400 / 250))
    assert (drawn[100, 40 : 40 + line] == RED).all() and (drawn[100, 201 - line : 201] == RED).all()  # the sides
    assert (drawn[150, 100] == 128).all()  # the inside is left alone
    assert (drawn[: 60 - line, 40:60] == RED).any()  # the label's box above the rectangle
    # no box: the picture as it was; corners in either order: the same rectangle
    assert np.array_equal(np.asarray(pictures.draw_boxes(grey(40, 60), [], [], [])), np.asarray(grey(40, 60)))
    swapped = np.asarray(pictures.draw_boxes(grey(400, 600), [(200, 300, 40, 60)], ["x"], [RED]))
    ordered = np.asarray(pictures.draw_boxes(grey(400, 600), [boxes[0]], ["x"], [RED]))
    assert np.array_equal(swapped[100], ordered[100])


def test_a_mask_is_blended_as_before():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), np.uint8)
    mask = rng.random((30, 40)) > 0.5
    drawn = pictures.draw_mask(image, mask, RED, 0.5)
    by_hand = pictures.blend(image, np.array(RED, np.uint8), 0.5, mask)
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    assert np.abs(drawn.astype(int) - by_hand.astype(int)).max() <= 1  # torchvision truncates, blend rounds
    assert np.array_equal(drawn[~mask], image[~mask])
    floats = pictures.draw_mask(image / 255.0, mask, RED, 0.55)  # the demo's pictures are floats in [0, 1]
    np.testing.assert_allclose(floats[mask], 0.45 * image[mask] / 255 + 0.55 * np.array(RED) / 255, atol=1e-6)


def test_instance_overlays_show_each_mask_and_box_in_its_class_colour(tmp_path):
    categories = [{"id": 1, "name": "circle", "color": list(RED)}, {"id": 2, "name": "star", "color": list(BLUE)}]
    model = TaskModel("instance", torch.nn.Identity(), ["circle", "star"], categories)
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[0, 10:30, 10:30] = masks[1, 40:60, 30:60] = masks[2, 0:5, 0:5] = True
    image = grey(64, 64)
    result = Instances(image=image, classes=ClassInfo(model.classes, categories), mask_source=ResizedMasks(masks),
                       boxes=np.array([[10.0, 10, 30, 30], [30, 40, 60, 60], [0, 0, 5, 5]], np.float32),
                       scores=np.array([0.9, 0.8, 0.1], np.float32), labels=np.array([0, 1, 0]),
                       names=["circle", "star", "circle"])  # fmt: skip
    overlay = np.asarray(SetWriter(tmp_path, model, None).overlay(result)).astype(int)
    factor = pictures.display_factor(64, 64)
    assert overlay.shape == (64 * factor, 64 * factor, 3)
    for (y, x), colour in (((20, 20), RED), ((50, 45), BLUE)):  # inside each mask kept (score >= 0.5): blended
        assert np.abs(overlay[y * factor, x * factor] - (128 + np.array(colour)) / 2).max() <= 1
    assert (overlay[3 * factor, 3 * factor] == 128).all()  # under the score threshold: not drawn
    assert (overlay[20 * factor, 10 * factor] == RED).all() and (overlay[50 * factor, 30 * factor] == BLUE).all()
