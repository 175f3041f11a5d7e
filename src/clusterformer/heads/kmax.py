"""kMaX-DeepLab's decoder layer: k-means cross-attention (Yu et al., "k-means Mask Transformer", ECCV 2022, §3.3).

The cross-attention of a transformer decoder updates each query with a spatial softmax over the pixels (Eq. 4,
``C <- C + softmax_HW(Q^c K^p^T) V^p``). kMaX replaces the softmax with the argmax over the clusters (Eq. 7)::

    C <- C + argmax_N(Q^c K^p^T) V^p

``argmax_N`` runs along the cluster axis (the paper writes ``N`` for the number of clusters): every pixel joins
exactly one cluster, the one of highest affinity, and the product with ``V^p`` adds to each cluster center the
*sum* of the values of its pixels (no division by the cluster's size: Eq. 6 and 7 are a product with the one-hot
assignment). The attention has one head (the paper: it "does not require the multi-head mechanism").

The argmax is not differentiable: the update's gradient reaches the values ``V^p`` (and the layers after it) but
not the query and key projections. kMaX trains those by deep supervision of the affinity logits ``Q^c K^p^T``,
which it reads as the layer's mask logits (they play the part of ``F C^T`` in Eq. 3); ``KMaXDecoderLayer`` keeps
them as ``last_affinity`` for that purpose.

Contents, in order:

* ``cluster_argmax`` and ``kmeans_cross_attention``: Eq. 7 on projected tensors.
* ``KMaXDecoderLayer``: k-means cross-attention, multi-head self-attention among the queries, FFN.
* ``DropQuery`` and ``block_dropped``: kMaX's drop-query regularisation (§4.1).
* ``level_schedule``: which pixel level each layer clusters (two layers at each of strides 32, 16, 8).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "DropQuery",
    "KMaXDecoderLayer",
    "block_dropped",
    "cluster_argmax",
    "kmeans_cross_attention",
    "level_schedule",
]


def cluster_argmax(
    logits: torch.Tensor, blocked: torch.Tensor | None = None, groups: Sequence[int] | None = None
) -> torch.Tensor:
    """The hard assignment of Eq. 7: ``logits (B, K, N)`` -> one-hot ``(B, K, N)`` in the logits' dtype, ``1`` at
    ``(k, n)`` when pixel ``n`` joins cluster ``k``.

    ``blocked (B, N, K)``: ``True`` where pixel ``n`` may not join cluster ``k`` (its logit takes no part in the
    argmax). ``groups``: sizes of consecutive groups of clusters (``sum(groups) = K``) that cluster the pixels each on
    their own: the argmax runs within each group, so that a pixel joins one cluster of every group (the decoder's
    denoising queries). A pixel blocked for every cluster of a group joins none of that group."""
    if blocked is not None:
        logits = logits.masked_fill(blocked.transpose(1, 2), float("-inf"))
    parts = [logits] if groups is None else logits.split(list(groups), dim=1)
    assigned = []
    for part in parts:
        onehot = torch.zeros_like(part).scatter_(1, part.argmax(dim=1, keepdim=True), 1.0)
        if blocked is not None:  # argmax of an all -inf column picks an arbitrary cluster: join none instead
            onehot = onehot * torch.isfinite(part).any(dim=1, keepdim=True)
        assigned.append(onehot)
    return assigned[0] if len(assigned) == 1 else torch.cat(assigned, dim=1)


def _assigned_sum(assignment: torch.Tensor, pixel_v: torch.Tensor) -> torch.Tensor:
    """``assignment (B, K, N)`` one-hot, ``pixel_v (B, N, d)`` -> ``(B, K, d)``: each cluster's sum of the values of
    its pixels, accumulated in at least float32 (a sum over thousands of pixels overflows or rounds in half
    precision; kMaX also runs this product outside autocast)."""
    dtype = torch.promote_types(pixel_v.dtype, torch.float32)
    return torch.bmm(assignment.to(dtype), pixel_v.to(dtype)).to(pixel_v.dtype)


def kmeans_cross_attention(
    centers_q: torch.Tensor,
    pixel_k: torch.Tensor,
    pixel_v: torch.Tensor,
    blocked: torch.Tensor | None = None,
    groups: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means cross-attention, Eq. 7, one head: ``argmax_N(Q^c K^p^T) V^p``.

    Args:
        centers_q: ``Q^c``, the projected cluster centers (queries), ``(B, K, d)``.
        pixel_k: ``K^p``, the projected pixel keys, ``(B, N, d)``.
        pixel_v: ``V^p``, the projected pixel values, ``(B, N, d_v)``.
        blocked, groups: restrict the argmax (``cluster_argmax``).

    Returns:
        the update ``(B, K, d_v)``, whose row ``k`` is the sum of the values of the pixels assigned to cluster ``k``
        (zero for a cluster without pixels; the caller adds it to ``C``), and the affinity logits
        ``Q^c K^p^T`` ``(B, K, N)``, unmasked (kMaX supervises them as mask logits). The update's gradient flows to
        ``pixel_v`` only: the argmax is piecewise constant in the queries and keys."""
    logits = torch.bmm(centers_q, pixel_k.transpose(1, 2))  # (B, K, N)
    return _assigned_sum(cluster_argmax(logits, blocked, groups), pixel_v), logits


class KMaXDecoderLayer(nn.Module):
    """One kMaX decoder layer: k-means cross-attention, then self-attention among the queries, then an FFN.

    The constructor and ``forward`` are those of ``ClusteringDecoderLayer``, so that the decoder may build either.
    ``iterations``, ``m_step`` and ``temperature`` do not apply (kMaX assigns once per layer, with an argmax) and
    are ignored; ``num_heads`` sets the self-attention's heads only: the k-means cross-attention has one head.

    Projections as a transformer decoder's: ``Q^c`` from the queries plus their position embedding, ``K^p`` from the
    pixel features plus theirs, ``V^p`` from the pixel features alone, each a linear map of width ``dim``. The
    affinity logits carry the ``1 / sqrt(dim)`` of scaled dot-product attention, which the argmax ignores and which
    keeps them in the range of mask logits for their supervision.

    Normalisation: the paper's text describes the layer as "a typical transformer decoder" whose cross-attention is
    replaced (Fig. 1) and does not say where the norms sit; kMaX's released code follows MaX-DeepLab's dual-path
    layer (1x1 convolutions with batch norm, a zero-initialised last norm on every branch, GELU after the residual
    sums). This layer keeps the post-norm residual form of ``ClusteringDecoderLayer`` (DETR, Mask2Former): each of
    the three steps is ``x = LayerNorm(x + dropout(step(x)))``, and the FFN uses kMaX's GELU. The retrieved sum
    goes through a LayerNorm before its output projection, as kMaX batch-normalises it: the sum grows with the
    number of pixels, and the layers visit levels whose pixel counts differ 16-fold.

    After every ``forward``, ``last_affinity`` holds that call's affinity logits ``(B, K, N)`` (with their graph):
    the layer's mask logits for kMaX's deep supervision, which is what trains the query and key projections.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        iterations: int = 1,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        m_step: str | None = None,
        temperature: float | None = None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads")
        self.scale = dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.retrieved_norm = nn.LayerNorm(dim)
        self.cluster_out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.last_affinity: torch.Tensor | None = None

    # two layers at each of strides 32, 16, 8, coarse first (kMaX's decoder); ClusteringDecoder reads it
    levels = staticmethod(lambda num_layers, num_levels=3: level_schedule(num_layers, num_levels))

    def cluster(
        self,
        queries: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        blocked: torch.Tensor | None = None,
        groups: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``queries (B, K, D)`` (position included), ``memory (B, N, D)``, ``memory_pos (N, D)`` -> the summed
        values ``(B, K, D)``, the one-hot assignment ``(B, K, N)`` and the affinity logits ``(B, K, N)``;
        ``blocked (B, N, K)`` and ``groups`` as in ``cluster_argmax``."""
        centers_q = self.q(queries) * self.scale
        pixel_k = self.k(memory + memory_pos)
        pixel_v = self.v(memory)
        logits = torch.bmm(centers_q, pixel_k.transpose(1, 2))  # (B, K, N)
        assignment = cluster_argmax(logits, blocked, groups)
        return _assigned_sum(assignment, pixel_v), assignment, logits

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
        """``queries (B, K, D)``, ``query_pos (B or 1, K, D)``, ``memory (B, N, D)``, ``memory_pos (N, D)`` ->
        ``(B, K, D)``. The hard assignment is appended to ``assignments`` (when given) as a one-hot ``(B, 1, N, K)``
        (one "head"), the shape of ``ClusteringDecoderLayer``'s; ``blocked (B, N, K)`` and ``groups`` restrict the
        argmax; ``attn_mask (K, K)``, ``True`` where query ``i`` may not attend to query ``j``, the self-attention."""
        summed, assignment, logits = self.cluster(queries + query_pos, memory, memory_pos, blocked, groups)
        self.last_affinity = logits
        if assignments is not None:
            assignments.append(assignment.transpose(1, 2).unsqueeze(1))
        update = self.cluster_out(self.retrieved_norm(summed))
        queries = self.norm1(queries + self.dropout(update))
        q = queries + query_pos
        attended, _ = self.self_attn(q, q, queries, attn_mask=attn_mask, need_weights=False)
        queries = self.norm2(queries + self.dropout(attended))
        return self.norm3(queries + self.dropout(self.ffn(queries)))


class DropQuery(nn.Module):
    """kMaX's drop-query regularisation (§4.1: half of 256 queries dropped at every training iteration, all used at
    inference): in training, each of the ``num_queries`` matching queries of every image is dropped on its own with
    probability ``p`` (so the count varies around ``p * num_queries``, where the paper drops exactly half), never all
    of an image's (one of them, drawn at random, is then kept). A dropped query takes no part in the
    clustering: ``block_dropped`` closes every pixel to it, so its k-means update is zero. In eval mode, or with
    ``p = 0``, nothing is dropped.

    Draw once per forward pass of the decoder and give the same draw to all its layers (kMaX drops a query for the
    whole iteration). The draw only keeps a query out of the clustering: its self-attention, FFN and predictions
    still run, and whether the matching and the losses skip it is the caller's choice."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"drop-query probability must be in [0, 1), got {p}")
        self.p = p

    def forward(
        self, batch: int, num_queries: int, device: torch.device | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor | None:
        """``(B, num_queries)`` booleans, ``True`` for a dropped query; ``None`` when nothing is dropped (eval mode,
        ``p = 0``)."""
        if not self.training or self.p == 0:
            return None
        dropped = torch.rand(batch, num_queries, device=device, generator=generator) < self.p
        everything = dropped.all(dim=1)
        if everything.any():  # keep one query, drawn uniformly, of each image that lost them all
            kept = torch.randint(num_queries, (batch,), device=device, generator=generator)
            dropped[everything, kept[everything]] = False
        return dropped


def block_dropped(
    dropped: torch.Tensor | None, blocked: torch.Tensor | None, num_pixels: int, num_queries: int
) -> torch.Tensor | None:
    """The clustering restriction with the dropped queries closed: ``dropped (B, Q)`` (``DropQuery``; it covers the
    first ``Q`` of the layer's ``num_queries`` queries: denoising queries after them are never dropped), ``blocked
    (B, N, K)`` or ``None`` -> ``(B, N, K)`` booleans (``None`` when both are). A pixel that ``blocked`` leaves open to
    dropped queries only is reopened to the kept queries among the first ``Q`` (as ``foreground_blocked`` leaves no
    pixel without a cluster)."""
    if dropped is None:
        return blocked
    batch, q = dropped.shape
    closed = dropped[:, None, :].expand(batch, num_pixels, q)
    if blocked is None:
        first = closed
    else:
        first = blocked[..., :q]
        # open to some query before the drop, to none of the kept ones after it
        stranded = (first | closed).all(dim=-1, keepdim=True) & ~first.all(dim=-1, keepdim=True)
        first = (first & ~stranded) | closed
    rest = (
        blocked[..., q:]
        if blocked is not None
        else torch.zeros(batch, num_pixels, num_queries - q, dtype=torch.bool, device=dropped.device)
    )
    return torch.cat([first, rest], dim=-1)


def level_schedule(num_layers: int, num_levels: int = 3) -> list[int]:
    """The pixel level each of ``num_layers`` layers clusters, in kMaX's order: consecutive equal blocks from the
    coarsest level (0, stride 32) to the finest (``num_levels - 1``; stride 8 for the decoder's three levels). Six
    layers over three levels give ``[0, 0, 1, 1, 2, 2]``, two kMaX layers at each of strides 32, 16 and 8 (§3.3).
    When the layers do not divide evenly, the coarser levels get one extra layer each (7 layers: ``[0, 0, 0, 1, 1, 2,
    2]``); with fewer layers than levels, the layers take one level each from the coarsest (the finest go unused)."""
    if num_layers < 1 or num_levels < 1:
        raise ValueError(f"need at least one layer and one level, got {num_layers} and {num_levels}")
    base, extra = divmod(num_layers, num_levels)
    return [level for level in range(num_levels) for _ in range(base + (level < extra))]
