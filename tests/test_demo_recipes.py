"""The demo's stages are built from the nano shapes configs (one recipe per task), shipped with the package."""

from pathlib import Path

import pytest
import yaml

from clusterformer.recipes import build_stage, shapes_recipe
from clusterformer.registry import TASKS

ROOT = Path(__file__).resolve().parents[1]
TASK_NAMES = ["classification", "detection", "instance", "semantic", "panoptic"]


@pytest.fixture(scope="module")
def shapes(shapes_dir):
    return shapes_dir(seed=6, num_train=4, num_val=2, size=48)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_the_demo_reads_the_repositorys_config(task):
    config = ROOT / "configs" / task / "clusterformer_nano_shapes.yaml"
    assert shapes_recipe(task) == yaml.safe_load(config.read_text())


@pytest.mark.parametrize("task", TASK_NAMES)
def test_a_stage_is_the_config_with_the_demos_overrides(task, shapes):
    root = shapes / "imagefolder" if task == "classification" else shapes
    module, data = build_stage(task, {"root": str(root), "num_workers": 0}, {"lr": 5e-4})
    assert isinstance(module, TASKS[task].module_class) and isinstance(data, TASKS[task].data_class)
    recipe = shapes_recipe(task)["model"]["init_args"]
    assert module.hparams["lr"] == 5e-4  # the override
    for key in ("weight_decay", "warmup_steps", "warmup_epochs", "backbone_lr_mult", "num_classes"):
        if key in recipe:
            assert module.hparams[key] == recipe[key], key  # the rest from the config
    assert data.hparams["batch_size"] == shapes_recipe(task)["data"]["init_args"]["batch_size"]


def test_the_demos_classifier_recipe_and_its_encoder_in_the_dense_models(shapes):
    """The demo's classifier: token head, 4 x 4 centers per block, whole crops, batch 32 at lr 3e-4; its encoder's
    weights load into the dense models, which cluster with 10 x 10 centers (the same weights)."""
    import torch

    from clusterformer.commands import demo
    from clusterformer.recipes import load_encoder

    classifier, data = build_stage(
        "classification", {"root": str(shapes / "imagefolder"), "num_workers": 0, **demo.CLASSIFIER_DATA},
        demo.CLASSIFIER_MODEL,
    )  # fmt: skip
    assert classifier.model.head_source == "tokens"
    assert {block.num_centers for stage in classifier.model.stages for block in stage.blocks} == {16}
    assert tuple(data.hparams["crop_scale"]) == (1.0, 1.0) and data.hparams["batch_size"] == 32
    assert classifier.hparams["lr"] == 3e-4
    dense, _ = build_stage("panoptic", {"root": str(shapes), "num_workers": 0})
    state = {k.removeprefix("model."): v for k, v in classifier.state_dict().items() if k.startswith("model.")}
    load_encoder(dense, state)
    assert {block.num_centers for stage in dense.model.backbone.stages for block in stage.blocks} == {100}
    for name, value in dense.model.backbone.state_dict().items():
        assert torch.equal(value, state[name]), name
