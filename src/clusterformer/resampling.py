"""Bringing a dense result computed at the model's input size to a larger image's size by nearest neighbour,
without making what a large image cannot afford: :class:`NearestResize` gives the exact areas and boxes of the
enlarged maps without the maps, :class:`ResizedMasks` makes a query's mask at the image's size one at a time.

Used by :class:`~clusterformer.Predictor` (its results) and so by ``clusterformer predict``; see
``docs/predict_explain.md``, "Large images".
"""

from __future__ import annotations

import torch


def working_size(tensor: torch.Tensor, image_size: tuple[int, int]) -> tuple[int, int]:
    """Where a dense result is computed: the image's size, or the model input's (``tensor``) where that is smaller."""
    return min(tensor.shape[-2], image_size[0]), min(tensor.shape[-1], image_size[1])


class NearestResize:
    """Nearest-neighbour resampling of ``(..., h, w)`` maps to ``output_size`` ``(H, W)``: output pixel ``(y, x)``
    takes input pixel ``(rows[y], cols[x])``, ``rows[y] = floor((y + 0.5) h / H)`` (torch's ``nearest-exact``).
    When enlarging, every input pixel becomes a block of output pixels, which gives the exact areas and boxes of
    the enlarged maps without making them (:meth:`areas`, :meth:`boxes`)."""

    def __init__(self, size: tuple[int, int], output_size: tuple[int, int]):
        self.size, self.output_size = (int(size[0]), int(size[1])), (int(output_size[0]), int(output_size[1]))
        self.rows, self.cols = (
            ((torch.arange(n, dtype=torch.float64) + 0.5) * (m / n)).long().clamp_(max=m - 1)
            for m, n in zip(self.size, self.output_size, strict=True)
        )

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        return values.index_select(-2, self.rows).index_select(-1, self.cols)

    def areas(self, ids: torch.Tensor, count: int) -> torch.Tensor:
        """``(count,)`` int64: the pixels of each id ``0..count-1`` of the ``(h, w)`` map ``ids`` once resampled."""
        rows = torch.bincount(self.rows, minlength=self.size[0])
        cols = torch.bincount(self.cols, minlength=self.size[1])
        weights = (rows[:, None] * cols[None, :]).flatten().double()
        return torch.bincount(ids.flatten().long(), weights=weights, minlength=count).round().long()

    def boxes(self, masks: torch.Tensor) -> torch.Tensor:
        """``(k, 4)`` xyxy: ``torchvision.ops.masks_to_boxes`` of the enlarged ``(k, h, w)`` masks (output size at
        least the input size); an empty mask's box is zeros, as there."""
        from torchvision.ops import masks_to_boxes

        if not len(masks):
            return torch.zeros(0, 4)
        x0, y0, x1, y1 = masks_to_boxes(masks).long().unbind(1)
        (h, w), cols, rows = self.size, self.cols, self.rows
        first_col, last_col = (
            torch.searchsorted(cols, torch.arange(w)),
            torch.searchsorted(cols, torch.arange(w), right=True) - 1,
        )
        first_row, last_row = (
            torch.searchsorted(rows, torch.arange(h)),
            torch.searchsorted(rows, torch.arange(h), right=True) - 1,
        )
        boxes = torch.stack([first_col[x0], first_row[y0], last_col[x1], last_row[y1]], 1).float()
        boxes[~masks.flatten(1).any(1)] = 0
        return boxes


class ResizedMasks:
    """``(k, h, w)`` bool masks read as ``(k, H, W)`` one mask at a time (``masks[i]``, resampled by ``resize``;
    ``None``: the masks are at that size already), so that the masks at a large image's size are never all in
    memory."""

    def __init__(self, masks: torch.Tensor, resize: NearestResize | None = None):
        self.masks, self.resize = masks, resize

    def __len__(self) -> int:
        return len(self.masks)

    @property
    def shape(self) -> tuple[int, int, int]:
        size = tuple(self.masks.shape[-2:]) if self.resize is None else self.resize.output_size
        return (len(self.masks), *size)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.masks[index] if self.resize is None else self.resize(self.masks[index])

    def select(self, indices: torch.Tensor) -> ResizedMasks:
        """The masks ``indices`` (in that order), resampled as these."""
        return ResizedMasks(self.masks[indices], self.resize)

    def resized(self, size: tuple[int, int]) -> ResizedMasks:
        """The same masks read at ``size`` instead."""
        return ResizedMasks(self.masks, NearestResize(self.masks.shape[-2:], size))
