"""The mask module: RLEs that pycocotools decodes back, tight boxes from the RLE, panoptic ids <-> RGB."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from clusterformer.data.masks import encode_rle, encode_rles, ids_to_rgb, mask_to_bbox, rgb_to_ids, rle_to_bbox


def random_masks(rng, count=40, h=23, w=17):
    masks = rng.uniform(size=(count, h, w)) < rng.uniform(0.02, 0.5, (count, 1, 1))
    masks[0] = False  # empty
    masks[1] = False
    masks[1, 5, 3] = True  # one pixel
    masks[2] = False
    masks[2, -3:, 4] = masks[2, :2, 5] = True  # a run across a column boundary, ending high in the next column
    return masks


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def test_rles_decode_back_and_one_call_equals_one_by_one():
    masks = random_masks(np.random.default_rng(0))
    rles = encode_rles(torch.from_numpy(masks))
    assert rles == [encode_rle(mask) for mask in masks]
    for mask, rle in zip(masks, rles, strict=True):
        assert list(rle) == ["size", "counts"] and rle["size"] == [23, 17] and isinstance(rle["counts"], str)
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
        assert (decoded.astype(bool) == mask).all()


def test_boxes_are_the_tightest_boxes_of_the_pixels():
    for mask in random_masks(np.random.default_rng(1)):
        assert rle_to_bbox(encode_rle(mask)) == tight_box(mask) == mask_to_bbox(mask)


def test_panoptic_ids_and_rgb_round_trip():
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 256**3 - 1, 1234567]])
    rgb = ids_to_rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 4, 3)
    assert rgb[0, 3].tolist() == [0, 1, 0] and rgb[1, 1].tolist() == [0, 0, 1]
    assert (rgb_to_ids(rgb) == ids).all()
    assert (ids_to_rgb(torch.from_numpy(ids)) == rgb).all()
    with pytest.raises(ValueError, match=r"segment ids must lie in 0..16777215"):
        ids_to_rgb(np.array([[256**3]]))
    with pytest.raises(ValueError, match=r"integer segment ids"):
        ids_to_rgb(np.zeros((2, 2)))
