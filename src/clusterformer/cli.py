"""The ``clusterformer`` command: the top-level parser, built from the command modules
(:data:`clusterformer.commands.COMMANDS`, each with ``add_parser`` and ``run``), and the dispatch; ``fit``,
``validate``, ``test`` and ``predict --config`` go to LightningCLI (:func:`run_lightning`)."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path

from . import __version__
from .commands import COMMANDS
from .commands.predict import is_lightning_predict
from .errors import InputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clusterformer", description="ClusterFormer: clustering as a universal visual learner."
    )
    parser.add_argument("--version", action="version", version=f"clusterformer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in LIGHTNING_COMMANDS.items():  # handled by LightningCLI; listed here for --help
        if name != "predict":  # commands/predict.py's parser describes both forms of predict
            sub.add_parser(name, help=text, add_help=False)
    for command in COMMANDS:
        command.add_parser(sub)
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


# task settings that change how the network runs, not what it is: a run may resume with other values
RUNTIME_SETTINGS = ("compile",)


def refuse_changed_settings(requested: dict, path: Path) -> None:
    """A :class:`RunExistsError` when the task settings of the command (``requested``: the config's and the
    command line's ``model.init_args``; not :data:`RUNTIME_SETTINGS`, ``compile``) differ from those the checkpoint
    at ``path`` was trained with. Lightning
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
        if not str(key).startswith("_")
        and key not in RUNTIME_SETTINGS
        and json_safe(stored[key]) != json_safe(requested[key])
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

        def _parse_ckpt_path(self) -> None:
            # LightningCLI reads a checkpoint's hyperparameters as the task's init_args only when they name the
            # task's class (``_class_path``, which tasks write since they save it themselves); a checkpoint
            # written before, by a task built in Python (the demo), gets it from its task here
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if ckpt_path and Path(ckpt_path).is_file():
                from .weights import CheckpointError, checkpoint_task, load_checkpoint, task_class

                try:
                    checkpoint = load_checkpoint(Path(ckpt_path))
                    hparams = dict(checkpoint["hyper_parameters"])
                    cls = None if "_class_path" in hparams else task_class(checkpoint_task(checkpoint, ckpt_path))
                except (CheckpointError, KeyError, TypeError):
                    cls = None  # not a task checkpoint: Lightning's own reading and errors
                if cls is not None:
                    hparams.pop("_instantiator", None)
                    model = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "dict_kwargs": hparams}
                    self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)
                    return
            super()._parse_ckpt_path()

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand]
            # a checkpoint file's settings replaced the command's (LightningCLI); the runtime ones are the command's
            init_args = getattr(config.get("model"), "init_args", None)
            for key in RUNTIME_SETTINGS:
                if init_args is not None and key in self.requested_settings:
                    setattr(init_args, key, self.requested_settings[key])
            if config.get("run_dir"):
                from .commands.ablate import redirect_outputs

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

        def _instantiate_trainer(self, config: dict, callbacks: list):
            # into a log (not a terminal), one line per epoch instead of Lightning's progress bar (progress.py);
            # LightningCLI's (private) step where the config's trainer settings and callbacks are all at hand
            from .progress import progress_callbacks

            configured = config.get("callbacks") or []
            configured = configured if isinstance(configured, list) else [configured]
            extra = progress_callbacks(config.get("enable_progress_bar"), [*configured, *callbacks])
            return super()._instantiate_trainer(config, [*callbacks, *extra])

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
    from .progress import quiet_lightning

    verbose = VERBOSE in argv[1:]
    command, args = argv[0], [arg for arg in argv[1:] if arg != VERBOSE]
    # LightningCLI warns when given args while sys.argv holds arguments: ours, minus --verbose
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    no_exit = {"exit_on_error": False}  # the parser raises its errors instead of printing its usage and exiting
    cli_class = _clusterformer_cli()
    cli = cli_class.__new__(cli_class)  # made before it runs: its parser and trainer are at hand when it fails
    started = time.time()
    try:
        with quiet_lightning():  # the run's output: its progress and metrics, not Lightning's notes (progress.py)
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
    # `predict --task T --ckpt CKPT IMAGES`: commands/predict.py; `predict --config FILE ...`: LightningCLI
    if argv and argv[0] in LIGHTNING_COMMANDS and (argv[0] != "predict" or is_lightning_predict(argv)):
        return run_lightning(argv)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
