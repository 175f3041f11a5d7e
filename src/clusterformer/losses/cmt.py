"""CMT-DeepLab's mask approximation loss (Yu et al., CVPR 2022, §3.3, Eq. 13).

Each matched center's reference mask, ``M`` points ``r^c``, is pulled towards its ground-truth mask ``y`` through
their extremes and centres:

    L_ext = 1/(4K) sum_i |min r_i^h - min y_i^h| + |max r_i^h - max y_i^h|
                       + |min r_i^w - min y_i^w| + |max r_i^w - max y_i^w|
    L_cen = 1/(2K) sum_i |avg r_i^h - avg y_i^h| + |avg r_i^w - avg y_i^w|
    L_loc = L_ext + L_cen

over the ``K`` matched pairs, ``y`` the pixels of the mask: its extremes are those of its pixels (the left-most,
right-most, top-most and bottom-most pixel, ExtremeNet's extreme points read one coordinate each, as Eq. 13 reads
them) and its centre their mean (the mass centre). A pixel ``(i, j)`` of an ``H x W`` mask sits at its centre,
``((j + 0.5) / W, (i + 0.5) / H)``, the convention of the reference points' coordinate convolution.
"""

from __future__ import annotations

import torch

EXTREMES = ("left", "right", "top", "bottom", "centre_x", "centre_y")


def mask_extremes(masks: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``masks (K, H, W)`` booleans -> ``(K, 6)``: the left-most ``x``, right-most ``x``, top-most ``y`` and
    bottom-most ``y`` of each mask's pixels and their mean ``(x, y)`` (``EXTREMES``), normalised pixel centres. An
    empty mask gives ``NaN``."""
    _, h, w = masks.shape
    x = (torch.arange(w, device=masks.device, dtype=dtype) + 0.5) / w
    y = (torch.arange(h, device=masks.device, dtype=dtype) + 0.5) / h
    columns = masks.sum(1).to(dtype)  # (K, W): pixels per column
    rows = masks.sum(2).to(dtype)  # (K, H)
    inf = torch.tensor(float("inf"), device=masks.device, dtype=dtype)
    left = torch.where(columns > 0, x, inf).amin(-1)
    right = torch.where(columns > 0, x, -inf).amax(-1)
    top = torch.where(rows > 0, y, inf).amin(-1)
    bottom = torch.where(rows > 0, y, -inf).amax(-1)
    area = columns.sum(-1)
    centre_x = (columns * x).sum(-1) / area
    centre_y = (rows * y).sum(-1) / area
    extremes = torch.stack([left, right, top, bottom, centre_x, centre_y], -1)
    return extremes.masked_fill((area == 0)[:, None], float("nan"))


def point_extremes(points: torch.Tensor) -> torch.Tensor:
    """``points (K, P, 2)`` ``(x, y)`` -> ``(K, 6)``: min and max ``x``, min and max ``y``, mean ``x``, mean ``y``
    (``EXTREMES``)."""
    x, y = points[..., 0], points[..., 1]
    return torch.stack([x.amin(-1), x.amax(-1), y.amin(-1), y.amax(-1), x.mean(-1), y.mean(-1)], -1)


def mask_approximation_loss(points: torch.Tensor, target_masks: torch.Tensor) -> torch.Tensor:
    """Eq. 13, ``L_loc = L_ext + L_cen``, over matched pairs.

    Args:
        points: the matched centers' reference masks ``(K, P, 2)``, ``(x, y)`` normalised to ``[0, 1]`` over the
            image the masks cover.
        target_masks: their ground-truth masks ``(K, H, W)`` booleans, at any resolution. Pairs whose mask is
            empty (a mask cropped away) carry no extremes and are left out of the sum and of ``K``.

    Returns:
        a scalar (0, with a graph to ``points``, when no pair is left).
    """
    if points.shape[0] != target_masks.shape[0]:
        raise ValueError(f"{points.shape[0]} reference masks for {target_masks.shape[0]} target masks")
    present = target_masks.flatten(1).any(1)
    if not bool(present.any()):
        return points.sum() * 0
    predicted = point_extremes(points[present])
    target = mask_extremes(target_masks[present], points.dtype)
    gaps = (predicted - target).abs()
    pairs = predicted.shape[0]
    return gaps[:, :4].sum() / (4 * pairs) + gaps[:, 4:].sum() / (2 * pairs)
