"""Safe weights: weights-only checkpoint loading, task rebuilding, safetensors + JSON conversion, `convert`."""

import json
import os

import lightning as L
import pytest
import timm
import torch

import clusterformer  # noqa: F401  (registers the models)
from clusterformer.cli import main
from clusterformer.heads import build_set_model
from clusterformer.tasks import ClassificationTask, SetTask
from clusterformer.weights import (
    TASK_KEY,
    CheckpointError,
    convert_checkpoint,
    load_checkpoint,
    load_timm_weights,
    load_weights,
    task_from_checkpoint,
)

DECODER = dict(num_queries=10, dim=32, mask_dim=32, num_layers=2, num_heads=4, iterations=1, ffn_dim=64)


def save_lightning_checkpoint(module: L.LightningModule, path) -> None:
    """A checkpoint as Lightning writes it during training (``Trainer.save_checkpoint``), without training."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)  # fmt: skip
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path, weights_only=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    module = ClassificationTask(model="clusterformer_nano", num_classes=3, model_kwargs={"drop_path_rate": 0.1})
    path = tmp_path_factory.mktemp("ckpt") / "classifier.ckpt"
    save_lightning_checkpoint(module, path)
    return path, module.eval()


@pytest.fixture(scope="module")
def instance_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    module = SetTask(task="instance", backbone="clusterformer_nano", num_classes=2, decoder=DECODER)
    path = tmp_path_factory.mktemp("ckpt") / "instance.ckpt"
    save_lightning_checkpoint(module, path)
    return path, module.eval()


class RunsCode:
    """A pickle payload that would leave a marker file if unpickling ran it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="evil.ckpt: refused.*posix.system|evil.ckpt: refused.*nt.system"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused"):
        task_from_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "checkpoint not found"),
        (b"", r"not a PyTorch checkpoint \(the file is empty\)"),
        (b"not a checkpoint at all", "not a PyTorch checkpoint"),
        (b"PK\x03\x04 truncated zip", "not a PyTorch checkpoint"),
    ],
)
def test_missing_and_non_checkpoint_files_are_named(tmp_path, content, message):
    path = tmp_path / "model.ckpt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"model.ckpt: {message}"):
        load_checkpoint(path)


def test_a_tensor_file_is_not_a_task_checkpoint(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="tensor.pt: not a checkpoint"):
        load_checkpoint(tmp_path / "tensor.pt")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="plain.pt: not a task checkpoint"):
        task_from_checkpoint(tmp_path / "plain.pt")


def test_task_checkpoints_record_their_task(classifier_ckpt, instance_ckpt):
    assert load_checkpoint(classifier_ckpt[0])[TASK_KEY] == "classification"
    assert load_checkpoint(instance_ckpt[0])[TASK_KEY] == "instance"


def test_task_is_rebuilt_with_its_weights(classifier_ckpt):
    path, original = classifier_ckpt
    task, module = task_from_checkpoint(path)
    assert task == "classification" and isinstance(module, ClassificationTask) and not module.training
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(module(images), original(images), rtol=0, atol=0)


def test_checkpoint_of_another_task_is_refused(classifier_ckpt, instance_ckpt):
    with pytest.raises(CheckpointError, match="classifier.ckpt: a classification checkpoint, not instance"):
        task_from_checkpoint(classifier_ckpt[0], task="instance")
    with pytest.raises(CheckpointError, match="instance.ckpt: a instance checkpoint, not detection"):
        task_from_checkpoint(instance_ckpt[0], task="detection")


def test_older_checkpoints_are_recognised_by_their_hyperparameters(classifier_ckpt, instance_ckpt, tmp_path):
    for path, expected in ((classifier_ckpt[0], "classification"), (instance_ckpt[0], "instance")):
        checkpoint = load_checkpoint(path)
        del checkpoint[TASK_KEY]
        torch.save(checkpoint, tmp_path / "old.ckpt")
        assert task_from_checkpoint(tmp_path / "old.ckpt")[0] == expected


def test_checkpoints_with_the_settings_as_partial_dicts_still_load(instance_ckpt, tmp_path):
    """Checkpoints written before the typed settings hold ``decoder`` and ``loss`` as the dicts that were
    given (only some keys, or None); new ones hold every field. Both rebuild the same model."""
    path, original = instance_ckpt
    checkpoint = load_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    assert type(hparams["decoder"]) is dict and set(DECODER) < set(hparams["decoder"])  # every field, plainly
    hparams.update(decoder=dict(DECODER), loss={"num_points": 64})
    torch.save(checkpoint, tmp_path / "old.ckpt")
    _, module = task_from_checkpoint(tmp_path / "old.ckpt")
    assert module.criterion.num_points == 64
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(module(images)["masks"], original(images)["masks"], rtol=0, atol=0)
    hparams.update(loss=None)
    torch.save(checkpoint, tmp_path / "old.ckpt")
    assert task_from_checkpoint(tmp_path / "old.ckpt")[1].criterion.num_points == 12544
    hparams.update(decoder={**DECODER, "num_querys": 10})
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="bad.ckpt: cannot rebuild .*decoder: unknown key 'num_querys'"):
        task_from_checkpoint(tmp_path / "bad.ckpt")


def test_unknown_task_and_other_architecture_are_refused(classifier_ckpt, tmp_path):
    checkpoint = load_checkpoint(classifier_ckpt[0])
    torch.save({**checkpoint, TASK_KEY: "depth"}, tmp_path / "depth.ckpt")
    with pytest.raises(CheckpointError, match="depth.ckpt: a checkpoint of an unknown task 'depth'"):
        task_from_checkpoint(tmp_path / "depth.ckpt")
    other = {**checkpoint, "hyper_parameters": {**checkpoint["hyper_parameters"], "num_classes": 7}}
    torch.save(other, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="other.ckpt: the weights do not fit"):
        task_from_checkpoint(tmp_path / "other.ckpt")


def test_pretrained_options_of_the_hyperparameters_are_not_reloaded(instance_ckpt, tmp_path):
    """Trained from ImageNet weights that are gone now: the checkpoint holds every weight anyway."""
    checkpoint = load_checkpoint(instance_ckpt[0])
    missing = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(tmp_path / "gone.safetensors")}}
    checkpoint["hyper_parameters"]["backbone_kwargs"] = missing
    torch.save(checkpoint, tmp_path / "finetuned.ckpt")
    assert task_from_checkpoint(tmp_path / "finetuned.ckpt")[0] == "instance"


def test_classifier_weights_round_trip_through_timm(classifier_ckpt, tmp_path):
    path, original = classifier_ckpt
    weights, info = convert_checkpoint(path, tmp_path / "nano")
    assert (weights.name, info.name) == ("nano.safetensors", "nano.json")
    description = json.loads(info.read_text())
    assert description["task"] == "classification" and description["model"] == "clusterformer_nano"
    assert description["num_classes"] == 3
    assert description["hyper_parameters"]["model_kwargs"] == {"drop_path_rate": 0.1}
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = original(images)
        model = timm.create_model(
            "clusterformer_nano", pretrained=True, num_classes=3,
            pretrained_cfg_overlay=dict(file=str(weights), num_classes=3),
        ).eval()  # fmt: skip
        torch.testing.assert_close(model(images), expected, rtol=0, atol=0)
        torch.testing.assert_close(load_weights(weights)(images), expected, rtol=0, atol=0)
        # the overlay without num_classes: timm keeps the encoder and starts a new head (fine-tuning)
        encoder = timm.create_model(
            "clusterformer_nano", pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(file=str(weights))
        ).eval()
        torch.testing.assert_close(encoder.forward_features(images), original.model.forward_features(images))


def test_dense_weights_round_trip_and_initialise_another_task(instance_ckpt, tmp_path):
    path, original = instance_ckpt
    full, _ = convert_checkpoint(path, tmp_path / "instance.safetensors")  # the suffix is dropped from the prefix
    backbone, info = convert_checkpoint(path, tmp_path / "encoder", backbone_only=True)
    assert json.loads(info.read_text())["backbone_only"] is True
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = original(images)
        got = load_weights(tmp_path / "instance")(images)
        for key in ("logits", "masks"):
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    encoder_state = original.model.backbone.state_dict()
    for file in (backbone, full):  # the encoder alone, or the whole model (its decoder keys are left out)
        pretrained = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(file)}}
        detector = build_set_model("clusterformer_nano", 5, boxes=True, backbone_kwargs=pretrained, **DECODER)
        for key, value in detector.backbone.state_dict().items():
            torch.testing.assert_close(value, encoder_state[key], rtol=0, atol=0)
    assert load_weights(backbone).num_classes == 0


def test_convert_command(classifier_ckpt, tmp_path, capsys):
    assert main(["convert", "--ckpt", str(classifier_ckpt[0]), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out.safetensors").is_file() and (tmp_path / "out.json").is_file()
    capsys.readouterr()
    assert main(["convert", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.ckpt: checkpoint not found" in err
    assert not list(tmp_path.glob("bad*")) and not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("kind", ["classification", "instance"])
def test_checkpoints_from_before_the_em_clustering_keep_their_literal_m_step(kind, tmp_path):
    """A checkpoint written when Algorithm 1's summed M-step was the only one (no QK-norm weights, no m_step in
    its settings) is rebuilt with m_step="sum" in the encoder and the decoder and computes what it did."""
    torch.manual_seed(0)
    if kind == "classification":
        old = ClassificationTask(model="clusterformer_nano", num_classes=3, model_kwargs={"m_step": "sum"})
    else:
        old = SetTask(task="instance", backbone="clusterformer_nano", num_classes=2,
                      decoder={**DECODER, "m_step": "sum"}, backbone_kwargs={"m_step": "sum"})  # fmt: skip
    save_lightning_checkpoint(old, tmp_path / "old.ckpt")
    checkpoint = load_checkpoint(tmp_path / "old.ckpt")
    hparams = checkpoint["hyper_parameters"]  # as written then: without the m_step settings
    for key in ("model_kwargs", "backbone_kwargs", "decoder"):
        if isinstance(hparams.get(key), dict):
            hparams[key] = {k: v for k, v in hparams[key].items() if k != "m_step"} or None
    assert not any("q_norm" in key for key in checkpoint["state_dict"])
    torch.save(checkpoint, tmp_path / "stripped.ckpt")
    _, module = task_from_checkpoint(tmp_path / "stripped.ckpt")
    clusterings = [m for m in module.modules() if type(m).__name__ == "RecurrentClustering"]
    assert clusterings and all(m.m_step == "sum" for m in clusterings)
    # a weight file converted then: its JSON names no m_step either
    weights, info = convert_checkpoint(tmp_path / "stripped.ckpt", tmp_path / "old")
    description = json.loads(info.read_text())
    for key in ("model_kwargs", "backbone_kwargs", "decoder"):
        if isinstance(description["hyper_parameters"].get(key), dict):
            description["hyper_parameters"][key].pop("m_step", None)
    info.write_text(json.dumps(description))
    converted = load_weights(weights)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, rebuilt, loaded = old.eval()(images), module(images), converted(images)
    if kind == "classification":
        torch.testing.assert_close(rebuilt, expected, rtol=0, atol=0)
        torch.testing.assert_close(loaded, expected, rtol=0, atol=0)
    else:
        torch.testing.assert_close(rebuilt["logits"], expected["logits"], rtol=0, atol=0)
        torch.testing.assert_close(loaded["logits"], expected["logits"], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["classification", "instance"])
def test_em_checkpoints_saved_without_a_temperature_keep_temperature_one(kind, tmp_path):
    """EM weights written before the E-step's temperature was a buffer of the state dict (QK-norm keys, no
    temperature keys, no temperature in the settings) were trained at temperature 1: they load at 1 and compute
    what they did, through the checkpoint, a converted weight pair and timm's plain file loading."""
    torch.manual_seed(0)
    if kind == "classification":
        old = ClassificationTask(model="clusterformer_nano", num_classes=3, model_kwargs={"temperature": 1.0})
    else:
        old = SetTask(task="instance", backbone="clusterformer_nano", num_classes=2,
                      decoder=DECODER, backbone_kwargs={"temperature": 1.0})  # fmt: skip
    save_lightning_checkpoint(old, tmp_path / "old.ckpt")
    checkpoint = load_checkpoint(tmp_path / "old.ckpt")
    hparams = checkpoint["hyper_parameters"]
    for key in ("model_kwargs", "backbone_kwargs"):
        if isinstance(hparams.get(key), dict):
            hparams[key] = {k: v for k, v in hparams[key].items() if k != "temperature"} or None
    state = checkpoint["state_dict"]
    assert any(key.endswith("q_norm.weight") for key in state)
    for key in [key for key in state if key.endswith("clustering.temperature")]:
        del state[key]
    torch.save(checkpoint, tmp_path / "stripped.ckpt")
    _, module = task_from_checkpoint(tmp_path / "stripped.ckpt")
    clusterings = [m for m in module.modules() if type(m).__name__ == "RecurrentClustering"]
    assert clusterings and all(float(m.temperature) == 1.0 for m in clusterings)
    fresh = [m for m in old.modules() if type(m).__name__ == "RecurrentClustering"]
    if kind == "instance":  # the decoder was built at the default, the encoder at 1: all read as 1 once stripped
        assert {float(m.temperature) for m in fresh} == {0.5, 1.0}
        with torch.no_grad():
            for m in fresh:
                m.temperature.fill_(1.0)
    weights, _ = convert_checkpoint(tmp_path / "stripped.ckpt", tmp_path / "old")
    converted = load_weights(weights)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, rebuilt, loaded = old.eval()(images), module(images), converted(images)
    if kind == "classification":
        from safetensors.torch import save_file

        save_file({k[len("model.") :]: v.contiguous() for k, v in state.items()}, tmp_path / "plain.safetensors")
        plain = timm.create_model(
            "clusterformer_nano", num_classes=3, pretrained=True,
            pretrained_cfg_overlay=dict(file=str(tmp_path / "plain.safetensors")),
        ).eval()  # fmt: skip
        with torch.no_grad():  # (timm drops the classifier of a file whose class count differs from 1000)
            features = plain.forward_features(images), old.model.forward_features(images)
        torch.testing.assert_close(*features, rtol=0, atol=0)
    else:
        expected, rebuilt, loaded = expected["logits"], rebuilt["logits"], loaded["logits"]
    torch.testing.assert_close(rebuilt, expected, rtol=0, atol=0)
    torch.testing.assert_close(loaded, expected, rtol=0, atol=0)


def test_classifiers_from_before_the_center_head_keep_their_token_head(tmp_path):
    """A classifier written when the head read the tokens (a ``head.weight`` but no ``head_norm``, no ``head`` in
    its settings) is rebuilt with head="tokens" and computes what it did: through the checkpoint, a converted
    weight pair and the plain safetensors file (``load_timm_weights``)."""
    torch.manual_seed(0)
    old = ClassificationTask(model="clusterformer_nano", num_classes=3, model_kwargs={"head": "tokens"})
    save_lightning_checkpoint(old, tmp_path / "old.ckpt")
    checkpoint = load_checkpoint(tmp_path / "old.ckpt")
    checkpoint["hyper_parameters"]["model_kwargs"] = None  # as written then: no head setting
    assert "model.head.weight" in checkpoint["state_dict"]
    assert not any(key.startswith("model.head_norm") for key in checkpoint["state_dict"])
    torch.save(checkpoint, tmp_path / "stripped.ckpt")
    _, module = task_from_checkpoint(tmp_path / "stripped.ckpt")
    weights, info = convert_checkpoint(tmp_path / "stripped.ckpt", tmp_path / "old")
    description = json.loads(info.read_text())
    assert description["hyper_parameters"]["model_kwargs"] == {"head": "tokens"}  # converted now: named
    description["hyper_parameters"]["model_kwargs"] = None  # a weight pair converted then names no head
    info.write_text(json.dumps(description))
    converted = load_weights(weights)
    from safetensors.torch import save_file

    state = {k[len("model.") :]: v.contiguous() for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    save_file(state, tmp_path / "plain.safetensors")
    plain = load_timm_weights("clusterformer_nano", tmp_path / "plain.safetensors")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = old.eval()(images)
        for model in (module.model, converted, plain):
            assert model.head_source == "tokens"
            torch.testing.assert_close(model(images), expected, rtol=0, atol=0)
    # the default (center) head refuses the old file's state: its head_norm is missing
    with pytest.raises(RuntimeError, match="head_norm"):
        timm.create_model("clusterformer_nano", num_classes=3).load_state_dict(state)


def test_convert_refuses_existing_files_unless_overwrite(classifier_ckpt, tmp_path, capsys):
    argv = ["convert", "--ckpt", str(classifier_ckpt[0]), "--out", str(tmp_path / "out")]
    (tmp_path / "out.json").write_text("{}")  # one of the two files is enough to refuse
    assert main(argv) == 2
    message = f"{tmp_path / 'out.json'}: already exists; pass --overwrite to replace it"
    assert capsys.readouterr().err == f"clusterformer convert: error: {message}\n"
    assert not (tmp_path / "out.safetensors").exists() and (tmp_path / "out.json").read_text() == "{}"
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((tmp_path / "out.json").read_text())["task"] == "classification"
