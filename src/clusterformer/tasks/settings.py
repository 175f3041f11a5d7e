"""Typed settings of the dense tasks: ``DecoderSettings`` (the clustering decoder's options of
``heads.build_set_model``) here, the loss settings in ``losses.settings``.

The tasks' ``decoder`` and ``loss`` options are typed with these dataclasses, so LightningCLI checks their keys
and value types: ``--model.init_args.decoder '{num_querys: 10}'`` is an error that names ``num_querys``, and a
dict given on the command line is merged into the config's, key by key. Python callers (and the hyperparameters
of checkpoints, plain dicts) may pass a dict of the fields instead: ``as_settings`` turns it into the dataclass,
refusing unknown keys. The tasks store the settings as plain dicts (``dataclasses.asdict``) in their
hyperparameters: checkpoints are loaded weights-only, which refuses pickled classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from ..errors import SettingError

__all__ = ["DecoderSettings", "as_settings"]

Settings = TypeVar("Settings")


@dataclass(frozen=True)
class DecoderSettings:
    """The clustering decoder of the detection, instance, semantic and panoptic models (``heads.build_set_model``).

    Args:
        num_queries: decoder queries (the semantic task uses one per class instead).
        dim: width of the queries and pixel features.
        mask_dim: width of the mask embeddings.
        num_layers: decoder layers.
        num_heads: attention heads.
        iterations: clustering iterations per layer.
        ffn_dim: hidden width of the feed-forward networks.
        dropout: dropout of the decoder layers.
        query_init: ``"encoder"`` (queries from the encoder's cluster centers) or ``"free"`` (learnt).
        query_position: the queries' position embeddings, ``"learnt"`` or ``"boxes"``.
        box_reference: what a layer's box refines, ``"refine"`` or ``"clusters"``.
        m_step: the decoder's clustering, ``"mean"`` (EM reading) or ``"sum"`` (Algorithm 1 to the letter).
        temperature: the decoder's EM E-step temperature (``None``: the default).
        masked_attention: each layer clusters only the pixels of each query's previous mask (Mask2Former's masked
            attention in clustering terms; models with masks). Goes beyond the paper.
        query_selection: the queries start from the top-scoring encoder cluster centers (DINO / Mask DINO's query
            selection; the centers' class scores are supervised). Goes beyond the paper.
        denoising: groups of denoising queries in training (0: none; DN-DETR / DINO, Mask DINO for masks).
            Goes beyond the paper.
        dn_label_noise, dn_box_noise: the denoising queries' label flip probability and box noise scale.
        kind: the decoder's layers, ``"clusterformer"`` (the paper's) or ``"kmax"`` (kMaX-DeepLab's k-means
            cross-attention; models with masks); ``heads.decoder.DECODER_LAYERS``.
        pixel_path: the decoder's pixel features, ``"fpn"`` (the paper's) or ``"hcformer"`` (HCFormer's hierarchical
            clustering, its temperatures regularised in the loss); ``heads.decoder.PIXEL_PATHS``.
    """

    num_queries: int = 100
    dim: int = 256
    mask_dim: int = 256
    num_layers: int = 6
    num_heads: int = 8
    iterations: int = 3
    ffn_dim: int = 2048
    dropout: float = 0.0
    query_init: str = "encoder"
    query_position: str = "learnt"
    box_reference: str = "refine"
    m_step: str = "mean"
    temperature: float | None = None
    masked_attention: bool = False
    query_selection: bool = False
    denoising: int = 0
    dn_label_noise: float = 0.2
    dn_box_noise: float = 0.4
    kind: str = "clusterformer"
    pixel_path: str = "fpn"


def as_settings(cls: type[Settings], value: Settings | Mapping[str, Any] | None, option: str) -> Settings:
    """``value`` as a ``cls``: ``None`` gives the defaults, a mapping its fields (an unknown key is a
    :class:`~clusterformer.errors.SettingError` naming it and ``option``), an instance itself."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        names = [f.name for f in fields(cls)]
        unknown = [str(key) for key in value if key not in names]
        if unknown:
            raise SettingError(
                option,
                f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"the {cls.__name__} keys are {', '.join(names)}",
                "model",
            )
        return cls(**value)
    raise TypeError(f"{option}: expected a {cls.__name__} or a dict of its fields, got {type(value).__name__}")
