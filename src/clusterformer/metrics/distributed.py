"""What the metrics share to add up the evaluation of several processes (DDP).

* ``SummedMetric``: a ``torchmetrics.Metric`` whose states are all counts or sums
  (``add_state(..., dist_reduce_fx="sum")``). ``compute`` adds the states of every process (torchmetrics'
  synchronisation, on the device of the states) before it divides, and gives each process back its own
  counts afterwards; ``merge`` adds the counts of another object by hand (offline, or in tests).
* ``gather_objects``: the picklable results of every process, for what cannot be a tensor state: the COCO
  result dicts that pycocotools scores. It is the one ``all_gather_object`` of the package.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric


def distributed() -> bool:
    """Whether a default process group is running (``torch.distributed``)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_objects(obj: Any) -> list:
    """``obj`` of every process of the default group, in rank order (``[obj]`` when not distributed). A
    collective: every process must call it, at the same point."""
    if not distributed():
        return [obj]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


class SummedMetric(Metric):
    """A metric whose states are all sums over the evaluated samples (subclasses add them with
    ``dist_reduce_fx="sum"``): the states of several processes, or of two objects (``merge``), add up."""

    full_state_update = False
    is_differentiable = False

    def _check_mergeable(self, other: SummedMetric) -> None:
        """Raise a ``ValueError`` when ``other`` counts something else (subclasses)."""

    def merge(self, other: SummedMetric) -> SummedMetric:
        """Add the counts of ``other`` (of the same class and settings) to this metric's; returns ``self``."""
        if type(other) is not type(self):
            raise ValueError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}")
        self._check_mergeable(other)
        for name in self._defaults:
            state = getattr(self, name)
            setattr(self, name, state + getattr(other, name).to(state.device))
        self._update_count += other._update_count
        self._computed = None  # the cached result is stale
        return self
