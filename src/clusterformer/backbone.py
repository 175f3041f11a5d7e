"""ClusterFormer backbone.

Paper: "ClusterFormer: Clustering As A Universal Visual Learner", Liang et al., NeurIPS 2023.

A four-stage hierarchy (strides 4, 8, 16, 32). Every block is pre-norm and residual:

1. center initialisation ``C0 = FFN(AdaptivePool_K(I))`` (Eq. 5),
2. recurrent cross-attention clustering, ``T`` E/M iterations with shared projections (Eq. 3),
3. feature dispatching of the updated centers back to the tokens (Eq. 6),
4. a channel MLP.

Tokens are kept channels-last, ``(B, H, W, C)``. The model follows timm's backbone interface
(``forward_features``, ``forward_head``, ``forward_intermediates``, ``reset_classifier``,
``no_weight_decay``, ``feature_info``) and is registered as ``clusterformer_{nano,tiny,small}``.
Design decisions are written down in ``docs/architecture.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import (
    CENTER_UPDATES,
    M_STEPS,
    CenterInit,
    ContextClusterUpdate,
    CrissCrossUpdate,
    CrossAttentionUpdate,
    FeatureDispatch,
    RecurrentClustering,
    assignment_maps,
    is_tracing,
)
from .layers.dispatching import NEEDS_ASSIGNMENTS
from .layers.fused import set_fused, worth_fusing

__all__ = ["ClusterFormer", "ClusterBlock"]

DEFAULT_HEAD_DIM = 32
HEADS = ("centers", "tokens")  # what the classifier reads (ClusterFormer's ``head``)
CLASSIFIER_KEYS = ("head.", "head_norm.")  # the state-dict keys of the classifier, not of the encoder


class CoordPatchEmbed(nn.Module):
    """Patch embedding of the image together with its normalised pixel coordinates.

    The two coordinate channels (in ``[-0.5, 0.5]``) give the clustering a sense of position, as in
    the upstream release and Context Cluster. Inputs of any size are padded on the bottom/right to a
    multiple of the patch size, so the output is ``ceil(H / p) x ceil(W / p)``.
    """

    def __init__(self, in_chans: int = 3, dim: int = 96, patch_size: int = 4, norm_layer=nn.LayerNorm):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans + 2, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> ``(B, ceil(H/p), ceil(W/p), dim)``."""
        expected = self.proj.in_channels - 2
        if x.ndim != 4 or x.shape[1] != expected:
            raise ValueError(f"expected images of shape (B, {expected}, H, W), got {tuple(x.shape)}")
        _, in_chans, h, w = x.shape
        p = self.patch_size
        pad = (0, (w + p - 1) // p * p - w, 0, (h + p - 1) // p * p - h)  # to whole patches (simple for torch.export)
        coords = torch.stack(torch.meshgrid(_coords(h, x), _coords(w, x), indexing="ij"))[None]  # (1, 2, H, W)
        # The convolution is linear: the coordinate channels are convolved once for the whole batch.
        weight = self.proj.weight
        image = F.conv2d(F.pad(x, pad), weight[:, :in_chans], self.proj.bias, stride=p)
        position = F.conv2d(F.pad(coords, pad), weight[:, in_chans:], stride=p)
        return self.norm((image + position).permute(0, 2, 3, 1))


def _coords(size: int, x: torch.Tensor) -> torch.Tensor:
    """``linspace(-0.5, 0.5, size)``; traced, the same values from ``arange`` (``torch.export`` fixes the number
    of steps of a ``linspace`` to the example's size)."""
    if is_tracing():
        return torch.arange(size, device=x.device, dtype=x.dtype) / max(size - 1, 1) - 0.5
    return torch.linspace(-0.5, 0.5, size, device=x.device, dtype=x.dtype)


class PatchMerging(nn.Module):
    """2x2 neighbourhood merge + linear reduction (stride 2); odd sizes are padded bottom/right."""

    def __init__(self, dim: int, out_dim: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, ceil(H/2), ceil(W/2), out_dim)``."""
        b, h, w, c = x.shape
        h2, w2 = (h + 1) // 2, (w + 1) // 2  # padded to 2 * h2 (not h + h % 2: the same, but provably even)
        x = F.pad(x, (0, 0, 0, 2 * w2 - w, 0, 2 * h2 - h))
        x = x.reshape(b, h2, 2, w2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


class ClusterBlock(nn.Module):
    """Center initialisation -> center update -> feature dispatching -> channel MLP.

    Args:
        dim: token channels.
        num_heads: clustering heads; the centers have ``num_heads * head_dim`` channels.
        head_dim: channels per head (32 in the paper).
        mlp_ratio: hidden width of the channel MLP.
        center_grid: centers along height and width (10 x 10 = 100 in the paper).
        iterations: E/M iterations T (3 in the paper) of the ``recurrent`` and ``kmeans`` updates.
        center_update: ``recurrent``, ``kmeans`` or ``none`` (:class:`~clusterformer.layers.RecurrentClustering`,
            with ``m_step`` and ``temperature``), or one of the methods of Table 6c, ``vanilla``, ``criss_cross``
            and ``cosine`` (:mod:`clusterformer.layers.comparators`; one pass each, ``cosine`` pools its centers
            instead of Eq. 5).
        dispatch: see :class:`~clusterformer.layers.FeatureDispatch`.
        hard_dispatch: top-1 mask in the dispatching similarity (Algorithm 2).
        center_hidden_ratio: hidden width of the center-initialisation FFN relative to ``dim``.
        drop_path: stochastic depth rate.
        layer_scale: initial value of per-channel residual scales, or ``None`` for none.
        reads_centers: something reads this block's centers (the center head of the classifier reads those of
            the encoder's last block): what computes them is built even where the block's own output would not
            need it.

    Only what reaches the output (or a reader of the centers) is built: without a center update and without
    dispatching (the BASELINE of Table 6a) the block is the channel MLP alone, or, with ``reads_centers``, the
    channel MLP beside the initial centers ``C0`` of Eq. 5.
    """

    # about 2 MiB of (N, K) assignments per chunk of slices
    chunk_elements = 2**19

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int = DEFAULT_HEAD_DIM,
        mlp_ratio: float = 4.0,
        center_grid: tuple[int, int] = (10, 10),
        iterations: int = 3,
        center_update: str = "recurrent",
        dispatch: str = "ours",
        hard_dispatch: bool = False,
        center_hidden_ratio: float = 0.4,
        m_step: str = "mean",
        temperature: float | None = None,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        norm_layer=nn.LayerNorm,
        reads_centers: bool = False,
        fused: bool = True,
    ):
        super().__init__()
        if center_update not in CENTER_UPDATES:
            raise ValueError(f"center update must be one of {CENTER_UPDATES}, got {center_update!r}")
        if dispatch in NEEDS_ASSIGNMENTS and center_update == "none":
            raise ValueError(f"dispatching {dispatch!r} reads the E-step assignments; center update 'none' has none")
        if m_step not in M_STEPS:
            raise ValueError(f"m_step must be one of {M_STEPS}, got {m_step!r}")
        if temperature is not None and center_update in ("vanilla", "criss_cross", "cosine"):
            raise ValueError(
                f"temperature divides the EM E-step's logits; center update {center_update!r} has no EM E-step"
            )
        center_dim = num_heads * head_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_centers = center_grid[0] * center_grid[1]
        self.center_update = center_update
        self._center_init_args = (dim, center_dim, center_grid, center_hidden_ratio, norm_layer)
        # the centers are computed if the output reads them (dispatching) or they are updated (the block's clusters
        # and their pictures; the values of an update "none" are built only for a dispatching), or if read outside
        updates = center_update != "none" or dispatch != "none"
        clusters = updates or reads_centers
        self.norm1 = norm_layer(dim) if clusters else None
        self.center_init = (
            CenterInit(dim, center_dim, center_grid, center_hidden_ratio)
            if clusters and center_update != "cosine"
            else None
        )
        if center_update == "vanilla":
            self.clustering = CrossAttentionUpdate(dim, num_heads, head_dim)
        elif center_update == "criss_cross":
            self.clustering = CrissCrossUpdate(dim, num_heads, head_dim, center_grid)
        elif center_update == "cosine":
            self.clustering = ContextClusterUpdate(dim, num_heads, head_dim, center_grid)
        elif updates:
            self.clustering = RecurrentClustering(
                dim, num_heads, head_dim, iterations, center_update, center_grid, m_step, temperature, fused
            )
        else:
            self.clustering = None
        self.dispatch = FeatureDispatch(
            center_dim, dim, dispatch, hard_dispatch, update_similarity=center_update == "cosine", fused=fused
        )
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.gamma1 = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale and dispatch != "none" else None
        self.gamma2 = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale else None

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(self.norm2(x))
        return out if self.gamma2 is None else self.gamma2 * out

    def read_centers(self) -> None:
        """Build what computes this block's centers where the block had no use for them (the BASELINE's norm and
        Eq. 5's center initialisation): a center head that is added later (``reset_classifier``) reads them."""
        if self.norm1 is not None:
            return
        dim, center_dim, grid, hidden_ratio, norm_layer = self._center_init_args
        self.norm1 = norm_layer(dim)
        self.center_init = CenterInit(dim, center_dim, grid, hidden_ratio)

    def forward(self, x: torch.Tensor, return_clusters: bool = False, centers_only: bool = False):
        """``x (B, H, W, C)`` -> same shape.

        With ``return_clusters`` also returns the updated centers ``(B, heads, K, d)`` and the last
        E-step's assignment maps ``(B, heads, K, H, W)`` (``None`` if the centers are not updated; both ``None``
        for a block without clustering).
        With ``centers_only`` returns only the updated centers ``(B, heads, K, d)``: no dispatching, no channel
        MLP (what the classification head reads of the encoder's last block).
        """
        dispatching = self.dispatch.mode != "none" and not centers_only
        if self.norm1 is None or not (dispatching or return_clusters or centers_only):  # nothing below is read
            if centers_only:
                raise RuntimeError("this block builds no clustering: it has no centers (see reads_centers)")
            x = x + self.drop_path(self._mlp(x))
            return (x, None, None) if return_clusters else x
        if self.clustering is not None and not isinstance(self.clustering, RecurrentClustering):
            return self._comparator_forward(x, return_clusters, centers_only)
        if self.clustering is None or (self.clustering.update == "none" and not dispatching):
            return self._initial_centers(x, centers_only)
        b, h, w, c = x.shape
        n, heads, k, d = h * w, self.num_heads, self.num_centers, self.head_dim
        tokens = self.norm1(x)
        centers0 = self.center_init(tokens)  # (B, K, heads * d)
        centers0 = centers0.view(b, k, heads, d).permute(0, 2, 3, 1).reshape(b * heads, d, k)
        keys, values = self.clustering.project(tokens.view(b, n, c))  # (B*heads, N, d) or None, (B*heads, d, N)

        # The (image, head) slices are clustered a few at a time, so that a slice's (N, K) assignment
        # stays in cache from its E-step to its dispatching; ``split`` (not indexing) so that the
        # backward pass concatenates the chunk gradients once. A traced graph takes one chunk (the number of
        # chunks depends on the input size). The fused operator works in blocks of its own: one call.
        if is_tracing() or x.is_cuda or self._fused(dispatching, values):
            parts = [(centers0, keys, values)]
        else:
            step = max(1, self.chunk_elements // (n * k))
            key_parts = [None] * len(range(0, b * heads, step)) if keys is None else keys.split(step)
            parts = zip(centers0.split(step), key_parts, values.split(step), strict=True)
        chunks = []
        # the last assignment is computed for the pictures, or for a dispatching that reads it
        need = return_clusters or (dispatching and self.dispatch.mode in NEEDS_ASSIGNMENTS)
        for chunk_centers, chunk_keys, chunk_values in parts:
            chunk_centers, chunk_assign = self.clustering(
                chunk_centers, chunk_keys, chunk_values, (h, w), need_assignments=need
            )
            chunk_received = self.dispatch.aggregate(chunk_centers, chunk_values, chunk_assign) if dispatching else None
            chunks.append((chunk_centers, chunk_assign, chunk_received))
        if centers_only:
            return _cat([chunk[0] for chunk in chunks]).view(b, heads, d, k).transpose(2, 3)
        if dispatching:
            received = _cat([chunk[2] for chunk in chunks])  # (B * heads, N, d)
            x = self._dispatch(x, received)
        x = x + self.drop_path(self._mlp(x))
        if not return_clusters:
            return x
        centers = _cat([chunk[0] for chunk in chunks]).view(b, heads, d, k).transpose(2, 3)
        maps = None if chunks[0][1] is None else assignment_maps(_cat([chunk[1] for chunk in chunks]), b, (h, w))
        return x, centers, maps

    def _fused(self, dispatching: bool, values: torch.Tensor) -> bool:
        """Whether this block's clustering and dispatching both run as the fused operator (one call, no chunks), for
        ``values (S, d, N)``."""
        if not worth_fusing(values, values.shape[0] * values.shape[-1] * self.num_centers):
            return False
        fused_dispatch = not dispatching or (self.dispatch.mode == "ours" and self.dispatch.fused)
        return fused_dispatch and (self.clustering.update == "none" or self.clustering.fused)

    def _dispatch(self, x: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
        """Add the projected ``received (B * heads, N, d)`` to the tokens ``x (B, H, W, C)``."""
        b, h, w, _ = x.shape
        heads, d = self.num_heads, self.head_dim
        received = received.view(b, heads, h * w, d).transpose(1, 2).reshape(b, h, w, heads * d)
        update = self.dispatch.project(received)
        return x + self.drop_path(update if self.gamma1 is None else self.gamma1 * update)

    def _initial_centers(self, x: torch.Tensor, centers_only: bool):
        """A block whose centers stay Eq. 5's ``C0`` and whose output does not read them (a center update "none"
        read by the center head, the BASELINE's last block): the centers ``(B, heads, K, d)``, after the channel
        MLP's output unless ``centers_only``; no assignment."""
        b = x.shape[0]
        heads, k, d = self.num_heads, self.num_centers, self.head_dim
        centers = self.center_init(self.norm1(x)).view(b, k, heads, d).transpose(1, 2)
        if centers_only:
            return centers
        return x + self.drop_path(self._mlp(x)), centers, None

    def _comparator_forward(self, x: torch.Tensor, return_clusters: bool, centers_only: bool = False):
        """The block with one of Table 6c's other center updates (one pass, all slices at once)."""
        b, h, w, _ = x.shape
        heads, k, d = self.num_heads, self.num_centers, self.head_dim
        tokens = self.norm1(x)
        if self.center_init is None:  # Context Cluster pools its own centers
            centers, values, weights = self.clustering(tokens)
        else:
            centers, values, weights = self.clustering(tokens, self.center_init(tokens))
        if centers_only:
            return centers
        if self.dispatch.mode != "none":
            slices = b * heads  # the slice layout of the dispatching: centers (S, d, K), values (S, d, N)
            received = self.dispatch.aggregate(
                centers.transpose(-1, -2).reshape(slices, d, k),
                values.transpose(-1, -2).reshape(slices, d, h * w),
                weights.reshape(slices, h * w, k),
            )
            x = self._dispatch(x, received)
        x = x + self.drop_path(self._mlp(x))
        if not return_clusters:
            return x
        return x, centers, assignment_maps(weights.reshape(b * heads, h * w, k), b, (h, w))


class ClusterStage(nn.Module):
    """Optional 2x downsampling followed by ``depth`` cluster blocks; ``reads_centers``: the centers of the last
    block are read (by the classifier's center head), see :class:`ClusterBlock`."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        downsample: bool,
        drop_path: Sequence[float],
        reads_centers: bool = False,
        **block_kwargs,
    ):
        super().__init__()
        norm_layer = block_kwargs.get("norm_layer", nn.LayerNorm)
        self.downsample = PatchMerging(in_dim, dim, norm_layer) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *[
                ClusterBlock(
                    dim, drop_path=drop_path[i], reads_centers=reads_centers and i == depth - 1, **block_kwargs
                )
                for i in range(depth)
            ]
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class ClusterFormer(nn.Module):
    """ClusterFormer encoder with a classification head.

    Args:
        in_chans: image channels.
        num_classes: classes of the head (0 for none).
        global_pool: ``'avg'`` or ``''``.
        head: what the classifier reads. ``"centers"`` (default; paper §3.3, "a single-layer MLP takes the
            cluster centers"): the updated centers of the last block ``(B, K, heads * d)`` -> ``head_norm`` ->
            average over the K clusters -> one Linear; the last block's dispatching and channel MLP and the
            token norm ``norm`` then do not reach the logits (:meth:`parameters_unused_by_head`; the dense
            tasks read them). The last block builds what computes its centers even where its own output would
            not read them (the BASELINE: Eq. 5's initial centers ``C0``; ``dispatch="none"``: its clustering).
            ``"tokens"``: the last stage's tokens -> ``norm`` -> average -> Linear.
        embed_dims, depths: per stage.
        num_heads: per stage; default ``dim // 32`` (3/6/12/24 for the paper's widths), kept fixed when
            ``head_dim`` changes, as in Table 6d.
        head_dim: channels per clustering head.
        mlp_ratios: channel-MLP widths per stage.
        center_grid: ``(rows, cols)`` of centers per block (10 x 10 = 100 centers).
        iterations: E/M iterations T.
        center_update, dispatch, hard_dispatch: the variants of Table 6c / 6e.
        m_step: ``"mean"`` (EM: normalised E-step, weighted-mean M-step) or ``"sum"`` (Algorithm 1 to the
            letter); see :class:`~clusterformer.layers.RecurrentClustering` and ``docs/architecture.md``.
        temperature: of the EM E-step's normalised logits (default 0.5; a buffer, so weights bring their own).
        baseline: the paper's BASELINE (no center update, no dispatching; neither is built, except the last
            block's initial centers for the center head); overrides both.
        center_hidden_ratio: hidden width of the center-initialisation FFN relative to the stage width.
        drop_rate: dropout before the classifier. drop_path_rate: stochastic depth, linear over blocks.
        layer_scale: initial per-channel residual scale (``None``: no layer scale).
        fused: the clustering and the dispatching through the fused operator (``clusterformer.layers.fused``: the
            same numbers, no ``(N, K)`` tensor kept); ``False``: the unfused products. Not a weight: switch it on a
            built model with ``clusterformer.layers.set_fused(model, enabled)``.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] | None = None,
        head_dim: int = DEFAULT_HEAD_DIM,
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        center_grid: tuple[int, int] | int = (10, 10),
        iterations: int = 3,
        center_update: str = "recurrent",
        dispatch: str = "ours",
        hard_dispatch: bool = False,
        baseline: bool = False,
        center_hidden_ratio: float = 0.4,
        m_step: str = "mean",
        temperature: float | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale: float | None = None,
        norm_layer: type[nn.Module] | None = None,
        head: str = "centers",
        fused: bool = True,
    ):
        # the constructor's arguments: save_pretrained writes them to config.json, which rebuilds the model
        init_args = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        super().__init__()
        self.init_args = init_args
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(map(repr, HEADS))}, got {head!r}")
        if not (len(embed_dims) == len(depths) == len(mlp_ratios)):
            raise ValueError("embed_dims, depths and mlp_ratios need one entry per stage")
        if num_heads is None:
            num_heads = [max(1, d // DEFAULT_HEAD_DIM) for d in embed_dims]
        if isinstance(center_grid, int):
            center_grid = (center_grid, center_grid)
        if baseline:
            center_update, dispatch = "none", "none"
        norm_layer = norm_layer or nn.LayerNorm
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dims = tuple(embed_dims)
        self.head_source = head
        self.center_dim = num_heads[-1] * head_dim  # width of the last block's centers
        self._norm_layer = norm_layer
        self.output_fmt = "NHWC"
        self.center_grid = tuple(center_grid)

        self.stem = CoordPatchEmbed(in_chans, embed_dims[0], 4, norm_layer)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # also under a meta device
        stages, self.feature_info = [], []
        in_dim = embed_dims[0]
        for i, (dim, depth) in enumerate(zip(embed_dims, depths, strict=True)):
            start = sum(depths[:i])
            stages.append(
                ClusterStage(
                    in_dim,
                    dim,
                    depth,
                    downsample=i > 0,
                    drop_path=rates[start : start + depth],
                    reads_centers=head == "centers" and num_classes > 0 and i == len(depths) - 1,
                    num_heads=num_heads[i],
                    head_dim=head_dim,
                    mlp_ratio=mlp_ratios[i],
                    center_grid=self.center_grid,
                    iterations=iterations,
                    center_update=center_update,
                    dispatch=dispatch,
                    hard_dispatch=hard_dispatch,
                    center_hidden_ratio=center_hidden_ratio,
                    m_step=m_step,
                    temperature=temperature,
                    layer_scale=layer_scale,
                    norm_layer=norm_layer,
                )
            )
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2**i, module=f"stages.{i}"))
            in_dim = dim
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(embed_dims[-1])  # the last stage's tokens (token head, dense features)
        self.head_drop = nn.Dropout(drop_rate)
        self._build_head(num_classes)
        self.apply(self._init_weights)
        for module in self.modules():
            if isinstance(module, RecurrentClustering):
                module.init_as_kmeans()
        set_fused(self, fused)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # --- timm interface -------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Similarity scale/shift and criss-cross gate scalars are not decayed (norms and biases are excluded by
        timm)."""
        return {n for n, _ in self.named_parameters() if n.endswith(("sim_alpha", "sim_beta", "clustering.gamma"))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def _build_head(self, num_classes: int) -> None:
        """The classifier; the center head's norm exists only with a classifier (``num_classes > 0``), so that a
        backbone without one (the dense tasks', ``num_classes=0``) has no parameter that nothing reads."""
        reads_centers = self.head_source == "centers" and num_classes > 0
        last = self.stages[-1].blocks[-1]
        center_dim = last.num_heads * last.head_dim
        width = center_dim if reads_centers else self.embed_dims[len(self.stages) - 1]
        self.num_features = self.head_hidden_size = width
        self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        if not reads_centers:
            self.head_norm = nn.Identity()
            return
        if last.norm1 is None:  # a BASELINE built without a classifier: its last block gets Eq. 5's centers
            last.read_centers()
            last.center_init.apply(self._init_weights)
        if isinstance(getattr(self, "head_norm", nn.Identity()), nn.Identity):  # kept when the classes change
            self.head_norm = self._norm_layer(center_dim)

    @property
    def reads_centers(self) -> bool:
        """Whether the classifier reads the centers of the last block (the center head with a classifier)."""
        return not isinstance(self.head_norm, nn.Identity)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self._build_head(num_classes)
        if isinstance(self.head, nn.Linear):
            self._init_weights(self.head)

    def save_pretrained(
        self,
        folder: str | Path,
        *,
        metrics: dict | None = None,
        command: str | None = None,
        training_data: str | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write the model as a Hugging Face-style folder: ``config.json``, ``model.safetensors`` and a model card
        ``README.md`` (:func:`clusterformer.hub.save_pretrained`). timm loads it back with
        ``timm.create_model("local-dir:FOLDER")``."""
        from .hub import save_pretrained

        return save_pretrained(
            self, folder, metrics=metrics, command=command, training_data=training_data, overwrite=overwrite
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ClusterFormer:
        """The timm model of a folder written by ``save_pretrained``, in eval mode: a classifier with its head, an
        encoder without one, or the encoder of a dense task's model (:func:`clusterformer.hub.load_backbone`)."""
        from .hub import load_backbone

        return load_backbone(folder)

    @torch.jit.ignore
    def parameters_unused_by_head(self) -> list[str]:
        """Names of the parameters that :meth:`forward` (the classifier, or the pooled features without one) does
        not reach, in the order of ``named_parameters()``; exactly those that a backward pass of the logits leaves
        without a gradient (``tests/test_center_head.py`` checks every variant of Table 6a, 6c and 6e):

        * with the center head, the token norm ``norm`` and the last block's dispatching and channel MLP (with
          their layer scales); with a center update ``"none"`` also its value projection (the centers stay ``C0``);
        * in every other block without dispatching (``dispatch="none"``), its clustering: norm, Eq. 5 and the
          update (the BASELINE builds none);
        * with ``center_update="kmeans"``, the query and key projections and their norms, which only the one-hot
          E-step reads (an argmax passes no gradient).

        The dense tasks read the first two groups; a classification task freezes all of them (DDP needs every
        trained parameter to get a gradient)."""
        read = self.stages[-1].blocks[-1] if self.reads_centers else None
        unused = []
        for name, block in self.named_modules():
            if not isinstance(block, ClusterBlock):
                continue
            parts = []
            if block is read:
                parts += ["dispatch", "gamma1", "norm2", "mlp", "gamma2"]
                if isinstance(block.clustering, RecurrentClustering) and block.clustering.update == "none":
                    parts += ["clustering"]
            elif block.dispatch.mode == "none":
                parts += ["norm1", "center_init", "clustering"]
            if isinstance(block.clustering, RecurrentClustering) and block.clustering.update == "kmeans":
                parts += ["clustering.q", "clustering.k", "clustering.q_norm", "clustering.k_norm"]
            for part in parts:
                child = block
                for attribute in part.split("."):
                    child = getattr(child, attribute, None)
                if isinstance(child, nn.Parameter):
                    unused.append(f"{name}.{part}")
                elif isinstance(child, nn.Module):
                    unused += [f"{name}.{part}.{p}" for p, _ in child.named_parameters()]
        if read is not None:
            unused += [f"norm.{p}" for p, _ in self.norm.named_parameters()]
        unused = set(unused)
        return [name for name, _ in self.named_parameters() if name in unused]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Stage outputs at strides 4/8/16/32 as ``(B, C_i, H_i, W_i)`` (or ``NHWC``).

        Args:
            indices: last ``n`` stages if an int, all if ``None``, else the listed stage indices.
            norm: apply the final norm to the last stage's output.
            stop_early: skip the stages after the last requested one.
            intermediates_only: return only the list of intermediates.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        x = self.stem(x)
        last = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        for i, stage in enumerate(stages):
            if i == last and self.reads_centers:  # the last block's centers too, for what the head reads
                x = stage.downsample(x)
                for block in stage.blocks[:-1]:
                    x = block(x)
                x, centers, _ = stage.blocks[-1](x, return_clusters=True)
            else:
                x = stage(x)
            if i in take_indices:
                out = self.norm(x) if norm and i == last else x
                intermediates.append(out.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else out)
        if intermediates_only:
            return intermediates
        if len(stages) - 1 == last:
            if self.reads_centers:
                b, heads, k, d = centers.shape
                x = self.head_norm(centers.transpose(1, 2).reshape(b, k, heads * d))
            else:
                x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and norm/head) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        prune_end = max_index < len(self.embed_dims) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.embed_dims[max_index]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def _last_centers(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and stages up to the last block, whose updated centers are returned as ``(B, K, heads * d)``."""
        x = self.stem(x)
        for stage in self.stages[:-1]:
            x = stage(x)
        stage = self.stages[-1]
        x = stage.downsample(x)
        for block in stage.blocks[:-1]:
            if stage.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        centers = stage.blocks[-1](x, centers_only=True)
        b, heads, k, d = centers.shape
        return centers.transpose(1, 2).reshape(b, k, heads * d)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> what the head reads: the normalised centers of the last block ``(B, K, heads * d)``
        (center head with a classifier), else the normalised last-stage tokens ``(B, H/32, W/32, C)``."""
        if not self.reads_centers:
            return self.norm(self.stages(self.stem(x)))
        return self.head_norm(self._last_centers(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=tuple(range(1, x.ndim - 1)))  # over the clusters (B, K, C) or the tokens (B, H, W, C)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_dense(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Features for the dense heads: the stage outputs ``(B, C_i, H_i, W_i)`` at strides 4/8/16/32
        (the last one normalised) and the cluster centers of the last block, ``(B, K, heads * d)``,
        which initialise the decoder's queries (paper Table 6f); ``None`` for a model without clustering
        (the BASELINE; with a center head, whose last block computes Eq. 5's initial centers, those)."""
        features = []
        x = self.stem(x)
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            if i < last:
                x = stage(x)
            else:
                x = stage.downsample(x)
                for block in stage.blocks[:-1]:
                    if stage.grad_checkpointing and torch.is_grad_enabled():
                        x = checkpoint(block, x, use_reentrant=False)
                    else:
                        x = block(x)
                x, centers, _ = stage.blocks[-1](x, return_clusters=True)
                x = self.norm(x)
            features.append(x.permute(0, 3, 1, 2))
        if centers is None:
            return features, None
        b, heads, k, d = centers.shape
        return features, centers.transpose(1, 2).reshape(b, k, heads * d)

    # --- explainability -------------------------------------------------------------------------
    @torch.no_grad()
    def forward_clusters(self, x: torch.Tensor, all_blocks: bool = False) -> list[dict[str, torch.Tensor | None]]:
        """The clusters of the last block of every stage (of every block with ``all_blocks``).

        Each entry holds ``centers (B, heads, K, d)`` and ``assignments (B, heads, K, H_i, W_i)``, the
        soft assignment of the last E-step (for the paper's update every token's assignment sums to 1
        over the K clusters; for ``vanilla`` and ``criss_cross`` the attention, which sums to 1 over the tokens;
        for ``cosine`` Context Cluster's similarity to the nearest center), or ``None`` where the centers are not
        updated. Both are ``None`` for a block without clustering (the BASELINE; the last block of a BASELINE
        with the center head gives Eq. 5's initial centers, which it computes for the head, and no assignment).
        """
        clusters = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage.downsample(x)
            for j, block in enumerate(stage.blocks):
                x, centers, maps = block(x, return_clusters=True)
                if all_blocks or j == len(stage.blocks) - 1:
                    clusters.append(dict(centers=centers, assignments=maps))
        return clusters


# where an encoder's keys can sit in a weight file: at the top (timm, ``convert --backbone-only``, a classifier),
# under a task checkpoint's ``model.``, a dense model's ``backbone.`` or a DDP wrapper's ``module.``
_PREFIXES = tuple(dict.fromkeys(w + m + b for w in ("", "module.") for m in ("", "model.") for b in ("", "backbone.")))
# the EM clustering's temperature: missing from EM weights saved before it was a buffer (they load at 1, see
# RecurrentClustering._load_from_state_dict)
_OLD_EM_KEYS = ("clustering.temperature",)
_LITERAL_M_STEP_KEYS = ("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias", "clustering.temperature")


def _encoder_prefix(keys: list[str], own: dict) -> str:
    """The prefix under which ``keys`` hold the most of the model's own keys (``""`` when none do)."""
    counts = {prefix: sum(k.startswith(prefix) and k[len(prefix) :] in own for k in keys) for prefix in _PREFIXES}
    return max(_PREFIXES, key=lambda prefix: counts[prefix])  # the first (shortest) of equal counts


def _weights_source(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    for key in ("file", "url", "hf_hub_id"):
        if cfg.get(key):
            return str(cfg[key])
    return f"the pretrained weights of {cfg.get('architecture', type(model).__name__)}"


def _count(items: list, word: str) -> str:
    return f"{len(items)} {word}" + ("" if len(items) == 1 else "s")


def _first(keys: list[str], count: int = 3) -> str:
    return ", ".join(keys[:count]) + (", ..." if len(keys) > count else "")


def checkpoint_filter_fn(state_dict: dict, model: ClusterFormer, strict: bool = True) -> dict:
    """The encoder weights of a weight file, checked against ``model``.

    Accepts plain state dicts, timm-style ``{'state_dict': ...}``, task checkpoints (keys under ``model.``) and
    dense models (the encoder under ``backbone.``; the decoder and heads beside it are left out). Everything but
    the classifier (``head`` and the center head's ``head_norm``: :data:`CLASSIFIER_KEYS`) must match: with
    ``strict`` (the default; ``pretrained_strict=False`` turns it off), encoder weights the file lacks, keys that
    belong to no part of the encoder and tensors of another shape are a
    :class:`~clusterformer.weights.CheckpointError` naming the file. The classifier is left to timm, which drops a
    head of another number of classes (and ignores a ``head_norm`` that a model without a center head lacks). timm
    loads with ``strict=False`` whenever it drops the head (another ``num_classes``, ``features_only``, a dense
    task's encoder), so this check is the one that applies then.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    own = model.state_dict()
    prefix = _encoder_prefix(list(state_dict), own)
    # keys outside the encoder's prefix are the rest of a task model (decoder, heads, loss buffers)
    out = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not strict:
        return out
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") or "head"
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    first_conv = cfg.get("first_conv") or ()
    first_conv = (first_conv,) if isinstance(first_conv, str) else tuple(first_conv)

    def is_classifier(key: str) -> bool:  # the head and the center head's norm, which a model without one lacks
        return key.startswith(CLASSIFIER_KEYS) or any(key.startswith(name + ".") for name in classifier)

    def saved_without(key: str) -> bool:  # EM weights from before the temperature buffer
        return key.endswith(_OLD_EM_KEYS) and key[: -len("temperature")] + "q_norm.weight" in out

    missing = [k for k in own if k not in out and not is_classifier(k) and not saved_without(k)]
    unexpected = [k for k in out if k not in own and not is_classifier(k)]
    resized = [
        f"{k} is {tuple(out[k].shape)}, not {tuple(own[k].shape)}"
        for k in own
        if k in out and not is_classifier(k) and k not in {c + ".weight" for c in first_conv}
        and tuple(out[k].shape) != tuple(own[k].shape)
    ]  # fmt: skip
    if not (missing or unexpected or resized):
        return out
    from .weights import CheckpointError

    name = cfg.get("architecture") or type(model).__name__
    encoder = [k for k in own if not is_classifier(k)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of its {len(encoder)} weights are missing ({_first(missing)})")
    if unexpected:
        where = f" under {prefix!r}" if prefix else ""
        verb = "belongs" if len(unexpected) == 1 else "belong"
        problems.append(f"{_count(unexpected, 'key')}{where} {verb} to no part of it ({_first(unexpected)})")
    if resized:
        problems.append(f"{_count(resized, 'tensor')} of another shape ({_first(resized, 2)})")
    literal = not (unexpected or resized) and all(k.endswith(_LITERAL_M_STEP_KEYS) for k in missing)
    if literal and any(k.endswith("clustering.q.weight") for k in out):
        advice = "these are weights of the literal M-step (no QK-norm): build the model with m_step='sum'"
    else:
        advice = (
            f"pass the weights of a {name} with these settings (a classifier's file, a task checkpoint or what "
            "'clusterformer convert --backbone-only' writes), or build the model with the settings they were "
            "trained with"
        )
    raise CheckpointError(
        f"{_weights_source(model)}: the weights do not fit the encoder of {name}: {' and '.join(problems)}; {advice}"
    )


def _create(variant: str, pretrained: bool = False, **kwargs) -> ClusterFormer:
    depths = kwargs.get("depths", (2, 2, 6, 2))
    out_indices = kwargs.pop("out_indices", tuple(range(len(depths))))
    strict = kwargs.get("pretrained_strict", True)
    return build_model_with_cfg(
        ClusterFormer,
        variant,
        pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, strict=strict),
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 224 / 248,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "clusterformer_nano": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0),
        "clusterformer_tiny": _cfg(),
        "clusterformer_small": _cfg(),
    }
)

# Sizes. tiny and small follow paper Table 1 (27.85M / 48.71M with the 1000-class head); nano is a
# CPU-sized model for demos and tests.
SIZES = {
    "clusterformer_nano": dict(embed_dims=(32, 64, 128, 256), depths=(2, 2, 2, 2)),
    "clusterformer_tiny": dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 6, 2)),
    "clusterformer_small": dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2)),
}


@register_model
def clusterformer_nano(pretrained: bool = False, **kwargs) -> ClusterFormer:
    """ClusterFormer-Nano: widths 32/64/128/256, depths 2/2/2/2 (about 2.6M parameters)."""
    return _create("clusterformer_nano", pretrained, **{**SIZES["clusterformer_nano"], **kwargs})


@register_model
def clusterformer_tiny(pretrained: bool = False, **kwargs) -> ClusterFormer:
    """ClusterFormer-Tiny: widths 96/192/384/768, depths 2/2/6/2."""
    return _create("clusterformer_tiny", pretrained, **{**SIZES["clusterformer_tiny"], **kwargs})


@register_model
def clusterformer_small(pretrained: bool = False, **kwargs) -> ClusterFormer:
    """ClusterFormer-Small: widths 96/192/384/768, depths 2/2/18/2."""
    return _create("clusterformer_small", pretrained, **{**SIZES["clusterformer_small"], **kwargs})
