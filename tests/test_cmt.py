"""CMT-DeepLab's layer (Eq. 6-12) and mask approximation loss (Eq. 13): equations against slow loops, groups,
blocked pixels, extremes of hand-made masks, one training step."""

import math

import pytest
import torch

import clusterformer  # noqa: F401
from clusterformer.heads.cmt import (
    CMTDecoderLayer,
    cmt_assignment,
    cmt_center_update,
    cmt_pixel_update,
    infer_hw,
    inverse_sigmoid,
    pixel_coordinates,
)
from clusterformer.heads.decoder import group_attention_mask, sine_position
from clusterformer.losses.cmt import mask_approximation_loss, mask_extremes, point_extremes

TOL = dict(atol=1e-6, rtol=1e-6)


def slow_softmax(values):
    finite = [v for v in values if v != -math.inf]
    top = max(finite)
    exps = [0.0 if v == -math.inf else math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def slow_linear(layer, vector):
    weight, bias = layer.weight.tolist(), layer.bias.tolist()
    return [sum(weight[i][j] * vector[j] for j in range(len(vector))) + bias[i] for i in range(len(bias))]


def slow_layer_norm(norm, vector):
    mean = sum(vector) / len(vector)
    var = sum((v - mean) ** 2 for v in vector) / len(vector)
    weight, bias = norm.weight.tolist(), norm.bias.tolist()
    return [(v - mean) / math.sqrt(var + norm.eps) * weight[i] + bias[i] for i, v in enumerate(vector)]


def slow_group_softmax(row, blocked_row, groups):
    out, start = [], 0
    for size in groups:
        part = row[start : start + size]
        shut = blocked_row[start : start + size]
        if all(shut):  # a pixel blocked from its whole group stays open to it
            shut = [False] * size
        out += slow_softmax([-math.inf if s else v for v, s in zip(part, shut, strict=True)])
        start += size
    return out


def random_blocked(s, n, k, groups, generator):
    blocked = torch.rand(s, n, k, generator=generator) < 0.4
    blocked[0, 0, :] = True  # a pixel blocked from everything: opened again
    blocked[0, :, 1] = True  # a cluster blocked from every pixel: attends to all of them
    return blocked


def test_assignment_is_eq6_softmax_over_the_clusters_within_groups(float64):
    g = torch.Generator().manual_seed(0)
    s, n, k, d, groups = 2, 5, 5, 3, [3, 2]
    keys, queries = torch.randn(s, n, d, generator=g), torch.randn(s, k, d, generator=g)
    previous = torch.randn(s, n, k, generator=g)
    blocked = random_blocked(s, n, k, groups, g)
    z, logits = cmt_assignment(keys, queries, previous, blocked, groups)
    for i in range(s):
        for p in range(n):
            row = [
                previous[i, p, c].item() + sum(keys[i, p, e].item() * queries[i, c, e].item() for e in range(d))
                for c in range(k)
            ]
            torch.testing.assert_close(logits[i, p], torch.tensor(row), **TOL)
            expected = slow_group_softmax(row, blocked[i, p].tolist(), groups)
            torch.testing.assert_close(z[i, p], torch.tensor(expected), **TOL)
    torch.testing.assert_close(z[..., :3].sum(-1), torch.ones(s, n), **TOL)  # each pixel sums to one per group
    torch.testing.assert_close(z[..., 3:].sum(-1), torch.ones(s, n), **TOL)


@pytest.mark.parametrize("normalise", ["none", "mass"])
def test_center_update_is_eq7_attention_plus_clustering(float64, normalise):
    g = torch.Generator().manual_seed(1)
    s, n, k, d = 2, 6, 4, 3
    logits, values = torch.randn(s, k, n, generator=g), torch.randn(s, n, d, generator=g)
    blocked = random_blocked(s, n, k, [k], g)
    z, _ = cmt_assignment(torch.randn(s, n, d, generator=g), torch.randn(s, k, d, generator=g), None, blocked)
    update = cmt_center_update(logits, z, values, blocked, normalise)
    for i in range(s):
        for c in range(k):
            shut = [blocked[i, p, c].item() for p in range(n)]
            if all(shut):
                shut = [False] * n
            attention = slow_softmax([-math.inf if shut[p] else logits[i, c, p].item() for p in range(n)])
            mass = sum(z[i, p, c].item() for p in range(n)) if normalise == "mass" else 1.0
            for e in range(d):
                expected = sum((attention[p] + z[i, p, c].item() / mass) * values[i, p, e].item() for p in range(n))
                assert update[i, c, e].item() == pytest.approx(expected, abs=1e-6)
    assert (z[blocked & ~blocked.all(-1, keepdim=True)] == 0).all()  # a blocked pair gets nothing


def test_pixel_update_is_eq8(float64):
    g = torch.Generator().manual_seed(2)
    s, n, k, d = 2, 5, 3, 4
    z, center_values = torch.rand(s, n, k, generator=g), torch.randn(s, k, d, generator=g)
    update = cmt_pixel_update(z, center_values)
    for i in range(s):
        for p in range(n):
            for e in range(d):
                expected = sum(z[i, p, c].item() * center_values[i, c, e].item() for c in range(k))
                assert update[i, p, e].item() == pytest.approx(expected, abs=1e-6)


def test_pixel_coordinates_are_the_normalised_pixel_centres_row_major(float64):
    coords = pixel_coordinates((2, 3), dtype=torch.float64)
    expected = [[(j + 0.5) / 3, (i + 0.5) / 2] for i in range(2) for j in range(3)]
    torch.testing.assert_close(coords, torch.tensor(expected), **TOL)


@pytest.mark.parametrize("hw", [(3, 5), (1, 4), (4, 1), (2, 2)])
def test_map_size_is_read_off_the_sine_position_embedding(hw):
    pos = sine_position(*hw, 16) + torch.randn(16)  # the decoder adds a per-level embedding
    assert infer_hw(pos) == hw


def slow_cmt_layer(
    layer, queries, query_pos, memory, memory_pos, hw, previous_points, blocked, groups, m_step, temperature
):
    """Eq. 6-8 and 11-12 with loops for one image (``m_step`` and ``temperature`` as the layer was built with): the
    pixel features the layer returns, the centers before its first norm (``C + out(update)``) and the assignment
    ``(heads, N, K)``."""
    k, dim = queries.shape
    n = memory.shape[0]
    heads, d = layer.num_heads, layer.head_dim
    scale = 1 / math.sqrt(d)
    h, w = hw
    centers = [
        slow_linear(layer.center_coord, queries[c].tolist() + previous_points[c].flatten().tolist()) for c in range(k)
    ]
    pixels = [
        slow_linear(layer.pixel_coord, memory[p].tolist() + [(p % w + 0.5) / w, (p // w + 0.5) / h]) for p in range(n)
    ]
    located = [[centers[c][e] + query_pos[c, e].item() for e in range(dim)] for c in range(k)]
    keyed = [[pixels[p][e] + memory_pos[p, e].item() for e in range(dim)] for p in range(n)]
    first = groups[0]
    lin = {name: getattr(layer, name) for name in ("q", "k", "v", "cluster_q", "cluster_k", "center_v")}
    qc = [slow_linear(lin["q"], row) for row in located]
    kp = [slow_linear(lin["k"], row) for row in keyed]
    vp = [slow_linear(lin["v"], row) for row in pixels]
    qz = [slow_linear(lin["cluster_q"], row) for row in located]
    kz = [slow_linear(lin["cluster_k"], row) for row in keyed]
    vc = [slow_linear(lin["center_v"], row) for row in centers]
    update = [[0.0] * dim for _ in range(k)]
    pixel_update = [[0.0] * dim for _ in range(n)]
    assignment = torch.zeros(heads, n, k)
    for head in range(heads):
        chunk = range(head * d, (head + 1) * d)
        z = []
        for p in range(n):
            row = [sum(kz[p][e] * qz[c][e] for e in chunk) * scale / temperature for c in range(k)]
            z.append(slow_group_softmax(row, blocked[p].tolist(), groups))
        assignment[head] = torch.tensor(z)
        for c in range(k):
            shut = [blocked[p, c].item() for p in range(n)]
            if all(shut):
                shut = [False] * n
            attention = slow_softmax(
                [-math.inf if shut[p] else sum(qc[c][e] * kp[p][e] for e in chunk) * scale for p in range(n)]
            )
            mass = sum(z[p][c] for p in range(n)) if m_step == "mean" else 1.0
            for e in chunk:
                update[c][e] = sum((attention[p] + z[p][c] / mass) * vp[p][e] for p in range(n))
        for p in range(n):
            for e in chunk:
                pixel_update[p][e] = sum(z[p][c] * vc[c][e] for c in range(first))
    before_norm = [
        [centers[c][e] + v for e, v in enumerate(slow_linear(layer.center_out, update[c]))] for c in range(k)
    ]
    new_pixels = [
        slow_layer_norm(
            layer.pixel_norm, [pixels[p][e] + v for e, v in enumerate(slow_linear(layer.pixel_out, pixel_update[p]))]
        )
        for p in range(n)
    ]
    return torch.tensor(new_pixels), torch.tensor(before_norm), assignment


def randomised_layer(seed, dim=4, heads=2, num_points=2, **kwargs):
    torch.manual_seed(seed)
    layer = CMTDecoderLayer(dim, num_heads=heads, ffn_dim=8, num_points=num_points, **kwargs)
    with torch.no_grad():  # move the coordinate convolutions off their identity start
        for conv in (layer.center_coord, layer.pixel_coord):
            conv.weight.add_(0.3 * torch.randn_like(conv.weight))
            conv.bias.add_(0.1 * torch.randn_like(conv.bias))
    return layer.eval()


@pytest.mark.parametrize("m_step", ["mean", "sum"])
def test_layer_is_eq6_to_12_with_blocked_pixels_and_groups(float64, m_step):
    layer = randomised_layer(3, m_step=m_step, temperature=0.7)
    g = torch.Generator().manual_seed(4)
    b, k, hw, dim, groups = 2, 5, (2, 3), 4, [3, 2]
    n = hw[0] * hw[1]
    queries, query_pos = torch.randn(b, k, dim, generator=g), torch.randn(1, k, dim, generator=g)
    memory, memory_pos = torch.randn(b, n, dim, generator=g), torch.randn(n, dim, generator=g)
    previous = torch.rand(b, k, 2, 2, generator=g)
    blocked = random_blocked(b, n, k, groups, g)
    captured = []
    hook = layer.norm1.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    assignments, references = [], [previous]
    out, new_memory = layer(
        queries,
        query_pos,
        memory,
        memory_pos,
        assignments,
        blocked,
        groups,
        group_attention_mask(groups),
        hw=hw,
        references=references,
    )
    hook.remove()
    assert out.shape == (b, k, dim) and new_memory.shape == (b, n, dim)
    for i in range(b):
        pixels, before_norm, assignment = slow_cmt_layer(
            layer, queries[i], query_pos[0], memory[i], memory_pos, hw, previous[i], blocked[i], groups, m_step, 0.7
        )
        torch.testing.assert_close(new_memory[i], pixels, **TOL)
        torch.testing.assert_close(captured[0][i], before_norm, **TOL)
        torch.testing.assert_close(assignments[0][i], assignment, **TOL)
    # Eq. 9-10: the new reference mask refines the previous one in inverse-sigmoid space
    assert len(references) == 2
    refined = inverse_sigmoid(previous) + layer.reference(out).view(b, k, 2, 2)
    torch.testing.assert_close(references[1], refined.sigmoid(), **TOL)


def test_first_layer_starts_its_points_at_the_image_centre_and_reads_hw_off_memory_pos(float64):
    layer = randomised_layer(5)
    k, hw = 3, (2, 4)
    queries, memory = torch.randn(1, k, 4), torch.randn(1, 8, 4)
    pos = sine_position(*hw, 4)
    references = []
    out, new_memory = layer(queries, torch.zeros(1, k, 4), memory, pos, references=references)
    same_out, same_memory = layer(
        queries, torch.zeros(1, k, 4), memory, pos, hw=hw, references=[torch.full((1, k, 2, 2), 0.5)]
    )
    torch.testing.assert_close(out, same_out, **TOL)
    torch.testing.assert_close(new_memory, same_memory, **TOL)
    torch.testing.assert_close(references[0], layer.reference(out).view(1, k, 2, 2).sigmoid(), **TOL)


def run_groups(layer, queries, query_pos, memory, memory_pos, groups, blocked=None):
    mask = group_attention_mask(groups) if len(groups) > 1 else None
    return layer(queries, query_pos, memory, memory_pos, None, blocked, groups, mask, hw=(2, 3))


def test_matching_queries_and_pixels_are_unchanged_by_the_denoising_groups(float64):
    layer = randomised_layer(6)
    g = torch.Generator().manual_seed(7)
    b, k, dim, groups = 2, 3, 4, [3, 2, 2]
    total = sum(groups)
    queries, query_pos = torch.randn(b, total, dim, generator=g), torch.randn(b, total, dim, generator=g)
    memory, memory_pos = torch.randn(b, 6, dim, generator=g), torch.randn(6, dim, generator=g)
    blocked = torch.rand(b, 6, total, generator=g) < 0.3
    alone, alone_memory = run_groups(layer, queries[:, :k], query_pos[:, :k], memory, memory_pos, [k], blocked[..., :k])
    joint, joint_memory = run_groups(layer, queries, query_pos, memory, memory_pos, groups, blocked)
    torch.testing.assert_close(joint[:, :k], alone, **TOL)
    torch.testing.assert_close(joint_memory, alone_memory, **TOL)
    # a denoising group does not see another either
    changed = queries.clone()
    changed[:, 5:] = torch.randn(b, 2, dim, generator=g)
    other, other_memory = run_groups(layer, changed, query_pos, memory, memory_pos, groups, blocked)
    torch.testing.assert_close(other[:, :5], joint[:, :5], **TOL)
    torch.testing.assert_close(other_memory, joint_memory, **TOL)
    assert not torch.allclose(other[:, 5:], joint[:, 5:])


def test_blocked_pixels_neither_join_nor_reach_a_query(float64):
    layer = randomised_layer(8)
    g = torch.Generator().manual_seed(9)
    k, dim = 3, 4
    queries, query_pos = torch.randn(1, k, dim, generator=g), torch.randn(1, k, dim, generator=g)
    memory, memory_pos = torch.randn(1, 6, dim, generator=g), torch.randn(6, dim, generator=g)
    blocked = torch.zeros(1, 6, k, dtype=torch.bool)
    blocked[0, :3, 0] = True  # query 0 may not take pixels 0-2
    assignments = []
    layer(queries, query_pos, memory, memory_pos, assignments, blocked, hw=(2, 3))
    assert (assignments[0][0, :, :3, 0] == 0).all()
    # query 0's clustering update (the input of its self-attention) does not depend on the pixels it may not join
    captured = []
    hook = layer.norm1.register_forward_hook(lambda _, args, out: captured.append(out[0, 0]))
    layer(queries, query_pos, memory, memory_pos, None, blocked, hw=(2, 3))
    changed = memory.clone()
    changed[0, :3] += torch.randn(3, dim, generator=g)
    layer(queries, query_pos, changed, memory_pos, None, blocked, hw=(2, 3))
    changed[0, 3] += 1.0  # an open pixel does reach it
    layer(queries, query_pos, changed, memory_pos, None, blocked, hw=(2, 3))
    hook.remove()
    torch.testing.assert_close(captured[1], captured[0], **TOL)
    assert not torch.allclose(captured[2], captured[0])


def test_extremes_of_a_rectangle_are_exact(float64):
    masks = torch.zeros(1, 8, 10, dtype=torch.bool)
    masks[0, 2:5, 1:6] = True  # rows 2-4, columns 1-5
    expected = torch.tensor([[1.5 / 10, 5.5 / 10, 2.5 / 8, 4.5 / 8, 3.5 / 10, 3.5 / 8]])
    torch.testing.assert_close(mask_extremes(masks, torch.float64), expected, atol=1e-15, rtol=0)


def test_extremes_of_a_triangle_are_exact(float64):
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    for i in range(4):
        masks[0, i, : i + 1] = True  # the lower-left triangle, 10 pixels
    # sum over its pixels of (j + 0.5) is 15 and of (i + 0.5) is 25; the second mask is empty
    expected = torch.tensor([[0.5 / 4, 3.5 / 4, 0.5 / 4, 3.5 / 4, 15 / 10 / 4, 25 / 10 / 4], [math.nan] * 6])
    torch.testing.assert_close(mask_extremes(masks, torch.float64), expected, atol=1e-15, rtol=0, equal_nan=True)


def slow_mask_approximation_loss(points, masks):
    ext = cen = 0.0
    pairs = 0
    for pts, mask in zip(points.tolist(), masks, strict=True):
        h, w = mask.shape
        ys = [(i + 0.5) / h for i in range(h) for j in range(w) if mask[i, j]]
        xs = [(j + 0.5) / w for i in range(h) for j in range(w) if mask[i, j]]
        if not xs:
            continue
        pairs += 1
        rx, ry = [p[0] for p in pts], [p[1] for p in pts]
        ext += abs(min(ry) - min(ys)) + abs(max(ry) - max(ys)) + abs(min(rx) - min(xs)) + abs(max(rx) - max(xs))
        cen += abs(sum(ry) / len(ry) - sum(ys) / len(ys)) + abs(sum(rx) / len(rx) - sum(xs) / len(xs))
    return ext / (4 * pairs) + cen / (2 * pairs)


def test_mask_approximation_loss_is_eq13(float64):
    g = torch.Generator().manual_seed(10)
    points = torch.rand(4, 8, 2, generator=g)
    masks = torch.rand(4, 6, 7, generator=g) < 0.3
    masks[2] = False  # an empty mask is left out
    loss = mask_approximation_loss(points, masks)
    assert loss.item() == pytest.approx(slow_mask_approximation_loss(points, masks), abs=1e-6)


def test_mask_approximation_loss_is_zero_at_the_extremes_and_centre_and_pulls_the_points(float64):
    masks = torch.zeros(1, 8, 10, dtype=torch.bool)
    masks[0, 2:5, 1:6] = True
    left, right, top, bottom, cx, cy = mask_extremes(masks, torch.float64)[0].tolist()
    exact = torch.tensor([[[left, cy], [right, cy], [cx, top], [cx, bottom], [cx, cy]]])
    torch.testing.assert_close(point_extremes(exact), mask_extremes(masks, torch.float64), **TOL)
    assert mask_approximation_loss(exact, masks).item() == pytest.approx(0, abs=1e-12)
    points = (exact + 0.05 * torch.randn(exact.shape, generator=torch.Generator().manual_seed(11))).requires_grad_()
    loss = mask_approximation_loss(points, masks)
    assert loss.item() > 0
    loss.backward()
    assert points.grad.abs().sum() > 0
    with torch.no_grad():
        stepped = points - 0.01 * points.grad
    assert mask_approximation_loss(stepped, masks) < loss


def test_mask_approximation_loss_without_a_mask_is_zero_with_a_graph():
    points = torch.rand(2, 4, 2, requires_grad=True)
    loss = mask_approximation_loss(points, torch.zeros(2, 5, 5, dtype=torch.bool))
    assert loss.item() == 0
    loss.backward()


def test_one_training_step_lowers_a_simple_loss():
    layer = randomised_layer(12, dim=8, heads=2, num_points=4).train()
    g = torch.Generator().manual_seed(13)
    queries, query_pos = torch.randn(2, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    memory, memory_pos = torch.randn(2, 6, 8, generator=g), sine_position(2, 3, 8)
    target_queries, target_memory = torch.randn(2, 3, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    masks = torch.rand(2 * 3, 6, 6, generator=g) < 0.4
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)

    def loss_fn():
        references = []
        out, new_memory = layer(queries, query_pos, memory, memory_pos, references=references)
        points = references[0].reshape(6, 4, 2)
        return (
            (out - target_queries).square().mean()
            + (new_memory - target_memory).square().mean()
            + mask_approximation_loss(points, masks)
        )

    before = loss_fn()
    optimizer.zero_grad()
    before.backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None, name
    optimizer.step()
    with torch.no_grad():
        assert loss_fn() < before


# --- behind decoder.kind --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("denoising", [0, 2])
def test_cmt_behind_decoder_kind_supervises_the_reference_points(denoising):
    """``decoder.kind: cmt``: CMT layers that update the pixels and carry reference points from layer to layer; every
    layer's points are supervised by the mask-approximation loss of the matched pairs, and training steps lower the
    loss."""
    from clusterformer.heads import CMTDecoderLayer, build_set_model
    from clusterformer.heads.denoising import target_boxes
    from clusterformer.losses import SetLossSettings
    from clusterformer.losses.cmt import mask_approximation_loss
    from clusterformer.tasks.sets import set_criterion

    torch.manual_seed(0)
    model = build_set_model("clusterformer_nano", num_classes=3, boxes=False, masks=True, denoising=denoising,
                            num_queries=6, dim=32, mask_dim=32, num_layers=3, num_heads=4, ffn_dim=64,
                            kind="cmt")  # fmt: skip
    assert all(type(layer) is CMTDecoderLayer for layer in model.decoder.layers)
    targets = []
    for count in (2, 3):
        m = torch.zeros(count, 64, 64, dtype=torch.bool)
        for j in range(count):
            m[j, 6 * j : 6 * j + 20, 4 + 10 * j : 26 + 10 * j] = True
        targets.append({"labels": torch.arange(count) % 3, "boxes": target_boxes({"masks": m}), "masks": m})
    images = torch.randn(2, 3, 64, 64)
    criterion = set_criterion(3, False, True, SetLossSettings(num_points=64))
    model.train()
    out = model(images, targets)
    points = [layer["points"] for layer in (*out["aux"], out)]
    assert all(p.shape == (2, 6, model.decoder.layers[0].num_points, 2) for p in points)
    assert all(((p >= 0) & (p <= 1)).all() for p in points)
    if denoising:
        assert out["dn"]["points"].shape[1] == out["dn"]["logits"].shape[1]
    torch.manual_seed(5)  # the matcher's random points: the same matching below
    losses = criterion(out, targets)
    assert {"loss_points", "loss_points_0", "loss_points_1"} <= set(losses)
    torch.manual_seed(5)
    indices = criterion.matcher(out, targets)
    expected = mask_approximation_loss(
        torch.cat([out["points"][b, q] for b, (q, _) in enumerate(indices)]),
        torch.cat([t["masks"][i] for t, (_, i) in zip(targets, indices, strict=True)]),
    )
    torch.testing.assert_close(losses["loss_points"], expected, rtol=1e-4, atol=1e-6)
    criterion.weighted_total(losses).backward()
    assert all(layer.reference.layers[-1].weight.grad.abs().sum() > 0 for layer in model.decoder.layers)
    from helpers import set_losses_over_steps

    values = set_losses_over_steps(model, criterion, images, targets)
    assert values[-1] < values[0]
