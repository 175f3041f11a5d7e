"""Where ClusterFormer-T's GPU time goes with the fused operator: torch.profiler over one bf16 inference pass and one
training step (batch 64, 224x224), the 15 most expensive kernels and the number of kernel launches.

    python benchmarks/fused_gpu_profile.py > profile.txt
"""

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import clusterformer  # noqa: F401


def profile_model(name: str) -> None:
    model = timm.create_model(name).cuda()
    x = torch.randn(64, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (64,), device="cuda")
    opt = torch.optim.AdamW(model.parameters())

    def train():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def infer():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)

    for mode, fn in (("infer", infer), ("train", train)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = [e for e in events if e.device_time_total > 0 and e.device_type.name == "CUDA"]
        print(
            f"== {name} {mode}: {sum(e.count for e in kernels)} kernel launches, "
            f"GPU time {sum(e.self_device_time_total for e in kernels) / 1e3:.1f} ms, "
            f"CPU time {sum(e.self_cpu_time_total for e in events) / 1e3:.1f} ms"
        )
        print(events.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    for name in ("clusterformer_tiny", "swin_tiny_patch4_window7_224"):
        profile_model(name)
