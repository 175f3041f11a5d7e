"""What one training forward pass keeps for the backward pass: the storages that autograd's saved-tensor hooks receive
(each storage once), summed, for ClusterFormer-T and Swin-T at batch 8, 224x224, in fp32 and under bf16 autocast;
and the peak of the bytes held by live tensors during one fp32 training step (forward, backward, AdamW; after a
first step, from the profiler's allocation events), above what was held before the step.

These are the parts of the training memory that the model's code decides; the benchmark command's peak (the
process's resident memory) adds the allocator's own behaviour and varies by a few percent from run to run.

    python benchmarks/saved_for_backward.py                      # ClusterFormer-T and Swin-T
    python benchmarks/saved_for_backward.py --models clusterformer_tiny --batch-size 2
"""

from __future__ import annotations

import argparse

import timm
import torch

import clusterformer  # noqa: F401  (registers the models)


def saved_mib(model: torch.nn.Module, x: torch.Tensor, autocast: bool) -> float:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(x)
    return sum(storages.values()) / 2**20


def step_peak_mib(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Peak growth of the bytes held by live tensors during one training step, after a first one."""
    from torch.profiler import ProfilerActivity, profile

    y = torch.zeros(x.shape[0], dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters())

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # the gradients and AdamW's state exist from here on
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.profiler.kineto_results.events()
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in changes:
        held += nbytes
        peak = max(peak, held)
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["clusterformer_tiny", "swin_tiny_patch4_window7_224"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    print(f"batch {args.batch_size}, {args.img_size}x{args.img_size}, MiB: kept for the backward pass (fp32, bf16 "
          "autocast), peak of live tensors during an fp32 training step")  # fmt: skip
    for name in args.models:
        model = timm.create_model(name)
        fp32, bf16 = saved_mib(model, x, False), saved_mib(model, x, True)
        peak = step_peak_mib(model, x)
        print(f"  {name:32s} kept fp32 {fp32:7.1f}   kept bf16 {bf16:7.1f}   step peak {peak:7.1f}", flush=True)


if __name__ == "__main__":
    main()
