"""The class names and categories of the training data, kept in the task checkpoints.

``clusterformer predict`` names its predictions and writes COCO category ids from them. Two checkpoint keys,
plain lists (they load with ``torch.load(weights_only=True)``):

* ``clusterformer_classes``: the class names in label order (``0..C-1``);
* ``clusterformer_categories``: for COCO-style data, the category dicts in label order (``id``, ``name``,
  ``isthing``, ``color`` ... as the annotation file gives them).

They come from the data module attached to the trainer (its ``classes`` and ``categories``); a module loaded
from a checkpoint keeps them for its next checkpoints when no data module is attached.
"""

from __future__ import annotations

import lightning as L

from ..outputs import json_safe

CLASSES_KEY = "clusterformer_classes"
CATEGORIES_KEY = "clusterformer_categories"


def save_dataset_info(module: L.LightningModule, checkpoint: dict) -> None:
    """Write the class names (and categories) of ``module``'s data into ``checkpoint``."""
    data = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    categories = getattr(data, "categories", None)
    classes = getattr(data, "classes", None)
    if classes is None and categories:
        classes = [c.get("name", str(c.get("id"))) for c in categories]
    if not (classes or categories):  # no data module (or one without names): what the module was loaded with
        checkpoint.update(getattr(module, "_dataset_info", {}))
        return
    if categories:
        checkpoint[CATEGORIES_KEY] = json_safe(list(categories))
    if classes:
        checkpoint[CLASSES_KEY] = [str(name) for name in classes]


def load_dataset_info(module: L.LightningModule, checkpoint: dict) -> None:
    """Keep the class names (and categories) of a loaded checkpoint for the module's next checkpoints."""
    module._dataset_info = {key: checkpoint[key] for key in (CLASSES_KEY, CATEGORIES_KEY) if key in checkpoint}
