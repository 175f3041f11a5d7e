"""One-line messages for the bad-input errors of ``clusterformer fit | validate | test | predict --config``.

LightningCLI's parser (jsonargparse) reports a misspelled key or a value of the wrong type as a nest of union
errors ("Does not validate against any of the Union subtypes ... Problem with given class_path ..."), and an
error raised by a task's or data module's constructor comes back wrapped in one. :func:`bad_input_message`
reads the chain of causes and returns ``<key or path>: <problem>[; <what to do>]``, or ``None`` for an exception
that is not bad input (a fault, which keeps its traceback).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
from argparse import ArgumentError
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import InputError, SettingError

_PARSER_KEY = re.compile(r'Parser key "([^"]+)":')
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)':")
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_GROUP_OPTION = re.compile(r"(Group|Subcommand) '([^']+)' does not accept option '([^']+)'")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (\S+)")
_NO_FILE = re.compile(r"File does not exist: '([^']+)'")
_EXPECTED = re.compile(r"Expected a <class '([^']+)'>\. Got value: (.*)", re.DOTALL)
_YAML = "Problems parsing config"


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was explicitly raised from (``raise ... from``), outermost first."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__


def one_line(text: str) -> str:
    """``text`` with its lines joined by spaces. A DataLoader worker's error comes back with the worker's traceback
    in its message: of that, the original message only (the traceback's last line, without the class name)."""
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        name, separator, message = last.partition(": ")
        text = message if separator and " " not in name else last
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def bad_input_message(error: BaseException, parser=None, argv: Sequence[str] = ()) -> str | None:
    """The one-line message of a bad-input error (an ``argparse.ArgumentError`` of the config parser, or an
    :class:`~clusterformer.errors.InputError` anywhere in the chain of causes); ``None`` for anything else.
    ``parser``: the subcommand's parser, to suggest a key for a misspelled one; ``argv``: the command's
    arguments after the subcommand, to find the config file that is not valid YAML."""
    for cause in causes(error):
        if isinstance(cause, SettingError):
            return f"{cause.option()}: {one_line(cause.problem)}"
        if isinstance(cause, InputError):
            return one_line(str(cause))
    if isinstance(error, ArgumentError):
        return describe_argument_error(error, parser, argv)
    return None


def describe_argument_error(error: ArgumentError, parser=None, argv: Sequence[str] = ()) -> str:
    """``<key>: <problem>`` for an error of the config parser: the key as a config file writes it
    (``model.init_args.lrr``, ``model.init_args.decoder.num_querys``, ``trainer.max_epochz``)."""
    chain, previous = [], None
    for cause in causes(error):  # jsonargparse repeats a message at several levels
        if str(cause) != previous:
            chain.append(cause)
        previous = str(cause)
    keys: list[str] = []
    last_class = ""
    for cause in chain:
        first = str(cause).strip().split("\n", 1)[0]
        if match := _PARSER_KEY.match(first):
            keys.append(match[1])
        elif match := _CLASS_PATH.match(first):
            options = _options_of(match[1])
            if options is None:  # the class itself cannot be imported
                return f"{'.'.join(keys) or 'class_path'}: cannot import {match[1]!r} ({one_line(str(chain[-1]))})"
            if not _is_dataclass_path(match[1]):  # a dataclass's fields are written without init_args
                keys.append("init_args")
            last_class = match[1]
    key = ".".join(keys)
    leaf = str(chain[-1]).strip()
    if match := _NOT_ACCEPTED.search(leaf):
        options = _options_of(last_class) or []
        owner = f" of {last_class}" if last_class else ""
        return f"{'.'.join([*keys, match[1]])}: not an option{owner}{_suggestion(match[1], options)}"
    if match := _GROUP_OPTION.search(leaf):
        option = f"{match[2]}.{match[3]}" if match[1] == "Group" else match[3]
        return f"{option}: not an option{_suggestion(option, _parser_keys(parser))}"
    if match := _UNRECOGNIZED.search(leaf):
        option = match[1].lstrip("-").split("=", 1)[0]
        return f"{option}: not an option{_suggestion(option, _parser_keys(parser))}"
    if match := _NO_FILE.search(leaf):
        return f"{match[1]}: {'config ' if key == 'config' else ''}file not found" + (f" ({key})" if key else "")
    if any(str(cause).startswith(_YAML) for cause in chain):
        return _yaml_problem(leaf, argv)
    if match := _EXPECTED.search(leaf):
        return f"{key}: expected a {match[1]}, got {one_line(match[2])!r}"
    return f"{key}: {one_line(leaf)}" if key else one_line(leaf)


def _options_of(class_path: str) -> list[str] | None:
    """The constructor arguments (a dataclass's fields) of ``class_path``; ``None`` if it cannot be imported."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    if dataclasses.is_dataclass(cls):
        return [field.name for field in dataclasses.fields(cls)]
    try:
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _is_dataclass_path(class_path: str) -> bool:
    module, _, name = class_path.rpartition(".")
    try:
        return dataclasses.is_dataclass(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError, ValueError):
        return False


def _parser_keys(parser) -> list[str]:
    """The keys a config may set, from the parser's actions (``trainer.max_epochs``, ``ckpt_path``, ...)."""
    actions = getattr(parser, "_actions", None) or []
    return [action.dest for action in actions if isinstance(getattr(action, "dest", None), str)]


def _suggestion(name: str, options: Sequence[str]) -> str:
    """``"; did you mean X?"`` for a close option; otherwise the options, when there are few of them."""
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]}?"
    if 0 < len(options) <= 20:
        return f"; the options are {', '.join(options)}"
    return ""


def _yaml_problem(message: str, argv: Sequence[str]) -> str:
    """Name the config file (of ``--config FILE`` / ``--config=FILE``) that is not valid YAML."""
    import yaml

    problem = one_line(message)
    paths = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("-c", "--config")]
    paths += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    for path in paths:
        try:
            yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            return f"{path}: not valid YAML ({getattr(error, 'problem', None) or one_line(str(error))}{where})"
        except OSError:
            continue
    return f"config: not valid YAML ({problem})"
