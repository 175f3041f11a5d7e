"""The ``clusterformer`` command."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
import warnings
from pathlib import Path

from . import __version__
from .errors import InputError
from .explain import add_explain_parser
from .export import add_export_parser
from .predict import add_predict_parser, is_lightning_predict
from .weights import add_convert_parser


def _benchmark(args: argparse.Namespace) -> int:
    from .benchmark import (
        DEFAULT_MODELS,
        DENSE_MODELS,
        DENSE_SIZES,
        dense_task,
        markdown_table,
        profile_model,
        require_transformers,
        run_benchmark,
        save,
        split_runtime,
        with_runtimes,
    )

    try:
        for name in args.models or ():
            split_runtime(name)
    except ValueError as error:
        print(f"clusterformer benchmark: error: {error}", file=sys.stderr)
        return 2
    # dense defaults (batch 1, 512 and 800x1216) for --task dense or a list of dense models only
    dense = args.task == "dense" or bool(args.models and all(dense_task(name) for name in args.models))
    models = args.models or (DENSE_MODELS if dense else DEFAULT_MODELS)
    if args.quick and not args.models:  # ClusterFormer-T and its peer: instance / Mask2Former, or Swin-T
        models = DENSE_MODELS[2:4] if dense else DEFAULT_MODELS[:2]
    if args.onnx:  # each model in eager mode, torch.compile and onnxruntime (ClusterFormer-T by default)
        models = with_runtimes(args.models or ["clusterformer_tiny"])
    sizes = args.img_size or (list(DENSE_SIZES[:1] if args.quick else DENSE_SIZES) if dense else [224])
    batch = args.batch_size or (1 if dense else 8)
    try:
        require_transformers(models)
        if any(split_runtime(name)[1] == "onnxruntime" for name in models):
            import onnxruntime  # noqa: F401
    except ImportError as error:
        if error.name == "onnxruntime":
            error = "onnxruntime is not installed: pip install 'clusterformer[export]'"
        print(f"clusterformer benchmark: error: {error}", file=sys.stderr)
        return 2
    if args.profile:
        for size in sizes:
            for name in models:
                for mode in ("infer",) if dense_task(name) or "@" in name else ("infer", "train"):
                    print(profile_model(name, mode, batch, size))
        return 0
    rounds, iters = (1, 3) if args.quick else (args.rounds, args.iters)
    reports = []
    for size in sizes:  # one interleaved run and one table per size
        report = run_benchmark(
            models=models,
            batch=batch,
            img_size=size,
            rounds=rounds,
            warmup=args.warmup,
            iters=iters,
            device=args.device,
            amp=args.amp,
            train=not (args.no_train or args.onnx),
        )
        reports.append(report)
        print(markdown_table(report) + "\n", flush=True)
    if args.json:  # one size: the report; several: {"reports": [one per size]}
        save(reports[0] if len(reports) == 1 else {"reports": reports}, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.markdown:
        Path(args.markdown).write_text("\n\n".join(markdown_table(report) for report in reports) + "\n")
        print(f"wrote {args.markdown}", file=sys.stderr)
    return 0


def _img_size(text: str):
    from .data.images import parse_img_size

    try:
        return parse_img_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _make_shapes(args: argparse.Namespace) -> int:
    from .data import make_shapes

    try:
        written = make_shapes(args.out, args.seed, args.num_train, args.num_val, args.size, overwrite=args.overwrite)
    except (ValueError, OSError) as error:  # bad options or an output folder holding another dataset
        print(f"clusterformer make-shapes: error: {error}", file=sys.stderr)
        return 2
    for split, counts in written.items():
        print(f"{split}: {counts['images']} images, {counts['instances']} instances, {counts['crops']} crops")
    print(f"wrote {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoInterrupted, run_demo

    try:
        run_demo(
            args.out,
            quick=args.quick,
            seed=args.seed,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
            resume=args.resume,
        )
    except FileExistsError as error:  # an output folder holding something else; refused before any work
        print(f"clusterformer demo: error: {error}", file=sys.stderr)
        return 2
    except DemoInterrupted as interruption:  # SIGTERM / SIGINT: which stage stopped, and how to go on
        print(f"clusterformer demo: {interruption}", file=sys.stderr)
        return interruption.exit_code
    return 0


def _evaluate_detection(args: argparse.Namespace) -> dict[str, float]:
    """COCO box AP/AR: ``--gt`` COCO instances JSON, ``--pred`` COCO results JSON (``bbox``)."""
    from .metrics import coco_evaluate

    _require(args, "gt", "pred")
    return coco_evaluate(args.gt, args.pred, "bbox")


def _evaluate_instance(args: argparse.Namespace) -> dict[str, float]:
    """COCO mask AP/AR: ``--gt`` COCO instances JSON, ``--pred`` COCO results JSON (``segmentation`` RLE).
    Only the mask metrics; score the boxes of the same file with ``--task detection``."""
    from .metrics import coco_evaluate

    _require(args, "gt", "pred")
    return coco_evaluate(args.gt, args.pred, "segm")


def _finite(value):
    """NaN (a class absent from both prediction and ground truth) as JSON ``null``."""
    return None if isinstance(value, float) and math.isnan(value) else value


def _evaluate_semantic(args: argparse.Namespace) -> dict:
    """mmsegmentation's mIoU between two folders of label PNGs (``--gt DIR``, ``--pred DIR``, matched by
    file name): dataset-level intersections over unions, label 255 ignored; per-class IoU by class index."""
    from .metrics.semantic import evaluate_semantic

    _require(args, "gt", "pred", "num_classes")
    if args.num_classes < 1:
        raise ValueError(f"--num-classes must be positive, got {args.num_classes}")
    results = evaluate_semantic(args.gt, args.pred, args.num_classes, reduce_zero_label=args.reduce_zero_label)
    return {
        "mIoU": _finite(results["mIoU"]),
        "mAcc": _finite(results["mAcc"]),
        "aAcc": _finite(results["aAcc"]),
        "IoU": {str(index): _finite(value) for index, value in enumerate(results["IoU"])},
    }


def _evaluate_panoptic(args: argparse.Namespace) -> dict:
    """panopticapi's PQ, SQ, RQ (all / things / stuff) and per-category PQ: ``--gt`` and ``--pred`` COCO
    panoptic JSONs, ``--gt-dir`` and ``--pred-dir`` their PNG folders (default: the JSON path without .json)."""
    from .metrics.panoptic import pq_compute

    _require(args, "gt", "pred")
    results = pq_compute(args.gt, args.pred, args.gt_dir, args.pred_dir)
    metrics = {}
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for key in ("pq", "sq", "rq"):
            metrics[key.upper() + suffix] = _finite(results[group][key])
        metrics["n" + suffix] = results[group]["n"]
    metrics["per_class"] = {str(category): values for category, values in results["per_class"].items()}
    return metrics


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is None]
    if missing:
        raise ValueError(f"--task {args.task} needs {' and '.join(missing)}")


# task -> handler: the handler reads its inputs from the parsed arguments, returns the metrics, and raises a
# ValueError (subclass) whose message names the file and the problem when an input is bad
EVALUATORS = {
    "detection": _evaluate_detection,
    "instance": _evaluate_instance,
    "semantic": _evaluate_semantic,
    "panoptic": _evaluate_panoptic,
}


def _evaluate(args: argparse.Namespace) -> int:
    from .outputs import atomic_path, check_output_file

    try:
        if args.out:
            check_output_file(args.out, args.overwrite)  # before the (possibly long) evaluation
        metrics = EVALUATORS[args.task](args)
    except (ValueError, OSError) as error:  # bad input: one line, no traceback
        print(f"clusterformer evaluate: error: {error}", file=sys.stderr)
        return 2
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:
        try:
            with atomic_path(args.out) as temporary:
                temporary.write_text(text + "\n")
        except OSError as error:
            print(f"clusterformer evaluate: error: {args.out}: cannot write the metrics ({error})", file=sys.stderr)
            return 2
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from .ablate import check_table, run_ablation

    try:
        table = check_table(args.table)
        run_ablation(
            table,
            args.config,
            args.out,
            max_epochs=args.max_epochs,
            limit_train_batches=args.limit_train_batches,
            limit_val_batches=args.limit_val_batches,
            seed=args.seed,
            config_overrides=args.set or (),
            resume=args.resume,
        )
    except (ValueError, OSError) as error:  # bad table, config or output folder: one line, no traceback
        print(f"clusterformer ablate: error: {error}", file=sys.stderr)
        return 2
    return 0


def _batches(text: str) -> int | float:
    """Lightning's ``limit_*_batches``: an integer is a number of batches, a fraction a share of them."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of batches or a fraction, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clusterformer", description="ClusterFormer: clustering as a universal visual learner."
    )
    parser.add_argument("--version", action="version", version=f"clusterformer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in LIGHTNING_COMMANDS.items():  # handled by LightningCLI; listed here for --help
        if name != "predict":  # predict.py's parser describes both forms of predict
            sub.add_parser(name, help=text, add_help=False)
    add_predict_parser(sub)
    add_explain_parser(sub)
    add_export_parser(sub)
    add_convert_parser(sub)

    bench = sub.add_parser(
        "benchmark",
        help="parameters, GMACs, throughput and peak memory next to Swin / Mask2Former / DETR, measured in one run",
        description="Measure ClusterFormer and its peers in one run: parameters, GMACs per image "
        "(torch.utils.flop_counter, FLOPs/2), inference and training-step (forward + backward + AdamW) images/s "
        "and peak memory. Models are interleaved over several rounds, each measurement in a fresh process. "
        "CPU runs in fp32; CUDA runs with bf16 autocast. --task classification (default): ClusterFormer-T/S next "
        "to timm's Swin-T/S, batch 8, 224x224. --task dense: the detection, instance and panoptic models of "
        "ClusterFormer-T next to DETR and Mask2Former with a Swin-T backbone (transformers, random weights; "
        "pip install clusterformer[bench]), inference only, batch 1, one table for 512x512 and one for 800x1216. "
        "--onnx: ClusterFormer-T's (or each --models model's) inference in PyTorch eager mode, torch.compile and "
        "onnxruntime (CPU, the model exported to ONNX), ratios against eager.",
    )
    bench.add_argument(
        "--task",
        choices=["classification", "dense"],
        default="classification",
        help="which default set of models, sizes and batch size (default: classification, or dense when every "
        "model given with --models is a dense one)",
    )
    bench.add_argument(
        "--models",
        nargs="+",
        help="model names: timm names, clusterformer_{nano,tiny,small}_{detection,instance,panoptic}, "
        "mask2former_swin_{tiny,small}, detr_swin_{tiny,small}; NAME@compile or NAME@onnxruntime for another "
        "runtime, compared with NAME (default: the --task set)",
    )
    bench.add_argument(
        "--onnx",
        action="store_true",
        help="inference in eager mode, torch.compile and onnxruntime (CPU) for clusterformer_tiny or the --models "
        "(needs onnxruntime: pip install 'clusterformer[export]'); no training step",
    )
    bench.add_argument("--batch-size", type=int, help="default: 8 (classification), 1 (dense)")
    bench.add_argument(
        "--img-size",
        type=_img_size,
        action="append",
        help="N or HxW (e.g. 800x1216); repeat for one table per size (default: 224; dense: 512 and 800x1216)",
    )
    bench.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    bench.add_argument("--iters", type=int, default=5, help="timed iterations per round")
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    bench.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on CUDA)"
    )
    bench.add_argument(
        "--no-train", action="store_true", help="skip the training-step measurement (dense models never have one)"
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="the first pair of the set (clusterformer_tiny and swin_tiny; dense: clusterformer_tiny_instance and "
        "mask2former_swin_tiny at 512 only), 1 round of 3 iterations",
    )
    bench.add_argument(
        "--profile", action="store_true", help="instead of timing, print where the time goes, by operator (CPU)"
    )
    bench.add_argument("--json", help="write the full report (all timings) to this JSON file")
    bench.add_argument("--markdown", help="write the table to this markdown file")
    bench.set_defaults(func=_benchmark)

    shapes = sub.add_parser(
        "make-shapes",
        help="generate the embedded shapes dataset in ImageFolder, COCO, ADE20K and COCO panoptic formats",
        description="Generate scenes of geometric 'thing' shapes (circle, square, triangle, star) over 'stuff' "
        "regions (sky, ground, water), deterministically from --seed, and write them as ImageFolder crops, COCO "
        "instances JSON, ADE20K-style semantic PNGs and COCO panoptic JSON + PNGs, with OUT/shapes.json (the "
        "options and the files). Rerun into the same folder with the same options, it writes the same files again; "
        "a folder holding a dataset of other options is refused unless --overwrite.",
    )
    shapes.add_argument("--out", required=True, help="output folder")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--num-train", type=int, default=1000)
    shapes.add_argument("--num-val", type=int, default=200)
    shapes.add_argument("--size", type=int, default=128, help="image side in pixels")
    shapes.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset of other options in --out (its files are deleted first); without it, such a "
        "folder is refused, and the same options write the same files again",
    )
    shapes.set_defaults(func=_make_shapes)

    demo = sub.add_parser(
        "demo",
        help="generate the shapes dataset, train ClusterFormer-Nano on the CPU, evaluate it and write a report",
        description="The main job on the embedded data: make-shapes into OUT/data, train clusterformer_nano on "
        "each task in turn (classification of the shape crops, then detection, instance, semantic and panoptic "
        "segmentation from the classifier's encoder), evaluate every model before and after training, and write "
        "OUT/report (metrics.json, report.md, a training curve and a picture of predictions per task). Checkpoints "
        "and logs go to OUT/<task>; OUT/demo.json records the options and each finished stage. A folder holding a "
        "demo run with other options, or other files, is refused unless --overwrite. SIGTERM or SIGINT stop the "
        "run with status 128 + the signal's number (143, 130), naming the stage that was stopped; the finished "
        "stages are kept, and --resume continues from the first unfinished one.",
    )
    demo.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    demo.add_argument(
        "--quick", action="store_true", help="a smaller dataset and fewer epochs (about 4 minutes on 2 CPU cores)"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--num-workers", type=int, default=2, help="data-loading processes")
    earlier = demo.add_mutually_exclusive_group()
    earlier.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what an earlier demo run wrote to --out; without it, a folder holding a demo run with other "
        "options (or other files) is refused, a finished run with the same options is replaced file by file, and "
        "an unfinished one is refused (see --resume)",
    )
    earlier.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted demo run in --out (same options): the stages that it finished (recorded in "
        "OUT/demo.json, their checkpoints, pictures and metrics there) are loaded, not trained again; the "
        "others run from their start",
    )
    demo.set_defaults(func=_demo)

    evaluate = sub.add_parser(
        "evaluate",
        help="score a predictions file against the ground truth offline and print the metrics as JSON",
        description="Score predictions offline with the reference tools and print the metrics as JSON. "
        "detection: COCO box AP/AR (pycocotools COCOeval, iouType bbox); instance: COCO mask AP/AR (iouType segm, "
        "areas from the masks). --gt is a COCO instances JSON, --pred a COCO results JSON (a list of image_id, "
        "category_id, score, bbox [x, y, w, h] and/or segmentation RLE). semantic: mmsegmentation's mIoU, mAcc, "
        "aAcc and per-class IoU between two folders of 8-bit label PNGs matched by file name (--gt DIR --pred DIR "
        "--num-classes N; ADE20K's convention by default: 0 unlabelled, 1..N the classes, 255 ignored). "
        "panoptic: panopticapi's PQ, SQ, RQ for all, things and stuff (--gt JSON --gt-dir DIR --pred JSON "
        "--pred-dir DIR, COCO panoptic format). Metrics are fractions (0-1). Bad input exits with status 2 and a "
        "one-line message naming the file.",
    )
    evaluate.add_argument("--task", required=True, choices=sorted(EVALUATORS))
    evaluate.add_argument("--gt", help="ground truth: COCO instances JSON, label PNG folder or COCO panoptic JSON")
    evaluate.add_argument("--pred", help="predictions: COCO results JSON, label PNG folder or COCO panoptic JSON")
    evaluate.add_argument("--gt-dir", help="panoptic: ground truth PNG folder (default: --gt without .json)")
    evaluate.add_argument("--pred-dir", help="panoptic: predicted PNG folder (default: --pred without .json)")
    evaluate.add_argument("--num-classes", type=int, help="semantic: number of classes (150 for ADE20K)")
    evaluate.add_argument(
        "--reduce-zero-label",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="semantic: file value 0 is 'unlabelled' and v is class v-1, as in ADE20K (default); "
        "--no-reduce-zero-label: file values are the classes 0..N-1",
    )
    evaluate.add_argument("--out", help="also write the metrics to this JSON file (an existing one is refused)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    evaluate.set_defaults(func=_evaluate)

    ablate = sub.add_parser(
        "ablate",
        help="train the variants of one of the paper's ablation tables (Table 6a-6f, S1a-S1f) and write the table",
        description="Train and validate every variant of one part of the paper's Table 6 with the task, data and "
        "trainer of a LightningCLI config (the file that 'clusterformer fit' takes), same seed for every row, and "
        "write OUT/table_<id>.md (the paper's layout, parameter counts measured from each model) and "
        "OUT/table_<id>.json; each row logs and checkpoints into OUT/table_<id>/<row>. 6a components, 6b "
        "iterations T, 6c center update, 6d head dimension, 6e feature dispatching: a classification config; 6f "
        "decoder query initialisation: an instance segmentation config; S1a-S1f, the same six parts of the "
        "supplement's Table S1: a panoptic segmentation config. See docs/training.md, Ablations.",
    )
    ablate.add_argument("--table", required=True, help="6a, 6b, 6c, 6d, 6e, 6f or S1a ... S1f")
    ablate.add_argument("--config", required=True, help="LightningCLI YAML config of the task and data")
    ablate.add_argument("--out", default="runs/ablate", help="output folder (default: runs/ablate)")
    ablate.add_argument("--max-epochs", type=int, help="default: the config's trainer.max_epochs")
    ablate.add_argument("--limit-train-batches", type=_batches, help="batches (integer) or share (fraction) per epoch")
    ablate.add_argument("--limit-val-batches", type=_batches, help="batches (integer) or share (fraction)")
    ablate.add_argument("--seed", type=int, help="seed of every row (default: the config's seed_everything, or 0)")
    ablate.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config setting, as LightningCLI's --KEY VALUE (repeatable), e.g. "
        "--set data.init_args.root=/tmp/shapes/imagefolder",
    )
    ablate.add_argument(
        "--resume", action="store_true", help="continue the rows of an earlier run in --out from their checkpoints"
    )
    ablate.set_defaults(func=_ablate)
    return parser


LIGHTNING_COMMANDS = {
    "fit": "train a task from a config (LightningCLI): clusterformer fit --config FILE [--key value ...]; resume a "
    "run with --ckpt_path CKPT (or last), start another run of the same config with --run_dir DIR; bad input is one "
    "line naming the key or file (fit, validate, test: --verbose adds the traceback)",
    "validate": "evaluate a checkpoint on the validation set: clusterformer validate --config FILE --ckpt_path CKPT",
    "test": "evaluate a checkpoint on the test set: clusterformer test --config FILE --ckpt_path CKPT",
    "predict": "run a checkpoint on the predict set: clusterformer predict --config FILE --ckpt_path CKPT",
}


def checkpoint_folders(trainer) -> list[Path]:
    """The folders that the trainer's checkpoint callbacks write to, which are also where Lightning looks for a
    checkpoint to resume from when ``fit`` is given none and an ``OnExceptionCheckpoint`` is configured: each
    callback's ``dirpath``, or for a ``ModelCheckpoint`` without one the folder Lightning resolves
    (``<first logger's log_dir>/checkpoints``, else ``<default_root_dir>/checkpoints``)."""
    from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

    folders = []
    for callback in trainer.callbacks:
        if not isinstance(callback, ModelCheckpoint | OnExceptionCheckpoint):
            continue
        folder = callback.dirpath
        if folder is None:
            folder = Path(trainer.loggers[0].log_dir if trainer.loggers else trainer.default_root_dir) / "checkpoints"
        folders.append(Path(folder).resolve())
    return list(dict.fromkeys(folders))


class RunExistsError(InputError, FileExistsError):
    """``fit`` into checkpoint folders that hold another run, or a resume with other settings than the run's."""


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def refuse_earlier_run(trainer, resumed: Path | None = None) -> None:
    """A :class:`RunExistsError` when a checkpoint folder of ``trainer`` holds checkpoints, unless ``resumed`` (the
    checkpoint that the run continues) is one of them: a new run would otherwise continue the earlier one
    silently (``OnExceptionCheckpoint`` makes Lightning resume from the newest ``last``/``on_exception``
    checkpoint), or write its checkpoints beside those of another run."""
    for folder in checkpoint_folders(trainer):
        # not the hidden temporary file of a save that was killed (checkpoint_io.AtomicCheckpointIO)
        found = sorted(path.name for path in folder.glob("[!.]*.ckpt")) if folder.is_dir() else []
        if not found or (resumed is not None and resumed.parent == folder):
            continue
        if resumed is None:
            raise RunExistsError(
                f"{folder}: holds the checkpoints of an earlier run ({_listed(found)}); pass --ckpt_path last (or a "
                "checkpoint's path) to continue it, or --run_dir DIR to start a new run in a folder of its own"
            )
        raise RunExistsError(
            f"{folder}: holds the checkpoints of another run ({_listed(found)}) than {resumed}; resume with that "
            "run's own config and --run_dir, or pass --run_dir DIR to continue in a folder of its own"
        )


def resumed_checkpoint(trainer, ckpt_path: str) -> Path | None:
    """The file that ``fit(ckpt_path=...)`` resumes from: the path itself, or for ``last`` the newest
    ``last*.ckpt`` / ``on_exception.ckpt`` of the checkpoint folders, as Lightning picks it; ``None`` for the
    other special values or a path that is not a file (Lightning reports those)."""
    if ckpt_path == "last":
        names = ("last*.ckpt", "on_exception.ckpt")
        found = [path for folder in checkpoint_folders(trainer) for name in names for path in folder.glob(name)]
        return max(found, key=lambda path: path.stat().st_mtime, default=None)
    path = Path(ckpt_path)
    return path.resolve() if path.is_file() else None


def refuse_changed_settings(requested: dict, path: Path) -> None:
    """A :class:`RunExistsError` when the task settings of the command (``requested``: the config's and the
    command line's ``model.init_args``) differ from those the checkpoint at ``path`` was trained with. Lightning
    would build the model with the checkpoint's settings from a checkpoint file, ignoring the command's, and
    with the command's for ``--ckpt_path last`` while restoring the checkpoint's optimizer and schedule, so the
    new checkpoints would record settings that were not used."""
    import torch

    from .outputs import json_safe

    try:
        stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters") or {}
    except Exception:  # not a checkpoint that loads this way: Lightning's own loading reports it
        return
    changed = [
        f"{key} {json_safe(stored[key])!r} -> {json_safe(requested[key])!r}"
        for key in sorted(set(stored) & set(requested), key=str)
        if not str(key).startswith("_") and json_safe(stored[key]) != json_safe(requested[key])
    ]
    if changed:
        raise RunExistsError(
            f"{path}: the model's settings differ from the checkpoint's ({'; '.join(changed[:3])}); resume with the "
            "run's own settings (its config.yaml), or start a new run with --run_dir DIR"
        )


def task_of(model_class, task: str | None = None) -> str | None:
    """The task (one of ``registry.TASKS``) that a LightningModule class trains, ``task`` being its ``task``
    argument where its class serves several tasks (``SetTask``: ``detection`` or ``instance``); ``None`` for a class
    that is none of the package's tasks."""
    from .registry import TASKS

    if not isinstance(model_class, type):
        return None
    for spec in TASKS.values():
        if issubclass(model_class, spec.module_class):
            return spec.resolve(task)
    return None


def _configured_class(class_path: str | None):
    """The class a config's ``class_path`` names (``None`` if it does not import)."""
    import importlib

    module, _, name = str(class_path or "").rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None) if module else None
    except ImportError:
        return None


def refuse_other_checkpoint(path: Path, expected: str | None) -> None:
    """A :class:`~clusterformer.weights.CheckpointError` naming ``path`` when it is not a checkpoint that loads
    weights-only (truncated, not a checkpoint, a pickle that would run code: ``weights.load_checkpoint``), or,
    ``expected`` being the task of the model to train, a checkpoint of another task. Lightning would otherwise
    print ``torch.load``'s traceback, or rebuild the model from the other task's settings and fail in the loss."""
    from .weights import CheckpointError, checkpoint_task, load_checkpoint

    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as error:
        raise CheckpointError(f"{error}; --ckpt_path takes a checkpoint that 'clusterformer fit' wrote") from None
    if expected is None:
        return
    found = checkpoint_task(checkpoint, path)
    if found != expected:
        raise CheckpointError(
            f"{path}: a {found} checkpoint, but the config trains a {expected} model; resume from a checkpoint of a "
            f"{expected} run, or start a new run from another task's encoder through its weights "
            "('clusterformer convert --backbone-only', docs/deployment.md)"
        )


# what Lightning's ckpt_path takes besides a file: the checkpoint folders' newest or best, SLURM's, a registry's
CKPT_PATH_NAMES = ("last", "best", "hpc", "registry")


def _clusterformer_cli():
    """LightningCLI with what ``clusterformer fit`` adds: ``--run_dir`` and the refusal of an earlier run."""
    from lightning.pytorch.cli import LightningCLI

    class ClusterFormerCLI(LightningCLI):
        """``--run_dir DIR`` moves every output of the run (``default_root_dir``, the loggers' ``save_dir``, the
        callbacks' checkpoint ``dirpath``) into ``DIR`` (checkpoints in ``DIR/checkpoints``). ``fit`` writes its
        checkpoints with :class:`~clusterformer.checkpoint_io.AtomicCheckpointIO` and resumes only
        from a ``--ckpt_path`` (a path, or ``last``) of the config's task (:func:`refuse_other_checkpoint`), with
        the run's settings (:func:`refuse_changed_settings`); without one, checkpoint folders that hold an earlier
        run are refused (:func:`refuse_earlier_run`)."""

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument(
                "--run_dir",
                type=str | None,
                default=None,
                help="folder of this run's logs and checkpoints (DIR/checkpoints), replacing the config's paths",
            )

        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            # the task settings asked for, before Lightning replaces them by a checkpoint file's
            subcommand = self.config.get("subcommand")
            model = self.config[subcommand].get("model") if subcommand else None
            init_args = getattr(model, "init_args", None)
            self.requested_settings = init_args.as_dict() if init_args is not None else {}
            self.requested_task = task_of(
                _configured_class(getattr(model, "class_path", None)), self.requested_settings.get("task")
            )
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand == "fit" else None
            if ckpt_path and Path(ckpt_path).is_file():  # before Lightning reads the file's settings
                refuse_other_checkpoint(Path(ckpt_path), self.requested_task)

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand]
            if config.get("run_dir"):
                from .ablate import redirect_outputs

                redirect_outputs(config.trainer, Path(config.run_dir))

        def after_instantiate_classes(self) -> None:
            super().after_instantiate_classes()
            # the checkpoint file and the data against the model (its number of classes) before the trainer writes
            # anything: Lightning and the tasks' setup() check them inside fit, after the loggers' folders and an
            # on_exception checkpoint are written
            ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
            named = str(ckpt_path) in CKPT_PATH_NAMES or str(ckpt_path).startswith("registry:")
            if ckpt_path is not None and not named and not Path(ckpt_path).is_file():
                raise InputError(f"{ckpt_path}: checkpoint file not found (ckpt_path)")
            check_data = getattr(self.model, "check_data", None)
            if check_data is not None and self.datamodule is not None:
                check_data(self.datamodule)

        def before_fit(self) -> None:
            from .checkpoint_io import use_atomic_checkpoints

            use_atomic_checkpoints(self.trainer)
            ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
            if ckpt_path is None:
                refuse_earlier_run(self.trainer)
                # nothing to resume: Lightning's notes on the "last" checkpoint it then looks for do not apply
                warnings.filterwarnings("ignore", message=r".*\.fit\(ckpt_path=None\)` was called without a model")
                warnings.filterwarnings("ignore", message=r'.*ckpt_path="last"\) is set, but there is no last')
                return
            resumed = resumed_checkpoint(self.trainer, str(ckpt_path))
            if resumed is not None:
                if str(ckpt_path) == "last":  # a file path was checked before Lightning read it
                    refuse_other_checkpoint(resumed, task_of(type(self.model), self.model.hparams.get("task")))
                refuse_changed_settings(self.requested_settings, resumed)
                refuse_earlier_run(self.trainer, resumed)

    return ClusterFormerCLI


VERBOSE = "--verbose"


def run_lightning(argv: list[str]) -> int:
    """``fit``/``validate``/``test``/``predict``: Lightning's CLI over the task and data classes named in the
    config (``model.class_path``, ``data.class_path``). ``fit`` resumes only when asked (``--ckpt_path``).

    Bad input — a config key or value the parser refuses, a setting or dataset that a task or data module
    refuses (:class:`~clusterformer.errors.InputError`), a run that would continue another — is one line on
    stderr, ``clusterformer <command>: error: <key or path>: <problem>``, and exit status 2; with ``--verbose``
    (taken out of ``argv`` here) the traceback comes first. Any other exception is raised with its traceback."""
    import lightning as L

    from .config_errors import bad_input_message

    verbose = VERBOSE in argv[1:]
    command, args = argv[0], [arg for arg in argv[1:] if arg != VERBOSE]
    # LightningCLI warns when given args while sys.argv holds arguments: ours, minus --verbose
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    no_exit = {"exit_on_error": False}  # the parser raises its errors instead of printing its usage and exiting
    cli_class = _clusterformer_cli()
    cli = cli_class.__new__(cli_class)  # made before it runs: its parser and trainer are at hand when it fails
    started = time.time()
    try:
        cli.__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=[command, *args],
            save_config_kwargs={"overwrite": True},
            parser_kwargs={**no_exit, **{name: dict(no_exit) for name in LIGHTNING_COMMANDS}},
        )
    except Exception as error:
        parser = getattr(cli, "_subcommand_parsers", {}).get(command)
        error = _subcommand_error(error, parser, args)
        message = bad_input_message(error, parser, args)
        if message is None:  # a checkpoint or weight file that cannot be used (also raised through jsonargparse)
            refusal = _refusal(error)
            message = None if refusal is None else str(refusal)
        if message is None:  # a fault, not bad input
            raise
        if verbose:
            traceback.print_exception(error)
        saved = _interrupted_checkpoint(getattr(cli, "trainer", None), started) if command == "fit" else None
        if saved is not None:  # training stopped on bad data: the work so far is kept
            message += f"; the state at the interruption is in {saved}: continue with --ckpt_path last once fixed"
        print(f"clusterformer {command}: error: {message}", file=sys.stderr)
        return 2
    return 0


def _refusal(error: BaseException) -> Exception | None:
    """The :class:`RunExistsError` or :class:`~clusterformer.weights.CheckpointError` that ``error`` is or was
    raised from (jsonargparse raises its own error from what a model's constructor raised, e.g. weights that do
    not fit the encoder)."""
    from .weights import CheckpointError

    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, RunExistsError | CheckpointError):
            return error
        seen.add(id(error))
        error = error.__cause__
    return None


def _subcommand_error(error: Exception, parser, args: list[str]) -> Exception:
    """The subcommand parser's own error for the main parser's "unrecognized arguments: fit ...", which is all that
    jsonargparse reports when the subcommand's arguments fail to parse (a misspelled trainer key, in a config
    file or on the command line)."""
    from argparse import ArgumentError

    if not (isinstance(error, ArgumentError) and parser is not None and "unrecognized arguments:" in str(error)):
        return error
    try:
        parser.parse_args(args)
    except ArgumentError as own:
        return own
    return error


def _interrupted_checkpoint(trainer, since: float) -> Path | None:
    """The ``on_exception.ckpt`` that an ``OnExceptionCheckpoint`` of ``trainer`` wrote after ``since``."""
    if trainer is None:
        return None
    found = [folder / "on_exception.ckpt" for folder in checkpoint_folders(trainer)]
    found = [path for path in found if path.is_file() and path.stat().st_mtime >= since]
    return found[0] if found else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `predict --task T --ckpt CKPT IMAGES`: predict.py; `predict --config FILE ...`: LightningCLI
    if argv and argv[0] in LIGHTNING_COMMANDS and (argv[0] != "predict" or is_lightning_predict(argv)):
        return run_lightning(argv)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
