"""The fused clustering operator on its own: one E/M step and one dispatching at the sizes of ClusterFormer-T's first
stage (batch B, 3 heads, 56x56 tokens, 100 clusters, head width 32), forward + backward, three ways:

* ``unfused``: the products the model runs without the operator (an ``(S, N, K)`` tensor written and kept);
* ``torch``: the fused operator's PyTorch blocks (``CLUSTERFORMER_FUSED_BACKEND=torch``);
* ``triton``: its Triton kernels (CUDA only).

Each is checked against the unfused numbers (largest error relative to the largest value) and timed; on CUDA also the
peak memory above the inputs. Writes a JSON report::

    python benchmarks/fused_operator.py --device cuda --batch 64 --json fused_operator.json
    python benchmarks/fused_operator.py --device cpu --batch 8       # the PyTorch blocks on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from clusterformer.layers import fused


def unfused_em(queries, keys, values):
    m = torch.bmm(keys, queries.transpose(1, 2)).softmax(-1)
    return torch.bmm(m.transpose(1, 2), values), m.sum(1)


def unfused_dispatch(unit_values, unit_centers, alpha, beta, centers):
    weights = torch.baddbmm(beta, unit_values, unit_centers.transpose(1, 2) * alpha).sigmoid()
    return torch.bmm(weights, centers)


def inputs(s, n, k, d, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def make(*shape, unit=False):
        t = torch.randn(*shape, generator=g)
        if unit:
            t = torch.nn.functional.normalize(t, dim=-1)
        return t.to(device=device, dtype=dtype).requires_grad_()

    em = (make(s, k, d), make(s, n, d), make(s, n, d))
    disp = (make(s, n, d, unit=True), make(s, k, d, unit=True), make(1), make(1), make(s, k, d))
    return em, disp


def run(fn, args):
    for a in args:
        a.grad = None
    out = fn(*args)
    out = out if isinstance(out, tuple) else (out,)
    loss = sum((o.float() * torch.linspace(-1, 1, o.shape[-1], device=o.device)).sum() for o in out)
    loss.backward()
    return [o.detach().float() for o in out], [a.grad.float() for a in args]


def rel_error(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def timed(fn, args, device, iters, warmup):
    for _ in range(warmup):
        run(fn, args)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run(fn, args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_mib(fn, args, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run(fn, args)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=56 * 56)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    s, n, k, d = args.batch * args.heads, args.tokens, args.clusters, args.head_dim
    backends = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "shape": {"slices": s, "tokens": n, "clusters": k, "head_dim": d},
        "rows": [],
    }
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        em_args, disp_args = inputs(s, n, k, d, device, dtype)
        for op, plain, fused_fn, op_args in (
            ("em_step", unfused_em, fused.em_step, em_args),
            ("dispatch", unfused_dispatch, fused.dispatch, disp_args),
        ):
            ref_out, ref_grads = run(plain, op_args)
            row = {"op": op, "dtype": dtype_name, "path": "unfused"}
            row["seconds"] = timed(plain, op_args, device, args.iters, args.warmup)
            row["peak_mib"] = peak_mib(plain, op_args, device)
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            for backend in backends:
                os.environ["CLUSTERFORMER_FUSED_BACKEND"] = backend
                out, grads = run(fused_fn, op_args)
                row = {"op": op, "dtype": dtype_name, "path": backend}
                row["max_rel_error_out"] = max(rel_error(a, b) for a, b in zip(out, ref_out, strict=True))
                row["max_rel_error_grad"] = max(rel_error(a, b) for a, b in zip(grads, ref_grads, strict=True))
                row["seconds"] = timed(fused_fn, op_args, device, args.iters, args.warmup)
                row["peak_mib"] = peak_mib(fused_fn, op_args, device)
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
            os.environ.pop("CLUSTERFORMER_FUSED_BACKEND", None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
