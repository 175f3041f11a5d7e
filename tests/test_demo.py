"""The demo runs every stage on a tiny dataset and writes its report."""

import json

from clusterformer.demo import run_demo


def test_demo_writes_a_report(tmp_path):
    metrics = run_demo(tmp_path, seed=1, num_workers=0, num_train=16, num_val=6, size=64, epochs=1, set_epochs=1)
    report = tmp_path / "report"
    assert json.loads((report / "metrics.json").read_text()) == metrics
    for name in ("classification_curve.png", "classification_predictions.png", "detection_instance_curve.png",
                 "detection_instance_predictions.png", "report.md"):  # fmt: skip
        assert (report / name).stat().st_size > 0, name
    assert (tmp_path / "classification" / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "detection_instance" / "checkpoints" / "last.ckpt").exists()
    assert 0 <= metrics["classification"]["trained"]["val/top1"] <= 1
    for key in ("val/bbox_AP50", "val/segm_AP50", "val/bbox_AP", "val/segm_AP"):
        assert 0 <= metrics["detection_instance"]["trained"][key] <= 1
    text = (report / "report.md").read_text()
    assert "classification top-1" in text and "box AP50" in text and "mask AP50" in text
