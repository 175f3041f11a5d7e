"""The timm contract: create_model, features_only, forward_intermediates, classifier handling,
weight decay, gradient checkpointing and local safetensors weights."""

import pytest
import timm
import torch
from safetensors.torch import save_file

import clusterformer  # noqa: F401  (registers the models)


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    return timm.create_model("clusterformer_nano").eval()


def test_registered_names():
    assert {"clusterformer_nano", "clusterformer_tiny", "clusterformer_small"} <= set(
        timm.list_models("clusterformer_*")
    )


def test_num_classes_and_reset_classifier(nano):
    model = timm.create_model("clusterformer_nano", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 10)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 256)
    model.reset_classifier(0, "")
    assert model(x).shape == (2, 2, 2, 256)  # unpooled NHWC tokens


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 3), (2,)])
def test_features_only(out_indices):
    model = timm.create_model("clusterformer_tiny", features_only=True, out_indices=out_indices)
    feats = model(torch.randn(1, 3, 224, 160))
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    assert model.feature_info.reduction() == [4 * 2**i for i in out_indices]
    assert model.feature_info.channels() == [(96, 192, 384, 768)[i] for i in out_indices]
    for f, stride in zip(feats, model.feature_info.reduction(), strict=True):
        assert f.shape[2:] == (224 // stride, 160 // stride)


def test_features_only_drops_unused_stages():
    model = timm.create_model("clusterformer_nano", features_only=True, out_indices=(0, 1))
    assert len(model.model.stages) == 2


@pytest.mark.parametrize("head", ["centers", "tokens"])
def test_forward_intermediates(head):
    torch.manual_seed(0)
    nano = timm.create_model("clusterformer_nano", head=head).eval()
    x = torch.randn(2, 3, 64, 96)
    final, inter = nano.forward_intermediates(x)
    assert len(inter) == 4
    torch.testing.assert_close(final, nano.forward_features(x))  # what the head reads
    last = nano.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
    assert len(last) == 1
    tokens = nano.norm(inter[-1].permute(0, 2, 3, 1))  # the normalised tokens of the last stage, NHWC
    torch.testing.assert_close(last[0], tokens.permute(0, 3, 1, 2))
    if head == "tokens":
        torch.testing.assert_close(final, tokens)
    else:  # the normalised centers of the last block, (B, K, heads * d)
        assert final.shape == (2, 100, 256)
    nhwc = nano.forward_intermediates(x, indices=[0], output_fmt="NHWC", intermediates_only=True)
    torch.testing.assert_close(nhwc[0], inter[0].permute(0, 2, 3, 1))
    # pre_logits of the head is the pooled final feature
    torch.testing.assert_close(
        nano.forward_head(final, pre_logits=True), final.mean(dim=tuple(range(1, final.ndim - 1)))
    )


def test_no_weight_decay_names_exist_and_cover_similarity_scalars(nano):
    names = dict(nano.named_parameters())
    nwd = nano.no_weight_decay()
    assert nwd and nwd <= set(names)
    assert all(names[n].ndim <= 1 for n in nwd)
    assert "stages.0.blocks.0.dispatch.sim_alpha" in nwd
    from timm.optim import create_optimizer_v2

    groups = create_optimizer_v2(nano, "adamw", weight_decay=0.05).param_groups
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(names["stages.0.blocks.0.dispatch.sim_alpha"]) in no_decay
    assert id(names["stages.0.blocks.0.mlp.fc1.weight"]) not in no_decay


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model("clusterformer_nano", num_classes=4)
    x = torch.randn(2, 3, 48, 48)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
    assert all(model.stages[i].grad_checkpointing for i in range(4))
    unused = set(model.parameters_unused_by_head())  # the center head does not reach them
    assert [n for (n, _), g in zip(model.named_parameters(), grads[1], strict=True) if g is None] == [
        n for n, _ in model.named_parameters() if n in unused
    ]
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_group_matcher_covers_every_parameter(nano):
    from timm.models import group_parameters

    groups = group_parameters(nano, nano.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(list(nano.parameters()))


def test_local_safetensors_weights(tmp_path, nano):
    path = tmp_path / "nano.safetensors"
    save_file({k: v.contiguous() for k, v in nano.state_dict().items()}, str(path))
    loaded = timm.create_model("clusterformer_nano", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for (k, a), b in zip(nano.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    # a new head for another number of classes, the rest loaded
    other = timm.create_model(
        "clusterformer_nano", pretrained=True, num_classes=7, pretrained_cfg_overlay=dict(file=str(path))
    )
    torch.testing.assert_close(other.stem.proj.weight, nano.stem.proj.weight)
    assert other.head.out_features == 7
    # and as a feature extractor
    feats = timm.create_model(
        "clusterformer_nano", pretrained=True, features_only=True, pretrained_cfg_overlay=dict(file=str(path))
    )
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(feats(x)[-1], nano.forward_intermediates(x, intermediates_only=True)[-1])


def test_pretrained_without_a_file_fails_clearly():
    with pytest.raises(RuntimeError, match="pretrained"):
        timm.create_model("clusterformer_nano", pretrained=True)
