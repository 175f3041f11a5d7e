"""What one training forward pass keeps for the backward pass: the storages that autograd's saved-tensor hooks receive
(each storage once), summed, for ClusterFormer-T and Swin-T at batch 8, 224x224, in fp32 and under bf16 autocast.
This is the part of the training memory that the model's code decides; the benchmark command's peak (resident
memory) adds the parameters, the gradients, AdamW's state and the allocator's own behaviour.

    python benchmarks/saved_for_backward.py                      # ClusterFormer-T and Swin-T, fp32 and bf16 autocast
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["clusterformer_tiny", "swin_tiny_patch4_window7_224"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    print(f"kept for the backward pass, batch {args.batch_size}, {args.img_size}x{args.img_size} (MiB)")
    for name in args.models:
        model = timm.create_model(name)
        fp32, bf16 = saved_mib(model, x, False), saved_mib(model, x, True)
        print(f"  {name:32s} fp32 {fp32:7.1f}   bf16 autocast {bf16:7.1f}", flush=True)


if __name__ == "__main__":
    main()
