"""Set prediction with the clustering decoder: detection (boxes) and instance segmentation (masks).

``ClusterFormerSets(backbone, decoder, head)`` runs the encoder (stage features and the last block's
cluster centers), the clustering decoder and, on the queries after every decoder layer, the
per-query head. Its output (DETR's layout, one dict per layer):

* ``logits (B, Q, C)``: class logits, one sigmoid per class (no "no object" class; the paper trains
  the class FFN with a binary cross-entropy / focal loss);
* ``boxes (B, Q, 4)``: normalised ``cxcywh`` in ``[0, 1]``, relative to each image's own size
  (before batch padding), when the head predicts boxes;
* ``masks (B, Q, H/4, W/4)``: mask logits on the padded batch at stride 4, when it predicts masks;
* ``aux``: the same dicts for the earlier decoder layers (deep supervision);
* with a ``semantic_head`` (panoptic), in training mode only: ``semantic_logits (B, C, H/4, W/4)`` from
  the mask features and the mask features themselves as ``pixel_embeddings``, for kMaX-DeepLab's semantic
  and instance-discrimination auxiliary losses.
"""

from __future__ import annotations

import math

import timm
import torch
from torch import nn

from .decoder import ClusteringDecoder


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = x.relu()
        return x


def grid_boxes(count: int) -> torch.Tensor:
    """``(count, 4)`` normalised ``cxcywh`` boxes: the cells of a ``g x g`` grid (``g = ceil(sqrt(count))``),
    row-major, the first ``count`` of them."""
    g = math.ceil(math.sqrt(count))
    centres = (torch.arange(g, dtype=torch.float32) + 0.5) / g
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    cells = torch.stack([cx.flatten(), cy.flatten(), torch.full((g * g,), 1 / g), torch.full((g * g,), 1 / g)], -1)
    return cells[:count]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


class SetPredictionHead(nn.Module):
    """Per-query class FFN, box MLP (``boxes=True``) and mask embedding (``mask_dim`` given).

    The class bias starts at ``-log((1 - 0.01) / 0.01)`` (prior probability 0.01), as for focal losses.
    Boxes are refined layer by layer (Deformable DETR's iterative refinement): a layer predicts
    ``sigmoid(MLP(query) + logit(reference))``, where the reference is the previous layer's box (detached)
    and, for the first layer, a learnt box per query that starts as a cell of a grid over the image.
    """

    def __init__(
        self, dim: int, num_classes: int, boxes: bool = True, mask_dim: int | None = None, num_queries: int = 100
    ):
        super().__init__()
        if not boxes and mask_dim is None:
            raise ValueError("the head must predict boxes, masks or both")
        self.num_classes = num_classes
        self.class_embed = nn.Linear(dim, num_classes)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        self.box_embed = MLP(dim, dim, 4, 3) if boxes else None
        self.reference = nn.Parameter(inverse_sigmoid(grid_boxes(num_queries))) if boxes else None
        self.mask_embed = MLP(dim, dim, mask_dim, 3) if mask_dim is not None else None

    def forward(
        self, queries: torch.Tensor, mask_features: torch.Tensor | None, reference: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``queries (B, Q, D)``, ``mask_features (B, E, h, w)``, ``reference (B, Q, 4)`` boxes (default: the
        learnt first-layer references) -> ``logits``, ``boxes``, ``masks``."""
        out = {"logits": self.class_embed(queries)}
        if self.box_embed is not None:
            logit_reference = self.reference if reference is None else inverse_sigmoid(reference)
            out["boxes"] = (self.box_embed(queries) + logit_reference).sigmoid()
        if self.mask_embed is not None:
            out["masks"] = torch.einsum("bqe,behw->bqhw", self.mask_embed(queries), mask_features)
        return out


class ClusterFormerSets(nn.Module):
    """Backbone + clustering decoder + set-prediction head (parts passed in, as DETR).

    ``backbone`` is a ``ClusterFormer`` (it must provide ``forward_dense``)."""

    def __init__(
        self,
        backbone: nn.Module,
        decoder: ClusteringDecoder,
        head: SetPredictionHead,
        semantic_head: nn.Module | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.head = head
        self.semantic_head = semantic_head

    def forward(self, images: torch.Tensor) -> dict:
        """``images (B, 3, H, W)``, ``H`` and ``W`` best multiples of 32 -> see the module docstring."""
        features, centers = self.backbone.forward_dense(images)
        states, mask_features = self.decoder(features, centers)
        outputs, reference = [], None
        for state in states:
            outputs.append(self.head(state, mask_features, reference))
            if "boxes" in outputs[-1]:  # the next layer refines this layer's boxes
                reference = outputs[-1]["boxes"].detach()
        final = {**outputs[-1], "aux": outputs[:-1]}
        if self.semantic_head is not None and self.training:  # panoptic auxiliary heads (kMaX-DeepLab)
            final["semantic_logits"] = self.semantic_head(mask_features)
            final["pixel_embeddings"] = mask_features
        return final


def build_set_model(
    backbone: str = "clusterformer_tiny",
    num_classes: int = 80,
    boxes: bool = True,
    masks: bool = False,
    num_queries: int = 100,
    dim: int = 256,
    mask_dim: int = 256,
    num_layers: int = 6,
    num_heads: int = 8,
    iterations: int = 3,
    ffn_dim: int = 2048,
    dropout: float = 0.0,
    query_init: str = "encoder",
    backbone_kwargs: dict | None = None,
    semantic_head: bool = False,
) -> ClusterFormerSets:
    """A detection (``boxes``) and/or instance (``masks``) model on a registered ClusterFormer backbone.

    ``semantic_head`` adds the panoptic auxiliary outputs. ``backbone_kwargs`` go to ``timm.create_model``
    (e.g. ``drop_path_rate``, or
    ``pretrained=True, pretrained_cfg_overlay=dict(file="tiny.safetensors")`` for ImageNet weights).
    """
    encoder = timm.create_model(backbone, num_classes=0, **(backbone_kwargs or {}))
    if not hasattr(encoder, "forward_dense"):
        raise ValueError(f"{backbone} is not a ClusterFormer backbone (it has no forward_dense)")
    last_block = encoder.stages[-1].blocks[-1]
    decoder = ClusteringDecoder(
        in_channels=encoder.embed_dims,
        center_dim=last_block.num_heads * last_block.head_dim,
        num_centers=last_block.num_centers,
        num_queries=num_queries,
        dim=dim,
        mask_dim=mask_dim if masks else None,
        num_layers=num_layers,
        num_heads=num_heads,
        iterations=iterations,
        ffn_dim=ffn_dim,
        dropout=dropout,
        query_init=query_init,
    )
    head = SetPredictionHead(
        dim, num_classes, boxes=boxes, mask_dim=mask_dim if masks else None, num_queries=num_queries
    )
    if semantic_head and not masks:
        raise ValueError("semantic_head needs the mask features (masks=True)")
    semantic = nn.Conv2d(mask_dim, num_classes, 1) if semantic_head else None
    return ClusterFormerSets(encoder, decoder, head, semantic)
