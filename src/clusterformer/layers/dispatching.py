"""Feature dispatching (Eq. 6, Algorithm 2) and the dispatching variants of Table 6e.

Works on the slice layout of :mod:`clusterformer.layers.clustering`: ``aggregate`` gathers, per
(image, head) slice, what every token receives from the centers, ``(S, N, d)``; ``project`` mixes
the heads and maps the result to the token channels.
"""

from __future__ import annotations

import torch
from torch import nn

from .clustering import is_tracing
from .fused import dispatch, dispatch_weights, top1_mask, unit, worth_fusing

DISPATCHES = ("ours", "none", "fc", "fc_similarity", "confidence")
NEEDS_ASSIGNMENTS = ("fc", "confidence")


class FeatureDispatch(nn.Module):
    """Send the updated centers back to the tokens.

    ``mode``:
        * ``ours`` (Eq. 6): ``p' = p + MLP((1/K) sum_k sim(C_k, p) C_k)`` with
          ``sim = sigmoid(beta + alpha * cos(C_k, v_p))``, Context Cluster's similarity between a
          center and the token's value (centers live in value space). ``hard=True`` keeps only the
          most similar center, as in Algorithm 2.
        * ``none``: no dispatching; the tokens are not updated by the centers.
        * ``fc``: each token receives its assigned center (argmax of the last E-step) through one
          fully-connected layer.
        * ``fc_similarity`` (Context Cluster): the most similar center scaled by its similarity,
          through one fully-connected layer.
        * ``confidence``: the assigned center scaled by its assignment probability.

    The "MLP" of Eq. 6 is one linear layer from the center channels to the token channels (the paper
    also calls its one-layer classifier an MLP); it is also where the heads are mixed.

    Args:
        center_dim: ``heads * head_dim``.
        dim: token channels.
        mode: one of :data:`DISPATCHES`.
        hard: top-1 mask for ``ours``.
        update_similarity: ``fc_similarity`` reads the similarity that the center update passes as its
            assignment instead of computing one (no scale and shift of its own).
        fused: ``ours`` through the fused operator (:func:`clusterformer.layers.fused.dispatch`: the same numbers,
            the ``(N, K)`` weights neither stored nor kept for the backward pass); the other modes are unfused.
    """

    def __init__(
        self,
        center_dim: int,
        dim: int,
        mode: str = "ours",
        hard: bool = False,
        update_similarity: bool = False,
        fused: bool = True,
    ):
        super().__init__()
        if mode not in DISPATCHES:
            raise ValueError(f"dispatching must be one of {DISPATCHES}, got {mode!r}")
        self.mode = mode
        self.hard = hard
        self.fused = fused
        self.update_similarity = update_similarity and mode == "fc_similarity"
        if mode == "ours" or (mode == "fc_similarity" and not self.update_similarity):
            self.sim_alpha = nn.Parameter(torch.ones(1))
            self.sim_beta = nn.Parameter(torch.zeros(1))
        self.proj = nn.Linear(center_dim, dim) if mode != "none" else None

    def similarity(self, centers: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``sigmoid(beta + alpha * cos(C_k, v_p))``: centers ``(S, d, K)``, values ``(S, d, N)`` ->
        ``(S, N, K)``."""
        unit_values, unit_centers = unit(values, 1).transpose(1, 2), unit(centers, 1).transpose(1, 2)
        return dispatch_weights(unit_values, unit_centers, self.sim_alpha, self.sim_beta)[0]

    def aggregate(self, centers: torch.Tensor, values: torch.Tensor, assignments: torch.Tensor | None) -> torch.Tensor:
        """What each token receives, ``(S, N, d)``, from centers ``(S, d, K)``, values ``(S, d, N)``
        and the last E-step's assignment ``(S, N, K)``."""
        if self.mode == "none":
            raise RuntimeError("dispatching 'none' sends nothing to the tokens")
        elements = values.shape[0] * values.shape[-1] * centers.shape[-1]
        if self.mode == "ours" and self.fused and not is_tracing() and worth_fusing(values, elements):
            scaled = (centers / centers.shape[-1]).transpose(1, 2)  # the 1/K of Eq. 6
            unit_centers, unit_values = unit(centers, 1).transpose(1, 2), unit(values, 1).transpose(1, 2)
            # the unit values are rebuilt from the values (kept by the E/M steps anyway) for the backward pass
            return dispatch(unit_values, unit_centers, self.sim_alpha, self.sim_beta, scaled, self.hard, values)
        if self.mode == "ours":
            weights = self.similarity(centers, values)
            if self.hard:
                weights = weights * top1_mask(weights)
            centers = centers / centers.shape[-1]  # the 1/K of Eq. 6
        elif self.mode == "fc_similarity" and not self.update_similarity:
            weights = self.similarity(centers, values)
            weights = weights * top1_mask(weights)
        elif self.mode == "fc_similarity":
            if assignments is None:
                raise ValueError("dispatching 'fc_similarity' after this update needs its similarity")
            weights = assignments  # the update's similarity, already kept for the most similar center only
        elif assignments is None:
            raise ValueError(f"dispatching {self.mode!r} needs the E-step assignments")
        elif self.mode == "fc":
            weights = top1_mask(assignments)
        else:  # confidence
            weights = assignments * top1_mask(assignments)
        return torch.bmm(weights, centers.transpose(1, 2))  # (S, N, d)

    def project(self, received: torch.Tensor) -> torch.Tensor:
        """``(B, N, center_dim)`` -> token update ``(B, N, dim)`` (the MLP of Eq. 6)."""
        return self.proj(received)
