"""The fused clustering operator: E/M steps (Eq. 3) and feature dispatching (Eq. 6) without ``N x K`` tensors.

The unfused path (:meth:`RecurrentClustering.assign` and ``baddbmm``, :meth:`FeatureDispatch.aggregate`) writes each
iteration's ``(S, N, K)`` logits and assignment to memory, reads them back for the M-step and keeps every one of them
for the backward pass: training memory grows with ``T x N x K`` per head and block, and the products on those
matrices run at the speed of memory rather than of arithmetic. Here each step is one autograd function that

* in the forward pass computes the assignment a block of tokens at a time and reduces it at once: an E/M step
  returns only ``summed = M^T V`` ``(S, K, d)`` and ``mass = M.sum(N)`` ``(S, K)``, the dispatching only what the
  tokens receive ``(S, N, d)``;
* keeps for the backward pass only its inputs (the queries and centers, ``(S, K, d)``, and the keys and values that
  every iteration shares) and recomputes the assignment block by block there, as flash attention recomputes its
  attention matrix. The normalised queries and keys and the unit values of Eq. 6 can be kept as what they are
  computed from (``query_norm``, ``key_norm``, ``unit_source``: the inputs of the layer norms, which those keep, and
  the values, which the E/M steps keep) and rebuilt there too, and :func:`weighted_mean` (the EM M-step) keeps its
  result rather than its numerator: two ``(S, N, d)`` tensors fewer per block and two ``(S, K, d)`` per iteration.

What is left between the steps (the query projection and its layer norm, the weighted mean ``(eps C + summed) /
(mass + eps)``, the unit norms of Eq. 6) is ordinary autograd on ``(S, K, d)`` or ``(S, N, d)`` tensors. The numbers
are the unfused path's (tested to 1e-5 in fp32; gradients by ``gradcheck`` in float64).

Two implementations of the blockwise work, one interface (:func:`em_forward`, :func:`em_backward`,
:func:`dispatch_forward`, :func:`dispatch_backward`):

* PyTorch (this module): loops over blocks of slices and tokens sized to stay in cache; every device, every variant
  the fused path covers (softmax or k-means assignment, blocked pairs, groups of clusters, the top-1 dispatching);
* Triton (:mod:`clusterformer.layers.fused_triton`): one kernel launch per step on CUDA, for the softmax assignment
  without groups and the soft dispatching; selected when Triton imports and the tensors are on a GPU.

``CLUSTERFORMER_FUSED_BACKEND`` (``auto`` by default, ``torch`` or ``triton``) overrides the choice; ``triton`` on
CPU tensors needs ``TRITON_INTERPRET=1`` (the test suite runs the kernels that way).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

ASSIGNMENTS = ("softmax", "argmax")
# what a layer norm computed a tensor from: F.layer_norm(input, (d,), weight, bias, eps)
LayerNormOf = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, float]


def unit(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``F.normalize(x, dim=dim)`` (eps 1e-12 on the norm), written with a sum of squares, which is
    several times faster than ``F.normalize`` along a non-contiguous axis on CPU."""
    return x * x.square().sum(dim, keepdim=True).clamp_min(1e-24).rsqrt()


BACKENDS = ("auto", "torch", "triton")
# elements of one block's (slices, tokens, K) assignment: 512K floats, 2 MiB, about a core's L2 cache (on the 2-core
# Xeon of docs/benchmarks.md, 2**17 was 5% slower and 2**20 - 2**22 no faster)
BLOCK_ELEMENTS = 2**19


# On a CPU the fused operator runs where one step's (S, N, K) assignment exceeds one block: below that the unfused
# products keep it in cache as well, and the Python of the autograd functions costs more than it saves (20% of a
# ClusterFormer-Nano training step at 96x96). On CUDA it always runs. Tests set 0 to exercise it at small sizes.
MIN_CPU_ELEMENTS = BLOCK_ELEMENTS


def worth_fusing(reference: torch.Tensor, elements: int) -> bool:
    """Whether a step whose assignment has ``elements`` entries, on ``reference``'s device, takes the fused operator
    (the layers' ``fused`` attribute and tracing decide first)."""
    return reference.is_cuda or elements > MIN_CPU_ELEMENTS


def backend() -> str:
    value = os.environ.get("CLUSTERFORMER_FUSED_BACKEND", "auto")
    if value not in BACKENDS:
        raise ValueError(f"CLUSTERFORMER_FUSED_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def _triton_for(tensor: torch.Tensor, assignment: str = "softmax", groups=None, hard: bool = False):
    """The Triton module when it should run this step, else ``None``."""
    choice = backend()
    if choice == "torch":
        return None
    covered = assignment == "softmax" and groups is None and not hard
    if choice == "auto" and not (tensor.is_cuda and covered):
        return None
    try:
        from . import fused_triton
    except ImportError:  # triton missing: the PyTorch blocks
        if choice == "triton":
            raise
        return None
    if not fused_triton.available(tensor.device):
        if choice == "triton":
            raise RuntimeError(
                f"CLUSTERFORMER_FUSED_BACKEND=triton, but Triton cannot run on {tensor.device} "
                "(CPU tensors need TRITON_INTERPRET=1)"
            )
        return None
    if not covered:
        if choice == "triton":
            raise NotImplementedError("the Triton kernels cover the softmax assignment without groups, soft dispatch")
        return None
    return fused_triton


def _blocks(slices: int, tokens: int, k: int):
    """``(slice, token)`` ranges of the blocks whose assignment holds about ``BLOCK_ELEMENTS`` elements."""
    per_slice = tokens * k
    if per_slice >= BLOCK_ELEMENTS:
        step_s, step_n = 1, max(1, BLOCK_ELEMENTS // k)
    else:
        step_s, step_n = max(1, BLOCK_ELEMENTS // per_slice), tokens
    for s0 in range(0, slices, step_s):
        for n0 in range(0, tokens, step_n):
            yield slice(s0, min(s0 + step_s, slices)), slice(n0, min(n0 + step_n, tokens))


def _group_sum(x: torch.Tensor, groups: Sequence[int] | None) -> torch.Tensor:
    """Sum over the last axis within each group of consecutive clusters, broadcast back to ``x``'s shape."""
    if groups is None:
        return x.sum(-1, keepdim=True)
    return torch.cat([part.sum(-1, keepdim=True).expand_as(part) for part in x.split(list(groups), -1)], -1)


def top1_mask(weights: torch.Tensor) -> torch.Tensor:
    """One-hot mask of the largest weight along the last axis (k-means' assignment, Algorithm 2's ``mask``)."""
    return torch.zeros_like(weights).scatter_(-1, weights.argmax(dim=-1, keepdim=True), 1.0)


def assign(
    logits: torch.Tensor,
    blocked: torch.Tensor | None = None,
    groups: Sequence[int] | None = None,
    assignment: str = "softmax",
) -> torch.Tensor:
    """The E-step's assignment of a block of logits ``(s, n, K)``: softmax over the clusters (within each group), or
    the one-hot argmax; ``blocked`` pairs get none."""
    if blocked is not None:
        logits = logits.masked_fill(blocked, float("-inf"))
    parts = [logits] if groups is None else logits.split(list(groups), dim=-1)
    if assignment == "softmax":
        assigned = [part.softmax(dim=-1) for part in parts]
    else:
        assigned = [top1_mask(part) for part in parts]
    return assigned[0] if len(assigned) == 1 else torch.cat(assigned, dim=-1)


# ----------------------------------------------------------------------------------------------- PyTorch blocks


def em_forward(queries, keys, values, blocked=None, groups=None, assignment: str = "softmax"):
    """One E/M step's reductions without the ``(S, N, K)`` assignment: ``queries (S, K, d)`` (scaled: the logits are
    ``keys @ queries^T``), ``keys (S, N, d)``, ``values (S, N, d)``, ``blocked (S, N, K)`` or ``None`` ->
    ``summed = M^T values (S, K, d)`` and ``mass = M.sum(N) (S, K)``, in float32 or wider."""
    s, n, d = keys.shape
    k = queries.shape[1]
    acc = torch.promote_types(values.dtype, torch.float32)
    summed = values.new_zeros((s, k, values.shape[-1]), dtype=acc)
    mass = values.new_zeros((s, k), dtype=acc)
    query_t = queries.transpose(1, 2)
    for si, ni in _blocks(s, n, k):
        logits = torch.bmm(keys[si, ni], query_t[si])
        m = assign(logits, None if blocked is None else blocked[si, ni], groups, assignment)
        summed[si] += torch.bmm(m.transpose(1, 2), values[si, ni])
        mass[si] += m.sum(1)
    return summed, mass


def em_backward(queries, keys, values, blocked, grad_summed, grad_mass, groups=None, assignment: str = "softmax"):
    """Gradients of ``<grad_summed, summed> + <grad_mass, mass>`` for :func:`em_forward`'s inputs, recomputing the
    assignment block by block: ``dM = values grad_summed^T + grad_mass``; softmax: ``dL = M (dM - sum_k M dM)``
    (within each group), argmax: ``dL = 0``; ``grad_keys = dL queries``, ``grad_queries = dL^T keys``,
    ``grad_values = M grad_summed``."""
    s, n, d = keys.shape
    k = queries.shape[1]
    grad_summed = grad_summed.to(values.dtype)
    grad_mass = grad_mass.to(values.dtype)
    # the one-hot argmax passes no gradient to the logits: none for the queries and keys, as autograd gives
    grad_q = torch.zeros_like(queries) if assignment == "softmax" else None
    grad_k = torch.zeros_like(keys) if assignment == "softmax" else None
    grad_v = torch.empty_like(values)
    query_t = queries.transpose(1, 2)
    for si, ni in _blocks(s, n, k):
        logits = torch.bmm(keys[si, ni], query_t[si])
        m = assign(logits, None if blocked is None else blocked[si, ni], groups, assignment)
        grad_v[si, ni] = torch.bmm(m, grad_summed[si])
        if assignment != "softmax":
            continue
        grad_m = torch.baddbmm(grad_mass[si, None, :], values[si, ni], grad_summed[si].transpose(1, 2))
        grad_logits = m * (grad_m - _group_sum(m * grad_m, groups))
        grad_k[si, ni] = torch.bmm(grad_logits, queries[si])
        grad_q[si] += torch.bmm(grad_logits.transpose(1, 2), keys[si, ni])
    return grad_q, grad_k, grad_v


def dispatch_weights(unit_values, unit_centers, alpha, beta, hard: bool = False):
    """Eq. 6's ``sigmoid(beta + alpha cos(C_k, v_p))`` of a block, ``(s, n, K)``, times the top-1 mask when ``hard``;
    also returns the sigmoid before the mask and the mask (``None`` unless ``hard``)."""
    sigmoid = torch.baddbmm(beta, unit_values, unit_centers.transpose(1, 2) * alpha).sigmoid_()
    if not hard:
        return sigmoid, sigmoid, None
    top = top1_mask(sigmoid)
    return sigmoid * top, sigmoid, top


def dispatch_forward(unit_values, unit_centers, alpha, beta, centers, hard: bool = False):
    """What each token receives (Eq. 6 without the ``1/K``, which the caller folds into ``centers``):
    ``unit_values (S, N, d)``, ``unit_centers (S, K, d)``, ``centers (S, K, d)`` -> ``(S, N, d)``."""
    s, n, _ = unit_values.shape
    k = unit_centers.shape[1]
    out = unit_values.new_empty((s, n, centers.shape[-1]), dtype=torch.promote_types(unit_values.dtype, centers.dtype))
    for si, ni in _blocks(s, n, k):
        weights, _, _ = dispatch_weights(unit_values[si, ni], unit_centers[si], alpha, beta, hard)
        out[si, ni] = torch.bmm(weights.to(centers.dtype), centers[si])
    return out


def dispatch_backward(unit_values, unit_centers, alpha, beta, centers, grad_out, hard: bool = False):
    """Gradients of :func:`dispatch_forward` for ``(unit_values, unit_centers, alpha, beta, centers)``, recomputing
    the weights block by block (the top-1 mask passes no gradient)."""
    s, n, _ = unit_values.shape
    k = unit_centers.shape[1]
    grad_out = grad_out.to(centers.dtype)
    grad_uv = torch.empty_like(unit_values)
    grad_uc = torch.zeros_like(unit_centers)
    grad_c = torch.zeros_like(centers)
    grad_alpha = torch.zeros((), dtype=torch.float64, device=unit_values.device)
    grad_beta = torch.zeros((), dtype=torch.float64, device=unit_values.device)
    for si, ni in _blocks(s, n, k):
        uv, uc, g = unit_values[si, ni], unit_centers[si], grad_out[si, ni]
        weights, sigmoid, top = dispatch_weights(uv, uc, alpha, beta, hard)
        grad_c[si] += torch.bmm(weights.transpose(1, 2).to(g.dtype), g)
        grad_w = torch.bmm(g, centers[si].transpose(1, 2))
        if top is not None:
            grad_w = grad_w * top
        grad_z = grad_w * sigmoid * (1 - sigmoid)
        cos = torch.bmm(uv, uc.transpose(1, 2))
        grad_alpha += (grad_z * cos).sum()
        grad_beta += grad_z.sum()
        grad_z = grad_z.to(uv.dtype)
        grad_uv[si, ni] = torch.bmm(grad_z, uc) * alpha
        grad_uc[si] += torch.bmm(grad_z.transpose(1, 2), uv) * alpha
    return (
        grad_uv,
        grad_uc,
        grad_alpha.to(alpha.dtype).reshape(alpha.shape),
        grad_beta.to(beta.dtype).reshape(beta.shape),
        grad_c,
    )


# ----------------------------------------------------------------------------------------------- autograd


def _compute_dtype(device: torch.device, *tensors: torch.Tensor) -> torch.dtype:
    """The dtype an autocast region would run the products in, else the inputs' common dtype."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _rebuild_settings(device: torch.device, dtype: torch.dtype) -> tuple[bool, torch.dtype, torch.dtype]:
    """What a backward pass needs to compute an input again as the forward's caller computed it: whether autocast
    was on, its dtype, and the dtype the step's products ran in."""
    return torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type), dtype


@contextlib.contextmanager
def _rebuilding(device: torch.device, settings: tuple[bool, torch.dtype, torch.dtype]):
    """No gradients, and autocast as it was around the forward pass (backward passes run outside it); yields the
    dtype of the step's products."""
    enabled, autocast_dtype, dtype = settings
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=enabled):
        yield dtype


class _EMStep(torch.autograd.Function):
    # the last arguments: for the queries and then the keys, None or the (input, weight, bias) of the layer norm that
    # computed them, and the two norms' eps (LayerNorm's layout: weight and bias may be None)
    @staticmethod
    def forward(ctx, queries, keys, values, blocked, groups, assignment, q_in, q_w, q_b, k_in, k_w, k_b, eps):
        dtype = _compute_dtype(keys.device, queries, keys, values)
        ctx.dtypes = (queries.dtype, keys.dtype, values.dtype)
        ctx.groups, ctx.assignment = groups, assignment
        q, k, v = queries.to(dtype), keys.to(dtype), values.to(dtype)
        with torch.autocast(keys.device.type, enabled=False):
            kernels = _triton_for(k, assignment, groups)
            if kernels is not None:
                summed, mass = kernels.em_forward(q, k, v, blocked)
            else:
                summed, mass = em_forward(q, k, v, blocked, groups, assignment)
        # queries or keys that are layer_norm(input): kept as that input, which the layer norm keeps anyway
        ctx.normed = (q_in is not None, k_in is not None)
        ctx.eps, ctx.rebuild = eps, _rebuild_settings(keys.device, dtype)
        q_kept = (q_in, q_w, q_b) if q_in is not None else (q, None, None)
        k_kept = (k_in, k_w, k_b) if k_in is not None else (k, None, None)
        ctx.save_for_backward(*q_kept, *k_kept, v, blocked)
        return summed, mass

    @staticmethod
    def backward(ctx, grad_summed, grad_mass):
        q_in, q_w, q_b, k_in, k_w, k_b, v, blocked = ctx.saved_tensors
        q_eps, k_eps = ctx.eps
        # the forward's queries and keys again, bit for bit: the same layer norm on the same input, autocast as then
        with _rebuilding(v.device, ctx.rebuild) as dtype:
            q = F.layer_norm(q_in, q_in.shape[-1:], q_w, q_b, q_eps).to(dtype) if ctx.normed[0] else q_in
            k = F.layer_norm(k_in, k_in.shape[-1:], k_w, k_b, k_eps).to(dtype) if ctx.normed[1] else k_in
        grad_summed = torch.zeros_like(q, dtype=torch.float32) if grad_summed is None else grad_summed
        grad_mass = q.new_zeros(q.shape[:2], dtype=torch.float32) if grad_mass is None else grad_mass
        with torch.autocast(k.device.type, enabled=False):
            kernels = _triton_for(k, ctx.assignment, ctx.groups)
            if kernels is not None:
                grads = kernels.em_backward(q, k, v, blocked, grad_summed, grad_mass)
            else:
                grads = em_backward(q, k, v, blocked, grad_summed, grad_mass, ctx.groups, ctx.assignment)
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)]
        return (*grads, *[None] * 10)


class _WeightedMean(torch.autograd.Function):
    """``(centers * eps + summed) / (mass[..., None] + eps)``, keeping the result and the denominators for the
    backward pass instead of the ``(S, K, d)`` numerator (the result is kept anyway: the next step reads it)."""

    @staticmethod
    def forward(ctx, centers, summed, mass, eps):
        denominator = mass.unsqueeze(-1) + eps
        out = (centers * eps + summed) / denominator
        ctx.save_for_backward(out, denominator)
        ctx.eps, ctx.dtypes = eps, (centers.dtype, summed.dtype, mass.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out, denominator = ctx.saved_tensors
        grad = grad_out / denominator  # of the numerator
        # of the denominator, as autograd's division computes it (-grad * (numerator / denominator) / denominator,
        # the quotient being the result): the same numbers as the expression in autograd
        grad_mass = (-grad_out * (out / denominator)).sum(-1)
        d_centers, d_summed, d_mass = ctx.dtypes
        return (grad * ctx.eps).to(d_centers), grad.to(d_summed), grad_mass.to(d_mass), None


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, unit_values, unit_centers, alpha, beta, centers, hard, unit_source):
        dtype = _compute_dtype(unit_values.device, unit_values, unit_centers, centers)
        ctx.dtypes = (unit_values.dtype, unit_centers.dtype, centers.dtype)
        ctx.hard = hard
        uv, uc, c = unit_values.to(dtype), unit_centers.to(dtype), centers.to(dtype)
        a, b = alpha.to(dtype), beta.to(dtype)
        with torch.autocast(uv.device.type, enabled=False):
            kernels = _triton_for(uv, hard=hard)
            if kernels is not None:
                out = kernels.dispatch_forward(uv, uc, a, b, c)
            else:
                out = dispatch_forward(uv, uc, a, b, c, hard)
        # unit values that are unit(unit_source, 1).transpose(1, 2): kept as the source (the values, which the
        # E/M steps keep anyway); the unit norm's operations run in their input's dtype, under autocast too
        ctx.from_source = unit_source is not None
        ctx.save_for_backward(unit_source if ctx.from_source else uv, uc, a, b, c)
        ctx.rebuild = _rebuild_settings(uv.device, dtype)
        ctx.param_dtypes = (alpha.dtype, beta.dtype)
        return out.to(dtype)

    @staticmethod
    def backward(ctx, grad_out):
        uv, uc, a, b, c = ctx.saved_tensors
        if ctx.from_source:
            with _rebuilding(uv.device, ctx.rebuild) as dtype:  # the forward's unit values again, bit for bit
                uv = unit(uv, 1).transpose(1, 2).to(dtype)
        with torch.autocast(uv.device.type, enabled=False):
            kernels = _triton_for(uv, hard=ctx.hard)
            if kernels is not None:
                grad_uv, grad_uc, grad_a, grad_b, grad_c = kernels.dispatch_backward(uv, uc, a, b, c, grad_out)
            else:
                grad_uv, grad_uc, grad_a, grad_b, grad_c = dispatch_backward(uv, uc, a, b, c, grad_out, ctx.hard)
        d_uv, d_uc, d_c = ctx.dtypes
        d_a, d_b = ctx.param_dtypes
        return grad_uv.to(d_uv), grad_uc.to(d_uc), grad_a.to(d_a), grad_b.to(d_b), grad_c.to(d_c), None, None


def em_step(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    blocked: torch.Tensor | None = None,
    groups: Sequence[int] | None = None,
    assignment: str = "softmax",
    query_norm: LayerNormOf | None = None,
    key_norm: LayerNormOf | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused E/M step: ``queries (S, K, d)`` (scaled), ``keys (S, N, d)``, ``values (S, N, d)`` (any strides),
    ``blocked (S, N, K)``, ``groups`` as in :meth:`RecurrentClustering.forward` -> ``summed (S, K, d)`` and ``mass
    (S, K)`` (float32 under autocast). Differentiable; the assignment is never stored.

    ``key_norm = (input, weight, bias, eps)`` says that ``keys`` is ``F.layer_norm(input, (d,), weight, bias, eps)``
    (``query_norm`` the same of ``queries``): the step then keeps ``input`` for its backward pass, which the layer
    norm keeps anyway, instead of a second tensor of that size, and rebuilds the keys from it there (under autocast
    as autocast computed them)."""
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
    groups = None if groups is None else tuple(int(g) for g in groups)
    q_in, q_w, q_b, q_eps = query_norm if query_norm is not None else (None, None, None, None)
    k_in, k_w, k_b, k_eps = key_norm if key_norm is not None else (None, None, None, None)
    norms = (q_in, q_w, q_b, k_in, k_w, k_b, (q_eps, k_eps))
    return _EMStep.apply(queries, keys, values, blocked, groups, assignment, *norms)


def weighted_mean(centers: torch.Tensor, summed: torch.Tensor, mass: torch.Tensor, eps: float) -> torch.Tensor:
    """The EM M-step from :func:`em_step`'s sums, ``(centers * eps + summed) / (mass[..., None] + eps)``, which keeps
    one ``(S, K, d)`` tensor fewer for the backward pass than the same expression in autograd."""
    return _WeightedMean.apply(centers, summed, mass, eps)


def dispatch(
    unit_values: torch.Tensor,
    unit_centers: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    centers: torch.Tensor,
    hard: bool = False,
    unit_source: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused Eq. 6 aggregation: ``sigmoid(beta + alpha * unit_values unit_centers^T) @ centers`` (top-1 weight only
    when ``hard``), ``(S, N, d)``; the ``(S, N, K)`` weights are never stored. Differentiable.

    ``unit_source`` ``(S, d, N)`` says that ``unit_values`` is ``unit(unit_source, 1).transpose(1, 2)``: the step then
    keeps the source for its backward pass (the values, which the E/M steps keep anyway) instead of the unit values,
    and rebuilds them there."""
    return _Dispatch.apply(unit_values, unit_centers, alpha, beta, centers, hard, unit_source)


def set_fused(module: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """Switch the fused operator on or off in every clustering and dispatching of ``module`` (an encoder, a dense
    model, a task): the same weights and numbers either way. Returns ``module``."""
    for sub in module.modules():
        if hasattr(sub, "fused") and type(sub).__name__ in ("RecurrentClustering", "FeatureDispatch"):
            sub.fused = bool(enabled)
    return module
