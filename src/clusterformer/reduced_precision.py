"""bf16 on the CPU: whether the processor computes it natively, and what it costs a classifier in accuracy.

* :func:`bf16_support` reads the CPU's flags (``/proc/cpuinfo``): AMX (``amx_bf16``, with ``amx_tile``) and
  AVX512-BF16 (``avx512_bf16``) run bf16 matrix products in hardware, and oneDNN uses them under
  ``torch.autocast("cpu", dtype=torch.bfloat16)``; without either, bf16 is emulated (converted to and from
  float32 around each product) and autocast is usually slower than float32. ``clusterformer benchmark`` prints
  :func:`cpu_line` and records the support in its JSON.
* :func:`compare_precision` runs a classification checkpoint over an ImageFolder validation set in float32 and
  under bf16 (or fp16) autocast, and reports both top-1 accuracies, how often the two agree and the largest
  difference of their logits (``clusterformer benchmark --accuracy CKPT``; ``docs/benchmarks.md``, "bf16 on
  the CPU").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
REDUCED = {"bf16": torch.bfloat16, "fp16": torch.float16}
# what the CPU's flags say about bf16: (kind, the flags that show it, the text of the benchmark's CPU line)
_KINDS = (
    ("amx", ("amx_bf16", "amx_tile"), "AMX (amx_bf16)"),
    ("avx512_bf16", ("avx512_bf16",), "AVX512-BF16 (avx512_bf16)"),
    ("arm_bf16", ("bf16",), "Arm BF16 (bf16)"),
)
NONE_TEXT = "none (bf16 is emulated, expect it slower than fp32)"


@dataclass(frozen=True)
class Bf16Support:
    """``kind``: ``"amx"``, ``"avx512_bf16"``, ``"arm_bf16"``, ``"none"`` or ``"unknown"`` (no ``/proc/cpuinfo``);
    ``flags``: the CPU flags found of ``amx_bf16``, ``amx_tile``, ``avx512_bf16`` (and Arm's ``bf16``);
    ``cpu``: the model name."""

    kind: str
    flags: tuple[str, ...]
    cpu: str

    @property
    def fast(self) -> bool:
        """Whether bf16 matrix products run in hardware."""
        return self.kind not in ("none", "unknown")

    @property
    def text(self) -> str:
        """``"AMX (amx_bf16)"``, ``"AVX512-BF16 (avx512_bf16)"``, ... or :data:`NONE_TEXT`."""
        if self.kind == "unknown":
            return "unknown (no /proc/cpuinfo to read the CPU's flags)"
        return next((text for kind, _, text in _KINDS if kind == self.kind), NONE_TEXT)

    def as_dict(self) -> dict:
        return {**asdict(self), "flags": list(self.flags), "fast": self.fast, "text": self.text}


def _read_cpuinfo() -> str | None:
    try:
        return CPUINFO.read_text()
    except OSError:
        return None


def bf16_support(cpuinfo: str | None = None) -> Bf16Support:
    """The bf16 support of this CPU (or of the ``/proc/cpuinfo`` text ``cpuinfo``), from its first processor's
    ``flags`` (x86) or ``Features`` (Arm) line: AMX when it has ``amx_bf16`` and ``amx_tile``, else AVX512-BF16
    when it has ``avx512_bf16``, else Arm's BF16 extension (``bf16``), else none."""
    import platform

    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    if text is None:
        return Bf16Support("unknown", (), platform.processor() or platform.machine())
    flags: set[str] = set()
    cpu = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key in ("model name", "cpu model") and not cpu:
            cpu = value.strip()
    cpu = cpu or platform.processor() or platform.machine()
    wanted = ("amx_bf16", "amx_tile", "avx512_bf16", "bf16")
    found = tuple(flag for flag in wanted if flag in flags)
    for kind, needed, _ in _KINDS:
        if all(flag in flags for flag in needed):
            return Bf16Support(kind, found, cpu)
    return Bf16Support("none", found, cpu)


def cpu_line(support: Bf16Support | None = None) -> str:
    """``"CPU: <model name>; bf16 fast path: AMX (amx_bf16)"`` (or ``AVX512-BF16``, or none: emulated)."""
    support = support or bf16_support()
    return f"CPU: {support.cpu}; bf16 fast path: {support.text}"


# --- accuracy of a classifier in reduced precision ------------------------------------------------------------------
def _labels_of(dataset, classes: list[str], folder: Path) -> list[int]:
    """The checkpoint's label of every folder class: by name when the folder's classes are the checkpoint's
    (in any order), else in the folder's order when there are as many."""
    if sorted(dataset.classes) == sorted(classes):
        return [classes.index(name) for name in dataset.classes]
    if len(dataset.classes) == len(classes):
        return list(range(len(classes)))
    raise ValueError(
        f"{folder}: {len(dataset.classes)} class folders ({', '.join(dataset.classes[:5])}), but the checkpoint "
        f"has {len(classes)} classes ({', '.join(classes[:5])})"
    )


def validation_folder(data: dict, folder: str | Path | None = None) -> Path:
    """``folder``, else the validation folder of the checkpoint's data settings (``root``/``val_dir``)."""
    if folder is not None:
        return Path(folder)
    if not data.get("root"):
        raise ValueError("the checkpoint records no data folder; pass the validation folder (--data DIR)")
    return Path(data["root"]) / (data.get("val_dir") or "val")


def compare_precision(
    checkpoint: str | Path,
    folder: str | Path | None = None,
    precision: str = "bf16",
    device: str = "cpu",
    batch_size: int = 64,
    limit: int | None = None,
    progress: bool = False,
) -> dict:
    """Top-1 of a classification ``checkpoint`` on ``folder`` (one sub-folder per class; default: the validation
    folder it was trained with) in float32 and under ``precision`` (``"bf16"`` or ``"fp16"``) autocast on
    ``device``, the same images through the checkpoint's test transform; ``limit``: the first images only.

    Returns ``checkpoint``, ``folder``, ``images``, ``device``, ``precision``, ``top1`` (``{"fp32": ..,
    precision: ..}``, fractions), ``top1_difference`` (reduced minus fp32), ``agreement`` (the fraction of
    images whose top class is the same in both), ``max_abs_logit_diff``, ``mean_abs_logit_diff``,
    ``max_abs_logit`` (the largest fp32 logit, for scale) and ``cpu_bf16`` (:func:`bf16_support`, on the CPU)."""
    from torch.utils.data import DataLoader, Subset

    from .data.folder import CheckedImageFolder
    from .predictor import eval_transform
    from .progress import terminal_bar
    from .weights import load_task_model

    if precision not in REDUCED:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(REDUCED)} (compared with fp32)")
    model = load_task_model("classification", checkpoint)
    folder = validation_folder(model.data, folder)
    dataset = CheckedImageFolder(folder, eval_transform(model))
    labels_of = torch.tensor(_labels_of(dataset, model.classes, folder))
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    network = model.module.model.to(device).eval()
    logits = {"fp32": [], precision: []}
    targets = []
    bar = terminal_bar(len(dataset), f"fp32 and {precision}", enabled=progress)
    with torch.inference_mode():
        for images, labels in DataLoader(dataset, batch_size=batch_size):
            images = images.to(device)
            logits["fp32"].append(network(images).float().cpu())
            with torch.autocast(torch.device(device).type, dtype=REDUCED[precision]):
                logits[precision].append(network(images).float().cpu())
            targets.append(labels_of[labels])
            bar.update(len(labels))
    bar.close()
    targets = torch.cat(targets)
    full, reduced = torch.cat(logits["fp32"]), torch.cat(logits[precision])
    top1 = {name: (torch.cat(values).argmax(-1) == targets).float().mean().item() for name, values in logits.items()}
    difference = (reduced - full).abs()
    return dict(
        checkpoint=str(checkpoint),
        folder=str(folder),
        images=len(targets),
        device=device,
        precision=precision,
        top1=top1,
        top1_difference=top1[precision] - top1["fp32"],
        agreement=(reduced.argmax(-1) == full.argmax(-1)).float().mean().item(),
        max_abs_logit_diff=difference.max().item(),
        mean_abs_logit_diff=difference.mean().item(),
        max_abs_logit=full.abs().max().item(),
        cpu_bf16=bf16_support().as_dict() if torch.device(device).type == "cpu" else None,
        torch=torch.__version__,
    )


def precision_table(report: dict) -> str:
    """:func:`compare_precision`'s report as a markdown table, with the CPU line on a CPU."""
    reduced = report["precision"]
    lines = []
    if report.get("cpu_bf16"):
        lines += [f"CPU: {report['cpu_bf16']['cpu']}; bf16 fast path: {report['cpu_bf16']['text']}", ""]
    lines += [
        f"{report['checkpoint']} on {report['folder']} ({report['images']} images, {report['device']}, "
        f"torch {report['torch']})",
        "",
        "| precision | top-1 (%) | vs fp32 (points) | same top class as fp32 (%) | max abs logit diff | "
        "mean abs logit diff |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| fp32 | {100 * report['top1']['fp32']:.2f} | — | — | — | — |",
        f"| {reduced} autocast | {100 * report['top1'][reduced]:.2f} | {100 * report['top1_difference']:+.2f} | "
        f"{100 * report['agreement']:.2f} | {report['max_abs_logit_diff']:.4f} | {report['mean_abs_logit_diff']:.4f} |",
        "",
        f"(largest fp32 logit magnitude: {report['max_abs_logit']:.2f})",
    ]
    return "\n".join(lines)
