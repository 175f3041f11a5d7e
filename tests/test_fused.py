"""The fused clustering operator (layers/fused.py): the E/M step and Eq. 6's dispatching against slow loops written
from the formulas, gradients by gradcheck, the same numbers as the unfused path in every layer that uses it, and no
``(N, K)`` tensor kept for the backward pass."""

import pytest
import timm
import torch

import clusterformer  # noqa: F401  (registers the models)
from clusterformer.backbone import ClusterBlock
from clusterformer.heads import build_set_model
from clusterformer.layers import RecurrentClustering, set_fused
from clusterformer.layers import fused as F


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    # the PyTorch blocks here; the Triton kernels have their own tests (test_fused_triton.py)
    monkeypatch.setenv("CLUSTERFORMER_FUSED_BACKEND", "torch")
    # the operator at every size (on a CPU it otherwise runs above one block's assignment only)
    monkeypatch.setattr(F, "MIN_CPU_ELEMENTS", 0)


@pytest.fixture
def small_blocks(monkeypatch):
    # blocks of a few slices and tokens, so that every loop of the blockwise code runs more than once
    monkeypatch.setattr(F, "BLOCK_ELEMENTS", 64)


def slow_em(queries, keys, values, blocked=None, groups=None, assignment="softmax"):
    """Eq. 3's E-step and the M-step's sums, one slice, one token and one cluster at a time."""
    s_count, n_count, _ = keys.shape
    k_count = queries.shape[1]
    groups = list(groups) if groups is not None else [k_count]
    summed = torch.zeros(s_count, k_count, values.shape[-1], dtype=values.dtype)
    mass = torch.zeros(s_count, k_count, dtype=values.dtype)
    for s in range(s_count):
        for n in range(n_count):
            start = 0
            for size in groups:
                ks = range(start, start + size)
                logits = {k: float(keys[s, n] @ queries[s, k]) for k in ks}
                open_ = [k for k in ks if blocked is None or not blocked[s, n, k]]
                if assignment == "softmax":
                    top = max(logits[k] for k in open_)
                    weights = {k: torch.exp(keys[s, n] @ queries[s, k] - top) for k in open_}
                    total = sum(weights.values())
                    weights = {k: w / total for k, w in weights.items()}
                else:
                    best = max(open_, key=lambda k: logits[k])
                    weights = {best: torch.ones((), dtype=values.dtype)}
                for k, w in weights.items():
                    summed[s, k] += w * values[s, n]
                    mass[s, k] += w
                start += size
    return summed, mass


def slow_dispatch(unit_values, unit_centers, alpha, beta, centers, hard=False):
    """Eq. 6's sum over the clusters, token by token."""
    s_count, n_count, _ = unit_values.shape
    out = torch.zeros(s_count, n_count, centers.shape[-1], dtype=centers.dtype)
    for s in range(s_count):
        for n in range(n_count):
            sims = torch.stack(
                [torch.sigmoid(beta + alpha * (unit_values[s, n] @ c)).reshape(()) for c in unit_centers[s]]
            )
            ks = [int(sims.argmax())] if hard else range(len(sims))
            for k in ks:
                out[s, n] += sims[k] * centers[s, k]
    return out


def assert_close_scaled(actual, expected, tol=1e-5, msg=""):
    """Equal to ``tol`` relative to the largest magnitude of ``expected`` (fp32 sums reorder between the paths)."""
    scale = max(float(expected.detach().abs().max()), 1.0)
    error = float((actual - expected).detach().abs().max())
    assert error <= tol * scale, f"{msg} max error {error:.3g} over scale {scale:.3g}"


def inputs(s=2, n=7, k=5, d=3, dtype=torch.float64, seed=0, blocked=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s, k, d, generator=g, dtype=dtype)
    keys = torch.randn(s, n, d, generator=g, dtype=dtype)
    values = torch.randn(s, d, n, generator=g, dtype=dtype).transpose(1, 2)  # non-contiguous, as in the model
    mask = None
    if blocked:
        mask = torch.rand(s, n, k, generator=g) < 0.4
        mask[..., 0] = False  # every token keeps a cluster of the first group open
        mask[..., 3] = False  # ... and of the second group (groups (3, 2) below)
    return q, keys, values, mask


@pytest.mark.parametrize("assignment", ["softmax", "argmax"])
@pytest.mark.parametrize("groups", [None, (3, 2)])
@pytest.mark.parametrize("blocked", [False, True])
def test_em_forward_matches_slow_loops(small_blocks, assignment, groups, blocked):
    q, keys, values, mask = inputs(blocked=blocked)
    summed, mass = F.em_step(q, keys, values, mask, groups, assignment)
    ref_summed, ref_mass = slow_em(q, keys, values, mask, groups, assignment)
    torch.testing.assert_close(summed, ref_summed, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mass, ref_mass, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("groups", [None, (3, 2)])
@pytest.mark.parametrize("blocked", [False, True])
def test_em_gradcheck(small_blocks, groups, blocked):
    q, keys, values, mask = inputs(blocked=blocked)
    args = [t.detach().requires_grad_() for t in (q, keys, values)]
    assert torch.autograd.gradcheck(lambda a, b, c: F.em_step(a, b, c, mask, groups), args)


def test_em_argmax_gradients_match_autograd(small_blocks):
    """k-means: the one-hot assignment passes gradients to the values only, as autograd on the unfused step."""
    q, keys, values, _ = inputs()
    fused = [t.detach().requires_grad_() for t in (q, keys, values)]
    plain = [t.detach().requires_grad_() for t in (q, keys, values)]
    summed, mass = F.em_step(*fused, assignment="argmax")
    (summed.sin().sum() + mass.cos().sum()).backward()
    m = F.assign(torch.bmm(plain[1], plain[0].transpose(1, 2)), assignment="argmax")
    (torch.bmm(m.transpose(1, 2), plain[2]).sin().sum() + m.sum(1).cos().sum()).backward()
    assert fused[0].grad is None and fused[1].grad is None
    torch.testing.assert_close(fused[2].grad, plain[2].grad)


@pytest.mark.parametrize("hard", [False, True])
def test_dispatch_matches_slow_loop_and_gradcheck(small_blocks, hard):
    g = torch.Generator().manual_seed(1)
    uv = torch.nn.functional.normalize(torch.randn(2, 6, 3, generator=g, dtype=torch.float64), dim=-1)
    uc = torch.nn.functional.normalize(torch.randn(2, 4, 3, generator=g, dtype=torch.float64), dim=-1)
    centers = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    alpha = torch.tensor([1.7], dtype=torch.float64)
    beta = torch.tensor([-0.3], dtype=torch.float64)
    out = F.dispatch(uv, uc, alpha, beta, centers, hard)
    torch.testing.assert_close(out, slow_dispatch(uv, uc, alpha, beta, centers, hard), rtol=1e-10, atol=1e-10)
    args = [t.detach().requires_grad_() for t in (uv, uc, alpha, beta, centers)]
    assert torch.autograd.gradcheck(lambda *a: F.dispatch(*a, hard), args)


def _clone_clustering(m_step, update, fused, seed=0, **kw):
    torch.manual_seed(seed)
    layer = RecurrentClustering(24, 3, head_dim=8, iterations=3, update=update, m_step=m_step, **kw)
    layer.fused = fused
    return layer


@pytest.mark.parametrize(("m_step", "update"), [("mean", "recurrent"), ("sum", "recurrent"), ("mean", "kmeans")])
@pytest.mark.parametrize("restricted", [False, True])
def test_recurrent_clustering_fused_equals_unfused(small_blocks, m_step, update, restricted):
    """The layer's centers, last assignment and every gradient are the unfused path's, to 1e-5 in fp32, with the
    decoder's blocked pairs and groups of clusters."""
    torch.manual_seed(3)
    s, n, k, d = 6, 30, 5, 8
    tokens = torch.randn(2, n, 24)
    centers0 = torch.randn(s, d, k)
    blocked = groups = None
    if restricted:
        blocked = torch.rand(s, n, k) < 0.4
        blocked[..., 0] = blocked[..., 3] = False
        groups = (3, 2)
    results = []
    for fused in (True, False):
        layer = _clone_clustering(m_step, update, fused)
        x = tokens.clone().requires_grad_()
        c0 = centers0.clone().requires_grad_()
        keys, values = layer.project(x)
        centers, assignment = layer(c0, keys, values, (n, 1), blocked, groups)
        (centers.sin().sum() + (assignment * torch.linspace(0, 1, k)).sum()).backward()
        grads = [x.grad, c0.grad] + [p.grad for p in layer.parameters()]
        results.append((centers, assignment, grads))
    (c_f, a_f, g_f), (c_u, a_u, g_u) = results
    assert_close_scaled(c_f, c_u)
    assert_close_scaled(a_f, a_u)
    for gf, gu in zip(g_f, g_u, strict=True):
        if gu is None:
            assert gf is None or not gf.any()
        else:
            assert_close_scaled(gf, gu)


VARIANTS = [
    dict(center_update="recurrent", dispatch="ours"),
    dict(center_update="recurrent", dispatch="ours", hard_dispatch=True),
    dict(center_update="recurrent", dispatch="ours", m_step="sum"),
    dict(center_update="kmeans", dispatch="ours"),
    dict(center_update="none", dispatch="ours"),
    dict(center_update="recurrent", dispatch="none"),
    # the variants the fused operator does not cover run their unfused code in either setting
    dict(center_update="recurrent", dispatch="fc"),
    dict(center_update="recurrent", dispatch="confidence"),
    dict(center_update="recurrent", dispatch="fc_similarity"),
    dict(center_update="vanilla", dispatch="ours"),
    dict(center_update="cosine", dispatch="fc_similarity"),
    dict(center_update="criss_cross", dispatch="ours"),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_encoder_variants_fused_equal_unfused(variant):
    """Every center update and dispatching of Table 6c / 6e: the same logits and gradients with the fused operator
    on and off (the variants it does not cover fall back to the unfused code)."""
    torch.manual_seed(0)
    model = timm.create_model("clusterformer_nano", num_classes=5, **variant)
    x = torch.randn(2, 3, 64, 64)
    outputs = []
    for fused in (True, False):
        set_fused(model, fused)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        outputs.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (out_f, grads_f), (out_u, grads_u) = outputs
    assert_close_scaled(out_f, out_u)
    for name in grads_f.keys() | grads_u.keys():  # k-means: no gradient reaches the keys (None or zeros)
        fused_grad, plain_grad = grads_f.get(name), grads_u.get(name)
        if fused_grad is None or plain_grad is None:
            assert not (plain_grad if fused_grad is None else fused_grad).any(), name
            continue
        assert_close_scaled(fused_grad, plain_grad, msg=name)


def test_encoder_clusters_for_pictures_are_the_unfused_ones():
    torch.manual_seed(0)
    block = ClusterBlock(32, 2, head_dim=16, center_grid=(3, 3)).eval()
    x = torch.randn(2, 8, 8, 32)
    with torch.no_grad():
        fused = block(x, return_clusters=True)
        set_fused(block, False)
        plain = block(x, return_clusters=True)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def saved_tensors(fn) -> tuple[int, list[tuple[int, ...]]]:
    """Bytes of the tensors autograd keeps for the backward pass of ``fn()`` (each storage once) and their shapes."""
    seen, total, shapes = set(), 0, []

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total, shapes


N, K, HEADS, D = 32 * 32, 100, 2, 16
ASSIGNMENT_BYTES = 2 * HEADS * N * K * 4  # one iteration's (S, N, K) fp32 assignment, batch 2


def block_saved(iterations: int, fused: bool) -> tuple[int, list[tuple[int, ...]]]:
    torch.manual_seed(0)
    block = set_fused(ClusterBlock(32, HEADS, head_dim=D, center_grid=(10, 10), iterations=iterations), fused)
    x = torch.randn(2, 32, 32, 32, requires_grad=True)
    return saved_tensors(lambda: block(x))


def test_fused_block_keeps_no_assignment_for_backward():
    """With the fused operator no tensor kept for the backward pass holds an (N, K) assignment or logits; the
    unfused block keeps two per iteration."""
    _, shapes = block_saved(3, fused=True)
    assert not [shape for shape in shapes if N in shape and K in shape]
    _, shapes = block_saved(3, fused=False)
    assert len([shape for shape in shapes if N in shape and K in shape]) >= 2 * 3


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_block_keeps_one_copy_of_the_keys_and_values(autocast, monkeypatch):
    """Of the block's ``(S, N, d)`` tensors the fused path keeps two for the backward pass, the keys before their
    layer norm (which that norm keeps) and the values (which the E/M steps keep): the normalised keys and the unit
    values of Eq. 6 are rebuilt from them there, bit for bit, in fp32 and under bf16 autocast (the gradients equal
    those of the same steps keeping both). The unfused path keeps them besides."""
    import clusterformer.layers.clustering as clustering
    import clusterformer.layers.dispatching as dispatching

    slices = {(2 * HEADS, N, D), (2 * HEADS, D, N)}

    def run(fused: bool) -> tuple[int, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        block = set_fused(ClusterBlock(32, HEADS, head_dim=D, center_grid=(10, 10)), fused)
        x = torch.randn(2, 32, 32, 32, requires_grad=True)
        storages = set()

        def pack(t):
            if tuple(t.shape) in slices:
                storages.add(t.untyped_storage().data_ptr())
            return t

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with hooks, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = block(x)
        (out.float() * torch.linspace(-1, 1, 32)).sum().backward()
        grads = {name: p.grad for name, p in block.named_parameters() if p.grad is not None}
        return len(storages), {"x": x.grad, **grads}

    kept, rebuilt = run(fused=True)
    assert kept == 2
    assert run(fused=False)[0] >= 4
    # the same fused steps told nothing of where their inputs come from: they keep them, with the same gradients
    em_step, dispatch = clustering.em_step, dispatching.dispatch
    monkeypatch.setattr(clustering, "em_step", lambda *args, **norms: em_step(*args))
    monkeypatch.setattr(dispatching, "dispatch", lambda *args: dispatch(*args[:6]))
    kept_both, plain = run(fused=True)
    assert kept_both >= 3
    assert rebuilt.keys() == plain.keys()
    for name, grad in rebuilt.items():
        assert torch.equal(grad, plain[name]), name


def test_fused_memory_does_not_grow_with_iterations():
    """Training memory no longer grows with T x N x K: each further iteration keeps two (S, K, d) tensors, the
    centers (the query projection's input and the M-step's result) and the queries before their layer norm, and the
    norms' statistics, against an (N, K) assignment unfused. (Kept besides before: the normalised queries and the
    M-step's numerator, 4.2 (S, K, d) tensors per iteration.)"""
    fused = {t: block_saved(t, fused=True)[0] for t in (1, 6)}
    plain = {t: block_saved(t, fused=False)[0] for t in (1, 6)}
    assert (fused[6] - fused[1]) / 5 < ASSIGNMENT_BYTES / 8
    assert (fused[6] - fused[1]) / 5 < 2.5 * (2 * HEADS * K * D * 4)
    assert (plain[6] - plain[1]) / 5 > 0.9 * ASSIGNMENT_BYTES


def test_weighted_mean_is_the_autograd_expression():
    """The M-step's autograd function: the numbers of ``(centers * eps + summed) / (mass[..., None] + eps)`` in
    autograd, forward and gradients, bit for bit in fp32; gradcheck in float64."""
    torch.manual_seed(0)
    centers, summed = torch.randn(3, 7, 5), torch.randn(3, 7, 5)
    mass = torch.rand(3, 7) * 4
    mass[0, 0] = 0.0  # a cluster without mass keeps its center
    grad = torch.randn(3, 7, 5)
    results = []
    for fn in (lambda c, s, m: F.weighted_mean(c, s, m, 1e-6), lambda c, s, m: (c * 1e-6 + s) / (m[..., None] + 1e-6)):
        inputs = [t.clone().requires_grad_() for t in (centers, summed, mass)]
        out = fn(*inputs)
        out.backward(grad)
        results.append([out.detach()] + [t.grad for t in inputs])
    for ours, plain in zip(*results, strict=True):
        assert torch.equal(ours, plain)
    inputs = [t.double().requires_grad_() for t in (centers, summed, mass + 0.1)]
    assert torch.autograd.gradcheck(lambda c, s, m: F.weighted_mean(c, s, m, 1e-6), inputs)


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = timm.create_model("clusterformer_nano", num_classes=5).train()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    set_fused(model, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(x).detach()
    scale = ref.abs().max()
    assert (out.detach().float() - ref).abs().max() < 0.05 * scale
    assert (out.detach().float() - plain.float()).abs().max() < 0.05 * scale


@pytest.mark.parametrize(("box_reference", "masked_attention"), [("clusters", False), ("refine", True)])
def test_dense_decoder_fused_equals_unfused(box_reference, masked_attention):
    """The clustering decoder with the fused operator: the same predictions and gradients, with masked attention
    (blocked pairs); the assignments reach the box head where it reads them (``box_reference="clusters"``)."""
    torch.manual_seed(0)
    model = build_set_model(
        "clusterformer_nano", num_classes=3, boxes=True, masks=True, num_queries=6, dim=32, mask_dim=16,
        num_layers=2, num_heads=2, ffn_dim=32, masked_attention=masked_attention, box_reference=box_reference,
    )  # fmt: skip
    assert model.decoder.keep_assignments == (box_reference == "clusters")
    model.double()  # float64: a deep model's fp32 gradients differ with the order of the sums
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    results = []
    for fused in (True, False):
        set_fused(model, fused)
        model.zero_grad()
        out = model(x)
        (out["logits"].sum() + out["boxes"].sum() + out["masks"].sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(({key: out[key].detach() for key in ("logits", "boxes", "masks")}, grads))
    (out_f, g_f), (out_u, g_u) = results
    for key in out_u:
        assert_close_scaled(out_f[key], out_u[key], tol=1e-9, msg=key)
    assert g_f.keys() == g_u.keys()
    for name in g_u:
        assert_close_scaled(g_f[name], g_u[name], tol=1e-9, msg=name)


def test_backend_setting_is_checked(monkeypatch):
    monkeypatch.setenv("CLUSTERFORMER_FUSED_BACKEND", "cuda-only")
    q, keys, values, _ = inputs()
    with pytest.raises(ValueError, match="CLUSTERFORMER_FUSED_BACKEND"):
        F.em_step(q, keys, values)


def _script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_operator_benchmark_script_checks_and_times_each_path(tmp_path, monkeypatch):
    """benchmarks/fused_operator.py (docs/benchmarks.md, "GPU"): on CPU the PyTorch blocks against the unfused
    products, errors in fp32 at the level of rounding, a time for each path."""
    monkeypatch.delenv("CLUSTERFORMER_FUSED_BACKEND")
    report = _script("fused_operator").main(
        ["--device", "cpu", "--batch", "1", "--tokens", "40", "--clusters", "6", "--heads", "2", "--head-dim", "4",
         "--iters", "1", "--warmup", "0", "--json", str(tmp_path / "r.json")]
    )  # fmt: skip
    rows = {(r["op"], r["dtype"], r["path"]): r for r in report["rows"]}
    assert set(rows) == {(op, dt, p) for op in ("em_step", "dispatch") for dt in ("float32", "bfloat16")
                         for p in ("unfused", "torch")}  # fmt: skip
    for op in ("em_step", "dispatch"):
        fp32 = rows[(op, "float32", "torch")]
        assert fp32["max_rel_error_out"] < 1e-5 and fp32["max_rel_error_grad"] < 1e-5
        assert rows[(op, "bfloat16", "torch")]["max_rel_error_out"] < 5e-2
    assert all(r["seconds"] > 0 for r in rows.values())
    assert (tmp_path / "r.json").exists()


def test_small_cpu_steps_take_the_unfused_products(monkeypatch):
    """On a CPU the operator runs where one step's assignment exceeds a block (``MIN_CPU_ELEMENTS``); below, the
    layers run the unfused products (the same numbers), whose Python costs less."""
    monkeypatch.setattr(F, "MIN_CPU_ELEMENTS", F.BLOCK_ELEMENTS)
    calls = []
    real = F._EMStep.apply
    monkeypatch.setattr(F._EMStep, "apply", lambda *a: calls.append(a[1].shape) or real(*a))
    torch.manual_seed(0)
    block = ClusterBlock(32, 2, head_dim=16, center_grid=(10, 10))
    block(torch.randn(2, 8, 8, 32))  # S N K = 4 x 64 x 100: one block
    assert calls == []
    block(torch.randn(2, 48, 48, 32))  # 4 x 2304 x 100 = 921600 > 2**19
    assert len(calls) == 3 and calls[0] == (4, 48 * 48, 16)
    assert F.worth_fusing(torch.zeros(1, device="meta"), 1) is False
