"""The ClusterFormer encoder: the block as composed in the paper, sizes, input sizes, variants."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import clusterformer  # noqa: F401  (registers the models)
from clusterformer import ClusterBlock, ClusterFormer


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def slow_block(block: ClusterBlock, x: torch.Tensor) -> torch.Tensor:
    """One block from the equations: Eq. 5, Eq. 3 (T iterations), Eq. 6, residuals and the MLP."""
    b, h, w, c = x.shape
    heads, d, k = block.num_heads, block.head_dim, block.num_centers
    cl, disp = block.clustering, block.dispatch
    tokens = block.norm1(x)
    centers0 = block.center_init(tokens)  # (B, K, heads * d), Eq. 5
    all_keys, all_values = cl.k(tokens.reshape(b, h * w, c)), cl.v(tokens.reshape(b, h * w, c))
    out = torch.empty(b, h * w, heads * d)
    for i in range(b):
        for j in range(heads):
            keys = all_keys[i, :, j * d : (j + 1) * d]  # (N, d)
            values = all_values[i, :, j * d : (j + 1) * d]
            centers = centers0[i, :, j * d : (j + 1) * d]  # (K, d)
            if cl.m_step == "mean":  # EM: normalised E-step, M-step = weighted mean of the values
                keys = F.layer_norm(keys, (d,), cl.k_norm.weight, cl.k_norm.bias)
            for _ in range(cl.iterations):
                if cl.m_step == "mean":
                    queries = centers @ cl.q.weight.T + cl.q.bias
                    queries = F.layer_norm(queries, (d,), cl.q_norm.weight, cl.q_norm.bias)
                    logits = keys @ queries.T / (math.sqrt(d) * float(cl.temperature))
                    assign = torch.softmax(logits, dim=1)  # (N, K), over clusters
                    centers = (assign.T @ values + 1e-6 * centers) / (assign.sum(0)[:, None] + 1e-6)
                else:
                    queries = centers @ cl.q.weight.T + cl.q.bias
                    assign = torch.softmax(keys @ queries.T / math.sqrt(d), dim=1)  # (N, K), over clusters
                    centers = centers + assign.T @ values  # C <- C + M V
            for n in range(h * w):  # Eq. 6
                cos = F.cosine_similarity(centers, values[n][None], dim=-1)  # (K,)
                s = torch.sigmoid(disp.sim_beta + disp.sim_alpha * cos)
                out[i, n, j * d : (j + 1) * d] = (s[:, None] * centers).sum(0) / k
    x = x + disp.proj(out).reshape(b, h, w, c)
    return x + block.mlp(block.norm2(x))


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("m_step", ["mean", "sum"])
def test_block_matches_the_equations(m_step):
    torch.manual_seed(0)
    block = ClusterBlock(dim=16, num_heads=2, head_dim=8, center_grid=(2, 3), iterations=3, m_step=m_step)
    x = torch.randn(2, 5, 4, 16)
    torch.testing.assert_close(block(x), slow_block(block, x), rtol=1e-9, atol=1e-9)


@pytest.mark.usefixtures("float64")
def test_chunking_of_slices_does_not_change_outputs_or_gradients(monkeypatch):
    torch.manual_seed(0)
    block = ClusterBlock(dim=16, num_heads=2, head_dim=8, center_grid=(2, 2))
    x = torch.randn(3, 6, 5, 16, requires_grad=True)
    results = []
    for chunk in (1, 10**9):  # one slice per chunk / everything in one chunk
        monkeypatch.setattr(ClusterBlock, "chunk_elements", chunk)
        block.zero_grad()
        x.grad = None
        out, centers, maps = block(x, return_clusters=True)
        (out.square().sum() + centers.sum()).backward()
        results.append((out, centers, maps, x.grad.clone(), [p.grad.clone() for p in block.parameters()]))
    (o1, c1, m1, g1, p1), (o2, c2, m2, g2, p2) = results
    for a, b in [(o1, o2), (c1, c2), (m1, m2), (g1, g2), *zip(p1, p2, strict=True)]:
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "name, expected, tol",
    [("clusterformer_tiny", 27.85e6, 0.005), ("clusterformer_small", 48.71e6, 0.005)],
)
def test_paper_parameter_counts(name, expected, tol):
    count = n_params(timm.create_model(name))  # with the 1000-class head, as in Table 1
    assert abs(count - expected) / expected <= tol, f"{name}: {count / 1e6:.3f}M"


def test_nano_is_small():
    assert n_params(timm.create_model("clusterformer_nano")) <= 5e6


@pytest.mark.parametrize("size", [(224, 224), (256, 256), (225, 301), (97, 131), (31, 17)])
@pytest.mark.parametrize("batch", [1, 2])
def test_any_input_size_forward_backward(size, batch):
    model = timm.create_model("clusterformer_nano", num_classes=7)
    x = torch.randn(batch, 3, *size)
    feats = model.forward_intermediates(x, intermediates_only=True)
    for i, f in enumerate(feats):
        stride = 4 * 2**i
        assert f.shape == (batch, model.embed_dims[i], math.ceil(size[0] / stride), math.ceil(size[1] / stride))
    logits = model(x)
    assert logits.shape == (batch, 7)
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("batch", [1, 2])
def test_detection_resolution_forward_backward(batch):
    model = timm.create_model("clusterformer_nano", num_classes=0)
    x = torch.randn(batch, 3, 800, 1216)
    out = model.forward_features(x)
    assert out.shape == (batch, 25, 38, 256)
    out.mean().backward()
    assert model.stem.proj.weight.grad is not None


@pytest.mark.parametrize("size, head", [((224, 224), "centers"), ((225, 301), "centers"), ((225, 301), "tokens")])
def test_tiny_forward_backward(size, head):
    model = timm.create_model("clusterformer_tiny", head=head)
    logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 1000)
    logits.logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == model.parameters_unused_by_head()
    if head == "tokens":  # every parameter reaches the logits
        assert not missing, missing
    else:  # the center head: only the last block's dispatching and MLP and the token norm do not reach the logits
        assert missing and all(n.startswith(("stages.3.blocks.1.dispatch", "stages.3.blocks.1.norm2",
                                             "stages.3.blocks.1.mlp", "norm.")) for n in missing)  # fmt: skip


VARIANTS = [
    dict(center_update="recurrent"),
    dict(center_update="kmeans"),
    dict(center_update="vanilla"),
    dict(center_update="cosine"),
    dict(center_update="cosine", dispatch="fc_similarity"),
    dict(center_update="criss_cross"),
    dict(iterations=1),
    dict(iterations=2),
    dict(iterations=4),
    dict(head_dim=16),
    dict(head_dim=24),
    dict(head_dim=40),
    dict(head_dim=48),
    dict(dispatch="ours", hard_dispatch=True),
    dict(dispatch="none"),
    dict(dispatch="fc"),
    dict(dispatch="fc_similarity"),
    dict(dispatch="confidence"),
    dict(center_update="none", dispatch="ours"),
    dict(baseline=True),
    dict(layer_scale=1e-5),
]


CENTER_HEAD_UNUSED = ("dispatch.", "gamma1", "norm2.", "mlp.", "gamma2")  # of the last block, with the token norm


@pytest.mark.parametrize("head", ["centers", "tokens"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v}" for k, v in v.items()))
def test_variant_forward_backward(variant, head):
    torch.manual_seed(0)
    model = timm.create_model("clusterformer_nano", num_classes=5, center_grid=4, head=head, **variant)
    logits = model(torch.randn(2, 3, 48, 40))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    # everything that can reach the logits receives a gradient; nothing else is built
    without = [n for n, p in model.named_parameters() if p.grad is None]
    assert without == model.parameters_unused_by_head()
    last = "stages.3.blocks.1."
    if head == "centers":  # the last block's dispatching and MLP and the token norm do not reach the logits
        expected = {f"{last}{n}" for n, _ in model.stages[3].blocks[1].named_parameters() if n.startswith(
            CENTER_HEAD_UNUSED)} | {"norm.weight", "norm.bias"}  # fmt: skip
        if variant.get("center_update") == "none" or variant.get("baseline"):  # its centers stay C0: no values
            expected |= {n for n in without if n.startswith(f"{last}clustering.")}
        assert expected <= set(without), sorted(expected - set(without))
        missing = {n.split(".", 4)[-1] for n in without if n not in expected}
    else:
        missing = {n.split(".", 4)[-1] for n in without}
    if variant.get("dispatch") == "none" or variant.get("baseline"):  # nothing reads the clustering of a block
        # (but the last one's with the center head): it is idle
        assert all(n.startswith(("norm1.", "center_init.", "clustering.")) for n in missing), missing
        assert bool(missing) == (variant.get("dispatch") == "none")  # the BASELINE builds no idle clustering
    elif variant.get("center_update") == "kmeans":  # the one-hot assignment passes no gradient to q and k
        assert missing == {f"clustering.{n}" for n in ("q.weight", "q.bias", "k.weight", "k.bias")} | {
            f"clustering.{n}_norm.{p}" for n in "qk" for p in ("weight", "bias")
        }, missing
    else:
        assert not missing, missing


def test_head_dim_changes_parameters_but_not_heads():
    small = timm.create_model("clusterformer_tiny", head_dim=16)
    default = timm.create_model("clusterformer_tiny")
    assert small.stages[0].blocks[0].num_heads == default.stages[0].blocks[0].num_heads == 3
    assert n_params(small) < n_params(default)


def test_iterations_do_not_change_parameter_count():
    counts = {t: n_params(timm.create_model("clusterformer_nano", iterations=t)) for t in (1, 2, 3, 4)}
    assert len(set(counts.values())) == 1


def test_invalid_combinations_are_rejected():
    with pytest.raises(ValueError, match="assignments"):
        ClusterFormer(center_update="none", dispatch="fc", embed_dims=(8, 8, 8, 8), depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="global_pool"):
        ClusterFormer(global_pool="max", embed_dims=(8, 8, 8, 8), depths=(1, 1, 1, 1))


def test_forward_clusters_returns_assignment_maps_per_stage():
    model = timm.create_model("clusterformer_nano").eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        before = model(x)
    clusters = model.forward_clusters(x)
    assert len(clusters) == 4
    for i, entry in enumerate(clusters):
        heads = model.stages[i].blocks[-1].num_heads
        stride = 4 * 2**i
        maps = entry["assignments"]
        assert maps.shape == (2, heads, 100, math.ceil(64 / stride), math.ceil(96 / stride))
        torch.testing.assert_close(maps.sum(2), torch.ones_like(maps.sum(2)))  # each token: sums to 1 over K
        assert entry["centers"].shape == (2, heads, 100, 32)
    assert len(model.forward_clusters(x, all_blocks=True)) == sum(len(s.blocks) for s in model.stages)
    # forward_clusters does not change what the model computes
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_forward_clusters_reports_none_without_center_updates():
    model = timm.create_model("clusterformer_nano", baseline=True).eval()
    assert all(c["assignments"] is None for c in model.forward_clusters(torch.randn(1, 3, 32, 32)))
    dispatch_only = timm.create_model("clusterformer_nano", center_update="none").eval()
    clusters = dispatch_only.forward_clusters(torch.randn(1, 3, 32, 32))
    assert all(c["assignments"] is None and c["centers"].shape[2] == 100 for c in clusters)


@pytest.mark.parametrize("head", ["tokens", "centers"])
def test_baseline_builds_no_clustering(head):
    """BASELINE (Table 6a): no center update and no dispatching, so nothing but the channel MLP is built in a block
    (no center initialisation, projections, norm or similarity whose output would be discarded); it is the
    default model without those modules, and computes the channel-MLP network. With the center head the last block
    also computes the initial centers of Eq. 5 (its norm and FFN), which the head reads."""
    torch.manual_seed(0)
    baseline = timm.create_model("clusterformer_nano", baseline=True, head=head).eval()
    default = timm.create_model("clusterformer_nano", head=head).eval()
    last = baseline.stages[-1].blocks[-1]
    for block in (b for stage in baseline.stages for b in stage.blocks):
        assert block.clustering is None and block.dispatch.proj is None and not list(block.dispatch.parameters())
        if head == "centers" and block is last:
            assert block.center_init is not None and block.norm1 is not None
        else:
            assert block.center_init is None and block.norm1 is None

    def built(name: str) -> bool:
        reads = head == "centers" and name.startswith("stages.3.blocks.1.")  # the last block's C0 is read
        idle = ("clustering.", "dispatch.") if reads else ("norm1.", "center_init.", "clustering.", "dispatch.")
        return not name.split(".", 4)[-1].startswith(idle)

    assert {n for n, _ in baseline.named_parameters()} == {n for n, _ in default.named_parameters() if built(n)}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = baseline.stem(x)
        for stage in baseline.stages:
            expected = stage.downsample(expected)
            for block in stage.blocks:
                if head == "centers" and block is last:
                    initial = block.center_init(block.norm1(expected))  # (B, K, heads * d): C0
                expected = expected + block.mlp(block.norm2(expected))
        if head == "centers":
            expected = baseline.head(baseline.head_norm(initial).mean(1))
        else:
            expected = baseline.head(baseline.norm(expected).mean((1, 2)))
        torch.testing.assert_close(baseline(x), expected)
    features, centers = baseline.forward_dense(x)
    assert len(features) == 4
    if head == "centers":
        torch.testing.assert_close(centers, initial)
    else:
        assert centers is None


@pytest.mark.parametrize("center_update", ["recurrent", "kmeans", "vanilla", "cosine", "criss_cross"])
def test_bf16_autocast_forward_backward(center_update):
    model = timm.create_model("clusterformer_nano", num_classes=3, center_update=center_update, center_grid=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 3, 40, 56))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    logits.float().sum().backward()
    assert model.stages[0].blocks[0].clustering.v.weight.grad is not None


def test_nano_learns_a_toy_task():
    """A few optimiser steps on the CPU: which quadrant holds the bright square."""

    def make(n, g):
        labels = torch.randint(0, 4, (n,), generator=g)
        images = torch.randn(n, 3, 32, 32, generator=g) * 0.5
        for i, label in enumerate(labels.tolist()):
            r, c = divmod(label, 2)
            images[i, :, r * 16 + 4 : r * 16 + 12, c * 16 + 4 : c * 16 + 12] += 2.0
        return images, labels

    g = torch.Generator().manual_seed(0)
    (train_x, train_y), (test_x, test_y) = make(256, g), make(128, g)
    torch.manual_seed(0)
    model = timm.create_model("clusterformer_nano", num_classes=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(30):
        idx = torch.randint(0, 256, (32,), generator=g)
        loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(-1) == test_y).float().mean().item()
    assert accuracy >= 0.95


def test_dispatch_none_leaves_only_the_channel_mlp():
    block = ClusterBlock(dim=16, num_heads=2, head_dim=8, center_grid=(2, 2), dispatch="none")
    x = torch.randn(2, 3, 4, 16)
    torch.testing.assert_close(block(x), x + block.mlp(block.norm2(x)))
    _, centers, maps = block(x, return_clusters=True)  # the clusters are still there to look at
    assert centers.shape == (2, 2, 4, 8) and maps.shape == (2, 2, 4, 3, 4)


@pytest.mark.parametrize("shape", [(3, 32, 32), (2, 1, 32, 32), (2, 4, 32, 32)])
def test_wrong_input_shape_is_a_clear_error(shape):
    model = timm.create_model("clusterformer_nano")
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\)"):
        model(torch.randn(*shape))


def test_other_channel_counts_are_supported():
    model = timm.create_model("clusterformer_nano", in_chans=1, num_classes=2)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 2)
