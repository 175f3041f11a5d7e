"""The task registry: every entry names classes that exist and metrics its configs monitor, the commands read their
tasks from it, and a module's class, a checkpoint's hyperparameters or a config name the task it lists."""

import ast
import inspect
from pathlib import Path

import lightning as L
import pytest
import yaml

from clusterformer import cli, weights
from clusterformer.commands import ablate, demo, predict
from clusterformer.registry import TASKS, task_of_class_name

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "clusterformer"
CONFIGS = sorted((ROOT / "configs").glob("*/*.yaml"))


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_names_classes_that_exist(name):
    spec = TASKS[name]
    assert spec.name == name and spec.module == f"clusterformer.tasks.{spec.class_name}"
    assert issubclass(spec.module_class, L.LightningModule)
    assert issubclass(spec.data_class, L.LightningDataModule)
    assert issubclass(spec.writer_class, predict.Writer) and spec.writer_class is not predict.Writer
    assert spec.monitor in spec.metrics and spec.mode in ("max", "min")
    parameters = inspect.signature(spec.module_class.__init__).parameters
    assert spec.model_key in parameters and spec.encoder_options in parameters
    assert ("task" in parameters) == spec.task_argument
    assert spec.signature_key is None or spec.signature_key in parameters


def test_the_commands_take_the_registry_tasks():
    (subcommands,) = [action for action in cli.build_parser()._actions if action.dest == "command"]
    (task,) = [action for action in subcommands.choices["predict"]._actions if action.dest == "task"]
    assert tuple(task.choices) == tuple(TASKS)
    assert set(demo.DEMO_TASKS) <= set(TASKS)
    # --overwrite deletes what the writer of any task writes
    expected = {"overlays", "summary.json", "predictions.json", "results.json", "images.json", "labels", "panoptic",
                "panoptic.json"}  # fmt: skip
    assert set(predict.all_outputs()) == expected


def test_the_metrics_that_the_commands_read_are_the_tasks():
    for task, keys in demo.SHOWN.items():
        assert set(keys) <= set(TASKS[task].metrics), task
    for task, _, key in demo.REPORT_ROWS:
        assert key in TASKS[task].metrics, (task, key)
    for task, keys in ablate.METRICS.items():
        assert set(keys.values()) <= set(TASKS[task].metrics), task


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_configs_train_the_task_of_their_folder_and_monitor_its_metrics(path):
    spec = TASKS[path.parent.name]
    config = yaml.safe_load(path.read_text())
    model = config["model"]
    assert model["class_path"] == spec.module and config["data"]["class_path"] == spec.data
    assert spec.resolve(model["init_args"].get("task")) == spec.name
    callbacks = [callback.get("init_args") or {} for callback in config["trainer"]["callbacks"]]
    monitored = [init_args for init_args in callbacks if "monitor" in init_args]
    for init_args in monitored:
        assert init_args["monitor"] in spec.metrics and init_args["mode"] == spec.mode
    if "nano_shapes" not in path.stem:  # the paper's recipes follow the task's monitor
        assert [init_args["monitor"] for init_args in monitored] == [spec.monitor]


def constructor_hyperparameters(name: str) -> dict:
    """The hyperparameters a module of task ``name`` stores: one per constructor argument (values do not matter
    to the recognition)."""
    spec = TASKS[name]
    parameters = list(inspect.signature(spec.module_class.__init__).parameters)[1:]
    hparams = {key: 1 for key in parameters}
    if spec.task_argument:
        hparams["task"] = name
    return hparams


@pytest.mark.parametrize("name", list(TASKS))
def test_the_task_is_found_from_its_class_or_its_hyperparameters(name):
    spec = TASKS[name]
    task = name if spec.task_argument else None
    assert cli.task_of(spec.module_class, task) == name
    assert task_of_class_name(spec.class_name, task) == name
    hparams = constructor_hyperparameters(name)
    assert weights._task_from_hparams(hparams) == name  # checkpoints written before tasks recorded their name
    recorded = {"state_dict": {}, "hyper_parameters": {**hparams, "_class_path": spec.module}}
    assert weights.checkpoint_task(recorded) == name
    assert weights.task_class(name) is spec.module_class
    assert cli.task_of(int) is None and task_of_class_name("ResNet") is None


def module_imports(path: Path) -> tuple[set[str], set[str]]:
    """The package modules that ``path`` imports at module level, and those it imports anywhere."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(SOURCE.parent).with_suffix("").parts)
    package = package.removesuffix(".__init__") if path.name == "__init__.py" else package.rpartition(".")[0]

    def targets(node) -> set[str]:
        if isinstance(node, ast.Import):
            return {alias.name for alias in node.names if alias.name.startswith("clusterformer")}
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            if module.startswith("clusterformer"):
                return {f"{module}.{alias.name}" for alias in node.names} | ({module} if node.module else set())
        return set()

    top = set().union(*(targets(node) for node in tree.body))
    anywhere = set().union(*(targets(node) for node in ast.walk(tree)))
    return top, anywhere


def test_no_module_level_import_cycle_and_weights_never_import_export():
    modules = {}
    for path in SOURCE.rglob("*.py"):
        name = ".".join(path.relative_to(SOURCE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {name: {m for m in module_imports(path)[0] if m in modules} - {name} for name, path in modules.items()}

    def reachable(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for other in graph[stack.pop()]:
                if other not in seen:
                    seen.add(other)
                    stack.append(other)
        return seen

    assert [name for name in graph if name in reachable(name)] == []
    assert graph["clusterformer.registry"] == set()  # importable from anywhere
    assert "clusterformer.commands.export" not in module_imports(modules["clusterformer.weights"])[1]
    assert "clusterformer.weights" not in graph["clusterformer.commands.export"]  # only inside the command that loads
