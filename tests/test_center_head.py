"""The classification head of paper §3.3 ("a single-layer MLP takes the cluster centers"): the last block's
updated centers -> norm -> average over the clusters -> one Linear; and the token head kept as ``head="tokens"``."""

import pytest
import timm
import torch

import clusterformer  # noqa: F401  (registers the models)
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


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"head": "tokens"}, {"dispatch": "none"}, {"baseline": True}, {"head": "tokens", "dispatch": "none"},
     {"head_dim": 16}, {"center_update": "none"}],
)  # fmt: skip
def test_the_parameters_unused_by_the_head_are_those_without_a_gradient(kwargs):
    model = nano(**kwargs).train()
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    without = [n for n, p in model.named_parameters() if p.grad is None]
    assert without == model.parameters_unused_by_head()
    if kwargs == {"head": "tokens"}:
        assert without == []


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
