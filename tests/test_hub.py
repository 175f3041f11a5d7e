"""Hugging Face-style folders (clusterformer.hub): bit-for-bit round trips of every task and of the timm backbone,
loading with timm, the model card, overwrite refusal, bad folders, push_to_hub (a recording HfApi) and `convert
--format pretrained`."""

import json
import os
import subprocess
import sys
import warnings

import huggingface_hub
import lightning as L
import pytest
import timm
import torch
import yaml
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file, save_file

import clusterformer  # noqa: F401  (registers the models)
from clusterformer import ClusterFormer
from clusterformer.cli import main
from clusterformer.hub import (
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    from_pretrained,
    load_backbone,
    push_to_hub,
    save_pretrained,
)
from clusterformer.outputs import OutputExistsError
from clusterformer.tasks import ClassificationTask, PanopticTask, SemanticTask, SetTask
from clusterformer.weights import CheckpointError, TaskModel, load_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

DECODER = dict(num_queries=6, dim=32, mask_dim=32, num_layers=2, num_heads=4, iterations=1, ffn_dim=64)
IMAGES = torch.Generator().manual_seed(1)


def images(size: int = 64) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=IMAGES)


def make_task(task: str):
    """A small randomly initialised task module (ClusterFormer-Nano, a two-layer decoder)."""
    torch.manual_seed(0)
    if task == "classification":
        return ClassificationTask("clusterformer_nano", num_classes=3, model_kwargs={"center_grid": 4})
    if task in ("detection", "instance"):
        return SetTask(task, "clusterformer_nano", num_classes=4, decoder=DECODER)
    decoder = {k: v for k, v in DECODER.items() if k != "num_queries"}
    if task == "semantic":
        return SemanticTask("clusterformer_nano", num_classes=5, decoder=decoder)
    return PanopticTask("clusterformer_nano", num_classes=5, num_things=3, decoder=DECODER)


def assert_identical(got, expected, where="outputs"):
    """Equal tensors (bit for bit) in the same nesting of dicts, lists and tuples."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(got, expected), where
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            assert_identical(got[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert len(got) == len(expected), where
        for index, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_identical(a, b, f"{where}[{index}]")
    else:
        assert got == expected, where


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture(scope="module")
def instance_folder(tmp_path_factory):
    module = make_task("instance").eval()
    return module, save_pretrained(module, tmp_path_factory.mktemp("hub") / "instance")


@pytest.mark.parametrize("task", ["classification", "detection", "instance", "semantic", "panoptic"])
def test_every_task_round_trips_bit_for_bit(task, tmp_path):
    module = make_task(task).eval()
    folder = module.save_pretrained(tmp_path / task)
    assert sorted(p.name for p in folder.iterdir()) == sorted([CARD_NAME, CONFIG_NAME, WEIGHTS_NAME])
    loaded = from_pretrained(folder)
    assert isinstance(loaded, TaskModel) and loaded.task == task and type(loaded.module) is type(module)
    assert not loaded.module.training
    assert len(loaded.classes) == len(loaded.categories) == module.hparams.num_classes
    assert loaded.data["mean"] == list(timm.data.IMAGENET_DEFAULT_MEAN)
    again = type(module).from_pretrained(folder)  # the class method gives the module itself
    batch = images()
    with torch.no_grad():
        expected = module(batch)
        assert_identical(loaded.module(batch), expected)
        assert_identical(again(batch), expected)
        assert_identical(load_weights(folder / CONFIG_NAME)(batch), expected)  # the convert pair's reader too
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["format"] == "clusterformer-weights" and config["task"] == task
    assert config["library_version"] == clusterformer.__version__
    card = (folder / CARD_NAME).read_text()
    expected_tag = {"classification": "image-classification", "detection": "object-detection"}
    assert front_matter(card)["pipeline_tag"] == expected_tag.get(task, "image-segmentation")


def test_a_folder_of_another_task_is_refused_by_the_class_method(instance_folder):
    with pytest.raises(CheckpointError, match="holds a instance model, not a SemanticTask"):
        SemanticTask.from_pretrained(instance_folder[1])


def test_backbone_round_trips_and_loads_with_timm(tmp_path):
    torch.manual_seed(0)
    encoder = timm.create_model("clusterformer_nano", num_classes=0, center_grid=4, iterations=2).eval()
    folder = encoder.save_pretrained(tmp_path / "encoder")
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["backbone_only"] and config["num_classes"] == 0
    assert config["model_args"]["center_grid"] == 4 and config["model_args"]["iterations"] == 2
    assert front_matter((folder / CARD_NAME).read_text())["pipeline_tag"] == "image-feature-extraction"
    batch = images()
    with torch.no_grad():
        expected = encoder(batch)
        assert torch.equal(ClusterFormer.from_pretrained(folder)(batch), expected)
        by_file = timm.create_model(
            "clusterformer_nano", pretrained=True, num_classes=0, center_grid=4, iterations=2,
            pretrained_cfg_overlay=dict(file=str(folder / WEIGHTS_NAME)),
        ).eval()  # fmt: skip
        assert torch.equal(by_file(batch), expected)
        assert torch.equal(timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(batch), expected)
    with pytest.raises(CheckpointError, match="an encoder without a task head.*load_backbone"):
        from_pretrained(folder)


def test_classifier_folder_loads_with_timm(tmp_path):
    torch.manual_seed(0)
    classifier = timm.create_model("clusterformer_nano", num_classes=3).eval()
    folder = save_pretrained(classifier, tmp_path / "classifier")
    file = str(folder / WEIGHTS_NAME)
    batch = images()
    with torch.no_grad():
        expected = classifier(batch)
        # the file and the number of classes: timm keeps the encoder (its pretrained config says 1000 classes)
        model = timm.create_model(
            "clusterformer_nano", pretrained=True, pretrained_cfg_overlay=dict(file=file), num_classes=3
        ).eval()
        assert torch.equal(model.forward_features(batch), classifier.forward_features(batch))
        # with the classes in the overlay too, the head as well
        model = timm.create_model(
            "clusterformer_nano", pretrained=True, pretrained_cfg_overlay=dict(file=file, num_classes=3), num_classes=3
        ).eval()
        assert torch.equal(model(batch), expected)
        assert torch.equal(timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(batch), expected)
        loaded = from_pretrained(folder)  # a classifier is a classification task model
        assert loaded.task == "classification" and torch.equal(loaded.module(batch), expected)
        assert torch.equal(ClusterFormer.from_pretrained(folder)(batch), expected)


def test_dense_folder_encoder_loads_with_timm(instance_folder):
    module, folder = instance_folder
    batch = images()
    with torch.no_grad():
        expected = module.model.backbone.forward_features(batch)
        by_file = timm.create_model(
            "clusterformer_nano", pretrained=True, num_classes=0,
            pretrained_cfg_overlay=dict(file=str(folder / WEIGHTS_NAME)),
        ).eval()  # fmt: skip
        for encoder in (by_file, timm.create_model(f"local-dir:{folder}", pretrained=True), load_backbone(folder)):
            assert encoder.num_classes == 0
            assert torch.equal(encoder.eval().forward_features(batch), expected)


@pytest.fixture(scope="module")
def trained_checkpoint(shapes_dir, tmp_path_factory):
    """A classification checkpoint after one training step and one validation, with its best-checkpoint callback."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from clusterformer.tasks import ImageFolderData

    root = shapes_dir(seed=3, num_train=8, num_val=4, size=48) / "imagefolder"
    data = ImageFolderData(str(root), img_size=32, eval_resize=36, batch_size=4, num_workers=0, randaugment=False)
    out = tmp_path_factory.mktemp("trained")
    L.seed_everything(0, verbose=False)
    module = ClassificationTask("clusterformer_nano", num_classes=len(data.classes), model_kwargs={"center_grid": 4})
    best = ModelCheckpoint(dirpath=out, monitor="val/top1", mode="max", filename="best")
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
        logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[best],
        default_root_dir=str(out),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    trainer.save_checkpoint(out / "last.ckpt")
    return out / "last.ckpt", data.classes, module.eval()


def test_a_checkpoint_folder_keeps_classes_data_settings_and_stored_metrics(trained_checkpoint, tmp_path):
    path, classes, module = trained_checkpoint
    assert "clusterformer_metrics" in torch.load(path, weights_only=True)  # stored by the task
    folder = save_pretrained(path, tmp_path / "folder", command="clusterformer fit --config nano.yaml")
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["classes"] == classes and config["label_names"] == classes
    assert config["data"]["img_size"] == 32 and config["data"]["eval_resize"] == 36
    assert not {"root", "train_dir", "val_dir"} & set(config["data"])  # no local paths in a shared folder
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["pretrained_cfg"]["crop_pct"] == 32 / 36
    metrics = config["metrics"]
    assert "val/top1" in metrics and "val/top1 (best)" in metrics
    card = (folder / CARD_NAME).read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "clusterformer" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "image-classification" and "clusterformer" in meta["tags"]
    for name, value in metrics.items():
        assert f"| {name} | {value:.4g} |" in card
    assert "the last validation before step 1" in card and "clusterformer fit --config nano.yaml" in card
    assert all(f"| {name} |" in card for name in classes) and "ImageFolder dataset (folder `imagefolder`)" in card
    loaded = from_pretrained(folder)
    assert loaded.classes == classes and loaded.data["img_size"] == 32
    with torch.no_grad():
        batch = images(32)
        assert torch.equal(loaded.module(batch), module(batch))


def test_given_metrics_replace_the_stored_ones_and_nested_ones_are_flattened(trained_checkpoint, tmp_path):
    metrics = {"test/top1": 0.75, "IoU": {"0": 0.5, "1": None}}
    folder = save_pretrained(trained_checkpoint[0], tmp_path / "folder", metrics=metrics, training_data="shapes v1")
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["metrics"] == {"test/top1": 0.75, "IoU/0": 0.5, "IoU/1": None}
    card = (folder / CARD_NAME).read_text()
    assert "| test/top1 | 0.75 |" in card and "| IoU/1 | n/a |" in card and "val/top1" not in card
    assert "Shapes v1." in card
    with pytest.raises(ValueError, match="metrics: metric 'top1' is 'high', not a number"):
        save_pretrained(trained_checkpoint[0], tmp_path / "bad", metrics={"top1": "high"})


def test_a_non_empty_folder_is_refused_unless_overwrite(tmp_path):
    module = make_task("classification")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="output folder is not empty \\(notes.txt\\); pass --overwrite"):
        save_pretrained(module, folder)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    save_pretrained(module, folder, overwrite=True)
    assert (folder / CONFIG_NAME).is_file() and (folder / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputExistsError, match="is a file; the output is a folder"):
        save_pretrained(module, tmp_path / "file")


def copy_folder(folder, to):
    to.mkdir()
    for path in folder.iterdir():
        (to / path.name).write_bytes(path.read_bytes())
    return to


def test_bad_folders_are_named_with_their_problem(instance_folder, tmp_path):
    folder = instance_folder[1]
    with pytest.raises(CheckpointError, match="missing: not found, or not a folder"):
        from_pretrained(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=f"{empty / CONFIG_NAME}: not found; a pretrained folder holds"):
        from_pretrained(empty)
    broken = copy_folder(folder, tmp_path / "broken")
    (broken / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{broken / CONFIG_NAME}: not a readable JSON description"):
        from_pretrained(broken)
    no_weights = copy_folder(folder, tmp_path / "no_weights")
    (no_weights / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match=f"{no_weights / WEIGHTS_NAME}: weights not found"):
        from_pretrained(no_weights)
    truncated = copy_folder(folder, tmp_path / "truncated")
    (truncated / WEIGHTS_NAME).write_bytes((folder / WEIGHTS_NAME).read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{truncated / WEIGHTS_NAME}: not a safetensors file"):
        from_pretrained(truncated)
    # the weights of another model (a classifier's file under the instance model's config)
    other = copy_folder(folder, tmp_path / "other")
    save_pretrained(make_task("classification"), tmp_path / "classifier")
    (other / WEIGHTS_NAME).write_bytes((tmp_path / "classifier" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(CheckpointError, match="another model than config.json describes \\(task 'classification'"):
        from_pretrained(other)
    # keys and shapes that do not fit, under the right metadata
    state = load_file(str(folder / WEIGHTS_NAME))
    metadata = {"format": "pt", "task": "instance", "model": "clusterformer_nano", "num_classes": "4"}
    missing = dict(state)
    missing.pop(next(k for k in state if k.startswith("decoder.")))
    resized = dict(state)
    resized[next(k for k in state if k.startswith("decoder.") and state[k].ndim == 2)] = torch.zeros(3, 3)
    for name, edited in (("keys", missing), ("shapes", resized)):
        bad = copy_folder(folder, tmp_path / name)
        save_file(edited, str(bad / WEIGHTS_NAME), metadata=metadata)
        with pytest.raises(CheckpointError, match=f"{bad / WEIGHTS_NAME}: the weights do not fit the instance model"):
            from_pretrained(bad)


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records the calls and what the uploaded folder holds."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, commit_message=None, revision=None, **kwargs):
        from pathlib import Path

        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        self.calls.append(("upload_folder", repo_id, commit_message, files))
        return "https://huggingface.co/" + repo_id


def test_push_to_hub_uploads_the_folder(monkeypatch, instance_folder, tmp_path):
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    RecordingHfApi.calls = []
    module, folder = instance_folder
    assert push_to_hub(module, "someone/nano-instance", metrics={"val/segm_AP": 0.1}, private=True).endswith("ance")
    (create, repo, private, exist_ok), upload = RecordingHfApi.calls
    assert (create, repo, private, exist_ok) == ("create_repo", "someone/nano-instance", True, True)
    assert upload[0] == "upload_folder" and sorted(upload[3]) == sorted([CARD_NAME, CONFIG_NAME, WEIGHTS_NAME])
    assert "| val/segm_AP | 0.1 |" in upload[3][CARD_NAME].decode()
    assert_identical(safetensors_load(upload[3][WEIGHTS_NAME]), load_file(str(folder / WEIGHTS_NAME)))
    # a folder: its three files, checked first
    RecordingHfApi.calls = []
    copy = copy_folder(folder, tmp_path / "copy")
    (copy / "notes.txt").write_text("local")
    push_to_hub(copy, "someone/copy")
    assert sorted(RecordingHfApi.calls[1][3]) == sorted([CARD_NAME, CONFIG_NAME, WEIGHTS_NAME])
    with pytest.raises(ValueError, match="written with the folder"):
        push_to_hub(copy, "someone/copy", metrics={"x": 1})
    (copy / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match="weights not found"):
        push_to_hub(copy, "someone/copy")


def test_convert_command_writes_a_pretrained_folder(trained_checkpoint, tmp_path, capsys):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"top1": 0.5, "top5": 1.0}))
    out = tmp_path / "folder"
    argv = ["convert", "--ckpt", str(trained_checkpoint[0]), "--out", str(out), "--format", "pretrained"]
    assert main([*argv, "--metrics-json", str(metrics)]) == 0
    assert capsys.readouterr().err == f"wrote {out}\n"
    card = (out / CARD_NAME).read_text()
    assert "| top1 | 0.5 |" in card and "| top5 | 1 |" in card and "--format pretrained" in card
    assert from_pretrained(out).task == "classification"
    assert main(argv) == 2  # the folder holds the first run's files
    assert "output folder is not empty" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--command", "clusterformer fit -c a.yaml"]) == 0
    assert "clusterformer fit -c a.yaml" in (out / CARD_NAME).read_text()
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    cases = [
        ([*argv, "--overwrite", "--metrics-json", str(bad)], f"{bad}: metrics must be a mapping"),
        ([*argv, "--overwrite", "--backbone-only"], "--backbone-only: only with --format safetensors"),
        ([*argv[:5], "--metrics-json", str(metrics)], "--metrics-json: only with --format pretrained"),
    ]
    for arguments, message in cases:
        assert main(arguments) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_the_backbone_saves_and_loads_without_lightning(tmp_path):
    code = (
        "import sys, timm, torch, clusterformer\n"
        "model = timm.create_model('clusterformer_nano', num_classes=2).eval()\n"
        f"folder = model.save_pretrained({str(tmp_path / 'f')!r})\n"
        "again = clusterformer.ClusterFormer.from_pretrained(folder)\n"
        "x = torch.randn(1, 3, 64, 64)\n"
        "assert torch.equal(model(x), again(x))\n"
        "assert 'lightning' not in sys.modules, 'lightning imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
