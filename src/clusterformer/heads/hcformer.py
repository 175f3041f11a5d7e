"""HCFormer's hierarchical clustering as a pixel path for the clustering decoder.

Paper: "Clustering as Attention: Unified Image Segmentation with Hierarchical Clustering", Suzuki,
arXiv:2205.09949 (HCFormer), §2.2-2.4 and Appendix C.

HCFormer has no pixel decoder. After every downsampling of the backbone, each pixel of the finer map is
softly assigned to the downsampled pixels around its own (Eq. 3, local attention of §2.4):

    A^(i) = Softmax_row((F^(i))^T F_d^(i) / |s^(i)|),

``F^(i)`` and ``F_d^(i)`` being the two maps after a LayerNorm and a 1x1 convolution to ``C_F = 128``
channels, every pixel's feature scaled to unit length (cosine similarities), ``s^(i)`` a learnt scale
(initialised to 0.1). The masks are predicted on the coarsest map (Eq. 4,
``M^(5) = Sigmoid(E_mask^T E_cluster^(5))``) and decoded to the finer maps through the assignments (Eq. 5,
``(M^(i))^T = A^(i) (M^(i+1))^T``).

* ``local_cluster_assignment``: Eq. 3 on the 3x3 (``window x window``) coarse neighbourhood of each fine
  pixel's parent, as a ``(B, window², H, W)`` map of weights.
* ``carry_back`` / ``carry_back_through``: Eq. 5 for any coarse map, over one or several levels.
* ``HCFormerPixelPath``: ``PixelDecoder``'s constructor and ``forward`` contract; the mask features are
  the stride-32 cluster features, projected to ``mask_dim`` (``E_cluster``), carried back to stride 4.
  Since the masks are ``einsum(mask_embed, mask_features)``, linear in the mask features, the mask logits
  at stride 4 are exactly Eq. 4's logits carried back by Eq. 5; the paper carries back the probabilities
  (after the sigmoid) instead: see ``docs/heads.md``, "HCFormer's hierarchical clustering pixel path".

Neighbour layout: weight ``k`` of fine pixel ``(y, x)`` belongs to coarse pixel
``(y // 2 + k // window - window // 2, x // 2 + k % window - window // 2)`` (``F.unfold``'s order). The
backbone pads odd maps on the bottom/right before merging 2x2 pixels, so a ``H x W`` map has a
``ceil(H/2) x ceil(W/2)`` coarse map and fine pixel ``(y, x)`` is merged into ``(y // 2, x // 2)``; any size
works. Neighbours outside the coarse map get no weight (the paper's listing pads them with zero features,
which take part in the softmax with similarity 0 and carry back zeros: the border pixels then lose mass).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.clustering import is_tracing
from ..layers.fused import unit

DECODER_LEVELS = ("cluster", "carried")
MIN_SCALE = 1e-4  # |s| is clamped here: s = 0 would divide by zero (the regularisation drives |s| down)


def _neighbourhoods(coarse: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, C, window², h, w)``: each coarse pixel's ``window x window`` neighbours (zeros
    outside the map), in ``F.unfold``'s order, from slices of the padded map (sizes stay symbolic for
    ``torch.export``)."""
    r = window // 2
    h, w = coarse.shape[-2:]
    padded = F.pad(coarse, (r, r, r, r))
    return torch.stack([padded[..., dy : dy + h, dx : dx + w] for dy in range(window) for dx in range(window)], 2)


def _to_blocks(fine: torch.Tensor, coarse_hw: Sequence[int]) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C, h, 2, w, 2)``: the 2x2 block of fine pixels that each coarse pixel merges; an
    odd map's missing last row or column repeats the one before (the caller drops it again). A gather, not a
    pad: ``torch.export`` then need not prove ``H <= 2h``."""
    h, w = coarse_hw
    height, width = fine.shape[-2:]
    rows = torch.arange(2 * h, device=fine.device).clamp_max(height - 1)
    cols = torch.arange(2 * w, device=fine.device).clamp_max(width - 1)
    blocks = F.pixel_unshuffle(fine.index_select(2, rows).index_select(3, cols), 2)  # (B, 4C, h, w)
    return blocks.unflatten(1, (fine.shape[1], 2, 2)).permute(0, 1, 4, 2, 5, 3)


def _from_blocks(blocks: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(B, C, h, 2, w, 2)`` -> ``(B, C, H, W)``, the first ``H`` rows and ``W`` columns of the ``2h x 2w`` map."""
    full = F.pixel_shuffle(blocks.permute(0, 1, 3, 5, 2, 4).flatten(1, 3), 2)
    rows = torch.arange(size[0], device=blocks.device)
    cols = torch.arange(size[1], device=blocks.device)
    return full.index_select(2, rows).index_select(3, cols)


def _inside(coarse_hw: Sequence[int], size: Sequence[int], window: int, device) -> torch.Tensor:
    """``(window², H, W)`` booleans: whether neighbour ``k`` of fine pixel ``(y, x)``'s parent is in the
    ``h x w`` coarse map."""
    r = window // 2
    offsets = torch.arange(-r, r + 1, device=device)
    rows = torch.arange(size[0], device=device)[None, :] // 2 + offsets[:, None]  # (window, H)
    cols = torch.arange(size[1], device=device)[None, :] // 2 + offsets[:, None]  # (window, W)
    rows_in = (rows >= 0) & (rows < coarse_hw[0])
    cols_in = (cols >= 0) & (cols < coarse_hw[1])
    return (rows_in[:, None, :, None] & cols_in[None, :, None, :]).flatten(0, 1)


def _check_sizes(fine_hw: Sequence[int], coarse_hw: Sequence[int]) -> None:
    if is_tracing():  # a traced graph takes the sizes as given (the backbone makes them so)
        return
    expected = tuple((s + 1) // 2 for s in fine_hw)
    if tuple(coarse_hw) != expected:
        raise ValueError(
            f"a {tuple(fine_hw)} map downsamples to {expected} (2x2 merging, odd sizes padded), got {tuple(coarse_hw)}"
        )


def _window(assignment: torch.Tensor, window: int | None) -> int:
    k = assignment.shape[1]
    if window is None:  # from the sizes, which an ONNX trace holds as tensors: the module passes its window
        window = math.isqrt(k)
    elif is_tracing():
        return window
    if window * window != k or window % 2 == 0:
        raise ValueError(f"an assignment holds window² weights per pixel for an odd window, got {k}")
    return window


def local_cluster_assignment(
    fine: torch.Tensor, coarse: torch.Tensor, temperature: torch.Tensor | float, window: int = 3
) -> torch.Tensor:
    """Eq. 3 with §2.4's local attention: the soft assignment of every fine pixel to the coarse pixels around
    its parent.

    Args:
        fine: ``F^(i)``, ``(B, C, H, W)``, the map before the downsampling (already projected).
        coarse: ``F_d^(i)``, ``(B, C, ceil(H/2), ceil(W/2))``, the map after it (already projected).
        temperature: the scale ``s^(i)`` (a scalar tensor or a float); the similarities are divided by
            ``|s^(i)|`` (clamped at ``MIN_SCALE``).
        window: odd side of the coarse neighbourhood (3: the parent and its eight neighbours).

    Returns ``(B, window², H, W)``: for fine pixel ``(y, x)``, the softmax over its neighbours ``k`` (module
    docstring for the layout) of the cosine similarity divided by ``|s|``; neighbours outside the coarse map
    get weight 0, so every pixel's weights sum to 1.
    """
    if window % 2 == 0:
        raise ValueError(f"the neighbourhood window must be odd, got {window}")
    height, width = fine.shape[-2:]
    h, w = coarse.shape[-2:]
    _check_sizes((height, width), (h, w))
    neighbours = _neighbourhoods(unit(coarse, 1), window)  # (B, C, k, h, w)
    blocks = _to_blocks(unit(fine, 1), (h, w))  # (B, C, h, 2, w, 2)
    # one neighbour at a time, broadcast over its 2x2 block (an einsum's internal reshapes would make torch.export
    # guard on the sizes)
    similarity = torch.stack([(neighbours[:, :, k, :, None, :, None] * blocks).sum(1) for k in range(window**2)], 1)
    similarity = _from_blocks(similarity, (height, width))  # (B, k, H, W)
    if not isinstance(temperature, torch.Tensor):
        temperature = torch.tensor(temperature, device=similarity.device)
    scale = temperature.to(similarity.dtype).abs().clamp_min(MIN_SCALE)
    inside = _inside((h, w), (height, width), window, similarity.device)
    logits = (similarity / scale).masked_fill(~inside, float("-inf"))  # the parent is always inside: no empty row
    return logits.softmax(1)


def carry_back(coarse_map: torch.Tensor, assignment: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Eq. 5 for one level: ``coarse_map (B, C, h, w)`` -> ``(B, C, H, W)``, each fine pixel the
    assignment-weighted sum of its coarse neighbours' values. ``assignment (B, window², H, W)`` from
    ``local_cluster_assignment`` (``h = ceil(H/2)``, ``w = ceil(W/2)``); ``window`` defaults to the square root
    of its second size."""
    window = _window(assignment, window)
    size = assignment.shape[-2:]
    _check_sizes(size, coarse_map.shape[-2:])
    neighbours = _neighbourhoods(coarse_map, window)  # (B, C, k, h, w)
    weights = _to_blocks(assignment, coarse_map.shape[-2:])  # (B, k, h, 2, w, 2)
    fine = sum(neighbours[:, :, k, :, None, :, None] * weights[:, k, None] for k in range(window * window))
    return _from_blocks(fine, size)


def carry_back_through(
    coarse_map: torch.Tensor, assignments: Sequence[torch.Tensor], window: int | None = None
) -> torch.Tensor:
    """Eq. 5 composed: ``coarse_map`` at the coarsest level carried back through ``assignments``, listed from
    the finest to the coarsest (``HCFormerPixelPath.assignments``' order: strides 4<-8, 8<-16, 16<-32), to the
    finest level's size."""
    for assignment in reversed(assignments):
        coarse_map = carry_back(coarse_map, assignment, window)
    return coarse_map


class ChannelProjection(nn.Module):
    """LayerNorm over the channels and a 1x1 convolution (a linear layer per pixel): HCFormer's projection of a
    backbone map before the clustering (Fig. 2). ``(B, C_in, H, W)`` -> ``(B, C_out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_channels)
        self.proj = nn.Linear(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous: products with the gathered NCHW maps then have one memory layout (torch.export traces them
        # without guards on the sizes)
        return self.proj(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2).contiguous()


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class HCFormerPixelPath(nn.Module):
    """HCFormer's hierarchical clustering in place of the FPN, with ``PixelDecoder``'s contract.

    A clustering module (``ChannelProjection`` of both maps to ``cluster_dim``, then Eq. 3 with its own scale
    ``s^(i)``) sits on each of the backbone's three downsamplings (4 -> 8, 8 -> 16, 16 -> 32; none on the patch
    embedding, as the paper leaves the stem alone). The fine map is a stage's output, the coarse map the next
    stage's output: the pixel path sees the stage outputs only, not the downsampling layer's output before the
    next stage's blocks, which the paper clusters to.

    Args:
        in_channels: channels of the backbone features at strides 4, 8, 16, 32.
        dim: width of the decoder's pixel features.
        mask_dim: width of the mask features (``E_cluster``); ``None`` for heads without masks (detection),
            which then need no assignments (unless ``decoder_levels="carried"``).
        cluster_dim: ``C_F``, the width the maps are projected to before Eq. 3 (128 in the paper).
        window: side of the coarse neighbourhood (3 in the paper).
        initial_scale: the scales' initial value (0.1 in the paper, Appendix D).
        decoder_levels: what the decoder's queries cluster. ``"cluster"`` (the paper, §4.1: its transformer
            decoder attends to the backbone's last map only, no multi-scale features): the stride-32 cluster
            features, projected to ``dim``, are all three levels. ``"carried"``: the levels keep the FPN's
            strides 32, 16, 8: the projected stride-32 features and the same carried back to 16 and 8.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        dim: int = 256,
        mask_dim: int | None = 256,
        cluster_dim: int = 128,
        window: int = 3,
        initial_scale: float = 0.1,
        decoder_levels: str = "cluster",
    ):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"HCFormerPixelPath takes four backbone maps (strides 4/8/16/32), got {len(in_channels)}")
        if decoder_levels not in DECODER_LEVELS:
            raise ValueError(f"decoder_levels must be one of {DECODER_LEVELS}, got {decoder_levels!r}")
        if window % 2 == 0:
            raise ValueError(f"the neighbourhood window must be odd, got {window}")
        self.with_masks = mask_dim is not None
        self.decoder_levels = decoder_levels
        self.window = window
        self.fine_projections = nn.ModuleList(ChannelProjection(c, cluster_dim) for c in in_channels[:-1])
        self.coarse_projections = nn.ModuleList(ChannelProjection(c, cluster_dim) for c in in_channels[1:])
        self.scales = nn.Parameter(torch.full((len(in_channels) - 1,), float(initial_scale)))
        self.level_projection = nn.Sequential(nn.Conv2d(in_channels[-1], dim, 1, bias=False), _group_norm(dim))
        self.cluster_embedding = nn.Conv2d(in_channels[-1], mask_dim, 1) if self.with_masks else None

    def assignments(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``features``: ``(B, C_i, H_i, W_i)`` at strides 4/8/16/32 -> the three assignments
        ``(B, window², H_i, W_i)`` of the maps at strides 4, 8, 16 to the next ones (finest first)."""
        return [
            local_cluster_assignment(
                self.fine_projections[i](features[i]),
                self.coarse_projections[i](features[i + 1]),
                self.scales[i],
                self.window,
            )
            for i in range(len(self.fine_projections))
        ]

    def regularization(self) -> torch.Tensor:
        """``L_reg = Σ_i |s^(i)|``, which the paper adds to the loss with weight 0.1 (§4.1) to push Eq. 3 towards
        hard clustering."""
        return self.scales.abs().sum()

    def forward_with_assignments(
        self, features: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor] | None]:
        """``forward``'s outputs and the assignments (``assignments``; ``None`` when nothing needs them)."""
        # contiguous NCHW (the backbone's maps are permuted views): one memory layout through the products below,
        # which torch.export then traces without guards on the sizes
        features = [feature.contiguous() for feature in features]
        cluster_features = self.level_projection(features[-1])  # (B, dim, H/32, W/32)
        needs_assignments = self.with_masks or self.decoder_levels == "carried"
        assignments = self.assignments(features) if needs_assignments else None
        if self.decoder_levels == "cluster":
            levels = [cluster_features] * 3
        else:
            stride16 = carry_back(cluster_features, assignments[2], self.window)
            levels = [cluster_features, stride16, carry_back(stride16, assignments[1], self.window)]
        if not self.with_masks:
            return None, levels, assignments
        mask_features = carry_back_through(self.cluster_embedding(features[-1]), assignments, self.window)
        return mask_features, levels, assignments

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """``features``: ``(B, C_i, H_i, W_i)`` at strides 4/8/16/32. Returns the mask features
        ``(B, mask_dim, H_0, W_0)``, ``E_cluster`` carried back from stride 32 (``None`` without masks), and the
        three decoder levels ``(B, dim, h, w)``: all at stride 32 (``decoder_levels="cluster"``) or at strides
        32, 16, 8 (``"carried"``)."""
        mask_features, levels, _ = self.forward_with_assignments(features)
        return mask_features, levels
