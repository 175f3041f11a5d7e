"""The embedded "shapes" scene dataset: generated from a seed, written in the standard formats.

Every image is a scene: "stuff" regions (sky, ground, water, each with its own texture) and several
"thing" objects (geometric shapes of a few classes, varied colour, size and rotation, occluding each
other in a random order). A few images also hold a *crowd*: a cluster of small shapes of one class
annotated as a single ``iscrowd`` region. The same scenes are written as

* ``images/{split}/NNNNNN.png``: the RGB images;
* ``annotations/instances_{split}.json``: COCO instances (RLE masks of the visible parts, boxes,
  areas, ``iscrowd``);
* ``annotations/panoptic_{split}.json`` and ``annotations/panoptic_{split}/NNNNNN.png``: COCO
  panoptic (segment id = R + 256 G + 256^2 B; 0 is void);
* ``semantic/{split}/NNNNNN.png``: ADE20K-style label maps (0 = unlabelled, 1..C the categories
  in the order of ``CATEGORIES``);
* ``imagefolder/{split}/{class}/...png``: crops of the single, mostly visible things, for
  classification;
* ``shapes.json``: the options (seed, counts, size) and the list of files written.

Generation is deterministic: the same seed, counts and size give byte-identical files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..outputs import remove_outputs, write_json
from .masks import encode_rle, ids_to_rgb, rle_to_bbox

THINGS = ("circle", "square", "triangle", "star")
STUFF = ("sky", "ground", "water")
CATEGORIES = [
    *({"id": i + 1, "name": n, "supercategory": "shape", "isthing": 1} for i, n in enumerate(THINGS)),
    *({"id": len(THINGS) + i + 1, "name": n, "supercategory": "background", "isthing": 0} for i, n in enumerate(STUFF)),
]
CATEGORY_COLORS = {1: (220, 20, 60), 2: (0, 130, 200), 3: (255, 200, 0), 4: (145, 30, 180),
                   5: (135, 206, 235), 6: (139, 90, 43), 7: (0, 105, 148)}  # fmt: skip
for _c in CATEGORIES:
    _c["color"] = list(CATEGORY_COLORS[_c["id"]])

MIN_VISIBLE_AREA = 24  # pixels; smaller visible parts are not drawn at all
CROP_MIN_VISIBLE = 0.6  # fraction of a thing that must be visible for an ImageFolder crop


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    segments: np.ndarray  # (H, W) int32 segment index, 0 = void
    infos: list[dict]  # per segment index - 1: category_id, iscrowd, full_area


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "circle":
        n, radii = 48, [r]
    elif kind == "square":
        n, radii = 4, [r]
    elif kind == "triangle":
        n, radii = 3, [r]
    else:  # star
        n, radii = 10, [r, 0.45 * r]
    return [
        (cx + radii[i % len(radii)] * math.cos(angle + 2 * math.pi * i / n),
         cy + radii[i % len(radii)] * math.sin(angle + 2 * math.pi * i / n))
        for i in range(n)
    ]  # fmt: skip


def _mask(size: int, polygon) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(polygon, fill=1)
    return np.asarray(canvas, dtype=bool)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb) * 255


def _stuff(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Background texture and stuff label map (values are indices into STUFF)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    horizon = rng.uniform(0.25, 0.6) + 0.05 * np.sin(2 * math.pi * (xx * rng.uniform(0.5, 2) + rng.uniform()))
    layout = rng.choice(["ground", "water", "both"], p=[0.4, 0.3, 0.3])
    label = np.zeros((size, size), np.int64)  # sky
    below = yy >= horizon
    if layout == "ground":
        label[below] = 1
    elif layout == "water":
        label[below] = 2
    else:
        split = rng.uniform(0.3, 0.7) + 0.1 * np.sin(2 * math.pi * (yy * rng.uniform(1, 3) + rng.uniform()))
        label[below & (xx < split)] = 1
        label[below & (xx >= split)] = 2
    noise = rng.normal(0, 1, (size, size))
    sky = np.stack([120 + 60 * yy, 170 + 50 * yy, 235 + 0 * yy], -1) + 6 * noise[..., None]
    grain = rng.normal(0, 1, (size, size))
    ground = np.array(rng.choice([[120, 85, 50], [90, 120, 55]])) + 25 * grain[..., None]
    waves = np.sin(2 * math.pi * (yy * rng.uniform(12, 20) + 0.3 * np.sin(2 * math.pi * xx * 3)))
    water = np.stack([30 + 0 * yy, 100 + 25 * waves, 150 + 35 * waves], -1) + 5 * noise[..., None]
    image = np.where((label == 0)[..., None], sky, np.where((label == 1)[..., None], ground, water))
    return image, label


def render_scene(rng: np.random.Generator, size: int, crowd_prob: float = 0.15) -> Scene:
    """One scene: stuff, 2-5 things drawn back to front, sometimes a crowd of small shapes."""
    image, stuff = _stuff(rng, size)
    objects = []  # (category_id, iscrowd, full mask, colour)
    for _ in range(int(rng.integers(2, 6))):
        kind = int(rng.integers(len(THINGS)))
        r = size * rng.uniform(0.08, 0.22)
        cx, cy = rng.uniform(r * 0.6, size - r * 0.6, 2)
        mask = _mask(size, _polygon(THINGS[kind], cx, cy, r, rng.uniform(0, 2 * math.pi)))
        objects.append((kind + 1, 0, mask, _hsv_to_rgb(rng.uniform(), rng.uniform(0.6, 1), rng.uniform(0.6, 1))))
    if rng.uniform() < crowd_prob:
        kind = int(rng.integers(len(THINGS)))
        center = rng.uniform(size * 0.2, size * 0.8, 2)
        crowd = np.zeros((size, size), bool)
        for _ in range(int(rng.integers(6, 11))):
            cx, cy = center + rng.normal(0, size * 0.06, 2)
            crowd |= _mask(size, _polygon(THINGS[kind], cx, cy, size * 0.025, rng.uniform(0, 2 * math.pi)))
        objects.insert(int(rng.integers(len(objects) + 1)), (kind + 1, 1, crowd, _hsv_to_rgb(rng.uniform(), 0.8, 0.9)))

    # z-order: later objects cover earlier ones; objects left with a tiny visible part are dropped
    while True:
        owner = np.full((size, size), -1, np.int64)
        for i, (_, _, mask, _) in enumerate(objects):
            owner[mask] = i
        visible = [int((owner == i).sum()) for i in range(len(objects))]
        small = [i for i, v in enumerate(visible) if v < MIN_VISIBLE_AREA]
        if not small:
            break
        objects.pop(small[0])

    shade = 1 + 0.08 * rng.normal(0, 1, (size, size))
    segments = np.zeros((size, size), np.int32)
    infos = []
    for i, (category, iscrowd, mask, colour) in enumerate(objects):
        here = owner == i
        image[here] = colour * shade[here][:, None]
        segments[here] = len(infos) + 1
        infos.append(dict(category_id=category, iscrowd=iscrowd, full_area=int(mask.sum())))
    for s in range(len(STUFF)):
        here = (owner < 0) & (stuff == s)
        if here.any():
            segments[here] = len(infos) + 1
            infos.append(dict(category_id=len(THINGS) + 1 + s, iscrowd=0, full_area=int(here.sum())))
    return Scene(np.clip(image, 0, 255).astype(np.uint8), segments, infos)


MANIFEST = "shapes.json"
MANIFEST_FORMAT = "clusterformer-shapes"
# the entries of a dataset folder that make_shapes writes (and removes to replace a dataset)
DATASET_ENTRIES = ("images", "annotations", "semantic", "imagefolder", "README.txt", MANIFEST)
README_START = 'The embedded "shapes" scene dataset'  # README.txt of datasets written before the manifest


class ShapesFolderError(FileExistsError):
    """An output folder that holds another dataset; the message names the folder and how to go on."""


def _describe(options: dict) -> str:
    return (f"seed {options.get('seed')}, {options.get('num_train')} train + {options.get('num_val')} val images of "
            f"{options.get('size')} px")  # fmt: skip


def check_shapes_folder(out: str | Path, options: dict, overwrite: bool = False) -> bool:
    """Whether ``out`` may receive the dataset of ``options`` (seed, num_train, num_val, size); returns whether
    a dataset is there already (to be replaced). A :class:`ShapesFolderError` when the folder holds a dataset of
    other options (or one written before the manifest existed) and ``overwrite`` is false, or dataset-like
    entries (``images/``, ``annotations/``, ...) that make_shapes did not write. Other files do not matter."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ShapesFolderError(f"{out}: is a file; the output is a folder")
    present = [name for name in DATASET_ENTRIES if (out / name).exists()]
    if not present:
        return False
    manifest = out / MANIFEST
    readme = out / "README.txt"
    try:
        found = json.loads(manifest.read_text()) if manifest.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        found = None
    if isinstance(found, dict) and found.get("format") == MANIFEST_FORMAT:
        if found.get("options") == options or overwrite:
            return True
        state = "" if found.get("complete") else ", incomplete"
        raise ShapesFolderError(
            f"{out}: holds another shapes dataset ({_describe(found.get('options') or {})}{state}; asked for "
            f"{_describe(options)}); pass --overwrite to replace it, or choose another folder"
        )
    try:
        earlier = readme.is_file() and readme.read_text().startswith(README_START)
    except (OSError, UnicodeDecodeError):
        earlier = False
    if earlier:
        if overwrite:
            return True
        raise ShapesFolderError(
            f"{out}: holds a shapes dataset without {MANIFEST} (written by an earlier version; its options are "
            "unknown); pass --overwrite to replace it, or choose another folder"
        )
    names = ", ".join(name + "/" * (out / name).is_dir() for name in present)
    raise ShapesFolderError(f"{out}: holds {names} that make-shapes did not write (no {MANIFEST}); choose another "
                            "folder")  # fmt: skip


def _write_manifest(out: Path, options: dict, files: list[str] | None) -> None:
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "options": options, "complete": files is not None}
    if files is not None:
        manifest["files"] = files
    write_json(out / MANIFEST, manifest, indent=None)


def write_split(
    out: Path, split: str, count: int, size: int, seed: int, stream: np.random.SeedSequence, progress: bool = True
) -> dict:
    """Generate ``count`` scenes of one split from ``stream`` and write them in every format."""
    from tqdm import tqdm

    rng = np.random.default_rng(stream)
    for sub in (f"images/{split}", f"semantic/{split}", f"annotations/panoptic_{split}"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for name in THINGS:
        (out / "imagefolder" / split / name).mkdir(parents=True, exist_ok=True)
    images, instances, panoptic = [], [], []
    crops = 0
    for index in tqdm(range(count), desc=f"shapes {split}", disable=not progress, unit="img"):
        scene = render_scene(rng, size)
        stem = f"{index:06d}"
        image_id = index + 1
        Image.fromarray(scene.image).save(out / "images" / split / f"{stem}.png")
        images.append(dict(id=image_id, file_name=f"{stem}.png", width=size, height=size))
        semantic = np.zeros((size, size), np.uint8)
        segments_info = []
        for seg_index, info in enumerate(scene.infos, start=1):
            mask = scene.segments == seg_index
            semantic[mask] = info["category_id"]
            area = int(mask.sum())
            rle = encode_rle(mask)
            bbox = rle_to_bbox(rle)
            segments_info.append(
                dict(id=seg_index, category_id=info["category_id"], iscrowd=info["iscrowd"], bbox=bbox, area=area)
            )
            if info["category_id"] > len(THINGS):
                continue
            annotation_id = len(instances) + 1
            instances.append(
                dict(id=annotation_id, image_id=image_id, category_id=info["category_id"], segmentation=rle,
                     area=area, bbox=bbox, iscrowd=info["iscrowd"])
            )  # fmt: skip
            if not info["iscrowd"] and area >= CROP_MIN_VISIBLE * info["full_area"]:
                x, y, w, h = (int(v) for v in bbox)
                pad = max(2, int(0.15 * max(w, h)))
                box = (max(0, x - pad), max(0, y - pad), min(size, x + w + pad), min(size, y + h + pad))
                name = THINGS[info["category_id"] - 1]
                Image.fromarray(scene.image).crop(box).save(
                    out / "imagefolder" / split / name / f"{stem}_{annotation_id:06d}.png"
                )
                crops += 1
        Image.fromarray(semantic).save(out / "semantic" / split / f"{stem}.png")
        Image.fromarray(ids_to_rgb(scene.segments)).save(out / "annotations" / f"panoptic_{split}" / f"{stem}.png")
        panoptic.append(dict(image_id=image_id, file_name=f"{stem}.png", segments_info=segments_info))

    info = dict(description="ClusterFormer shapes", version="1.0", seed=seed, split=split)
    categories = [{k: v for k, v in c.items() if k != "color"} for c in CATEGORIES]
    thing_categories = [c for c in categories if c["isthing"]]
    with open(out / "annotations" / f"instances_{split}.json", "w") as f:
        json.dump(dict(info=info, images=images, annotations=instances, categories=thing_categories), f)
    with open(out / "annotations" / f"panoptic_{split}.json", "w") as f:
        json.dump(dict(info=info, images=images, annotations=panoptic, categories=CATEGORIES), f)
    return dict(images=count, instances=len(instances), crops=crops)


def make_shapes(
    out: str | Path,
    seed: int = 0,
    num_train: int = 1000,
    num_val: int = 200,
    size: int = 128,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Write the train and val splits of the shapes dataset to ``out``; returns what was written.

    The folder then holds exactly the files of a fresh one (other files than the dataset's are left alone): a
    dataset already there with the same options is written again (the same bytes), one with other options is a
    :class:`ShapesFolderError` unless ``overwrite``, which removes it first (see :func:`check_shapes_folder`)."""
    out = Path(out)
    if size < 32:
        raise ValueError(f"--size must be at least 32 pixels, got {size}")
    if num_train < 1 or num_val < 1:
        raise ValueError("--num-train and --num-val must be at least 1")
    options = {"seed": seed, "num_train": num_train, "num_val": num_val, "size": size}
    if check_shapes_folder(out, options, overwrite):
        remove_outputs(out, DATASET_ENTRIES)  # nothing of the earlier dataset stays: no stale crop or PNG
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(out, options, None)  # first: an interrupted run is known by its options
    # the two splits draw from independent streams derived from the seed
    train_stream, val_stream = np.random.SeedSequence(seed).spawn(2)
    written = {
        "train": write_split(out, "train", num_train, size, seed, train_stream, progress),
        "val": write_split(out, "val", num_val, size, seed, val_stream, progress),
    }
    (out / "README.txt").write_text(__doc__.strip() + "\n\nCategories: " + json.dumps(CATEGORIES) + "\n")
    files = sorted(
        path.relative_to(out).as_posix()
        for name in DATASET_ENTRIES
        if name != MANIFEST
        for path in ([out / name] if (out / name).is_file() else (out / name).rglob("*"))
        if path.is_file()
    )
    _write_manifest(out, options, files)
    return written
