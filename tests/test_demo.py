"""The demo runs every stage on a tiny dataset and writes its report; a run stopped by a signal says which stage
was stopped and exits non-zero, and ``--resume`` finishes it with the report of an uninterrupted run."""

import json
import signal
import subprocess
import sys
import textwrap

import pytest

from clusterformer.cli import main
from clusterformer.commands.demo import (
    PRESETS,
    SHOWN,
    STAGE_NAMES,
    TARGETS,
    DemoInterrupted,
    finished_stages,
    prepare_demo_folder,
    run_demo,
    target_lines,
    target_rows,
)

# every entry of a preset, tiny: one demo run takes seconds of training
TINY = dict(num_train=16, num_val=6, size=64, epochs=1, detection_epochs=1, set_epochs=1, semantic_epochs=1,
            panoptic_epochs=1)  # fmt: skip
SEED = 1
TASKS = ("classification", "detection", "instance", "semantic", "panoptic")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py; the runs below compare as equal with one thread


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, one_thread):
    """A tiny demo run from start to end: its folder and the metrics it returned."""
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, seed=SEED, num_workers=0, **TINY)


def test_demo_writes_a_report(uninterrupted):
    tmp_path, metrics = uninterrupted
    report = tmp_path / "report"
    assert json.loads((report / "metrics.json").read_text()) == metrics
    for task in ("classification", "detection", "instance", "semantic", "panoptic"):
        for picture in ("curve", "predictions"):
            assert (report / f"{task}_{picture}.png").stat().st_size > 0, (task, picture)
        assert (tmp_path / task / "checkpoints" / "last.ckpt").exists(), task
    assert (report / "report.md").stat().st_size > 0
    assert 0 <= metrics["classification"]["trained"]["val/top1"] <= 1
    for task, key in (("detection", "val/bbox_AP50"), ("detection", "val/bbox_AP"), ("instance", "val/segm_AP50"),
                      ("instance", "val/segm_AP"), ("instance", "val/bbox_AP50")):  # fmt: skip
        assert 0 <= metrics[task]["trained"][key] <= 1
    for task, key in (("semantic", "val/mIoU"), ("panoptic", "val/PQ"), ("panoptic", "val/PQ_th")):
        assert 0 <= metrics[task]["trained"][key] <= 1
    text = (report / "report.md").read_text()
    names = ("top-1", "box AP50", "box AP50 (boxes around the masks)", "mask AP50", "mIoU", "PQ things", "PQ stuff")
    for name in names:
        assert f"| {name} |" in text, name
    # the run against its preset's targets (the full preset's, changed by the tiny options): the tiny models
    # miss them, and the report says which
    assert metrics["preset"] == "full (changed)"
    assert [(row["task"], row["metric"]) for row in metrics["targets"]] == [("all", "seconds"), *TARGETS["full"]]
    assert "## Targets of the full (changed) preset" in text
    missed = [f"{row['task']} {row['metric']}" for row in metrics["targets"] if not row["met"]]
    assert "detection val/bbox_AP50" in missed and f"Missed: {', '.join(missed)}." in text
    # demo.json records every stage as finished: --resume would load them all, unless what one left has changed
    record = json.loads((tmp_path / "demo.json").read_text())
    options = {**TINY, "seed": SEED}
    assert record["finished"] and list(finished_stages(tmp_path, record, options)) == list(STAGE_NAMES)
    record["stages"]["detection"]["global_step"] += 1  # not the checkpoint that the stage finished with
    assert list(finished_stages(tmp_path, record, options)) == ["data", "classification"]
    record["stages"]["classification"]["pictures"].append("report/missing.png")
    assert list(finished_stages(tmp_path, record, options)) == ["data"]


def test_a_folder_of_another_demo_run_or_other_files_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "demo.json").write_text(json.dumps({"options": {**PRESETS["full"], "seed": 0}}))
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"clusterformer demo: error: {tmp_path}: holds a demo run with other options (num_train")
    assert "--overwrite" in err and len(err.splitlines()) == 1
    (tmp_path / "demo.json").unlink()
    (tmp_path / "notes.txt").write_text("x")
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 2
    assert "output folder is not empty (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_the_same_options_may_rerun_and_overwrite_removes_the_earlier_run(tmp_path):
    options = {**PRESETS["quick"], "seed": 0}
    prepare_demo_folder(tmp_path, options)
    for name in ("data", "classification", "report"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "old.txt").write_text("earlier run")
    (tmp_path / "notes.txt").write_text("not the demo's")
    prepare_demo_folder(tmp_path, options)  # the same options: the run replaces its files one by one
    assert (tmp_path / "report" / "old.txt").exists()
    prepare_demo_folder(tmp_path, {**options, "seed": 1}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json", "notes.txt"]
    assert json.loads((tmp_path / "demo.json").read_text())["options"]["seed"] == 1


# ``clusterformer demo --quick`` on the TINY preset, with a training step of one stage announcing itself on stdout and
# waiting there for the signal that the test then sends
STOPPED = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from clusterformer.commands import demo
    from clusterformer.cli import main
    from clusterformer.tasks import ClassificationTask, SetTask

    torch.set_num_threads(1)
    out, tiny, seed, task, kind = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    demo.PRESETS["quick"] = tiny
    Task = {"classification": ClassificationTask, "sets": SetTask}[task]
    training_step = Task.training_step

    def announced(self, batch, batch_idx):
        if task == "classification" or self.hparams.task == kind:
            print("TRAINING", kind, flush=True)
            time.sleep(60)
        return training_step(self, batch, batch_idx)

    Task.training_step = announced
    raise SystemExit(main(["demo", "--out", out, "--quick", "--seed", seed, "--num-workers", "0"]))
    """
)


def stopped_demo(out, task: str, kind: str, signum: int) -> tuple[int, str, str]:
    """Run the demo in a process of its own and send it ``signum`` in the first training step of ``task``
    (``kind``: the SetTask's kind); returns its exit status, stdout and stderr."""
    errors = out.parent / f"{out.name}.stderr"
    with open(errors, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", STOPPED, str(out), json.dumps(TINY), str(SEED), task, kind],
            stdout=subprocess.PIPE, stderr=stderr, text=True,
        )  # fmt: skip
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "TRAINING" in line:  # after a progress bar's carriage-return output, where one is shown
                process.send_signal(signum)
                break
        lines.append(process.stdout.read())
        status = process.wait(timeout=600)
    return status, "".join(lines), errors.read_text()


def test_a_demo_stopped_by_sigterm_says_where_and_resume_finishes_it_as_an_uninterrupted_run(
    uninterrupted, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "demo"
    status, stdout, stderr = stopped_demo(out, "sets", "instance", signal.SIGTERM)
    assert status == 143, stderr[-3000:]  # Lightning's own SIGTERM handling made it 0
    assert "[4/6] instance segmentation" in stdout and "[5/6]" not in stdout
    assert stderr.strip().splitlines()[-1] == (
        f"clusterformer demo: {out}: interrupted by SIGTERM during stage 4/6 (instance segmentation); stages 1-3 "
        "are finished and kept; rerun with --resume to continue from stage 4"
    )
    record = json.loads((out / "demo.json").read_text())
    assert list(record["stages"]) == ["data", "classification", "detection"] and not record["finished"]
    assert not (out / "report" / "metrics.json").exists()
    kept = {name: (out / name / "checkpoints" / "last.ckpt").stat().st_mtime_ns for name in TASKS[:2]}
    kept["data"] = (out / "data" / "shapes.json").stat().st_mtime_ns

    monkeypatch.setitem(PRESETS, "quick", TINY)
    command = ["demo", "--out", str(out), "--quick", "--seed", str(SEED), "--num-workers", "0"]
    capsys.readouterr()
    assert main(command) == 2  # a new run would replace the finished stages: asked for
    err = capsys.readouterr().err.strip()
    assert err == (
        f"clusterformer demo: error: {out}: holds an unfinished demo run with the same options (stages 1-3 are "
        "finished); pass --resume to continue it from stage 4, or --overwrite to start again"
    )
    with pytest.raises(SystemExit) as refused:  # the two exclude each other
        main([*command, "--resume", "--overwrite"])
    assert refused.value.code == 2

    (out / "instance" / "stale.ckpt").write_text("left by the stopped stage")
    assert main([*command, "--resume"]) == 0
    assert not (out / "instance" / "stale.ckpt").exists()  # the stopped stage started over in an emptied folder
    printed = capsys.readouterr().out
    assert "[2/6] classification: finished in an earlier run, loaded" in printed
    assert "[4/6] instance segmentation: 1 epochs" in printed
    for name in ("data", "classification", "detection"):  # loaded, not made or trained again
        path = out / name / ("shapes.json" if name == "data" else "checkpoints/last.ckpt")
        assert path.stat().st_mtime_ns == kept[name], name
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    for name, key in (("classification", "val/top1"), ("detection", "val/bbox_AP50")):  # as recorded and printed
        assert metrics[name] == record["stages"][name]["metrics"]
        assert f"{key}: {metrics[name]['untrained'][key]:.3f} -> {metrics[name]['trained'][key]:.3f}" in stdout
    # the report of the resumed run is the uninterrupted run's, but for the time taken
    expected = uninterrupted[1]
    assert set(metrics) == set(expected)
    own = ("targets", "preset")  # the run here is the (tiny) quick preset, the one above the changed full one
    assert {k: v for k, v in metrics.items() if "seconds" not in k and k not in own} == {
        k: v for k, v in expected.items() if "seconds" not in k and k not in own
    }
    assert metrics["preset"] == "quick" and metrics["targets"][1:] == target_rows(expected, "quick")[1:]
    assert list(metrics["stage_seconds"]) == list(STAGE_NAMES)
    text = (out / "report" / "report.md").read_text()
    for task in TASKS:
        assert f"| {task} |" in text, task
        assert (out / "report" / f"{task}_predictions.png").is_file(), task
    assert json.loads((out / "demo.json").read_text())["finished"]
    assert prepare_demo_folder(out, {**TINY, "seed": SEED}) == {}  # finished: a new run may replace it


def test_a_demo_stopped_by_sigint_in_its_first_training_exits_130(tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    status, stdout, stderr = stopped_demo(out, "classification", "classification", signal.SIGINT)
    assert status == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        f"clusterformer demo: {out}: interrupted by SIGINT during stage 2/6 (classification); stage 1 is finished "
        "and kept; rerun with --resume to continue from stage 2"
    )
    assert "Traceback" not in stderr
    assert list(json.loads((out / "demo.json").read_text())["stages"]) == ["data"]
    monkeypatch.setitem(PRESETS, "quick", TINY)
    assert main(["demo", "--out", str(out), "--quick", "--seed", str(SEED)]) == 2
    assert "(stage 1 is finished); pass --resume to continue it from stage 2" in capsys.readouterr().err


def test_the_interruption_names_the_stage_or_the_report(tmp_path):
    assert str(DemoInterrupted(tmp_path, 1, signal.SIGTERM)) == (
        f"{tmp_path}: interrupted by SIGTERM during stage 1/6 (the shapes dataset); no stage had finished; rerun to "
        "start again"
    )
    assert str(DemoInterrupted(tmp_path, 7, signal.SIGINT)) == (
        f"{tmp_path}: interrupted by SIGINT while writing the report; all 6 stages are finished and kept; rerun "
        "with --resume to write the report"
    )
    assert DemoInterrupted(tmp_path, 3, signal.SIGTERM).exit_code == 143


def _metrics(seconds: float, **trained) -> dict:
    """Report metrics of a made-up run: every shown metric at 0.1 untrained, ``trained`` or 0.2 trained."""
    metrics = {"preset": "x", "seconds": seconds}
    for task, keys in SHOWN.items():
        metrics[task] = {
            "untrained": dict.fromkeys(keys, 0.1),
            "trained": {key: trained.get(key.removeprefix("val/"), 0.2) for key in keys},
        }
    return metrics


def test_targets_say_what_was_met_and_what_was_missed(tmp_path):
    full = _metrics(899.0, top1=0.96, bbox_AP50=0.49, segm_AP50=0.5, mIoU=0.8, PQ=0.6, PQ_th=0.2)
    rows = {(row["task"], row["metric"]): row for row in target_rows(full, "full")}
    assert rows["all", "seconds"]["met"] and rows["classification", "val/top1"]["met"]
    assert not rows["detection", "val/bbox_AP50"]["met"]  # 0.49 < 0.5
    assert rows["instance", "val/segm_AP50"]["met"]  # at the target is met
    assert not rows["panoptic", "val/PQ_th"]["met"] and rows["panoptic", "val/PQ"]["met"]
    assert not {row["metric"]: row for row in target_rows(_metrics(901.0), "full")}["seconds"]["met"]
    # quick: the wall time, and every shown metric above its untrained value
    quick = _metrics(250.0, PQ_th=0.1)
    rows = target_rows(quick, "quick")
    assert len(rows) == 1 + sum(len(keys) for keys in SHOWN.values())
    assert [row["metric"] for row in rows if not row["met"]] == ["val/PQ_th"]  # 0.1 is not above 0.1
    # the report's table and its sentence on the missed ones
    full.update(preset="full", targets=target_rows(full, "full"))
    text = "\n".join(target_lines(full))
    assert "| detection | val/bbox_AP50 | >= 0.500 | 0.490 | **no** |" in text
    assert "| all | seconds | <= 900 s | 899 s | yes |" in text
    assert "Missed: detection val/bbox_AP50, panoptic val/PQ_th." in text
    full["targets"] = [row | {"met": True} for row in full["targets"]]
    assert "Every target met." in "\n".join(target_lines(full))
    # the wall time in seconds and the metrics as fractions, whatever their values
    perfect = _metrics(0.4, top1=1.0)
    perfect.update(preset="full", targets=target_rows(perfect, "full"))
    text = "\n".join(target_lines(perfect))
    assert "| all | seconds | <= 900 s | 0 s | yes |" in text
    assert "| classification | val/top1 | >= 0.950 | 1.000 | yes |" in text


def test_the_thing_class_probe_runs_on_a_demo_folder(uninterrupted, tmp_path, monkeypatch, capsys):
    """benchmarks/thing_class_probe.py (docs/training.md): every encoder of a finished demo run probed, four stages
    each; the off-centre crops keep the whole object on a one-colour canvas."""
    import importlib.util
    from pathlib import Path

    import numpy as np

    path = Path(__file__).parent.parent / "benchmarks" / "thing_class_probe.py"
    spec = importlib.util.spec_from_file_location("thing_class_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    out, _ = uninterrupted
    rng = np.random.default_rng(0)
    images, labels = probe.crop_images(out / "data", "train", 3, None, rng)
    centred = images[:, :, 12:52, 12:52]
    assert images.shape[-2:] == (64, 64) and len(images) == len(labels) > 0
    border = images[:, :, :12].flatten(2)
    assert (border == border[..., :1]).all()  # one colour around the 40-px crop
    assert not (centred == border[..., :1, None]).all()
    monkeypatch.setattr("sys.argv", ["probe", str(out), "--train-steps", "2", "--json", str(tmp_path / "p.json")])
    probe.main()
    results = json.loads((tmp_path / "p.json").read_text())
    assert set(results) == {*TASKS, "trained_on_scenes", "seconds"}
    assert set(results["classification"]) >= {"crops", "crops 40 px", "crops shifted", "scenes"}
    for task in TASKS:
        assert len(results[task]["scenes"]) == 4 and all(0 <= a <= 1 for a in results[task]["scenes"]), task
    assert [step for step, _ in results["trained_on_scenes"]] == [2]
    assert "the classifier itself on the validation crops shifted" in capsys.readouterr().out
