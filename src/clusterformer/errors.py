"""Errors of bad input: a setting, a file or a folder that cannot be used.

Their messages read ``<key or path>: <problem>[; <what to do>]``. The ``clusterformer`` command prints them as one
line and exits with status 2; any other exception is a fault and keeps its traceback. Nothing here imports
anything: the data, task and command modules all raise these.
"""

from __future__ import annotations

__all__ = ["DatasetError", "DatasetNotFoundError", "InputError", "SettingError"]


class InputError(ValueError):
    """Bad input from the user; the message names the setting, file or folder and the problem."""


class SettingError(InputError):
    """A setting with a value that cannot be used: ``key`` (the constructor argument, e.g. ``lr``), the
    ``problem`` and the ``section`` of the LightningCLI config that holds the key (``"model"`` or ``"data"``;
    ``None``: not a config setting). ``str()`` gives ``key: problem``; :meth:`option` names the key as a config
    file or the command line writes it (``model.init_args.lr``)."""

    def __init__(self, key: str, problem: str, section: str | None = None):
        super().__init__(key, problem, section)  # all in args: the error pickles (DataLoader workers, DDP)
        self.key, self.problem, self.section = key, problem, section

    def __str__(self) -> str:
        return f"{self.key}: {self.problem}"

    def option(self) -> str:
        return f"{self.section}.init_args.{self.key}" if self.section else self.key


class DatasetError(InputError):
    """A dataset file or folder that cannot be used; the message names it and the problem."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset file or folder that does not exist (also a ``FileNotFoundError``)."""
