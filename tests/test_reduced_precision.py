"""bf16 on the CPU: the CPU's bf16 support from its flags, ``clusterformer benchmark --precision`` and
``--accuracy CKPT`` (the top-1 of a classifier in fp32 and under bf16 autocast)."""

import json

import lightning as L
import pytest
import torch

from clusterformer.cli import main
from clusterformer.commands.benchmark import markdown_table, resolve_precision
from clusterformer.reduced_precision import NONE_TEXT, bf16_support, compare_precision, cpu_line
from clusterformer.tasks import ClassificationTask, ImageFolderData

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SAPPHIRE_RAPIDS = """processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu vme avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
processor	: 1
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu vme avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
COOPER_LAKE = "model name\t: Intel(R) Xeon(R) Gold 6348H\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
SKYLAKE = "model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n"
GRAVITON3 = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve bf16 i8mm\nCPU part\t: 0xd40\n"


def test_bf16_support_from_the_cpu_flags():
    amx = bf16_support(SAPPHIRE_RAPIDS)
    assert (amx.kind, amx.fast, amx.cpu) == ("amx", True, "Intel(R) Xeon(R) Platinum 8480+")
    assert amx.flags == ("amx_bf16", "amx_tile", "avx512_bf16")
    assert cpu_line(amx) == "CPU: Intel(R) Xeon(R) Platinum 8480+; bf16 fast path: AMX (amx_bf16)"
    avx = bf16_support(COOPER_LAKE)
    assert (avx.kind, avx.text, avx.flags) == ("avx512_bf16", "AVX512-BF16 (avx512_bf16)", ("avx512_bf16",))
    emulated = bf16_support(SKYLAKE)
    assert (emulated.kind, emulated.fast, emulated.flags) == ("none", False, ())
    assert emulated.text == NONE_TEXT == "none (bf16 is emulated, expect it slower than fp32)"
    assert bf16_support(GRAVITON3).kind == "arm_bf16"
    assert bf16_support("").kind == "none"
    assert bf16_support().as_dict()["kind"] in ("amx", "avx512_bf16", "arm_bf16", "none", "unknown")


def test_precision_defaults_and_the_older_amp_switch():
    assert resolve_precision("cpu") == "fp32" and resolve_precision("cuda") == "bf16"
    assert resolve_precision("cpu", "bf16") == "bf16" and resolve_precision("cuda", "fp32") == "fp32"
    assert resolve_precision("cpu", amp=True) == "bf16" and resolve_precision("cuda", amp=False) == "fp32"
    assert resolve_precision("cpu", "bf16", amp=True) == "bf16"
    with pytest.raises(ValueError, match="--precision fp32 and --amp disagree"):
        resolve_precision("cpu", "fp32", amp=True)


def test_bf16_workloads_run_under_autocast():
    from clusterformer.commands.benchmark import workload

    assert workload("clusterformer_nano", "infer", 2, 32, amp=True)().dtype == torch.bfloat16
    assert workload("clusterformer_nano", "infer", 2, 32)().dtype == torch.float32
    workload("clusterformer_nano", "train", 2, 32, amp=True)()  # forward under autocast, backward, AdamW


def test_bf16_benchmark_records_the_precision_and_the_cpus_support(tmp_path, capsys):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    args = ["benchmark", "--models", "clusterformer_nano", "--img-size", "32", "--batch-size", "1", "--rounds", "1"]
    args += ["--iters", "1", "--warmup", "0", "--no-train", "--json", str(out_json), "--markdown", str(out_md)]
    assert main([*args, "--amp"]) == 0  # the older spelling of --precision bf16
    report = json.loads(out_json.read_text())
    assert (report["precision"], report["dtype"]) == ("bf16", "bf16 autocast")
    support = bf16_support()
    assert report["cpu_bf16"] == support.as_dict()
    assert f"bf16 fast path: {support.text}; torch" in out_md.read_text() == markdown_table(report) + "\n"
    assert capsys.readouterr().out.startswith(f"{cpu_line(support)}; measuring in bf16\n")
    assert main([*args, "--precision", "fp32", "--amp"]) == 2
    assert "--precision fp32 and --amp disagree" in capsys.readouterr().err


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A ClusterFormer-Nano checkpoint trained a few steps on shape crops, with its data settings."""
    from clusterformer.data import make_shapes

    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, seed=2, num_train=8, num_val=6, size=48, progress=False)
    L.seed_everything(0)
    data = ImageFolderData(
        root=str(root / "imagefolder"), img_size=32, eval_resize=32, batch_size=8, num_workers=0, randaugment=False,
        random_erasing=0.0,
    )  # fmt: skip
    task = ClassificationTask(model="clusterformer_nano", num_classes=data.num_classes, warmup_epochs=0)
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
    )  # fmt: skip
    trainer.fit(task, data)
    path = root / "classifier.ckpt"
    trainer.save_checkpoint(path)
    return path, root / "imagefolder" / "val"


def test_accuracy_in_bf16_next_to_fp32(classifier, tmp_path, capsys):
    path, val = classifier
    report = compare_precision(path)
    assert report["folder"] == str(val)  # the checkpoint's validation folder
    count = sum(1 for file in val.rglob("*.png"))
    assert report["images"] == count > 0 and set(report["top1"]) == {"fp32", "bf16"}
    assert report["top1_difference"] == pytest.approx(report["top1"]["bf16"] - report["top1"]["fp32"])
    assert 0 <= report["agreement"] <= 1
    # bf16 keeps 8 bits of mantissa: the logits move, by little against their size
    assert 0 < report["max_abs_logit_diff"] < 0.1 * report["max_abs_logit"] + 0.05
    assert report["mean_abs_logit_diff"] <= report["max_abs_logit_diff"]
    out_json = tmp_path / "accuracy.json"
    args = ["benchmark", "--accuracy", str(path), "--data", str(val), "--limit", "3", "--json", str(out_json)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert cpu_line() in out and "| bf16 autocast |" in out and "| fp32 |" in out
    written = json.loads(out_json.read_text())
    assert written["images"] == 3 and written["precision"] == "bf16"
    assert main(["benchmark", "--accuracy", str(path), "--precision", "fp32"]) == 2
    assert "--accuracy compares fp32 with --precision bf16" in capsys.readouterr().err
    assert main(["benchmark", "--accuracy", str(path), "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere: dataset folder not found" in err[0]
