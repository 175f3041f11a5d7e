"""``clusterformer predict --task T --ckpt CKPT IMAGES_OR_FOLDERS... --out OUT``: run a trained task checkpoint
on image files and write a picture of every prediction and the standard result files.

``OUT`` receives (every file written under a temporary name and renamed when complete):

* every task: ``overlays/<name>.png``, the image with its prediction drawn on it (scaled down to
  :data:`MAX_OVERLAY_SIDE` pixels on the longer side for larger images), and ``summary.json`` (task,
  checkpoint, every image with its id and size, the skipped files with the reason);
* classification: ``predictions.json``, the top-k classes of every image;
* detection / instance: ``results.json``, COCO results (``image_id``, ``category_id``, ``score``, ``bbox``
  ``[x, y, w, h]`` and, for instance segmentation, ``segmentation`` as compressed RLE), and ``images.json``, a
  COCO file with the ``images`` and ``categories`` and no annotations (``COCO("images.json").loadRes(...)``);
* semantic: ``labels/<name>.png``, label maps at the image's size, in the checkpoint data's convention;
* panoptic: ``panoptic.json`` and ``panoptic/<name>.png``, the COCO panoptic format.

A non-empty ``OUT`` is refused unless ``overwrite`` (``--overwrite``), which first deletes the previous results
(:func:`all_outputs`, whatever the task that wrote them), so that no overlay of an earlier run stays beside the new
results; other files are kept. Details and decisions: ``docs/predict_explain.md``.

The images go through :class:`clusterformer.Predictor` (preprocessing, batching, the results in the image's own
pixels), exactly as from Python; each task has its :class:`Writer` (``registry.TASKS[task].writer``), which writes
the results' ``to_coco`` entries into the task's files and their ``draw`` as the overlays.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..data.images import IMAGE_SUFFIXES, ImageReadError, load_rgb
from ..outputs import atomic_path, check_output_folder, remove_outputs, save_png, write_json
from ..predictor import PRECISIONS, eval_transform  # noqa: F401  (eval_transform: the test transform, as before)
from ..registry import TASKS as TASK_SPECS
from ..resampling import NearestResize, ResizedMasks  # noqa: F401  (moved to resampling; importable here as before)
from ..results import DEFAULT_SCORE_THRESHOLD, MAX_OVERLAY_SIDE, Result
from ..weights import TaskModel, load_task_model

TASKS = tuple(TASK_SPECS)  # the task names
COMMON_OUTPUTS = ("overlays", "summary.json")  # what predict writes for every task


class PredictError(ValueError):
    """Bad input to ``predict``: the message names the file and the problem."""


# --- inputs ---------------------------------------------------------------------------------------------------
def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given and the image files (by suffix, not hidden, sorted) of the folders given; a path that
    does not exist, or a folder without images, is an error."""
    paths: list[Path] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.name[0] != "."
            )
            if not found:
                raise PredictError(f"{path}: no image files in this folder ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise PredictError(f"{path}: no such file or folder")
    return list(dict.fromkeys(paths))  # a file given twice is predicted once


def output_names(paths: Sequence[Path]) -> list[str]:
    """One output name per input: its stem, made unique with the suffix (``a_jpg``) or a count (``a_2``)."""
    names, used = [], set()
    for path in paths:
        name = path.stem
        if name in used:
            name = f"{path.stem}_{path.suffix.lstrip('.').lower()}"
        count = 2
        while name in used:
            name, count = f"{path.stem}_{count}", count + 1
        used.add(name)
        names.append(name)
    return names


def image_ids(paths: Sequence[Path], id_file: str | Path | None = None) -> list[int]:
    """COCO image ids of the inputs: from ``id_file`` (a COCO JSON; its ``images`` matched by file name) if
    given; else the file stems when they are all distinct integers (COCO's ``000000397133.jpg`` -> 397133);
    else 1, 2, ... in input order."""
    if id_file is not None:
        id_file = Path(id_file)
        try:
            data = json.loads(id_file.read_text())
            by_name = {Path(image["file_name"]).name: int(image["id"]) for image in data["images"]}
        except FileNotFoundError:
            raise PredictError(f"{id_file}: file not found") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise PredictError(f"{id_file}: not a COCO JSON with 'images' (file_name, id): {error!r}") from error
        missing = [path.name for path in paths if path.name not in by_name]
        if missing:
            more = f" ({len(missing)} inputs unlisted)" if len(missing) > 1 else ""
            raise PredictError(f"{id_file}: no image named {missing[0]}{more}")
        return [by_name[path.name] for path in paths]
    stems = [path.stem for path in paths]
    if all(stem.isascii() and stem.isdigit() for stem in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(stem) for stem in stems]
    return list(range(1, len(paths) + 1))


def read_class_names(path: str | Path) -> list[str]:
    """Class names, one per line in label order (blank lines ignored)."""
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as error:
        raise PredictError(f"{path}: cannot read the class names ({error.strerror or error})") from None
    if not names:
        raise PredictError(f"{path}: no class names (expected one name per line)")
    return names


# --- writers: one per task --------------------------------------------------------------------------------------
@dataclass
class Item:
    path: Path
    name: str
    image_id: int


class Writer:
    """Writes one image's outputs as it comes (``add``, a :mod:`clusterformer.results` result) and the files over all
    images at the end (``finish``). The result files are the results' ``to_coco`` entries, the overlays their
    ``draw``.

    ``outputs``: the files and folders it writes into the output folder besides ``overlays/`` and ``summary.json``
    (what ``--overwrite`` deletes)."""

    outputs: tuple[str, ...] = ()

    def __init__(self, out: Path, model: TaskModel, score_threshold: float | None):
        self.out = out
        self.model = model
        self.score_threshold = DEFAULT_SCORE_THRESHOLD if score_threshold is None else score_threshold

    def add(self, item: Item, result: Result) -> None:
        save_png(self.overlay(result), self.out / "overlays" / f"{item.name}.png")

    def overlay(self, result: Result) -> Image.Image:
        """The result drawn, on the image scaled down to :data:`MAX_OVERLAY_SIDE` when it is larger (the result
        files keep the image's size)."""
        return result.draw(max_side=MAX_OVERLAY_SIDE)

    def finish(self, images: list[dict]) -> None:
        pass


class ClassificationWriter(Writer):
    outputs = ("predictions.json",)

    def __init__(self, *args):
        super().__init__(*args)
        self.records = []

    def add(self, item, result):
        super().add(item, result)
        self.records.append({"file": str(item.path), "name": item.name, "top_k": result.to_coco()["top_k"]})

    def finish(self, images):
        write_json(self.out / "predictions.json", self.records)


class SetWriter(Writer):
    """Detection and instance segmentation: COCO results of every detection the predictor kept (all of the model's
    top-k); those above the score threshold drawn."""

    outputs = ("results.json", "images.json")

    def __init__(self, *args):
        super().__init__(*args)
        self.results = []

    def add(self, item, result):
        super().add(item, result)
        self.results += result.to_coco(item.image_id)

    def overlay(self, result):
        return result.draw(self.score_threshold, max_side=MAX_OVERLAY_SIDE)

    def finish(self, images):
        write_json(self.out / "results.json", self.results, indent=None)
        write_json(
            self.out / "images.json",
            {"images": [{k: image[k] for k in ("id", "file_name", "width", "height")} for image in images],
             "annotations": [], "categories": self.model.categories},
        )  # fmt: skip


class SemanticWriter(Writer):
    """Label PNGs (``SemanticMap.to_coco``): class ``c`` is written as ``c + 1`` (0 = unlabelled) when the
    checkpoint's data reduces the zero label (ADE20K, the default), as ``c`` otherwise; 16-bit PNGs when the values
    exceed 255."""

    outputs = ("labels",)

    def add(self, item, result):
        super().add(item, result)
        save_png(Image.fromarray(result.to_coco()), self.out / "labels" / f"{item.name}.png")


class PanopticWriter(Writer):
    """COCO panoptic PNGs (id = R + 256 G + 256^2 B, 0 = void) and one JSON for all images. A score threshold given
    to ``predict`` is the mask-wise merging's (the predictor's ``score_threshold``)."""

    outputs = ("panoptic", "panoptic.json")

    def __init__(self, *args):
        super().__init__(*args)
        self.annotations = []

    def add(self, item, result):
        from ..metrics.panoptic import write_panoptic

        super().add(item, result)
        file_name = f"{item.name}.png"
        path = self.out / "panoptic" / file_name
        with atomic_path(path) as temporary:
            write_panoptic(temporary.parent, temporary.name, result.segmentation)
        self.annotations.append(result.to_coco(item.image_id, file_name))

    def finish(self, images):
        write_json(
            self.out / "panoptic.json",
            {"images": [{k: image[k] for k in ("id", "file_name", "width", "height")} for image in images],
             "annotations": self.annotations, "categories": self.model.categories},
        )  # fmt: skip


def all_outputs() -> tuple[str, ...]:
    """What ``predict`` writes into its folder, for every task: the previous results that ``--overwrite`` deletes."""
    writers = [spec.writer_class for spec in TASK_SPECS.values()]
    return tuple(dict.fromkeys([*COMMON_OUTPUTS, *(name for writer in writers for name in writer.outputs)]))


# --- the command ------------------------------------------------------------------------------------------------
def run_predict(
    task: str,
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    score_threshold: float | None = None,
    device: str | None = None,
    precision: str = "fp32",
    batch_size: int = 1,
    top_k: int = 5,
    size: int | None = None,
    class_names: Sequence[str] | None = None,
    id_file: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Predict every image of ``inputs`` (files and folders) with the ``task`` checkpoint and write the outputs
    to ``out`` (see the module docstring). An unreadable image is skipped with a warning. Returns the summary
    (also written to ``out/summary.json``). Bad inputs raise :class:`PredictError` (or ``ValueError`` /
    ``OSError`` from the checkpoint loader) before anything is written; so does a non-empty ``out`` without
    ``overwrite`` (an :class:`~clusterformer.outputs.OutputExistsError`). With ``overwrite``, the previous results
    in ``out`` are deleted once the inputs and the checkpoint have been checked."""
    from ..predictor import Predictor
    from ..progress import terminal_bar  # imports Lightning: not at module level

    if task not in TASKS:
        raise PredictError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if batch_size < 1 or top_k < 1:
        raise PredictError(f"--batch-size and --top-k must be at least 1, got {batch_size} and {top_k}")
    out = check_output_folder(out, overwrite)
    paths = collect_images(inputs)
    ids = image_ids(paths, id_file)
    model = load_task_model(task, checkpoint, class_names)
    # detection / instance: every one of the model's top-k detections in results.json (COCO AP needs the low-score
    # tail), the threshold only for the drawing; panoptic: the mask-wise merging's threshold
    kept = {"detection": 0.0, "instance": 0.0, "panoptic": score_threshold}.get(task)
    try:
        predictor = Predictor(
            model, device=device or ("cuda" if torch.cuda.is_available() else "cpu"), precision=precision,
            score_threshold=kept, top_k=top_k, size=size, batch_size=batch_size,
        )  # fmt: skip
    except ValueError as error:
        raise PredictError(str(error)) from None
    remove_outputs(out, all_outputs())  # only with overwrite can the folder hold anything
    out.mkdir(parents=True, exist_ok=True)
    writer = TASK_SPECS[task].writer_class(out, model, score_threshold)
    items = [Item(p, n, i) for p, n, i in zip(paths, output_names(paths), ids, strict=True)]
    images, skipped = [], []
    bar = terminal_bar(len(items), f"predict {task}", enabled=progress)  # a log gets the one line of run() instead
    for start in range(0, len(items), batch_size):
        loaded = []
        for item in items[start : start + batch_size]:
            try:
                loaded.append((item, load_rgb(item.path)))
            except ImageReadError as error:
                skipped.append({"file": str(item.path), "error": str(error)})
                bar.write(f"clusterformer predict: warning: {error}; skipped", file=sys.stderr)
        if loaded:
            results = predictor.predict_images([image for _, image in loaded])
            for (item, image), result in zip(loaded, results, strict=True):
                writer.add(item, result)
                images.append({"id": item.image_id, "file_name": item.path.name, "width": image.width,
                               "height": image.height, "file": str(item.path), "name": item.name})  # fmt: skip
        bar.update(len(items[start : start + batch_size]))
    bar.close()
    if not images:
        raise PredictError(f"none of the {len(items)} input images could be read")
    writer.finish(images)
    summary = {"task": task, "checkpoint": str(checkpoint), "images": images, "skipped": skipped}
    write_json(out / "summary.json", summary)
    return summary


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "predict",
        help="predict image files with a task checkpoint; write overlays and COCO / PNG results "
        "(with --config: LightningCLI's predict over a data module)",
        description="Run a trained checkpoint on image files and folders (any size; grayscale, RGBA and 16-bit "
        "images are converted to RGB) and write to --out: overlays/<name>.png for every image and the results: "
        "classification predictions.json (top-k classes); detection / instance results.json (COCO results, bbox "
        "and segmentation RLE) and images.json; semantic labels/<name>.png; panoptic panoptic.json + "
        "panoptic/<name>.png (COCO panoptic); summary.json. Unreadable images are skipped with a warning and "
        "listed. 'clusterformer predict --config FILE ...' (no --task) is LightningCLI's predict instead. "
        "See docs/predict_explain.md.",
    )
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint of a model trained for --task")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and folders of images")
    parser.add_argument("--out", required=True, help="output folder (empty or new, unless --overwrite)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out: the previous results there (overlays/, labels/, panoptic/, the JSON "
        "files) are deleted first; other files are kept",
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        help=f"detection / instance: draw predictions from this score (default {DEFAULT_SCORE_THRESHOLD}; the "
        "results JSON keeps all of the model's top-k); panoptic: the mask-wise merging's score threshold "
        "(default: the checkpoint's)",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument(
        "--precision", choices=tuple(PRECISIONS), default="fp32",
        help="fp32 (default), or bf16 / fp16: the forward pass under autocast on --device (on a CPU, bf16 runs in "
        "hardware only with AMX or AVX512-BF16: 'clusterformer benchmark' prints whether this one has either)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    parser.add_argument("--top-k", type=int, default=5, help="classification: classes listed per image (default 5)")
    parser.add_argument(
        "--size", type=int, help="model input: classification crop / dense shorter side (default: the checkpoint's)"
    )
    parser.add_argument("--class-names", help="text file, one class name per line in label order")
    parser.add_argument(
        "--image-ids", help="COCO JSON whose 'images' give the image ids by file name (default: numeric stems, or 1..N)"
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        names = read_class_names(args.class_names) if args.class_names else None
        summary = run_predict(
            args.task, args.ckpt, args.inputs, args.out, score_threshold=args.score_threshold, device=args.device,
            precision=args.precision, batch_size=args.batch_size, top_k=args.top_k, size=args.size,
            class_names=names, id_file=args.image_ids, overwrite=args.overwrite,
        )  # fmt: skip
    except (ValueError, OSError) as error:  # bad input: one line, no traceback
        print(f"clusterformer predict: error: {error}", file=sys.stderr)
        return 2
    print(f"predicted {len(summary['images'])} images; wrote {args.out}", file=sys.stderr)
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} unreadable images:", file=sys.stderr)
        for entry in summary["skipped"]:
            print(f"  {entry['error']}", file=sys.stderr)
    return 0


LIGHTNING_ARGUMENTS = ("-c", "--config", "--model", "--data", "--trainer", "--ckpt_path", "--print_config")


def is_lightning_predict(argv: Sequence[str]) -> bool:
    """``predict`` with a LightningCLI argument (``--config``, ``--model.*``, ``--trainer.*``, ``--ckpt_path``,
    ...) is LightningCLI's predict over a data module; otherwise it is this module's image-file command."""
    return any(arg.split("=", 1)[0].split(".", 1)[0] in LIGHTNING_ARGUMENTS for arg in argv[1:])
