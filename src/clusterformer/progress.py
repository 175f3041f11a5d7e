"""What ``clusterformer fit`` and ``clusterformer demo`` print while they train: the stage, a progress bar and the
metrics, without Lightning's notes that concern neither the run nor its results (tips about Lightning's cloud
services, the list of accelerators found, warnings about settings that the shapes recipes choose on purpose).

On a terminal Lightning's own progress bar (rich or tqdm) is kept. Into a file or a pipe (a log), where every
update of such a bar is another carriage-return line, :class:`EpochLines` replaces it: one line per epoch, with
the epoch, the step, the metrics that the task shows in the bar and the epoch's seconds (:func:`progress_callbacks`).
:func:`quiet_lightning` drops the notes, by their messages, and leaves every other log record and warning alone.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.callbacks import ProgressBar

# Lightning's informational log records that say nothing about the run (searched in the message)
NOISE_RECORDS = re.compile(
    "|".join(
        (
            r"Tip: ",  # litlogger / litmodels advertisements
            r"^GPU available: ",
            r"^TPU available: ",
            r"^HPU available: ",
            r"^LOCAL_RANK: \d+ - ",  # CUDA_VISIBLE_DEVICES of each process
            r"^You are using a CUDA device \(.*\) that has Tensor Cores",
            r"^`Trainer\.fit` stopped: `max_epochs=",  # the run ends as configured
            r"^`Trainer\(limit_\w+=",  # "`Trainer(limit_val_batches=1)` was configured so 1 batch will be used."
            r"^Loading `\w+_dataloader` to estimate number of stepping batches",
            r"Seed set to ",  # the seed is in the run's config.yaml
        )
    )
)
# the loggers that write them (Lightning points the shared rank-zero helpers at one of its two rank_zero loggers)
NOISY_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
    "lightning.fabric.utilities.seed",
)
# (message at the start of the warning, category) of the warnings dropped: Lightning's advice on settings that the
# recipes choose (data-loading workers of a small CPU, a logging interval longer than a tiny run's epoch, a CPU run
# on a machine with a GPU) and a deprecation inside Lightning itself that its users cannot act on
NOISE_WARNINGS = (
    (r"The '\w+' does not have many workers", PossibleUserWarning),
    (r"The number of training batches \(\d+\) is smaller than the logging interval", PossibleUserWarning),
    (r"GPU available but not used", PossibleUserWarning),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return NOISE_RECORDS.search(record.getMessage()) is None


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """While the block runs, Lightning's notes (:data:`NOISE_RECORDS`, :data:`NOISE_WARNINGS`) are not printed;
    on leaving it, the loggers and the warning filters are as they were."""
    noise = _DropNoise()
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        with warnings.catch_warnings():
            for message, category in NOISE_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)


def on_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (standard output) is a terminal, where a progress bar that redraws itself is readable."""
    stream = sys.stdout if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def terminal_bar(total: int, description: str, unit: str = "img", enabled: bool = True):
    """A tqdm progress bar over ``total`` items on standard error, shown only when ``enabled``, there is more than
    one item and standard error is a terminal; otherwise one that prints nothing (a log gets the command's own
    closing line instead). ``bar.write(text)`` prints a line above the bar, or just the line."""
    from tqdm import tqdm

    show = enabled and total > 1 and on_terminal(sys.stderr)
    return tqdm(total=total, unit=unit, desc=description, disable=not show, file=sys.stderr)


class EpochLines(ProgressBar):
    """A progress "bar" for logs: nothing per step, one line at the end of each training epoch (after its
    validation, when one ran), e.g. ``epoch 3/5  step 150  train/loss 1.234  val/bbox_AP50 0.123  (12.3 s)``.
    The metrics are those the task logs to the progress bar; the validation ones (``val...``) only in the
    lines of epochs that were validated, so that an earlier epoch's value is never shown as this one's.
    Validation, test and prediction on their own print nothing (Lightning prints their results). The lines go to
    ``stream`` (standard output), after ``prefix`` (the demo indents them under its stage's line)."""

    def __init__(self, stream: TextIO | None = None, prefix: str = "") -> None:
        super().__init__()
        self._stream, self._prefix = stream, prefix
        self._enabled = True
        self._started = 0.0
        self._validated = False

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._started = time.perf_counter()
        self._validated = False

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._validated = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        metrics = {key: value for key, value in self.get_metrics(trainer, pl_module).items() if key != "v_num"}
        if not self._validated:
            metrics = {key: value for key, value in metrics.items() if not key.startswith("val")}
        line = epoch_line(
            trainer.current_epoch + 1, trainer.max_epochs, trainer.global_step, metrics,
            time.perf_counter() - self._started,
        )  # fmt: skip
        print(self._prefix + line, file=self._stream or sys.stdout, flush=True)


def _number(value) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{value:.3f}" if 1e-3 <= abs(value) < 1e5 or value == 0 else f"{value:.3g}"


def epoch_line(epoch: int, epochs: int | None, step: int, metrics: dict, seconds: float) -> str:
    """``epoch 3/5  step 150  train/loss 1.234  val/bbox_AP50 0.123  (12.3 s)``: ``epoch`` counted from 1, of
    ``epochs`` (left out when training is bounded by steps or time: ``None`` or negative), the global step, the
    metrics in their order (numbers with three decimals) and the epoch's seconds."""
    parts = [f"epoch {epoch}/{epochs}" if epochs is not None and epochs > 0 else f"epoch {epoch}", f"step {step}"]
    parts += [f"{key} {_number(value)}" for key, value in metrics.items()]
    return "  ".join(parts) + f"  ({seconds:.1f} s)"


def progress_callbacks(
    enable_progress_bar: bool | None = True, callbacks=(), stream: TextIO | None = None, prefix: str = ""
) -> list:
    """The progress callback to add to a Trainer: ``[EpochLines(stream, prefix)]`` when the output is not a
    terminal, the progress bar is enabled (``None``: Lightning's default, enabled) and ``callbacks`` hold no
    progress bar of their own; ``[]`` otherwise (Lightning's bar on a terminal, or none)."""
    if enable_progress_bar is False or on_terminal(stream):
        return []
    if any(isinstance(callback, ProgressBar) for callback in callbacks or ()):
        return []
    return [EpochLines(stream, prefix)]
