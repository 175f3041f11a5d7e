"""The demo runs every stage on a tiny dataset and writes its report."""

import json

from clusterformer.cli import main
from clusterformer.demo import PRESETS, prepare_demo_folder, run_demo


def test_demo_writes_a_report(tmp_path):
    metrics = run_demo(
        tmp_path, seed=1, num_workers=0, num_train=16, num_val=6, size=64, epochs=1, detection_epochs=1, set_epochs=1,
        semantic_epochs=1, panoptic_epochs=1,
    )  # fmt: skip
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
