"""Triton kernels of the fused clustering operator: the EM step and the feature dispatch without an (N x K) matrix.

Every function works on *slices* (one (image, head) pair each, see ``layers/clustering.py``), with ``S`` slices,
``N`` tokens, ``K`` clusters and head dimension ``d``:

* ``em_forward`` / ``em_backward``: the E-step's softmax over the clusters, ``M = softmax_K(keys @ queries^T)``,
  and the M-step's sums ``M^T @ values`` and ``M.sum(N)``;
* ``dispatch_forward`` / ``dispatch_backward``: ``W = sigmoid(beta + alpha * unit_values @ unit_centers^T)`` and
  ``W @ centers``.

The ``(N, K)`` matrices ``M`` and ``W`` are recomputed block by block and never written to memory.

Layout of the kernels. The grid is ``(S, P)``: program ``(s, p)`` walks the token blocks ``p, p + P, p + 2P, ...``
of slice ``s`` (``BLOCK_N`` tokens each) and keeps the whole ``K``-by-``d`` tile of the slice's queries / centers
and of its running sums in registers. ``K`` is padded to a power of two ``BLOCK_K`` (padded clusters get a ``-inf``
logit in the softmax and a zero weight in the dispatch, padded rows load as zeros) and so is ``d`` (``BLOCK_D``);
every block dimension is at least 16, as ``tl.dot`` asks.

Reductions over the tokens (``summed``, ``mass``, ``grad_queries``, ``grad_unit_centers``, ``grad_centers``,
``grad_alpha``, ``grad_beta``) are written as per-program *partials*, an fp32 buffer ``(S, P, K, d)`` (or ``(S, P,
K)``, ``(S, P)``) summed with ``torch.sum`` afterwards: the results do not depend on the order in which programs
run (no atomics), at the cost of a buffer ``P`` times the size of the result. ``P`` is ``PROGRAMS_PER_SLICE`` when
set, else about four programs per streaming multiprocessor over all slices on CUDA (all token blocks under the
interpreter). ``dispatch_forward`` reduces nothing: one program per token block.

Precision. Products accumulate in fp32. When all the large inputs share one dtype among fp32 / bf16 / fp16 the
``tl.dot`` operands stay in that dtype (others are cast to fp32 first); the recomputed ``M``, ``W`` and their
gradients, and the incoming ``grad_summed`` / ``grad_out``, are cast to it before entering a product, as in
flash attention (under the interpreter, whose ``tl.dot`` cannot multiply bf16, bf16 operands are rounded so and
multiplied in fp32). fp32 products run with
``input_precision=FP32_PRECISION`` (module setting, ``"ieee"`` by default: exact fp32; ``"tf32"`` or ``"tf32x3"``
trade accuracy for tensor-core speed). Forward results are fp32; gradients come back in the dtypes of the inputs
they belong to.

A token whose clusters are all ``blocked`` gets an all-zero row of ``M`` (the plain softmax would give NaN).

Triton is imported on first use, never at import time, and the kernels are built (``triton.jit``) on first use
for each value of ``TRITON_INTERPRET``. The interpreter (CPU tensors, for tests) needs the variable set before
triton is first imported in the process: triton.language jits its own library functions when imported.
"""

from __future__ import annotations

import functools
import os

import torch

# input_precision of the tl.dot products with fp32 operands: "ieee" (exact), "tf32" or "tf32x3"
FP32_PRECISION = "ieee"
# programs per slice (token blocks are shared out among them); None: chosen from the device and the sizes
PROGRAMS_PER_SLICE: int | None = None
# tokens per block; None: chosen from K (at least 16)
BLOCK_N: int | None = None

tl = None  # triton.language, bound on first use (_kernels)

_LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _triton():
    """The ``triton`` module, or None when it cannot be imported."""
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install on an unsupported platform
        return None
    return triton


def _interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` is on (read now, as ``triton.jit`` reads it)."""
    knobs = getattr(_triton(), "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _interpreter_ready() -> bool:
    """Whether triton.language was imported under the interpreter: its own library functions (``tl.max``,
    ``tl.sum``, ...) are jitted when it is imported, and the interpreter cannot call compiled ones, so
    ``TRITON_INTERPRET=1`` must be set before triton is first imported in the process."""
    import triton.language

    return type(triton.language.max).__name__ == "InterpretedFunction"


def available(device: torch.device | str) -> bool:
    """Whether these kernels can run on tensors of ``device``: triton imports and the device is CUDA, or the
    Triton interpreter is on and the device is the CPU (``TRITON_INTERPRET=1`` set before triton was first
    imported in the process)."""
    if _triton() is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _interpreting() and _interpreter_ready()


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _check(device: torch.device) -> None:
    if not available(device):
        reason = "triton cannot be imported" if _triton() is None else f"no Triton backend for device {device}"
        hint = ""
        if device.type == "cpu":
            hint = " (set TRITON_INTERPRET=1 before triton is first imported to run the kernels on CPU tensors)"
        raise RuntimeError(f"clusterformer.layers.fused_triton: {reason}{hint}")


def _common(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in one dtype for ``tl.dot``: theirs when they share fp32 / bf16 / fp16, else fp32."""
    dtypes = {t.dtype for t in tensors}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    if dtype not in _LOW_PRECISION:
        dtype = torch.float32
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def _precision(dtype: torch.dtype) -> str:
    if FP32_PRECISION not in ("ieee", "tf32", "tf32x3"):
        raise ValueError(f"FP32_PRECISION must be 'ieee', 'tf32' or 'tf32x3', got {FP32_PRECISION!r}")
    return FP32_PRECISION if dtype == torch.float32 else "ieee"


def _config(s: int, n: int, k: int, d: int, device: torch.device, reduce: bool = True) -> dict:
    """Block sizes, programs per slice and warps for ``s`` slices of ``n`` tokens, ``k`` clusters, dimension ``d``."""
    block_k = max(16, _next_pow2(k))
    block_d = max(16, _next_pow2(d))
    # by default a (BLOCK_N, BLOCK_K) tile of logits of about 2048 values, 16 tokens for K > 64, and 4 warps:
    # the fastest of BLOCK_N 16-128 x 4 or 8 warps x 1-16 programs per multiprocessor measured on an H200
    # (S = 16, d = 32, N = 3136 and K = 100 in fp32 / bf16, N = 16384 and K = 200 in bf16); larger tiles spill
    auto_n = max(16, min(128, 2048 // block_k, _next_pow2(n)))
    block_n = auto_n if BLOCK_N is None else max(16, _next_pow2(BLOCK_N))
    n_blocks = max(1, -(-n // block_n))
    if PROGRAMS_PER_SLICE is not None:
        programs = PROGRAMS_PER_SLICE
    elif not reduce or device.type != "cuda":
        programs = n_blocks
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        programs = -(-4 * sms // max(1, s))
    programs = max(1, min(int(programs), n_blocks))
    return {
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "BLOCK_D": block_d,
        "n_blocks": n_blocks,
        "programs": programs,
        "num_warps": 4,
    }


def _same_shapes(what: str, **tensors: torch.Tensor) -> None:
    """Raises ValueError unless the tensors are 3-d and agree on the named sizes: ``what`` spells each tensor's
    dims, as ``"queries=SKd keys=SNd"``."""
    sizes: dict[str, int] = {}
    for spec in what.split():
        name, dims = spec.split("=")
        shape = tuple(tensors[name].shape)
        if len(shape) != len(dims):
            raise ValueError(f"{name} must have {len(dims)} dims ({', '.join(dims)}), got shape {shape}")
        for dim, size in zip(dims, shape, strict=True):
            if sizes.setdefault(dim, size) != size:
                raise ValueError(f"{name} has {dim}={size}, not {sizes[dim]} as before; shapes: {what}")


def _scalar(x: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    x = torch.as_tensor(x, device=device)
    if x.numel() != 1:
        raise ValueError(f"alpha and beta must hold one value, got shape {tuple(x.shape)}")
    return x.reshape(1).to(torch.float32)


@functools.cache
def _kernels(interpret: bool) -> dict:
    """The jitted kernels, built once per interpreter setting (``triton.jit`` reads it when it decorates). The
    kernels are plain module-level functions: the interpreter re-executes their source in the module's globals,
    where ``tl`` is bound here."""
    del interpret  # the cache key
    global tl
    import triton
    import triton.language

    tl = triton.language
    kernels = {"em_fwd": _em_fwd, "em_bwd": _em_bwd, "dispatch_fwd": _dispatch_fwd, "dispatch_bwd": _dispatch_bwd}
    return {name: triton.jit(fn) for name, fn in kernels.items()}


# ---------------------------------------------------------------- kernels (jitted by _kernels on first use)
def _em_fwd(
    q_ptr, k_ptr, v_ptr, b_ptr, sum_ptr, mass_ptr,
    N, K, D, n_blocks, P,
    sq_s, sq_k, sq_d, sk_s, sk_n, sk_d, sv_s, sv_n, sv_d, sb_s, sb_n, sb_k,
    HAS_BLOCKED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    dt = k_ptr.dtype.element_ty
    ct = dt  # the dtype of the tl.dot operands
    if UPCAST:  # the interpreter's tl.dot cannot multiply bf16: operands rounded to dt, multiplied in fp32
        ct = tl.float32
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    k_ok = offs_k < K
    d_ok = offs_d < D
    q_t = (
        tl.load(
            q_ptr + s * sq_s + offs_d[:, None] * sq_d + offs_k[None, :] * sq_k,
            mask=d_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        .to(dt)
        .to(ct)
    )  # (BLOCK_D, BLOCK_K)
    acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    mass = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for blk in range(p, n_blocks, P):
        offs_n = blk * BLOCK_N + offs_n0
        n_ok = offs_n < N
        nd_ok = n_ok[:, None] & d_ok[None, :]
        keys = tl.load(k_ptr + s * sk_s + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d, mask=nd_ok, other=0.0).to(ct)
        vals = tl.load(v_ptr + s * sv_s + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d, mask=nd_ok, other=0.0).to(ct)
        logits = tl.dot(keys, q_t, input_precision=PREC)  # (BLOCK_N, BLOCK_K)
        # M = softmax over the open clusters; zero rows for padded tokens (and tokens with no open cluster)
        open_ = n_ok[:, None] & k_ok[None, :]
        if HAS_BLOCKED:
            blocked = tl.load(
                b_ptr + s * sb_s + offs_n[:, None] * sb_n + offs_k[None, :] * sb_k,
                mask=n_ok[:, None] & k_ok[None, :],
                other=0,
            )
            open_ = open_ & (blocked == 0)
        logits = tl.where(open_, logits, float("-inf"))
        top = tl.max(logits, axis=1)
        top = tl.where(top == float("-inf"), 0.0, top)
        e = tl.where(open_, tl.exp(logits - top[:, None]), 0.0)
        total = tl.sum(e, axis=1)
        m = e / tl.where(total > 0, total, 1.0)[:, None]
        acc += tl.dot(tl.trans(m.to(dt).to(ct)), vals, input_precision=PREC)
        mass += tl.sum(m, axis=0)
    row = (s * P + p) * K
    tl.store(sum_ptr + (row + offs_k[:, None]) * D + offs_d[None, :], acc, mask=k_ok[:, None] & d_ok[None, :])
    tl.store(mass_ptr + row + offs_k, mass, mask=k_ok)


def _em_bwd(
    q_ptr, k_ptr, v_ptr, b_ptr, gs_ptr, gm_ptr, gq_ptr, gk_ptr, gv_ptr,
    N, K, D, n_blocks, P,
    sq_s, sq_k, sq_d, sk_s, sk_n, sk_d, sv_s, sv_n, sv_d, sb_s, sb_n, sb_k,
    sgs_s, sgs_k, sgs_d, sgm_s, sgm_k, sgk_s, sgk_n, sgk_d, sgv_s, sgv_n, sgv_d,
    HAS_BLOCKED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    dt = k_ptr.dtype.element_ty
    ct = dt  # the dtype of the tl.dot operands
    if UPCAST:  # the interpreter's tl.dot cannot multiply bf16: operands rounded to dt, multiplied in fp32
        ct = tl.float32
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    k_ok = offs_k < K
    d_ok = offs_d < D
    kd_ok = k_ok[:, None] & d_ok[None, :]
    dk_ok = d_ok[:, None] & k_ok[None, :]
    q_t = tl.load(q_ptr + s * sq_s + offs_d[:, None] * sq_d + offs_k[None, :] * sq_k, mask=dk_ok, other=0.0)
    q_t = q_t.to(dt).to(ct)  # (BLOCK_D, BLOCK_K)
    q = tl.load(q_ptr + s * sq_s + offs_k[:, None] * sq_k + offs_d[None, :] * sq_d, mask=kd_ok, other=0.0)
    q = q.to(dt).to(ct)  # (BLOCK_K, BLOCK_D)
    gs_t = tl.load(gs_ptr + s * sgs_s + offs_d[:, None] * sgs_d + offs_k[None, :] * sgs_k, mask=dk_ok, other=0.0)
    gs_t = gs_t.to(dt).to(ct)
    gs = tl.load(gs_ptr + s * sgs_s + offs_k[:, None] * sgs_k + offs_d[None, :] * sgs_d, mask=kd_ok, other=0.0)
    gs = gs.to(dt).to(ct)
    gm = tl.load(gm_ptr + s * sgm_s + offs_k * sgm_k, mask=k_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    for blk in range(p, n_blocks, P):
        offs_n = blk * BLOCK_N + offs_n0
        n_ok = offs_n < N
        nd_ok = n_ok[:, None] & d_ok[None, :]
        keys = tl.load(k_ptr + s * sk_s + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d, mask=nd_ok, other=0.0).to(ct)
        vals = tl.load(v_ptr + s * sv_s + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d, mask=nd_ok, other=0.0).to(ct)
        logits = tl.dot(keys, q_t, input_precision=PREC)
        # M = softmax over the open clusters; zero rows for padded tokens (and tokens with no open cluster)
        open_ = n_ok[:, None] & k_ok[None, :]
        if HAS_BLOCKED:
            blocked = tl.load(
                b_ptr + s * sb_s + offs_n[:, None] * sb_n + offs_k[None, :] * sb_k,
                mask=n_ok[:, None] & k_ok[None, :],
                other=0,
            )
            open_ = open_ & (blocked == 0)
        logits = tl.where(open_, logits, float("-inf"))
        top = tl.max(logits, axis=1)
        top = tl.where(top == float("-inf"), 0.0, top)
        e = tl.where(open_, tl.exp(logits - top[:, None]), 0.0)
        total = tl.sum(e, axis=1)
        m = e / tl.where(total > 0, total, 1.0)[:, None]
        dm = tl.dot(vals, gs_t, input_precision=PREC) + gm[None, :]
        dl = m * (dm - tl.sum(m * dm, axis=1)[:, None])
        dl = dl.to(dt).to(ct)
        gk = tl.dot(dl, q, input_precision=PREC)
        gv = tl.dot(m.to(dt).to(ct), gs, input_precision=PREC)
        tl.store(
            gk_ptr + s * sgk_s + offs_n[:, None] * sgk_n + offs_d[None, :] * sgk_d,
            gk.to(gk_ptr.dtype.element_ty),
            mask=nd_ok,
        )
        tl.store(
            gv_ptr + s * sgv_s + offs_n[:, None] * sgv_n + offs_d[None, :] * sgv_d,
            gv.to(gv_ptr.dtype.element_ty),
            mask=nd_ok,
        )
        acc += tl.dot(tl.trans(dl), keys, input_precision=PREC)
    row = (s * P + p) * K
    tl.store(gq_ptr + (row + offs_k[:, None]) * D + offs_d[None, :], acc, mask=kd_ok)


def _dispatch_fwd(
    uv_ptr, uc_ptr, a_ptr, b_ptr, c_ptr, out_ptr,
    N, K, D, n_blocks, P,
    suv_s, suv_n, suv_d, suc_s, suc_k, suc_d, sc_s, sc_k, sc_d, so_s, so_n, so_d,
    PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    dt = uv_ptr.dtype.element_ty
    ct = dt  # the dtype of the tl.dot operands
    if UPCAST:  # the interpreter's tl.dot cannot multiply bf16: operands rounded to dt, multiplied in fp32
        ct = tl.float32
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    k_ok = offs_k < K
    d_ok = offs_d < D
    kd_ok = k_ok[:, None] & d_ok[None, :]
    dk_ok = d_ok[:, None] & k_ok[None, :]
    alpha = tl.load(a_ptr)
    beta = tl.load(b_ptr)
    uc_t = tl.load(uc_ptr + s * suc_s + offs_d[:, None] * suc_d + offs_k[None, :] * suc_k, mask=dk_ok, other=0.0)
    uc_t = uc_t.to(dt).to(ct)
    c = tl.load(c_ptr + s * sc_s + offs_k[:, None] * sc_k + offs_d[None, :] * sc_d, mask=kd_ok, other=0.0).to(dt).to(ct)
    for blk in range(p, n_blocks, P):
        offs_n = blk * BLOCK_N + offs_n0
        n_ok = offs_n < N
        nd_ok = n_ok[:, None] & d_ok[None, :]
        uv = tl.load(uv_ptr + s * suv_s + offs_n[:, None] * suv_n + offs_d[None, :] * suv_d, mask=nd_ok, other=0.0)
        uv = uv.to(ct)
        cos = tl.dot(uv, uc_t, input_precision=PREC)
        w = tl.where(n_ok[:, None] & k_ok[None, :], 1.0 / (1.0 + tl.exp(-(beta + alpha * cos))), 0.0)
        out = tl.dot(w.to(dt).to(ct), c, input_precision=PREC)
        tl.store(out_ptr + s * so_s + offs_n[:, None] * so_n + offs_d[None, :] * so_d, out, mask=nd_ok)


def _dispatch_bwd(
    uv_ptr, uc_ptr, a_ptr, b_ptr, c_ptr, go_ptr, guv_ptr, guc_ptr, ga_ptr, gb_ptr, gc_ptr,
    N, K, D, n_blocks, P,
    suv_s, suv_n, suv_d, suc_s, suc_k, suc_d, sc_s, sc_k, sc_d, sgo_s, sgo_n, sgo_d,
    sguv_s, sguv_n, sguv_d,
    PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    dt = uv_ptr.dtype.element_ty
    ct = dt  # the dtype of the tl.dot operands
    if UPCAST:  # the interpreter's tl.dot cannot multiply bf16: operands rounded to dt, multiplied in fp32
        ct = tl.float32
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    k_ok = offs_k < K
    d_ok = offs_d < D
    kd_ok = k_ok[:, None] & d_ok[None, :]
    dk_ok = d_ok[:, None] & k_ok[None, :]
    alpha = tl.load(a_ptr)
    beta = tl.load(b_ptr)
    uc_t = tl.load(uc_ptr + s * suc_s + offs_d[:, None] * suc_d + offs_k[None, :] * suc_k, mask=dk_ok, other=0.0)
    uc_t = uc_t.to(dt).to(ct)
    uc = tl.load(uc_ptr + s * suc_s + offs_k[:, None] * suc_k + offs_d[None, :] * suc_d, mask=kd_ok, other=0.0)
    uc = uc.to(dt).to(ct)
    c_t = tl.load(c_ptr + s * sc_s + offs_d[:, None] * sc_d + offs_k[None, :] * sc_k, mask=dk_ok, other=0.0)
    c_t = c_t.to(dt).to(ct)
    acc_uc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    acc_c = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    acc_a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for blk in range(p, n_blocks, P):
        offs_n = blk * BLOCK_N + offs_n0
        n_ok = offs_n < N
        nd_ok = n_ok[:, None] & d_ok[None, :]
        uv = tl.load(uv_ptr + s * suv_s + offs_n[:, None] * suv_n + offs_d[None, :] * suv_d, mask=nd_ok, other=0.0)
        uv = uv.to(ct)
        go = tl.load(go_ptr + s * sgo_s + offs_n[:, None] * sgo_n + offs_d[None, :] * sgo_d, mask=nd_ok, other=0.0)
        go = go.to(dt).to(ct)
        cos = tl.dot(uv, uc_t, input_precision=PREC)
        w = tl.where(n_ok[:, None] & k_ok[None, :], 1.0 / (1.0 + tl.exp(-(beta + alpha * cos))), 0.0)
        dw = tl.dot(go, c_t, input_precision=PREC)
        dz = dw * w * (1.0 - w)  # zero on padded tokens and clusters, where w is
        acc_a += tl.sum(dz * cos, axis=1)
        acc_b += tl.sum(dz, axis=1)
        dz = dz.to(dt).to(ct)
        guv = alpha * tl.dot(dz, uc, input_precision=PREC)
        tl.store(
            guv_ptr + s * sguv_s + offs_n[:, None] * sguv_n + offs_d[None, :] * sguv_d,
            guv.to(guv_ptr.dtype.element_ty),
            mask=nd_ok,
        )
        acc_uc += tl.dot(tl.trans(dz), uv, input_precision=PREC)
        acc_c += tl.dot(tl.trans(w.to(dt).to(ct)), go, input_precision=PREC)
    row = (s * P + p) * K
    tl.store(guc_ptr + (row + offs_k[:, None]) * D + offs_d[None, :], alpha * acc_uc, mask=kd_ok)
    tl.store(gc_ptr + (row + offs_k[:, None]) * D + offs_d[None, :], acc_c, mask=kd_ok)
    tl.store(ga_ptr + s * P + p, tl.sum(acc_a, axis=0))
    tl.store(gb_ptr + s * P + p, tl.sum(acc_b, axis=0))


def _launch(name: str, cfg: dict, s: int, dtype: torch.dtype, *args, **constexprs) -> None:
    interpret = _interpreting()
    kernel = _kernels(interpret)[name]
    grid = (s, cfg["programs"])
    kernel[grid](
        *args,
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"],
        PREC=_precision(dtype),
        UPCAST=interpret and dtype == torch.bfloat16,
        **constexprs,
    )


def _blocked_args(blocked: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    if blocked is None:
        return like, (0, 0, 0)  # never read
    if blocked.dtype != torch.bool:
        blocked = blocked != 0
    blocked = blocked.view(torch.uint8)  # same strides
    return blocked, tuple(blocked.stride())


def em_forward(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, blocked: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One EM step without the assignment matrix.

    ``queries (S, K, d)`` (already scaled: ``logits = keys @ queries^T``), ``keys (S, N, d)``, ``values (S, N, d)``,
    ``blocked (S, N, K)`` bool or None (True: the token may not join the cluster, a ``-inf`` logit).
    ``M = softmax_K(logits)`` is recomputed block by block, never stored. Returns ``summed (S, K, d) = M^T @ values``
    and ``mass (S, K) = M.sum(N)``, both fp32."""
    device = keys.device
    _check(device)
    _same_shapes("queries=SKd keys=SNd values=SNd", queries=queries, keys=keys, values=values)
    if blocked is not None:
        _same_shapes("keys=SNd values=SNd blocked=SNK queries=SKd", queries=queries, keys=keys, values=values,
                     blocked=blocked)  # fmt: skip
    s, k, d = queries.shape
    n = keys.shape[1]
    summed = torch.zeros(s, k, d, device=device, dtype=torch.float32)
    mass = torch.zeros(s, k, device=device, dtype=torch.float32)
    if s == 0 or n == 0 or k == 0 or d == 0:
        return summed, mass
    queries, keys, values = _common(queries, keys, values)
    cfg = _config(s, n, k, d, device)
    programs = cfg["programs"]
    sum_part = torch.empty(s, programs, k, d, device=device, dtype=torch.float32)
    mass_part = torch.empty(s, programs, k, device=device, dtype=torch.float32)
    b, b_strides = _blocked_args(blocked, keys)
    _launch(
        "em_fwd", cfg, s, keys.dtype,
        queries, keys, values, b, sum_part, mass_part,
        n, k, d, cfg["n_blocks"], programs,
        *queries.stride(), *keys.stride(), *values.stride(), *b_strides,
        HAS_BLOCKED=blocked is not None,
    )  # fmt: skip
    return sum_part.sum(1), mass_part.sum(1)


def em_backward(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    blocked: torch.Tensor | None,
    grad_summed: torch.Tensor | None,
    grad_mass: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``<grad_summed, summed> + <grad_mass, mass>`` (``em_forward``'s outputs) with respect to the
    queries, keys and values, recomputing ``M`` block by block::

        dM = values @ grad_summed^T + grad_mass;  dL = M * (dM - sum_K(M * dM))
        grad_keys = dL @ queries;  grad_queries = dL^T @ keys;  grad_values = M @ grad_summed

    ``grad_summed (S, K, d)`` and ``grad_mass (S, K)`` may be None (zero). Returns ``(grad_queries, grad_keys,
    grad_values)`` in the dtypes of ``queries``, ``keys`` and ``values``."""
    device = keys.device
    _check(device)
    _same_shapes("queries=SKd keys=SNd values=SNd", queries=queries, keys=keys, values=values)
    if blocked is not None:
        _same_shapes("keys=SNd values=SNd blocked=SNK queries=SKd", queries=queries, keys=keys, values=values,
                     blocked=blocked)  # fmt: skip
    s, k, d = queries.shape
    n = keys.shape[1]
    out_dtypes = (queries.dtype, keys.dtype, values.dtype)
    if grad_summed is not None and grad_summed.shape != queries.shape:
        raise ValueError(
            f"grad_summed must have the shape of queries {tuple(queries.shape)}, got {tuple(grad_summed.shape)}"
        )
    if grad_mass is not None and grad_mass.shape != queries.shape[:2]:
        raise ValueError(f"grad_mass must have the shape {tuple(queries.shape[:2])}, got {tuple(grad_mass.shape)}")
    if grad_summed is None:
        grad_summed = torch.zeros(s, k, d, device=device, dtype=torch.float32)
    if grad_mass is None:
        grad_mass = torch.zeros(s, k, device=device, dtype=torch.float32)
    if s == 0 or n == 0 or k == 0 or d == 0:
        return (
            torch.zeros_like(queries, dtype=out_dtypes[0]),
            torch.zeros_like(keys, dtype=out_dtypes[1]),
            torch.zeros_like(values, dtype=out_dtypes[2]),
        )
    queries, keys, values = _common(queries, keys, values)
    cfg = _config(s, n, k, d, device)
    programs = cfg["programs"]
    gq_part = torch.empty(s, programs, k, d, device=device, dtype=torch.float32)
    grad_keys = torch.empty(s, n, d, device=device, dtype=out_dtypes[1])
    grad_values = torch.empty(s, n, d, device=device, dtype=out_dtypes[2])
    b, b_strides = _blocked_args(blocked, keys)
    _launch(
        "em_bwd", cfg, s, keys.dtype,
        queries, keys, values, b, grad_summed, grad_mass, gq_part, grad_keys, grad_values,
        n, k, d, cfg["n_blocks"], programs,
        *queries.stride(), *keys.stride(), *values.stride(), *b_strides,
        *grad_summed.stride(), *grad_mass.stride(), *grad_keys.stride(), *grad_values.stride(),
        HAS_BLOCKED=blocked is not None,
    )  # fmt: skip
    return gq_part.sum(1).to(out_dtypes[0]), grad_keys, grad_values


def dispatch_forward(
    unit_values: torch.Tensor,
    unit_centers: torch.Tensor,
    alpha: torch.Tensor | float,
    beta: torch.Tensor | float,
    centers: torch.Tensor,
) -> torch.Tensor:
    """Context Cluster's dispatch without the similarity matrix: ``unit_values (S, N, d)``, ``unit_centers (S, K,
    d)``, ``alpha`` and ``beta`` 0-d or one-element tensors, ``centers (S, K, d)``;
    ``W = sigmoid(beta + alpha * unit_values @ unit_centers^T)`` is recomputed block by block. Returns ``W @
    centers`` ``(S, N, d)`` in fp32."""
    device = unit_values.device
    _check(device)
    _same_shapes("unit_values=SNd unit_centers=SKd centers=SKd", unit_values=unit_values, unit_centers=unit_centers,
                 centers=centers)  # fmt: skip
    s, n, d = unit_values.shape
    k = unit_centers.shape[1]
    out = torch.zeros(s, n, d, device=device, dtype=torch.float32)
    if s == 0 or n == 0 or k == 0 or d == 0:
        return out
    alpha, beta = _scalar(alpha, device), _scalar(beta, device)
    unit_values, unit_centers, centers = _common(unit_values, unit_centers, centers)
    cfg = _config(s, n, k, d, device, reduce=False)
    _launch(
        "dispatch_fwd", cfg, s, unit_values.dtype,
        unit_values, unit_centers, alpha, beta, centers, out,
        n, k, d, cfg["n_blocks"], cfg["programs"],
        *unit_values.stride(), *unit_centers.stride(), *centers.stride(), *out.stride(),
    )  # fmt: skip
    return out


def dispatch_backward(
    unit_values: torch.Tensor,
    unit_centers: torch.Tensor,
    alpha: torch.Tensor | float,
    beta: torch.Tensor | float,
    centers: torch.Tensor,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``<grad_out, dispatch_forward(...)>``, recomputing ``W`` block by block::

        dW = grad_out @ centers^T;  dZ = dW * W * (1 - W)
        grad_unit_values = alpha * dZ @ unit_centers;  grad_unit_centers = alpha * dZ^T @ unit_values
        grad_alpha = sum(dZ * cos);  grad_beta = sum(dZ);  grad_centers = W^T @ grad_out

    with ``cos = unit_values @ unit_centers^T``. Returns ``(grad_unit_values, grad_unit_centers, grad_alpha,
    grad_beta, grad_centers)``, each in the shape and dtype of its input (fp32 for a Python-number alpha / beta)."""
    device = unit_values.device
    _check(device)
    _same_shapes("unit_values=SNd unit_centers=SKd centers=SKd", unit_values=unit_values, unit_centers=unit_centers,
                 centers=centers)  # fmt: skip
    s, n, d = unit_values.shape
    k = unit_centers.shape[1]
    alpha_like = alpha if torch.is_tensor(alpha) else torch.tensor(float(alpha))
    beta_like = beta if torch.is_tensor(beta) else torch.tensor(float(beta))
    out_dtypes = (unit_values.dtype, unit_centers.dtype, centers.dtype)
    alpha32, beta32 = _scalar(alpha, device), _scalar(beta, device)
    if grad_out.shape != unit_values.shape:
        raise ValueError(
            f"grad_out must have the shape of unit_values {tuple(unit_values.shape)}, got {tuple(grad_out.shape)}"
        )
    grad_alpha = torch.zeros(s, 1, device=device, dtype=torch.float32)
    grad_beta = torch.zeros(s, 1, device=device, dtype=torch.float32)
    if s == 0 or n == 0 or k == 0 or d == 0:
        guc = torch.zeros(s, k, d, device=device, dtype=torch.float32)
        gc = torch.zeros(s, k, d, device=device, dtype=torch.float32)
        guv = torch.zeros(s, n, d, device=device, dtype=out_dtypes[0])
    else:
        unit_values, unit_centers, centers = _common(unit_values, unit_centers, centers)
        cfg = _config(s, n, k, d, device)
        programs = cfg["programs"]
        guv = torch.empty(s, n, d, device=device, dtype=out_dtypes[0])
        guc = torch.empty(s, programs, k, d, device=device, dtype=torch.float32)
        gc = torch.empty(s, programs, k, d, device=device, dtype=torch.float32)
        grad_alpha = torch.empty(s, programs, device=device, dtype=torch.float32)
        grad_beta = torch.empty(s, programs, device=device, dtype=torch.float32)
        _launch(
            "dispatch_bwd", cfg, s, unit_values.dtype,
            unit_values, unit_centers, alpha32, beta32, centers, grad_out, guv, guc, grad_alpha, grad_beta, gc,
            n, k, d, cfg["n_blocks"], programs,
            *unit_values.stride(), *unit_centers.stride(), *centers.stride(), *grad_out.stride(), *guv.stride(),
        )  # fmt: skip
        guc, gc = guc.sum(1), gc.sum(1)
    return (
        guv,
        guc.to(out_dtypes[1]),
        grad_alpha.sum().reshape(alpha_like.shape).to(alpha_like.dtype),
        grad_beta.sum().reshape(beta_like.shape).to(beta_like.dtype),
        gc.to(out_dtypes[2]),
    )
