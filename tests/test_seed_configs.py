"""The panoptic configs of the seed systems at their papers' settings (kMaX-DeepLab, CMT-DeepLab, HCFormer;
docs/heads.md, "Configs at the seed papers' settings"): each parses with ``clusterformer fit --print_config`` and
builds its model; the COCO ones hold the papers' figures and run one small image; the nano shapes ones train one step
through ``clusterformer fit``."""

import math
from pathlib import Path

import pytest
import torch
import yaml

from clusterformer.cli import main
from clusterformer.tasks import PanopticTask

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("kmax", "cmt", "hcformer")
CONFIGS = [f"{system}_{variant}" for system in SYSTEMS for variant in ("tiny_coco_panoptic", "nano_shapes")]
LAYER_AND_PATH = {
    "kmax": ("KMaXDecoderLayer", "PixelDecoder"),
    "cmt": ("CMTDecoderLayer", "PixelDecoder"),
    "hcformer": ("ClusteringDecoderLayer", "HCFormerPixelPath"),
}
# the papers' figures: queries, decoder layers, total batch (per device x 8 devices), lr, weight decay, training length
PAPER = {
    "kmax": dict(queries=128, layers=6, batch=64, lr=5e-4, weight_decay=0.05, length=("max_steps", 150000)),
    "cmt": dict(queries=128, layers=6, batch=64, lr=1e-3, weight_decay=0.0, length=("max_steps", 100000)),
    "hcformer": dict(queries=100, layers=8, batch=16, lr=1e-4, weight_decay=0.05, length=("max_epochs", 50)),
}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def config(name: str) -> dict:
    return yaml.safe_load((ROOT / f"configs/panoptic/{name}.yaml").read_text())


def task_of(name: str) -> PanopticTask:
    return PanopticTask(**config(name)["model"]["init_args"])


@pytest.mark.parametrize("name", CONFIGS)
def test_config_parses(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / f"configs/panoptic/{name}.yaml"), "--print_config"])
    assert exit_info.value.code == 0


@pytest.mark.parametrize("system", SYSTEMS)
def test_coco_config_holds_the_papers_settings_and_builds(system):
    name = f"{system}_tiny_coco_panoptic"
    paper, settings = PAPER[system], config(name)
    task = task_of(name)
    decoder = task.model.decoder
    layer, path = LAYER_AND_PATH[system]
    assert [type(module).__name__ for module in (decoder.layers[0], decoder.pixel_decoder)] == [layer, path]
    assert (decoder.num_queries, len(decoder.layers), decoder.query_init) == (paper["queries"], paper["layers"], "free")
    assert settings["data"]["init_args"]["batch_size"] * 8 == paper["batch"]
    assert (task.hparams.lr, task.hparams.weight_decay) == (paper["lr"], paper["weight_decay"])
    key, value = paper["length"]
    assert settings["trainer"][key] == value
    weights = task.criterion.weight_dict
    if system == "hcformer":  # Mask2Former's loss: class 2, mask 5, dice 5, no auxiliary terms
        assert task.hparams.decoder["masked_attention"] and task.hparams.loss["losses"] == ["labels", "masks"]
        terms = [f"loss_{term}_{kind}" for term in ("class", "mask", "dice") for kind in ("thing", "stuff")]
        assert [weights[term] for term in terms] == [2.0, 2.0, 5.0, 5.0, 5.0, 5.0]
    else:  # MaX-DeepLab's auxiliary weights: PQ-style 3, mask-ID 0.3, instance discrimination 1, semantic 1
        assert [weights[term] for term in ("loss_pq_class", "loss_mask_id", "loss_instance_discrimination")] == [
            3.0, 0.3, 1.0
        ]  # fmt: skip
        assert weights["loss_semantic"] == weights["loss_points"] == 1.0
        assert not task.hparams.decoder["masked_attention"]
    task.model.eval()
    with torch.no_grad():
        out = task.model(torch.randn(1, 3, 64, 64))
    assert out["logits"].shape == (1, paper["queries"], 133) and out["masks"].shape == (1, paper["queries"], 16, 16)


@pytest.fixture(scope="module")
def shapes(shapes_dir):
    return shapes_dir(seed=4, num_train=8, num_val=5, size=64)


@pytest.mark.parametrize("system", SYSTEMS)
def test_nano_config_trains_one_step(system, shapes, tmp_path):
    name = f"{system}_nano_shapes"
    code = main(
        ["fit", "--config", str(ROOT / f"configs/panoptic/{name}.yaml"), f"--data.init_args.root={shapes}",
         "--data.init_args.crop=64", "--data.init_args.test_shorter_side=64", "--data.init_args.batch_size=2",
         "--data.init_args.num_workers=0", "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
         "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0", "--trainer.log_every_n_steps=1",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--run_dir",
         str(tmp_path / "run")]
    )  # fmt: skip
    assert code == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 1
    stored = checkpoint["hyper_parameters"]["decoder"]
    assert all(stored[key] == value for key, value in config(name)["model"]["init_args"]["decoder"].items())
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    assert all(math.isfinite(float(v)) for line in metrics.read_text().splitlines()[1:] for v in line.split(",") if v)
