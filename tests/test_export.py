"""Export to ONNX, TorchScript and torch.export programs with dynamic batch, height and width.

The models are ClusterFormer-Nano with one block per stage and one clustering iteration (every code path of the
full model, a quarter of its graph: tracing with symbolic shapes is slow on a shared CPU); the dense model is an
instance model with boxes and a two-layer decoder. docs/deployment.md lists the differences measured on the
default nano and tiny models.
"""

import os

import lightning as L
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import clusterformer  # noqa: F401  (registers the models)
from clusterformer.cli import main
from clusterformer.commands.export import ExportError, export_model
from clusterformer.heads import build_set_model
from clusterformer.tasks import ClassificationTask

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

SIZES = ((64, 64), (96, 128))
SMALL = dict(depths=(1, 1, 1, 1), iterations=1)
DECODER = dict(num_queries=10, dim=32, mask_dim=32, num_layers=2, num_heads=4, iterations=1, ffn_dim=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return timm.create_model("clusterformer_nano", num_classes=5, **SMALL).eval()


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    model = build_set_model("clusterformer_nano", 3, boxes=True, masks=True, backbone_kwargs=SMALL, **DECODER)
    return model.eval()


def reference(model, images):
    with torch.no_grad():
        out = model(images)
    return [out] if isinstance(out, torch.Tensor) else [out[k] for k in ("logits", "boxes", "masks") if k in out]


def max_diff(got, expected) -> float:
    assert [tuple(g.shape) for g in got] == [tuple(e.shape) for e in expected]
    return max(float((torch.as_tensor(g) - e).abs().max()) for g, e in zip(got, expected, strict=True))


def check_onnx(path, model, names):
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == names
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] and dims[2] and dims[3], f"batch, height and width must be dynamic: {dims}"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diffs = []
    for batch, (h, w) in zip((1, 3), SIZES, strict=True):  # other batch sizes than the example's 2
        images = torch.randn(batch, 3, h, w)
        diffs.append(max_diff(session.run(None, {"images": images.numpy()}), reference(model, images)))
    return diffs


def test_onnx_classifier_matches_pytorch_at_two_sizes(classifier, tmp_path):
    report = export_model(classifier, "onnx", tmp_path / "classifier.onnx", SIZES)
    assert report["exporter"] == "dynamo" and report["outputs"] == ["logits"]
    assert set(report["max_abs_diff"]) == {"64x64", "96x128"} and max(report["max_abs_diff"].values()) <= 1e-4
    assert max(check_onnx(tmp_path / "classifier.onnx", classifier, ["logits"])) <= 1e-4


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_onnx_dense_model_exports_the_final_layer_with_named_outputs(dense, tmp_path, exporter):
    if exporter == "dynamo" and not os.environ.get("CLUSTERFORMER_SLOW_TESTS"):
        pytest.skip("about a minute on a shared CPU; set CLUSTERFORMER_SLOW_TESTS=1")
    path = tmp_path / "dense.onnx"
    report = export_model(dense, "onnx", path, SIZES, onnx_exporter=exporter)
    assert report["outputs"] == ["logits", "boxes", "masks"]
    assert max(report["max_abs_diff"].values()) <= 1e-4
    assert max(check_onnx(path, dense, ["logits", "boxes", "masks"])) <= 1e-4
    masks = onnx.load(str(path)).graph.output[2].type.tensor_type.shape.dim
    assert masks[2].dim_param and masks[3].dim_param  # stride-4 masks follow the input size


@pytest.mark.parametrize("which", ["classifier", "dense"])
def test_torchscript_reloads_and_matches_at_two_sizes(which, classifier, dense, tmp_path):
    model = {"classifier": classifier, "dense": dense}[which]
    report = export_model(model, "torchscript", tmp_path / "model.pt", SIZES)
    assert max(report["max_abs_diff"].values()) <= 1e-5
    loaded = torch.jit.load(str(tmp_path / "model.pt"))
    for h, w in SIZES:
        images = torch.randn(3, 3, h, w)
        with torch.no_grad():
            out = loaded(images)
        assert max_diff([out] if isinstance(out, torch.Tensor) else list(out), reference(model, images)) <= 1e-5


def test_exported_program_reloads_and_matches_at_two_sizes(classifier, tmp_path):
    """The report's differences come from the saved file, reloaded with torch.export.load (not loaded twice here:
    loading retraces the graph, as slow as the export)."""
    report = export_model(classifier, "exported-program", tmp_path / "classifier.pt2", SIZES)
    assert set(report["max_abs_diff"]) == {"64x64", "96x128"} and max(report["max_abs_diff"].values()) <= 1e-5
    assert (tmp_path / "classifier.pt2").is_file() and [p.name for p in tmp_path.iterdir()] == ["classifier.pt2"]


def test_bad_export_input_is_refused_and_leaves_no_file(classifier, tmp_path):
    with pytest.raises(ExportError, match="unsupported format 'tflite'"):
        export_model(classifier, "tflite", tmp_path / "model.tflite", SIZES)
    with pytest.raises(ExportError, match="at least 64 pixels"):
        export_model(classifier, "exported-program", tmp_path / "model.pt2", ((32, 32),))

    class Strings(torch.nn.Module):
        def forward(self, images):
            return ["not", "tensors"]

    with pytest.raises(ExportError, match="cannot export a model whose output is list"):
        export_model(Strings(), "torchscript", tmp_path / "model.pt", SIZES)
    assert not list(tmp_path.iterdir())


def test_export_command_from_checkpoint_and_from_weights(tmp_path, capsys):
    torch.manual_seed(0)
    module = ClassificationTask(model="clusterformer_nano", num_classes=3, model_kwargs=SMALL)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)  # fmt: skip
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "task.ckpt", weights_only=False)
    sizes = ["--img-size", "64", "--img-size", "96x128"]
    out = tmp_path / "from_ckpt.pt"
    args = ["--ckpt", str(tmp_path / "task.ckpt"), "--format", "torchscript"]
    assert main(["export", *args, "--out", str(out), *sizes]) == 0
    images = torch.randn(1, 3, 80, 72)
    with torch.no_grad():
        assert max_diff([torch.jit.load(str(out))(images)], reference(module.model.eval(), images)) <= 1e-5
    capsys.readouterr()
    exported = out.read_bytes()  # an existing output is refused before the model is loaded, and kept
    assert main(["export", *args, "--out", str(out), *sizes]) == 2
    message = f"clusterformer export: error: {out}: already exists; pass --overwrite to replace it\n"
    assert capsys.readouterr().err == message
    assert out.read_bytes() == exported
    assert main(["export", *args, "--out", str(out), "--img-size", "64", "--overwrite"]) == 0

    nano = timm.create_model("clusterformer_nano", num_classes=3)  # --model: the registered architecture
    save_file(nano.state_dict(), str(tmp_path / "nano.safetensors"))
    out = tmp_path / "from_weights.onnx"
    args = ["--model", "clusterformer_nano", "--weights", str(tmp_path / "nano.safetensors"), "--format", "onnx"]
    assert main(["export", *args, "--onnx-exporter", "torchscript", "--out", str(out), *sizes]) == 0
    assert "max abs difference to PyTorch" in capsys.readouterr().err
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = torch.randn(2, 3, 64, 96)
    assert max_diff(session.run(None, {"images": images.numpy()}), reference(nano.eval(), images)) <= 1e-4


def test_export_command_reports_bad_input_in_one_line(tmp_path, capsys):
    torch.save({"state_dict": {}, "hyper_parameters": {}, "clusterformer_task": "depth"}, tmp_path / "depth.ckpt")
    cases = [
        (["--ckpt", str(tmp_path / "missing.ckpt"), "--format", "onnx"], "missing.ckpt: checkpoint not found"),
        (["--ckpt", str(tmp_path / "depth.ckpt"), "--format", "onnx"], "unknown task 'depth'"),
        (["--ckpt", str(tmp_path / "depth.ckpt"), "--format", "tflite"], "unsupported format 'tflite'"),
        (["--model", "clusterformer_nano", "--weights", str(tmp_path / "none.safetensors"), "--format", "onnx"],
         "none.safetensors: weights not found"),
    ]  # fmt: skip
    for args, message in cases:
        assert main(["export", *args, "--out", str(tmp_path / "out" / "model.onnx")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_onnx_outputs_are_the_final_layer_not_the_auxiliary_ones(dense):
    from clusterformer.commands.export import exportable

    module, names = exportable(dense, torch.randn(1, 3, 64, 64))
    assert names == ["logits", "boxes", "masks"] and not module.training
    outputs = module(torch.randn(1, 3, 64, 64))
    assert isinstance(outputs, tuple) and len(outputs) == 3
    np.testing.assert_equal(outputs[2].shape[-2:], (16, 16))
