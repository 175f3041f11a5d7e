"""Transform presets of the paper's recipes (torchvision transforms v2; timm's RandAugment and RandomErasing)."""

from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_pil_interp
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

INSTANCE_KEYS = ("labels", "iscrowd", "area", "isthing", "segment_ids")


# mmclassification's Swin recipe (configs/_base_/datasets/imagenet_bs64_swin_224.py) in timm's terms
RANDAUGMENT = "rand-m9-mstd0.5-inc1"  # RandAugment "timm_increasing", 2 ops, magnitude 9 of 10, std 0.5
ERASING_MODES = ("const", "rand", "pixel")


INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # PIL's, in torchvision and timm


def _interpolation(name: str) -> InterpolationMode:
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation={name!r}: expected one of {', '.join(INTERPOLATIONS)}")
    return InterpolationMode(name)


def classification_train(
    size: int = 224,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    randaugment: bool | str | None = True,
    random_erasing: float = 0.25,
    mean=IMAGENET_DEFAULT_MEAN,
    std=IMAGENET_DEFAULT_STD,
    *,
    interpolation: str = "bicubic",
    random_erasing_mode: str = "pixel",
) -> v2.Compose:
    """ImageNet training recipe: RandomResizedCrop + horizontal flip (torchvision), RandAugment (timm, on the
    PIL image), to tensor + normalise, RandomErasing (timm, on the normalised tensor).

    Args:
        randaugment: a timm RandAugment config string (``"rand-m9-mstd0.5-inc1"``); ``True`` means
            :data:`RANDAUGMENT` (mmclassification's Swin setting); ``False``/``None``/``""`` turns it off.
            Geometric operations fill with ``mean`` and resample with ``interpolation``.
        random_erasing: probability of erasing one rectangle (0 turns it off).
        interpolation: of the crop's resize and of RandAugment's geometric operations.
        random_erasing_mode: timm's fill, in normalised units: ``"pixel"`` a normal draw per pixel (the
            image's mean and std in pixel units, mmclassification's ``mode="rand"`` with ``fill_std``),
            ``"rand"`` one normal colour per rectangle, ``"const"`` zero (the mean colour).
    """
    mode = _interpolation(interpolation)
    if random_erasing_mode not in ERASING_MODES:
        raise ValueError(f"random_erasing_mode={random_erasing_mode!r}: expected one of {', '.join(ERASING_MODES)}")
    steps = [
        v2.RandomResizedCrop(size, scale=crop_scale, interpolation=mode, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if randaugment:
        config = RANDAUGMENT if randaugment is True else randaugment
        if not config.startswith("rand"):
            raise ValueError(f"randaugment={config!r}: expected a timm RandAugment string such as {RANDAUGMENT!r}")
        # the hyper-parameters timm.data.create_transform gives RandAugment
        hparams = dict(translate_const=int(size * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in mean))
        hparams["interpolation"] = str_to_pil_interp(mode.value)
        steps.append(rand_augment_transform(config, hparams))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if random_erasing > 0:
        steps.append(RandomErasing(random_erasing, mode=random_erasing_mode, max_count=1, device="cpu"))
    return v2.Compose(steps)


def classification_eval(
    size: int = 224,
    resize: int | None = None,
    mean=IMAGENET_DEFAULT_MEAN,
    std=IMAGENET_DEFAULT_STD,
    *,
    interpolation: str = "bicubic",
) -> v2.Compose:
    """Test recipe: resize the shorter side to ``resize`` (default ``size * 248 / 224``; mmclassification's Swin
    recipe uses 256 for a 224 crop) and centre-crop ``size``."""
    resize = resize or round(size * 248 / 224)
    return v2.Compose(
        [
            v2.Resize(resize, interpolation=_interpolation(interpolation), antialias=True),
            v2.CenterCrop(size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def _aligned_targets(sample):
    """The per-object tensors that SanitizeBoundingBoxes must filter along with the boxes."""
    target = sample[1] if isinstance(sample, tuple | list) else sample
    return tuple(target[k] for k in INSTANCE_KEYS if isinstance(target, dict) and k in target)


def dense_train(
    crop: int = 1024,
    scale_range: tuple[float, float] = (0.1, 2.0),
    mask_fill: int = 0,
    boxes: bool = True,
    mean=IMAGENET_DEFAULT_MEAN,
    std=IMAGENET_DEFAULT_STD,
) -> v2.Compose:
    """Detection / segmentation training recipe (§4.1): scale jitter of the ``crop x crop`` canvas by
    ``scale_range`` (COCO [0.1, 2.0], ADE20K [0.5, 2.0]), a random ``crop`` (padded when smaller),
    a horizontal flip. Boxes that leave the crop are removed with their masks and labels. Padding of
    masks uses ``mask_fill`` (``data.semantic.IGNORE_INDEX`` for semantic maps); ``boxes=False`` for
    samples without boxes (semantic segmentation)."""
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: mask_fill, "others": 0}
    steps = [
        v2.ScaleJitter((crop, crop), scale_range=scale_range, antialias=True),
        v2.RandomCrop(crop, pad_if_needed=True, fill=fill),
        v2.RandomHorizontalFlip(),
        *([v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(labels_getter=_aligned_targets)] if boxes else []),
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(mean, std),
    ]
    return v2.Compose(steps)


def dense_eval(shorter_side: int = 800, max_size: int = 1333, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """Test recipe: resize the shorter side (COCO 800, ADE20K 640), longer side at most ``max_size``."""
    return v2.Compose(
        [
            v2.Resize(shorter_side, max_size=max_size, antialias=True),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(mean, std),
        ]
    )
