"""The paper's detection class loss, binary cross-entropy (§4.1.2: "a small FFN ... trained with a binary
cross-entropy loss"): ``loss: {focal_alpha: -1, focal_gamma: 0}``, in the loss and in the matching cost."""

import math

import torch

from clusterformer.losses import detection_criterion
from clusterformer.losses.matching import focal_class_cost


def test_bce_matching_cost_is_minus_the_logit():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]], dtype=torch.float64)
    labels = torch.tensor([2, 0])
    cost = focal_class_cost(logits, labels, alpha=-1.0, gamma=0.0)
    # -log p + log(1 - p) at each (query, label), from the formula
    slow = torch.tensor(
        [[-math.log(torch.sigmoid(x).item()) + math.log(1 - torch.sigmoid(x).item()) for x in row[labels]]
         for row in logits], dtype=torch.float64,
    )  # fmt: skip
    torch.testing.assert_close(cost, slow)
    torch.testing.assert_close(cost, -logits[:, labels])
    # the focal cost is another function
    assert not torch.allclose(focal_class_cost(logits, labels, 0.25, 2.0), cost)


def test_bce_class_loss_matches_the_formula():
    torch.manual_seed(0)
    criterion = detection_criterion(3, focal_alpha=-1.0, focal_gamma=0.0)
    logits = torch.randn(2, 5, 3)
    boxes = torch.rand(2, 5, 4) * 0.5 + 0.25
    targets = [
        {"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.4, 0.6, 0.3, 0.1]])},
    ]
    losses = criterion({"logits": logits, "boxes": boxes}, targets)
    indices = criterion.matcher({"logits": logits, "boxes": boxes}, targets)
    total = 0.0
    for b, (queries, objects) in enumerate(indices):
        matched = {int(q): int(targets[b]["labels"][o]) for q, o in zip(queries, objects, strict=True)}
        for q in range(5):
            for c in range(3):
                p = torch.sigmoid(logits[b, q, c]).item()
                total += -math.log(p) if matched.get(q) == c else -math.log(1 - p)
    assert math.isclose(losses["loss_class"].item(), total / 3, rel_tol=1e-5)
