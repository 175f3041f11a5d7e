"""Ways to compute the EM E-step's key normalisation (the QK-norm of the keys, a LayerNorm over each head's 32
channels) at ClusterFormer-T's sizes, timed side by side: the GPU profile of the fused model
(benchmarks/gpu_h200_fused_profile_2026-11-30.txt) puts 10.6 of its 25.3 ms of bf16 inference in ``layer_norm``,
against 2.5 ms for Swin-T's norms, and the 12 key norms (one per block, ``B * heads * N`` rows of 32 values) are
the calls that Swin-T does not have.

Each way takes the key projection's output ``(B, N, heads * d)`` and returns the normalised keys in the slice
layout ``(B * heads, N, d)`` (the head split is part of every way, since one of them normalises before it):

* ``split_then_layer_norm``: what RecurrentClustering does today, ``F.layer_norm`` on the slices;
* ``layer_norm_then_split``: ``F.layer_norm`` on the contiguous ``(B, N, heads, d)`` view, then the split;
* ``group_norm``: ``F.group_norm`` on ``(B * N, heads * d)`` with one group per head (gains repeated per head);
* ``moments``: mean and variance as reductions over the last axis, then one multiply-add;
* ``compiled``: ``split_then_layer_norm`` through ``torch.compile`` (one generated kernel).

For each stage of ClusterFormer-T at 224x224 (N = 3136, 784, 196, 49; heads 3, 6, 12, 24) it prints the median time
of a forward pass (inference mode) and of a forward + backward, both under the model's autocast, the total over the
twelve blocks, and each way's largest difference from ``split_then_layer_norm``; ``--json`` writes them.

    python benchmarks/key_norm_gpu.py --json benchmarks/gpu_<device>_key_norm_<date>.json   # a minute on a GPU
    python benchmarks/key_norm_gpu.py --device cpu --batch-size 2 --iters 3                  # a check of the script
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

STAGES = [(3136, 3, 2), (784, 6, 2), (196, 12, 6), (49, 24, 2)]  # tokens, heads, blocks of ClusterFormer-T at 224
HEAD_DIM = 32


def split(k: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = k.shape
    return k.view(b, n, heads, HEAD_DIM).transpose(1, 2).reshape(b * heads, n, HEAD_DIM)


def split_then_layer_norm(k, heads, gain, shift):
    return F.layer_norm(split(k, heads), (HEAD_DIM,), gain, shift)


def layer_norm_then_split(k, heads, gain, shift):
    b, n, _ = k.shape
    normed = F.layer_norm(k.view(b, n, heads, HEAD_DIM), (HEAD_DIM,), gain, shift)
    return normed.transpose(1, 2).reshape(b * heads, n, HEAD_DIM)


def group_norm(k, heads, gain, shift):
    b, n, c = k.shape
    normed = F.group_norm(k.reshape(b * n, c), heads, gain.repeat(heads), shift.repeat(heads))
    return split(normed.view(b, n, c), heads)


def moments(k, heads, gain, shift, eps: float = 1e-5):
    x = split(k, heads).float()
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    return (x - mean) * torch.rsqrt(var + eps) * gain + shift


WAYS = {
    "split_then_layer_norm": split_then_layer_norm,
    "layer_norm_then_split": layer_norm_then_split,
    "group_norm": group_norm,
    "moments": moments,
}


def timed(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs after ``warmup``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile way")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    ways = dict(WAYS)
    if not args.no_compile:
        ways["compiled"] = torch.compile(split_then_layer_norm, dynamic=False)
    torch.manual_seed(0)
    gain = (1 + 0.1 * torch.randn(HEAD_DIM, device=device)).requires_grad_()
    shift = (0.1 * torch.randn(HEAD_DIM, device=device)).requires_grad_()
    rows, totals = [], {name: {"infer_ms": 0.0, "train_ms": 0.0} for name in ways}
    for n, heads, blocks in STAGES:
        # the key projection's output as the model has it under autocast
        k = torch.randn(args.batch_size, n, heads * HEAD_DIM, device=device).to(dtype).requires_grad_()
        grad = torch.randn(args.batch_size * heads, n, HEAD_DIM, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            reference = split_then_layer_norm(k, heads, gain, shift).float()
        for name, way in ways.items():

            def infer(way=way, k=k, heads=heads):
                with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    return way(k, heads, gain, shift)

            def train(way=way, k=k, heads=heads, grad=grad):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    out = way(k, heads, gain, shift)
                out.backward(grad.to(out.dtype))

            diff = (infer().float() - reference).abs().max().item()
            infer_ms, train_ms = timed(infer, device, args.iters, args.warmup), timed(train, device, args.iters, 2)
            totals[name]["infer_ms"] += blocks * infer_ms
            totals[name]["train_ms"] += blocks * train_ms
            rows.append({"way": name, "tokens": n, "heads": heads, "blocks": blocks, "infer_ms": infer_ms,
                         "train_ms": train_ms, "max_abs_diff": diff})  # fmt: skip
            print(f"N={n:5d} heads={heads:2d} {name:22s} infer {infer_ms:8.3f} ms  train {train_ms:8.3f} ms  "
                  f"max |diff| {diff:.2e}", flush=True)  # fmt: skip
    print(f"\nover the 12 blocks, batch {args.batch_size}, {precision}:")
    for name, total in totals.items():
        print(f"  {name:22s} infer {total['infer_ms']:8.3f} ms  train {total['train_ms']:8.3f} ms")
    if args.json:
        machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        with open(args.json, "w") as file:
            json.dump({"device": machine, "torch": torch.__version__, "batch_size": args.batch_size,
                       "precision": precision, "rows": rows, "totals": totals}, file, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
