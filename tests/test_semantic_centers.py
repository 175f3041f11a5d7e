"""Semantic segmentation on ADE20K as the paper sets it (§4.1.3): as many cluster centers as classes, 150, each
center the initial query of its class (no learnt mix of the encoder's centers)."""

from pathlib import Path

import torch
import yaml

from clusterformer.tasks import SemanticTask

ROOT = Path(__file__).resolve().parents[1]


def ade20k_task(name: str, **overrides) -> SemanticTask:
    config = yaml.safe_load((ROOT / "configs" / "semantic" / f"{name}.yaml").read_text())
    return SemanticTask(**{**config["model"]["init_args"], **overrides})


def test_ade20k_configs_use_150_centers_one_to_one():
    for name in ("clusterformer_tiny_ade20k", "clusterformer_small_ade20k"):
        config = yaml.safe_load((ROOT / "configs" / "semantic" / f"{name}.yaml").read_text())
        grid = config["model"]["init_args"]["backbone_kwargs"]["center_grid"]
        assert grid[0] * grid[1] == config["model"]["init_args"]["num_classes"] == 150, name
    task = ade20k_task("clusterformer_tiny_ade20k", backbone="clusterformer_nano")
    assert task.model.backbone.stages[-1].blocks[-1].num_centers == 150
    assert task.model.decoder.center_to_query is None  # no mixing map


def test_each_query_starts_from_its_own_center():
    torch.manual_seed(0)
    task = ade20k_task("clusterformer_tiny_ade20k", backbone="clusterformer_nano").eval()
    with torch.no_grad():
        _, centers = task.model.backbone.forward_dense(torch.randn(1, 3, 64, 64))
        assert centers.shape[1] == 150
        queries = task.model.decoder.initial_queries(centers, 1)
        moved = centers.clone()
        moved[:, 37] += 1.0
        changed = (task.model.decoder.initial_queries(moved, 1) - queries).abs().amax(-1)[0]
    assert queries.shape[1] == 150
    assert changed[37] > 0 and torch.count_nonzero(changed) == 1  # query 37 reads center 37 only
