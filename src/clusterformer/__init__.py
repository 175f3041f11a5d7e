"""ClusterFormer: clustering as a universal visual learner.

Importing the package registers ``clusterformer_{nano,tiny,small}`` with timm.
"""

from .backbone import ClusterBlock, ClusterFormer

__version__ = "0.1.0"
__all__ = ["ClusterBlock", "ClusterFormer", "Predictor", "__version__"]


def __getattr__(name: str):
    # imported on first use: ``import clusterformer`` (timm's registration) stays as light as it was
    if name == "Predictor":
        from .predictor import Predictor

        return Predictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
