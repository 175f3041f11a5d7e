"""The decoder's convergence accelerators (issue: dense tasks that visibly work): masked attention in clustering
terms, denoising queries (kept apart from the matching queries), their losses; each against a slow version."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import clusterformer  # noqa: F401
from clusterformer.heads import ClusteringDecoderLayer, build_set_model
from clusterformer.heads.decoder import foreground_blocked, group_attention_mask
from clusterformer.heads.denoising import Denoiser, noised_boxes, target_boxes
from clusterformer.layers import RecurrentClustering
from clusterformer.losses import SetLossSettings
from clusterformer.tasks.sets import set_criterion
from helpers import set_losses_over_steps

DECODER = dict(num_queries=6, dim=32, mask_dim=32, num_layers=3, num_heads=4, iterations=2, ffn_dim=64)


def _slow_em(c: RecurrentClustering, centers, keys, values, blocked, iterations):
    """One slice: centers ``(K, d)``, keys ``(N, d)`` (normalised), values ``(N, d)``; blocked ``(N, K)``; the E-step
    a softmax over the unblocked clusters of each token, written with explicit exponentials."""
    d = centers.shape[1]
    for _ in range(iterations):
        q = F.layer_norm(centers @ c.q.weight.T + c.q.bias, (d,), c.q_norm.weight, c.q_norm.bias)
        logits = keys @ q.T / (math.sqrt(d) * float(c.temperature))
        assign = torch.zeros_like(logits)
        for p in range(logits.shape[0]):
            open_ = [k for k in range(logits.shape[1]) if not blocked[p, k]]
            weights = torch.stack([logits[p, k].exp() for k in open_])
            for j, k in enumerate(open_):
                assign[p, k] = weights[j] / weights.sum()
        centers = (assign.T @ values + 1e-6 * centers) / (assign.sum(0)[:, None] + 1e-6)
    return centers, assign


def test_blocked_e_step_is_a_softmax_over_the_open_clusters(float64):
    torch.manual_seed(0)
    c = RecurrentClustering(8, num_heads=1, head_dim=8, iterations=2)
    centers, keys, values = torch.randn(1, 8, 4), torch.randn(1, 9, 8), torch.randn(1, 8, 9)
    blocked = torch.rand(1, 9, 4) < 0.5
    blocked[..., 0] = False  # every token keeps one cluster
    with torch.no_grad():
        out, assign = c(centers, keys, values, (9, 1), blocked)
        slow_centers, slow_assign = _slow_em(c, centers[0].T, c.k_norm(keys[0]), values[0].T, blocked[0], c.iterations)
    torch.testing.assert_close(assign[0], slow_assign)
    torch.testing.assert_close(out[0].T, slow_centers)
    assert (assign[blocked] == 0).all()


def test_groups_cluster_the_tokens_each_on_their_own(float64):
    """With groups, each group's E-step shares every token among its own clusters only: the result is that of
    running each group alone."""
    torch.manual_seed(0)
    c = RecurrentClustering(8, num_heads=1, head_dim=8, iterations=3)
    centers, keys, values = torch.randn(2, 8, 7), torch.randn(2, 11, 8), torch.randn(2, 8, 11)
    groups = [3, 2, 2]
    with torch.no_grad():
        together, assign = c(centers, keys, values, (11, 1), groups=groups)
        start = 0
        for size in groups:
            alone, alone_assign = c(centers[..., start : start + size], keys, values, (11, 1))
            torch.testing.assert_close(together[..., start : start + size], alone)
            torch.testing.assert_close(assign[..., start : start + size], alone_assign)
            torch.testing.assert_close(assign[..., start : start + size].sum(-1), torch.ones(2, 11))
            start += size


def test_kmeans_groups_take_the_argmax_within_each_group():
    torch.manual_seed(0)
    c = RecurrentClustering(8, num_heads=1, head_dim=8, iterations=1, update="kmeans", m_step="sum")
    queries, keys = torch.randn(1, 8, 5), torch.randn(1, 6, 8)
    assign = c.assign(queries * c.scale, keys, groups=[3, 2])
    logits = keys @ queries
    for p in range(6):
        assert assign[0, p, :3].argmax() == logits[0, p, :3].argmax() and assign[0, p, :3].sum() == 1
        assert assign[0, p, 3:].argmax() == logits[0, p, 3:].argmax() and assign[0, p, 3:].sum() == 1


def test_foreground_blocked_matches_a_loop():
    torch.manual_seed(0)
    masks = torch.randn(2, 5, 8, 12) * 3
    masks[1, :2] = -10  # no query of the first group claims any pixel of image 1: all open to that group
    groups = [2, 3]
    blocked = foreground_blocked(masks, (4, 6), groups)
    resized = F.interpolate(masks, size=(4, 6), mode="bilinear", align_corners=False)
    assert blocked.shape == (2, 24, 5)
    for b in range(2):
        for n in range(24):
            y, x = divmod(n, 6)
            for start, size in ((0, 2), (2, 3)):
                fg = [resized[b, k, y, x].sigmoid() >= 0.5 for k in range(start, start + size)]
                for j, k in enumerate(range(start, start + size)):
                    expected = (not fg[j]) and any(fg)  # a pixel that nobody claims stays open
                    assert bool(blocked[b, n, k]) == expected
    assert not blocked[1, :, :2].any()


def test_group_attention_mask_blocks_other_groups():
    mask = group_attention_mask([2, 1, 2])
    expected = torch.tensor(
        [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 0, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool
    )
    assert torch.equal(mask, expected)


def test_masked_layer_gives_no_mass_outside_the_foreground():
    torch.manual_seed(0)
    layer = ClusteringDecoderLayer(16, num_heads=4, iterations=2, ffn_dim=32)
    queries, memory, pos = torch.randn(2, 5, 16), torch.randn(2, 12, 16), torch.randn(12, 16)
    blocked = torch.rand(2, 12, 5) < 0.6
    blocked[..., 4] = False
    _, assignments = layer.cluster(queries, memory, pos, blocked)
    assert (assignments.permute(0, 2, 3, 1)[blocked] == 0).all()
    torch.testing.assert_close(assignments.sum(-1), torch.ones(2, 4, 12))


# ---------------------------------------------------------------- denoising queries
def _targets(masks: bool, hw=(64, 64), counts=(2, 3), crowd=False):
    targets = []
    for count in counts:
        m = torch.zeros(count, *hw, dtype=torch.bool)
        for j in range(count):
            m[j, 6 * j : 6 * j + 20, 4 + 10 * j : 26 + 10 * j] = True
        target = {"labels": torch.arange(count) % 3, "boxes": target_boxes({"masks": m})}
        if masks:
            target["masks"] = m
        if crowd:
            target["iscrowd"] = torch.tensor([0] * (count - 1) + [1])
        targets.append(target)
    return targets


def test_target_boxes_enclose_the_masks():
    m = torch.zeros(1, 10, 20, dtype=torch.bool)
    m[0, 2:5, 4:10] = True  # rows 2-4, columns 4-9
    box = target_boxes({"masks": m})[0]
    torch.testing.assert_close(box, torch.tensor([7 / 20, 3.5 / 10, 6 / 20, 3 / 10]))


def test_noised_boxes_stay_within_the_noise_and_the_image():
    torch.manual_seed(0)
    boxes = torch.rand(500, 4) * torch.tensor([0.6, 0.6, 0.3, 0.3]) + torch.tensor([0.2, 0.2, 0.05, 0.05])
    noised = noised_boxes(boxes, 0.4)
    assert torch.equal(noised_boxes(boxes, 0.0), boxes)
    assert ((noised[:, :2] - boxes[:, :2]).abs() <= 0.4 * boxes[:, 2:] / 2 + 1e-6).all()
    assert (noised[:, 2:] <= boxes[:, 2:] * 1.4 + 1e-6).all() and (noised[:, 2:] > 0).all()
    xyxy = torch.cat([noised[:, :2] - noised[:, 2:] / 2, noised[:, :2] + noised[:, 2:] / 2], 1)
    assert (xyxy >= -1e-6).all() and (xyxy <= 1 + 1e-6).all()
    assert not torch.allclose(noised, boxes)


def test_denoiser_builds_groups_of_the_targets_with_padding_and_without_crowds():
    torch.manual_seed(0)
    denoiser = Denoiser(num_classes=3, dim=32, num_groups=4, label_noise=0.0, box_noise=0.0)
    targets = _targets(masks=True, counts=(2, 4), crowd=True)  # 1 and 3 segments after the crowds
    dn = denoiser(targets)
    assert (dn.group_size, dn.num_groups) == (3, 4)
    assert dn.queries.shape == (2, 12, 32) and dn.query_pos.shape == (2, 12, 32) and dn.reference.shape == (2, 12, 4)
    queries, target_index = dn.indices[0]
    assert queries.tolist() == [0, 3, 6, 9] and target_index.tolist() == [0, 0, 0, 0]
    queries, target_index = dn.indices[1]
    assert queries.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11] and target_index.tolist() == [0, 1, 2] * 4
    # without noise the queries are the targets' label embeddings at their boxes; padding gets the last embedding
    torch.testing.assert_close(dn.reference[1, 4], targets[1]["boxes"][1])
    torch.testing.assert_close(dn.queries[1, 5], denoiser.label_embed.weight[int(targets[1]["labels"][2])])
    torch.testing.assert_close(dn.queries[0, 1], denoiser.label_embed.weight[3])
    assert denoiser([{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]) is None


def test_label_noise_flips_about_its_share_of_labels():
    torch.manual_seed(0)
    denoiser = Denoiser(num_classes=5, dim=16, num_groups=50, label_noise=0.4, box_noise=0.0)
    target = {"labels": torch.zeros(40, dtype=torch.long), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(40, 1)}
    dn = denoiser([target])
    changed = (dn.queries[0] - denoiser.label_embed.weight[0]).abs().sum(-1) > 0
    # a flip draws any of the 5 classes, itself included: 0.4 * 4 / 5 of the labels change
    assert abs(changed.float().mean().item() - 0.32) < 0.05


@pytest.mark.parametrize(
    "kind",
    [
        dict(boxes=True, denoising=3),
        dict(boxes=True, denoising=2, query_position="boxes"),
        dict(boxes=False, masks=True, denoising=2, masked_attention=True),
        dict(boxes=True, masks=True, denoising=2, masked_attention=True, query_init="free"),
    ],
)
def test_denoising_queries_neither_see_nor_are_seen_by_the_matching_queries(kind):
    """The matching queries' predictions are those of a run without denoising; the denoising queries' are the same
    whatever the matching queries hold, and one group's do not change when another group's targets do."""
    torch.manual_seed(0)
    model = build_set_model("clusterformer_nano", num_classes=3, **DECODER, **kind).train()
    images = torch.randn(2, 3, 64, 64)
    targets = _targets(masks=kind.get("masks", False))
    with torch.no_grad():
        plain = model(images)
        torch.manual_seed(1)
        with_dn = model(images, targets)
        for key in ("logits", "boxes", "masks"):
            if key in plain:
                torch.testing.assert_close(with_dn[key], plain[key], atol=1e-5, rtol=1e-5)
                for a, b in zip(with_dn["aux"], plain["aux"], strict=True):
                    torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
        assert "dn" not in plain and len(with_dn["dn"]["aux"]) == len(with_dn["aux"])
        # other matching queries (their initial content changes): the denoising predictions stay
        if kind.get("query_init") == "free":
            model.decoder.query_feat.add_(torch.randn_like(model.decoder.query_feat))
        else:
            model.decoder.center_proj[0].bias.add_(torch.randn_like(model.decoder.center_proj[0].bias))
        torch.manual_seed(1)
        moved = model(images, targets)
        assert not torch.allclose(moved["logits"], with_dn["logits"], atol=1e-4)
        torch.testing.assert_close(moved["dn"]["logits"], with_dn["dn"]["logits"], atol=1e-5, rtol=1e-5)
        # another group's content changes: the first group's predictions stay, the changed group's move
        dn = model.denoiser(targets)
        size = dn.group_size
        changed = replace(
            dn,
            queries=torch.cat([dn.queries[:, :size], dn.queries[:, size:] + torch.randn_like(dn.queries[:, size:])], 1),
        )
        results = []
        for fixed in (dn, changed):
            model.denoiser.forward = lambda targets, fixed=fixed: fixed
            results.append(model(images, targets)["dn"])
        for key in ("logits", "boxes", "masks"):
            if key in results[0]:
                first, second = results[0][key], results[1][key]
                torch.testing.assert_close(first[:, :size], second[:, :size], atol=1e-5, rtol=1e-5)
                assert not torch.allclose(first[:, size:], second[:, size:], atol=1e-4)


@pytest.mark.parametrize("masks", [False, True])
def test_denoising_losses_reconstruct_the_targets_without_matching(masks):
    torch.manual_seed(0)
    kind = dict(boxes=not masks, masks=masks, denoising=2, masked_attention=masks)
    model = build_set_model("clusterformer_nano", num_classes=3, **DECODER, **kind).train()
    settings = SetLossSettings(num_points=64) if masks else SetLossSettings()
    criterion = set_criterion(3, not masks, masks, settings)
    targets = _targets(masks=masks)
    outputs = model(torch.randn(2, 3, 64, 64), targets)
    losses = criterion(outputs, targets)
    terms = ("loss_class", "loss_mask", "loss_dice") if masks else ("loss_class", "loss_bbox", "loss_giou")
    for term in terms:
        assert f"{term}_dn" in losses and f"{term}_dn_0" in losses
    # the class term of the denoising queries: one-hot at each (query, its target's label), background elsewhere
    from torchvision.ops import sigmoid_focal_loss

    logits = outputs["dn"]["logits"]
    one_hot = torch.zeros_like(logits)
    for image, (query, target) in enumerate(outputs["dn_indices"]):
        one_hot[image, query, targets[image]["labels"][target]] = 1
    pairs = sum(len(q) for q, _ in outputs["dn_indices"])
    expected = sigmoid_focal_loss(logits, one_hot, reduction="sum") / pairs
    torch.testing.assert_close(losses["loss_class_dn"], expected)
    total = criterion.weighted_total(losses)
    plain = criterion.weighted_total({k: v for k, v in losses.items() if "_dn" not in k})
    expected_dn = sum(criterion.weight_dict[t] * losses[f"{t}_dn"] for t in terms)
    assert total.item() > plain.item() + 0.99 * expected_dn.item()
    total.backward()
    assert model.denoiser.label_embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "decoder",
    [dict(), dict(masked_attention=True), dict(denoising=2), dict(masked_attention=True, denoising=2)],
)
def test_training_steps_lower_the_loss_with_each_switch(decoder):
    """A few steps on one batch lower the loss of an instance model, with and without the accelerators (the
    paper's configuration first)."""
    torch.manual_seed(0)
    model = build_set_model("clusterformer_nano", num_classes=3, boxes=False, masks=True, **DECODER, **decoder)
    criterion = set_criterion(3, False, True, SetLossSettings(num_points=64))
    images, targets = torch.randn(2, 3, 64, 64), _targets(masks=True)
    model.train()
    values = set_losses_over_steps(model, criterion, images, targets)
    assert values[-1] < values[0]


def test_masked_attention_needs_masks_and_a_callback():
    with pytest.raises(ValueError, match="masked_attention"):
        build_set_model("clusterformer_nano", num_classes=3, boxes=True, masks=False, masked_attention=True, **DECODER)
    model = build_set_model("clusterformer_nano", num_classes=3, boxes=False, masks=True, masked_attention=True,
                            **DECODER)  # fmt: skip
    features, centers = model.backbone.forward_dense(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="predict"):
        model.decoder(features, centers)
    out = model(torch.randn(1, 3, 64, 64))
    assert len(out["aux"]) == DECODER["num_layers"]  # the initial queries' prediction is supervised too


# ---------------------------------------------------------------- query selection
@pytest.mark.parametrize(
    "kind",
    [
        dict(boxes=True, num_queries=6),
        dict(boxes=True, num_queries=6, query_position="boxes", denoising=2),
        dict(boxes=False, masks=True, num_queries=6, query_init="free", masked_attention=True),
    ],
)
def test_query_selection_starts_from_the_top_scoring_centers(kind):
    torch.manual_seed(0)
    decoder = {**DECODER, **{k: v for k, v in kind.items() if k not in ("boxes", "masks")}}
    model = build_set_model(
        "clusterformer_nano", num_classes=3, boxes=kind["boxes"], masks=kind.get("masks", False), query_selection=True,
        **decoder,
    )  # fmt: skip
    images = torch.randn(2, 3, 64, 64)
    _, centers = model.backbone.forward_dense(images)
    centers = centers + torch.randn_like(centers)  # at 64 px many centers coincide: make the ranking strict
    proposals, selected, boxes = model.select(centers)
    state = model.decoder.proposals(centers)
    assert proposals["logits"].shape == (2, centers.shape[1], 3)
    scores = proposals["logits"].sigmoid().amax(-1)
    for b in range(2):
        order = scores[b].argsort(descending=True)[:6]
        torch.testing.assert_close(selected[b], state[b, order])
        if kind["boxes"]:
            torch.testing.assert_close(boxes[b], proposals["boxes"][b, order])
    targets = _targets(masks=kind.get("masks", False))
    out = model.train()(images, targets)
    assert out["logits"].shape == (2, 6, 3) and out["proposals"]["logits"].shape == (2, centers.shape[1], 3)
    settings = SetLossSettings(num_points=64) if kind.get("masks") else SetLossSettings()
    criterion = set_criterion(3, kind["boxes"], kind.get("masks", False), settings)
    losses = criterion(out, targets)
    assert "loss_class_enc" in losses and ("loss_giou_enc" in losses) == kind["boxes"]
    criterion.weighted_total(losses).backward()
    assert model.decoder.selection_pos.weight.grad.abs().sum() > 0
    assert model.decoder.center_proj[0].weight.grad.abs().sum() > 0


def test_query_selection_follows_the_class_scores():
    """The queries are the centers that the class head scores highest, best first."""
    torch.manual_seed(0)
    model = build_set_model("clusterformer_nano", num_classes=3, query_selection=True, **{**DECODER, "num_queries": 3})

    class Ranked(torch.nn.Module):  # center j scores j on class 1: the last three centers win, the last first
        def forward(self, state):
            ranks = torch.arange(state.shape[1], dtype=state.dtype)[None, :, None]
            return torch.cat([torch.zeros_like(ranks) - 9, ranks / 20 - 2, torch.zeros_like(ranks) - 9], -1)

    model.head.class_embed = Ranked()
    _, centers = model.backbone.forward_dense(torch.randn(1, 3, 64, 64))
    centers = centers + torch.randn_like(centers)  # distinct centers
    proposals, selected, boxes = model.select(centers)
    k = centers.shape[1]
    state = model.decoder.proposals(centers)
    torch.testing.assert_close(selected, state[:, [k - 1, k - 2, k - 3]])
    torch.testing.assert_close(boxes, proposals["boxes"][:, [k - 1, k - 2, k - 3]])
    with pytest.raises(ValueError, match="too many"):
        build_set_model("clusterformer_nano", num_classes=3, query_selection=True, **{**DECODER, "num_queries": 200})
