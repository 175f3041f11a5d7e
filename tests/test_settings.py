"""Typed decoder and loss settings: their fields are the builders' keyword arguments with the same defaults,
LightningCLI refuses a misspelled key by name and merges a partial dict into the config's, a dict and the
dataclass build the same task, and the hyperparameters (so the checkpoints) hold plain dicts."""

import inspect
from dataclasses import asdict, fields
from pathlib import Path

import lightning as L
import pytest
import torch

import clusterformer  # noqa: F401  (registers the models)
from clusterformer.cli import main
from clusterformer.heads import build_set_model
from clusterformer.losses import (
    FocalSettings,
    PanopticLossSettings,
    PointSampling,
    SemanticLossSettings,
    SetLossSettings,
    joint_criterion,
    panoptic_criterion,
    semantic_criterion,
)
from clusterformer.tasks import DecoderSettings, PanopticTask, SemanticTask, SetTask
from clusterformer.tasks.settings import as_settings
from clusterformer.weights import load_checkpoint, task_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]
INSTANCE_CONFIG = ROOT / "configs/instance/clusterformer_nano_shapes.yaml"
DECODER = dict(num_queries=10, dim=32, mask_dim=32, num_layers=1, num_heads=4, iterations=1, ffn_dim=64)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def keyword_defaults(function, leave_out=()) -> dict:
    return {
        name: parameter.default
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.default is not inspect.Parameter.empty and name not in leave_out
    }


def field_defaults(settings) -> dict:
    return {field.name: field.default for field in fields(settings)}


@pytest.mark.parametrize(
    ("settings", "function", "leave_out"),
    [
        (DecoderSettings, build_set_model, ("backbone", "num_classes", "boxes", "masks", "backbone_kwargs",
                                            "semantic_head")),
        (SetLossSettings, joint_criterion, ()),
        (SemanticLossSettings, semantic_criterion, ()),
        (PanopticLossSettings, panoptic_criterion, ()),
    ],
    ids=["decoder", "set", "semantic", "panoptic"],
)  # fmt: skip
def test_settings_are_the_keyword_arguments_of_what_they_configure(settings, function, leave_out):
    assert field_defaults(settings) == keyword_defaults(function, leave_out)


def test_loss_settings_share_the_point_sampling_and_focal_fields():
    for settings in (SetLossSettings, SemanticLossSettings, PanopticLossSettings):
        assert issubclass(settings, PointSampling) and issubclass(settings, FocalSettings)
    assert (PanopticLossSettings().focal_alpha, PanopticLossSettings().focal_gamma) == (-1.0, 0.0)


def cli_error(capsys, *args) -> str:
    """The one line on stderr of a refused ``fit`` (exit status 2)."""
    assert main(["fit", "--config", str(INSTANCE_CONFIG), *args, "--print_config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_refuses_a_misspelled_decoder_key_by_name(capsys):
    err = cli_error(capsys, "--model.init_args.decoder", "{num_querys: 10}")
    assert err == (
        "clusterformer fit: error: model.init_args.decoder.num_querys: not an option of "
        "clusterformer.tasks.DecoderSettings; did you mean num_queries?"
    )


def test_cli_refuses_a_misspelled_loss_key_and_a_wrong_type_by_name(capsys):
    err = cli_error(capsys, "--model.init_args.loss", "{num_point: 64}")
    assert err.startswith("clusterformer fit: error: model.init_args.loss.num_point: not an option of ")
    assert err.endswith("SetLossSettings; did you mean num_points?")
    err = cli_error(capsys, "--model.init_args.loss.focal_alpha", "quarter")
    assert err == "clusterformer fit: error: model.init_args.loss.focal_alpha: expected a float, got 'quarter'"


def test_cli_merges_a_partial_decoder_dict_into_the_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(INSTANCE_CONFIG), "--model.init_args.decoder", "{num_queries: 7}",
              "--model.init_args.loss.focal_gamma", "1.5", "--print_config"])  # fmt: skip
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "num_queries: 7\n" in printed and "dim: 64\n" in printed  # the config's width is kept
    assert "num_points: 1024\n" in printed and "focal_gamma: 1.5\n" in printed


def test_python_callers_get_a_clear_error_for_an_unknown_key():
    with pytest.raises(ValueError, match="decoder: unknown key 'num_querys'; the DecoderSettings keys are"):
        SetTask("instance", "clusterformer_nano", num_classes=2, decoder={"num_querys": 10})
    with pytest.raises(ValueError, match="loss: unknown keys 'thing_wieght', 'x'"):
        PanopticTask("clusterformer_nano", num_classes=3, num_things=2, decoder=DECODER,
                     loss={"thing_wieght": 5.0, "x": 1})  # fmt: skip
    with pytest.raises(TypeError, match="expected a SemanticLossSettings"):
        as_settings(SemanticLossSettings, SetLossSettings(), "loss")


@pytest.mark.parametrize(
    ("task", "loss", "message"),
    [
        ("detection", {"num_points": 64}, r"num_points=64 not used by detection_criterion \(a model with boxes\)"),
        ("instance", {"bbox_weight": 1.0}, r"bbox_weight=1.0 not used by instance_criterion \(a model with masks\)"),
    ],
)
def test_a_loss_setting_that_the_model_does_not_use_is_refused(task, loss, message):
    with pytest.raises(ValueError, match=message):
        SetTask(task, "clusterformer_nano", num_classes=2, decoder=DECODER, loss=loss)
    # with the box head, an instance model uses the box weights
    SetTask("instance", "clusterformer_nano", num_classes=2, decoder=DECODER, loss={"bbox_weight": 1.0},
            predict_boxes=True)  # fmt: skip


@pytest.mark.parametrize("kind", ["instance", "semantic", "panoptic"])
def test_a_dict_and_the_dataclass_build_the_same_task(kind):
    loss = {"instance": SetLossSettings, "semantic": SemanticLossSettings, "panoptic": PanopticLossSettings}[kind]

    def build(decoder, loss):
        torch.manual_seed(0)
        if kind == "instance":
            return SetTask("instance", "clusterformer_nano", num_classes=2, decoder=decoder, loss=loss)
        if kind == "semantic":
            return SemanticTask("clusterformer_nano", num_classes=3, decoder=decoder, loss=loss)
        return PanopticTask("clusterformer_nano", num_classes=3, num_things=2, decoder=decoder, loss=loss)

    from_dicts = build(DECODER, {"num_points": 64, "dice_weight": 2.0})
    from_settings = build(DecoderSettings(**DECODER), loss(num_points=64, dice_weight=2.0))
    assert dict(from_dicts.hparams) == dict(from_settings.hparams)
    for key in ("decoder", "loss"):  # plain dicts of every field: a weights-only load refuses dataclasses
        assert type(from_dicts.hparams[key]) is dict
    assert from_dicts.hparams["loss"] == asdict(loss(num_points=64, dice_weight=2.0))
    assert from_dicts.criterion.num_points == from_settings.criterion.num_points == 64
    assert from_dicts.criterion.weight_dict == from_settings.criterion.weight_dict
    state, other = from_dicts.state_dict(), from_settings.state_dict()
    assert list(state) == list(other) and all(torch.equal(state[k], other[k]) for k in state)
    defaults = build(None, None)
    assert defaults.hparams["loss"] == asdict(loss())


def test_a_task_built_by_the_cli_stores_plain_dicts_and_its_checkpoint_loads(shapes_dir, tmp_path, monkeypatch):
    """LightningCLI hands the task its settings as dataclasses and stores the config's values as the
    hyperparameters: the checkpoint holds dicts, loads weights-only and rebuilds the same model."""
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.chdir(tmp_path)
    shapes = shapes_dir(seed=3, num_train=12, num_val=7, size=64)
    cli = LightningCLI(
        L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=["--config", str(INSTANCE_CONFIG), f"--data.init_args.root={shapes}", "--trainer.logger=false",
              "--model.init_args.decoder", "{num_queries: 10, dim: 32, mask_dim: 32, num_layers: 1, ffn_dim: 64}"],
    )  # fmt: skip
    hparams = dict(cli.model.hparams)
    # merged key by key into the config's decoder (its iterations and masked attention stay)
    assert hparams["decoder"] == {**asdict(DecoderSettings()), **DECODER, "iterations": 3, "masked_attention": True}
    assert hparams["loss"] == asdict(SetLossSettings(num_points=1024))
    path = tmp_path / "cli.ckpt"
    cli.trainer.strategy.connect(cli.model)
    cli.trainer.save_checkpoint(path, weights_only=False)
    assert type(load_checkpoint(path)["hyper_parameters"]["decoder"]) is dict
    _, module = task_from_checkpoint(path)
    assert module.criterion.num_points == 1024 and len(module.model.decoder.layers) == 1
    state, other = cli.model.state_dict(), module.state_dict()
    assert list(state) == list(other) and all(torch.equal(state[k], other[k]) for k in state)
