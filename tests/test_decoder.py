"""The clustering decoder and the set-prediction model: equations against slow loops, shapes, gradients."""

import math

import pytest
import torch

import clusterformer  # noqa: F401
from clusterformer.heads import (
    ClusteringDecoder,
    ClusteringDecoderLayer,
    box_sine,
    build_set_model,
    cluster_boxes,
    detection_postprocess,
    grid_boxes,
    instance_postprocess,
    sine_position,
)

NANO_DECODER = dict(dim=32, mask_dim=32, num_heads=4, ffn_dim=64, num_layers=3)


def test_sine_position_matches_formula(float64):
    h, w, dim = 3, 5, 8
    pos = sine_position(h, w, dim, dtype=torch.float64)
    quarter = dim // 4
    for y in range(h):
        for x in range(w):
            row = pos[y * w + x]
            for j in range(quarter):
                f = 10000 ** (j / quarter)
                ay, ax = (y + 0.5) / h * 2 * math.pi, (x + 0.5) / w * 2 * math.pi
                assert row[2 * j].item() == pytest.approx(math.sin(ay / f), abs=1e-6)
                assert row[2 * j + 1].item() == pytest.approx(math.cos(ay / f), abs=1e-6)
                assert row[dim // 2 + 2 * j].item() == pytest.approx(math.sin(ax / f), abs=1e-6)
                assert row[dim // 2 + 2 * j + 1].item() == pytest.approx(math.cos(ax / f), abs=1e-6)


@pytest.mark.parametrize("iterations", [1, 3])
def test_decoder_clustering_is_eq4_with_the_mean_mass_scale(float64, iterations):
    """m_step="sum": C <- C + softmax_K(Q_C K_I^T / sqrt(d)) (K/N) V_I, T times, with the same projections,
    per head."""
    torch.manual_seed(0)
    b, k, n, dim, heads = 2, 5, 7, 8, 2
    layer = ClusteringDecoderLayer(dim, num_heads=heads, iterations=iterations, ffn_dim=16, m_step="sum")
    queries, memory, pos = torch.randn(b, k, dim), torch.randn(b, n, dim), torch.randn(n, dim)
    with torch.no_grad():
        update, assignments = layer.cluster(queries, memory, pos)
        check_slow(layer.clustering, queries, memory, pos, update, assignments, iterations)


@pytest.mark.parametrize("iterations", [1, 3])
def test_decoder_clustering_is_em_by_default(float64, iterations):
    """m_step="mean": the layer's update is each query's final center, the responsibility-weighted mean of the
    pixel values, after T E-steps on layer-normalised queries and keys (the encoder's EM reading)."""
    torch.manual_seed(0)
    b, k, n, dim, heads = 2, 5, 7, 8, 2
    layer = ClusteringDecoderLayer(dim, num_heads=heads, iterations=iterations, ffn_dim=16)
    c = layer.clustering
    with torch.no_grad():
        for norm in (c.q_norm, c.k_norm):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0.0, 0.3)
    queries, memory, pos = torch.randn(b, k, dim), torch.randn(b, n, dim), torch.randn(n, dim)
    with torch.no_grad():
        update, assignments = layer.cluster(queries, memory, pos)
    d = dim // heads
    F = torch.nn.functional
    for i in range(b):
        keys_all = (memory[i] + pos) @ c.k.weight.T + c.k.bias
        values_all = memory[i] @ c.v.weight.T + c.v.bias
        for h in range(heads):
            keys = F.layer_norm(keys_all[:, h * d : (h + 1) * d], (d,), c.k_norm.weight, c.k_norm.bias)
            values = values_all[:, h * d : (h + 1) * d]
            centers = queries[i, :, h * d : (h + 1) * d]
            for _ in range(iterations):
                q = F.layer_norm(centers @ c.q.weight.T + c.q.bias, (d,), c.q_norm.weight, c.q_norm.bias)
                assign = (keys @ q.T / (math.sqrt(d) * float(c.temperature))).softmax(dim=1)  # over the queries
                centers = (assign.T @ values + 1e-6 * centers) / (assign.sum(0)[:, None] + 1e-6)
            torch.testing.assert_close(update[i, :, h * d : (h + 1) * d], centers)
            torch.testing.assert_close(assignments[i, h], assign)


def check_slow(c, queries, memory, pos, update, assignments, iterations):
    b, k, dim = queries.shape
    n, heads = memory.shape[1], c.num_heads
    d = dim // heads
    for i in range(b):
        keys_all = (memory[i] + pos) @ c.k.weight.T + c.k.bias  # (n, heads*d)
        values_all = memory[i] @ c.v.weight.T + c.v.bias
        for h in range(heads):
            keys, values = keys_all[:, h * d : (h + 1) * d], values_all[:, h * d : (h + 1) * d]
            centers = [queries[i, j, h * d : (h + 1) * d].clone() for j in range(k)]
            start = [ctr.clone() for ctr in centers]
            for _ in range(iterations):
                q = [c.q.weight @ ctr + c.q.bias for ctr in centers]
                logits = torch.tensor([[float(keys[p] @ q[j]) / math.sqrt(d) for j in range(k)] for p in range(n)])
                assign = logits.softmax(dim=1)  # over the clusters
                centers = [centers[j] + sum(assign[p, j] * values[p] * k / n for p in range(n)) for j in range(k)]
            for j in range(k):
                torch.testing.assert_close(update[i, j, h * d : (h + 1) * d], centers[j] - start[j])
            torch.testing.assert_close(assignments[i, h], assign)
            torch.testing.assert_close(assignments[i, h].sum(-1), torch.ones(n))


def features_for(encoder_dims=(8, 16, 24, 32), b=2, hw=(64, 96)):
    return [
        torch.randn(b, c, math.ceil(hw[0] / s), math.ceil(hw[1] / s))
        for c, s in zip(encoder_dims, (4, 8, 16, 32), strict=True)
    ]


def test_decoder_visits_the_levels_in_turn_and_returns_every_layer():
    torch.manual_seed(0)
    decoder = ClusteringDecoder((8, 16, 24, 32), center_dim=12, num_centers=6, num_queries=6, **NANO_DECODER)
    seen = []
    for layer in decoder.layers:
        layer.register_forward_hook(lambda mod, args, out: seen.append(args[2].shape[1]))
    states, mask_features = decoder(features_for(), torch.randn(2, 6, 12))
    assert len(states) == 3 and all(s.shape == (2, 6, 32) for s in states)
    assert mask_features.shape == (2, 32, 16, 24)
    assert seen == [2 * 3, 4 * 6, 8 * 12]  # strides 32, 16, 8


class _PixelUpdatingLayer(ClusteringDecoderLayer):
    """A decoder kind for the switch's test: blocks of layers per level, coarse first, and pixel features that every
    layer updates (adds 1 to) for the layers after it."""

    updates_pixels = True

    @staticmethod
    def levels(num_layers, num_levels):
        return [i * num_levels // num_layers for i in range(num_layers)]

    def forward(self, queries, query_pos, memory, *args):
        return super().forward(queries, query_pos, memory, *args), memory + 1


class _HalfPixelPath(torch.nn.Module):
    """A pixel path for the switch's test: the FPN's outputs, halved."""

    def __init__(self, in_channels, dim, mask_dim):
        super().__init__()
        from clusterformer.heads.decoder import PixelDecoder

        self.fpn = PixelDecoder(in_channels, dim, mask_dim)

    def forward(self, features):
        mask_features, levels = self.fpn(features)
        return mask_features / 2, [level / 2 for level in levels]


def test_the_decoder_kind_and_pixel_path_switches(monkeypatch):
    from clusterformer.heads import decoder as decoder_module

    with pytest.raises(ValueError, match="decoder kind must be one of .'clusterformer'.*got 'kmeans'"):
        ClusteringDecoder((8, 16, 24, 32), center_dim=12, num_centers=6, num_queries=6, kind="kmeans", **NANO_DECODER)
    with pytest.raises(ValueError, match="pixel_path must be one of .'fpn'.*got 'x'"):
        ClusteringDecoder((8, 16, 24, 32), center_dim=12, num_centers=6, num_queries=6, pixel_path="x", **NANO_DECODER)
    monkeypatch.setitem(decoder_module.DECODER_LAYERS, "test", _PixelUpdatingLayer)
    monkeypatch.setitem(decoder_module.PIXEL_PATHS, "half", _HalfPixelPath)
    settings = dict(NANO_DECODER, num_layers=6)
    torch.manual_seed(0)
    decoder = ClusteringDecoder((8, 16, 24, 32), center_dim=12, num_centers=6, num_queries=6, kind="test",
                                pixel_path="half", **settings)  # fmt: skip
    assert all(type(layer) is _PixelUpdatingLayer for layer in decoder.layers)
    assert decoder.level_order == [0, 0, 1, 1, 2, 2]
    seen = []
    for layer in decoder.layers:
        layer.register_forward_hook(lambda mod, args, out: seen.append((args[2].shape[1], args[2].mean().item())))
    features, centers = features_for(), torch.randn(2, 6, 12)
    decoder(features, centers)
    assert [n for n, _ in seen] == [6, 6, 24, 24, 96, 96]  # two layers at each of strides 32, 16, 8
    for first, second in (seen[0:2], seen[2:4], seen[4:6]):  # the second layer of a level reads the first's update
        assert second[1] == pytest.approx(first[1] + 1, abs=1e-5)
    mask_features, levels = decoder.pixel_decoder.fpn(features)
    assert seen[0][1] == pytest.approx((levels[0] / 2).mean().item(), abs=1e-6)


def test_query_initialisation_from_encoder_centers_or_free():
    torch.manual_seed(0)
    feats = features_for()
    centers = torch.randn(2, 6, 12)
    encoder = ClusteringDecoder((8, 16, 24, 32), center_dim=12, num_centers=6, num_queries=6, **NANO_DECODER)
    q = encoder.initial_queries(centers, 2)
    assert not torch.allclose(q[0], q[1])  # image-dependent
    torch.testing.assert_close(q, encoder.center_proj(centers))
    more = ClusteringDecoder((8, 16, 24, 32), center_dim=12, num_centers=6, num_queries=10, **NANO_DECODER)
    assert more.initial_queries(centers, 2).shape == (2, 10, 32)
    free = ClusteringDecoder((8, 16, 24, 32), center_dim=12, query_init="free", **NANO_DECODER)
    qf = free.initial_queries(None, 2)
    torch.testing.assert_close(qf[0], qf[1])
    free(feats)  # needs no centers
    with pytest.raises(ValueError, match="query_init"):
        ClusteringDecoder((8, 16, 24, 32), center_dim=12, query_init="random", **NANO_DECODER)
    with pytest.raises(ValueError, match="centers"):
        encoder(feats)


@pytest.mark.parametrize(
    "kind, hw",
    [(dict(boxes=True), (64, 96)), (dict(boxes=False, masks=True), (70, 45)), (dict(boxes=True, masks=True), (64, 64))],
)
def test_set_model_outputs_and_every_parameter_learns(kind, hw):
    torch.manual_seed(0)
    model = build_set_model("clusterformer_nano", num_classes=3, num_queries=100, **NANO_DECODER, **kind)
    out = model(torch.randn(2, 3, *hw))
    assert out["logits"].shape == (2, 100, 3)
    assert len(out["aux"]) == NANO_DECODER["num_layers"] - 1
    if kind.get("boxes"):
        assert out["boxes"].shape == (2, 100, 4) and ((out["boxes"] >= 0) & (out["boxes"] <= 1)).all()
    if kind.get("masks"):
        assert out["masks"].shape == (2, 100, math.ceil(hw[0] / 4), math.ceil(hw[1] / 4))
    else:
        assert "masks" not in out
    total = sum(v.float().square().mean() for layer in [out, *out["aux"]] for k, v in layer.items() if k != "aux")
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_encoder_centers_reach_the_queries():
    """With query_init='encoder' the decoder's output depends on the backbone's last cluster centers."""
    torch.manual_seed(0)
    model = build_set_model("clusterformer_nano", num_classes=3, query_position="learnt", **NANO_DECODER)
    images = torch.randn(1, 3, 64, 64)
    features, centers = model.backbone.forward_dense(images)
    assert centers.shape == (1, 100, 256)
    a = model.decoder(features, centers)[0][-1]
    b = model.decoder(features, centers + 1.0)[0][-1]
    assert not torch.allclose(a, b)


def test_detection_postprocess_top_k_over_queries_and_classes():
    logits = torch.tensor([[[2.0, -1.0], [0.5, 3.0], [-2.0, -3.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]]])
    (out,) = detection_postprocess(logits, boxes, [(100, 200)], top_k=3)
    torch.testing.assert_close(out["scores"], torch.tensor([3.0, 2.0, 0.5]).sigmoid())
    assert out["labels"].tolist() == [1, 0, 0]
    torch.testing.assert_close(out["boxes"][0], torch.tensor([0.0, 50.0, 100.0, 100.0]))  # clamped to the image
    torch.testing.assert_close(out["boxes"][1], torch.tensor([80.0, 30.0, 120.0, 70.0]))


def test_instance_postprocess_scores_are_class_times_mean_mask_probability():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 2)
    masks = torch.randn(1, 4, 6, 8) * 3
    (out,) = instance_postprocess(logits, masks, input_sizes=[(20, 28)], output_sizes=[(40, 56)], top_k=5)
    assert out["masks"].shape == (5, 40, 56) and out["masks"].dtype == torch.bool
    flat = logits[0].sigmoid().flatten()
    order = flat.argsort(descending=True)[:5]
    for i, index in enumerate(order.tolist()):
        query, label = divmod(index, 2)
        up = torch.nn.functional.interpolate(masks[:, query : query + 1], size=(24, 32), mode="bilinear")[..., :20, :28]
        up = torch.nn.functional.interpolate(up, size=(40, 56), mode="bilinear")[0, 0]
        prob = up.sigmoid()
        binary = prob > 0.5
        expected = flat[index] * (prob[binary].sum() / (binary.sum() + 1e-6))
        assert out["labels"][i] == label
        assert torch.equal(out["masks"][i], binary)
        torch.testing.assert_close(out["scores"][i], expected)


def test_grid_boxes_are_the_cells_of_a_grid():
    boxes = grid_boxes(4)
    torch.testing.assert_close(
        boxes,
        torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.25, 0.5, 0.5], [0.25, 0.75, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]]),
    )
    assert grid_boxes(7).shape == (7, 4)  # the first 7 cells of a 3 x 3 grid
    boxes = grid_boxes(20)  # 4 rows x 5 columns: the whole image, no empty row
    assert sorted(set(boxes[:, 1].tolist())) == pytest.approx([0.125, 0.375, 0.625, 0.875])
    assert sorted(set(boxes[:, 0].tolist())) == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    torch.testing.assert_close(boxes[:, 2:], torch.tensor([0.2, 0.25]).expand(20, 2))


def test_cluster_boxes_match_the_moments_formula(float64):
    torch.manual_seed(0)
    b, heads, h, w, k = 2, 3, 4, 5, 6
    assignments = torch.rand(b, heads, h * w, k, dtype=torch.float64)
    boxes = cluster_boxes(assignments, (h, w), eps=0.0)
    for i in range(b):
        for j in range(k):
            weight = [sum(float(assignments[i, m, y * w + x, j]) for m in range(heads)) / heads
                      for y in range(h) for x in range(w)]  # fmt: skip
            total = sum(weight)
            xs = [(x + 0.5) / w for y in range(h) for x in range(w)]
            ys = [(y + 0.5) / h for y in range(h) for x in range(w)]
            cx = sum(wt * v for wt, v in zip(weight, xs, strict=True)) / total
            cy = sum(wt * v for wt, v in zip(weight, ys, strict=True)) / total
            # variance of a mixture of uniform squares: spread of the centres + a square's own 1 / (12 w^2)
            vx = sum(wt * (v - cx) ** 2 for wt, v in zip(weight, xs, strict=True)) / total + 1 / (12 * w * w)
            vy = sum(wt * (v - cy) ** 2 for wt, v in zip(weight, ys, strict=True)) / total + 1 / (12 * h * h)
            expected = torch.tensor([cx, cy, math.sqrt(12 * vx), math.sqrt(12 * vy)], dtype=torch.float64)
            torch.testing.assert_close(boxes[i, j], expected)


def test_cluster_boxes_of_a_rectangle_is_the_rectangle():
    h, w = 8, 12
    inside = torch.zeros(h, w)
    inside[2:5, 3:10] = 1.0  # rows 2-4, columns 3-9
    assignments = torch.stack([inside.flatten(), torch.ones(h * w)], -1)[None, None]  # (1, 1, N, 2)
    boxes = cluster_boxes(assignments, (h, w))[0]
    torch.testing.assert_close(boxes[0], torch.tensor([6.5 / 12, 3.5 / 8, 7 / 12, 3 / 8]))
    torch.testing.assert_close(boxes[1], torch.tensor([0.5, 0.5, 1.0, 1.0]))  # every pixel: the whole map


def test_boxes_refine_the_box_of_their_cluster():
    """box_reference='clusters': layer i predicts sigmoid(MLP(q_i) + logit(cluster box of layer i)),
    and the box loss reaches the clustering through the cluster boxes."""
    torch.manual_seed(0)
    model = build_set_model(
        "clusterformer_nano", num_classes=3, num_queries=9, box_reference="clusters", **NANO_DECODER
    )
    assert model.box_reference == "clusters" and model.head.reference is None
    captured, states = [], []
    for layer in model.decoder.layers:
        layer.clustering.register_forward_hook(lambda mod, args, out: captured.append(out[1]))
    model.decoder.norm.register_forward_hook(lambda mod, args, out: states.append(out))
    levels = []
    model.decoder.pixel_decoder.register_forward_hook(lambda mod, args, out: levels.extend(out[1]))
    out = model(torch.randn(2, 3, 64, 64))
    for i, (state, layer) in enumerate(zip(states, [*out["aux"], out], strict=True)):
        h, w = levels[i % 3].shape[-2:]
        assign = captured[i].view(2, -1, h * w, 9)  # (B * heads, N, K) -> (B, heads, N, K)
        reference = cluster_boxes(assign, (h, w)).clamp(1e-5, 1 - 1e-5)  # a width may reach 1: the whole map
        expected = (model.head.box_embed(state) + torch.log(reference / (1 - reference))).sigmoid()
        torch.testing.assert_close(layer["boxes"], expected, atol=1e-5, rtol=1e-4)
    out["boxes"].sum().backward()
    assert model.decoder.layers[-1].clustering.q.weight.grad.abs().sum() > 0  # through the cluster boxes
    with pytest.raises(ValueError, match="box_reference"):
        build_set_model("clusterformer_nano", num_classes=3, box_reference="grid", **NANO_DECODER)


def test_box_sine_is_the_pixel_position_of_the_box_centre_then_its_size(float64):
    h, w, dim = 4, 8, 16
    grid = sine_position(h, w, dim, dtype=torch.float64)
    y, x = 1, 5
    box = torch.tensor([(x + 0.5) / w, (y + 0.5) / h, 0.3, 0.6], dtype=torch.float64)
    embedding = box_sine(box[None, None], dim)[0, 0]
    assert embedding.shape == (2 * dim,)
    torch.testing.assert_close(embedding[:dim], grid[y * w + x])
    size = sine_position(1, 1, dim, dtype=torch.float64)  # the centre of a 1 x 1 map: (0.5, 0.5)
    same = box_sine(torch.tensor([[[0.1, 0.2, 0.5, 0.5]]], dtype=torch.float64), dim)[0, 0]
    torch.testing.assert_close(same[dim:], size[0])
    with pytest.raises(ValueError, match="multiple of 4"):
        box_sine(box, 6)


def test_box_queries_take_their_position_from_the_current_reference_boxes():
    """query_position='boxes': layer 0 sees MLP(sine(learnt reference)), layer i MLP(sine(layer i-1's boxes))."""
    torch.manual_seed(0)
    model = build_set_model(
        "clusterformer_nano", num_classes=3, num_queries=9, query_position="boxes", **NANO_DECODER
    ).eval()
    assert model.decoder.query_position == "boxes" and not hasattr(model.decoder, "query_pos")
    seen = []
    for layer in model.decoder.layers:
        layer.register_forward_pre_hook(lambda mod, args: seen.append(args[1]))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(images)
        references = [model.head.reference.sigmoid()[None], *[layer["boxes"] for layer in out["aux"]]]
        for query_pos, reference in zip(seen, references, strict=True):
            expected = model.decoder.box_position(box_sine(reference, NANO_DECODER["dim"]))
            torch.testing.assert_close(query_pos.expand(2, -1, -1), expected.expand(2, -1, -1))
        model.head.reference.add_(0.5)  # other first references: other queries from the first layer on
        moved = model(images)
    assert not torch.allclose(moved["aux"][0]["logits"], out["aux"][0]["logits"])
    with pytest.raises(ValueError, match="box head"):
        build_set_model("clusterformer_nano", num_classes=3, boxes=False, masks=True, query_position="boxes")


def test_boxes_are_refined_layer_by_layer():
    """Layer 0 refines the learnt grid references; layer i refines layer i-1's (detached) boxes."""
    torch.manual_seed(0)
    model = build_set_model("clusterformer_nano", num_classes=3, num_queries=9, **NANO_DECODER).eval()
    assert model.box_reference == "refine"
    images = torch.randn(1, 3, 64, 64)
    states = []
    model.decoder.norm.register_forward_hook(lambda mod, args, out: states.append(out))  # once per layer
    with torch.no_grad():
        out = model(images)
        layers = [*out["aux"], out]
        reference = model.head.reference.sigmoid().expand(1, -1, -1)
        for state, layer in zip(states, layers, strict=True):
            logit = torch.log(reference / (1 - reference))
            expected = (model.head.box_embed(state) + logit).sigmoid()
            torch.testing.assert_close(layer["boxes"], expected, atol=1e-5, rtol=1e-4)
            reference = layer["boxes"]
    torch.testing.assert_close(model.head.reference.sigmoid(), grid_boxes(9), atol=1e-5, rtol=1e-4)
