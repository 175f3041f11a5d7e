"""The classification head of paper §3.3 ("a single-layer MLP takes the cluster centers"): the last block's
updated centers -> norm -> average over the clusters -> one Linear; and the token head kept as ``head="tokens"``."""

import pytest
import timm
import torch

import clusterformer  # noqa: F401  (registers the models)
from clusterformer import ClusterBlock
from clusterformer.commands.ablate import TABLES
from clusterformer.tasks import ClassificationTask


def nano(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("clusterformer_nano", num_classes=5, **kwargs).eval()


def test_the_default_head_reads_the_last_blocks_centers():
    model = nano()
    assert model.head_source == "centers"
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        centers = model.forward_clusters(images)[-1]["centers"]  # (B, heads, K, d) of the last block
        b, heads, k, d = centers.shape
        flat = centers.permute(0, 2, 1, 3).reshape(b, k, heads * d)  # a center is its heads side by side
        expected = model.head(model.head_norm(flat).mean(dim=1))
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.forward_head(model.forward_features(images)), expected, rtol=1e-5, atol=1e-6)
        final, _ = model.forward_intermediates(images)
        torch.testing.assert_close(model.forward_head(final), expected, rtol=1e-5, atol=1e-6)


def test_the_token_head_averages_the_normalised_tokens():
    model = nano(head="tokens")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.head(model.norm(model.stages(model.stem(images))).mean(dim=(1, 2)))
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-6)
    assert isinstance(model.head_norm, torch.nn.Identity)


def test_a_wrong_head_is_refused():
    with pytest.raises(ValueError, match="head must be one of 'centers', 'tokens'"):
        nano(head="cls")


VARIANTS = [
    {}, {"head": "tokens"}, {"dispatch": "none"}, {"baseline": True}, {"head": "tokens", "dispatch": "none"},
    {"head_dim": 16}, {"center_update": "none"}, {"head": "tokens", "baseline": True},
    {"head": "tokens", "center_update": "kmeans"}, {"center_update": "kmeans", "m_step": "sum"},
    {"center_update": "cosine"}, {"layer_scale": 1e-5}, {"layer_scale": 1e-5, "dispatch": "none"},
]  # fmt: skip
TABLE_ROWS = [(f"{table} {label}", overrides) for table in ("6a", "6c", "6e") for label, overrides in TABLES[table]]


@pytest.mark.parametrize(
    "kwargs", VARIANTS + [overrides for _, overrides in TABLE_ROWS], ids=[str(v) for v in VARIANTS] + [
        label for label, _ in TABLE_ROWS]
)  # fmt: skip
def test_the_parameters_unused_by_the_head_are_those_without_a_gradient(kwargs):
    model = nano(**kwargs).train()
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    without = [n for n, p in model.named_parameters() if p.grad is None]
    assert without == model.parameters_unused_by_head()
    if kwargs in ({"head": "tokens"}, {"head": "tokens", "baseline": True}):
        assert without == []


def test_without_a_classifier_only_the_idle_clustering_is_unused():
    """``num_classes=0`` (the dense tasks' encoder): the model gives the pooled tokens, through ``norm`` and every
    block's MLP; without dispatching the clustering of every block is idle, the last block's included."""
    for kwargs in ({}, {"baseline": True}, {"dispatch": "none"}):
        torch.manual_seed(0)
        model = timm.create_model("clusterformer_nano", num_classes=0, **kwargs).train()
        model(torch.randn(2, 3, 64, 64)).square().sum().backward()
        without = [n for n, p in model.named_parameters() if p.grad is None]
        assert without == model.parameters_unused_by_head()
        parts = {n.split(".")[4] for n in without}
        assert parts == ({"norm1", "center_init", "clustering"} if kwargs == {"dispatch": "none"} else set())


def test_the_center_width_may_differ_from_the_stage_width():
    model = nano(head_dim=16)  # Table 6d: the heads stay, so the last stage's centers are 8 x 16 = 128 wide
    assert model.center_dim == 128 and model.num_features == 128 and model.head.in_features == 128
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_without_a_classifier_the_model_gives_the_token_features():
    model = nano()
    model.reset_classifier(0)
    assert isinstance(model.head_norm, torch.nn.Identity) and model.num_features == 256
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 256)
    model.reset_classifier(7)  # a classifier again: the center head, with a norm of its own
    assert isinstance(model.head_norm, torch.nn.LayerNorm) and model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    features = timm.create_model("clusterformer_nano", num_classes=0)  # the dense tasks' encoder
    assert not any(name.startswith("head_norm") for name, _ in features.named_parameters())


def test_the_classification_task_freezes_what_the_head_does_not_reach():
    task = ClassificationTask("clusterformer_nano", num_classes=4)
    frozen = [n for n, p in task.model.named_parameters() if not p.requires_grad]
    assert frozen == task.model.parameters_unused_by_head() and frozen
    tokens = ClassificationTask("clusterformer_nano", num_classes=4, model_kwargs={"head": "tokens"})
    assert all(p.requires_grad for p in tokens.model.parameters())


@pytest.mark.parametrize("update", ["recurrent", "kmeans", "vanilla", "criss_cross", "cosine", "none"])
@pytest.mark.parametrize("dispatch", ["ours", "none"])
def test_the_centers_alone_are_the_centers_of_the_whole_block(update, dispatch):
    torch.manual_seed(0)
    block = ClusterBlock(dim=16, num_heads=2, head_dim=8, center_grid=(2, 3), center_update=update,
                         dispatch=dispatch, reads_centers=True).eval()  # fmt: skip
    x = torch.randn(2, 5, 4, 16)
    with torch.no_grad():
        _, centers, _ = block(x, return_clusters=True)
        torch.testing.assert_close(block(x, centers_only=True), centers, rtol=0, atol=0)
    assert centers.shape == (2, 2, 6, 8)


def test_a_block_that_nobody_reads_has_no_centers():
    block = ClusterBlock(dim=16, num_heads=2, head_dim=8, center_update="none", dispatch="none")
    assert block.norm1 is None and block.center_init is None and block.clustering is None
    with pytest.raises(RuntimeError, match="no centers"):
        block(torch.randn(1, 2, 2, 16), centers_only=True)


def test_the_baselines_last_block_computes_the_initial_centers_for_the_head():
    model = nano(baseline=True)
    last = model.stages[-1].blocks[-1]
    assert last.clustering is None and isinstance(last.center_init, torch.nn.Module)
    assert all(block.norm1 is None for stage in model.stages for block in stage.blocks if block is not last)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        centers = model.forward_clusters(images)[-1]["centers"]  # C0 of Eq. 5
        b, heads, k, d = centers.shape
        expected = model.head(model.head_norm(centers.permute(0, 2, 1, 3).reshape(b, k, heads * d)).mean(dim=1))
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-6)
    # built without a classifier, the BASELINE has no centers; a classifier added later builds them
    features = timm.create_model("clusterformer_nano", num_classes=0, baseline=True)
    assert features.stages[-1].blocks[-1].norm1 is None
    features.reset_classifier(3)
    assert isinstance(features.stages[-1].blocks[-1].center_init, torch.nn.Module)
    features(images).logsumexp(-1).sum().backward()
    assert [n for n, p in features.named_parameters() if p.grad is None] == features.parameters_unused_by_head()
