"""The ``clusterformer`` commands, one module each: ``add_parser(subparsers)`` adds the command's parser to the
``clusterformer`` parser and sets its handler, ``run(args) -> int`` (the exit status). ``cli`` builds the
top-level parser from :data:`COMMANDS` and dispatches; ``fit``/``validate``/``test`` (and ``predict --config``)
are LightningCLI's, in ``cli``.

The commands use the package's model, data, metrics, ``registry`` (a task's classes) and ``weights`` (checkpoints);
nothing below them imports a command."""

from __future__ import annotations

from . import ablate, benchmark, convert, demo, evaluate, explain, export, make_shapes, predict, serve

# in the order of ``clusterformer --help``
COMMANDS = (predict, explain, serve, export, convert, benchmark, make_shapes, demo, evaluate, ablate)

__all__ = ["COMMANDS"]
