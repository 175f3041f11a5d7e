"""``clusterformer explain``: the cluster maps of a real photograph, one picture per stage at the image's size,
the decoder's query-to-pixel assignment for dense checkpoints, weights from a file, clear errors."""

import json
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data as photographs

from clusterformer.cli import main
from clusterformer.commands.explain import ExplainModel, compute_assignments, model_from_timm, token_grid_to_image
from helpers import train_one_step

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(photographs.astronaut()).save(folder / "astronaut.png")  # 512 x 512
    Image.fromarray(photographs.chelsea()).save(folder / "chelsea.jpg")  # 451 x 300
    return folder


def explain(*args) -> int:
    return main(["explain", *map(str, args)])


def test_every_stage_is_drawn_over_the_photograph_at_its_size(photos, tmp_path, capsys):
    torch.manual_seed(0)
    assert explain("--model", "clusterformer_nano", photos / "astronaut.png", "--out", tmp_path, "--size", 224) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "clusters.json").read_text())
    for record in report["maps"]:  # whether it clusters: printed and written, averaged over the heads
        stats = record["statistics"]
        assert stats["clusters_used_per_head"] == record["used_per_head"]
        assert stats["clusters_used"] == pytest.approx(np.mean(record["used_per_head"]))
        # a random EM clustering clusters (docs/architecture.md, "Does it cluster?"): assignments far from uniform
        # (1/100; Algorithm 1's summed M-step gives that) and centers apart (the summed M-step's are parallel: 1)
        assert stats["mean_max_assignment"] > 3 / 100 and stats["center_cosine"] < 0.5
        row = next(line for line in printed.splitlines() if line.startswith(record["name"]))
        assert f"{stats['mean_max_assignment']:.3f}" in row and f"{stats['center_cosine']:.3f}" in row
    assert [m["file"] for m in report["maps"]] == ["stage1.png", "stage2.png", "stage3.png", "stage4.png"]
    for record in report["maps"]:
        assert record["grid"] == [math.ceil(224 / record["stride"])] * 2 and record["clusters"] == 100
        assert sum(record["sizes"]) == record["grid"][0] * record["grid"][1]
        assert sum(record["soft_sizes"]) == pytest.approx(sum(record["sizes"]), rel=1e-3)  # soft: sums to 1 over K
        picture = Image.open(tmp_path / record["file"])
        assert picture.size == (512, 512) and picture.mode == "RGB"
    stage1 = report["maps"][0]
    assert stage1["used"] > 1  # the hard assignment has several clusters
    colours = np.unique(np.asarray(Image.open(tmp_path / "stage1.png")).reshape(-1, 3), axis=0)
    assert len(colours) > 1000  # the photograph shows through the cluster colours
    assert Image.open(tmp_path / "summary.png").size[0] > 0


def test_a_dense_checkpoint_also_shows_the_decoder_assignment(photos, shapes_dir, tmp_path):
    shapes = shapes_dir(seed=4, num_train=8, num_val=5, size=64)
    checkpoint = train_one_step("instance", shapes, tmp_path / "instance.ckpt")
    out = tmp_path / "out"
    assert explain("--ckpt", checkpoint, photos / "chelsea.jpg", "--out", out, "--size", 128, "--all-heads") == 0
    report = json.loads((out / "clusters.json").read_text())
    assert [m["file"] for m in report["maps"]][-1] == "decoder.png"
    decoder = report["maps"][-1]
    assert decoder["clusters"] == 10 and decoder["heads"] == 4 and decoder["stride"] in (8, 16, 32)
    assert sum(q["tokens"] for q in decoder["queries"]) == decoder["grid"][0] * decoder["grid"][1]
    assert {q["class"] for q in decoder["queries"]} <= {"circle", "square", "triangle", "star"}
    for name in ("stage1", "stage2", "stage3", "stage4", "decoder", "decoder_head3", "stage4_head7"):
        assert Image.open(out / f"{name}.png").size == (451, 300), name


def test_the_decoder_assignment_is_a_softmax_over_the_queries(photos, shapes_dir, tmp_path):
    from clusterformer.commands.explain import model_from_checkpoint

    shapes = shapes_dir(seed=4, num_train=8, num_val=5, size=64)
    model = model_from_checkpoint(train_one_step("panoptic", shapes, tmp_path / "panoptic.ckpt"))
    result = compute_assignments(model, Image.open(photos / "chelsea.jpg").convert("RGB"), size=96)
    assert result["input_size"] == (96, 144)
    decoder = result["maps"][-1]["assignments"]  # (heads, Q, h, w)
    np.testing.assert_allclose(decoder.sum(1), 1.0, atol=1e-4)
    assert decoder.shape[1] == 10


def test_a_kmax_decoder_is_explained_by_the_argmax_of_its_affinity(photos, shapes_dir, tmp_path):
    """``decoder.kind: kmax``: the last layer's hard assignment (one head), each pixel to one query."""
    import lightning as L

    from clusterformer.commands.explain import model_from_checkpoint
    from clusterformer.tasks import SetTask
    from helpers import save_after_one_step, task_and_data

    shapes = shapes_dir(seed=4, num_train=8, num_val=5, size=64)
    task, data = task_and_data("instance", shapes)
    hparams = dict(task.hparams)
    hparams["decoder"] = {**hparams["decoder"], "kind": "kmax"}
    L.seed_everything(0, verbose=False)
    checkpoint = save_after_one_step(SetTask(**hparams), data, tmp_path / "kmax.ckpt")
    model = model_from_checkpoint(checkpoint)
    result = compute_assignments(model, Image.open(photos / "chelsea.jpg").convert("RGB"), size=96)
    decoder = result["maps"][-1]["assignments"]  # (1, Q, h, w)
    assert decoder.shape[:2] == (1, 10) and set(np.unique(decoder)) <= {0.0, 1.0}
    np.testing.assert_array_equal(decoder.sum(1), 1.0)
    stride = (32, 16, 8)[model.dense.decoder.level_order[-1]]  # kMaX's levels: blocks of layers, coarse first
    assert result["maps"][-1]["stride"] == stride


def test_weights_from_a_safetensors_file_are_used(photos, tmp_path):
    torch.manual_seed(1)
    reference = timm.create_model("clusterformer_nano", num_classes=0).eval()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "nano.safetensors")
    loaded = model_from_timm("clusterformer_nano", tmp_path / "nano.safetensors")
    same = ExplainModel(reference, None, "reference", loaded.size, loaded.mean, loaded.std)
    image = Image.open(photos / "chelsea.jpg").convert("RGB")
    for a, b in zip(compute_assignments(loaded, image, 96)["maps"], compute_assignments(same, image, 96)["maps"],
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(a["assignments"], b["assignments"], atol=1e-6)


def test_token_maps_cover_their_pixels_of_the_resized_input():
    tokens = np.array([[0, 1], [2, 3]])
    # a 7 x 6 input with stride 4: token rows cover input rows 0-3 and 4-6; the image is twice the input's size
    image = token_grid_to_image(tokens, 4, (7, 6), (14, 12))
    assert (image[:8, :8] == 0).all() and (image[:8, 8:] == 1).all() and (image[8:, :8] == 2).all()
    assert (image[8:, 8:] == 3).all()


def test_a_non_empty_output_is_refused_and_overwrite_replaces_the_previous_pictures(photos, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", "clusterformer_nano", photos / "chelsea.jpg", "--size", 64, "--out", out]
    assert explain(*args, "--all-heads") == 0
    heads = sorted(p.name for p in out.glob("stage1_head*.png"))
    assert heads and (out / "clusters.json").is_file()
    capsys.readouterr()
    assert explain(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"clusterformer explain: error: {out}: output folder is not empty (")
    assert "--overwrite" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in out.glob("stage1_head*.png")) == heads
    assert explain(*args, "--overwrite") == 0
    assert not list(out.glob("*_head*.png"))  # the earlier run's per-head pictures are gone
    names = ["clusters.json", "stage1.png", "stage2.png", "stage3.png", "stage4.png", "summary.png"]
    assert sorted(p.name for p in out.iterdir()) == names


def test_bad_inputs_are_one_line_errors(photos, tmp_path, capsys):
    image = photos / "astronaut.png"
    cases = [
        (["--model", "clusterformer_nano", tmp_path / "missing.png"], "missing.png: image file not found"),
        (["--model", "no_such_model", image], "no_such_model"),
        (["--model", "resnet18", image], "not a ClusterFormer encoder"),
        (["--model", "clusterformer_nano", "--weights", tmp_path / "no.safetensors", image], "weights not found"),
        (["--ckpt", tmp_path / "missing.ckpt", image], "missing.ckpt"),
        (["--model", "clusterformer_nano", "--head", 5, image], "--head 5"),
    ]
    for args, message in cases:
        assert explain(*args, "--out", tmp_path / "out") == 2, message
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and err.startswith("clusterformer explain: error:")
