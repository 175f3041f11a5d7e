"""``torch.compile``: the encoder traces into one graph (no graph breaks), and the tasks' ``compile`` setting compiles
the network when training starts while the checkpoints keep the plain module's keys.

The training tests compile with the cheap ``aot_eager`` / ``eager`` backends (``compile: {backend: ...}``): inductor
would build C++ kernels, minutes on a small CPU; dynamo's tracing, what graph breaks come from, is the same."""

from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import clusterformer  # noqa: F401  (registers the models with timm)
from clusterformer.cli import main
from clusterformer.errors import SettingError
from clusterformer.layers import fused as fused_ops
from clusterformer.tasks import ClassificationTask
from clusterformer.tasks.base import compile_options

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "classification" / "clusterformer_nano_shapes.yaml"
RUN = Path("runs/classification/clusterformer_nano_shapes")  # the config's folder, relative to the working folder

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    ("method", "fused"),
    [("forward_features", True), ("forward_dense", True), ("forward", True), ("forward_features", False)],
)
def test_the_encoder_compiles_without_graph_breaks(mode, method, fused, monkeypatch):
    """With the fused clustering operator (forced at this small size: on a CPU it otherwise runs above one block's
    assignment, ``fused.MIN_CPU_ELEMENTS``) and without it."""
    monkeypatch.setattr(fused_ops, "MIN_CPU_ELEMENTS", 0)
    torch.manual_seed(0)
    model = getattr(timm.create_model("clusterformer_nano", num_classes=4, fused=fused), mode)()
    explanation = torch._dynamo.explain(getattr(model, method))(torch.randn(2, 3, 64, 64))
    reasons = [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


def test_compile_options():
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {}
    assert compile_options({"backend": "aot_eager", "dynamic": False}) == {"backend": "aot_eager", "dynamic": False}
    with pytest.raises(SettingError, match="compile.*unknown option 'bakend'; the options are backend, mode"):
        ClassificationTask(model="clusterformer_nano", num_classes=4, compile={"bakend": "eager"})
    with pytest.raises(SettingError, match="compile.*must be true, false or a dict"):
        compile_options("inductor")


def images_and_labels(count: int = 8, size: int = 32) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(count, 3, size, size, generator=generator), torch.arange(count) % 4)


def test_training_with_compile_saves_the_plain_modules_keys(tmp_path):
    """A few training steps of a compiled ClusterFormer-Nano lower its loss on the batch it trains on; the checkpoint
    has the keys of the plain module and loads into a task that is not compiled, with the same outputs."""
    L.seed_everything(0)
    task = ClassificationTask(
        model="clusterformer_nano", num_classes=4, lr=2e-3, warmup_epochs=0, label_smoothing=0.0,
        compile={"backend": "aot_eager"},
    )  # fmt: skip
    data = images_and_labels()
    images, labels = data.tensors

    def loss() -> float:
        task.eval()
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(task(images), labels).item()

    before = loss()
    assert task.model._compiled_call_impl is None  # compiled when training starts, not when built
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(task, DataLoader(data, batch_size=8))
    assert task.model._compiled_call_impl is not None
    assert loss() < before
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert saved["hyper_parameters"]["compile"] == {"backend": "aot_eager"}
    assert not [key for key in saved["state_dict"] if "_orig_mod" in key]
    assert list(saved["state_dict"]) == list(ClassificationTask(model="clusterformer_nano", num_classes=4).state_dict())
    loaded = ClassificationTask.load_from_checkpoint(path).eval()
    assert loaded.model._compiled_call_impl is None  # loading (evaluation, prediction, export) runs it eagerly
    task.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), task(images), rtol=1e-5, atol=1e-5)


def fit(crops, *args) -> int:
    return main(
        ["fit", "--config", str(CONFIG), f"--data.init_args.root={crops}", "--data.init_args.num_workers=0",
         "--data.init_args.batch_size=4", "--data.init_args.img_size=32", "--data.init_args.eval_resize=32",
         "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", *map(str, args)]
    )  # fmt: skip


def test_fit_takes_compile_from_the_command_line_and_resumes_with_another(shapes_dir, tmp_path, monkeypatch):
    """``--model.init_args.compile '{backend: eager}'`` compiles the network of ``clusterformer fit``; a run
    resumes from its checkpoint file with another ``compile`` (a setting of how it runs, not of the model), which
    the checkpoint file's settings do not override."""
    crops = shapes_dir(1, 8, 4, 48) / "imagefolder"
    monkeypatch.chdir(tmp_path)
    compiled = []
    compile_model = ClassificationTask.compile_model

    def spy(self):
        compiled.append(compile_model(self))
        return compiled[-1]

    monkeypatch.setattr(ClassificationTask, "compile_model", spy)
    assert fit(crops, "--trainer.max_steps=1", "--model.init_args.compile", "{backend: eager}") == 0
    assert compiled == [True]
    last = RUN / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["hyper_parameters"]["compile"] == {"backend": "eager"} and saved["global_step"] == 1
    assert not [key for key in saved["state_dict"] if "_orig_mod" in key]
    assert fit(crops, "--trainer.max_steps=2", "--ckpt_path", last, "--model.init_args.compile=false") == 0
    assert compiled == [True, False]
    saved = torch.load(last, weights_only=True)
    assert saved["hyper_parameters"]["compile"] is False and saved["global_step"] == 2
