"""Throughput, compute and memory of ClusterFormer next to its peers, measured in one run.

Every measurement (one model, inference or training) runs in a fresh child process so that its
peak memory is its own, and the models are interleaved round by round so that drift of a shared
machine affects all of them alike. Speed ratios are taken against the peer of the same run.

Model names (``build``):

* timm classification models, ClusterFormer's included (``clusterformer_tiny``, ``swin_tiny_patch4_window7_224``);
* ClusterFormer dense models ``clusterformer_{nano,tiny,small}_{detection,instance,panoptic}``
  (``heads.sets.build_set_model``, COCO class counts, 100 queries);
* the clustering decoders ClusterFormer builds on, on the same panoptic model (``docs/heads.md``):
  ``{kmax,cmt,hcformer}_{nano,tiny,small}_panoptic``, the ClusterFormer backbone with the decoder settings of
  ``configs/panoptic/{kmax,cmt,hcformer}_tiny_coco_panoptic.yaml`` (their papers' query and layer counts), 133
  classes; their peer is ``clusterformer_{size}_panoptic``; ``--models seeds`` names the four ClusterFormer-T
  decoders and Mask2Former (:data:`SEED_MODELS`);
* their peers from the ``transformers`` package, random weights, nothing downloaded:
  ``mask2former_swin_{tiny,small}`` (80 classes; ``_panoptic`` appended: 133) and ``detr_swin_{tiny,small}``.

``NAME@unfused``: a ClusterFormer model without the fused clustering operator (``layers.set_fused(model, False)``:
the same weights and numbers, the unfused products), inference and training step; its peer is ``NAME``.

Runtimes: ``NAME@compile`` (``torch.compile``, inductor) and ``NAME@onnxruntime`` (the model exported to ONNX
by ``clusterformer.commands.export``, run by onnxruntime's CPU provider with as many threads as torch) measure the same
network's inference; their peer is ``NAME`` in PyTorch eager mode (``clusterformer benchmark --onnx``).

Dense models and runtime variants are measured for inference only.

Precision: ``--precision fp32`` (the default on the CPU) or ``bf16`` (``torch.autocast`` with bfloat16 around the
inference pass and the training step's forward; the default on CUDA). On the CPU the report records whether the
processor computes bf16 natively (AMX, AVX512-BF16: ``reduced_precision.bf16_support``); ``--accuracy CKPT``
measures what bf16 costs a classification checkpoint in top-1 instead of timing anything.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..data.images import ImageSize, image_hw
from ..layers import set_fused

DEFAULT_MODELS = (
    "clusterformer_tiny",
    "swin_tiny_patch4_window7_224",
    "clusterformer_small",
    "swin_small_patch4_window7_224",
)
DENSE_TASKS = ("detection", "instance", "panoptic")
# the default dense set (batch 1, both sizes): every ClusterFormer-T task model and its transformers peer
DENSE_MODELS = (
    "clusterformer_tiny_detection",
    "detr_swin_tiny",
    "clusterformer_tiny_instance",
    "mask2former_swin_tiny",
    "clusterformer_tiny_panoptic",
)
DENSE_SIZES = ((512, 512), (800, 1216))
# the clustering decoders ClusterFormer builds on (kMaX-DeepLab, CMT-DeepLab, HCFormer), each the panoptic model with
# the decoder of its COCO config (``_seed_decoder``)
SEED_SYSTEMS = ("kmax", "cmt", "hcformer")
# ``--models seeds``: the four clustering decoders on ClusterFormer-T, panoptic, and Mask2Former Swin-T (133 classes)
SEED_MODELS = (
    "clusterformer_tiny_panoptic",
    *(f"{system}_tiny_panoptic" for system in SEED_SYSTEMS),
    "mask2former_swin_tiny_panoptic",
)
MODEL_SETS = {"seeds": SEED_MODELS}
# detection -> DETR, instance and panoptic -> Mask2Former (one Mask2Former measured for both: the
# 133-class peer differs from the 80-class one only by 53 rows of its class layer)
PEERS = {
    "clusterformer_nano": "swin_tiny_patch4_window7_224",
    "clusterformer_tiny": "swin_tiny_patch4_window7_224",
    "clusterformer_small": "swin_small_patch4_window7_224",
    **{
        f"clusterformer_{size}_{task}": f"{'detr' if task == 'detection' else 'mask2former'}_swin_{peer_size}"
        for size, peer_size in (("nano", "tiny"), ("tiny", "tiny"), ("small", "small"))
        for task in DENSE_TASKS
    },
    # a seed decoder against ClusterFormer's own decoder on the same backbone
    **{
        f"{system}_{size}_panoptic": f"clusterformer_{size}_panoptic"
        for system in SEED_SYSTEMS
        for size in ("nano", "tiny", "small")
    },
}
BENCH_EXTRA = "pip install clusterformer[bench]"
COCO_CLASSES = {"detection": 80, "instance": 80, "panoptic": 133}

_CLUSTERFORMER_DENSE = re.compile(r"(clusterformer_(?:nano|tiny|small))_(detection|instance|panoptic)")
_SEED_DENSE = re.compile(rf"({'|'.join(SEED_SYSTEMS)})_(nano|tiny|small)_panoptic")
_TRANSFORMERS_PEER = re.compile(r"(?:(detr)_swin_(tiny|small)|(mask2former)_swin_(tiny|small)(_panoptic)?)")
_SWIN_DEPTHS = {"tiny": [2, 2, 6, 2], "small": [2, 2, 18, 2]}

RUNTIMES = ("eager", "unfused", "compile", "onnxruntime")
# runtimes whose training step is measured too (eager PyTorch, with and without the fused clustering operator)
TRAINED_RUNTIMES = ("eager", "unfused")
CONVERGENCE_PAIRINGS = ("detection", "instance", "panoptic")  # clusterformer.convergence.PAIRINGS


def split_runtime(name: str) -> tuple[str, str]:
    """``"clusterformer_tiny@onnxruntime"`` -> ``("clusterformer_tiny", "onnxruntime")``; no suffix: eager."""
    base, _, runtime = name.partition("@")
    runtime = runtime or "eager"
    if runtime not in RUNTIMES:
        raise ValueError(f"{name}: unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    return base, runtime


def trains(name: str) -> bool:
    """Whether the training step of ``name`` is measured (eager PyTorch, fused or not; not a compiled or exported
    model)."""
    return split_runtime(name)[1] in TRAINED_RUNTIMES


def with_runtimes(models, runtimes=("eager", "compile", "onnxruntime")) -> list[str]:
    """Every model in every runtime, eager first: ``[m, m@compile, m@onnxruntime, ...]``."""
    return [m if r == "eager" else f"{m}@{r}" for m in models for r in runtimes]


@dataclass
class Measurement:
    """Per-iteration seconds of one child run and its peak memory in MiB. ``cpu_seconds``: the process's
    CPU time (all its threads) per iteration; far below ``seconds x torch threads``, the run shared the
    cores with other work."""

    seconds: list[float]
    peak_mib: float
    cpu_seconds: list[float] = field(default_factory=list)


@dataclass
class ModelResult:
    model: str
    params_m: float
    gmacs: float
    infer: list[Measurement] = field(default_factory=list)
    train: list[Measurement] = field(default_factory=list)

    @staticmethod
    def _ips(runs: list[Measurement], batch: int) -> float | None:
        if not runs:
            return None
        return batch / statistics.median(statistics.median(r.seconds) for r in runs)

    @staticmethod
    def _best_ips(runs: list[Measurement], batch: int) -> float | None:
        # the fastest iteration of all rounds: the least disturbed by other work on a shared machine
        return batch / min(min(r.seconds) for r in runs) if runs else None

    def summary(self, batch: int) -> dict:
        return dict(
            model=self.model,
            params_m=self.params_m,  # unrounded: the table rounds once
            gmacs=self.gmacs,
            infer_img_s=self._ips(self.infer, batch),
            infer_best_img_s=self._best_ips(self.infer, batch),
            train_img_s=self._ips(self.train, batch),
            infer_peak_mib=max((r.peak_mib for r in self.infer), default=None),
            train_peak_mib=max((r.peak_mib for r in self.train), default=None),
        )


def machine_description(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def peer_of(name: str, peers: dict[str, str] | None = None) -> str | None:
    """The model ``name`` is compared with: its eager self for a runtime variant, else ``peers`` (default
    :data:`PEERS`)."""
    base, runtime = split_runtime(name)
    return base if runtime != "eager" else (PEERS if peers is None else peers).get(name)


def dense_task(name: str) -> str | None:
    """``"detection"``, ``"instance"`` or ``"panoptic"`` for a dense model name, ``None`` for a classifier."""
    name = split_runtime(name)[0]
    if match := _CLUSTERFORMER_DENSE.fullmatch(name):
        return match[2]
    if _SEED_DENSE.fullmatch(name):
        return "panoptic"
    if match := _TRANSFORMERS_PEER.fullmatch(name):
        return "detection" if match[1] else ("panoptic" if match[5] else "instance")
    return None


def _size_text(img_size: ImageSize) -> str:
    height, width = image_hw(img_size)
    return f"{height}x{width}"


def _import_transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"the Mask2Former and DETR peers need the transformers package: {BENCH_EXTRA}") from error
    return transformers


def require_transformers(models) -> None:
    """Raise the ``pip install clusterformer[bench]`` error now if any of ``models`` needs transformers."""
    if any(_TRANSFORMERS_PEER.fullmatch(name) for name in models):
        _import_transformers()


def _build_transformers_peer(match: re.Match, **config_kwargs) -> torch.nn.Module:
    """Mask2Former (Swin backbone, all four stages to its pixel decoder) or DETR (Swin backbone, its
    stride-32 stage), built from configs with random weights. ``transformers`` builds a backbone given by
    ``backbone_config`` from that config alone; ``use_pretrained_backbone=False`` (and for DETR
    ``use_timm_backbone=False``) keep the older 4.x releases from fetching ImageNet weights."""
    transformers = _import_transformers()
    detr, detr_size, _, mask2former_size, panoptic = match.groups()
    size = detr_size or mask2former_size
    swin = transformers.SwinConfig(
        embed_dim=96,
        depths=_SWIN_DEPTHS[size],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        out_features=["stage4"] if detr else ["stage1", "stage2", "stage3", "stage4"],
    )
    common = dict(backbone_config=swin, num_queries=100, use_pretrained_backbone=False)
    if detr:
        config = transformers.DetrConfig(**common, num_labels=80, use_timm_backbone=False, **config_kwargs)
        return transformers.DetrForObjectDetection(config)
    config = transformers.Mask2FormerConfig(**common, num_labels=133 if panoptic else 80, **config_kwargs)
    return transformers.Mask2FormerForUniversalSegmentation(config)


def expand_model_sets(names) -> list[str]:
    """``names`` with every set name of :data:`MODEL_SETS` (``seeds``) replaced by its models."""
    return [model for name in names for model in MODEL_SETS.get(name, (name,))]


def _seed_decoder(system: str) -> dict:
    """The ``decoder`` settings of ``configs/panoptic/<system>_tiny_coco_panoptic.yaml`` (shipped with the package):
    the seed system's decoder at its paper's query and layer counts."""
    from importlib import resources

    import yaml

    path = resources.files("clusterformer").joinpath("configs", "panoptic", f"{system}_tiny_coco_panoptic.yaml")
    return dict(yaml.safe_load(path.read_text())["model"]["init_args"]["decoder"])


def build(name: str, **model_kwargs) -> torch.nn.Module:
    """The model called ``name`` (see the module docstring), random weights; ``model_kwargs`` go to
    ``timm.create_model``, ``build_set_model`` or the transformers config."""
    if match := _CLUSTERFORMER_DENSE.fullmatch(name):
        from ..heads.sets import build_set_model

        backbone, task = match.groups()
        # panoptic: the mask model with COCO panoptic's 133 classes and the auxiliary semantic head (kMaX-DeepLab's
        # semantic loss; a 1x1 convolution run in training only, so inference is the instance network's)
        set_kwargs = dict(
            num_classes=COCO_CLASSES[task], boxes=task == "detection", masks=task != "detection", num_queries=100,
            semantic_head=task == "panoptic",
        )  # fmt: skip
        return build_set_model(backbone, **{**set_kwargs, **model_kwargs})
    if match := _SEED_DENSE.fullmatch(name):
        from ..heads.sets import build_set_model

        system, size = match.groups()
        set_kwargs = dict(num_classes=COCO_CLASSES["panoptic"], boxes=False, masks=True, semantic_head=True)
        return build_set_model(f"clusterformer_{size}", **{**set_kwargs, **_seed_decoder(system), **model_kwargs})
    if match := _TRANSFORMERS_PEER.fullmatch(name):
        return _build_transformers_peer(match, **model_kwargs)
    import timm

    import clusterformer  # noqa: F401  (registers the models with timm)

    return timm.create_model(name, **{"num_classes": 1000, **model_kwargs})


def _sdpa_macs_formula():
    """FlopCounterMode counts ``scaled_dot_product_attention`` on CUDA but not its CPU kernel, which the
    dense models (query self-attention, transformers' Swin windows, DETR) run; count it the same way."""
    from torch.utils.flop_counter import sdpa_flop_count

    def formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: formula}


def count_gmacs(name: str, img_size: ImageSize, **model_kwargs) -> tuple[float, float]:
    """Parameters (M) and multiply-accumulates (G) of one image, from ``torch.utils.flop_counter``
    (matrix products, convolutions and attention; FLOPs / 2). Not counted: element-wise operations,
    normalisations, softmax, interpolation and ``grid_sample`` (Mask2Former's deformable attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    # no parameter may require gradients: FlopCounterMode's module hooks fail on a parameter passed as
    # a module's input (the decoder's query positions) under no_grad
    model = build(split_runtime(name)[0], **model_kwargs).eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    counter = FlopCounterMode(display=False, custom_mapping=_sdpa_macs_formula())
    with torch.no_grad(), counter:
        model(torch.randn(1, 3, *image_hw(img_size)))
    return params, counter.get_total_flops() / 2 / 1e9


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _onnxruntime_session(model: torch.nn.Module, batch: int, img_size: ImageSize, folder: str, exporter: str):
    """Export ``model`` to ONNX in ``folder`` (once per folder, model and size: the weights are seeded) and open
    it with onnxruntime's CPU provider, as many intra-op threads as torch uses."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError("the onnxruntime runtime needs onnxruntime: pip install 'clusterformer[export]'") from error
    from .export import export_model

    height, width = image_hw(img_size)
    path = os.path.join(folder, f"{type(model).__name__}_{height}x{width}_{exporter}.onnx")
    if not os.path.exists(path):
        # traced at batch 2 (dynamic batch), then run at any batch
        export_model(model, "onnx", path, ((height, width),), onnx_exporter=exporter, verify=False, overwrite=True)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def workload(
    name: str,
    mode: str,
    batch: int,
    img_size: ImageSize,
    device: str = "cpu",
    amp: bool = False,
    *,
    onnx_folder: str | None = None,
    onnx_exporter: str = "dynamo",
    compile_backend: str = "inductor",
):
    """A callable running one inference pass (``mode="infer"``; it returns the outputs) or one training step
    (forward, cross-entropy, backward, AdamW) of ``name`` on random images. Dense models and the runtime
    variants ``@compile`` / ``@onnxruntime`` (see the module docstring): inference only. ``onnx_folder``
    keeps the exported ONNX file between calls (default: a new temporary folder)."""
    base, runtime = split_runtime(name)
    if mode == "train" and (dense_task(name) or runtime not in TRAINED_RUNTIMES):
        raise ValueError(
            f"{name}: the training step is measured for classification models in eager mode only (NAME, NAME@unfused)"
        )
    if runtime == "onnxruntime" and (device != "cpu" or amp):
        raise ValueError(f"{name}: onnxruntime is measured on the CPU in fp32 (--device cpu, no --amp)")
    torch.manual_seed(0)
    model = build(base).to(device)
    if runtime == "unfused":
        set_fused(model, False)
    images = torch.randn(batch, 3, *image_hw(img_size), device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=amp)
    if mode == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run():
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run
    model.eval()
    if runtime == "onnxruntime":
        session = _onnxruntime_session(model, batch, img_size, onnx_folder or tempfile.mkdtemp(), onnx_exporter)
        feed = {"images": images.numpy()}
        return lambda: session.run(None, feed)
    if runtime == "compile":
        model = torch.compile(model, backend=compile_backend)

    def run():
        with torch.inference_mode(), autocast:
            return model(images)

    return run


def _measure(
    name: str,
    mode: str,
    batch: int,
    img_size: ImageSize,
    warmup: int,
    iters: int,
    device: str,
    amp: bool,
    onnx_folder: str | None = None,
):
    """Child process: time ``iters`` inference passes or training steps."""
    run = workload(name, mode, batch, img_size, device, amp, onnx_folder=onnx_folder)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mib()
    for _ in range(warmup):
        run()
    sync()
    seconds, cpu_seconds = [], []
    for _ in range(iters):
        start, cpu_start = time.perf_counter(), time.process_time()
        run()
        sync()
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return Measurement(seconds, max(peak, 0.0), cpu_seconds)


PRECISIONS = ("fp32", "bf16")


def resolve_precision(device: str, precision: str | None = None, amp: bool | None = None) -> str:
    """``"fp32"`` or ``"bf16"``: ``precision`` if given, else the older ``amp`` switch (``True``: bf16), else bf16
    on CUDA and fp32 on the CPU. A ``precision`` and an ``amp`` that disagree are a ``ValueError``."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    from_amp = None if amp is None else ("bf16" if amp else "fp32")
    if precision is not None and from_amp is not None and precision != from_amp:
        raise ValueError(f"--precision {precision} and --{'' if amp else 'no-'}amp disagree; pass --precision alone")
    return precision or from_amp or ("bf16" if device == "cuda" else "fp32")


def run_benchmark(
    models=DEFAULT_MODELS,
    batch: int = 8,
    img_size: ImageSize = 224,
    rounds: int = 3,
    warmup: int = 2,
    iters: int = 5,
    device: str | None = None,
    amp: bool | None = None,
    train: bool = True,
    progress: bool = True,
    peers: dict[str, str] | None = None,
    precision: str | None = None,
) -> dict:
    """Measure every model, interleaved over ``rounds``; returns a JSON-serialisable report.

    ``img_size`` is a side or ``(height, width)``. ``train`` adds the training step of the
    classification models; dense models and runtime variants are measured for inference only. A runtime
    variant's peer is its eager model (``NAME@compile`` -> ``NAME``). The warm-up iterations take
    ``torch.compile``'s compilation; an ``@onnxruntime`` model is exported once per run, outside the timing.
    ``precision``: ``"fp32"`` or ``"bf16"`` (autocast; default: bf16 on CUDA, fp32 on the CPU); ``amp``, the
    older switch, is the same as ``precision="bf16"`` (``True``) or ``"fp32"`` (``False``). On the CPU the report's
    ``cpu_bf16`` says whether the processor computes bf16 natively (``reduced_precision.bf16_support``)."""
    from tqdm import tqdm

    from ..reduced_precision import bf16_support

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(device, precision, amp)
    amp = precision == "bf16"
    results = {}
    for name in models:
        params, gmacs = count_gmacs(name, img_size)
        results[name] = ModelResult(name, params, gmacs)
    jobs = [
        (r, name, mode)
        for r in range(rounds)
        for name in models
        for mode in (["infer", "train"] if train and not dense_task(name) and trains(name) else ["infer"])
    ]
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="clusterformer-bench-") as onnx_folder:
        for _, name, mode in tqdm(jobs, desc="benchmark", disable=not progress, unit="run"):
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                job = (name, mode, batch, img_size, warmup, iters, device, amp, onnx_folder)
                m = pool.submit(_measure, *job).result()
            getattr(results[name], mode).append(m)
    summaries = [results[n].summary(batch) for n in models]
    by_name = {s["model"]: s for s in summaries}
    for s in summaries:
        peer = by_name.get(peer_of(s["model"], peers))
        for key in ("infer_img_s", "infer_best_img_s", "train_img_s"):
            ok = peer and s[key] and peer[key]
            s[key.replace("img_s", "vs_peer")] = s[key] / peer[key] if ok else None
    return dict(
        machine=machine_description(device),
        device=device,
        dtype="bf16 autocast" if amp else "fp32",
        precision=precision,
        cpu_bf16=bf16_support().as_dict() if device == "cpu" else None,
        torch=torch.__version__,
        batch=batch,
        img_size=img_size,
        rounds=rounds,
        iters=iters,
        results=summaries,
        raw={n: asdict(r) for n, r in results.items()},
    )


def profile_model(
    name: str, mode: str = "infer", batch: int = 8, img_size: ImageSize = 224, rows: int = 12, amp: bool = False
) -> str:
    """Where the time of one inference pass or one training step goes, by operator
    (``torch.profiler``, CPU self time), after one warm-up iteration; ``amp``: under bf16 autocast."""
    from torch.profiler import ProfilerActivity, profile

    run = workload(name, mode, batch, img_size, amp=amp)
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=36)
    dtype = ", bf16 autocast" if amp else ""
    return f"{name} ({mode}, batch {batch}, {_size_text(img_size)}{dtype})\n{table}"


def markdown_table(report: dict) -> str:
    def fmt(v, spec, suffix=""):
        return "—" if v is None else format(v, spec) + suffix

    # a run without training figures (dense models, --no-train) leaves the training columns out
    with_train = any(s["train_img_s"] is not None for s in report["results"])
    header = ["model", "params (M)", "GMACs", "infer img/s", "vs peer", "best infer img/s", "vs peer"]
    header += ["train img/s", "vs peer", "infer peak MiB", "train peak MiB"] if with_train else ["infer peak MiB"]
    # older reports have no cpu_bf16
    fast_path = f"; bf16 fast path: {report['cpu_bf16']['text']}" if report.get("cpu_bf16") else ""
    lines = [
        f"Machine: {report['machine']}{fast_path}; torch {report['torch']}; {report['dtype']}; batch "
        f"{report['batch']}, {_size_text(report['img_size'])}; median of {report['rounds']} interleaved rounds x "
        f"{report['iters']} iterations; best: the fastest iteration.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for s in report["results"]:
        cells = [s["model"], f"{s['params_m']:.2f}", f"{s['gmacs']:.2f}"]
        cells += [fmt(s["infer_img_s"], ".2f"), fmt(s["infer_vs_peer"], ".2f", "x")]
        cells += [fmt(s.get("infer_best_img_s"), ".2f"), fmt(s.get("infer_best_vs_peer"), ".2f", "x")]
        if with_train:
            cells += [fmt(s["train_img_s"], ".2f"), fmt(s["train_vs_peer"], ".2f", "x")]
        cells.append(fmt(s["infer_peak_mib"], ".0f"))
        if with_train:
            cells.append(fmt(s["train_peak_mib"], ".0f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


# --- the command -----------------------------------------------------------------------------------------------------
def _img_size(text: str):
    from ..data.images import parse_img_size

    try:
        return parse_img_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "benchmark",
        help="parameters, GMACs, throughput and peak memory next to Swin / Mask2Former / DETR, measured in one run",
        description="Measure ClusterFormer and its peers in one run: parameters, GMACs per image "
        "(torch.utils.flop_counter, FLOPs/2), inference and training-step (forward + backward + AdamW) images/s "
        "and peak memory. Models are interleaved over several rounds, each measurement in a fresh process. "
        "CPU runs in fp32 and CUDA runs with bf16 autocast unless --precision says otherwise; a CPU run says whether "
        "the processor has a bf16 fast path (AMX, AVX512-BF16). --accuracy CKPT: instead of timing, the top-1 of a "
        "classification checkpoint in fp32 and under bf16 autocast and the largest logit difference. "
        "--task classification (default): ClusterFormer-T/S next "
        "to timm's Swin-T/S, batch 8, 224x224. --task dense: the detection, instance and panoptic models of "
        "ClusterFormer-T next to DETR and Mask2Former with a Swin-T backbone (transformers, random weights; "
        "pip install clusterformer[bench]), inference only, batch 1, one table for 512x512 and one for 800x1216. "
        "--onnx: ClusterFormer-T's (or each --models model's) inference in PyTorch eager mode, torch.compile and "
        "onnxruntime (CPU, the model exported to ONNX), ratios against eager. --task convergence: learning speed "
        "instead of throughput: ClusterFormer's detection, instance and panoptic heads and transformers' DETR and "
        "Mask2Former on the same clusterformer_nano encoder, trained on the same shapes batches with the same "
        "schedule, box AP50 / mask AP50 / PQ at equal steps (OUT/convergence.json, OUT/convergence_<task>.png).",
    )
    parser.add_argument(
        "--task",
        choices=["classification", "dense", "convergence"],
        default="classification",
        help="which default set of models, sizes and batch size (default: classification, or dense when every "
        "model given with --models is a dense one); convergence: the learning-speed comparison (the options "
        "under 'convergence')",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        help="model names: timm names, clusterformer_{nano,tiny,small}_{detection,instance,panoptic}, "
        "{kmax,cmt,hcformer}_{nano,tiny,small}_panoptic (the seed decoders on the ClusterFormer panoptic model, "
        "as configs/panoptic/*_tiny_coco_panoptic.yaml; compared with clusterformer_SIZE_panoptic), "
        "mask2former_swin_{tiny,small}[_panoptic], detr_swin_{tiny,small}; NAME@unfused (without the fused "
        "clustering operator), NAME@compile or NAME@onnxruntime for another runtime, compared with NAME; 'seeds' for "
        + " ".join(SEED_MODELS)
        + " (default: the --task set)",
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="inference in eager mode, torch.compile and onnxruntime (CPU) for clusterformer_tiny or the --models "
        "(needs onnxruntime: pip install 'clusterformer[export]'); no training step",
    )
    parser.add_argument(
        "--batch-size", type=int, help="default: 8 (classification), 1 (dense), the shapes configs' 8 (convergence)"
    )
    parser.add_argument(
        "--img-size",
        type=_img_size,
        action="append",
        help="N or HxW (e.g. 800x1216); repeat for one table per size (default: 224; dense: 512 and 800x1216)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="fp32, or bf16: torch.autocast with bfloat16 around the inference pass and the training step's forward "
        "(default: bf16 on CUDA, fp32 on the CPU; on a CPU without AMX or AVX512-BF16, bf16 is emulated and slower). "
        "With --accuracy: the precision compared with fp32 (default bf16)",
    )
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="older spelling of --precision bf16 (--amp) and --precision fp32 (--no-amp)",
    )
    parser.add_argument(
        "--no-train", action="store_true", help="skip the training-step measurement (dense models never have one)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the first pair of the set (clusterformer_tiny and swin_tiny; dense: clusterformer_tiny_instance and "
        "mask2former_swin_tiny at 512 only), 1 round of 3 iterations; convergence: the demo's quick data "
        "(400 + 80 scenes) and 100 steps per pairing (under 5 minutes on 2 cores; default: 1000 + 200 scenes, "
        "400 steps, under 20 minutes)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="instead of timing, print where the time goes, by operator (CPU)"
    )
    parser.add_argument("--json", help="write the full report (all timings) to this JSON file")
    parser.add_argument("--markdown", help="write the table to this markdown file")
    accuracy = parser.add_argument_group("accuracy", "options of --accuracy")
    accuracy.add_argument(
        "--accuracy",
        metavar="CKPT",
        help="instead of timing: run this classification checkpoint over a validation folder in fp32 and under "
        "--precision autocast (default bf16; --device, default cpu) and print both top-1 accuracies, how often the "
        "top classes agree and the largest logit difference (the table; --json: the report)",
    )
    accuracy.add_argument(
        "--data",
        metavar="DIR",
        help="with --accuracy: the folder of images, one sub-folder per class (default: the validation folder the "
        "checkpoint was trained with); with --task convergence: a shapes folder made by 'clusterformer make-shapes' to "
        "use (default: generate OUT/data)",
    )
    accuracy.add_argument("--limit", type=int, help="with --accuracy: the first N images only")
    convergence = parser.add_argument_group("convergence", "options of --task convergence")
    convergence.add_argument("--out", default="runs/convergence", help="output folder (default: runs/convergence)")
    convergence.add_argument("--seed", type=int, default=0, help="seed of the data, the weights and the batches")
    convergence.add_argument("--steps", type=int, help="optimizer steps per model (default: 400; --quick: 100)")
    convergence.add_argument(
        "--eval-every", type=int, help="evaluate both models every this many steps (default: 100; --quick: 50)"
    )
    # --data: in the accuracy group above
    convergence.add_argument(
        "--encoder",
        help="a classification checkpoint (e.g. the demo's classification/checkpoints/last.ckpt) whose encoder "
        "starts every model (default: random weights from --seed)",
    )
    convergence.add_argument(
        "--pairings",
        nargs="+",
        choices=CONVERGENCE_PAIRINGS,
        default=list(CONVERGENCE_PAIRINGS),
        help="which comparisons to run (default: all three)",
    )
    convergence.add_argument("--num-workers", type=int, default=0, help="data-loading processes (default: 0)")
    convergence.add_argument(
        "--overwrite", action="store_true", help="replace the report of an earlier run in --out (refused without it)"
    )
    parser.set_defaults(func=run)
    return parser


def _run_convergence(args: argparse.Namespace) -> int:
    """``--task convergence``: :func:`clusterformer.convergence.run_convergence` with the options."""
    from ..convergence import run_convergence

    for name, value in (("--steps", args.steps), ("--eval-every", args.eval_every), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            print(f"clusterformer benchmark: error: {name} must be at least 1, got {value}", file=sys.stderr)
            return 2
    try:
        _import_transformers()
    except ImportError as error:
        print(f"clusterformer benchmark: error: {error}", file=sys.stderr)
        return 2
    for name, path in (("--data", args.data), ("--encoder", args.encoder)):
        if path is not None and not Path(path).exists():
            print(f"clusterformer benchmark: error: {name} {path}: not found", file=sys.stderr)
            return 2
    report = Path(args.out) / "convergence.json"
    if report.exists() and not args.overwrite:
        print(
            f"clusterformer benchmark: error: {report}: holds an earlier run's report; pass --overwrite to replace "
            "it, or choose another --out",
            file=sys.stderr,
        )
        return 2
    run_convergence(
        args.out, quick=args.quick, seed=args.seed, steps=args.steps, eval_every=args.eval_every, data=args.data,
        encoder=args.encoder, pairings=args.pairings, batch_size=args.batch_size, num_workers=args.num_workers,
        machine=machine_description("cpu"),
    )  # fmt: skip
    return 0


def _run_accuracy(args: argparse.Namespace) -> int:
    """``--accuracy CKPT``: :func:`clusterformer.reduced_precision.compare_precision`, printed as a table."""
    from ..progress import on_terminal
    from ..reduced_precision import compare_precision, precision_table
    from ..weights import CheckpointError

    precision = args.precision or ("bf16" if args.amp in (None, True) else "fp32")
    if precision == "fp32":
        print("clusterformer benchmark: error: --accuracy compares fp32 with --precision bf16", file=sys.stderr)
        return 2
    if args.limit is not None and args.limit < 1:
        print(f"clusterformer benchmark: error: --limit must be at least 1, got {args.limit}", file=sys.stderr)
        return 2
    try:
        report = compare_precision(
            args.accuracy, args.data, precision, device=args.device or "cpu", batch_size=args.batch_size or 64,
            limit=args.limit, progress=on_terminal(sys.stderr),
        )  # fmt: skip
    except (CheckpointError, ValueError, OSError) as error:
        print(f"clusterformer benchmark: error: {error}", file=sys.stderr)
        return 2
    print(precision_table(report))
    if args.json:
        save(report, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.accuracy:
        return _run_accuracy(args)
    if args.task == "convergence":
        return _run_convergence(args)
    if args.models:
        args.models = expand_model_sets(args.models)
    try:
        for name in args.models or ():
            split_runtime(name)
    except ValueError as error:
        print(f"clusterformer benchmark: error: {error}", file=sys.stderr)
        return 2
    # dense defaults (batch 1, 512 and 800x1216) for --task dense or a list of dense models only
    dense = args.task == "dense" or bool(args.models and all(dense_task(name) for name in args.models))
    models = args.models or (DENSE_MODELS if dense else DEFAULT_MODELS)
    if args.quick and not args.models:  # ClusterFormer-T and its peer: instance / Mask2Former, or Swin-T
        models = DENSE_MODELS[2:4] if dense else DEFAULT_MODELS[:2]
    if args.onnx:  # each model in eager mode, torch.compile and onnxruntime (ClusterFormer-T by default)
        models = with_runtimes(args.models or ["clusterformer_tiny"])
    sizes = args.img_size or (list(DENSE_SIZES[:1] if args.quick else DENSE_SIZES) if dense else [224])
    batch = args.batch_size or (1 if dense else 8)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        precision = resolve_precision(device, args.precision, args.amp)
    except ValueError as error:
        print(f"clusterformer benchmark: error: {error}", file=sys.stderr)
        return 2
    if precision != "fp32" and any(split_runtime(name)[1] == "onnxruntime" for name in models):
        print("clusterformer benchmark: error: onnxruntime is measured in fp32 (--precision fp32)", file=sys.stderr)
        return 2
    try:
        require_transformers(models)
        if any(split_runtime(name)[1] == "onnxruntime" for name in models):
            import onnxruntime  # noqa: F401
    except ImportError as error:
        if error.name == "onnxruntime":
            error = "onnxruntime is not installed: pip install 'clusterformer[export]'"
        print(f"clusterformer benchmark: error: {error}", file=sys.stderr)
        return 2
    if args.profile:  # on the CPU: fp32 unless --precision bf16
        profiled = resolve_precision("cpu", args.precision, args.amp)
        for size in sizes:
            for name in models:
                for mode in ("infer",) if dense_task(name) or "@" in name else ("infer", "train"):
                    print(profile_model(name, mode, batch, size, amp=profiled == "bf16"))
        return 0
    rounds, iters = (1, 3) if args.quick else (args.rounds, args.iters)
    if device == "cpu":
        from ..reduced_precision import cpu_line

        print(cpu_line() + f"; measuring in {precision}\n", flush=True)
    reports = []
    for size in sizes:  # one interleaved run and one table per size
        report = run_benchmark(
            models=models,
            batch=batch,
            img_size=size,
            rounds=rounds,
            warmup=args.warmup,
            iters=iters,
            device=device,
            precision=precision,
            train=not (args.no_train or args.onnx),
        )
        reports.append(report)
        print(markdown_table(report) + "\n", flush=True)
    if args.json:  # one size: the report; several: {"reports": [one per size]}
        save(reports[0] if len(reports) == 1 else {"reports": reports}, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.markdown:
        Path(args.markdown).write_text("\n\n".join(markdown_table(report) for report in reports) + "\n")
        print(f"wrote {args.markdown}", file=sys.stderr)
    return 0
