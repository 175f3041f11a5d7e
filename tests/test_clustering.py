"""Each clustering equation against a slow loop written straight from the paper (float64)."""

import math

import pytest
import torch

from clusterformer.layers import CenterInit, RecurrentClustering
from clusterformer.layers.clustering import criss_cross_mask

pytestmark = pytest.mark.usefixtures("float64")
S, D, K, GRID, HW = 3, 8, 6, (2, 3), (4, 5)
N = HW[0] * HW[1]


def random_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(S, K, D, generator=g)
    keys = torch.randn(S, N, D, generator=g)
    values = torch.randn(S, N, D, generator=g)
    return centers, keys, values


def run_module(update, iterations=3, seed=0, m_step="mean", temperature=None):
    torch.manual_seed(seed)
    module = RecurrentClustering(
        dim=4, num_heads=1, head_dim=D, iterations=iterations, update=update, grid=GRID, m_step=m_step,
        temperature=temperature,
    )  # fmt: skip
    if module.em:  # gains and shifts away from their initial 1 and 0, so that the test sees them
        with torch.no_grad():
            for norm in (module.q_norm, module.k_norm):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0.0, 0.3)
    centers, keys, values = random_inputs(seed)
    # the module stores centers and values transposed: (S, d, K) and (S, d, N)
    out, assign = module(centers.transpose(1, 2), keys, values.transpose(1, 2), HW)
    return module, (centers, keys, values), out.transpose(1, 2), assign


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """One vector's layer norm, from the formula (biased variance)."""
    mean = x.sum() / len(x)
    var = ((x - mean) ** 2).sum() / len(x)
    y = (x - mean) / torch.sqrt(var + eps)
    return y if weight is None else y * weight + bias


def slow_em_clustering(module, centers, keys, values, update, iterations, eps=1e-6):
    """m_step="mean": E-step on layer-normalised queries and keys, M-step = the responsibility-weighted mean of
    the values (a cluster keeps eps of its center, so that one without tokens keeps it), one cluster and one
    token at a time."""
    temperature = float(module.temperature)
    wq, bq = module.q.weight, module.q.bias
    qn, kn = module.q_norm, module.k_norm
    out = []
    for s in range(S):
        c = centers[s].clone()
        m = None
        k_hat = [layer_norm(keys[s, n], kn.weight, kn.bias) for n in range(N)]
        for _ in range(iterations):
            q = [layer_norm(c[k] @ wq.T + bq, qn.weight, qn.bias) for k in range(K)]
            logits = torch.empty(N, K)
            for n in range(N):
                for k in range(K):
                    logits[n, k] = torch.dot(q[k], k_hat[n]) / (math.sqrt(D) * temperature)
            m = torch.zeros(N, K)
            for n in range(N):
                if update == "recurrent":
                    m[n] = torch.softmax(logits[n], 0)
                else:
                    m[n, int(logits[n].argmax())] = 1.0
            new_c = c.clone()
            for k in range(K):
                total = sum(m[n, k] * values[s, n] for n in range(N))
                new_c[k] = (total + eps * c[k]) / (m[:, k].sum() + eps)
            c = new_c
        out.append((c, m))
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


def slow_clustering(module, centers, keys, values, update, iterations):
    """Eq. 3 and its K-Means form one cluster and one token at a time; Algorithm 1's M-step ``C <- C + M V``
    with ``m_step="sum"``."""
    if module.em:
        return slow_em_clustering(module, centers, keys, values, update, iterations)
    wq, bq, scale = module.q.weight, module.q.bias, 1 / math.sqrt(D)
    out = []
    for s in range(S):
        c = centers[s].clone()
        m = None
        for _ in range(iterations):
            q = c @ wq.T + bq
            logits = torch.empty(N, K)
            for n in range(N):
                for k in range(K):
                    logits[n, k] = scale * torch.dot(q[k], keys[s, n])
            if update == "recurrent":  # softmax over the clusters, per token
                m = torch.stack([torch.softmax(logits[n], 0) for n in range(N)])
            else:  # kmeans
                m = torch.zeros(N, K)
                for n in range(N):
                    m[n, int(logits[n].argmax())] = 1.0
            new_c = c.clone()
            for k in range(K):
                new_c[k] = c[k] + sum(m[n, k] * values[s, n] for n in range(N))
            c = new_c
        out.append((c, m))
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


@pytest.mark.parametrize("update", ["recurrent", "kmeans"])
@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize("m_step", ["mean", "sum"])
def test_center_update_matches_slow_loop(update, iterations, m_step):
    module, (centers, keys, values), out, assign = run_module(update, iterations, m_step=m_step)
    assert module.em == (m_step == "mean")
    ref_centers, ref_assign = slow_clustering(module, centers, keys, values, update, iterations)
    torch.testing.assert_close(out, ref_centers, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(assign, ref_assign, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("update", ["recurrent", "kmeans"])
def test_temperature_divides_the_em_logits(update):
    module, (centers, keys, values), out, assign = run_module(update, 3, temperature=0.3)
    ref_centers, ref_assign = slow_clustering(module, centers, keys, values, update, 3)
    torch.testing.assert_close(out, ref_centers, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(assign, ref_assign, rtol=1e-10, atol=1e-10)
    if update == "recurrent":  # a lower temperature sharpens the assignment
        assert assign.max(-1).values.mean() > run_module(update, 3)[3].max(-1).values.mean()


def test_the_temperature_travels_with_the_weights():
    """The EM temperature is a buffer (default 0.5): loading a state dict sets it to the one the weights were
    trained at, and the loaded layer computes what a layer built at that temperature computes."""
    assert float(RecurrentClustering(8, 1, 8).temperature) == 0.5
    trained, (centers, keys, values), out, assign = run_module("recurrent", 3, temperature=0.3)
    default = RecurrentClustering(dim=4, num_heads=1, head_dim=D, iterations=3, grid=GRID)
    default.load_state_dict(trained.state_dict())
    assert float(default.temperature) == pytest.approx(0.3)
    got, got_assign = default(centers.transpose(1, 2), keys, values.transpose(1, 2), HW)
    torch.testing.assert_close(got.transpose(1, 2), out, rtol=0, atol=0)
    torch.testing.assert_close(got_assign, assign, rtol=0, atol=0)
    # EM weights saved before the temperature was stored were trained at 1
    state = {k: v for k, v in trained.state_dict().items() if k != "temperature"}
    default.load_state_dict(state)
    assert float(default.temperature) == 1.0


def test_temperature_without_an_em_e_step_is_refused():
    for update, m_step in (("none", "mean"), ("recurrent", "sum")):
        with pytest.raises(ValueError, match="temperature"):
            RecurrentClustering(8, 1, 8, update=update, m_step=m_step, temperature=0.5)


def test_mean_m_step_centers_are_weighted_means_of_the_values():
    """EM: after the last iteration each center is a convex combination of the values, the one its
    assignment column weights; the literal sum grows with the number of tokens instead."""
    _, (_, _, values), out, assign = run_module("recurrent", 3)
    weights = assign / assign.sum(1, keepdim=True)  # (S, N, K), each column sums to one over the tokens
    # up to the eps (1e-6) of its own center mixed in, relative to a mass that can be small
    torch.testing.assert_close(out, torch.bmm(weights.transpose(1, 2), values), rtol=1e-5, atol=1e-5)
    _, (centers, _, values), summed, assign = run_module("recurrent", 1, m_step="sum")
    torch.testing.assert_close(summed, centers + torch.bmm(assign.transpose(1, 2), values))


def test_kmeans_cluster_without_tokens_keeps_its_center():
    module = RecurrentClustering(dim=4, num_heads=1, head_dim=D, iterations=1, update="kmeans")
    centers, keys, values = random_inputs(1)
    centers = centers.transpose(1, 2).contiguous()
    out, assign = module(centers, keys, values.transpose(1, 2), HW)
    empty = assign.sum(1) == 0  # (S, K)
    assert empty.any()
    torch.testing.assert_close(out.transpose(1, 2)[empty], centers.transpose(1, 2)[empty])


def test_the_e_step_does_not_hang_on_the_scale_of_the_centers_or_keys():
    """Normalised queries and keys: scaling the centers or the keys leaves the assignment as it is, so tiny
    initial centers (weights of std 0.02) give as sharp an assignment as large ones."""
    module, (centers, keys, values), _, _ = run_module("recurrent", 1)
    with torch.no_grad():
        module.q.bias.zero_()  # (a query bias does not scale with the centers)
    c = centers.transpose(1, 2)
    _, assign = module(c, keys, values.transpose(1, 2), HW)
    for factor in (0.1, 10.0):  # up to the layer norms' eps (1e-5 beside a variance of about 0.01 at 0.1)
        _, scaled = module(c * factor, keys * factor, values.transpose(1, 2), HW)
        torch.testing.assert_close(scaled, assign, rtol=0, atol=1e-2)
    assert assign.max(-1).values.mean() > 2 / K  # and it is not uniform
    # the literal form is not: tiny centers make its assignment uniform
    literal, *_ = run_module("recurrent", 1, m_step="sum")
    _, tiny = literal(c * 1e-6, keys, values.transpose(1, 2), HW)
    torch.testing.assert_close(tiny, torch.full_like(tiny, 1 / K), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m_step", ["mean", "sum"])
def test_recurrent_assignment_sums_to_one_over_clusters(m_step):
    _, _, _, assign = run_module("recurrent", m_step=m_step)
    torch.testing.assert_close(assign.sum(-1), torch.ones(S, N))
    # ... and not over the tokens (that would be the vanilla variant)
    assert not torch.allclose(assign.sum(1), torch.ones(S, K))


def test_none_keeps_initial_centers_and_builds_only_the_values():
    module, (centers, _, _), out, assign = run_module("none")
    torch.testing.assert_close(out, centers)
    assert assign is None
    assert module.k is None and module.q is None
    assert [name for name, _ in module.named_parameters()] == ["v.weight", "v.bias"]
    keys, values = module.project(torch.randn(2, N, 4))
    assert keys is None and values.shape == (2, D, N)


def test_parameters_do_not_depend_on_iterations():
    counts = {
        t: sum(p.numel() for p in RecurrentClustering(32, 2, 16, iterations=t).parameters()) for t in (1, 2, 3, 4)
    }
    assert len(set(counts.values())) == 1


def test_keys_and_values_are_projected_once_and_query_every_iteration():
    module = RecurrentClustering(dim=4, num_heads=1, head_dim=D, iterations=3)
    calls = {"k": 0, "v": 0}
    module.k.register_forward_hook(lambda *a: calls.__setitem__("k", calls["k"] + 1))
    module.v.register_forward_hook(lambda *a: calls.__setitem__("v", calls["v"] + 1))
    tokens = torch.randn(2, N, 4)
    keys, values = module.project(tokens)
    module(torch.randn(2, D, K), keys, values, HW)
    assert calls == {"k": 1, "v": 1}
    # the three iterations differ from one (the query is re-projected from the updated centers)
    one = RecurrentClustering(dim=4, num_heads=1, head_dim=D, iterations=1)
    one.load_state_dict(module.state_dict())
    c0 = torch.randn(2, D, K)
    assert not torch.allclose(module(c0, keys, values, HW)[0], one(c0, keys, values, HW)[0])


def test_project_splits_heads_like_the_linear_layer():
    module = RecurrentClustering(dim=12, num_heads=3, head_dim=4)
    tokens = torch.randn(2, N, 12)
    keys, values = module.project(tokens)
    full_k, full_v = module.k(tokens), module.v(tokens)  # (B, N, 12)
    for b in range(2):
        for h in range(3):
            torch.testing.assert_close(keys[b * 3 + h], full_k[b, :, h * 4 : (h + 1) * 4])
            torch.testing.assert_close(values[b * 3 + h], full_v[b, :, h * 4 : (h + 1) * 4].T)


def test_criss_cross_mask_is_the_cross_through_each_cell():
    grid, hw = (2, 2), (4, 6)
    mask = criss_cross_mask(grid, hw)  # (N, K)
    for i in range(2):
        for j in range(2):
            k = i * 2 + j
            for y in range(4):
                for x in range(6):
                    in_row_band = (y // 2) == i
                    in_col_band = (x // 3) == j
                    assert bool(mask[y * 6 + x, k]) == (in_row_band or in_col_band)


def test_center_init_is_ffn_of_adaptive_pooling():
    torch.manual_seed(0)
    init = CenterInit(dim=5, center_dim=4, grid=(2, 3), hidden_ratio=0.4)
    tokens = torch.randn(2, 4, 7, 5)  # (B, H, W, C)
    out = init(tokens)
    assert out.shape == (2, 6, 4)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                # adaptive pooling bins: [floor(i*H/gh), ceil((i+1)*H/gh))
                y0, y1 = (i * 4) // 2, -((-(i + 1) * 4) // 2)
                x0, x1 = (j * 7) // 3, -((-(j + 1) * 7) // 3)
                pooled = tokens[b, y0:y1, x0:x1].mean(dim=(0, 1))
                expected = init.fc2(torch.nn.functional.gelu(init.fc1(pooled)))
                torch.testing.assert_close(out[b, i * 3 + j], expected)


def test_center_init_works_when_the_map_is_smaller_than_the_grid():
    init = CenterInit(dim=5, center_dim=4, grid=(10, 10))
    assert init(torch.randn(1, 3, 2, 5)).shape == (1, 100, 4)


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="center update"):
        RecurrentClustering(8, 1, 8, update="spectral")
    for comparator in ("vanilla", "cosine", "criss_cross"):  # the cited methods are modules of their own
        with pytest.raises(ValueError, match="comparators"):
            RecurrentClustering(8, 1, 8, update=comparator)
    with pytest.raises(ValueError, match="iterations"):
        RecurrentClustering(8, 1, 8, iterations=0)
    with pytest.raises(ValueError, match="m_step"):
        RecurrentClustering(8, 1, 8, m_step="median")
