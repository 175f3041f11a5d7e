"""The learning-speed comparison (``clusterformer benchmark --task convergence``) at a tiny size: every pairing
builds its peer on the same encoder weights and features, both models train on the same batches, are scored by
the project's metric code, and the command writes its JSON and curves."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from clusterformer.cli import main  # noqa: E402
from clusterformer.commands.benchmark import CONVERGENCE_PAIRINGS  # noqa: E402
from clusterformer.convergence import (  # noqa: E402
    METRICS,
    PAIRINGS,
    build_pairing,
    eval_steps,
    run_pairing,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
SIZE = 64  # 64-pixel scenes: stride 32 leaves 2 x 2 tokens, enough for every head


@pytest.fixture(scope="module")
def shapes(shapes_dir):
    return shapes_dir(0, 8, 4, SIZE)


def test_the_command_knows_every_pairing():
    assert CONVERGENCE_PAIRINGS == PAIRINGS == tuple(METRICS)


def test_the_data_and_the_recipes_are_the_demos():
    """ClusterFormer's side of each pairing is the demo's stage: its data sizes and its overrides of the config."""
    from clusterformer.commands.demo import DENSE_STAGES
    from clusterformer.commands.demo import PRESETS as DEMO_PRESETS
    from clusterformer.convergence import PRESETS
    from clusterformer.recipes import DEMO_MODEL_OVERRIDES

    for name, preset in PRESETS.items():
        assert {k: preset[k] for k in ("num_train", "num_val", "size")} == {
            k: DEMO_PRESETS[name][k] for k in ("num_train", "num_val", "size")
        }
    assert {kind: DENSE_STAGES[kind][2] for kind in PAIRINGS} == {kind: DEMO_MODEL_OVERRIDES[kind] for kind in PAIRINGS}


def test_clusterformer_trains_with_its_tasks_loss_denoising_included(shapes):
    """ClusterFormer's side optimises what its task's training step does: with the detection config's denoising
    queries, their terms are in the loss."""
    _, (ours, _) = build_pairing("detection", shapes, SIZE, steps=1, seed=0, batch_size=4)
    task = ours.model
    assert task.model.denoiser is not None  # the shapes config's denoising: 3
    data = build_pairing("detection", shapes, SIZE, steps=1, seed=0, batch_size=4)[0]
    data.setup("fit")
    images, targets = next(iter(data.train_dataloader()))
    torch.manual_seed(0)
    loss = ours.loss_fn(images, targets)
    torch.manual_seed(0)
    expected, terms = task.training_loss(images, targets)
    assert "loss_class_dn" in terms
    torch.testing.assert_close(loss, expected)
    plain = task.criterion.weighted_total({k: v for k, v in terms.items() if "_dn" not in k})
    assert loss.item() > plain.item()


def test_eval_steps():
    assert eval_steps(3, 2) == [2, 3]
    assert eval_steps(100, 50) == [50, 100]
    assert eval_steps(2, 5) == [2]


@pytest.mark.parametrize("kind", PAIRINGS)
def test_the_peer_reads_the_same_encoder(shapes, kind):
    """The peer's encoder (built by transformers through timm) holds the weights of ClusterFormer's and gives the
    features that ClusterFormer's head reads (``forward_dense``, the last stage normalised)."""
    _, (ours, peer) = build_pairing(kind, shapes, SIZE, steps=2, seed=0, batch_size=4)
    encoder = ours.model.model.backbone
    assert type(peer.model.backbone) is type(encoder)
    theirs = peer.model.backbone.state_dict()
    assert theirs.keys() == encoder.state_dict().keys()
    assert all(torch.equal(theirs[k], v) for k, v in encoder.state_dict().items())
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected, _ = encoder.eval().forward_dense(images)
        got = peer.model.features.eval()(images)
    expected = expected[-1:] if kind == "detection" else expected
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", PAIRINGS)
def test_a_pairing_trains_both_models_on_the_same_batches(shapes, kind):
    built = build_pairing(kind, shapes, SIZE, steps=3, seed=0, batch_size=4)
    before = {c.name: {n: p.detach().clone() for n, p in c.model.named_parameters()} for c in built[1]}
    result = run_pairing(kind, shapes, SIZE, steps=3, eval_every=2, seed=0, batch_size=4, built=built,
                         log=lambda line: None)  # fmt: skip
    models = result["models"]
    assert list(models) == ["clusterformer", "mask2former" if kind != "detection" else "detr"]
    assert result["metric"] == next(iter(METRICS[kind]))
    for contender in built[1]:
        record = models[contender.name]
        assert record["steps"] == [2, 3]
        assert len(record["loss"]) == 3 and all(math.isfinite(v) for v in record["loss"])
        for name, values in record["metrics"].items():
            assert len(values) == 2 and all(0 <= v <= 1 for v in values), name
        changed = [n for n, p in contender.model.named_parameters() if not torch.equal(p, before[contender.name][n])]
        assert changed, contender.name
        # the encoder learnt too (its lr is the task's times backbone_lr_mult)
        assert any("stages.0." in n for n in changed), contender.name
    batches = [record["batches"] for record in models.values()]
    assert batches[0] == batches[1] and len(batches[0]) == 3
    assert all(len(batch) == 4 for batch in batches[0])  # batch size 4 of the 8 training scenes
    assert sorted(batches[0][0] + batches[0][1]) == list(range(8))  # one epoch, shuffled


def test_the_encoder_comes_from_a_classifier_checkpoint(shapes, tmp_path):
    """``encoder=CKPT``: a classification checkpoint's encoder starts both models (the demo's dense recipe)."""
    import timm

    torch.manual_seed(3)
    classifier = timm.create_model("clusterformer_nano", num_classes=4, head="tokens")
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in classifier.state_dict().items()}}, path)
    _, (ours, peer) = build_pairing("detection", shapes, SIZE, steps=1, seed=0, batch_size=4, encoder=path)
    for encoder in (ours.model.model.backbone, peer.model.backbone):
        state = encoder.state_dict()
        assert all(torch.equal(state[k], v) for k, v in classifier.state_dict().items() if k in state)
        assert torch.equal(state["stem.proj.weight"], classifier.state_dict()["stem.proj.weight"])


def test_the_command_writes_the_report_and_the_curves(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["benchmark", "--task", "convergence", "--data", str(shapes), "--out", str(out), "--steps", "2",
            "--eval-every", "1", "--batch-size", "4"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "detection detr step 2/2 box AP50" in printed
    assert "| clusterformer | PQ |" in printed
    report = json.loads((out / "convergence.json").read_text())
    assert list(report["pairings"]) == list(PAIRINGS)
    assert report["steps"] == 2 and report["image_size"] == SIZE
    for kind in PAIRINGS:
        assert (out / f"convergence_{kind}.png").stat().st_size > 0
        for record in report["pairings"][kind]["models"].values():
            assert record["steps"] == [1, 2] and record["train_seconds"] > 0
    assert not (out / "data").exists()  # --data: nothing generated
    # a rerun into the same folder is refused unless --overwrite, and the earlier report is kept
    written = (out / "convergence.json").read_bytes()
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "convergence.json").read_bytes() == written
    assert main([*argv, "--pairings", "detection", "--steps", "1", "--overwrite"]) == 0
    assert json.loads((out / "convergence.json").read_text())["steps"] == 1


def test_the_command_refuses_a_missing_folder(tmp_path, capsys):
    argv = ["benchmark", "--task", "convergence", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["benchmark", "--task", "convergence", "--steps", "0", "--out", str(tmp_path / "o")]) == 2
