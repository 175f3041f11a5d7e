"""The Hungarian matcher against a brute-force search over all assignments, with every cost written
slowly from its formula in float64."""

import itertools
import math

import pytest
import torch

from clusterformer.losses.matching import HungarianMatcher
from helpers import corners, sigmoid, slow_point_sample

ALPHA, GAMMA = 0.25, 2.0
WEIGHTS = dict(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, cost_mask=5.0, cost_dice=5.0)


# ---------------------------------------------------------------- slow references (python floats)


def slow_giou(box_a, box_b) -> float:
    """GIoU of two ``cxcywh`` boxes from explicit areas."""
    ax1, ay1, ax2, ay2 = corners(box_a)
    bx1, by1, bx2, by2 = corners(box_b)
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = area_a + area_b - inter
    enclosing = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (enclosing - union) / enclosing


def slow_class_cost(logit: float) -> float:
    p = sigmoid(logit)
    return ALPHA * (1 - p) ** GAMMA * -math.log(p) - (1 - ALPHA) * p**GAMMA * -math.log(1 - p)


def slow_mask_costs(pred: torch.Tensor, target: torch.Tensor, points: torch.Tensor) -> tuple[float, float]:
    """Mean BCE and dice between one predicted mask (logits) and one target mask on the points."""
    logits = [slow_point_sample(pred, float(x), float(y)) for x, y in points]
    labels = [slow_point_sample(target.double(), float(x), float(y)) for x, y in points]
    probs = [sigmoid(v) for v in logits]
    bce = sum(-(t * math.log(p) + (1 - t) * math.log(1 - p)) for p, t in zip(probs, labels, strict=True))
    bce /= len(points)
    dice = 1 - (2 * sum(p * t for p, t in zip(probs, labels, strict=True)) + 1) / (sum(probs) + sum(labels) + 1)
    return bce, dice


def slow_cost_terms(logits, target, boxes=None, masks=None, points=None, weights=WEIGHTS) -> dict[str, list]:
    """``(Q, n)`` weighted cost terms of one image as nested lists."""
    num_queries, num_targets = logits.shape[0], len(target["labels"])
    terms = {}
    grid = [[0.0] * num_targets for _ in range(num_queries)]
    terms["class"] = [
        [weights["cost_class"] * slow_class_cost(float(logits[q, c])) for c in target["labels"]]
        for q in range(num_queries)
    ]
    if boxes is not None:
        terms["bbox"] = [
            [
                weights["cost_bbox"] * sum(abs(float(a) - float(b)) for a, b in zip(boxes[q], t, strict=True))
                for t in target["boxes"]
            ]
            for q in range(num_queries)
        ]
        terms["giou"] = [
            [-weights["cost_giou"] * slow_giou(boxes[q], t) for t in target["boxes"]] for q in range(num_queries)
        ]
    if masks is not None:
        terms["mask"] = [row[:] for row in grid]
        terms["dice"] = [row[:] for row in grid]
        for q in range(num_queries):
            for j in range(num_targets):
                bce, dice = slow_mask_costs(masks[q], target["masks"][j], points)
                terms["mask"][q][j] = weights["cost_mask"] * bce
                terms["dice"][q][j] = weights["cost_dice"] * dice
    return terms


def brute_force(cost: list[list[float]]) -> tuple[float, set]:
    """Minimum total cost over all one-to-one assignments of min(Q, n) pairs, and its pairs."""
    num_queries, num_targets = len(cost), len(cost[0]) if cost else 0
    best, best_pairs = math.inf, set()
    if num_targets <= num_queries:
        for queries in itertools.permutations(range(num_queries), num_targets):
            pairs = set(zip(queries, range(num_targets), strict=True))
            total = sum(cost[q][j] for q, j in pairs)
            if total < best:
                best, best_pairs = total, pairs
    else:
        for chosen in itertools.permutations(range(num_targets), num_queries):
            pairs = set(zip(range(num_queries), chosen, strict=True))
            total = sum(cost[q][j] for q, j in pairs)
            if total < best:
                best, best_pairs = total, pairs
    return best, best_pairs


def total_cost(terms: dict[str, list]) -> list[list[float]]:
    rows = next(iter(terms.values()))
    return [[sum(term[q][j] for term in terms.values()) for j in range(len(rows[0]))] for q in range(len(rows))]


# ---------------------------------------------------------------- problems


def random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    centers = 0.2 + 0.6 * torch.rand(n, 2, generator=g)
    sizes = 0.05 + 0.3 * torch.rand(n, 2, generator=g)
    return torch.cat([centers, sizes], dim=1)


def random_problem(seed: int, batch: int, num_queries: int, num_targets: list[int], masks=False, classes=4):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "logits": 2 * torch.randn(batch, num_queries, classes, generator=g),
        "boxes": random_boxes(batch * num_queries, g).view(batch, num_queries, 4),
    }
    if masks:
        outputs["masks"] = 3 * torch.randn(batch, num_queries, 3, 4, generator=g)
    targets = []
    for n in num_targets:
        target = {"labels": torch.randint(0, classes, (n,), generator=g), "boxes": random_boxes(n, g)}
        if masks:
            target["masks"] = torch.rand(n, 12, 16, generator=g) > 0.5
        targets.append(target)
    return outputs, targets


def assert_optimal(indices, outputs, targets, points=None):
    for i, (target, (rows, cols)) in enumerate(zip(targets, indices, strict=True)):
        assert rows.dtype == cols.dtype == torch.int64
        n, num_queries = len(target["labels"]), outputs["logits"].shape[1]
        assert len(rows) == len(cols) == min(num_queries, n)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        if n == 0:
            continue
        terms = slow_cost_terms(
            outputs["logits"][i],
            target,
            boxes=outputs["boxes"][i] if "boxes" in outputs else None,
            masks=outputs["masks"][i] if "masks" in outputs else None,
            points=None if points is None else points[i],
        )
        cost = total_cost(terms)
        best, best_pairs = brute_force(cost)
        found = sum(cost[q][j] for q, j in zip(rows.tolist(), cols.tolist(), strict=True))
        assert found == pytest.approx(best, rel=1e-5, abs=1e-5)
        assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == best_pairs


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("seed", range(6))
def test_class_and_box_matching_is_the_brute_force_optimum(seed):
    num_queries = 1 + seed % 5
    outputs, targets = random_problem(seed, 3, num_queries, [0, 1 + seed % 3, 3])
    indices = HungarianMatcher(**WEIGHTS)(outputs, targets)
    assert_optimal(indices, outputs, targets)


@pytest.mark.parametrize("seed", range(3))
def test_mask_matching_is_the_brute_force_optimum_on_the_same_points(seed):
    outputs, targets = random_problem(seed, 3, 4, [2, 0, 3], masks=True)
    del outputs["boxes"]
    matcher = HungarianMatcher(**WEIGHTS, num_points=16)
    torch.manual_seed(seed)
    indices = matcher(outputs, targets)
    # the documented draws: one torch.rand(num_points, 2) per image with targets, in image order
    torch.manual_seed(seed)
    points = [torch.rand(16, 2, dtype=torch.float32) if len(t["labels"]) else None for t in targets]
    assert_optimal(indices, outputs, targets, points)


def test_cost_terms_equal_their_formulas():
    outputs, targets = random_problem(0, 1, 4, [3], masks=True)
    points = torch.rand(10, 2, generator=torch.Generator().manual_seed(1))
    points[0] = torch.tensor([0.0, 1.0])  # corners and edges: border padding
    points[1] = torch.tensor([0.999, 0.01])
    matcher = HungarianMatcher(**WEIGHTS)
    terms = matcher.cost_terms(
        outputs["logits"][0], targets[0], boxes=outputs["boxes"][0], masks=outputs["masks"][0], points=points
    )
    slow = slow_cost_terms(outputs["logits"][0], targets[0], outputs["boxes"][0], outputs["masks"][0], points)
    assert set(terms) == set(slow) == {"class", "bbox", "giou", "mask", "dice"}
    for name, term in terms.items():
        assert term.dtype == torch.float32
        torch.testing.assert_close(term.double(), torch.tensor(slow[name], dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_terms_with_zero_weight_or_missing_inputs_are_left_out():
    outputs, targets = random_problem(0, 1, 3, [2], masks=True)
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=0.0, cost_mask=0.0, cost_dice=0.0)
    terms = matcher.cost_terms(outputs["logits"][0], targets[0], boxes=outputs["boxes"][0], masks=outputs["masks"][0])
    assert set(terms) == {"class", "bbox"}
    # boxes predicted but the targets have none (instance segmentation data): no box cost
    no_boxes = {"labels": targets[0]["labels"]}
    assert set(matcher.cost_terms(outputs["logits"][0], no_boxes, boxes=outputs["boxes"][0])) == {"class"}


def test_images_without_targets_get_empty_indices():
    outputs, targets = random_problem(0, 2, 5, [0, 0], masks=True)
    for rows, cols in HungarianMatcher(**WEIGHTS, num_points=8)(outputs, targets):
        assert rows.shape == cols.shape == (0,)
        assert rows.dtype == cols.dtype == torch.int64


def test_more_targets_than_queries_matches_every_query_once():
    outputs, targets = random_problem(3, 2, 2, [3, 3])
    indices = HungarianMatcher(**WEIGHTS)(outputs, targets)
    for rows, _ in indices:
        assert rows.tolist() == [0, 1]
    assert_optimal(indices, outputs, targets)


@pytest.mark.parametrize(
    ("key", "names"), [("logits", ["class"]), ("boxes", ["bbox", "giou"]), ("masks", ["mask", "dice"])]
)
def test_non_finite_predictions_raise_a_clear_error(key, names):
    outputs, targets = random_problem(0, 2, 3, [1, 2], masks=True)
    outputs[key][1, 0] = float("nan")  # one query of image 1 diverged
    with pytest.raises(ValueError, match="image 1") as error:
        HungarianMatcher(**WEIGHTS, num_points=8)(outputs, targets)
    for name in names:
        assert name in str(error.value)


def test_labels_outside_the_class_head_raise_a_clear_error():
    outputs, targets = random_problem(0, 1, 3, [2], classes=4)
    targets[0]["labels"][1] = 4
    with pytest.raises(ValueError, match="4 classes"):
        HungarianMatcher(**WEIGHTS)(outputs, targets)


def test_costs_are_float32_under_bf16_autocast():
    outputs, targets = random_problem(5, 3, 5, [3, 2, 1], masks=True)
    low = {k: v.bfloat16() for k, v in outputs.items()}
    reference = {k: v.float() for k, v in low.items()}
    matcher = HungarianMatcher(**WEIGHTS, num_points=32)
    torch.manual_seed(0)
    expected = matcher(reference, targets)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        found = matcher(low, targets)
        terms = matcher.cost_terms(low["logits"][0], targets[0], low["boxes"][0], low["masks"][0], torch.rand(8, 2))
    assert all(term.dtype == torch.float32 for term in terms.values())
    for (r1, c1), (r2, c2) in zip(expected, found, strict=True):
        assert torch.equal(r1, r2) and torch.equal(c1, c2)


def test_invalid_weights_are_refused():
    with pytest.raises(ValueError, match="not all 0"):
        HungarianMatcher(0.0, 0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=">= 0"):
        HungarianMatcher(cost_class=-1.0)
