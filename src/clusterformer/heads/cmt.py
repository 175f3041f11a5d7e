"""CMT-DeepLab's Clustering Mask Transformer layer (Yu et al., CVPR 2022, §3.3, Eq. 6-12) for the clustering decoder.

The decoder queries are read as cluster centers ``C (K, D)`` and the pixel features as ``F (N, D)``. One layer:

* coordinate convolutions (Eq. 11-12) at its start: ``C <- Conv(Concat(C, r^c))``, ``F <- Conv(Concat(F, r^p))``,
  with ``r^c`` the previous layer's reference mask (``M`` points per center) and ``r^p`` the fixed normalised
  pixel coordinates;
* the pixel-cluster assignment (Eq. 6 without its residual term): ``Z = softmax_K(K~_p Q~_c^T)``, each pixel's row
  summing to one over the clusters (:func:`cmt_assignment`);
* the center update (Eq. 7): ``C^ = C + (softmax_N(Q_c K_p^T) + Z^T) V_p``, the usual cross-attention plus the
  clustering update (:func:`cmt_center_update`);
* the pixel update (Eq. 8): ``F^ = F + Z V_c`` (:func:`cmt_pixel_update`);
* self-attention among the centers and an FFN, and the reference mask of the new centers (Eq. 9-10):
  ``e^ = e + MLP(C)``, ``r^c = sigmoid(e^)``, ``e`` the previous layer's ``e^`` (its points in inverse-sigmoid
  space).

The decisions the paper leaves open (multi-head layout, norms, normalisation of ``Z^T V_p``, the first layer's
reference mask, denoising groups) are listed in ``docs/heads.md``, section "CMT-DeepLab's clustering center update".
Every tensor of the functions below is laid out per slice, one slice ``S`` being one (image, head) pair, as in
``layers/clustering.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .decoder import MLP

CENTER_NORMALISATIONS = ("none", "mass")


def pixel_coordinates(hw: tuple[int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """``r^p`` of Eq. 12: the normalised ``(x, y)`` coordinates of the pixel centres of an ``h x w`` map, row-major,
    ``(h * w, 2)``, ``x = (j + 0.5) / w`` and ``y = (i + 0.5) / h`` (the convention of ``sine_position``)."""
    h, w = hw
    y = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
    x = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
    return torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)], -1).reshape(h * w, 2)


def infer_hw(memory_pos: torch.Tensor) -> tuple[int, int]:
    """The map size of ``memory_pos (N, D)`` laid out as ``sine_position`` lays it out (plus any per-level constant):
    its first ``D / 2`` channels depend on the row alone, so the width is the number of leading pixels that share
    pixel 0's. For a decoder that passes ``hw`` to the layer this is never needed."""
    half = memory_pos.shape[-1] // 2
    rows = memory_pos.reshape(-1, memory_pos.shape[-1])[:, :half]
    same = (rows == rows[:1]).all(-1)
    w = int(same.long().cumprod(0).sum())
    n = rows.shape[0]
    if n % w:
        raise ValueError(f"cannot read a map size off memory_pos ({n} pixels, {w} per row): pass hw")
    return n // w, w


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to ``[eps, 1 - eps]`` (Deformable DETR's)."""
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


def _open_all_blocked(blocked: torch.Tensor) -> torch.Tensor:
    """``blocked (..., L)``: a row blocked everywhere is opened everywhere (a softmax over ``L`` needs one entry)."""
    return blocked & ~blocked.all(-1, keepdim=True)


def cmt_assignment(
    pixel_keys: torch.Tensor,
    center_queries: torch.Tensor,
    previous_logits: torch.Tensor | None = None,
    blocked: torch.Tensor | None = None,
    groups: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6: ``Z = softmax_K(S + K~_p Q~_c^T)``.

    Args:
        pixel_keys: ``K~_p (S, N, d)``.
        center_queries: ``Q~_c (S, K, d)``, any scale (``1 / sqrt(d)``, a temperature) already folded in.
        previous_logits: ``S (S, N, K)``, the previous layer's affinity logits (the residual path between cluster
            assignments); ``None``: none.
        blocked: ``(S, N, K)``, ``True`` where pixel ``n`` may not join cluster ``k`` (logit ``-inf``). A pixel
            blocked from every cluster of a group stays open to the whole group: it must go somewhere.
        groups: sizes of consecutive groups of clusters; the softmax runs within each (default: one group).

    Returns:
        ``Z (S, N, K)``, each pixel's row summing to one over each group, and the logits ``(S, N, K)`` before the
        blocking (the next layer's ``S``).
    """
    logits = torch.bmm(pixel_keys, center_queries.transpose(1, 2))
    if previous_logits is not None:
        logits = logits + previous_logits
    sizes = [logits.shape[-1]] if groups is None else list(groups)
    parts = logits.split(sizes, dim=-1)
    masks = [None] * len(parts) if blocked is None else blocked.split(sizes, dim=-1)
    assigned = []
    for part, mask in zip(parts, masks, strict=True):
        if mask is not None:
            part = part.masked_fill(_open_all_blocked(mask), float("-inf"))
        assigned.append(part.softmax(-1))
    return torch.cat(assigned, -1), logits


def cmt_center_update(
    attention_logits: torch.Tensor,
    assignment: torch.Tensor,
    values: torch.Tensor,
    blocked: torch.Tensor | None = None,
    normalise: str = "none",
    eps: float = 1e-6,
) -> torch.Tensor:
    """The update of Eq. 7, ``(softmax_N(Q_c K_p^T) + Z^T) V_p`` (the layer adds it to ``C``).

    Args:
        attention_logits: ``Q_c K_p^T (S, K, N)`` (scaled); the softmax runs over the pixels.
        assignment: ``Z (S, N, K)`` (:func:`cmt_assignment`).
        values: ``V_p (S, N, d)``.
        blocked: ``(S, N, K)``: the attention logits of the blocked pairs are ``-inf`` (``Z`` already holds zeros
            there); a cluster blocked from every pixel attends to all of them (Mask2Former's rule).
        normalise: ``"none"``: ``Z^T V_p`` as Eq. 7 writes it, a sum over the pixels of each cluster;
            ``"mass"``: ``Z^T V_p`` divided by each cluster's mass ``sum_n Z_nk`` (floored at ``eps``), the
            weighted mean of the values that the cluster holds, the same scale as the attention term's.

    Returns:
        ``(S, K, d)``.
    """
    if normalise not in CENTER_NORMALISATIONS:
        raise ValueError(f"normalise must be one of {CENTER_NORMALISATIONS}, got {normalise!r}")
    if blocked is not None:
        attention_logits = attention_logits.masked_fill(_open_all_blocked(blocked.transpose(1, 2)), float("-inf"))
    clustered = torch.bmm(assignment.transpose(1, 2), values)  # Z^T V_p, (S, K, d)
    if normalise == "mass":
        clustered = clustered / assignment.sum(1).unsqueeze(-1).clamp_min(eps)
    return torch.bmm(attention_logits.softmax(-1), values) + clustered


def cmt_pixel_update(assignment: torch.Tensor, center_values: torch.Tensor) -> torch.Tensor:
    """The update of Eq. 8, ``Z V_c``: ``assignment (S, N, K)``, ``center_values (S, K, d)`` -> ``(S, N, d)`` (the
    layer adds it to ``F``)."""
    return torch.bmm(assignment, center_values)


def _identity_then_zeros(layer: nn.Linear, dim: int) -> None:
    """A coordinate convolution that starts as the identity on the features and ignores the coordinates: the layer
    starts as the same layer without them, and training decides how much location to mix in."""
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:, :dim].copy_(torch.eye(dim))
        layer.bias.zero_()


class CMTDecoderLayer(nn.Module):
    """A Clustering Mask Transformer layer that fits the clustering decoder (``updates_pixels``: it returns the updated
    pixel features with the queries).

    Args:
        dim, num_heads, ffn_dim, dropout: as ``ClusteringDecoderLayer``.
        iterations: not used (one assignment per layer, as the paper).
        m_step: how the ``Z^T V_p`` term of Eq. 7 is scaled: ``"mean"`` (default) divides it by each cluster's mass
            (the decoder's EM reading), ``"sum"`` keeps Eq. 7's plain sum.
        temperature: divides the assignment's logits (``None``: 1, scaled dot products as the attention's).
        num_points: ``M``, the points of each center's reference mask (8 in the paper).
    """

    updates_pixels = True
    takes_references = True  # ClusteringDecoder passes hw= and references=

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        iterations: int = 3,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        m_step: str = "mean",
        temperature: float | None = None,
        num_points: int = 8,
    ):
        super().__init__()
        del iterations  # one assignment per layer
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads")
        if m_step not in ("mean", "sum"):
            raise ValueError(f"m_step must be 'mean' or 'sum', got {m_step!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_points = num_points
        self.normalise = "mass" if m_step == "mean" else "none"
        self.temperature = 1.0 if temperature is None else float(temperature)
        # Eq. 11-12: 1x1 coordinate convolutions (linear maps of the concatenations)
        self.center_coord = nn.Linear(dim + 2 * num_points, dim)
        self.pixel_coord = nn.Linear(dim + 2, dim)
        _identity_then_zeros(self.center_coord, dim)
        _identity_then_zeros(self.pixel_coord, dim)
        # Eq. 7: cross-attention projections; Eq. 6: the assignment's own projections; Eq. 8: the centers' values
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.cluster_q = nn.Linear(dim, dim)
        self.cluster_k = nn.Linear(dim, dim)
        self.center_v = nn.Linear(dim, dim)
        self.center_out = nn.Linear(dim, dim)
        self.pixel_out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.pixel_norm = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        # Eq. 9: the reference mask's MLP
        self.reference = MLP(dim, dim, 2 * num_points, 3)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, D)`` -> ``(B * heads, L, d)``."""
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2).reshape(-1, length, self.head_dim)

    def _merge(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """``(B * heads, L, d)`` -> ``(B, L, D)``."""
        length = x.shape[1]
        return x.view(batch, self.num_heads, length, self.head_dim).transpose(1, 2).reshape(batch, length, -1)

    def forward(
        self,
        queries: torch.Tensor,
        query_pos: torch.Tensor | None,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        assignments: list | None = None,
        blocked: torch.Tensor | None = None,
        groups: Sequence[int] | None = None,
        attn_mask: torch.Tensor | None = None,
        *,
        hw: tuple[int, int] | None = None,
        references: list | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``queries (B, K, D)``, ``query_pos (B or 1, K, D)``, ``memory (B, N, D)``, ``memory_pos (N, D)``.

        ``assignments``: ``Z`` is appended as ``(B, heads, N, K)``. ``blocked (B, N, K)`` and ``groups`` restrict
        the attention and the assignment (:func:`cmt_assignment`, :func:`cmt_center_update`); with ``groups`` the
        pixel update reads the first group alone (the matching queries), so that the later groups (denoising) never
        reach the pixel features. ``attn_mask (K, K)``: the self-attention's, ``True`` where ``i`` may not see ``j``.

        ``hw``: the map size (default: read off ``memory_pos``, :func:`infer_hw`). ``references``: a list shared by
        the layers of one forward pass; its last entry, if any, is the previous layer's reference mask ``(B, K, M,
        2)`` (``(x, y)`` in ``[0, 1]``), and the layer appends its own. Without a previous one the points start at
        the image centre (``e = 0``).

        Returns the queries ``(B, K, D)`` and the updated pixel features ``(B, N, D)``.
        """
        b, k, _ = queries.shape
        n = memory.shape[1]
        hw = infer_hw(memory_pos) if hw is None else tuple(hw)
        if hw[0] * hw[1] != n:
            raise ValueError(f"map size {hw} does not hold the {n} pixels of memory")
        # e, (B, K, M, 2): the previous layer's points in inverse-sigmoid space, or 0 (the image centre)
        embedding = inverse_sigmoid(references[-1]) if references else queries.new_zeros(b, k, self.num_points, 2)
        points = embedding.sigmoid()
        # Eq. 11-12: location enters the centers and the pixels at the start of the layer
        queries = self.center_coord(torch.cat([queries, points.flatten(2)], -1))
        coords = pixel_coordinates(hw, memory.device, memory.dtype).expand(b, n, 2)
        memory = self.pixel_coord(torch.cat([memory, coords], -1))

        located = queries if query_pos is None else queries + query_pos
        keyed = memory + memory_pos
        scale = self.head_dim**-0.5
        slices_blocked = None
        if blocked is not None:  # the same pixels for every head
            slices_blocked = blocked[:, None].expand(b, self.num_heads, n, k).reshape(-1, n, k)
        assignment, _ = cmt_assignment(
            self._heads(self.cluster_k(keyed)),
            self._heads(self.cluster_q(located)) * (scale / self.temperature),
            None,
            slices_blocked,
            groups,
        )  # Eq. 6, (S, N, K)
        attention_logits = torch.bmm(self._heads(self.q(located)) * scale, self._heads(self.k(keyed)).transpose(1, 2))
        update = cmt_center_update(
            attention_logits, assignment, self._heads(self.v(memory)), slices_blocked, self.normalise
        )  # Eq. 7
        first = k if groups is None else groups[0]
        pixel_update = cmt_pixel_update(assignment[..., :first], self._heads(self.center_v(queries[:, :first])))
        if assignments is not None:
            assignments.append(assignment.view(b, self.num_heads, n, k))

        memory = self.pixel_norm(memory + self.dropout(self.pixel_out(self._merge(pixel_update, b))))  # Eq. 8
        queries = self.norm1(queries + self.dropout(self.center_out(self._merge(update, b))))
        q = queries if query_pos is None else queries + query_pos
        attended, _ = self.self_attn(q, q, queries, attn_mask=attn_mask, need_weights=False)
        queries = self.norm2(queries + self.dropout(attended))
        queries = self.norm3(queries + self.dropout(self.ffn(queries)))

        # Eq. 9-10: the reference mask, refined in inverse-sigmoid space
        refined = embedding + self.reference(queries).view(b, k, self.num_points, 2)
        if references is not None:
            references.append(refined.sigmoid())
        return queries, memory


__all__ = [
    "CENTER_NORMALISATIONS",
    "CMTDecoderLayer",
    "cmt_assignment",
    "cmt_center_update",
    "cmt_pixel_update",
    "infer_hw",
    "inverse_sigmoid",
    "pixel_coordinates",
]
