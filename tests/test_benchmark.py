"""The benchmark harness: compute counting, peer ratios and the command line."""

import json
import statistics
import sys

import pytest
import torch

from clusterformer.cli import main
from clusterformer.commands.benchmark import (
    PEERS,
    SEED_MODELS,
    build,
    count_gmacs,
    dense_task,
    markdown_table,
    run_benchmark,
)
from clusterformer.data.images import parse_img_size


def test_gmacs_count_the_clustering_iterations():
    _, one = count_gmacs("clusterformer_nano", 64, iterations=1)
    params, three = count_gmacs("clusterformer_nano", 64, iterations=3)
    assert three > one > 0
    assert 2 < params < 5


def test_tiny_gmacs_at_224():
    _, gmacs = count_gmacs("clusterformer_tiny", 224)
    assert 5.0 < gmacs < 5.8  # documented in docs/benchmarks.md


def check_summary(result: dict, raw: dict, batch: int) -> None:
    """The summary of one model is what its raw measurements give: the median of the rounds' median seconds, the
    fastest iteration, the largest peak."""
    for mode in ("infer", "train"):
        if not raw[mode]:
            continue
        median = statistics.median(statistics.median(run["seconds"]) for run in raw[mode])
        fastest = min(min(run["seconds"]) for run in raw[mode])
        assert result[f"{mode}_img_s"] == pytest.approx(batch / median)
        assert result[f"{mode}_peak_mib"] == max(run["peak_mib"] for run in raw[mode])
        if mode == "infer":
            assert result["infer_best_img_s"] == pytest.approx(batch / fastest)


def test_run_benchmark_reports_ratios_against_the_peer():
    report = run_benchmark(
        models=("clusterformer_nano", "test_resnet"),
        batch=2,
        img_size=32,
        rounds=1,
        warmup=0,
        iters=3,
        progress=False,
        peers={"clusterformer_nano": "test_resnet"},  # another model: not a ratio of 1 by construction
    )
    nano, peer = report["results"]
    for result in (nano, peer):
        check_summary(result, report["raw"][result["model"]], batch=2)
        assert result["infer_img_s"] > 0 and result["train_img_s"] > 0
    for key in ("infer", "infer_best", "train"):
        assert nano[f"{key}_vs_peer"] == pytest.approx(nano[f"{key}_img_s"] / peer[f"{key}_img_s"]), key
    assert peer["infer_vs_peer"] is None  # no peer named for it
    assert "clusterformer_nano" in markdown_table(report)


def test_peak_memory_is_what_the_workload_allocates(monkeypatch):
    """The peak is measured from the process's memory before the timed passes: a workload that allocates and
    touches 64 MiB reports at least that much (the reported value is clamped at 0, so a check against 0 would say
    nothing)."""
    import numpy as np

    from clusterformer.commands import benchmark

    def allocating(*args, **kwargs):
        return lambda: np.ones(64 * 2**20, np.uint8).sum()

    monkeypatch.setattr(benchmark, "workload", allocating)
    measurement = benchmark._measure("x", "infer", 1, 32, warmup=0, iters=1, device="cpu", amp=False)
    assert measurement.peak_mib >= 60 and len(measurement.seconds) == 1


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    code = main(
        [
            "benchmark",
            "--models",
            "clusterformer_nano",
            "--img-size",
            "32",
            "--batch-size",
            "1",
            "--rounds",
            "1",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--no-train",
            "--json",
            str(out_json),
            "--markdown",
            str(out_md),
        ]
    )
    assert code == 0
    report = json.loads(out_json.read_text())
    assert report["results"][0]["train_img_s"] is None
    assert "| clusterformer_nano |" in out_md.read_text()
    assert "| clusterformer_nano |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "classes", "keys"),
    [
        ("clusterformer_nano_detection", 80, {"logits", "boxes"}),
        ("clusterformer_nano_instance", 80, {"logits", "masks"}),
        ("clusterformer_nano_panoptic", 133, {"logits", "masks"}),
    ],
)
def test_dense_names_build_the_task_model(name, classes, keys):
    model = build(name).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert {k for k in out if k != "aux"} == keys
    assert out["logits"].shape == (1, 100, classes)
    if "masks" in keys:
        assert out["masks"].shape == (1, 100, 16, 24)
    assert dense_task(name) == name.rsplit("_", 1)[1]


def test_dense_names_and_peers():
    assert dense_task("clusterformer_nano") is None
    assert dense_task("swin_tiny_patch4_window7_224") is None
    assert dense_task("mask2former_swin_small") == "instance"
    assert dense_task("mask2former_swin_tiny_panoptic") == "panoptic"
    assert dense_task("detr_swin_tiny") == "detection"
    assert PEERS["clusterformer_tiny_detection"] == "detr_swin_tiny"
    assert PEERS["clusterformer_tiny_instance"] == PEERS["clusterformer_tiny_panoptic"] == "mask2former_swin_tiny"
    assert PEERS["clusterformer_small_instance"] == "mask2former_swin_small"


SEED_NAMES = {  # the seed decoders on the nano panoptic model: decoder layer, pixel path, queries (their COCO configs)
    "kmax_nano_panoptic": ("KMaXDecoderLayer", "PixelDecoder", 128),
    "cmt_nano_panoptic": ("CMTDecoderLayer", "PixelDecoder", 128),
    "hcformer_nano_panoptic": ("ClusteringDecoderLayer", "HCFormerPixelPath", 100),
}


@pytest.mark.parametrize("name", list(SEED_NAMES))
def test_seed_decoder_names_build_the_panoptic_model_with_their_configs_decoder(name):
    layer, path, queries = SEED_NAMES[name]
    model = build(name).eval()
    decoder = model.decoder
    assert (type(decoder.layers[0]).__name__, type(decoder.pixel_decoder).__name__) == (layer, path)
    assert decoder.num_queries == queries and len(decoder.layers) == (8 if name.startswith("hcformer") else 6)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert out["logits"].shape == (1, queries, 133) and out["masks"].shape == (1, queries, 16, 24)
    assert dense_task(name) == "panoptic" and dense_task(f"{name}@compile") == "panoptic"
    assert PEERS[name] == "clusterformer_nano_panoptic"  # the same model with ClusterFormer's decoder


def test_seed_decoders_are_measured_in_one_run_against_clusterformers_decoder():
    models = ("clusterformer_nano_panoptic", *SEED_NAMES)
    report = run_benchmark(models=models, batch=1, img_size=64, rounds=1, warmup=0, iters=1, progress=False)
    results = {result["model"]: result for result in report["results"]}
    assert list(results) == list(models)
    clusterformer = results["clusterformer_nano_panoptic"]
    for name in SEED_NAMES:
        result = results[name]
        check_summary(result, report["raw"][name], batch=1)
        assert result["params_m"] > 3 and result["gmacs"] > 0 and result["infer_img_s"] > 0
        assert result["infer_vs_peer"] == pytest.approx(result["infer_img_s"] / clusterformer["infer_img_s"])
    table = markdown_table(report)
    assert all(f"| {name} |" in table for name in models)


def test_image_sizes_parse_square_and_height_by_width():
    assert parse_img_size("512") == 512
    assert parse_img_size("800x1216") == (800, 1216)
    for bad in ("800x", "0", "axb", "1x2x3"):
        with pytest.raises(ValueError, match="HxW"):
            parse_img_size(bad)


def test_dense_gmacs_follow_height_and_width():
    _, square = count_gmacs("clusterformer_nano_detection", 64)
    _, wide = count_gmacs("clusterformer_nano_detection", (64, 128))
    params, tall = count_gmacs("clusterformer_nano_detection", (128, 64))
    assert wide > square > 0
    assert tall == pytest.approx(wide)
    assert params > 3


def test_dense_run_measures_inference_only_with_ratio_to_the_peer():
    report = run_benchmark(
        models=("clusterformer_nano_instance", "clusterformer_nano_detection"),
        batch=1,
        img_size=(64, 96),
        rounds=1,
        warmup=0,
        iters=1,
        progress=False,
        peers={"clusterformer_nano_instance": "clusterformer_nano_detection"},
    )
    instance, detection = report["results"]
    for result in (instance, detection):
        check_summary(result, report["raw"][result["model"]], batch=1)
        assert result["infer_img_s"] > 0 and result["train_img_s"] is None and result["train_peak_mib"] is None
        assert report["raw"][result["model"]]["train"] == []
    assert instance["infer_vs_peer"] == pytest.approx(instance["infer_img_s"] / detection["infer_img_s"])
    assert instance["infer_best_vs_peer"] == pytest.approx(instance["infer_best_img_s"] / detection["infer_best_img_s"])
    assert detection["infer_vs_peer"] is None
    table = markdown_table(report)
    assert "64x96" in table and "train img/s" not in table


def test_missing_transformers_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ImportError, match=r"pip install clusterformer\[bench\]"):
        build("mask2former_swin_tiny")
    assert main(["benchmark", "--task", "dense", "--img-size", "64"]) == 2
    assert "pip install clusterformer[bench]" in capsys.readouterr().err


def recording_run(calls: list):
    """A stand-in for ``run_benchmark`` that records its arguments (the harness itself is tested above)."""

    def fake_run(models, batch, img_size, train, **kwargs):
        calls.append((tuple(models), batch, img_size, train))
        result = dict(model=models[0], params_m=1.0, gmacs=1.0, infer_img_s=2.0, infer_vs_peer=None)
        result.update(train_img_s=None, train_vs_peer=None, infer_peak_mib=10.0, train_peak_mib=None)
        return dict(
            machine="m", torch="t", dtype="fp32", batch=batch, img_size=img_size, rounds=1, iters=1, results=[result]
        )

    return fake_run


def test_cli_dense_runs_one_table_per_size(tmp_path, capsys, monkeypatch):
    calls = []

    monkeypatch.setattr("clusterformer.commands.benchmark.run_benchmark", recording_run(calls))
    out_json = tmp_path / "dense.json"
    args = ["benchmark", "--task", "dense", "--models", "clusterformer_nano_detection"]
    assert main([*args, "--img-size", "64", "--img-size", "64x96", "--json", str(out_json)]) == 0
    assert calls == [(("clusterformer_nano_detection",), 1, size, True) for size in (64, (64, 96))]
    reports = json.loads(out_json.read_text())["reports"]
    assert [r["img_size"] for r in reports] == [64, [64, 96]]
    out = capsys.readouterr().out
    assert "batch 1, 64x64" in out and "batch 1, 64x96" in out
    calls.clear()
    assert main(["benchmark", "--models", "clusterformer_nano_instance"]) == 0  # dense names alone: dense defaults
    assert [(batch, size) for _, batch, size, _ in calls] == [(1, (512, 512)), (1, (800, 1216))]
    calls.clear()
    monkeypatch.setattr("clusterformer.commands.benchmark.require_transformers", lambda models: None)
    assert main(["benchmark", "--task", "dense"]) == 0  # the default dense set at both sizes
    assert [size for *_, size, _ in calls] == [(512, 512), (800, 1216)]
    assert calls[0][0] == (
        "clusterformer_tiny_detection",
        "detr_swin_tiny",
        "clusterformer_tiny_instance",
        "mask2former_swin_tiny",
        "clusterformer_tiny_panoptic",
    )
    calls.clear()
    assert main(["benchmark", "--task", "dense", "--models", "seeds", "--img-size", "64"]) == 0  # the four decoders
    assert calls == [(SEED_MODELS, 1, 64, True)]
    assert SEED_MODELS == ("clusterformer_tiny_panoptic", "kmax_tiny_panoptic", "cmt_tiny_panoptic",
                           "hcformer_tiny_panoptic", "mask2former_swin_tiny_panoptic")  # fmt: skip


@pytest.mark.parametrize(
    ("name", "outputs"), [("mask2former_swin_tiny", "masks_queries_logits"), ("detr_swin_tiny", "pred_boxes")]
)
def test_transformers_peers_build_offline_with_random_weights(name, outputs):
    pytest.importorskip("transformers")
    model = build(name).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert 44 < params < 48  # Swin-T backbone (27.5M) + Mask2Former or DETR
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out["logits" if name.startswith("detr") else "class_queries_logits"].shape == (1, 100, 81)
    assert outputs in out


def test_runtime_names_and_peers():
    from clusterformer.commands.benchmark import peer_of, split_runtime, with_runtimes

    assert split_runtime("clusterformer_tiny") == ("clusterformer_tiny", "eager")
    assert split_runtime("clusterformer_tiny@onnxruntime") == ("clusterformer_tiny", "onnxruntime")
    with pytest.raises(ValueError, match=r"clusterformer_tiny@jit: unknown runtime 'jit'"):
        split_runtime("clusterformer_tiny@jit")
    assert with_runtimes(["a", "b"]) == ["a", "a@compile", "a@onnxruntime", "b", "b@compile", "b@onnxruntime"]
    assert peer_of("clusterformer_tiny@compile") == peer_of("clusterformer_tiny@onnxruntime") == "clusterformer_tiny"
    assert peer_of("clusterformer_tiny") == PEERS["clusterformer_tiny"] == "swin_tiny_patch4_window7_224"
    assert dense_task("clusterformer_tiny_instance@onnxruntime") == "instance"
    assert dense_task("clusterformer_tiny@compile") is None


def test_runtime_workloads_compute_what_eager_computes(tmp_path):
    """The timed onnxruntime and torch.compile passes run the same network on the same images as eager."""
    from clusterformer.commands.benchmark import workload

    pytest.importorskip("onnxruntime")
    eager = workload("clusterformer_nano", "infer", 2, (64, 96))()
    # the TorchScript-based exporter and the aot_eager backend keep the test fast; the command uses the
    # default exporter and inductor
    run = workload("clusterformer_nano@onnxruntime", "infer", 2, (64, 96), onnx_folder=str(tmp_path),
                   onnx_exporter="torchscript")  # fmt: skip
    (logits,) = run()
    assert len(list(tmp_path.glob("*.onnx"))) == 1  # exported once into the run's folder
    torch.testing.assert_close(torch.from_numpy(logits), eager, atol=1e-4, rtol=0)
    compiled = workload("clusterformer_nano@compile", "infer", 2, (64, 96), compile_backend="aot_eager")()
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"training step is measured for classification models in eager mode only"):
        workload("clusterformer_nano@compile", "train", 2, 64)
    with pytest.raises(ValueError, match=r"onnxruntime is measured on the CPU in fp32"):
        workload("clusterformer_nano@onnxruntime", "infer", 2, 64, amp=True)


def test_unfused_runtime_trains_and_computes_what_the_fused_model_computes():
    """``NAME@unfused``: the same network without the fused clustering operator; its inference and training step are
    measured, against ``NAME``."""
    from clusterformer.commands.benchmark import peer_of, workload

    fused = workload("clusterformer_nano", "infer", 2, 64)()
    plain = workload("clusterformer_nano@unfused", "infer", 2, 64)()
    torch.testing.assert_close(plain, fused, atol=1e-5, rtol=1e-5)
    assert peer_of("clusterformer_nano@unfused") == "clusterformer_nano"
    report = run_benchmark(
        models=("clusterformer_nano", "clusterformer_nano@unfused"), batch=2, img_size=32, rounds=1, warmup=0,
        iters=2, progress=False,
    )  # fmt: skip
    unfused = report["results"][1]
    assert unfused["model"] == "clusterformer_nano@unfused" and unfused["train_img_s"] > 0
    assert unfused["train_vs_peer"] == pytest.approx(unfused["train_img_s"] / report["results"][0]["train_img_s"])


def test_cli_onnx_measures_eager_compile_and_onnxruntime(monkeypatch, capsys):
    calls = []

    monkeypatch.setattr("clusterformer.commands.benchmark.run_benchmark", recording_run(calls))
    assert main(["benchmark", "--onnx"]) == 0
    assert calls == [(("clusterformer_tiny", "clusterformer_tiny@compile", "clusterformer_tiny@onnxruntime"), 8, 224,
                      False)]  # fmt: skip
    calls.clear()
    assert main(["benchmark", "--onnx", "--models", "clusterformer_nano", "--img-size", "64"]) == 0
    assert calls[0][0] == ("clusterformer_nano", "clusterformer_nano@compile", "clusterformer_nano@onnxruntime")
    assert main(["benchmark", "--models", "clusterformer_nano@jit"]) == 2
    assert "unknown runtime 'jit'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["benchmark", "--onnx"]) == 2
    assert "pip install 'clusterformer[export]'" in capsys.readouterr().err
