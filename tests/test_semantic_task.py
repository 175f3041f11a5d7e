"""Semantic segmentation end to end: the loss against its formula, batching, validation mIoU equal to an
offline mmsegmentation-style evaluation of written PNGs, the CLI on the configs."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from clusterformer.cli import main
from clusterformer.data.collate import collate_semantic
from clusterformer.errors import SettingError
from clusterformer.losses import semantic_criterion
from clusterformer.losses.matching import ClassQueryMatcher
from clusterformer.metrics.semantic import evaluate_semantic
from clusterformer.tasks import SemanticData, SemanticTask

ROOT = Path(__file__).resolve().parents[1]
SMALL_DECODER = dict(dim=32, mask_dim=32, num_layers=2, num_heads=4, ffn_dim=64)


@pytest.fixture(scope="module")
def shapes(shapes_dir):
    return shapes_dir(seed=4, num_train=8, num_val=5, size=64)


def small_data(root, **kwargs):
    return SemanticData(
        str(root), "images/train", "semantic/train", "images/val", "semantic/val", num_classes=7, crop=64,
        scale_range=(0.8, 1.2), test_shorter_side=48, batch_size=2, num_workers=0, **kwargs,
    )  # fmt: skip


def small_task(**kwargs):
    return SemanticTask("clusterformer_nano", num_classes=7, decoder=SMALL_DECODER, loss={"num_points": 64},
                        warmup_steps=1, **kwargs)  # fmt: skip


def trainer(tmp_path, **kwargs):
    return L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


def test_collate_pads_labels_with_ignore_and_lists_present_classes():
    label = torch.full((40, 30), 255)
    label[:20] = 2
    label[20:, :10] = 5
    images, (target,) = collate_semantic([(torch.randn(3, 40, 30), label)])
    assert images.shape == (1, 3, 64, 32)
    assert target["semantic"].shape == (64, 32) and (target["semantic"][40:] == 255).all()
    assert (target["semantic"][:, 30:] == 255).all()
    assert target["labels"].tolist() == [2, 5]
    assert target["masks"].shape == (2, 64, 32) and target["masks"][0].sum() == 600 and target["masks"][1].sum() == 200
    _, (evaluation,) = collate_semantic([(torch.randn(3, 40, 30), label)], train=False)
    assert evaluation["semantic"].shape == (40, 30) and evaluation["size"] == (40, 30)


def test_class_query_matcher_pairs_query_c_with_class_c():
    outputs = {"logits": torch.zeros(2, 7, 7)}
    (q0, t0), (q1, t1) = ClassQueryMatcher()(outputs, [{"labels": torch.tensor([3, 0])}, {"labels": torch.tensor([])}])
    assert q0.tolist() == [3, 0] and t0.tolist() == [0, 1] and len(q1) == 0 and len(t1) == 0
    with pytest.raises(ValueError, match="classes"):
        ClassQueryMatcher()(outputs, [{"labels": torch.tensor([7])}])


def test_pixel_cross_entropy_matches_the_formula(float64):
    """loss_ce = mean over labelled pixels of -log softmax_c(mask logits)[label], the label map read at the
    centres of the mask-logit pixels."""
    torch.manual_seed(0)
    c, h, w = 4, 3, 5
    masks = torch.randn(2, c, h, w)
    semantic = torch.randint(0, c, (2, 2 * h, 2 * w))
    semantic[0, :2] = 255
    targets = []
    for s in semantic:
        classes = s[s != 255].unique()
        targets.append({"semantic": s, "labels": classes, "masks": s[None] == classes[:, None, None]})
    criterion = semantic_criterion(c, num_points=16)
    loss = criterion.loss_ce({"masks": masks, "logits": torch.zeros(2, c, c)}, targets, None, 1)["loss_ce"]
    total, count = 0.0, 0
    for b in range(2):
        for i in range(h):
            for j in range(w):
                label = int(semantic[b, 2 * i + 1, 2 * j + 1])  # the pixel under the centre of cell (i, j)
                if label == 255:
                    continue
                logits = masks[b, :, i, j]
                total += float(torch.logsumexp(logits, 0) - logits[label])
                count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-6)  # the criterion works in float32
    losses = criterion({"masks": masks.float(), "logits": torch.zeros(2, c, c)}, targets)
    assert set(losses) == {"loss_class", "loss_ce", "loss_dice"}
    assert criterion.weight_dict == {"loss_ce": 5.0, "loss_dice": 1.0, "loss_class": 2.0}


def test_validation_miou_equals_offline_evaluation_of_written_pngs(shapes, tmp_path):
    torch.manual_seed(0)
    data = small_data(shapes)
    module = small_task()
    fitter = trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    fitter.fit(module, data)
    logged = fitter.validate(module, data, verbose=False)[0]
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    module.eval()
    dataset = data._dataset(train=False)
    with torch.no_grad():
        for path, (image, label) in zip(dataset.images, (dataset[i] for i in range(len(dataset))), strict=True):
            images, targets = collate_semantic([(image, label)], train=False)
            (prediction,) = module.predict_batch(images, targets)
            assert prediction.shape == label.shape  # scored at the label's own size
            Image.fromarray((prediction.numpy() + 1).astype(np.uint8)).save(pred_dir / f"{path.stem}.png")
    offline = evaluate_semantic(shapes / "semantic/val", pred_dir, num_classes=7)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert logged[f"val/{key}"] == pytest.approx(offline[key], abs=1e-6)


def test_class_count_mismatch_is_a_clear_error(shapes, tmp_path):
    module = SemanticTask("clusterformer_nano", num_classes=150, decoder=SMALL_DECODER)
    with pytest.raises(SettingError, match=r"num_classes: 150, but .*semantic/train has 7 classes; set it to 7"):
        trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(module, small_data(shapes))


@pytest.mark.parametrize("name", ["clusterformer_tiny_ade20k", "clusterformer_small_ade20k"])
def test_paper_configs_parse(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / f"configs/semantic/{name}.yaml"), "--print_config"])
    assert exit_info.value.code == 0
