"""Center initialisation (Eq. 5) and recurrent cross-attention clustering (Eq. 3, Algorithm 1).

Layout. The clustering runs on *slices*: one slice is one (image, head) pair, so a batch of ``B``
images with ``h`` heads has ``S = B * h`` slices, and every slice is clustered independently.

* centers are stored transposed, ``(S, d, K)``: ``K`` clusters of head dimension ``d``;
* keys are ``(S, N, d)`` and values are stored transposed, ``(S, d, N)``, with ``N = H * W``;
* assignments are ``(S, N, K)``: the softmax over the clusters (the paper's E-step) runs over the
  contiguous last axis.

In these layouts (queries are stored like the centers, ``(S, d, K)``) the E-step is
``bmm(keys, queries)`` and the summed M-step is ``baddbmm(centers, values, assignments)``, neither with a
transposed operand, so that neither the forward nor the backward pass copies an ``(N, K)`` or ``(N, d)``
tensor between iterations. The EM M-step keeps its centers as ``(S, K, d)`` inside the iterations (its norms
run along the channel axis) and reads the transposed views of the assignments and values.

Two readings of the M-step (``m_step``), see ``docs/architecture.md``:

* ``"mean"`` (default): EM for a mixture, as the paper's Eq. 3 and its appeal to EM clustering read. Each
  center becomes the responsibility-weighted mean of the values, ``C_k = sum_p M_pk v_p / sum_p M_pk``.
  The queries and keys are layer-normalised per head before the E-step (QK-norm, as ViT-22B, with learnt
  gains shared by the heads), ``logits = <LN(q), LN(k)> / (sqrt(d) * temperature)`` (``temperature`` 0.5 by
  default, kept in the state dict), so that the E-step's sharpness does not hang on the scale of the centers
  or of the projections. At initialisation the query projection is the
  identity and the key projection a copy of the value projection: the clustering starts as soft k-means in
  the space of the values.
* ``"sum"``: Algorithm 1 to the letter, ``C <- C + M V`` with ``logits = <q, k> / sqrt(d)``. Every token's
  assignment sums to one over the clusters, so the sum adds about ``N / K`` times the mean value to every
  center: the centers become nearly identical, the next E-step nearly uniform, and the model stops
  clustering (measured in ``docs/architecture.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .fused import assign, em_step, unit, weighted_mean, worth_fusing

CENTER_UPDATES = ("recurrent", "kmeans", "vanilla", "cosine", "criss_cross", "none")
# the center updates of RecurrentClustering; "vanilla", "cosine" and "criss_cross" are the methods that Table 6c
# compares with, each its own module (layers/comparators.py)
RECURRENT_UPDATES = ("recurrent", "kmeans", "none")
M_STEPS = ("mean", "sum")
# the center updates whose assignment sums to one over the clusters: the two M-steps differ for them only
OVER_CLUSTERS = ("recurrent", "kmeans")
# the EM E-step's temperature (see docs/architecture.md); EM weights saved without one were trained at 1
DEFAULT_TEMPERATURE = 0.5
SAVED_WITHOUT_TEMPERATURE = 1.0


def is_tracing() -> bool:
    """Whether the model is being traced into a graph (``torch.jit.trace``, ``torch.export``, ONNX export).

    A traced graph must hold for every input size: the few places that pick a path from the sizes at run time
    (chunking, ``linspace``, adaptive pooling) take a size-independent path instead, with the same results."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or exporting()


class CenterInit(nn.Module):
    """Eq. 5: ``C0 = FFN(AdaptivePool_K(I))`` on a ``grid[0] x grid[1]`` grid of centers.

    Args:
        dim: channels of the token map.
        center_dim: channels of the centers (``heads * head_dim``).
        grid: number of centers along height and width (``K = grid[0] * grid[1]``).
        hidden_ratio: hidden width of the FFN as a fraction of ``dim``.
    """

    def __init__(self, dim: int, center_dim: int, grid: tuple[int, int] = (10, 10), hidden_ratio: float = 0.4):
        super().__init__()
        self.grid = tuple(grid)
        hidden = max(1, round(dim * hidden_ratio))
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, center_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (B, H, W, C)`` -> ``centers (B, K, center_dim)``, row-major over the grid."""
        return self.fc2(self.act(self.fc1(adaptive_pool(tokens, self.grid))))


def adaptive_pool(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``adaptive_avg_pool2d`` of ``tokens (B, H, W, C)`` to ``grid``, ``(B, K, C)`` row-major over the grid
    (traced: :func:`grid_pool`, the same numbers)."""
    if is_tracing():
        return grid_pool(tokens, grid)
    return F.adaptive_avg_pool2d(tokens.permute(0, 3, 1, 2), grid).flatten(2).transpose(1, 2)


def grid_pool(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``adaptive_avg_pool2d`` of ``tokens (B, H, W, C)`` to ``grid`` as two matrix products, ``(B, K, C)``
    row-major over the grid. Exporters cannot lower adaptive pooling when the input size is not known (ONNX has no
    such operator, and ``torch.export`` specialises on whether the size divides the grid); this form holds for
    every size."""
    _, h, w, _ = tokens.shape
    rows = grid_bins(h, grid[0], tokens.device).to(tokens.dtype)  # (gh, H)
    cols = grid_bins(w, grid[1], tokens.device).to(tokens.dtype)  # (gw, W)
    rows = rows / rows.sum(1, keepdim=True)
    cols = cols / cols.sum(1, keepdim=True)
    pooled = torch.matmul(rows, tokens.transpose(1, 2))  # (B, W, gh, C)
    return torch.matmul(cols, pooled.transpose(1, 2)).flatten(1, 2)  # (B, gh, gw, C) -> (B, gh * gw, C)


def grid_bins(size: int, bins: int, device: torch.device | None = None) -> torch.Tensor:
    """``(bins, size)`` membership of positions in the bins of ``adaptive_avg_pool`` along one axis."""
    idx = torch.arange(bins, device=device)
    start = torch.div(idx * size, bins, rounding_mode="floor")
    end = torch.div((idx + 1) * size + bins - 1, bins, rounding_mode="floor")
    pos = torch.arange(size, device=device)
    return (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])


def criss_cross_mask(grid: tuple[int, int], hw: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """``(N, K)`` boolean mask: center ``(i, j)`` sees the tokens whose row lies in the pooling bin of
    grid row ``i`` or whose column lies in the bin of grid column ``j`` (a cross through its cell)."""
    rows = grid_bins(hw[0], grid[0], device)  # (gh, H)
    cols = grid_bins(hw[1], grid[1], device)  # (gw, W)
    in_row = rows[:, None, :, None].expand(grid[0], grid[1], hw[0], hw[1])
    in_col = cols[None, :, None, :].expand(grid[0], grid[1], hw[0], hw[1])
    return (in_row | in_col).reshape(grid[0] * grid[1], hw[0] * hw[1]).transpose(0, 1)


class RecurrentClustering(nn.Module):
    """Recurrent cross-attention clustering (Eq. 3, Algorithm 1) and its K-Means form (Table 6c).

    Keys and values are projected from the tokens once per block; the query is re-projected from the
    current centers at every iteration with the same weights, so the parameter count does not depend
    on ``iterations``. The query projection acts within a head and is shared by the heads.

    ``update``:
        * ``recurrent`` (paper): ``M = softmax_K(Q_C K_I^T / sqrt(d))``; with ``m_step="mean"`` (default)
          ``C_k <- sum_p M_pk v_p / sum_p M_pk`` with normalised queries and keys (module docstring),
          with ``m_step="sum"`` ``C <- C + M V_I`` (Algorithm 1 to the letter).
        * ``kmeans`` (kMaX-DeepLab): ``M = onehot(argmax_K(Q_C K_I^T))``, the same two M-steps (``mean``:
          each center the mean of its tokens' values; a cluster without tokens keeps its center).
        * ``none``: the centers stay at their initialisation ("+ Feature Dispatching" of Table 6a). Only the
          value projection is built: the dispatching compares the centers with the values.

    The other center updates of Table 6c (vanilla cross-attention, criss-cross attention, Context Cluster's
    cosine clustering) are the cited methods, each its own module (:mod:`clusterformer.layers.comparators`).

    ``fused`` (default): each E/M step is the fused operator of :mod:`clusterformer.layers.fused` (the same numbers;
    the ``(N, K)`` assignments are neither written per iteration nor kept for the backward pass); ``False``: the
    products below, one ``(S, N, K)`` tensor per iteration. Traced graphs (export) take the unfused form, and so do
    CPU steps whose assignment fits one of the operator's blocks (``fused.worth_fusing``).

    ``temperature`` (EM only; ``None``: ``DEFAULT_TEMPERATURE``, 0.5) divides the normalised logits. It is a
    buffer of the state dict: loading weights sets it to the value they were trained at (EM weights saved
    before it was stored read as 1). Giving one where there is no EM E-step is an error.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int = 32,
        iterations: int = 3,
        update: str = "recurrent",
        grid: tuple[int, int] = (10, 10),
        m_step: str = "mean",
        temperature: float | None = None,
        fused: bool = True,
    ):
        super().__init__()
        if update not in RECURRENT_UPDATES:
            if update in CENTER_UPDATES:
                raise ValueError(
                    f"center update {update!r} is not a recurrent clustering: it is its own module "
                    "(clusterformer.layers.comparators), built by ClusterBlock"
                )
            raise ValueError(f"center update must be one of {CENTER_UPDATES}, got {update!r}")
        if m_step not in M_STEPS:
            raise ValueError(f"m_step must be one of {M_STEPS}, got {m_step!r}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if temperature is not None and not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.iterations = iterations
        self.update = update
        self.m_step = m_step
        # the fused operator (layers/fused.py): the same numbers, no (N, K) tensor stored; an attribute, not a weight
        self.fused = fused
        # the EM reading (normalised E-step, weighted-mean M-step) applies to the updates over the clusters
        self.em = m_step == "mean" and update in OVER_CLUSTERS
        if temperature is not None and not self.em:
            raise ValueError(
                f"temperature divides the EM E-step's logits (m_step='mean' with {OVER_CLUSTERS}); "
                f"update {update!r} with m_step {m_step!r} has none"
            )
        self.grid = tuple(grid)
        # 1/sqrt(d) of scaled dot-product attention; the EM E-step also divides its normalised logits by the
        # temperature, a buffer of the state dict, so that a weight file brings the temperature it was trained at
        self.scale = head_dim**-0.5
        if self.em:
            default = DEFAULT_TEMPERATURE if temperature is None else temperature
            self.register_buffer("temperature", torch.tensor(float(default)))
        inner = num_heads * head_dim
        # without a center update nothing reads keys or queries: only the values are built
        self.k = nn.Linear(dim, inner) if update != "none" else None
        self.v = nn.Linear(dim, inner)
        self.q = nn.Linear(head_dim, head_dim) if update != "none" else None
        if self.em:  # QK-norm within a head, gains shared by the heads (as the query projection)
            self.q_norm = nn.LayerNorm(head_dim)
            self.k_norm = nn.LayerNorm(head_dim)
            self.init_as_kmeans()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # EM weights saved before the temperature was a buffer (QK-norm keys, no temperature) were trained at 1
        key = f"{prefix}temperature"
        if self.em and key not in state_dict and f"{prefix}q_norm.weight" in state_dict:
            state_dict[key] = torch.tensor(SAVED_WITHOUT_TEMPERATURE)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def init_as_kmeans(self) -> None:
        """Start the EM clustering as soft k-means in the space of the values: the query projection is the
        identity and the key projection a copy of the value projection, so that the E-step compares each
        (normalised) center with the (normalised) values it averages. Training moves the projections from there.
        Model constructors that re-initialise every linear layer call this again afterwards."""
        if not self.em:
            return
        self.q.weight.copy_(torch.eye(self.head_dim))
        self.q.bias.zero_()
        self.k.weight.copy_(self.v.weight)
        self.k.bias.copy_(self.v.bias)

    def project(
        self, tokens: torch.Tensor, key_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``tokens (B, N, C)`` -> ``keys (B * heads, N, d)`` and ``values (B * heads, d, N)``, computed
        once per block. ``key_tokens`` (default ``tokens``) feed the keys only: the decoder adds the
        position embedding there, as DETR adds it to the keys and not to the values. Without a center
        update there are no keys (``None``)."""
        b, n, _ = tokens.shape
        h, d = self.num_heads, self.head_dim
        key_tokens = tokens if key_tokens is None else key_tokens
        keys = None if self.k is None else self.k(key_tokens).view(b, n, h, d).transpose(1, 2).reshape(b * h, n, d)
        values = self.v(tokens).view(b, n, h, d).permute(0, 2, 3, 1).reshape(b * h, d, n)
        return keys, values

    def forward(
        self,
        centers: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        hw: tuple[int, int],
        blocked: torch.Tensor | None = None,
        groups: Sequence[int] | None = None,
        need_assignments: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run ``iterations`` E/M steps.

        Args:
            centers: initial centers, transposed, ``(S, d, K)``.
            keys: ``(S, N, d)``; values: ``(S, d, N)``.
            hw: the token grid ``(H, W)``, ``H * W = N`` (not used here; the comparators' signature).
            blocked: ``(S, N, K)`` booleans, ``True`` where token ``n`` may not join cluster ``k`` (the decoder's
                masked attention); every token must stay open to at least one cluster of each group.
            groups: sizes of consecutive groups of clusters that split the tokens each on their own (the E-step's
                softmax runs within each group; default one group): the decoder's denoising queries.
            need_assignments: whether the last assignment is returned (the fused path computes it only then: one
                more E-step).

        Returns:
            the updated centers ``(S, d, K)`` and the last assignment ``(S, N, K)`` (``None`` when
            the centers are not updated or it is not needed).
        """
        if self.update == "none":
            return centers, None
        k = centers.shape[-1]
        fused = self.fused and not is_tracing() and worth_fusing(keys, keys.shape[0] * keys.shape[1] * k)
        if self.em:
            return self._em(centers, keys, values, blocked, groups, fused=fused, need_assignments=need_assignments)
        # the 1/sqrt(d) of scaled dot-product attention, folded into the (shared) query projection
        q_weight = (self.q.weight * self.scale).expand(centers.shape[0], -1, -1)
        q_bias = (self.q.bias * self.scale)[:, None]
        assignments = None
        for _ in range(self.iterations):
            queries = torch.baddbmm(q_bias, q_weight, centers)  # (S, d, K), same weights every time
            if fused:  # M-step: C <- C + M V, the assignment never stored
                summed, _ = em_step(queries.transpose(1, 2), keys, values.transpose(1, 2), blocked, groups, self._kind)
                centers = centers + summed.transpose(1, 2).to(centers.dtype)
                continue
            assignments = self.assign(queries, keys, blocked, groups)  # E-step
            centers = torch.baddbmm(centers, values, assignments)  # M-step: C <- C + M V
        if fused and need_assignments:
            assignments = self.assign(queries, keys, blocked, groups)
        return centers, assignments

    @property
    def _kind(self) -> str:
        """The fused operator's assignment: softmax (``recurrent``) or one-hot argmax (``kmeans``)."""
        return "softmax" if self.update == "recurrent" else "argmax"

    def _em(
        self,
        centers: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        blocked: torch.Tensor | None = None,
        groups: Sequence[int] | None = None,
        eps: float = 1e-6,
        fused: bool = False,
        need_assignments: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``m_step="mean"``: E-step on layer-normalised queries and keys; M-step = weighted mean of the values (a
        cluster that receives no mass keeps its center: ``eps`` of it is mixed in). Inside, the centers are kept
        as ``(S, K, d)``, so that the projection and the norms run along the contiguous channel axis; ``bmm``
        reads the transposed views without copies."""
        d = self.head_dim
        raw_keys, keys = keys, self.k_norm(keys)  # (S, N, d): normalised once per block
        scale = self.scale / self.temperature  # the logits' 1/(sqrt(d) * temperature), folded into the gains
        gain = self.q_norm.weight * scale
        shift = self.q_norm.bias * scale
        centers = centers.transpose(1, 2).contiguous()  # (S, K, d)
        values = values.transpose(1, 2)  # (S, N, d) view
        assignments = None
        for _ in range(self.iterations):
            raw_queries = self.q(centers)
            queries = F.layer_norm(raw_queries, (d,), gain, shift)  # (S, K, d)
            if fused:  # the same step, the assignment never stored
                # the step keeps the queries and keys before their layer norms (which those keep anyway), and the
                # M-step its result (the next step's input) rather than its numerator
                norms = {"query_norm": (raw_queries, gain, shift, 1e-5),
                         "key_norm": (raw_keys, self.k_norm.weight, self.k_norm.bias, self.k_norm.eps)}  # fmt: skip
                summed, mass = em_step(queries, keys, values, blocked, groups, self._kind, **norms)
                centers = weighted_mean(centers, summed, mass, eps)
                continue
            assignments = self.assign(queries.transpose(1, 2), keys, blocked, groups)  # E-step, (S, N, K)
            mass = assignments.sum(dim=1).unsqueeze(-1)  # (S, K, 1)
            summed = torch.baddbmm(centers, assignments.transpose(1, 2), values, beta=eps)  # eps C + M^T V
            centers = summed / (mass + eps)  # M-step
        if fused and need_assignments:
            assignments = self.assign(queries.transpose(1, 2), keys, blocked, groups)
        return centers.transpose(1, 2), assignments

    def assign(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        blocked: torch.Tensor | None = None,
        groups: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """E-step: queries ``(S, d, K)`` (already scaled by ``1/sqrt(d)``) and keys ``(S, N, d)`` ->
        assignment ``(S, N, K)``; ``blocked`` and ``groups`` as in ``forward``."""
        # softmax over the clusters (each token's row sums to 1), or the one-hot argmax of k-means
        return assign(torch.bmm(keys, queries), blocked, groups, self._kind)  # (S, N, K)


def assignment_maps(assignments: torch.Tensor, batch: int, hw: tuple[int, int]) -> torch.Tensor:
    """``(B * heads, N, K)`` -> ``(B, heads, K, H, W)`` maps for pictures (Fig. 3)."""
    s, _, k = assignments.shape
    return assignments.transpose(1, 2).reshape(batch, s // batch, k, hw[0], hw[1])


def cluster_statistics(assignments: torch.Tensor, centers: torch.Tensor) -> dict[str, float | list]:
    """Whether a clustering clusters, for one image: ``assignments (heads, K, h, w)`` (soft, one E-step) and
    ``centers (heads, K, d)``. Returns, averaged over the heads, ``clusters_used`` (distinct argmax clusters
    over the tokens; ``clusters_used_per_head`` lists them), ``mean_max_assignment`` (the mean over tokens of
    the largest soft assignment; ``1 / K`` is uniform) and ``center_cosine`` (the mean cosine over all pairs of
    distinct centers; 1 means identical directions)."""
    heads, k = assignments.shape[:2]
    soft = assignments.reshape(heads, k, -1).float()
    used = [int(torch.unique(soft[h].argmax(0)).numel()) for h in range(heads)]
    u = unit(centers.float(), -1)
    cos = torch.bmm(u, u.transpose(1, 2))  # (heads, K, K)
    pairs = (cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(1)) / max(k * (k - 1), 1)
    return {
        "clusters_used": sum(used) / heads,
        "clusters_used_per_head": used,
        "mean_max_assignment": float(soft.max(1).values.mean()),
        "center_cosine": float(pairs.mean()),
    }
