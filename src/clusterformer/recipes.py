"""The nano shapes recipes (``configs/<task>/clusterformer_nano_shapes.yaml``, shipped with the package) built into a
task and its data module, and the classifier's encoder that the dense models start from.

Used by ``clusterformer demo`` (each stage) and by the learning-speed comparison (``clusterformer.convergence``:
ClusterFormer's side of each pairing is the demo's stage), so that a recipe and the way it is applied live in one
place. The tasks come from ``registry.TASKS``.
"""

from __future__ import annotations

from pathlib import Path

from .registry import TASKS

__all__ = ["DEMO_MODEL_OVERRIDES", "build_stage", "classifier_encoder", "load_encoder", "shapes_recipe"]

# the demo's overrides of the dense configs' task options (its dense stages and the learning-speed comparison): the
# instance model at a third of its config's lr, the demo's shorter schedule
DEMO_MODEL_OVERRIDES = {"detection": {}, "instance": {"lr": 1e-4}, "semantic": {}, "panoptic": {}}


def shapes_recipe(task: str) -> dict:
    """The ``model`` and ``data`` sections of ``configs/<task>/clusterformer_nano_shapes.yaml`` (shipped with the
    package), the recipe that the demo's stage of ``task`` starts from."""
    from importlib import resources

    import yaml

    path = resources.files("clusterformer").joinpath("configs", task, "clusterformer_nano_shapes.yaml")
    return yaml.safe_load(path.read_text())


def build_stage(task: str, data_overrides: dict, model_overrides: dict | None = None):
    """The data module and the task of the demo's stage ``task``: the nano shapes config's ``init_args`` with the
    demo's ``overrides`` on top (its folder, its image size, its loader workers, ...); the data first, then the
    task, so that the model's initialisation draws the same random numbers whatever the data module does."""
    recipe, spec = shapes_recipe(task), TASKS[task]
    data = spec.data_class(**{**recipe["data"]["init_args"], **data_overrides})
    module = spec.module_class(**{**recipe["model"]["init_args"], **(model_overrides or {})})
    return module, data


def classifier_encoder(checkpoint: Path) -> dict:
    """The classifier's model weights (encoder and classification head) from the classification stage's
    checkpoint: what the dense stages start from, whether the stage ran in this process or an earlier one."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}


def load_encoder(task, encoder_state: dict | None) -> None:
    """Load the classifier's weights ``encoder_state`` (:func:`classifier_encoder`), without its classification
    head, into the encoder of the dense ``task``; ``None``: nothing."""
    from .backbone import CLASSIFIER_KEYS

    if encoder_state is not None:
        task.model.backbone.load_state_dict(
            {k: v for k, v in encoder_state.items() if not k.startswith(CLASSIFIER_KEYS)}
        )
