"""kMaX-DeepLab's k-means cross-attention (Eq. 7) and decoder layer: equations against slow loops, blocked pixels and
query groups, gradients, drop-query, the level schedule."""

import math

import pytest
import torch
import torch.nn.functional as F

from clusterformer.heads import ClusteringDecoder
from clusterformer.heads.decoder import group_attention_mask
from clusterformer.heads.denoising import DenoisingQueries
from clusterformer.heads.kmax import (
    DropQuery,
    KMaXDecoderLayer,
    block_dropped,
    cluster_argmax,
    kmeans_cross_attention,
    level_schedule,
)

pytestmark = pytest.mark.usefixtures("one_thread")

B, K, N, D = 2, 5, 7, 3


def loop_kmeans(q, k, v, blocked=None, groups=None):
    """Eq. 7 from the formula, loop by loop: the affinity ``q_k . k_n``; every pixel joins, within every group, the
    open cluster of largest affinity; each cluster's update is the sum of its pixels' values."""
    b_, k_, n_ = q.shape[0], q.shape[1], k.shape[1]
    groups = [k_] if groups is None else list(groups)
    logits = torch.zeros(b_, k_, n_, dtype=torch.float64)
    update = torch.zeros(b_, k_, v.shape[2], dtype=torch.float64)
    assignment = torch.zeros(b_, k_, n_, dtype=torch.float64)
    for b in range(b_):
        for c in range(k_):
            for n in range(n_):
                logits[b, c, n] = sum(float(q[b, c, i]) * float(k[b, n, i]) for i in range(q.shape[2]))
        for n in range(n_):
            start = 0
            for size in groups:
                best, best_logit = None, -math.inf
                for c in range(start, start + size):
                    if blocked is not None and blocked[b, n, c]:
                        continue
                    if logits[b, c, n] > best_logit:
                        best, best_logit = c, float(logits[b, c, n])
                if best is not None:
                    assignment[b, best, n] = 1.0
                    for i in range(v.shape[2]):
                        update[b, best, i] += float(v[b, n, i])
                start += size
    return update, logits, assignment


def random_qkv(seed=0, b=B, k=K, n=N, d=D):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, k, d, generator=g), torch.randn(b, n, d, generator=g), torch.randn(b, n, d + 1, generator=g))


def test_kmeans_cross_attention_matches_loops(float64):
    q, k, v = random_qkv()
    update, logits = kmeans_cross_attention(q, k, v)
    want_update, want_logits, _ = loop_kmeans(q, k, v)
    torch.testing.assert_close(logits, want_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(update, want_update, atol=1e-6, rtol=0)


def test_every_pixel_joins_exactly_one_cluster_and_update_is_a_sum_not_a_mean(float64):
    q, k, v = random_qkv(1)
    assignment = cluster_argmax(torch.bmm(q, k.transpose(1, 2)))
    assert torch.equal(assignment.sum(1), torch.ones(B, N))
    update, _ = kmeans_cross_attention(q, k, v)
    # the sum over the clusters of their updates is the sum of all the values
    torch.testing.assert_close(update.sum(1), v.sum(1), atol=1e-6, rtol=0)


def test_blocked_and_groups_match_loops(float64):
    q, k, v = random_qkv(2, k=6, n=9)
    g = torch.Generator().manual_seed(3)
    blocked = torch.rand(B, 9, 6, generator=g) < 0.4
    groups = [3, 2, 1]
    update, logits = kmeans_cross_attention(q, k, v, blocked, groups)
    want_update, want_logits, want_assignment = loop_kmeans(q, k, v, blocked, groups)
    torch.testing.assert_close(update, want_update, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, want_logits, atol=1e-6, rtol=0)  # the logits stay unmasked
    assignment = cluster_argmax(logits, blocked, groups)
    assert torch.equal(assignment, want_assignment)
    assert not assignment.transpose(1, 2)[blocked].any()  # a blocked pixel never joins its blocked cluster


def test_groups_cluster_the_pixels_each_on_their_own(float64):
    q, k, v = random_qkv(4, k=6, n=9)
    groups = [4, 2]
    together, _ = kmeans_cross_attention(q, k, v, groups=groups)
    alone_first, _ = kmeans_cross_attention(q[:, :4], k, v)
    alone_second, _ = kmeans_cross_attention(q[:, 4:], k, v)
    torch.testing.assert_close(together, torch.cat([alone_first, alone_second], 1), atol=1e-12, rtol=0)
    assignment = cluster_argmax(torch.bmm(q, k.transpose(1, 2)), groups=groups)
    assert torch.equal(assignment[:, :4].sum(1), torch.ones(B, 9))  # one cluster per group for every pixel
    assert torch.equal(assignment[:, 4:].sum(1), torch.ones(B, 9))


def test_pixel_blocked_for_a_whole_group_joins_none_of_it(float64):
    q, k, v = random_qkv(5)
    blocked = torch.zeros(B, N, K, dtype=torch.bool)
    blocked[0, 2, :] = True
    assignment = cluster_argmax(torch.bmm(q, k.transpose(1, 2)), blocked)
    assert assignment[0, :, 2].sum() == 0
    assert torch.equal(assignment[1].sum(0), torch.ones(N))


def test_query_update_uses_only_its_assigned_pixels(float64):
    q, k, v = random_qkv(6, k=3, n=12)
    update, logits = kmeans_cross_attention(q, k, v)
    owner = logits.argmax(1)  # (B, N)
    for cluster in range(3):
        mine = owner[0] == cluster
        changed = v.clone()
        changed[0, ~mine] += 10.0  # other clusters' pixels: no effect on this cluster
        again, _ = kmeans_cross_attention(q, k, changed)
        torch.testing.assert_close(again[0, cluster], update[0, cluster], atol=1e-12, rtol=0)
        if mine.any():
            changed = v.clone()
            changed[0, mine] += 1.0  # its own pixels: the sum moves by their count
            again, _ = kmeans_cross_attention(q, k, changed)
            torch.testing.assert_close(again[0, cluster], update[0, cluster] + mine.sum(), atol=1e-12, rtol=0)


def test_gradient_flows_to_the_values_not_through_the_argmax(float64):
    q, k, v = (t.requires_grad_() for t in random_qkv(7))
    update, _ = kmeans_cross_attention(q, k, v)
    update.square().sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert q.grad is None and k.grad is None  # the argmax cuts them off; kMaX supervises the logits instead


def loop_layer_cluster(layer, queries, query_pos, memory, memory_pos, blocked=None, groups=None):
    """The layer's k-means step from its weights, with the loops of ``loop_kmeans``."""
    q = (queries + query_pos) @ layer.q.weight.T + layer.q.bias
    k = (memory + memory_pos) @ layer.k.weight.T + layer.k.bias
    v = memory @ layer.v.weight.T + layer.v.bias
    return loop_kmeans(q / math.sqrt(q.shape[-1]), k, v, blocked, groups)


def reference_layer(layer, queries, query_pos, memory, memory_pos, blocked=None, groups=None, attn_mask=None):
    """The layer written out: C + out(LN(argmax(Q K^T) V)), post-norm; then self-attention and FFN, post-norm."""
    summed, logits, assignment = loop_layer_cluster(layer, queries, query_pos, memory, memory_pos, blocked, groups)
    x = layer.norm1(queries + layer.cluster_out(layer.retrieved_norm(summed)))
    attended, _ = layer.self_attn(x + query_pos, x + query_pos, x, attn_mask=attn_mask)
    x = layer.norm2(x + attended)
    ffn = layer.ffn[3](F.gelu(layer.ffn[0](x)))
    return layer.norm3(x + ffn), logits, assignment


def layer_inputs(seed=0, b=B, k=K, n=N, dim=8):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, k, dim, generator=g),
        torch.randn(1, k, dim, generator=g),
        torch.randn(b, n, dim, generator=g),
        torch.randn(n, dim, generator=g),
    )


def test_layer_matches_the_written_out_layer(float64):
    torch.manual_seed(0)
    layer = KMaXDecoderLayer(8, num_heads=2, ffn_dim=16).eval()
    inputs = layer_inputs()
    assignments = []
    with torch.no_grad():
        out = layer(*inputs, assignments)
        want, want_logits, want_assignment = reference_layer(layer, *inputs)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.last_affinity, want_logits, atol=1e-6, rtol=0)
    assert len(assignments) == 1 and assignments[0].shape == (B, 1, N, K)
    assert torch.equal(assignments[0][:, 0].transpose(1, 2), want_assignment)


def test_layer_respects_blocked_and_groups(float64):
    torch.manual_seed(1)
    layer = KMaXDecoderLayer(8, num_heads=2, ffn_dim=16).eval()
    queries, query_pos, memory, memory_pos = layer_inputs(1, k=6, n=10)
    g = torch.Generator().manual_seed(2)
    blocked = torch.rand(B, 10, 6, generator=g) < 0.3
    groups = [4, 2]
    attn_mask = group_attention_mask(groups)
    assignments = []
    with torch.no_grad():
        out = layer(queries, query_pos, memory, memory_pos, assignments, blocked, groups, attn_mask)
        want, _, want_assignment = reference_layer(
            layer, queries, query_pos, memory, memory_pos, blocked, groups, attn_mask
        )
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    assert torch.equal(assignments[0][:, 0].transpose(1, 2), want_assignment)
    assert not assignments[0][:, 0][blocked].any()


def test_layer_groups_leave_the_first_queries_as_without_the_others(float64):
    """Denoising queries in their own group change nothing for the matching queries."""
    torch.manual_seed(2)
    layer = KMaXDecoderLayer(8, num_heads=2, ffn_dim=16).eval()
    queries, query_pos, memory, memory_pos = layer_inputs(3, k=6, n=10)
    groups = [4, 2]
    with torch.no_grad():
        alone = layer(queries[:, :4], query_pos[:, :4], memory, memory_pos)
        together = layer(queries, query_pos, memory, memory_pos, None, None, groups, group_attention_mask(groups))
    torch.testing.assert_close(together[:, :4], alone, atol=1e-12, rtol=0)


def test_layer_gradients_reach_every_parameter_q_and_k_through_the_affinity(float64):
    torch.manual_seed(3)
    layer = KMaXDecoderLayer(8, num_heads=2, ffn_dim=16)
    inputs = layer_inputs(4)
    layer(*inputs).square().sum().backward()
    for name, param in layer.named_parameters():
        if name.startswith(("q.", "k.")):
            assert param.grad is None, name  # the argmax: no gradient from the update
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    layer.zero_grad()
    layer(*inputs)
    layer.last_affinity.logsumexp(1).sum().backward()  # deep supervision of the affinity trains q and k
    for name in ("q.weight", "k.weight"):
        assert layer.get_parameter(name).grad.abs().sum() > 0, name


def test_one_training_step_lowers_the_loss(float64):
    torch.manual_seed(4)
    layer = KMaXDecoderLayer(8, num_heads=2, ffn_dim=16)
    inputs = layer_inputs(5, n=12)
    g = torch.Generator().manual_seed(6)
    target = torch.randn(B, K, 8, generator=g)
    labels = torch.randint(K, (B, 12), generator=g)  # a pixel -> cluster target for the affinity

    def loss():
        out = layer(*inputs)
        return F.mse_loss(out, target) + F.cross_entropy(layer.last_affinity, labels)

    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after < before


def test_layer_ignores_the_clustering_decoder_only_arguments(float64):
    a = KMaXDecoderLayer(8, 2, 3, 16, 0.0, "mean", 0.5)
    b = KMaXDecoderLayer(8, 2, 1, 16, 0.0, "sum", None)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    with pytest.raises(ValueError, match="divisible"):
        KMaXDecoderLayer(9, 2)


def test_kmax_layers_run_in_the_clustering_decoder_with_denoising_queries():
    """The decoder calls the kMaX layers as its own (the ``decoder.kind`` integration): assignments reach
    ``predict`` as ``(B, 1, N, Q + denoising)``, and the matching queries' states are those of a run without the
    denoising queries."""
    torch.manual_seed(5)
    decoder = ClusteringDecoder(
        [8, 8, 8, 8], center_dim=8, num_centers=4, num_queries=4, dim=16, mask_dim=16, num_heads=2, ffn_dim=16,
        num_layers=3, query_init="free",
    ).eval()  # fmt: skip
    decoder.layers = torch.nn.ModuleList(KMaXDecoderLayer(16, 2, ffn_dim=16) for _ in range(3))
    features = [torch.randn(2, 8, s, s) for s in (16, 8, 4, 2)]
    seen = []

    def predict(state, mask_features, assignments, hw, affinity):
        seen.append((assignments.shape, hw))
        assert affinity.shape == (2, 10, hw[0] * hw[1])  # the layer's affinity logits, every query's
        return {}

    denoising = DenoisingQueries(torch.randn(2, 6, 16), torch.randn(2, 6, 16), torch.rand(2, 6, 4), 3, 2, [])
    decoder.keep_assignments = True  # the assignments reach predict (as for the boxes of the clusters, or explain)
    with torch.no_grad():
        plain, _ = decoder(features)
        noised, _ = decoder(features, predict=predict, denoising=denoising)
    assert [shape for shape, _ in seen] == [(2, 1, 4, 10), (2, 1, 16, 10), (2, 1, 64, 10)]
    for a, b in zip(plain, noised, strict=True):
        torch.testing.assert_close(b[:, :4], a, atol=1e-5, rtol=0)


def test_drop_query_drops_about_p_and_never_all():
    drop = DropQuery(0.5).train()
    g = torch.Generator().manual_seed(0)
    dropped = drop(400, 50, generator=g)
    assert dropped.shape == (400, 50) and dropped.dtype == torch.bool
    assert abs(dropped.float().mean().item() - 0.5) < 0.02
    heavy = DropQuery(0.95).train()(2000, 3, generator=g)
    assert not heavy.all(1).any()  # every image keeps a query
    assert heavy.float().mean() > 0.6
    assert not DropQuery(0.9).train()(50, 1, generator=g).any()  # a single query is never dropped


def test_drop_query_is_a_no_op_in_eval_and_at_zero():
    assert DropQuery(0.5).eval()(4, 10) is None
    assert DropQuery(0.0).train()(4, 10) is None
    assert block_dropped(None, None, 7, 10) is None
    blocked = torch.rand(4, 7, 10) < 0.5
    assert block_dropped(None, blocked, 7, 10) is blocked
    with pytest.raises(ValueError, match="probability"):
        DropQuery(1.0)


def test_dropped_queries_cluster_nothing(float64):
    torch.manual_seed(6)
    layer = KMaXDecoderLayer(8, num_heads=2, ffn_dim=16).eval()
    queries, query_pos, memory, memory_pos = layer_inputs(7, k=6, n=10)
    dropped = torch.tensor([[True, False, True, False], [False, False, False, True]])
    blocked = block_dropped(dropped, None, 10, 6)  # two denoising queries after the four: never dropped
    assert blocked.shape == (B, 10, 6) and torch.equal(blocked[..., :4], dropped[:, None].expand(B, 10, 4))
    assert not blocked[..., 4:].any()
    assignments = []
    with torch.no_grad():
        layer(queries, query_pos, memory, memory_pos, assignments, blocked, [4, 2])
    assignment = assignments[0][:, 0]  # (B, N, K)
    assert not assignment[..., :4][dropped[:, None].expand(B, 10, 4)].any()
    assert torch.equal(assignment[..., :4].sum(-1), torch.ones(B, 10))  # every pixel still joins a kept query


def test_block_dropped_reopens_pixels_left_to_dropped_queries_only():
    blocked = torch.zeros(1, 3, 3, dtype=torch.bool)
    blocked[0, 0] = torch.tensor([False, True, True])  # pixel 0 open to query 0 only
    blocked[0, 2] = True  # pixel 2 closed to every query already: left as it is
    dropped = torch.tensor([[True, False, False]])
    combined = block_dropped(dropped, blocked, 3, 3)
    assert combined[0, 0].tolist() == [True, False, False]
    assert combined[0, 1].tolist() == [True, False, False]
    assert combined[0, 2].tolist() == [True, True, True]


@pytest.mark.parametrize(
    "num_layers, num_levels, want",
    [
        (6, 3, [0, 0, 1, 1, 2, 2]),
        (3, 3, [0, 1, 2]),
        (9, 3, [0, 0, 0, 1, 1, 1, 2, 2, 2]),
        (7, 3, [0, 0, 0, 1, 1, 2, 2]),
        (2, 3, [0, 1]),
        (1, 3, [0]),
        (4, 1, [0, 0, 0, 0]),
    ],
)
def test_level_schedule(num_layers, num_levels, want):
    assert level_schedule(num_layers, num_levels) == want


def test_level_schedule_is_coarse_to_fine_in_near_equal_blocks():
    for layers in range(1, 20):
        for levels in range(1, 5):
            schedule = level_schedule(layers, levels)
            assert len(schedule) == layers and schedule == sorted(schedule) and schedule[0] == 0
            if layers >= levels:
                counts = [schedule.count(level) for level in range(levels)]
                assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)
    with pytest.raises(ValueError):
        level_schedule(0)


# --- behind decoder.kind --------------------------------------------------------------------------------------------
KMAX_DECODER = dict(num_queries=6, dim=32, mask_dim=32, num_layers=6, num_heads=4, ffn_dim=64, kind="kmax")


def _mask_targets(counts=(2, 3), hw=(64, 64)):
    from clusterformer.heads.denoising import target_boxes

    targets = []
    for count in counts:
        m = torch.zeros(count, *hw, dtype=torch.bool)
        for j in range(count):
            m[j, 6 * j : 6 * j + 20, 4 + 10 * j : 26 + 10 * j] = True
        targets.append({"labels": torch.arange(count) % 3, "boxes": target_boxes({"masks": m}), "masks": m})
    return targets


@pytest.mark.parametrize("denoising", [0, 2])
def test_kmax_behind_decoder_kind_supervises_every_layers_affinity_as_its_masks(denoising):
    """``decoder.kind: kmax``: kMaX layers, two per level coarse first; every layer's affinity logits are its
    auxiliary mask logits (kMaX's deep supervision, the last layer's included), the final masks the mask head's;
    the losses reach every layer's query and key projections, and training steps lower the loss."""
    from clusterformer.heads import build_set_model
    from clusterformer.losses import SetLossSettings
    from clusterformer.tasks.sets import set_criterion

    torch.manual_seed(0)
    model = build_set_model("clusterformer_nano", num_classes=3, boxes=False, masks=True, denoising=denoising,
                            **KMAX_DECODER)  # fmt: skip
    assert all(type(layer) is KMaXDecoderLayer for layer in model.decoder.layers)
    assert model.decoder.level_order == [0, 0, 1, 1, 2, 2]
    criterion = set_criterion(3, False, True, SetLossSettings(num_points=64))
    images, targets = torch.randn(2, 3, 64, 64), _mask_targets()
    model.train()
    out = model(images, targets)
    assert out["masks"].shape == (2, 6, 16, 16)  # the mask head's, at stride 4
    sizes = [(2, 2), (2, 2), (4, 4), (4, 4), (8, 8), (8, 8)]
    assert [aux["masks"].shape[-2:] for aux in out["aux"]] == sizes
    for aux, layer, size in zip(out["aux"], model.decoder.layers, sizes, strict=True):
        assert torch.equal(aux["masks"], layer.last_affinity[:, :6].unflatten(-1, size))
    if denoising:
        assert [aux["masks"].shape[1] for aux in out["dn"]["aux"]] == [out["dn"]["logits"].shape[1]] * 6
    losses = criterion(out, targets)
    assert {f"loss_mask_{i}" for i in range(6)} <= set(losses)
    criterion.weighted_total(losses).backward()
    for layer in model.decoder.layers:
        assert layer.q.weight.grad.abs().sum() > 0 and layer.k.weight.grad.abs().sum() > 0
    from helpers import set_losses_over_steps

    values = set_losses_over_steps(model, criterion, images, targets)
    assert values[-1] < values[0]


def test_kmax_needs_the_mask_head():
    from clusterformer.heads import build_set_model

    with pytest.raises(ValueError, match="kind='kmax' needs the mask head"):
        build_set_model("clusterformer_nano", num_classes=3, boxes=True, masks=False, **KMAX_DECODER)
