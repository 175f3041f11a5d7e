"""Loss terms shared by the criteria: dice and sigmoid cross-entropy of mask logits, Mask2Former's
uncertainty-based point sampling (``uncertainty_points``, reading the maps with ``point_sample``), and the
nearest-neighbour resampling of targets to a prediction's resolution (``sample_at_centres``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clusterformer.data.semantic import IGNORE_INDEX  # void in semantic maps

from .matching import point_sample

__all__ = ["IGNORE_INDEX", "dice_loss", "point_sample", "sample_at_centres", "sigmoid_ce_loss", "uncertainty_points"]


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float | torch.Tensor) -> torch.Tensor:
    """Dice loss ``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` per mask, summed and divided by ``num_masks``.

    ``logits (M, ...)`` and ``targets (M, ...)`` (in ``[0, 1]``) are flattened per mask.
    """
    prob = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def sigmoid_ce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float | torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over each mask's points, summed over masks, divided by
    ``num_masks``. ``logits (M, ...)``, ``targets (M, ...)`` in ``[0, 1]``."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.flatten(1).mean(1).sum() / num_masks


@torch.no_grad()
def uncertainty_points(
    mask_logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
) -> torch.Tensor:
    """Mask2Former's importance sampling of points (PointRend, Kirillov et al. 2020).

    Draw ``int(oversample_ratio * num_points)`` uniform random points per mask, keep the
    ``int(importance_sample_ratio * num_points)`` most uncertain ones (largest ``-|logit|``, the logit
    interpolated at the point), and fill up with uniform random points.

    Args:
        mask_logits: ``(M, h, w)`` mask logits.

    Returns:
        ``(M, num_points, 2)`` float32 points ``(x, y)`` in ``[0, 1]``, the uncertain ones first.
    """
    if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
        raise ValueError(
            f"uncertainty_points: need oversample_ratio >= 1 and importance_sample_ratio in [0, 1], got "
            f"{oversample_ratio} and {importance_sample_ratio}"
        )
    num_masks, device = mask_logits.shape[0], mask_logits.device
    num_oversampled = int(num_points * oversample_ratio)
    num_uncertain = int(num_points * importance_sample_ratio)
    candidates = torch.rand(num_masks, num_oversampled, 2, device=device, dtype=torch.float32)
    with torch.autocast(device.type, enabled=False):
        uncertainty = -point_sample(mask_logits.float()[:, None], candidates)[:, 0].abs()  # (M, kN)
    chosen = uncertainty.topk(num_uncertain, dim=1).indices
    points = candidates.gather(1, chosen[..., None].expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        random = torch.rand(num_masks, num_random, 2, device=device, dtype=torch.float32)
        points = torch.cat([points, random], dim=1)
    return points


def sample_at_centres(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resampling of ``(..., H, W)`` maps (any dtype) to ``(..., h, w)``: output cell ``(i, j)``
    takes the input pixel under its centre, ``floor((i + 1/2) H / h)`` (``F.interpolate``'s ``nearest-exact``;
    deeplab2's strided downsampling of the ground truth). Used to bring targets to a prediction's resolution."""
    height, width = maps.shape[-2:]

    def centres(count: int, extent: int) -> torch.Tensor:
        position = (torch.arange(count, device=maps.device, dtype=torch.float64) + 0.5) * (extent / count)
        return position.long().clamp_(max=extent - 1)

    return maps[..., centres(size[0], height), :][..., centres(size[1], width)]
