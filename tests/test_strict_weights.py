"""Weight files load strictly on everything but the classifier: through timm's ``pretrained_cfg_overlay`` (where timm
itself loads non-strictly when it drops the head: another ``num_classes``, ``features_only``) and through a dense
task's ``backbone_kwargs``. A file that does not fit is an error naming the file, the missing weights and the keys
that belong to nothing; ``clusterformer fit`` prints it as one line and exits with status 2."""

from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import save_file

import clusterformer  # noqa: F401  (registers the models)
from clusterformer.backbone import CLASSIFIER_KEYS
from clusterformer.cli import main
from clusterformer.tasks import ClassificationTask
from clusterformer.weights import CheckpointError, convert_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DETECTION = ROOT / "configs" / "detection" / "clusterformer_nano_shapes.yaml"
IMAGES = torch.randn(2, 3, 64, 64)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    return timm.create_model("clusterformer_nano", num_classes=3).eval()


def save(state: dict, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def load(path: Path, **kwargs):
    return timm.create_model("clusterformer_nano", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             **kwargs).eval()  # fmt: skip


def encoder_keys(model) -> list[str]:
    return [k for k in model.state_dict() if not k.startswith(CLASSIFIER_KEYS)]  # head, head_norm


@pytest.mark.parametrize("options", [dict(num_classes=4), dict(features_only=True)], ids=["num_classes", "features"])
def test_a_file_of_other_keys_is_refused(options, nano, tmp_path):
    bad = save({"foo.weight": torch.zeros(3)}, tmp_path / "bad.safetensors")
    count = len(encoder_keys(nano))
    with pytest.raises(CheckpointError) as raised:
        load(bad, **options)
    message = str(raised.value)
    assert message.startswith(
        f"{bad}: the weights do not fit the encoder of clusterformer_nano: {count} of its {count} weights are missing "
        "(stem.proj.weight, stem.proj.bias, stem.norm.weight, ...) and 1 key belongs to no part of it (foo.weight); "
    )
    assert "\n" not in message


def test_a_classification_task_refuses_them_too(tmp_path):
    bad = save({"foo.weight": torch.zeros(3)}, tmp_path / "bad.safetensors")
    options = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(bad)}}
    with pytest.raises(CheckpointError, match=r"bad.safetensors: the weights do not fit .* \(foo.weight\); "):
        ClassificationTask(model="clusterformer_nano", num_classes=4, model_kwargs=options)


def test_a_right_file_with_another_head_loads_the_encoder_exactly(nano, tmp_path):
    good = save(nano.state_dict(), tmp_path / "nano.safetensors")
    model = load(good, num_classes=4)
    assert model.head.out_features == 4
    loaded = model.state_dict()
    for key, value in nano.state_dict().items():
        if not key.startswith("head."):
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(IMAGES), nano.forward_features(IMAGES), rtol=0, atol=0)
        features = load(good, features_only=True)(IMAGES)[-1]
        torch.testing.assert_close(features, nano.forward_intermediates(IMAGES, intermediates_only=True)[-1])


def test_a_classifier_file_initialises_an_encoder_without_its_classifier(nano, tmp_path):
    """The classifier of a file is its head and the center head's norm (``head_norm``): a model without a
    classifier (a dense task's encoder) or with another one takes the rest, and nothing of the file is missing."""
    assert any(k.startswith("head_norm.") for k in nano.state_dict())
    good = save(nano.state_dict(), tmp_path / "classifier.safetensors")
    encoder = load(good, num_classes=0)
    assert not any(k.startswith("head_norm.") for k in encoder.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.forward_dense(IMAGES)[0][-1], nano.forward_dense(IMAGES)[0][-1], rtol=0, atol=0
        )
    tokens = load(good, num_classes=4, head="tokens")  # a new token head on the file's encoder
    torch.testing.assert_close(tokens.stem.proj.weight, nano.stem.proj.weight, rtol=0, atol=0)


def test_a_missing_weight_or_an_extra_key_is_named(nano, tmp_path):
    state = nano.state_dict()
    dropped = "stages.1.blocks.0.mlp.fc1.weight"
    partial = save({k: v for k, v in state.items() if k != dropped}, tmp_path / "partial.safetensors")
    with pytest.raises(
        CheckpointError, match=rf"partial.safetensors: .*: 1 of its \d+ weights are missing \({dropped}\);"
    ):
        load(partial, num_classes=4)
    extra = save({**state, "stages.1.blocks.0.extra": torch.zeros(2)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"extra.safetensors: .*: 1 key belongs to no part of it \(stages.1.bl"):
        load(extra, num_classes=4)
    # pretrained_strict=False asks for a partial load: what matches is loaded, the rest keeps its initialisation
    model = load(partial, num_classes=4, pretrained_strict=False)
    torch.testing.assert_close(model.stem.proj.weight, nano.stem.proj.weight, rtol=0, atol=0)


def test_weights_of_another_width_are_refused(tmp_path):
    narrow = timm.create_model("clusterformer_nano", embed_dims=(16, 32, 64, 128), num_classes=0)
    path = save(narrow.state_dict(), tmp_path / "narrow.safetensors")
    with pytest.raises(CheckpointError, match=r"narrow.safetensors: .*: \d+ tensors of another shape \(stem.proj.bias"):
        load(path, num_classes=0)


def test_weights_of_the_literal_m_step_name_the_setting(tmp_path):
    torch.manual_seed(0)
    literal = timm.create_model("clusterformer_nano", m_step="sum", num_classes=0).eval()
    path = save(literal.state_dict(), tmp_path / "literal.safetensors")
    with pytest.raises(CheckpointError, match=r"literal.safetensors: .*q_norm.*build the model with m_step='sum'$"):
        load(path, num_classes=4)
    model = load(path, num_classes=4, m_step="sum")
    with torch.no_grad():  # the encoder's features (the classifier of 4 classes reads the centers, not these)
        for a, b in zip(model.forward_dense(IMAGES)[0], literal.forward_dense(IMAGES)[0], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def save_checkpoint(module: L.LightningModule, path: Path) -> None:
    """A checkpoint as Lightning writes it during training, without training."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)  # fmt: skip
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path, weights_only=False)


def fit_detection(shapes, *args) -> int:
    return main(
        ["fit", "--config", str(DETECTION), "--trainer.fast_dev_run=true", f"--data.init_args.root={shapes}",
         "--data.init_args.num_workers=0", "--data.init_args.batch_size=2", "--data.init_args.crop=64",
         "--data.init_args.test_shorter_side=64", *map(str, args)]
    )  # fmt: skip


def test_fit_with_backbone_weights_that_do_not_fit_is_refused(shapes_dir, tmp_path, monkeypatch, capsys):
    """Used to train the detector from a random encoder with exit status 0."""
    shapes = shapes_dir(seed=3, num_train=12, num_val=7, size=64)
    monkeypatch.chdir(tmp_path)
    bad = save({"foo.weight": torch.zeros(3)}, tmp_path / "bad.safetensors")
    count = len(encoder_keys(timm.create_model("clusterformer_nano", num_classes=0)))
    pretrained = '{"pretrained": true, "pretrained_cfg_overlay": {"file": "%s"}}'
    capsys.readouterr()
    assert fit_detection(shapes, "--model.init_args.backbone_kwargs", pretrained % bad, "--run_dir", "bad") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(
        f"clusterformer fit: error: {bad}: the weights do not fit the encoder of clusterformer_nano: {count} of its "
        f"{count} weights are missing (stem.proj.weight, "
    )
    assert "1 key belongs to no part of it (foo.weight)" in err[0]
    assert not Path("bad").exists()
    # the encoder of a classifier, as 'convert --backbone-only' writes it, trains
    save_checkpoint(ClassificationTask(model="clusterformer_nano", num_classes=3), tmp_path / "cls.ckpt")
    encoder, _ = convert_checkpoint(tmp_path / "cls.ckpt", tmp_path / "encoder", backbone_only=True)
    assert fit_detection(shapes, "--model.init_args.backbone_kwargs", pretrained % encoder, "--run_dir", "good") == 0
