"""The demo runs every stage on a tiny dataset and writes its report."""

import json

from clusterformer.demo import run_demo


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
