"""The clustering decoder shared by the dense heads (paper §3.3, Table 6f).

* ``PixelDecoder``: an FPN over the backbone's stride 4/8/16/32 features. It gives the decoder three
  levels of pixel features (strides 32, 16, 8) and the stride-4 features that the mask embeddings are
  multiplied with.
* ``ClusteringDecoderLayer``: recurrent cross-attention clustering of the pixel features into the
  queries (Eq. 4: ``M = softmax_K(Q_C K_I^T)``, ``T`` iterations with the same projections; by default
  the EM reading of the encoder, ``m_step="mean"``: each query's cluster center is the weighted mean of
  the pixel values it is responsible for), then self-attention among the queries and an FFN, each with
  a residual and a LayerNorm (post-norm, as DETR and Mask2Former).
* ``ClusteringDecoder``: initial queries from the encoder's cluster centers (default) or free learnable
  queries, then ``num_layers`` layers that visit the three levels in turn (32, 16, 8, 32, ...); it
  returns the queries after every layer for deep supervision. The queries' position embeddings are
  learnt (``query_position="learnt"``) or, for box heads, computed from each query's current reference
  box (``"boxes"``, DAB-DETR / DINO): the sine embedding of the box through an MLP, recomputed after
  every layer from the box that layer predicts, so that a query clusters the pixels around its box.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import RecurrentClustering
from .hcformer import HCFormerPixelPath
from .kmax import KMaXDecoderLayer

if TYPE_CHECKING:
    from .denoising import DenoisingQueries

QUERY_INITS = ("encoder", "free")
QUERY_POSITIONS = ("learnt", "boxes")


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


def sine_position(h: int, w: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """DETR's normalised 2-D sine position embedding: ``(h * w, dim)``, half the channels for ``y``,
    half for ``x``, each alternating sin / cos over geometric frequencies."""
    if dim % 4:
        raise ValueError(f"position embedding width must be a multiple of 4, got {dim}")
    quarter = dim // 4
    freqs = 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    ey = torch.stack([(y[:, None] / freqs).sin(), (y[:, None] / freqs).cos()], -1).flatten(1)  # (h, dim/2)
    ex = torch.stack([(x[:, None] / freqs).sin(), (x[:, None] / freqs).cos()], -1).flatten(1)  # (w, dim/2)
    pos = torch.cat([ey[:, None, :].expand(h, w, -1), ex[None, :, :].expand(h, w, -1)], dim=-1)
    return pos.reshape(h * w, dim).to(dtype)


def _sine(coords: torch.Tensor, dim: int) -> torch.Tensor:
    """``coords (..., n)`` in ``[0, 1]`` -> ``(..., n * dim / 2)``: per coordinate ``dim / 4`` (sin, cos)
    pairs at the frequencies of ``sine_position``."""
    quarter = dim // 4
    freqs = 10000 ** (torch.arange(quarter, device=coords.device, dtype=torch.float32) / quarter)
    angles = coords.float()[..., None] * (2 * math.pi) / freqs  # (..., n, quarter)
    return torch.stack([angles.sin(), angles.cos()], -1).flatten(-3).to(coords.dtype)


def box_sine(boxes: torch.Tensor, dim: int) -> torch.Tensor:
    """``boxes (..., 4)`` normalised ``cxcywh`` -> ``(..., 2 * dim)``: the sine embeddings of ``cy, cx``
    (laid out as ``sine_position``'s ``dim`` channels of a pixel at the box centre) then of ``h, w``."""
    if dim % 4:
        raise ValueError(f"position embedding width must be a multiple of 4, got {dim}")
    return _sine(boxes[..., [1, 0, 3, 2]], dim)


def cluster_boxes(assignments: torch.Tensor, hw: tuple[int, int], eps: float = 1e-6) -> torch.Tensor:
    """The box of each cluster's pixels: ``assignments (B, heads, N, K)`` over an ``h x w`` map (row-major)
    -> ``(B, K, 4)`` normalised ``cxcywh``. Each pixel is a uniform square, weighted by the cluster's
    assignment averaged over the heads; the box centre is the mean position and its size ``sqrt(12)``
    standard deviations per axis (the width of a uniform distribution with that spread), so the box of
    a cluster that holds exactly the pixels of a rectangle is that rectangle."""
    h, w = hw
    dtype = torch.promote_types(assignments.dtype, torch.float32)
    weights = assignments.to(dtype).mean(1)  # (B, N, K)
    weights = weights / (weights.sum(1, keepdim=True) + eps)
    y = ((torch.arange(h, device=weights.device, dtype=dtype) + 0.5) / h)[:, None].expand(h, w).reshape(-1)
    x = ((torch.arange(w, device=weights.device, dtype=dtype) + 0.5) / w)[None, :].expand(h, w).reshape(-1)
    coords = torch.stack([x, y, x.square(), y.square()], -1)  # (N, 4)
    moments = torch.einsum("bnk,nc->bkc", weights, coords)
    centre = moments[..., :2]
    square = torch.tensor([1 / (12 * w * w), 1 / (12 * h * h)], device=weights.device, dtype=dtype)  # own variance
    spread = (moments[..., 2:] - centre.square() + square).clamp_min(eps).sqrt() * math.sqrt(12)
    return torch.cat([centre, spread], -1).to(assignments.dtype)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PixelDecoder(nn.Module):
    """FPN: lateral 1x1 convolutions, top-down nearest upsampling and sums, a 3x3 convolution per level.

    Args:
        in_channels: channels of the backbone features at strides 4, 8, 16, 32.
        dim: width of the decoder's pixel features.
        mask_dim: width of the stride-4 mask features; ``None`` for heads without masks (detection),
            which then skip the stride-4 level altogether.
    """

    def __init__(self, in_channels: Sequence[int], dim: int = 256, mask_dim: int | None = 256):
        super().__init__()
        self.with_masks = mask_dim is not None
        used = list(in_channels) if self.with_masks else list(in_channels)[1:]
        self.lateral = nn.ModuleList(nn.Sequential(nn.Conv2d(c, dim, 1, bias=False), _group_norm(dim)) for c in used)
        self.output = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), _group_norm(dim), nn.ReLU(inplace=True))
            for _ in used
        )
        self.mask_features = nn.Conv2d(dim, mask_dim, 1) if self.with_masks else None

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """``features``: ``(B, C_i, H_i, W_i)`` at strides 4/8/16/32. Returns the mask features
        ``(B, mask_dim, H_0, W_0)`` (``None`` without masks) and the pixel features at strides
        ``[32, 16, 8]``, ``(B, dim, H_i, W_i)``."""
        features = list(features) if self.with_masks else list(features)[1:]
        outputs = []
        top = None
        for i in range(len(features) - 1, -1, -1):
            lateral = self.lateral[i](features[i])
            if top is not None:
                lateral = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
            top = lateral
            outputs.append(self.output[i](lateral))
        if not self.with_masks:  # outputs: strides 32, 16, 8
            return None, outputs
        return self.mask_features(outputs[-1]), outputs[:-1]  # strides 32, 16, 8 and the stride-4 map


class ClusteringDecoderLayer(nn.Module):
    """One decoder layer: recurrent cross-attention clustering + self-attention + FFN.

    The clustering is the encoder's ``RecurrentClustering`` (softmax over the clusters, the query
    projection shared by the heads and reused at every iteration). Keys see the pixel features plus
    their position embedding, values the features alone. With ``m_step="mean"`` (default) the layer's
    update is the queries' final cluster centers, each the responsibility-weighted mean of the values.
    With ``m_step="sum"`` (Algorithm 1 to the letter) it is the summed change of the centers, divided by
    the mean cluster mass ``N / K``, a constant of the feature map's size: the layers alternate between
    levels whose ``N`` differs 16-fold, and the sum of an unscaled M-step grows with ``N``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        iterations: int = 3,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        m_step: str = "mean",
        temperature: float | None = None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads")
        self.clustering = RecurrentClustering(
            dim, num_heads, head_dim=dim // num_heads, iterations=iterations, m_step=m_step, temperature=temperature
        )
        self.cluster_out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def cluster(
        self,
        queries: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        blocked: torch.Tensor | None = None,
        groups: Sequence[int] | None = None,
        need_assignments: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``queries (B, K, D)`` (position included), ``memory (B, N, D)``, ``memory_pos (N, D)`` ->
        the update ``(B, K, D)`` (the final centers, or for ``m_step="sum"`` their scaled change) and the last
        assignment ``(B, heads, N, K)`` (``None`` when the fused operator runs and it is not ``need_assignments``).
        ``blocked (B, N, K)``: pixel ``n`` may not join query ``k`` (masked attention); ``groups``: sizes of
        consecutive groups of queries that cluster the pixels each on their own (the denoising queries;
        ``RecurrentClustering.forward``)."""
        b, k, dim = queries.shape
        n = memory.shape[1]
        heads, d = self.clustering.num_heads, self.clustering.head_dim
        keys, values = self.clustering.project(memory, memory + memory_pos)
        centers0 = queries.view(b, k, heads, d).permute(0, 2, 3, 1).reshape(b * heads, d, k)
        if blocked is not None:  # the same pixels for every head
            blocked = blocked[:, None].expand(b, heads, n, k).reshape(b * heads, n, k)
        if self.clustering.em:
            update, assignments = self.clustering(centers0, keys, values, (n, 1), blocked, groups, need_assignments)
        else:
            scaled = values * (k / n)
            centers, assignments = self.clustering(centers0, keys, scaled, (n, 1), blocked, groups, need_assignments)
            update = centers - centers0
        update = update.view(b, heads, d, k).permute(0, 3, 1, 2).reshape(b, k, dim)
        return update, None if assignments is None else assignments.view(b, heads, n, k)

    def forward(
        self,
        queries: torch.Tensor,
        query_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        assignments: list | None = None,
        blocked: torch.Tensor | None = None,
        groups: Sequence[int] | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``queries (B, K, D)``, ``query_pos (B or 1, K, D)``, ``memory (B, N, D)``, ``memory_pos (N, D)``.
        The last E-step's assignment ``(B, heads, N, K)`` is appended to ``assignments`` when given.
        ``blocked`` and ``groups`` restrict the clustering (``cluster``); ``attn_mask (K, K)``, ``True`` where
        query ``i`` may not attend to query ``j``, the self-attention."""
        need = assignments is not None
        update, assignment = self.cluster(queries + query_pos, memory, memory_pos, blocked, groups, need)
        if assignments is not None:
            assignments.append(assignment)
        queries = self.norm1(queries + self.dropout(self.cluster_out(update)))
        q = queries + query_pos
        attended, _ = self.self_attn(q, q, queries, attn_mask=attn_mask, need_weights=False)
        queries = self.norm2(queries + self.dropout(attended))
        return self.norm3(queries + self.dropout(self.ffn(queries)))


def group_attention_mask(groups: Sequence[int], device=None) -> torch.Tensor:
    """``(K, K)`` booleans for ``groups`` of consecutive queries (``K = sum(groups)``): ``True`` (may not attend)
    between queries of different groups, so that no group sees another in the self-attention."""
    owner = torch.repeat_interleave(torch.arange(len(groups), device=device), torch.tensor(list(groups), device=device))
    return owner[:, None] != owner[None, :]


def foreground_blocked(
    masks: torch.Tensor, hw: tuple[int, int], groups: Sequence[int] | None = None, threshold: float = 0.5
) -> torch.Tensor:
    """Masked attention in clustering terms (Mask2Former, §3.2.1): the pixels each query may cluster at the next
    layer are its predicted foreground. ``masks (B, K, h, w)`` mask logits of the previous prediction -> ``(B, N, K)``
    booleans on the ``hw`` map (bilinear resize, ``True``: sigmoid below ``threshold``, the pixel is blocked for that
    query). A pixel that no query of a group claims stays open to the whole group: the E-step's softmax runs over the
    queries, and a pixel must go somewhere."""
    resized = F.interpolate(masks.detach().float(), size=hw, mode="bilinear", align_corners=False)
    blocked = (resized.sigmoid() < threshold).flatten(2).transpose(1, 2)  # (B, N, K)
    parts = blocked.split(list(groups) if groups is not None else [blocked.shape[-1]], dim=-1)
    return torch.cat([part & ~part.all(dim=-1, keepdim=True) for part in parts], dim=-1)


def cycled_levels(num_layers: int, num_levels: int) -> list[int]:
    """The feature level of each decoder layer: the levels in turn, coarse to fine (32, 16, 8, 32, ...), as
    Mask2Former and the paper's decoder visit them."""
    return [i % num_levels for i in range(num_layers)]


# ``decoder.kind``: the class of the decoder's layers. A layer is built as ``Layer(dim, num_heads, iterations,
# ffn_dim, dropout, m_step, temperature)`` and called as ``ClusteringDecoderLayer`` is; a class may say which level
# each layer reads (``levels(num_layers, num_levels)``, default :func:`cycled_levels`) and, with ``updates_pixels =
# True``, return ``(queries, memory)``: the level's pixel features, updated, for the layers after it.
# A layer with a ``last_affinity`` attribute (kMaX) hands its affinity logits ``(B, K, N)`` to ``predict``
# (``affinity=``): kMaX supervises them as the layer's mask logits.
# A layer with ``takes_references = True`` (CMT-DeepLab's) is also given its map size (``hw=``) and the list of the
# earlier layers' reference points (``references=``), to which it appends its own ``(B, K, M, 2)``; ``predict`` then
# gets the layer's (``references=``).
DECODER_LAYERS: dict[str, type[nn.Module]] = {
    "clusterformer": ClusteringDecoderLayer,
    "kmax": KMaXDecoderLayer,
}  # and "cmt" (heads.cmt.CMTDecoderLayer, which builds on this module), added by the package's __init__
# ``decoder.pixel_path``: what turns the backbone's four maps into the decoder's levels and the mask features, built
# as ``PixelPath(in_channels, dim, mask_dim)`` and called as ``PixelDecoder`` is
# (``"hcformer"``: HCFormer's hierarchical clustering, whose ``regularization()`` the tasks add to the loss)
PIXEL_PATHS: dict[str, type[nn.Module]] = {"fpn": PixelDecoder, "hcformer": HCFormerPixelPath}


def _registered(table: dict[str, type], name: str, option: str) -> type:
    if name not in table:
        raise ValueError(f"{option} must be one of {tuple(table)}, got {name!r}")
    return table[name]


class ClusteringDecoder(nn.Module):
    """Pixel decoder + ``num_layers`` clustering layers over three feature levels.

    Args:
        in_channels: backbone channels at strides 4/8/16/32.
        center_dim: width of the encoder's cluster centers (``heads * head_dim`` of its last stage).
        num_centers: number of encoder centers (100 for a 10 x 10 grid).
        num_queries: decoder queries. With ``query_init="encoder"`` and ``num_queries != num_centers``
            a linear map over the center axis turns the encoder's centers into the queries.
        dim, mask_dim (``None``: no mask features), num_layers, num_heads, iterations, ffn_dim, dropout: decoder sizes.
        query_init: ``"encoder"`` (queries = projected encoder centers) or ``"free"`` (learnt).
        query_position: ``"learnt"`` position embeddings, one per query, or ``"boxes"``: an MLP of the sine
            embedding of each query's reference box (``forward``'s ``reference`` and ``predict``).
        m_step: ``"mean"`` (EM reading, default) or ``"sum"`` (Algorithm 1), as the encoder's.
        temperature: of the EM E-step, as the encoder's (``None``: the default).
        masked_attention: restrict each layer's E-step to each query's foreground as the previous prediction
            (of the initial queries, for the first layer) gives it: Mask2Former's masked attention in clustering
            terms (``foreground_blocked``); needs the mask head.
        kind: the decoder layers (:data:`DECODER_LAYERS`): ``"clusterformer"``, the paper's recurrent cross-attention
            clustering (``ClusteringDecoderLayer``), or ``"kmax"``, kMaX-DeepLab's k-means cross-attention
            (``heads.kmax.KMaXDecoderLayer``, two layers per level, coarse first), or ``"cmt"``, CMT-DeepLab's
            clustering center update with its pixel update and reference points (``heads.cmt.CMTDecoderLayer``).
        pixel_path: the pixel features (:data:`PIXEL_PATHS`): ``"fpn"``, the paper's FPN (``PixelDecoder``), or
            ``"hcformer"``, HCFormer's hierarchical clustering (``heads.hcformer.HCFormerPixelPath``).
        query_selection: the task head scores every encoder center (``proposals``) and the ``num_queries``
            top-scoring ones start the queries (DINO's / Mask DINO's query selection, from the cluster centers):
            their projections are the queries' content (``query_init="encoder"``; with ``"free"`` the content is
            learnt: DINO's mixed selection) and, detached, a term of the queries' positions; ``forward``'s
            ``selected``.
    """

    num_levels = 3

    def __init__(
        self,
        in_channels: Sequence[int],
        center_dim: int,
        num_centers: int = 100,
        num_queries: int = 100,
        dim: int = 256,
        mask_dim: int | None = 256,
        num_layers: int = 6,
        num_heads: int = 8,
        iterations: int = 3,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        query_init: str = "encoder",
        query_position: str = "learnt",
        m_step: str = "mean",
        temperature: float | None = None,
        masked_attention: bool = False,
        query_selection: bool = False,
        kind: str = "clusterformer",
        pixel_path: str = "fpn",
    ):
        super().__init__()
        layer_class = _registered(DECODER_LAYERS, kind, "decoder kind")
        path_class = _registered(PIXEL_PATHS, pixel_path, "decoder pixel_path")
        if masked_attention and mask_dim is None:
            raise ValueError("masked_attention needs the mask features (mask_dim)")
        if query_selection and num_queries > num_centers:
            raise ValueError(f"query_selection keeps {num_queries} of the {num_centers} encoder centers: too many")
        self.masked_attention = masked_attention
        # whether each layer's last query-to-pixel assignment reaches ``predict`` (the boxes of the clusters, the
        # pictures of ``clusterformer explain``): the fused clustering operator computes it only then
        self.keep_assignments = False
        self.query_selection = query_selection
        if query_init not in QUERY_INITS:
            raise ValueError(f"query_init must be one of {QUERY_INITS}, got {query_init!r}")
        if query_position not in QUERY_POSITIONS:
            raise ValueError(f"query_position must be one of {QUERY_POSITIONS}, got {query_position!r}")
        self.query_init = query_init
        self.query_position = query_position
        self.num_queries = num_queries
        self.dim = dim
        self.mask_dim = mask_dim
        self.pixel_decoder = path_class(in_channels, dim, mask_dim)
        self.level_embed = nn.Parameter(torch.zeros(self.num_levels, dim))
        if query_position == "learnt":
            self.query_pos = nn.Parameter(torch.zeros(num_queries, dim))
            nn.init.normal_(self.query_pos, std=0.02)
        else:
            self.box_position = MLP(2 * dim, dim, dim, 2)
        if query_init == "free":
            self.query_feat = nn.Parameter(torch.zeros(num_queries, dim))
        if query_init == "encoder" or query_selection:
            self.center_proj = nn.Sequential(nn.Linear(center_dim, dim), nn.LayerNorm(dim))
        if query_init == "encoder" and not query_selection:
            self.center_to_query = nn.Linear(num_centers, num_queries) if num_queries != num_centers else None
        if query_selection:  # the selected centers' position term (DINO's anchors from the encoder, detached)
            self.selection_pos = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(
            layer_class(dim, num_heads, iterations, ffn_dim, dropout, m_step, temperature) for _ in range(num_layers)
        )
        self.level_order = getattr(layer_class, "levels", cycled_levels)(num_layers, self.num_levels)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.level_embed, std=0.02)
        if query_init == "free":
            nn.init.normal_(self.query_feat, std=0.02)

    def proposals(self, centers: torch.Tensor) -> torch.Tensor:
        """``centers (B, K_enc, center_dim)`` -> the projected centers ``(B, K_enc, D)`` that ``query_selection``
        scores and selects from."""
        return self.center_proj(centers)

    def initial_queries(self, centers: torch.Tensor | None, batch: int) -> torch.Tensor:
        if self.query_init == "free":
            return self.query_feat.unsqueeze(0).expand(batch, -1, -1)
        if centers is None:
            raise ValueError("query_init='encoder' needs the encoder's cluster centers")
        queries = self.center_proj(centers)  # (B, K_enc, D)
        if self.center_to_query is not None:
            queries = self.center_to_query(queries.transpose(1, 2)).transpose(1, 2)
        return queries

    def forward(
        self,
        features: Sequence[torch.Tensor],
        centers: torch.Tensor | None = None,
        predict: Callable[..., dict | None] | None = None,
        reference: torch.Tensor | None = None,
        denoising: DenoisingQueries | None = None,
        selected: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``features``: backbone maps at strides 4/8/16/32; ``centers (B, K_enc, center_dim)``.

        ``predict(state, mask_features, assignments, hw)`` is called after every layer with its normalised
        queries (the task head), the layer's last assignment ``(B, heads, N, Q)`` (``None`` unless
        ``keep_assignments``) and its map size, and returns the
        layer's prediction (a dict); with ``query_position="boxes"`` its ``boxes (B, Q, 4)`` become the next layer's
        (detached) references, and ``reference (B or 1, Q, 4)`` holds the first layer's. With ``masked_attention``
        it is also called once before the first layer (``assignments`` and ``hw`` ``None``), and each prediction's
        ``masks`` restrict the next layer's E-step. After a layer with affinity logits (kMaX's, ``last_affinity``)
        it is also given them, ``affinity=(B, Q [+ denoising], N)``, and after a layer with reference points
        (CMT-DeepLab's) those, ``references=(B, Q [+ denoising], M, 2)``.

        ``denoising`` (training only): extra queries appended after the ``Q`` queries, in groups that neither see
        the others nor are seen by them (the E-step's softmax and the self-attention run group by group), so that
        the ``Q`` queries' predictions are exactly those of a run without them.

        ``selected (B, Q, D)``: with ``query_selection``, the projected encoder centers chosen for the queries
        (``proposals``), in the queries' order.

        Returns the normalised queries after every layer, each ``(B, Q [+ denoising], D)``, and the mask features
        ``(B, mask_dim, H/4, W/4)`` (``None`` when ``mask_dim`` is ``None``).
        """
        boxes = self.query_position == "boxes"
        if boxes and (reference is None or predict is None):
            raise ValueError("query_position='boxes' needs the first reference boxes and a predict callback")
        if self.masked_attention and predict is None:
            raise ValueError("masked_attention needs a predict callback that returns the masks")
        mask_features, levels = self.pixel_decoder(features)
        memories, positions, sizes = [], [], []
        for i, level in enumerate(levels):
            _, _, h, w = level.shape
            sizes.append((h, w))
            memories.append(level.flatten(2).transpose(1, 2))  # (B, N_i, D)
            positions.append(sine_position(h, w, self.dim, level.device, level.dtype) + self.level_embed[i])
        batch = levels[0].shape[0]
        if self.query_selection:
            if selected is None:
                raise ValueError("query_selection needs the selected encoder centers (selected)")
            queries = selected if self.query_init == "encoder" else self.initial_queries(None, batch)
            position = self.selection_pos(selected.detach())
            query_pos = None if boxes else self.query_pos.unsqueeze(0) + position
        else:
            queries = self.initial_queries(centers, batch)
            query_pos = None if boxes else self.query_pos.unsqueeze(0)
        groups = attn_mask = None
        if denoising is not None:
            groups = [queries.shape[1]] + [denoising.group_size] * denoising.num_groups
            attn_mask = group_attention_mask(groups, queries.device)
            queries = torch.cat([queries.expand(batch, -1, -1), denoising.queries], 1)
            if boxes:
                reference = torch.cat([reference.expand(batch, -1, -1), denoising.reference], 1)
            else:
                query_pos = torch.cat([query_pos.expand(batch, -1, -1), denoising.query_pos], 1)
        masks = None
        if self.masked_attention:
            masks = predict(self.norm(queries), mask_features, None, None)["masks"]
        states, references = [], []
        for layer, level in zip(self.layers, self.level_order, strict=True):
            if boxes:
                query_pos = self.box_position(box_sine(reference, self.dim))
                if self.query_selection:
                    query_pos = query_pos + F.pad(position, (0, 0, 0, query_pos.shape[1] - position.shape[1]))
            assignments = [] if predict is not None and self.keep_assignments else None
            blocked = None if masks is None else foreground_blocked(masks, sizes[level], groups)
            located = getattr(layer, "takes_references", False)
            queries = layer(
                queries, query_pos, memories[level], positions[level], assignments, blocked, groups, attn_mask,
                **({"hw": sizes[level], "references": references} if located else {}),
            )  # fmt: skip
            if getattr(layer, "updates_pixels", False):
                queries, memories[level] = queries
            states.append(self.norm(queries))
            if predict is not None:
                extra = {}
                if getattr(layer, "last_affinity", None) is not None:
                    extra["affinity"] = layer.last_affinity
                if located:
                    extra["references"] = references[-1]
                assignment = assignments[0] if assignments else None
                predicted = predict(states[-1], mask_features, assignment, sizes[level], **extra)
                if boxes:
                    reference = predicted["boxes"].detach()
                if self.masked_attention:
                    masks = predicted["masks"]
        return states, mask_features
