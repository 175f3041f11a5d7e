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

from .decoder import MLP, ClusteringDecoder, cluster_boxes
from .denoising import Denoiser

BOX_REFERENCES = ("clusters", "refine")


def grid_boxes(count: int) -> torch.Tensor:
    """``(count, 4)`` normalised ``cxcywh`` boxes: the cells of a grid of ``ceil(sqrt(count))`` columns and
    as many rows as it takes (``20`` -> 4 x 5), row-major, the first ``count`` of them."""
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    cy, cx = torch.meshgrid(
        (torch.arange(rows, dtype=torch.float32) + 0.5) / rows,
        (torch.arange(cols, dtype=torch.float32) + 0.5) / cols,
        indexing="ij",
    )
    size = torch.tensor([1 / cols, 1 / rows]).expand(rows * cols, 2)
    return torch.cat([torch.stack([cx.flatten(), cy.flatten()], -1), size], -1)[:count]


class SetPredictionHead(nn.Module):
    """Per-query class FFN, box MLP (``boxes=True``) and mask embedding (``mask_dim`` given).

    The class bias starts at ``-log((1 - 0.01) / 0.01)`` (prior probability 0.01), as for focal losses.
    Boxes are refined layer by layer (Deformable DETR's iterative refinement): a layer predicts
    ``sigmoid(MLP(query) + logit(reference))``, where the reference is the previous layer's box (detached)
    and, for the first layer, a learnt box per query that starts as a cell of a grid over the image.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        boxes: bool = True,
        mask_dim: int | None = None,
        num_queries: int = 100,
        learnt_reference: bool = True,
    ):
        super().__init__()
        if not boxes and mask_dim is None:
            raise ValueError("the head must predict boxes, masks or both")
        self.num_classes = num_classes
        self.class_embed = nn.Linear(dim, num_classes)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        self.box_embed = MLP(dim, dim, 4, 3) if boxes else None
        learnt = boxes and learnt_reference
        self.reference = nn.Parameter(torch.logit(grid_boxes(num_queries), eps=1e-5)) if learnt else None
        self.mask_embed = MLP(dim, dim, mask_dim, 3) if mask_dim is not None else None

    def forward(
        self, queries: torch.Tensor, mask_features: torch.Tensor | None, reference: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``queries (B, Q, D)``, ``mask_features (B, E, h, w)``, ``reference (B, Q, 4)`` boxes (default: the
        learnt first-layer references) -> ``logits``, ``boxes``, ``masks``."""
        out = {"logits": self.class_embed(queries)}
        if self.box_embed is not None:
            logit_reference = self.reference if reference is None else torch.logit(reference, eps=1e-5)
            out["boxes"] = (self.box_embed(queries) + logit_reference).sigmoid()
        if self.mask_embed is not None:
            out["masks"] = torch.einsum("bqe,behw->bqhw", self.mask_embed(queries), mask_features)
        return out


class ClusterFormerSets(nn.Module):
    """Backbone + clustering decoder + set-prediction head (parts passed in, as DETR).

    ``backbone`` is a ``ClusterFormer`` (it must provide ``forward_dense``). With a ``denoiser`` (``Denoiser``) the
    training forward, given the targets, adds its denoising queries to the decoder and returns their predictions
    under ``dn`` (same layout, one query per (group, target) slot) with ``dn_indices``, the (query, target) pairs
    they reconstruct. With the decoder's ``query_selection`` the output also holds ``proposals``: the class logits
    (and boxes) of every encoder center, from which the queries were selected (supervised as a decoder layer)."""

    def __init__(
        self,
        backbone: nn.Module,
        decoder: ClusteringDecoder,
        head: SetPredictionHead,
        semantic_head: nn.Module | None = None,
        box_reference: str = "refine",
        denoiser: Denoiser | None = None,
    ):
        super().__init__()
        if box_reference not in BOX_REFERENCES:
            raise ValueError(f"box_reference must be one of {BOX_REFERENCES}, got {box_reference!r}")
        self.box_reference = box_reference
        self.backbone = backbone
        self.decoder = decoder
        decoder.keep_assignments = box_reference == "clusters"  # the boxes of the clusters read the assignments
        self.head = head
        self.semantic_head = semantic_head
        self.denoiser = denoiser

    def _reference(self, history: list[dict], assignments, hw, first=None) -> torch.Tensor | None:
        """The boxes that the head refines for a layer (``None``: the head's learnt first references; ``first``: the
        selected proposals' boxes, for the first prediction)."""
        if self.box_reference == "clusters" and self.head.box_embed is not None and assignments is not None:
            return cluster_boxes(assignments, hw)  # the box of the query's cluster, gradient included
        # every layer but the first refines the previous layer's (detached) boxes
        return history[-1]["boxes"].detach() if history and "boxes" in history[-1] else first

    def select(self, centers: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
        """Query selection: the class head (and the box head, from the cells of the encoder's pooling grid) on every
        projected encoder center -> the proposals (``logits``, ``boxes``), the ``Q`` top-scoring projected centers
        ``(B, Q, D)`` (by their highest class probability) and their boxes ``(B, Q, 4)`` (detached; ``None``
        without a box head)."""
        state = self.decoder.proposals(centers)
        proposals = {"logits": self.head.class_embed(state)}
        if self.head.box_embed is not None:
            grid = torch.logit(grid_boxes(state.shape[1]).to(state), eps=1e-5)
            proposals["boxes"] = (self.head.box_embed(state) + grid).sigmoid()
        top = proposals["logits"].detach().sigmoid().amax(-1).topk(self.decoder.num_queries, dim=1).indices
        selected = state.gather(1, top[..., None].expand(-1, -1, state.shape[-1]))
        boxes = None
        if "boxes" in proposals:
            boxes = proposals["boxes"].detach().gather(1, top[..., None].expand(-1, -1, 4))
        return proposals, selected, boxes

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None) -> dict:
        """``images (B, 3, H, W)``, ``H`` and ``W`` best multiples of 32 -> see the module docstring. ``targets``
        (training, with a denoiser): the batch's targets, from which the denoising queries are built."""
        features, centers = self.backbone.forward_dense(images)
        denoising = None
        if self.denoiser is not None and self.training and targets is not None:
            denoising = self.denoiser(targets)
        num_queries = self.decoder.num_queries
        outputs, dn_outputs = [], []
        proposals = selected = first_boxes = None
        if self.decoder.query_selection:
            proposals, selected, first_boxes = self.select(centers)

        affinities = []  # kMaX layers: their affinity logits, (B, Q [+ denoising], h, w) each

        def predict(state, mask_features, assignments, hw, affinity=None, references=None) -> dict:
            if affinity is not None:
                affinities.append(affinity.unflatten(-1, hw))
            points = {} if references is None else {"points": references[:, :num_queries]}
            if denoising is None:
                reference = self._reference(outputs, assignments, hw, first_boxes)
                outputs.append({**self.head(state, mask_features, reference), **points})
                return outputs[-1]
            # the matching queries exactly as without denoising; the denoising queries refine their noised boxes
            matching = assignments[:, :, :, :num_queries] if assignments is not None else None
            reference = self._reference(outputs, matching, hw, first_boxes)
            outputs.append({**self.head(state[:, :num_queries], mask_features, reference), **points})
            reference = dn_outputs[-1]["boxes"].detach() if dn_outputs and "boxes" in dn_outputs[-1] else None
            if reference is None and self.head.box_embed is not None:
                reference = denoising.reference
            dn_points = {} if references is None else {"points": references[:, num_queries:]}
            dn_outputs.append({**self.head(state[:, num_queries:], mask_features, reference), **dn_points})
            return {key: torch.cat([outputs[-1][key], dn_outputs[-1][key]], 1) for key in outputs[-1]}

        first = None
        if self.decoder.query_position == "boxes":
            first = self.head.reference.sigmoid().unsqueeze(0) if first_boxes is None else first_boxes
        _, mask_features = self.decoder(features, centers, predict, first, denoising, selected)
        aux, dn_aux = outputs[:-1], dn_outputs[:-1]
        if affinities:  # kMaX's deep supervision: every layer's affinity logits are that layer's mask logits

            def supervised(layers: list[dict], part: slice) -> list[dict]:
                # the layers' predictions are the last ones (masked attention's initial prediction comes first)
                start = len(layers) - len(affinities)
                return layers[:start] + [
                    {**out, "masks": maps[:, part]} for out, maps in zip(layers[start:], affinities, strict=True)
                ]

            aux = supervised(outputs, slice(None, num_queries))
            if denoising is not None:
                dn_aux = supervised(dn_outputs, slice(num_queries, None))
        final = {**outputs[-1], "aux": aux}
        if proposals is not None:
            final["proposals"] = proposals
        if denoising is not None:
            final["dn"] = {**dn_outputs[-1], "aux": dn_aux}
            final["dn_indices"] = denoising.indices
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
    query_position: str = "learnt",
    box_reference: str = "refine",
    backbone_kwargs: dict | None = None,
    semantic_head: bool = False,
    m_step: str = "mean",
    temperature: float | None = None,
    masked_attention: bool = False,
    query_selection: bool = False,
    denoising: int = 0,
    dn_label_noise: float = 0.2,
    dn_box_noise: float = 0.4,
    kind: str = "clusterformer",
    pixel_path: str = "fpn",
) -> ClusterFormerSets:
    """A detection (``boxes``) and/or instance (``masks``) model on a registered ClusterFormer backbone.

    ``query_position``: the decoder queries' position embeddings, ``"learnt"`` (default) or ``"boxes"``
    (from each query's previous box). ``box_reference``: what a layer's box refines, ``"refine"`` (the
    previous layer's box, the first layer a learnt box per query: Deformable DETR's iterative refinement,
    default) or ``"clusters"`` (the box of the query's cluster in that layer, ``decoder.cluster_boxes``).

    ``m_step``: the decoder's clustering, ``"mean"`` (EM reading, default) or ``"sum"`` (Algorithm 1 to the
    letter); the encoder's is ``backbone_kwargs["m_step"]`` (``docs/architecture.md``). ``temperature``: the
    decoder's EM E-step temperature (``None``: the default); the encoder's is ``backbone_kwargs["temperature"]``.

    Convergence accelerators (``docs/heads.md``; off by default, the paper's decoder): ``masked_attention``
    restricts each decoder layer's E-step to each query's foreground in the previous layer's masks (Mask2Former;
    models with masks); ``query_selection`` starts the queries from the top-scoring encoder centers (DINO / Mask
    DINO's query selection); ``denoising`` adds that many groups of denoising queries in training (DN-DETR / DINO /
    Mask DINO, ``heads.denoising``), with labels flipped at ``dn_label_noise`` and boxes moved by ``dn_box_noise``.

    ``kind`` and ``pixel_path`` choose the decoder's layers and pixel path (``decoder.DECODER_LAYERS``,
    ``decoder.PIXEL_PATHS``; the paper's ``"clusterformer"`` and ``"fpn"`` by default).

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
        query_position=query_position,
        m_step=m_step,
        temperature=temperature,
        masked_attention=masked_attention,
        query_selection=query_selection,
        kind=kind,
        pixel_path=pixel_path,
    )
    if kind == "kmax" and not masks:
        raise ValueError("kind='kmax' needs the mask head (masks=True): kMaX supervises its affinity logits as masks")
    if decoder.query_position == "boxes" and not boxes:
        raise ValueError("query_position='boxes' needs the box head (boxes=True)")
    learnt = box_reference == "refine" or decoder.query_position == "boxes"
    head = SetPredictionHead(
        dim, num_classes, boxes=boxes, mask_dim=mask_dim if masks else None, num_queries=num_queries,
        learnt_reference=learnt,
    )  # fmt: skip
    if semantic_head and not masks:
        raise ValueError("semantic_head needs the mask features (masks=True)")
    semantic = nn.Conv2d(mask_dim, num_classes, 1) if semantic_head else None
    denoiser = Denoiser(num_classes, dim, denoising, dn_label_noise, dn_box_noise) if denoising else None
    return ClusterFormerSets(encoder, decoder, head, semantic, box_reference, denoiser)
