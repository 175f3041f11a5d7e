"""The Triton kernels of the fused clustering operator (layers/fused_triton.py) against the plain formulas, on CPU
tensors through Triton's interpreter.

The interpreter needs ``TRITON_INTERPRET=1`` before triton is first imported (triton.language jits its own
functions on import), which an ordinary test process cannot promise: ``test_kernels_under_the_interpreter``
runs this module again in a subprocess with the variable set, where the other tests run (they skip here)."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from clusterformer.layers import fused_triton  # noqa: E402

S, N = 3, 37  # 37 tokens: three blocks of 16, the last one partial
INTERPRETED = fused_triton.available("cpu")
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="runs in a subprocess under TRITON_INTERPRET=1 (test_kernels_under_the_interpreter)"
)


@pytest.fixture(scope="module", autouse=True)
def small_blocks():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused_triton, "BLOCK_N", 16)
        yield


@pytest.mark.skipif(INTERPRETED, reason="this process is the subprocess")
def test_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    assert " passed" in result.stdout.strip().splitlines()[-1], result.stdout[-2000:]


def _inputs(k, d, transposed, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(rows):
        if transposed:  # the model's layouts: (S, d, rows) storage read as (S, rows, d)
            return torch.randn(S, d, rows, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(S, rows, d, generator=g).to(dtype)

    return make(k), make(N), make(N), g


def _blocked(k, g):
    blocked = torch.rand(S, N, k, generator=g) < 0.5
    keep = torch.randint(k, (S, N, 1), generator=g)
    return blocked.scatter(-1, keep, False)  # one open cluster per token at least


def _em_plain(queries, keys, values, blocked):
    logits = keys @ queries.transpose(1, 2)
    if blocked is not None:
        logits = logits.masked_fill(blocked, float("-inf"))
    m = logits.softmax(-1)
    return m.transpose(1, 2) @ values, m.sum(1)


def _dispatch_plain(unit_values, unit_centers, alpha, beta, centers):
    w = torch.sigmoid(beta + alpha * unit_values @ unit_centers.transpose(1, 2))
    return w @ centers


def _grads(fn, inputs, grads_out):
    """torch.autograd of ``<grads_out, fn(inputs)>`` in float64."""
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = sum((o * g.double()).sum() for o, g in zip(outs, grads_out, strict=True))
    return torch.autograd.grad(total, leaves)


def _close(actual, expected, tol):
    expected = expected.to(actual.device)
    scale = expected.abs().max().item() + 1e-12
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol * max(scale, 1.0), f"max error {err:.3g} against max value {scale:.3g}"


@needs_interpreter
def test_available_on_cpu_under_the_interpreter():
    assert fused_triton.available("cpu")
    assert fused_triton.available(torch.device("cpu"))


@needs_interpreter
@pytest.mark.parametrize(
    ("k", "d", "masked", "transposed", "programs"),
    [(10, 8, False, False, None), (20, 32, True, True, None), (20, 8, True, False, 2)],
    ids=["K10-d8", "K20-d32-blocked-strided", "K20-d8-blocked-2programs"],
)
def test_em_matches_plain_formulas(monkeypatch, k, d, masked, transposed, programs):
    monkeypatch.setattr(fused_triton, "PROGRAMS_PER_SLICE", programs)
    queries, keys, values, g = _inputs(k, d, transposed)
    blocked = _blocked(k, g) if masked else None
    summed, mass = fused_triton.em_forward(queries, keys, values, blocked)
    assert summed.dtype == mass.dtype == torch.float32
    assert summed.shape == (S, k, d) and mass.shape == (S, k)
    ref_summed, ref_mass = _em_plain(queries.double(), keys.double(), values.double(), blocked)
    _close(summed, ref_summed, 1e-5)
    _close(mass, ref_mass, 1e-5)

    grad_summed, grad_mass = torch.randn(S, k, d, generator=g), torch.randn(S, k, generator=g)
    got = fused_triton.em_backward(queries, keys, values, blocked, grad_summed, grad_mass)
    expected = _grads(lambda q, kk, v: _em_plain(q, kk, v, blocked), (queries, keys, values), (grad_summed, grad_mass))
    for name, a, e, x in zip(("queries", "keys", "values"), got, expected, (queries, keys, values), strict=True):
        assert a.shape == x.shape and a.dtype == x.dtype, name
        _close(a, e, 1e-5)


@needs_interpreter
@pytest.mark.parametrize(
    ("k", "d", "transposed", "programs"),
    [(10, 8, False, None), (20, 32, True, None), (20, 8, False, 2)],
    ids=["K10-d8", "K20-d32-strided", "K20-d8-2programs"],
)
def test_dispatch_matches_plain_formulas(monkeypatch, k, d, transposed, programs):
    monkeypatch.setattr(fused_triton, "PROGRAMS_PER_SLICE", programs)
    centers, unit_values, _, g = _inputs(k, d, transposed, seed=1)
    unit_values = fused_triton_unit(unit_values)
    unit_centers = fused_triton_unit(torch.randn(S, k, d, generator=g))
    alpha, beta = torch.tensor([1.7]), torch.tensor(-0.3)
    out = fused_triton.dispatch_forward(unit_values, unit_centers, alpha, beta, centers)
    assert out.dtype == torch.float32 and out.shape == (S, N, d)
    ref = _dispatch_plain(unit_values.double(), unit_centers.double(), 1.7, -0.3, centers.double())
    _close(out, ref, 1e-5)

    grad_out = torch.randn(S, d, N, generator=g).transpose(1, 2)
    got = fused_triton.dispatch_backward(unit_values, unit_centers, alpha, beta, centers, grad_out)
    inputs = (unit_values, unit_centers, alpha, beta, centers)
    expected = _grads(_dispatch_plain, inputs, (grad_out,))
    names = ("unit_values", "unit_centers", "alpha", "beta", "centers")
    for name, a, e, x in zip(names, got, expected, inputs, strict=True):
        assert a.shape == x.shape and a.dtype == x.dtype, name
        _close(a, e, 1e-5)


def fused_triton_unit(x):
    return x / x.norm(dim=-1, keepdim=True)


@needs_interpreter
def test_bf16_inputs_within_bf16_tolerance():
    k, d = 20, 32
    queries, keys, values, g = _inputs(k, d, True, dtype=torch.bfloat16, seed=2)
    blocked = _blocked(k, g)
    summed, mass = fused_triton.em_forward(queries, keys, values, blocked)
    ref_summed, ref_mass = _em_plain(queries.double(), keys.double(), values.double(), blocked)
    _close(summed, ref_summed, 2e-2)
    _close(mass, ref_mass, 2e-2)
    grad_summed = torch.randn(S, k, d, generator=g).bfloat16()  # as grad_out below
    grad_mass = torch.randn(S, k, generator=g)
    got = fused_triton.em_backward(queries, keys, values, blocked, grad_summed, grad_mass)
    expected = _grads(lambda q, kk, v: _em_plain(q, kk, v, blocked), (queries, keys, values), (grad_summed, grad_mass))
    for a, e in zip(got, expected, strict=True):
        assert a.dtype == torch.bfloat16
        _close(a, e, 2e-2)

    unit_values = fused_triton_unit(values.float()).bfloat16()
    unit_centers = fused_triton_unit(queries.float()).bfloat16()
    alpha, beta = torch.tensor([2.0]), torch.tensor([0.5])
    centers = torch.randn(S, k, d, generator=g).bfloat16()
    out = fused_triton.dispatch_forward(unit_values, unit_centers, alpha, beta, centers)
    inputs = (unit_values, unit_centers, alpha, beta, centers)
    _close(out, _dispatch_plain(*(x.double() for x in inputs)), 2e-2)
    # the kernels cast fp32 gradients to the inputs' dtype; bf16 ones here, so that the reference sees the same
    grad_out = torch.randn(S, N, d, generator=g).bfloat16()
    got = fused_triton.dispatch_backward(*inputs, grad_out)
    for a, e in zip(got, _grads(_dispatch_plain, inputs, (grad_out,)), strict=True):
        _close(a, e, 2e-2)


@needs_interpreter
def test_em_mask_broadcast_over_slices_and_a_fully_blocked_token():
    """A mask expanded over the slices (stride 0) is read as such; a token with no open cluster gets no mass
    (a zero row of M, where the plain softmax gives NaN)."""
    k, d = 10, 8
    queries, keys, values, g = _inputs(k, d, False, seed=3)
    blocked = _blocked(k, g)[:1].expand(S, N, k).clone()
    blocked[:, 5] = True
    summed, mass = fused_triton.em_forward(queries, keys, values, blocked[:1].expand(S, N, k))
    open_tokens = torch.ones(N, dtype=torch.bool)
    open_tokens[5] = False
    ref = _em_plain(queries[:, :, :].double(), keys[:, open_tokens].double(), values[:, open_tokens].double(),
                    blocked[:, open_tokens])  # fmt: skip
    _close(summed, ref[0], 1e-5)
    _close(mass, ref[1], 1e-5)


def test_without_triton_nothing_is_available(monkeypatch):
    monkeypatch.setattr(fused_triton, "_triton", lambda: None)
    assert not fused_triton.available("cpu")
    assert not fused_triton.available("cuda")
    x = torch.zeros(1, 4, 8)
    with pytest.raises(RuntimeError, match="triton cannot be imported"):
        fused_triton.em_forward(x[:, :2], x, x)


@needs_interpreter
def test_encoder_block_through_the_kernels_equals_the_pytorch_blocks(monkeypatch):
    """The fused operator's autograd functions with the Triton kernels (CLUSTERFORMER_FUSED_BACKEND=triton) inside a
    cluster block: the output and every gradient are those of its PyTorch blocks."""
    from clusterformer.backbone import ClusterBlock
    from clusterformer.layers import fused

    monkeypatch.setattr(fused, "MIN_CPU_ELEMENTS", 0)  # CPU tensors: the operator at this small size
    torch.manual_seed(0)
    block = ClusterBlock(32, 2, head_dim=16, center_grid=(3, 3))
    x = torch.randn(2, 6, 7, 32)
    results = []
    for backend in ("triton", "torch"):
        monkeypatch.setenv("CLUSTERFORMER_FUSED_BACKEND", backend)
        block.zero_grad()
        leaf = x.clone().requires_grad_()
        out = block(leaf)
        (out * torch.linspace(-1, 1, 32)).sum().backward()
        grads = {name: p.grad.clone() for name, p in block.named_parameters() if p.grad is not None}
        results.append((out.detach(), leaf.grad, grads))
    (out_t, x_t, g_t), (out_p, x_p, g_p) = results
    torch.testing.assert_close(out_t, out_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_t, x_p, rtol=1e-5, atol=1e-5)
    assert g_t.keys() == g_p.keys()
    for name in g_p:
        torch.testing.assert_close(g_t[name], g_p[name], rtol=1e-4, atol=1e-5, msg=name)
