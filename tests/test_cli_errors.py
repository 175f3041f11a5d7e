"""``clusterformer fit | validate``: bad input — a misspelled config key, a value of the wrong type, a setting a task or
data module refuses, a missing or empty dataset folder, a corrupt image met during training — is one line on stderr
naming the key or path, with exit status 2 (the traceback only with ``--verbose``); a fault keeps its traceback."""

from pathlib import Path

import pytest

from clusterformer.cli import main
from clusterformer.tasks import ClassificationTask

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "classification" / "clusterformer_nano_shapes.yaml"
PANOPTIC_CONFIG = ROOT / "configs" / "panoptic" / "clusterformer_nano_shapes.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def shapes(shapes_dir):
    return shapes_dir(seed=1, num_train=16, num_val=6, size=48)


def run(command: str, root, run_dir, *args, config=CONFIG) -> int:
    return main(
        [command, "--config", str(config), f"--data.init_args.root={root}", "--data.init_args.num_workers=0",
         "--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", "--run_dir", str(run_dir), *map(str, args)]
    )  # fmt: skip


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err), err
    return err[-1]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.init_args.lrr", "0.1"], "model.init_args.lrr: not an option of clusterformer.tasks."
         "ClassificationTask; did you mean lr?"),
        (["--model.init_args.lr", "fast"], "model.init_args.lr: expected a float, got 'fast'"),
        (["--data.init_args.batchsize", "3"], "data.init_args.batchsize: not an option of clusterformer.tasks."
         "ImageFolderData; did you mean batch_size?"),
        (["--trainer.max_stepz", "3"], "trainer.max_stepz: not an option; did you mean trainer.max_steps?"),
    ],
    ids=["model-key", "model-type", "data-key", "trainer-key"],
)  # fmt: skip
def test_a_misspelled_key_on_the_command_line_is_one_line_naming_it(args, expected, shapes, tmp_path, capsys):
    assert run("fit", shapes / "imagefolder", tmp_path / "run", *args) == 2
    assert capsys.readouterr().err.strip() == f"clusterformer fit: error: {expected}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("    lr: 1.0e-3", "    lrr: 1.0e-3", "model.init_args.lrr: not an option of clusterformer.tasks."
         "ClassificationTask; did you mean lr?"),
        ("  max_epochs: 8", "  max_epochz: 8", "trainer.max_epochz: not an option; did you mean trainer.max_epochs?"),
        ("  max_epochs: 8", "  max_epochs: [8", "{config}: not valid YAML (expected ',' or ']', but got ':', "
         "line 7, column 14)"),
    ],
    ids=["model-key", "trainer-key", "yaml"],
)  # fmt: skip
def test_a_misspelled_key_in_a_config_file_is_one_line_naming_it(old, new, expected, shapes, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.read_text().replace(old, new))
    assert run("fit", shapes / "imagefolder", tmp_path / "run", config=config) == 2
    assert capsys.readouterr().err.strip() == f"clusterformer fit: error: {expected.format(config=config)}"
    assert not (tmp_path / "run").exists()


def test_a_missing_or_empty_dataset_folder_is_one_line_naming_it(tmp_path, capsys):
    for root, problem in [
        (tmp_path / "nowhere", f"{tmp_path / 'nowhere' / 'train'}: training folder not found"),
        (tmp_path / "empty", f"{tmp_path / 'empty' / 'train'}: no class folders (expected one sub-folder per class)"),
    ]:
        (tmp_path / "empty" / "train").mkdir(parents=True, exist_ok=True)
        assert run("fit", root, tmp_path / "run") == 2
        assert capsys.readouterr().err.strip() == f"clusterformer fit: error: {problem}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.init_args.lr", "-0.1"], "model.init_args.lr: must be a positive number, got -0.1"),
        (["--data.init_args.batch_size", "0"], "data.init_args.batch_size: must be at least 1, got 0"),
        (["--model.init_args.model", "clusterformer_nanoo"], "model.init_args.model: no model named "
         "'clusterformer_nanoo'; did you mean clusterformer_nano or clusterformer_tiny?"),
        (["--model.init_args.num_classes", "5"], "model.init_args.num_classes: 5, but the dataset {root}/train has 4 "
         "classes (circle, square, star, triangle); set it to 4"),
    ],
    ids=["lr", "batch-size", "model-name", "num-classes"],
)  # fmt: skip
def test_settings_are_refused_before_anything_is_written(args, expected, shapes, tmp_path, capsys):
    root = shapes / "imagefolder"
    assert run("fit", root, tmp_path / "run", *args) == 2
    assert error_line(capsys) == f"clusterformer fit: error: {expected.format(root=root)}"
    assert not (tmp_path / "run").exists()  # no logs, config or on_exception checkpoint of a run that never was


def test_a_dense_task_refuses_the_class_count_of_its_dataset(shapes, tmp_path, capsys):
    assert run("fit", shapes, tmp_path / "run", "--model.init_args.num_classes", 8, config=PANOPTIC_CONFIG) == 2
    assert error_line(capsys) == (
        f"clusterformer fit: error: model.init_args.num_classes: 8, but the dataset "
        f"{shapes / 'annotations' / 'panoptic_val.json'} has 7 categories; set it to 7"
    )
    assert not (tmp_path / "run").exists()


def test_validate_names_a_missing_checkpoint(shapes, tmp_path, capsys):
    assert run("validate", shapes / "imagefolder", tmp_path / "run", "--ckpt_path", tmp_path / "no.ckpt") == 2
    assert error_line(capsys) == f"clusterformer validate: error: {tmp_path / 'no.ckpt'}: checkpoint file not found " \
        "(ckpt_path)"  # fmt: skip


def test_verbose_shows_the_traceback_before_the_line(shapes, tmp_path, capsys):
    assert run("fit", shapes / "imagefolder", tmp_path / "run", "--verbose", "--model.init_args.lr", "-1") == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback (most recent call last)" in err and "SettingError" in err
    assert err.splitlines()[-1] == "clusterformer fit: error: model.init_args.lr: must be a positive number, got -1.0"


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_stops_training_with_one_line_and_keeps_the_state(workers, shapes, tmp_path, capsys):
    import shutil

    root = tmp_path / "imagefolder"
    shutil.copytree(shapes / "imagefolder", root)
    corrupt = sorted((root / "train" / "star").iterdir())[0]
    corrupt.write_bytes(b"not an image")
    # one batch holds every training image: the corrupt one is read in the first step
    assert run("fit", root, tmp_path / "run", f"--data.init_args.num_workers={workers}") == 2
    saved = tmp_path / "run" / "checkpoints" / "on_exception.ckpt"
    line = error_line(capsys)
    assert line.startswith(f"clusterformer fit: error: {corrupt}: not a readable image (")
    assert line.endswith(f"; the state at the interruption is in {saved}: continue with --ckpt_path last once fixed")
    assert saved.is_file()


def test_a_fault_is_not_taken_for_bad_input(shapes, tmp_path, monkeypatch):
    def broken(self, batch, batch_idx):
        raise ValueError("a bug in the training step")

    monkeypatch.setattr(ClassificationTask, "training_step", broken)
    with pytest.raises(ValueError, match="a bug in the training step"):  # its traceback, exit status 1
        run("fit", shapes / "imagefolder", tmp_path / "run")
