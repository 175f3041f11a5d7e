"""Supplement Table S1: the six parts of Table 6 on panoptic segmentation (``clusterformer ablate --table S1a``)."""

import json
from pathlib import Path

import pytest

from clusterformer.cli import main
from clusterformer.commands.ablate import ADOPTED, LAYOUTS, TABLES, build_row, check_table, table_task
from clusterformer.layers.comparators import CrossAttentionUpdate

ROOT = Path(__file__).resolve().parents[1]
PANOPTIC = ROOT / "configs/panoptic/clusterformer_nano_shapes.yaml"
CLASSIFICATION = ROOT / "configs/classification/clusterformer_nano_shapes.yaml"
SMALL_DECODER = (
    "model.init_args.decoder={num_queries: 8, dim: 32, mask_dim: 32, num_layers: 1, num_heads: 4, ffn_dim: 64}"
)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def shapes(shapes_dir):
    return shapes_dir(seed=7, num_train=8, num_val=4, size=48)


def settings(root) -> list[str]:
    return [
        f"data.init_args.root={root}",
        SMALL_DECODER,
        "data.init_args.crop=48",
        "data.init_args.test_shorter_side=48",
        "data.init_args.batch_size=4",
        "data.init_args.num_workers=0",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
    ]


def test_s1_repeats_the_rows_of_table_6():
    for part in "abcdef":
        s1, t6 = f"s1{part}", f"6{part}"
        assert check_table(f"S1{part.upper()}") == s1 and table_task(s1) == "panoptic"
        assert [label for label, _ in TABLES[s1]] == [label for label, _ in TABLES[t6]]
        assert ADOPTED[s1] == ADOPTED[t6] and LAYOUTS[s1].columns[0] == ("PQ", "PQ")
    for (_, s1), (_, t6) in zip(
        TABLES["s1c"] + TABLES["s1d"] + TABLES["s1e"], TABLES["6c"] + TABLES["6d"] + TABLES["6e"], strict=True
    ):
        assert s1 == t6  # encoder options only
    # T is the number of E/M iterations of the encoder's clustering and of the decoder's
    assert all(row["iterations"] == row["decoder"]["iterations"] for _, row in TABLES["s1b"])
    # without clustering the BASELINE encoder has no centers to start the decoder's queries from
    assert TABLES["s1a"][0][1] == {"baseline": True, "decoder": {"query_init": "free"}}


def test_s1_rows_build_the_panoptic_variant_they_name(shapes, tmp_path):
    def row(table, index):
        task, _, trainer = build_row(
            table, index, PANOPTIC, tmp_path / f"{table}_{index}", config_overrides=settings(shapes)
        )
        assert trainer.default_root_dir == str(tmp_path / f"{table}_{index}")
        return task.model

    baseline = row("s1a", 0)
    assert all(block.clustering is None for stage in baseline.backbone.stages for block in stage.blocks)
    assert baseline.decoder.query_init == "free"
    assert len(baseline.decoder.layers) == 1  # merged into the config's decoder options, not instead of them
    one = row("s1b", 0)
    assert one.backbone.stages[0].blocks[0].clustering.iterations == 1
    assert all(layer.clustering.iterations == 1 for layer in one.decoder.layers)
    vanilla = row("s1c", 1)
    assert isinstance(vanilla.backbone.stages[0].blocks[0].clustering, CrossAttentionUpdate)
    assert vanilla.decoder.query_init == "encoder"
    assert row("s1d", 0).backbone.stages[0].blocks[0].head_dim == 16
    assert row("s1f", 0).decoder.query_init == "free"
    with pytest.raises(ValueError, match="not reproduced"):
        build_row("s1f", 1, PANOPTIC, tmp_path / "x")


def test_s1_refuses_a_config_of_another_task(tmp_path):
    with pytest.raises(ValueError, match="PanopticTask"):
        build_row("s1a", 0, CLASSIFICATION, tmp_path)


def test_table_s1f_runs_from_the_command_line(shapes, tmp_path):
    limits = ["--max-epochs", "1", "--limit-train-batches", "1", "--limit-val-batches", "1"]
    args = ["ablate", "--table", "S1f", "--config", str(PANOPTIC), "--out", str(tmp_path), *limits]
    assert main(args + [item for setting in settings(shapes) for item in ("--set", setting)]) == 0
    report = json.loads((tmp_path / "table_s1f.json").read_text())
    assert report["task"] == "panoptic"
    rows = report["rows"]
    assert [row["reproduced"] for row in rows] == [True, False, False, False, True]
    for row in rows[:1] + rows[4:]:
        assert set(row["metrics"]) == {"PQ", "PQ_th", "PQ_st"}
        assert all(0 <= value <= 1 for value in row["metrics"].values())
        assert (Path(row["dir"]) / "checkpoints" / "last.ckpt").is_file()
    markdown = (tmp_path / "table_s1f.md").read_text()
    assert "**Table S1f** (f) Decoder Query Initialization for panoptic segmentation" in markdown
    assert "| Decoder Query Initialization | PQ | PQ Th | PQ St |" in markdown
    assert "not COCO panoptic numbers" in markdown and "PQ, PQ of things and of stuff in %" in markdown


def test_the_seeds_table_puts_the_four_clustering_decoders_side_by_side(shapes, tmp_path):
    """``clusterformer ablate --table seeds --quick``: ClusterFormer's decoder, kMaX-DeepLab's, CMT-DeepLab's and
    HCFormer's pixel path on the same panoptic model, data, budget and seed; their metrics, parameters and speed."""
    assert table_task("seeds") == "panoptic" and ADOPTED["seeds"] == 0
    layers = [type(build_row("seeds", i, PANOPTIC, tmp_path / f"b{i}", config_overrides=settings(shapes))[0].model
                   .decoder.layers[0]).__name__ for i in range(4)]  # fmt: skip
    assert layers == ["ClusteringDecoderLayer", "KMaXDecoderLayer", "CMTDecoderLayer", "ClusteringDecoderLayer"]
    path = build_row("seeds", 3, PANOPTIC, tmp_path / "b", config_overrides=settings(shapes))[0].model.decoder
    assert type(path.pixel_decoder).__name__ == "HCFormerPixelPath"
    limits = ["--limit-train-batches", "1", "--limit-val-batches", "1"]  # the rest from --quick: one epoch
    args = ["ablate", "--table", "seeds", "--quick", "--config", str(PANOPTIC), "--out", str(tmp_path / "o"), *limits]
    assert main(args + [item for setting in settings(shapes) for item in ("--set", setting)]) == 0
    report = json.loads((tmp_path / "o" / "table_seeds.json").read_text())
    assert report["max_epochs"] == 1 and report["limit_train_batches"] == 1
    rows = report["rows"]
    assert len(rows) == 4 and all(row["reproduced"] for row in rows)
    for row in rows:
        assert set(row["metrics"]) == {"PQ", "PQ_th", "PQ_st", "mAP_th", "mIoU"}
        assert all(value is None or 0 <= value <= 1 for value in row["metrics"].values())
        assert row["params"] > 0 and row["train_images_per_second"] > 0 and row["val_images_per_second"] > 0
    assert len({row["params"] for row in rows}) == 4  # four different decoders
    markdown = (tmp_path / "o" / "table_seeds.md").read_text()
    assert "| Decoder | #Params | PQ | PQ Th | PQ St | mask AP Th | mIoU | train img/s | val img/s |" in markdown
    assert "| **ClusterFormer (recurrent cross-attention clustering)** |" in markdown
    assert "kMaX-DeepLab" in markdown and "CMT-DeepLab" in markdown and "HCFormer" in markdown
