"""``clusterformer fit`` resumes only when asked: a rerun into the folder of an earlier run is refused (exit 2,
one line), ``--run_dir`` starts a new run in a folder of its own, ``--ckpt_path`` continues one."""

from pathlib import Path

import pytest
import torch

from clusterformer.cli import main
from clusterformer.data import make_shapes
from clusterformer.tasks import ClassificationTask

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "classification" / "clusterformer_nano_shapes.yaml"
RUN = Path("runs/classification/clusterformer_nano_shapes")  # the config's folder, relative to the working folder

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, seed=1, num_train=16, num_val=6, size=48, progress=False)
    return out / "imagefolder"


def fit(crops, *args) -> int:
    return main(
        ["fit", "--config", str(CONFIG), f"--data.init_args.root={crops}", "--data.init_args.num_workers=0",
         "--data.init_args.batch_size=4", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *map(str, args)]
    )  # fmt: skip


def step_and_lr(path: Path) -> tuple[int, float, float]:
    """The global step, the learning rate the checkpoint records and the one its optimizer was built with."""
    checkpoint = torch.load(path, weights_only=True)
    initial = checkpoint["optimizer_states"][0]["param_groups"][0]["initial_lr"]
    return checkpoint["global_step"], checkpoint["hyper_parameters"]["lr"], initial


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_a_rerun_is_refused_and_a_new_run_dir_trains_from_scratch(crops, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert fit(crops) == 0
    last = RUN / "checkpoints" / "last.ckpt"
    assert step_and_lr(last) == (2, 1e-3, 1e-3)
    written = last.read_bytes()
    capsys.readouterr()
    assert fit(crops, "--model.init_args.lr", 0.05) == 2  # used to resume silently, with the old optimizer
    err = one_line_error(capsys)
    assert err.startswith(f"clusterformer fit: error: {tmp_path / RUN / 'checkpoints'}: holds the checkpoints of "
                          "an earlier run (last.ckpt)")  # fmt: skip
    assert "--ckpt_path last" in err and "--run_dir DIR" in err
    assert last.read_bytes() == written
    assert fit(crops, "--model.init_args.lr", 0.05, "--run_dir", "runs/lr005") == 0
    assert step_and_lr(Path("runs/lr005/checkpoints/last.ckpt")) == (2, 0.05, 0.05)  # a new run, from step 0
    assert last.read_bytes() == written
    # continuing the new run: from its own saved config (which holds its --run_dir), not into the first run's folder
    second = Path("runs/lr005/checkpoints/last.ckpt")
    capsys.readouterr()
    assert fit(crops, "--model.init_args.lr", 0.05, "--trainer.max_steps=3", "--ckpt_path", second) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"clusterformer fit: error: {tmp_path / RUN / 'checkpoints'}: holds the checkpoints of "
                          f"another run (last.ckpt) than {tmp_path / second}")  # fmt: skip
    saved = next(Path("runs/lr005").rglob("config.yaml"))
    assert main(["fit", "--config", str(saved), "--trainer.max_steps=3", "--ckpt_path", "last"]) == 0
    assert step_and_lr(second) == (3, 0.05, 0.05) and last.read_bytes() == written


def test_resuming_is_asked_for_with_ckpt_path_after_an_interruption(crops, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    training_step = ClassificationTask.training_step

    def interrupted(self, batch, batch_idx):
        if self.global_step == 1:
            raise RuntimeError("interrupted")
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(ClassificationTask, "training_step", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(crops)
    monkeypatch.setattr(ClassificationTask, "training_step", training_step)
    saved = RUN / "checkpoints" / "on_exception.ckpt"  # OnExceptionCheckpoint: the state at the interruption
    assert step_and_lr(saved)[0] == 1
    capsys.readouterr()
    assert fit(crops) == 2
    assert "(on_exception.ckpt)" in one_line_error(capsys)
    assert fit(crops, "--trainer.max_steps=3", "--ckpt_path", "last") == 0  # the newest last / on_exception file
    assert step_and_lr(RUN / "checkpoints" / "last.ckpt") == (3, 1e-3, 1e-3)
    capsys.readouterr()
    last = RUN / "checkpoints" / "last.ckpt"
    assert fit(crops, "--trainer.max_steps=4", "--ckpt_path", last, "--model.init_args.lr", 0.05) == 2
    assert one_line_error(capsys) == (
        f"clusterformer fit: error: {tmp_path / last}: the model's settings differ from the checkpoint's (lr 0.001 "
        "-> 0.05); resume with the run's own settings (its config.yaml), or start a new run with --run_dir DIR"
    )
    assert fit(crops, "--trainer.max_steps=4", "--ckpt_path", last) == 0
    assert step_and_lr(last)[0] == 4
