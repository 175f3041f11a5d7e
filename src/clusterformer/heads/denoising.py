"""Denoising queries (DN-DETR, DINO; for masks as in Mask DINO): a training-time accelerator of set prediction.

Besides its ``Q`` matching queries, the decoder gets ``G`` groups of denoising queries built from the ground truth:
each group holds one query per target object of the image (padded to the batch's largest count), whose content is
the embedding of the target's label (flipped to a random class with probability ``label_noise``) and whose position
is the target's box, shifted and rescaled by up to ``box_noise`` of its size. The same heads reconstruct the target
from each one (class, box and / or mask), with the target known in advance: no Hungarian matching, so these queries
learn box and mask regression from the first step, while the matching queries still face the set problem.

The groups are kept apart from each other and from the matching queries: in the self-attention (a block mask) and
in the clustering, whose E-step shares each pixel among the queries of one group only
(``ClusteringDecoder.forward``). The matching queries' predictions are therefore exactly those of a run without
denoising queries, and no denoising query reads another group's answers or the matching queries'.

For a model without a box head (instance, panoptic), the boxes are those that enclose the target masks on the padded
batch, as Mask DINO's; they position the queries and are not predicted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops import box_convert, masks_to_boxes

from .decoder import MLP, box_sine

__all__ = ["DenoisingQueries", "Denoiser", "noised_boxes"]


@dataclass
class DenoisingQueries:
    """The denoising queries of a batch.

    Attributes:
        queries: ``(B, G * n, D)`` content (label embeddings), group after group.
        query_pos: ``(B, G * n, D)`` position embeddings of the noised boxes.
        reference: ``(B, G * n, 4)`` the noised boxes, normalised ``cxcywh`` (the box head refines them).
        group_size: ``n``, the batch's largest number of targets; ``num_groups``: ``G``.
        indices: per image, ``(query index within the denoising queries, target index)`` of the queries that stand
            for a target (the others pad the groups and are trained as background).
    """

    queries: torch.Tensor
    query_pos: torch.Tensor
    reference: torch.Tensor
    group_size: int
    num_groups: int
    indices: list[tuple[torch.Tensor, torch.Tensor]]


def noised_boxes(boxes: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DN-DETR's box noise: ``boxes (n, 4)`` normalised ``cxcywh``; the centre moves by up to ``scale / 2`` of the
    box's size on each axis and the width and height change by up to ``scale`` of themselves (uniform); the result
    is clipped to the image, with sizes of at least 1e-3."""
    if scale <= 0 or boxes.numel() == 0:
        return boxes.clone()
    spread = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], 1)
    noise = torch.rand(boxes.shape, generator=generator, device=boxes.device, dtype=boxes.dtype) * 2 - 1
    out = boxes + noise * spread * scale
    xyxy = box_convert(out, "cxcywh", "xyxy").clamp(0, 1)
    out = box_convert(xyxy, "xyxy", "cxcywh")
    return torch.cat([out[:, :2], out[:, 2:].clamp_min(1e-3)], 1)


def target_boxes(target: dict) -> torch.Tensor:
    """A target's boxes, normalised ``cxcywh``: its ``boxes`` when it has them (relative to the image), otherwise
    those that enclose its ``masks`` on the padded map."""
    if "boxes" in target:
        return target["boxes"].float()
    masks = target["masks"]
    if masks.shape[0] == 0:
        return masks.new_zeros(0, 4, dtype=torch.float32)
    h, w = masks.shape[-2:]
    xyxy = masks_to_boxes(masks.bool()).float()
    xyxy = xyxy + torch.tensor([0.0, 0.0, 1.0, 1.0], device=xyxy.device)  # pixel squares: inclusive max corner
    xyxy = xyxy / torch.tensor([w, h, w, h], dtype=torch.float32, device=xyxy.device)
    return box_convert(xyxy, "xyxy", "cxcywh")


def _without_crowds(target: dict) -> dict:
    """The target without its crowd segments (``iscrowd``), which the losses drop as well: the target indices of
    the denoising queries count the other segments, in their order."""
    if "iscrowd" not in target:
        return target
    keep = target["iscrowd"] == 0
    return {key: target[key][keep.to(target[key].device)] for key in ("labels", "boxes", "masks") if key in target}


class Denoiser(nn.Module):
    """Builds the denoising queries of a batch from its targets.

    Args:
        num_classes: classes of the class head; a further embedding marks the padding queries.
        dim: width of the decoder's queries.
        num_groups: ``G``, groups of noised copies of the targets.
        label_noise: probability that a query's label is replaced by a random class.
        box_noise: ``scale`` of :func:`noised_boxes`.
    """

    def __init__(
        self, num_classes: int, dim: int, num_groups: int = 5, label_noise: float = 0.2, box_noise: float = 0.4
    ):
        super().__init__()
        if num_groups < 1:
            raise ValueError(f"denoising needs at least one group, got {num_groups}")
        if not 0 <= label_noise <= 1:
            raise ValueError(f"label_noise must lie in [0, 1], got {label_noise}")
        if box_noise < 0:
            raise ValueError(f"box_noise must be >= 0, got {box_noise}")
        self.num_classes = num_classes
        self.dim = dim
        self.num_groups = num_groups
        self.label_noise = label_noise
        self.box_noise = box_noise
        self.label_embed = nn.Embedding(num_classes + 1, dim)  # the last one: padding
        self.box_position = MLP(2 * dim, dim, dim, 2)

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, label_noise={self.label_noise}, box_noise={self.box_noise}"

    def forward(self, targets: list[dict]) -> DenoisingQueries | None:
        """The denoising queries of the batch's ``targets`` (``labels``, and ``boxes`` or ``masks``; crowd segments,
        ``iscrowd``, left out), or ``None`` when no image has a target."""
        targets = [_without_crowds(t) for t in targets]
        size = max((len(t["labels"]) for t in targets), default=0)
        if size == 0:
            return None
        device = self.label_embed.weight.device
        groups, batch = self.num_groups, len(targets)
        labels = torch.full((batch, groups, size), self.num_classes, dtype=torch.long, device=device)
        boxes = torch.tensor([0.5, 0.5, 0.1, 0.1], device=device).repeat(batch, groups, size, 1)
        indices = []
        for i, target in enumerate(targets):
            count = len(target["labels"])
            clean = target_boxes(target).to(device)
            for g in range(groups):
                label = target["labels"].to(device).clone()
                flip = torch.rand(count, device=device) < self.label_noise
                label[flip] = torch.randint(0, self.num_classes, (int(flip.sum()),), device=device)
                labels[i, g, :count] = label
                boxes[i, g, :count] = noised_boxes(clean, self.box_noise)
            queries = (
                torch.arange(groups, device=device)[:, None] * size + torch.arange(count, device=device)
            ).flatten()
            indices.append((queries, torch.arange(count, device=device).repeat(groups)))
        labels, boxes = labels.flatten(1), boxes.flatten(1, 2)
        return DenoisingQueries(
            queries=self.label_embed(labels),
            query_pos=self.box_position(box_sine(boxes, self.dim)),
            reference=boxes,
            group_size=size,
            num_groups=groups,
            indices=indices,
        )
