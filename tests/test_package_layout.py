"""The package's folders keep their imports pointing one way (docs/architecture.md, "Package map"): the model
(``layers/``, ``heads/``) knows nothing of training, Lightning or the commands; ``data/`` and ``metrics/`` know no
task; the commands reach the tasks through ``registry`` and checkpoints through ``weights``."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "clusterformer"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SOURCE.parent).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Every module that ``path`` imports (absolute names; ``from X import y`` gives ``X`` and ``X.y``), at module
    level only or anywhere (inside functions too)."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return found


def within(names: set[str], *prefixes: str) -> set[str]:
    return {name for name in names for prefix in prefixes if name == prefix or name.startswith(prefix + ".")}


def modules_under(folder: str) -> list[Path]:
    return sorted((SOURCE / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", ["layers", "heads"])
def test_the_model_imports_no_training_lightning_or_command(folder):
    paths = modules_under(folder) + ([SOURCE / "backbone.py"] if folder == "layers" else [])
    for path in paths:
        found = within(imports(path), "clusterformer.tasks", "clusterformer.commands", "clusterformer.cli", "lightning")
        assert not found, f"{path.relative_to(ROOT)} imports {sorted(found)}"


@pytest.mark.parametrize("folder", ["data", "metrics"])
def test_data_and_metrics_import_no_task_or_command(folder):
    for path in modules_under(folder):
        found = within(imports(path), "clusterformer.tasks", "clusterformer.commands", "clusterformer.cli")
        assert not found, f"{path.relative_to(ROOT)} imports {sorted(found)}"


def test_only_the_cli_imports_the_commands():
    for path in SOURCE.rglob("*.py"):
        if path.parent.name == "commands" or path.name == "cli.py":
            continue
        found = within(imports(path), "clusterformer.commands")
        assert not found, f"{path.relative_to(ROOT)} imports {sorted(found)}"


def test_explain_does_not_import_predict():
    assert not within(imports(SOURCE / "commands" / "explain.py"), "clusterformer.commands.predict")


@pytest.mark.parametrize("command", ["predict", "explain", "serve", "demo"])
def test_commands_that_run_models_reach_the_tasks_through_the_registry(command):
    """No ``clusterformer.tasks`` import at all (the classes come from ``registry.TASKS``, checkpoints from
    ``weights``), and no Lightning at module level (``clusterformer --help`` stays light)."""
    path = SOURCE / "commands" / f"{command}.py"
    assert not within(imports(path), "clusterformer.tasks")
    assert not within(imports(path, top_level_only=True), "lightning")


def test_every_command_module_has_a_parser_and_a_handler():
    from clusterformer.commands import COMMANDS

    names = {module.__name__.rpartition(".")[2] for module in COMMANDS}
    files = {path.stem for path in (SOURCE / "commands").glob("*.py")} - {"__init__"}
    assert names == files
    for module in COMMANDS:
        assert callable(module.add_parser) and callable(module.run), module.__name__


def test_the_cli_builds_every_command_from_its_module():
    import argparse

    from clusterformer.cli import LIGHTNING_COMMANDS, build_parser
    from clusterformer.commands import COMMANDS

    (subcommands,) = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    expected = {module.__name__.rpartition(".")[2].replace("_", "-") for module in COMMANDS}
    assert set(subcommands.choices) == expected | set(LIGHTNING_COMMANDS)
    for module in COMMANDS:
        parser = subcommands.choices[module.__name__.rpartition(".")[2].replace("_", "-")]
        assert parser.get_default("func") is module.run
