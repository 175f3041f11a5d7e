"""The center updates of Table 6c that the paper compares with, each against a slow loop written from the cited
method's formula (float64): vanilla cross-attention (Eq. 1), CCNet's criss-cross attention, Context Cluster."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import clusterformer  # noqa: F401  (registers the models)
from clusterformer import ClusterBlock
from clusterformer.layers.comparators import ContextClusterUpdate, CrissCrossUpdate, CrossAttentionUpdate

pytestmark = pytest.mark.usefixtures("float64")
B, HW, C, HEADS, HEAD_DIM, GRID = 2, (5, 4), 6, 2, 8, (2, 3)
N, K, D = HW[0] * HW[1], GRID[0] * GRID[1], HEADS * HEAD_DIM


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *HW, C, generator=g), torch.randn(B, K, D, generator=g)


def randomise(module, seed=1):
    """Every parameter away from its initial value (identity-like, zero gates, unit scales)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def linear(layer, x):
    return layer.weight @ x + layer.bias


def bins(size, count):
    """Adaptive pooling's bins along one axis: ``[floor(i * size / count), ceil((i + 1) * size / count))``."""
    return [range(i * size // count, -(-(i + 1) * size // count)) for i in range(count)]


def pool(feature_map, i, j):
    """The mean of ``feature_map (H, W, X)`` over the pooling cell ``(i, j)`` of the grid."""
    rows, cols = bins(HW[0], GRID[0])[i], bins(HW[1], GRID[1])[j]
    return torch.stack([feature_map[y, x] for y in rows for x in cols]).mean(0)


def head(x, h):
    return x[h * HEAD_DIM : (h + 1) * HEAD_DIM]


def slow_vanilla(module, tokens, centers0):
    """Eq. 1, one center, one head and one token at a time: ``C = C0 + W_o concat_h(softmax_N(q k^T / sqrt(d)) v)``."""
    tokens = tokens.reshape(B, N, C)
    centers, values = torch.empty(B, HEADS, K, HEAD_DIM), torch.empty(B, HEADS, N, HEAD_DIM)
    attention = torch.empty(B, HEADS, N, K)
    for b in range(B):
        keys = [linear(module.k, tokens[b, p]) for p in range(N)]
        vals = [linear(module.v, tokens[b, p]) for p in range(N)]
        for k in range(K):
            query = linear(module.q, centers0[b, k])
            read = []
            for h in range(HEADS):
                logits = torch.stack(
                    [torch.dot(head(query, h), head(keys[p], h)) / math.sqrt(HEAD_DIM) for p in range(N)]
                )
                weights = torch.softmax(logits, 0)  # over the tokens
                attention[b, h, :, k] = weights
                read.append(sum(weights[p] * head(vals[p], h) for p in range(N)))
            new = centers0[b, k] + linear(module.o, torch.cat(read))
            for h in range(HEADS):
                centers[b, h, k] = head(new, h)
        for p in range(N):
            for h in range(HEADS):
                values[b, h, p] = head(vals[p], h)
    return centers, values, attention


def slow_criss_cross(module, tokens, centers0):
    """CCNet's criss-cross attention for a center: the tokens whose row lies in its grid row's pooling bin or whose
    column lies in its grid column's bin; unscaled logits, softmax over that cross, ``C0 + gamma * sum a v``."""
    centers, attention = torch.empty(B, K, D), torch.zeros(B, N, K)
    for b in range(B):
        for i in range(GRID[0]):
            for j in range(GRID[1]):
                k = i * GRID[1] + j
                cross = [
                    y * HW[1] + x
                    for y in range(HW[0])
                    for x in range(HW[1])
                    if y in bins(HW[0], GRID[0])[i] or x in bins(HW[1], GRID[1])[j]
                ]
                query = linear(module.q, centers0[b, k])
                flat = tokens[b].reshape(N, C)
                logits = torch.stack([torch.dot(query, linear(module.k, flat[p])) for p in cross])
                weights = torch.softmax(logits, 0)
                attention[b, cross, k] = weights
                read = sum(w * linear(module.v, flat[p]) for w, p in zip(weights, cross, strict=True))
                centers[b, k] = centers0[b, k] + module.gamma * read
    values = torch.stack([torch.stack([linear(module.v, t) for t in tokens[b].reshape(N, C)]) for b in range(B)])
    split = lambda x: x.view(*x.shape[:-1], HEADS, HEAD_DIM).transpose(1, 2)  # noqa: E731
    return split(centers), split(values), attention[:, None].expand(B, HEADS, N, K)


def slow_context_cluster(module, tokens):
    """Context Cluster's Eq. 1 per head: pooled centers of the similarity features and of the values, similarity
    ``sigmoid(beta + alpha cos)``, each point kept for its most similar center only,
    ``C = (v_c + sum s v) / (1 + sum s)``."""
    centers, values, similarity = (
        torch.empty(B, HEADS, K, HEAD_DIM),
        torch.empty(B, HEADS, N, HEAD_DIM),
        torch.zeros(B, HEADS, N, K),
    )
    for b in range(B):
        f_map = torch.stack([torch.stack([linear(module.f, t) for t in row]) for row in tokens[b]])  # (H, W, D)
        v_map = torch.stack([torch.stack([linear(module.v, t) for t in row]) for row in tokens[b]])
        f_points, v_points = f_map.reshape(N, D), v_map.reshape(N, D)
        cells = [(i, j) for i in range(GRID[0]) for j in range(GRID[1])]
        f_centers = [pool(f_map, i, j) for i, j in cells]  # pooled from the features, not from the tokens
        v_centers = [pool(v_map, i, j) for i, j in cells]
        for h in range(HEADS):
            for p in range(N):
                values[b, h, p] = head(v_points[p], h)
                sims = torch.stack(
                    [
                        torch.sigmoid(
                            module.sim_beta
                            + module.sim_alpha * F.cosine_similarity(head(f_centers[k], h), head(f_points[p], h), 0)
                        )[0]
                        for k in range(K)
                    ]
                )
                best = int(sims.argmax())
                similarity[b, h, p, best] = sims[best]
            for k in range(K):
                s = similarity[b, h, :, k]
                total = head(v_centers[k], h) + sum(s[p] * head(v_points[p], h) for p in range(N))
                centers[b, h, k] = total / (1 + s.sum())
    return centers, values, similarity


def test_vanilla_is_one_pass_of_multi_head_cross_attention():
    torch.manual_seed(0)
    module = CrossAttentionUpdate(C, HEADS, HEAD_DIM)
    randomise(module)
    tokens, centers0 = inputs()
    got = module(tokens, centers0)
    for a, b in zip(got, slow_vanilla(module, tokens, centers0), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[2].sum(2), torch.ones(B, HEADS, K))  # each center's attention: over the tokens


def test_criss_cross_is_ccnet_attention_over_the_cross_of_each_center():
    torch.manual_seed(0)
    module = CrissCrossUpdate(C, HEADS, HEAD_DIM, GRID)
    assert float(module.gamma.detach()) == 0  # CCNet starts the attention branch at zero
    randomise(module)
    tokens, centers0 = inputs()
    got = module(tokens, centers0)
    for a, b in zip(got, slow_criss_cross(module, tokens, centers0), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # CCNet's widths: queries and keys of D / 8 channels, values of D, one gate
    assert module.q.weight.shape == (D // 8, D) and module.k.weight.shape == (D // 8, C)
    assert module.v.weight.shape == (D, C) and module.gamma.shape == (1,)


def test_cosine_is_context_cluster():
    torch.manual_seed(0)
    module = ContextClusterUpdate(C, HEADS, HEAD_DIM, GRID)
    randomise(module)
    tokens, _ = inputs()
    got = module(tokens)
    for a, b in zip(got, slow_context_cluster(module, tokens), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert ((got[2] > 0).sum(-1) == 1).all()  # every point belongs to one center


def slow_eq6(block, centers, values, x):
    """Eq. 6 from the per-head centers ``(B, heads, K, d)`` and values ``(B, heads, N, d)``."""
    disp = block.dispatch
    out = torch.empty(B, N, D)
    for b in range(B):
        for h in range(HEADS):
            for p in range(N):
                sims = torch.sigmoid(
                    disp.sim_beta + disp.sim_alpha * F.cosine_similarity(centers[b, h], values[b, h, p][None], dim=-1)
                )
                out[b, p, h * HEAD_DIM : (h + 1) * HEAD_DIM] = (sims[:, None] * centers[b, h]).sum(0) / K
    return x + disp.proj(out).reshape(x.shape)


def slow_context_dispatch(block, centers, similarity, x):
    """Context Cluster's dispatch: each point receives its center scaled by the clustering's similarity."""
    out = torch.empty(B, N, D)
    for b in range(B):
        for h in range(HEADS):
            for p in range(N):
                k = int(similarity[b, h, p].argmax())
                out[b, p, h * HEAD_DIM : (h + 1) * HEAD_DIM] = similarity[b, h, p, k] * centers[b, h, k]
    return x + block.dispatch.proj(out).reshape(x.shape)


@pytest.mark.parametrize(
    "update, dispatch", [("vanilla", "ours"), ("criss_cross", "ours"), ("cosine", "ours"), ("cosine", "fc_similarity")]
)
def test_block_with_a_comparator_matches_the_equations(update, dispatch):
    torch.manual_seed(0)
    block = ClusterBlock(C, HEADS, HEAD_DIM, center_grid=GRID, center_update=update, dispatch=dispatch)
    randomise(block)
    x, _ = inputs(3)
    tokens = block.norm1(x)
    if update == "cosine":
        assert block.center_init is None  # Context Cluster pools its centers
        centers, values, weights = slow_context_cluster(block.clustering, tokens)
    else:
        slow = slow_vanilla if update == "vanilla" else slow_criss_cross
        centers, values, weights = slow(block.clustering, tokens, block.center_init(tokens))
    if dispatch == "ours":
        expected = slow_eq6(block, centers, values, x)
    else:  # Context Cluster's own dispatch reads its similarity: no scale and shift of the dispatching's own
        assert not hasattr(block.dispatch, "sim_alpha")
        expected = slow_context_dispatch(block, centers, weights, x)
    expected = expected + block.mlp(block.norm2(expected))
    out, got_centers, maps = block(x, return_clusters=True)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_centers, centers, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(maps, weights.transpose(2, 3).reshape(B, HEADS, K, *HW), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(block(x), out)


def test_comparators_refuse_a_temperature():
    for update in ("vanilla", "criss_cross", "cosine"):
        with pytest.raises(ValueError, match="temperature"):
            ClusterBlock(C, HEADS, HEAD_DIM, center_grid=GRID, center_update=update, temperature=0.5)


def block_parameters(model) -> list[int]:
    return [sum(p.numel() for p in block.parameters()) for stage in model.stages for block in stage.blocks]


@pytest.mark.parametrize("update", ["vanilla", "criss_cross", "cosine"])
def test_tiny_parameters_differ_from_the_paper_model_by_the_documented_modules(update):
    """ClusterFormer-T with a comparator differs from the paper's model only inside the blocks, and there by
    exactly the modules that docs/architecture.md lists (block width C, D = C, d = 32)."""
    with torch.device("meta"):
        ours = timm.create_model("clusterformer_tiny")
        other = timm.create_model("clusterformer_tiny", center_update=update)
    d = 32
    expected = []
    for stage, c in zip(ours.stages, ours.embed_dims, strict=True):
        for _ in stage.blocks:
            if update == "vanilla":  # q, o (D x D) and k, v (C x D)
                comparator = 4 * (c * c + c)
            elif update == "criss_cross":  # q (D -> D/8), k (C -> D/8), v (C -> D), gamma
                comparator = (c * (c // 8) + c // 8) * 2 + c * c + c + 1
            else:  # f, v (C -> D), alpha, beta; no center-initialisation FFN (C -> 0.4 C -> D)
                hidden = round(0.4 * c)
                comparator = 2 * (c * c + c) + 2 - (c * hidden + hidden + hidden * c + c)
            expected.append(comparator - (2 * (c * c + c) + d * d + d + 4 * d))  # minus k, v, q and the QK-norm
    diff = [a - b for a, b in zip(block_parameters(other), block_parameters(ours), strict=True)]
    assert diff == expected
    total = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert total(other) - total(ours) == sum(expected)
