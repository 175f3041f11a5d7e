"""Transform presets keep images, boxes, masks and labels together."""

import pytest
import torch

from clusterformer.data.coco import CocoInstances
from clusterformer.data.semantic import SemanticFolder
from clusterformer.data.transforms import classification_eval, classification_train, dense_eval, dense_train


@pytest.fixture(scope="module")
def shapes(shapes_dir):
    return shapes_dir(6, 6, 2, 64)


def test_dense_train_crops_and_keeps_targets_aligned(shapes):
    torch.manual_seed(0)
    data = CocoInstances(shapes / "images" / "train", shapes / "annotations" / "instances_train.json",
                         dense_train(crop=48, scale_range=(0.3, 1.5)))  # fmt: skip
    for index in range(len(data)):
        image, target = data[index]
        assert image.shape == (3, 48, 48) and image.dtype == torch.float32
        n = len(target["boxes"])
        assert len(target["labels"]) == len(target["iscrowd"]) == len(target["area"]) == len(target["masks"]) == n
        assert target["masks"].shape[1:] == (48, 48)
        if n:
            boxes = target["boxes"]
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            assert boxes.min() >= 0 and boxes.max() <= 48


def test_dense_train_pads_semantic_maps_with_the_ignore_label(shapes):
    torch.manual_seed(0)
    transform = dense_train(crop=96, scale_range=(0.5, 0.5), mask_fill=255, boxes=False)
    data = SemanticFolder(shapes / "images" / "train", shapes / "semantic" / "train", 7, transforms=transform)
    image, mask = data[0]
    assert image.shape == (3, 96, 96) and mask.shape == (96, 96)
    assert (mask == 255).float().mean() > 0.5  # a 32 px image in a 96 px crop is mostly padding


def test_dense_eval_resizes_the_shorter_side(shapes):
    data = CocoInstances(shapes / "images" / "val", shapes / "annotations" / "instances_val.json", dense_eval(80))
    image, target = data[0]
    assert image.shape == (3, 80, 80) and target["masks"].shape[1:] == (80, 80)


def test_classification_presets(shapes):
    from PIL import Image

    image = Image.open(shapes / "images" / "train" / "000000.png").convert("RGB")
    torch.manual_seed(0)
    assert classification_train(32)(image).shape == (3, 32, 32)
    out = classification_eval(32)(image)
    assert out.shape == (3, 32, 32) and abs(float(out.mean())) < 3


def test_without_randaugment_and_erasing_the_training_transform_is_the_demos():
    """The shapes config and the demo (no RandAugment, no erasing) keep their crop + flip + normalise, drawn
    from the same random numbers as before."""
    from PIL import Image
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision.transforms import InterpolationMode, v2

    image = Image.effect_noise((80, 60), 64).convert("RGB")
    reference = v2.Compose([
        v2.RandomResizedCrop(32, scale=(0.6, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])  # fmt: skip
    for seed in range(4):
        torch.manual_seed(seed)
        expected = reference(image)
        torch.manual_seed(seed)
        torch.testing.assert_close(classification_train(32, (0.6, 1.0), False, 0.0)(image), expected, rtol=0, atol=0)


def test_randaugment_true_is_mmcls_swin_and_a_string_is_timms_config():
    from timm.data.auto_augment import RandAugment

    default = next(t for t in classification_train(32, randaugment=True).transforms if isinstance(t, RandAugment))
    assert default.num_layers == 2 and len(default.ops) == 15
    assert {(op.magnitude, op.magnitude_std) for op in default.ops} == {(9, 0.5)}
    assert "PosterizeIncreasing" in {op.name for op in default.ops}  # inc1: severity grows with magnitude
    other = next(t for t in classification_train(32, randaugment="rand-m7-n3").transforms if isinstance(t, RandAugment))
    assert other.num_layers == 3 and {op.magnitude for op in other.ops} == {7}
    assert "Posterize" in {op.name for op in other.ops}


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_random_erasing_fills_by_mode(mode):
    """On a flat image, an erased rectangle is per-pixel noise ("pixel", mmcls's "rand" with fill_std), one
    random colour ("rand") or zero, the normalised mean ("const")."""
    from PIL import Image

    torch.manual_seed(0)
    image = Image.new("RGB", (32, 32), (250, 250, 250))
    out = classification_train(32, (1.0, 1.0), False, 1.0, random_erasing_mode=mode)(image)
    flat = classification_train(32, (1.0, 1.0), False, 0.0)(image)
    erased = (out != flat).any(0)
    assert 0.02 * 32 * 32 <= erased.sum() <= 32 * 32 / 3 + 32  # one rectangle of 2% to 1/3 of the image
    values = out[:, erased]  # (3, pixels)
    if mode == "pixel":
        assert values.unique(dim=1).shape[1] > 0.9 * values.shape[1]
    elif mode == "rand":
        assert values.unique(dim=1).shape[1] == 1
    else:
        assert (values == 0).all()


def test_interpolation_reaches_every_resize():
    from timm.data.auto_augment import RandAugment
    from torchvision.transforms import InterpolationMode

    train = classification_train(32, randaugment=True, interpolation="bilinear").transforms
    assert train[0].interpolation == InterpolationMode.BILINEAR
    ops = next(t for t in train if isinstance(t, RandAugment)).ops
    assert {op.kwargs["resample"] for op in ops} == {2}  # PIL's BILINEAR
    assert classification_eval(32, 40, interpolation="nearest").transforms[0].interpolation == InterpolationMode.NEAREST
    with pytest.raises(ValueError, match="interpolation='area'.*bicubic"):
        classification_eval(32, interpolation="area")
