"""Lightning tasks: one thin LightningModule (and data module) per task."""

from .classification import ClassificationTask, ImageFolderData
from .panoptic import PanopticData, PanopticTask
from .semantic import SemanticData, SemanticTask
from .sets import CocoData, SetTask
from .settings import DecoderSettings

__all__ = [
    "ClassificationTask",
    "CocoData",
    "DecoderSettings",
    "ImageFolderData",
    "PanopticData",
    "PanopticTask",
    "SemanticData",
    "SemanticTask",
    "SetTask",
]
