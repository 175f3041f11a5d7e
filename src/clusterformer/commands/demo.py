"""``clusterformer demo``: generate the shapes dataset, train ClusterFormer-Nano on it task after task,
evaluate every model before and after training and write a short report (metrics, training curves,
pictures of predictions).

1. classification of the shape crops (top-1);
2. object detection of the scenes (box head on the clustering decoder, one query per encoder cluster
   center; box AP, pycocotools), its encoder initialised from step 1's classifier, as the paper
   initialises the dense models from the ImageNet encoder;
3. instance segmentation (mask head; mask AP);
4. semantic segmentation (one query per class; mIoU);
5. panoptic segmentation (PQ, PQ_th, PQ_st), all from step 1's encoder.

The run has six stages (the data, then these five). ``OUT/demo.json`` records the options and, as each stage
ends, what it left (its checkpoint's step, its pictures, its metrics): a run stopped by SIGTERM or SIGINT
raises :class:`DemoInterrupted` (``clusterformer demo`` exits with 128 + the signal's number and says which
stage was stopped), and ``--resume`` loads the stages recorded as finished instead of training them again and
runs the rest. The dense stages always take the encoder from the classification stage's checkpoint, so that a
resumed run reports what an uninterrupted one does.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..recipes import DEMO_MODEL_OVERRIDES, build_stage, classifier_encoder
from ..recipes import load_encoder as _load_encoder
from ..registry import TASKS

PRESETS = {
    # images per split, scene size, epochs per task
    "full": dict(num_train=1000, num_val=200, size=96, epochs=12, detection_epochs=5, set_epochs=5, semantic_epochs=3,
                 panoptic_epochs=4),
    "quick": dict(num_train=400, num_val=80, size=96, epochs=12, detection_epochs=3, set_epochs=4, semantic_epochs=3,
                  panoptic_epochs=3),
}  # fmt: skip
# the tasks the demo trains, in order (registry.TASKS names them)
DEMO_TASKS = ("classification", "detection", "instance", "semantic", "panoptic")
# the stages in order: the folder each writes under OUT (its key in demo.json) and what it makes
STAGE_NAMES = ("data", *DEMO_TASKS)
STAGES = len(STAGE_NAMES)
STAGE_TITLES = {"data": "the shapes dataset", **{task: TASKS[task].title for task in DEMO_TASKS}}
# the validation metrics printed (untrained -> trained) for each training stage (of the task's registry metrics)
SHOWN = {
    "classification": ["val/top1"],
    "detection": ["val/bbox_AP50"],
    "instance": ["val/segm_AP50"],
    "semantic": ["val/mIoU"],
    "panoptic": ["val/PQ", "val/PQ_th", "val/PQ_st"],
}
# what the demo is meant to reach on a quiet 2-core CPU (README, docs/training.md): the full preset's figures and
# wall time; the quick preset's wall time, and every task learning (each shown metric above its untrained value)
TARGETS = {
    "full": {
        ("classification", "val/top1"): 0.95,
        ("detection", "val/bbox_AP50"): 0.5,
        ("instance", "val/segm_AP50"): 0.5,
        ("semantic", "val/mIoU"): 0.7,
        ("panoptic", "val/PQ"): 0.5,
        ("panoptic", "val/PQ_th"): 0.3,
    },
    "quick": {},
}
TIME_TARGETS = {"full": 900.0, "quick": 300.0}  # seconds


def _trainer_kwargs(out: Path) -> dict:
    """The settings of the demo's trainers; those that train add :func:`_callbacks`' callbacks."""
    from ..checkpoint_io import AtomicCheckpointIO

    return dict(accelerator="cpu", devices=1, default_root_dir=str(out), enable_model_summary=False,
                plugins=[AtomicCheckpointIO()])  # fmt: skip


def _callbacks(checkpoints: Path) -> list:
    """A training trainer's callbacks: ``last.ckpt`` in ``checkpoints``, and into a log one line per epoch
    instead of the progress bar, under the stage's line (:func:`clusterformer.progress.progress_callbacks`)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ..progress import progress_callbacks

    return [ModelCheckpoint(dirpath=str(checkpoints), save_last=True), *progress_callbacks(prefix="      ")]


# what the demo writes into its folder: removed by --overwrite
DEMO_ENTRIES = (*STAGE_NAMES, "report", "demo.json")


def _stages(count: int) -> str:
    return "stage 1 is" if count == 1 else f"stages 1-{count} are"


class DemoInterrupted(BaseException):
    """A demo run stopped by a signal, raised out of :func:`run_demo`. A ``BaseException``, as
    ``KeyboardInterrupt``: nothing on its way takes it for an error of the stage. ``stage`` is the stage that was
    stopped (``STAGES + 1``: the report); the stages before it are finished and recorded in ``demo.json``."""

    def __init__(self, out: Path, stage: int, signum: int):
        self.out, self.stage, self.signum = Path(out), stage, int(signum)
        super().__init__(self.message())

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process that the signal ended (143 for SIGTERM)."""
        return 128 + self.signum

    def message(self) -> str:
        name = signal.Signals(self.signum).name
        if self.stage > STAGES:
            return (f"{self.out}: interrupted by {name} while writing the report; all {STAGES} stages are finished "
                    "and kept; rerun with --resume to write the report")  # fmt: skip
        title = STAGE_TITLES[STAGE_NAMES[self.stage - 1]]
        where = f"{self.out}: interrupted by {name} during stage {self.stage}/{STAGES} ({title})"
        if self.stage == 1:
            return f"{where}; no stage had finished; rerun to start again"
        return (f"{where}; {_stages(self.stage - 1)} finished and kept; rerun with --resume to continue from stage "
                f"{self.stage}")  # fmt: skip


@contextmanager
def _signals_raise(interrupted: Callable[[int], BaseException]) -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT raise ``interrupted(signum)`` where the main thread is.

    Without this, Lightning's handler (installed for every ``fit`` and ``validate``, and calling the handler it
    found, this one, after its own) only sets a flag, and its loops then raise a ``SystemExit`` without a status:
    the process exits 0 as if the demo had finished. A forked data-loading worker leaves the signal to the main
    process (SIGINT: ``KeyboardInterrupt``, which PyTorch's workers take as the end). Outside the main thread
    nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:
            if signum == signal.SIGINT:
                signal.default_int_handler(signum, frame)
            return
        raise interrupted(signum)

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, earlier in previous.items():
            signal.signal(signum, earlier if earlier is not None else signal.SIG_DFL)


def _global_step(checkpoint: Path) -> int:
    import torch

    return int(torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def _data_finished(folder: Path, options: dict) -> bool:
    """Whether ``folder`` holds the complete shapes dataset of the demo's ``options`` (its manifest says so, with
    the same options, and every file it lists is there)."""
    from ..data.shapes import MANIFEST

    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    wanted = {key: options[key] for key in ("seed", "num_train", "num_val", "size")}
    if not isinstance(manifest, dict) or not manifest.get("complete") or manifest.get("options") != wanted:
        return False
    return all((folder / name).is_file() for name in manifest.get("files") or ())


def _stage_finished(out: Path, name: str, entry, options: dict) -> bool:
    """Whether the stage ``name`` that ``demo.json`` records as ``entry`` left everything it records: the data, or
    the checkpoint at the recorded step, the pictures and the metrics."""
    if not isinstance(entry, dict):
        return False
    if name == "data":
        return _data_finished(out / "data", options)
    try:
        pictures_there = all((out / picture).is_file() for picture in entry["pictures"])
        if not pictures_there or not isinstance(entry["metrics"], dict):
            return False
        return _global_step(out / entry["checkpoint"]) == entry["global_step"]
    except Exception:  # a missing key or a checkpoint that does not load: not finished
        return False


def finished_stages(out: Path, record: dict, options: dict) -> dict[str, dict]:
    """The entries of ``record`` (``demo.json``) of the stages that are finished, from the first stage on up to the
    first one that is not (a stage after an unfinished one counts as unfinished: it may depend on it)."""
    stages = record.get("stages") if isinstance(record.get("stages"), dict) else {}
    finished = {}
    for name in STAGE_NAMES:
        if not _stage_finished(out, name, stages.get(name), options):
            break
        finished[name] = stages[name]
    return finished


def prepare_demo_folder(out: Path, options: dict, overwrite: bool = False, resume: bool = False) -> dict[str, dict]:
    """Make ``out`` ready for a demo run with ``options`` (the preset and the seed), before anything is written;
    returns the ``demo.json`` entries of the stages that the run loads instead of running (only with ``resume``).

    An empty folder, or one holding a finished demo run with the same options (``demo.json``), is used as it is:
    every file is written again under the same name (the data with the same bytes). An unfinished run with the
    same options (stopped with at least one stage finished) is continued with ``resume``, and refused without it.
    A demo run with other options, or a folder holding other files, is an
    :class:`~clusterformer.outputs.OutputExistsError` unless ``overwrite``, which deletes the earlier run's
    entries (:data:`DEMO_ENTRIES`) and keeps other files."""
    from ..outputs import OutputExistsError, check_output_folder, remove_outputs, write_json

    if overwrite and resume:
        raise ValueError("--resume and --overwrite exclude each other: continue the earlier run, or replace it")
    record = out / "demo.json"
    try:
        found = json.loads(record.read_text()) if record.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        found = None
    kept = {}
    if overwrite:
        check_output_folder(out, overwrite=True)  # a file is still refused
        remove_outputs(out, DEMO_ENTRIES)
    elif isinstance(found, dict) and "options" in found:
        if found["options"] != options:
            changed = ", ".join(
                f"{key} {found['options'].get(key)} -> {value}"
                for key, value in options.items()
                if found["options"].get(key) != value
            )
            raise OutputExistsError(
                f"{out}: holds a demo run with other options ({changed}); pass --overwrite to replace it, or choose "
                "another folder"
            )
        kept = finished_stages(out, found, options)
        if kept and not resume and not found.get("finished"):
            then = f"from stage {len(kept) + 1}" if len(kept) < STAGES else "by writing the report"
            raise OutputExistsError(
                f"{out}: holds an unfinished demo run with the same options ({_stages(len(kept))} finished); pass "
                f"--resume to continue it {then}, or --overwrite to start again"
            )
        if not resume:
            kept = {}
    else:
        check_output_folder(out, overwrite=False)
    write_json(out / "demo.json", {"options": options, "finished": False, "stages": kept})
    return kept


def run_demo(
    out: str | Path,
    quick: bool = False,
    seed: int = 0,
    num_workers: int = 2,
    overwrite: bool = False,
    resume: bool = False,
    **overrides,
) -> dict:
    """Run the demo into ``out``; ``overrides`` replace entries of the preset (num_train, num_val, size,
    epochs, detection_epochs, set_epochs, semantic_epochs, panoptic_epochs). A folder holding something else
    than a demo run with the same options is refused unless ``overwrite`` (:func:`prepare_demo_folder`);
    ``resume`` loads the stages that an earlier run with the same options finished. SIGTERM or SIGINT stop the
    run with :class:`DemoInterrupted`. Returns the metrics written to ``out/report/metrics.json``."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from ..data import make_shapes
    from ..outputs import write_json
    from ..progress import on_terminal, quiet_lightning

    preset_name = "quick" if quick else "full"
    preset = {**PRESETS[preset_name], **overrides}
    out = Path(out)
    options = {**preset, "seed": seed}
    kept = prepare_demo_folder(out, options, overwrite, resume)
    record = {"options": options, "finished": False, "stages": dict(kept)}
    if resume:
        if kept:
            print(f"resuming the demo run in {out}: {_stages(len(kept))} finished and loaded", flush=True)
        else:
            print(f"{out}: no finished stage to resume; starting from stage 1", flush=True)
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    encoder = None

    def dense_encoder() -> dict:
        nonlocal encoder
        if encoder is None:
            encoder = classifier_encoder(out / "classification" / "checkpoints" / "last.ckpt")
        return encoder

    texts = {
        "data": f"generating the shapes dataset in {out / 'data'}",
        "classification": f"classification: clusterformer_nano, {preset['epochs']} epochs on the shape crops",
        "detection": f"object detection: {preset['detection_epochs']} epochs on the scenes",
        "instance": f"instance segmentation: {preset['set_epochs']} epochs",
        "semantic": f"semantic segmentation: {preset['semantic_epochs']} epochs",
        "panoptic": f"panoptic segmentation: {preset['panoptic_epochs']} epochs",
    }
    runners = {
        "classification": lambda: run_classification(out, preset, seed, num_workers)[0],
        **{
            kind: lambda kind=kind: run_dense(kind, out, preset, seed, num_workers, dense_encoder())
            for kind in DENSE_STAGES
        },
    }
    current = 1
    start = time.perf_counter()
    with _signals_raise(lambda signum: DemoInterrupted(out, current, signum)), quiet_lightning():
        try:
            for current, name in enumerate(STAGE_NAMES, start=1):
                if name in kept:
                    print(f"[{current}/{STAGES}] {STAGE_TITLES[name]}: finished in an earlier run, loaded", flush=True)
                    if name in SHOWN:
                        _print_change(kept[name]["metrics"], SHOWN[name])
                    continue
                print(f"[{current}/{STAGES}] {texts[name]}", flush=True)
                began = time.perf_counter()
                if name == "data":
                    make_shapes(out / "data", seed, preset["num_train"], preset["num_val"], preset["size"],
                                progress=on_terminal(sys.stderr))  # fmt: skip
                    entry = {}
                else:
                    shutil.rmtree(out / name, ignore_errors=True)  # what an unfinished run of the stage left
                    result = runners[name]()
                    _print_change(result, SHOWN[name])
                    checkpoint = out / name / "checkpoints" / "last.ckpt"
                    entry = {
                        "checkpoint": checkpoint.relative_to(out).as_posix(),
                        "global_step": _global_step(checkpoint),
                        "pictures": [f"report/{name}_curve.png", f"report/{name}_predictions.png"],
                        "metrics": result,
                    }
                entry["seconds"] = round(time.perf_counter() - began, 1)
                record["stages"][name] = entry
                write_json(out / "demo.json", record)  # the stage is finished
            current = STAGES + 1
            metrics = demo_metrics(preset, record["stages"], preset_name, bool(overrides))
            write_json(report / "metrics.json", metrics, indent=2)
            write_report(report / "report.md", metrics)
            record["finished"] = True
            write_json(out / "demo.json", record)
        except SIGTERMException:  # Lightning's exit (status 0) on a SIGTERM that the handler above did not see
            raise DemoInterrupted(out, current, signal.SIGTERM) from None
    took = time.perf_counter() - start
    shown = f" ({took:.0f} s in this run)" if kept else ""
    print(f"done in {metrics['seconds']:.0f} s{shown}; report in {report}")
    return metrics


def demo_metrics(preset: dict, stages: dict[str, dict], preset_name: str = "full", changed: bool = False) -> dict:
    """What ``report/metrics.json`` holds, from the stages' entries in ``demo.json``: the same for a run that was
    resumed as for one that was not, but for the seconds (each stage's own, summed). ``preset_name`` is the preset
    the run started from, ``changed`` whether entries of it were overridden; ``targets`` compares the run with the
    preset's :data:`TARGETS` and :data:`TIME_TARGETS` (:func:`target_rows`)."""
    seconds = {name: stages[name]["seconds"] for name in STAGE_NAMES}
    metrics = {
        "model": "clusterformer_nano",
        "preset": preset_name + (" (changed)" if changed else ""),
        "scenes": {"train": preset["num_train"], "val": preset["num_val"], "size": preset["size"]},
        **{name: stages[name]["metrics"] for name in STAGE_NAMES if name != "data"},
        "seconds": round(sum(seconds.values()), 1),
        "stage_seconds": seconds,
    }
    metrics["targets"] = target_rows(metrics, preset_name)
    return metrics


def target_rows(metrics: dict, preset_name: str) -> list[dict]:
    """The run against its preset's targets: one row per target, ``{"task", "metric", "target", "value", "met"}``;
    the wall time (``task`` "all", ``metric`` "seconds", met when at most the target), each of the preset's
    metric targets (met when at least the target) and, for the quick preset, every shown metric's learning
    (``target`` "above untrained": met when the trained value is above the untrained one)."""
    rows = [{"task": "all", "metric": "seconds", "target": TIME_TARGETS[preset_name], "value": metrics["seconds"],
             "met": metrics["seconds"] <= TIME_TARGETS[preset_name]}]  # fmt: skip
    for (task, key), target in TARGETS[preset_name].items():
        value = metrics[task]["trained"][key]
        rows.append({"task": task, "metric": key, "target": target, "value": value, "met": value >= target})
    if preset_name == "quick":
        for task, keys in SHOWN.items():
            for key in keys:
                before, after = metrics[task]["untrained"][key], metrics[task]["trained"][key]
                rows.append({"task": task, "metric": key, "target": "above untrained", "value": after,
                             "met": after > before})  # fmt: skip
    return rows


def _print_change(result: dict, keys: list[str]) -> None:
    for key in keys:
        print(f"      {key}: {result['untrained'][key]:.3f} -> {result['trained'][key]:.3f}", flush=True)


# the demo's classifier recipe on top of the nano shapes config (docs/training.md, "The demo's classifier"):
# * the token-average head (docs/architecture.md, "Classification head"): on 64-pixel crops the last stage has 2 x 2
#   tokens and the paper's center head, which leaves the last block's dispatching and MLP unread, learns slower;
# * 4 x 4 centers per block instead of 10 x 10: the crops' stages have 16 x 16 to 2 x 2 tokens, and 100 centers cost
#   2.5x the time of 16 per step; the dense models cluster with the paper's 10 x 10 (the weights are the same);
# * the whole crop (no random resized crop: a crop of 60% of the area cuts off the corners that tell the shapes
#   apart), batch 32 at lr 3e-4.
CLASSIFIER_MODEL = {"model_kwargs": {"head": "tokens", "center_grid": [4, 4]}, "lr": 3.0e-4}
CLASSIFIER_DATA = {"crop_scale": [1.0, 1.0], "batch_size": 32}


def run_classification(out: Path, preset: dict, seed: int, num_workers: int):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    L.seed_everything(seed, verbose=False)
    task, data = build_stage(
        "classification",
        {"root": str(out / "data" / "imagefolder"), "num_workers": num_workers, **CLASSIFIER_DATA},
        CLASSIFIER_MODEL,
    )
    common = _trainer_kwargs(out / "classification")
    untrained = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, **common)
    before = untrained.validate(task, data, verbose=False)[0]
    logger = CSVLogger(str(out / "classification"), name="logs", version="")
    trainer = L.Trainer(
        max_epochs=preset["epochs"], logger=logger, log_every_n_steps=5,
        callbacks=_callbacks(out / "classification" / "checkpoints"), **common,
    )  # fmt: skip
    trainer.fit(task, data)
    after = trainer.validate(task, data, verbose=False)[0]
    report = out / "report"
    plot_curves(Path(logger.log_dir) / "metrics.csv", report / "classification_curve.png", ["val/top1"])
    plot_classification(task, data, report / "classification_predictions.png")
    metrics = {"classes": data.classes, "epochs": preset["epochs"], "untrained": before, "trained": after}
    return metrics, task


def fit_and_evaluate(name: str, task, data, out: Path, epochs: int, val_keys: list[str]) -> dict:
    """Validate ``task`` untrained, train it for ``epochs`` (CSV logs and ``last.ckpt`` under ``out/name``),
    validate it again and plot its curve; returns ``{"epochs", "untrained", "trained"}``."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    common = _trainer_kwargs(out / name)
    untrained = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, **common)
    before = untrained.validate(task, data, verbose=False)[0]
    logger = CSVLogger(str(out / name), name="logs", version="")
    trainer = L.Trainer(
        max_epochs=epochs, logger=logger, log_every_n_steps=5, gradient_clip_val=1.0,
        check_val_every_n_epoch=max(1, epochs // 2),
        callbacks=_callbacks(out / name / "checkpoints"), **common,
    )  # fmt: skip
    trainer.fit(task, data)
    if epochs % trainer.check_val_every_n_epoch == 0:  # the last epoch was validated with the final weights
        after = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    else:
        after = trainer.validate(task, data, verbose=False)[0]
    plot_curves(Path(logger.log_dir) / "metrics.csv", out / "report" / f"{name}_curve.png", val_keys)
    return {"epochs": epochs, "untrained": before, "trained": after}


# per dense stage: the preset's epochs, the validation metrics of its curve, the demo's overrides of the config's
# task options, and its picture of predictions
DENSE_STAGES = {
    "detection": ("detection_epochs", ["val/bbox_AP50"], DEMO_MODEL_OVERRIDES["detection"], "instances"),
    "instance": ("set_epochs", ["val/segm_AP50", "val/bbox_AP50"], DEMO_MODEL_OVERRIDES["instance"], "instances"),
    "semantic": ("semantic_epochs", ["val/mIoU"], DEMO_MODEL_OVERRIDES["semantic"], "maps"),
    # the panoptic config's encoder trains at a tenth of the lr, as Mask2Former and the COCO configs: at the full lr
    # the encoder's stages 3-4 drift back to a uniform assignment (docs/architecture.md, "Does it cluster?")
    "panoptic": ("panoptic_epochs", ["val/PQ", "val/mIoU_pan"], DEMO_MODEL_OVERRIDES["panoptic"], "maps"),
}


def run_dense(kind: str, out: Path, preset: dict, seed: int, num_workers: int, encoder_state: dict | None) -> dict:
    """Train and evaluate the demo's ``kind`` model (detection, instance, semantic, panoptic), started from the
    classifier's encoder ``encoder_state``."""
    import lightning as L

    epochs_key, keys, model_overrides, picture = DENSE_STAGES[kind]
    L.seed_everything(seed, verbose=False)
    size = preset["size"]
    data_overrides = {"root": str(out / "data"), "crop": size, "test_shorter_side": size, "num_workers": num_workers}
    task, data = build_stage(kind, data_overrides, model_overrides)
    _load_encoder(task, encoder_state)
    result = fit_and_evaluate(kind, task, data, out, preset[epochs_key], keys)
    path = out / "report" / f"{kind}_predictions.png"
    if picture == "instances":
        plot_instances(task, data, path)
    else:
        plot_maps(task, data, path, panoptic=kind == "panoptic")
    return result


REPORT_ROWS = [
    ("classification", "top-1", "val/top1"),
    ("detection", "box AP", "val/bbox_AP"),
    ("detection", "box AP50", "val/bbox_AP50"),
    ("instance", "mask AP", "val/segm_AP"),
    ("instance", "mask AP50", "val/segm_AP50"),
    ("instance", "box AP50 (boxes around the masks)", "val/bbox_AP50"),
    ("semantic", "mIoU", "val/mIoU"),
    ("panoptic", "PQ", "val/PQ"),
    ("panoptic", "PQ things", "val/PQ_th"),
    ("panoptic", "PQ stuff", "val/PQ_st"),
    ("panoptic", "mIoU_pan", "val/mIoU_pan"),
    ("panoptic", "mAP_pan things", "val/mAP_pan_th"),
]


def write_report(path: Path, metrics: dict) -> None:
    scenes = metrics["scenes"]
    epochs = ", ".join(f"{name} {metrics[name]['epochs']}" for name in dict.fromkeys(row[0] for row in REPORT_ROWS))
    lines = [
        "# ClusterFormer demo",
        "",
        f"clusterformer_nano on {scenes['train']} generated {scenes['size']}-pixel scenes ({scenes['val']} for "
        f"validation), CPU, {metrics['seconds']:.0f} s in all. Classification of the shape crops "
        f"({', '.join(metrics['classification']['classes'])}) first; the dense models (clustering decoder) then "
        f"start from the classifier's encoder. Epochs: {epochs}.",
        "",
        "| task | metric (validation) | untrained | trained |",
        "| --- | --- | --- | --- |",
        *(
            f"| {task} | {name} | {metrics[task]['untrained'][key]:.3f} | {metrics[task]['trained'][key]:.3f} |"
            for task, name, key in REPORT_ROWS
        ),
        "",
    ]
    lines += target_lines(metrics)
    for task in DEMO_TASKS:
        for picture in (f"{task}_curve", f"{task}_predictions"):
            lines += [f"![{picture.replace('_', ' ')}]({picture}.png)", ""]
    path.write_text("\n".join(lines))


def target_lines(metrics: dict) -> list[str]:
    """The report's comparison with the preset's targets: a table, then what was missed, said plainly."""
    rows = metrics.get("targets") or []
    if not rows:
        return []

    def shown(row: dict, value) -> str:
        return f"{value:.0f} s" if row["metric"] == "seconds" else f"{value:.3f}"

    lines = [
        f"## Targets of the {metrics['preset']} preset (a quiet 2-core CPU)",
        "",
        "| task | metric | target | this run | met |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        target = row["target"]
        bound = "<= " if row["metric"] == "seconds" else ">= "
        wanted = target if isinstance(target, str) else bound + shown(row, target)
        lines.append(f"| {row['task']} | {row['metric']} | {wanted} | {shown(row, row['value'])} | "
                     f"{'yes' if row['met'] else '**no**'} |")  # fmt: skip
    missed = [f"{row['task']} {row['metric']}" for row in rows if not row["met"]]
    lines.append("")
    if missed:
        lines += [
            f'Missed: {", ".join(missed)}. What was tried and what the curves show: docs/training.md ("The demo" and '
            '"Towards the demo\'s targets"); a preset changed by options, or a busy CPU, is not the run the targets '
            "are for.",
            "",
        ]
    else:
        lines += ["Every target met.", ""]
    return lines


def plot_curves(metrics_csv: Path, path: Path, val_keys: list[str]) -> None:
    """Training loss (left axis) and validation metrics (right axis) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [], []
    val = {key: ([], []) for key in val_keys}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                steps.append(int(row["step"]))
                losses.append(float(row["train/loss"]))
            for key in val_keys:
                if row.get(key):
                    val[key][0].append(int(row["step"]))
                    val[key][1].append(float(row[key]))
    fig, left = plt.subplots(figsize=(6, 3.5))
    left.plot(steps, losses, color="tab:blue", label="train loss")
    left.set_xlabel("step")
    left.set_ylabel("train loss", color="tab:blue")
    right = left.twinx()
    for key, color in zip(val_keys, ("tab:orange", "tab:green", "tab:red"), strict=False):
        right.plot(*val[key], "o-", color=color, label=key)
    right.set_ylabel("validation")
    right.set_ylim(0, 1)
    right.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _denormalise(image):
    import torch
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None], torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def plot_classification(task, data, path: Path, count: int = 16) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    dataset = data._dataset(data.hparams.val_dir, train=False)
    index = torch.linspace(0, len(dataset) - 1, count).long().tolist()
    images = torch.stack([dataset[i][0] for i in index])
    labels = [dataset[i][1] for i in index]
    task.eval()
    with torch.no_grad():
        predicted = task(images).softmax(-1)
    fig, axes = plt.subplots(2, count // 2, figsize=(count // 2 * 1.4, 3.4))
    for ax, image, label, probs in zip(axes.flat, images, labels, predicted, strict=True):
        ax.imshow(_denormalise(image))
        guess = int(probs.argmax())
        ax.set_title(
            f"{data.classes[guess]} {probs[guess]:.2f}", fontsize=7, color="green" if guess == label else "red"
        )
        ax.axis("off")
    fig.suptitle("validation crops: prediction and confidence (green = correct)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_instances(task, data, path: Path, count: int = 6, top: int = 5, min_score: float = 0.1) -> None:
    """Validation scenes: ground truth (top row) and the model's ``top`` best-scoring masks (instance model)
    and boxes with a score of at least ``min_score`` (bottom row; the scores of a model trained minutes are
    low)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from matplotlib.patches import Rectangle
    from torchvision.ops import box_convert

    from ..data import CATEGORIES
    from ..data.collate import collate_sets
    from ..pictures import draw_mask

    dataset = data._dataset(train=False)
    index = torch.linspace(0, len(dataset) - 1, count).long().tolist()
    images, targets = collate_sets([dataset[i] for i in index], drop_crowds=False)
    task.eval()
    with torch.no_grad():
        results = task.predict_batch(images, targets)
    colours = {i: np.array(c["color"]) / 255 for i, c in enumerate(CATEGORIES)}
    names = data.classes
    fig, axes = plt.subplots(2, count, figsize=(count * 1.9, 4.2))
    for column, (image, target, result) in enumerate(zip(images, targets, results, strict=True)):
        h, w = target["size"]
        picture = _denormalise(image[:, :h, :w])
        gt_masks = target["masks"][:, :h, :w] if "masks" in target else None
        gt_boxes = (
            None
            if gt_masks is not None
            else box_convert(target["boxes"] * torch.tensor([w, h, w, h]), "cxcywh", "xyxy")
        )
        for row, (masks, boxes, labels, scores) in enumerate(
            [
                (gt_masks, gt_boxes, target["labels"], None),
                (result.get("masks"), result.get("box_results", result)["boxes"], result["labels"], result["scores"]),
            ]
        ):
            ax = axes[row, column]
            overlay = picture.copy()
            keep = range(len(labels))
            if scores is not None:
                keep = [i for i in scores.argsort(descending=True)[:top].tolist() if scores[i] >= min_score]
            for i in keep if masks is not None else ():
                overlay = draw_mask(overlay, masks[i].numpy(), CATEGORIES[int(labels[i])]["color"], 0.55)
            ax.imshow(overlay)
            for i in keep:
                label = names[int(labels[i])] + ("" if scores is None else f" {scores[i]:.2f}")
                if boxes is not None:
                    x0, y0, x1, y1 = boxes[i].tolist()
                    colour = "white" if masks is not None else colours[int(labels[i])]
                    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colour, linewidth=1.0))
                    ax.text(x0, y0, label, fontsize=5, color="white", va="bottom")
            ax.set_title("ground truth" if row == 0 else f"top {top} predictions (score >= {min_score})", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _colour_map(classes, ids=None):
    """RGB picture of a class map (255 / negative = black); with ``ids``, segment boundaries drawn white."""
    from ..data import CATEGORIES
    from ..pictures import class_colours, colour_map

    return colour_map(classes, class_colours(len(CATEGORIES), CATEGORIES), ids) / 255


def plot_maps(task, data, path: Path, panoptic: bool, count: int = 6) -> None:
    """Validation scenes: image, ground truth, prediction (semantic classes, or panoptic segments coloured
    by class with white boundaries; black = void)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from ..data.collate import collate_panoptic, collate_semantic
    from ..data.semantic import IGNORE_INDEX

    dataset = data._dataset(train=False)
    index = torch.linspace(0, len(dataset) - 1, count).long().tolist()
    samples = [dataset[i] for i in index]
    collate = collate_panoptic if panoptic else collate_semantic
    images, targets = collate(samples, train=False)
    task.eval()
    with torch.no_grad():
        results = task.predict_batch(images, targets)
    fig, axes = plt.subplots(3, count, figsize=(count * 1.7, 5.4))
    for column, (image, target, result) in enumerate(zip(images, targets, results, strict=True)):
        h, w = target["size"]
        if panoptic:
            masks = target["masks"].numpy()
            gt_classes = np.full(masks.shape[1:], -1)
            gt_ids = np.zeros(masks.shape[1:], np.int64)
            for k, (mask, label) in enumerate(zip(masks, target["labels"].tolist(), strict=True)):
                gt_classes[mask], gt_ids[mask] = label, k + 1
            ids = result["ids"].numpy()
            classes = np.full(ids.shape, -1)
            for segment in result["segments_info"]:
                classes[ids == segment["id"]] = segment["label"]
            gt_picture, picture = _colour_map(gt_classes, gt_ids), _colour_map(classes, ids)
        else:
            gt = target["semantic"].numpy().copy()
            gt_picture, picture = _colour_map(np.where(gt == IGNORE_INDEX, -1, gt)), _colour_map(result.numpy())
        for row, shown in enumerate((_denormalise(image[:, :h, :w]), gt_picture, picture)):
            axes[row, column].imshow(shown)
            axes[row, column].axis("off")
        axes[0, column].set_title("image", fontsize=7)
        axes[1, column].set_title("ground truth", fontsize=7)
        axes[2, column].set_title("prediction", fontsize=7)
    kind = "panoptic segments (colour = class)" if panoptic else "semantic classes"
    fig.suptitle(f"validation scenes: {kind}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the command -----------------------------------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
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
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    parser.add_argument(
        "--quick", action="store_true", help="a smaller dataset and fewer epochs (about 4.5 minutes on 2 CPU cores)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=2, help="data-loading processes")
    earlier = parser.add_mutually_exclusive_group()
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
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
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
