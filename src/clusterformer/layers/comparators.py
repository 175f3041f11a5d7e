"""The center updates that paper Table 6c compares the recurrent clustering with, as the cited methods define them.

Each module takes the normalised tokens of a block and returns per-head tensors: the updated centers
``(B, heads, K, d)``, the values ``(B, heads, N, d)`` that the dispatching compares the centers with, and the
weights of every token for every center ``(B, heads, N, K)`` (the pictures of ``forward_clusters`` and the
dispatchings that read an assignment). ``K`` centers lie on a ``grid[0] x grid[1]`` grid over the token map,
as those of the paper's clustering, so that the rows of Table 6c differ only in how the centers are updated.

* :class:`CrossAttentionUpdate` ("Vanilla Cross-Attention [81]"): Eq. 1, one pass of multi-head
  cross-attention of the centers (queries) over the tokens (keys and values), softmax over the tokens, with its
  own query, key, value and output projections (Vaswani et al.); no recurrence.
* :class:`CrissCrossUpdate` ("Criss Cross-Attention [35]"): CCNet's criss-cross attention. Each center attends
  to the tokens of the row band and the column band that cross at its grid cell (CCNet: a position attends to
  its row and its column), with CCNet's module: queries and keys of ``D / 8`` channels, values of ``D``
  channels, one head, unscaled logits, a softmax over the cross, and a learnt ``gamma`` (0 at the start) on
  the aggregate: ``C <- C + gamma * sum_p A_kp v_p``.
* :class:`ContextClusterUpdate` ("Cosine Similarity"): Context Cluster's clustering (Ma et al., "Image as Set
  of Points"). Centers and value centers are pooled from the similarity features and the values; the
  similarity ``sigmoid(beta + alpha * cos(c_k, f_p))``; every point belongs to its most similar center only;
  ``C_k = (v_c,k + sum_p s_kp v_p) / (1 + sum_p s_kp)``. Context Cluster's dispatch (each point receives its
  center scaled by the same similarity, through one linear layer) is ``dispatch="fc_similarity"`` after this
  update (:class:`~clusterformer.layers.FeatureDispatch` then reads this similarity instead of its own).

``docs/architecture.md`` ("Variants") gives the parameter counts against the paper's and the choices made to turn
CCNet's and Context Cluster's token mixers into a center update.
"""

from __future__ import annotations

import torch
from torch import nn

from .clustering import adaptive_pool, criss_cross_mask
from .fused import unit

COMPARATORS = ("vanilla", "criss_cross", "cosine")


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, L, heads * d)`` -> ``(B, heads, L, d)``."""
    b, length, width = x.shape
    return x.view(b, length, heads, width // heads).transpose(1, 2)


class CrossAttentionUpdate(nn.Module):
    """Eq. 1 with the projections of multi-head attention, one pass:

    ``C = C0 + W_o concat_h(softmax_N(Q_h K_h^T / sqrt(d)) V_h)``, ``Q = C0 W_q``, ``K = I W_k``, ``V = I W_v``.

    Args:
        dim: token channels ``C``.
        num_heads, head_dim: ``D = num_heads * head_dim`` channels of the centers.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.scale = head_dim**-0.5
        self.q = nn.Linear(inner, inner)
        self.k = nn.Linear(dim, inner)
        self.v = nn.Linear(dim, inner)
        self.o = nn.Linear(inner, inner)

    def forward(self, tokens: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``tokens (B, H, W, C)``, initial ``centers (B, K, D)`` -> centers ``(B, heads, K, d)``, values
        ``(B, heads, N, d)`` and the attention ``(B, heads, N, K)`` (each center's column sums to 1 over the
        tokens)."""
        h = self.num_heads
        tokens = tokens.flatten(1, 2)  # (B, N, C)
        queries = _heads(self.q(centers), h)  # (B, h, K, d)
        keys = _heads(self.k(tokens), h)  # (B, h, N, d)
        values = _heads(self.v(tokens), h)
        attention = (torch.matmul(queries, keys.transpose(-1, -2)) * self.scale).softmax(dim=-1)  # (B, h, K, N)
        read = torch.matmul(attention, values).transpose(1, 2).flatten(2)  # (B, K, D)
        out = _heads(centers + self.o(read), h)
        return out, values, attention.transpose(-1, -2)


class CrissCrossUpdate(nn.Module):
    """CCNet's criss-cross attention as a center update:

    ``C_k = C0_k + gamma * sum_{p in cross(k)} softmax_{cross(k)}(q_k . k_p) v_p``, ``q = C0 W_q`` and
    ``k = I W_k`` of ``D / reduction`` channels, ``v = I W_v``; ``cross(k)`` = the tokens in the pooling bin
    of the center's grid row or of its grid column (:func:`~clusterformer.layers.clustering.criss_cross_mask`).
    One head, as CCNet; the aggregate is split into the block's heads for the dispatching.

    Args:
        dim: token channels ``C``.
        num_heads, head_dim: ``D = num_heads * head_dim`` channels of the centers.
        grid: the centers' grid.
        reduction: channels of queries and keys relative to ``D`` (8 in CCNet).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, grid: tuple[int, int], reduction: int = 8):
        super().__init__()
        inner = num_heads * head_dim
        reduced = max(1, inner // reduction)
        self.num_heads = num_heads
        self.grid = tuple(grid)
        self.q = nn.Linear(inner, reduced)
        self.k = nn.Linear(dim, reduced)
        self.v = nn.Linear(dim, inner)
        self.gamma = nn.Parameter(torch.zeros(1))  # CCNet starts the attention branch at 0

    def forward(self, tokens: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``tokens (B, H, W, C)``, initial ``centers (B, K, D)`` -> centers ``(B, heads, K, d)``, values
        ``(B, heads, N, d)`` and the attention ``(B, heads, N, K)`` (the one head's, repeated; each center's
        column sums to 1 over its cross and is 0 elsewhere)."""
        b, hh, ww, _ = tokens.shape
        h = self.num_heads
        tokens = tokens.flatten(1, 2)  # (B, N, C)
        energy = torch.matmul(self.q(centers), self.k(tokens).transpose(1, 2))  # (B, K, N), unscaled as CCNet
        cross = criss_cross_mask(self.grid, (hh, ww), tokens.device).transpose(0, 1)  # (K, N)
        attention = energy.masked_fill(~cross, float("-inf")).softmax(dim=-1)
        values = self.v(tokens)  # (B, N, D)
        out = _heads(centers + self.gamma * torch.matmul(attention, values), h)
        weights = attention.transpose(1, 2).unsqueeze(1).expand(-1, h, -1, -1)
        return out, _heads(values, h), weights


class ContextClusterUpdate(nn.Module):
    """Context Cluster's clustering (its Eq. 1), per head, with the block's ``grid`` of centers:

    ``f = I W_f``, ``v = I W_v``; centers ``c = Pool_K(f)`` and value centers ``v_c = Pool_K(v)``;
    ``s_kp = sigmoid(beta + alpha * cos(c_k, f_p))`` if ``k`` is the most similar center of point ``p``, else 0;
    ``C_k = (v_c,k + sum_p s_kp v_p) / (1 + sum_p s_kp)``.

    The centers come from pooling, not from Eq. 5's FFN. Context Cluster splits large maps into local regions
    (its "fold") to save computation; here all ``K`` centers see the whole map, as the other rows of Table 6c.

    Args:
        dim: token channels ``C``.
        num_heads, head_dim: ``D = num_heads * head_dim`` channels of the similarity features and values.
        grid: the centers' grid.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, grid: tuple[int, int]):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.grid = tuple(grid)
        self.f = nn.Linear(dim, inner)  # the space of the similarity
        self.v = nn.Linear(dim, inner)
        self.sim_alpha = nn.Parameter(torch.ones(1))
        self.sim_beta = nn.Parameter(torch.zeros(1))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``tokens (B, H, W, C)`` -> centers ``(B, heads, K, d)``, values ``(B, heads, N, d)`` and the masked
        similarity ``s`` ``(B, heads, N, K)`` (one non-zero entry per token)."""
        h = self.num_heads
        pooled = adaptive_pool(tokens, self.grid)  # (B, K, C); pooling commutes with the affine projections
        tokens = tokens.flatten(1, 2)
        features, values = _heads(self.f(tokens), h), _heads(self.v(tokens), h)  # (B, h, N, d)
        center_features, value_centers = _heads(self.f(pooled), h), _heads(self.v(pooled), h)  # (B, h, K, d)
        cos = torch.matmul(unit(features, -1), unit(center_features, -1).transpose(-1, -2))  # (B, h, N, K)
        similarity = torch.sigmoid(self.sim_beta + self.sim_alpha * cos)
        nearest = torch.zeros_like(similarity).scatter_(-1, similarity.argmax(dim=-1, keepdim=True), 1.0)
        similarity = similarity * nearest
        total = torch.matmul(similarity.transpose(-1, -2), values) + value_centers  # (B, h, K, d)
        centers = total / (similarity.sum(dim=-2).unsqueeze(-1) + 1.0)
        return centers, values, similarity
