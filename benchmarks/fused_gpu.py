"""The fused clustering operator on a GPU, in one process and a fixed time budget: ClusterFormer-T with the fused
operator (its Triton kernels), ClusterFormer-T without it (the unfused products) and timm's Swin-T, interleaved.

1. the operator alone (``benchmarks/fused_operator.py`` at the first stage's sizes): errors and times;
2. the model: logits and gradients of the fused model against the unfused one (fp32), and under bf16 autocast;
3. inference and training step (forward, cross-entropy, backward, AdamW) of the three models under bf16 autocast,
   batch 64, 224x224, images/s (median of interleaved rounds) and peak memory above the model's;
4. ``torch._dynamo.explain`` of the fused encoder (graph breaks), and ``torch.compile`` inference when time is left.

    python benchmarks/fused_gpu.py --json fused_gpu.json --budget 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch

import clusterformer  # noqa: F401  (registers the models)
from clusterformer.commands.benchmark import workload
from clusterformer.layers import set_fused

MODELS = ("clusterformer_tiny", "clusterformer_tiny@unfused", "swin_tiny_patch4_window7_224")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_iters(run, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return times


def parity(device) -> dict:
    torch.manual_seed(0)
    model = timm.create_model("clusterformer_tiny", num_classes=1000).to(device)
    x = torch.randn(4, 3, 224, 224, device=device)
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        outs = []
        for fused in (True, False):
            set_fused(model, fused)
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = model(x)
            out.float().square().mean().backward()
            grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
            outs.append((out.detach().float(), grads))
        (o_f, g_f), (o_u, g_u) = outs
        name = str(dtype).split(".")[-1]
        result[name] = {
            "logits_max_rel_error": float((o_f - o_u).abs().max() / o_u.abs().max()),
            "grads_max_rel_error": float((g_f - g_u).abs().max() / g_u.abs().max()),
        }
        print("parity", name, result[name], flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--budget", type=float, default=200, help="seconds; later parts are skipped past it")
    parser.add_argument("--json", default="fused_gpu.json")
    parser.add_argument("--only-throughput", action="store_true", help="part 3 alone")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script (no memory figures)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    report = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "batch": args.batch,
        "img_size": 224,
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None

    def save():
        report["seconds"] = time.perf_counter() - start
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)

    # 1. the operator alone
    from fused_operator import main as operator_main

    if not args.only_throughput:
        report["operator"] = operator_main(["--device", args.device, "--batch", str(args.batch), "--iters", "5"])
        save()
        # 2. parity of the whole model
        report["parity"] = parity(device)
        save()
    # 3. throughput and memory, bf16 autocast, interleaved
    times = {(m, mode): [] for m in MODELS for mode in ("infer", "train")}
    peaks = {}
    for r in range(args.rounds):
        for mode in ("infer", "train"):
            for name in MODELS:
                # the benchmark command's workload: the model, random images and labels, AdamW for a training step
                run = workload(name, mode, args.batch, 224, device.type, amp=True)
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device) if cuda else 0
                for _ in range(2 if r else 3):
                    run()
                times[(name, mode)] += time_iters(run, args.iters)
                peaks[(name, mode)] = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else None
                del run
                if cuda:
                    torch.cuda.empty_cache()
        rows = []
        for name in MODELS:
            row = {"model": name}
            for mode in ("infer", "train"):
                row[f"{mode}_img_s"] = args.batch / statistics.median(times[(name, mode)])
                row[f"{mode}_best_img_s"] = args.batch / min(times[(name, mode)])
                row[f"{mode}_peak_mib"] = peaks[(name, mode)]
            rows.append(row)
        report["throughput_bf16"] = {"rounds": r + 1, "iters_per_round": args.iters, "rows": rows}
        print(json.dumps(rows), flush=True)
        save()
        if time.perf_counter() - start > args.budget * 0.7:
            break
    if args.only_throughput:
        return
    # 4. graph breaks, then torch.compile inference if time is left
    torch.manual_seed(0)
    model = timm.create_model("clusterformer_tiny").to(device).eval()
    x = torch.randn(min(args.batch, 8), 3, 224, 224, device=device)
    try:
        explanation = torch._dynamo.explain(model.forward_features)(x)
        report["dynamo"] = {
            "graph_breaks": explanation.graph_break_count,
            "graphs": explanation.graph_count,
            "reasons": [str(b.reason)[:300] for b in explanation.break_reasons][:10],
        }
    except Exception as error:  # recorded, not hidden
        report["dynamo"] = {"error": repr(error)[:500]}
    print("dynamo", report["dynamo"], flush=True)
    save()
    torch._dynamo.reset()
    if time.perf_counter() - start < args.budget * 0.6:
        t0 = time.perf_counter()
        try:
            eager_run = workload("clusterformer_tiny", "infer", args.batch, 224, device.type, amp=True)
            compiled_run = workload("clusterformer_tiny@compile", "infer", args.batch, 224, device.type, amp=True)
            compiled_run()
            report["compile"] = {"compile_seconds": time.perf_counter() - t0}
            for _ in range(2):
                eager_run()
                compiled_run()
            eager = statistics.median(time_iters(eager_run, 10))
            comp = statistics.median(time_iters(compiled_run, 10))
            report["compile"].update(eager_img_s=args.batch / eager, compiled_img_s=args.batch / comp)
        except Exception as error:
            report["compile"] = {"error": repr(error)[:500], "seconds": time.perf_counter() - t0}
        print("compile", report["compile"], flush=True)
    save()


if __name__ == "__main__":
    main()
