"""Binary masks and panoptic id maps in the COCO formats: one implementation for the data and the metrics.

* **Compressed RLE** (pycocotools' ``mask.encode``), with ``counts`` as an ASCII string so that it goes into
  JSON as it is: the instance annotations of the shapes dataset, the COCO results of the detection and
  panoptic evaluations, ``clusterformer predict``'s instance JSON.
* **Boxes** ``[x, y, width, height]`` of masks, from their RLE (``pycocotools.mask.toBbox``: the tightest box
  of the pixels, an empty mask gives zeros).
* **Panoptic ids <-> RGB**: COCO panoptic PNGs store the segment id of a pixel as ``id = R + 256 G + 256^2 B``
  (``0`` is void), so ids lie in ``0..256^3 - 1``.

It imports nothing from the rest of the package, so that both ``data`` and ``metrics`` use it.
"""

from __future__ import annotations

import numpy as np
import torch

ID_LIMIT = 256**3  # panoptic segment ids are 24-bit: 0..ID_LIMIT - 1


def _numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def encode_rles(masks) -> list[dict]:
    """``(N, H, W)`` binary masks (numpy or torch, any dtype; non-zero is inside) as ``N`` compressed RLEs
    ``{"size": [H, W], "counts": str}``, encoded by pycocotools in one call."""
    from pycocotools import mask as mask_utils

    masks = _numpy(masks)
    if masks.ndim != 3:
        raise ValueError(f"expected (N, H, W) masks, got shape {masks.shape}")
    # pycocotools encodes a Fortran-ordered (H, W, N) uint8 array
    stacked = np.asfortranarray((masks != 0).astype(np.uint8).transpose(1, 2, 0))
    return [
        {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
        for rle in mask_utils.encode(stacked)
    ]


def encode_rle(mask) -> dict:
    """One ``(H, W)`` binary mask as a compressed RLE ``{"size": [H, W], "counts": str}``."""
    mask = _numpy(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {mask.shape}")
    return encode_rles(mask[None])[0]


def rle_to_bbox(rle: dict) -> list[float]:
    """The box ``[x, y, width, height]`` (floats, pixels) of the pixels of a compressed RLE; zeros when empty."""
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    encoded = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return [float(v) for v in mask_utils.toBbox(encoded)]


def mask_to_bbox(mask) -> list[float]:
    """The box ``[x, y, width, height]`` of an ``(H, W)`` binary mask (``rle_to_bbox`` of its RLE)."""
    return rle_to_bbox(encode_rle(mask))


def rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic encoding: ``id = R + 256 G + 256^2 B`` of an ``(..., 3)`` array, as int64."""
    rgb = np.asarray(rgb).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def ids_to_rgb(ids) -> np.ndarray:
    """The inverse of :func:`rgb_to_ids`: integer ids in ``0..256^3 - 1`` as an ``(..., 3)`` uint8 array, filled
    channel by channel (no ``(..., 3)`` int64 array for a large map)."""
    ids = _numpy(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"expected integer segment ids, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= ID_LIMIT):
        raise ValueError(f"segment ids must lie in 0..{ID_LIMIT - 1}, got {ids.min()}..{ids.max()}")
    rgb = np.empty((*ids.shape, 3), np.uint8)
    for channel in range(3):
        rgb[..., channel] = ids >> (8 * channel) & 255
    return rgb
