"""Every loss term against a slow loop written from its formula (float64), and the criterion's behaviour on
empty targets, crowded images, perfect predictions and bf16 autocast."""

import inspect
import math

import pytest
import torch
import torch.distributed as dist

from clusterformer.losses import (
    SetCriterion,
    detection_criterion,
    dice_loss,
    instance_criterion,
    joint_criterion,
    point_sample,
    sigmoid_ce_loss,
    uncertainty_points,
)
from clusterformer.losses.matching import HungarianMatcher
from helpers import corners, sigmoid, slow_point_sample

ALPHA, GAMMA = 0.25, 2.0
WEIGHTS = {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
TERMS = ["loss_class", "loss_bbox", "loss_giou", "loss_mask", "loss_dice"]


def make_criterion(num_classes=4, num_points=24, **kwargs) -> SetCriterion:
    matcher = HungarianMatcher(num_points=num_points)
    return SetCriterion(num_classes, matcher, WEIGHTS, num_points=num_points, **kwargs)


def random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.cat([0.2 + 0.6 * torch.rand(n, 2, generator=g), 0.05 + 0.3 * torch.rand(n, 2, generator=g)], 1)


def make_batch(seed: int, num_queries: int, num_targets: list[int], classes=4, aux_layers=0):
    """Leaf predictions (``requires_grad``) with ``aux_layers`` auxiliary layers, and targets."""
    g = torch.Generator().manual_seed(seed)
    batch = len(num_targets)

    def layer():
        return {
            "logits": (2 * torch.randn(batch, num_queries, classes, generator=g)).requires_grad_(),
            "boxes": random_boxes(batch * num_queries, g).view(batch, num_queries, 4).requires_grad_(),
            "masks": (3 * torch.randn(batch, num_queries, 4, 5, generator=g)).requires_grad_(),
        }

    outputs = layer()
    if aux_layers:
        outputs["aux"] = [layer() for _ in range(aux_layers)]
    targets = [
        {
            "labels": torch.randint(0, classes, (n,), generator=g),
            "boxes": random_boxes(n, g),
            "masks": torch.rand(n, 16, 20, generator=g) > 0.5,
        }
        for n in num_targets
    ]
    return outputs, targets


# ---------------------------------------------------------------- small functions


def test_point_sample_equals_manual_bilinear_interpolation():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 3, 5, 7, generator=g)
    coords = torch.rand(2, 9, 2, generator=g)
    coords[0, :4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.03, 0.97]])  # corners and borders
    sampled = point_sample(maps, coords)
    assert sampled.shape == (2, 3, 9)
    for n in range(2):
        for c in range(3):
            for p in range(9):
                x, y = coords[n, p].tolist()
                assert sampled[n, c, p].item() == pytest.approx(slow_point_sample(maps[n, c], x, y), abs=1e-5)
    # a grid of points keeps its layout
    grid = coords.view(2, 3, 3, 2)
    torch.testing.assert_close(point_sample(maps, grid), sampled.view(2, 3, 3, 3))


def test_dice_and_sigmoid_ce_equal_their_formulas():
    g = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(3, 11, generator=g, dtype=torch.float64)
    targets = torch.rand(3, 11, generator=g, dtype=torch.float64).round()
    targets[0, :5] = 0.3  # soft labels from bilinear sampling of the target masks
    num_masks = 2.5
    dice, bce = 0.0, 0.0
    for m in range(3):
        probs = [sigmoid(v) for v in logits[m].tolist()]
        labels = targets[m].tolist()
        overlap = sum(p * t for p, t in zip(probs, labels, strict=True))
        dice += 1 - (2 * overlap + 1) / (sum(probs) + sum(labels) + 1)
        bce += sum(-(t * math.log(p) + (1 - t) * math.log(1 - p)) for p, t in zip(probs, labels, strict=True)) / 11
    assert dice_loss(logits, targets, num_masks).item() == pytest.approx(dice / num_masks, rel=1e-12)
    assert sigmoid_ce_loss(logits, targets, num_masks).item() == pytest.approx(bce / num_masks, rel=1e-12)


def test_uncertainty_points_keep_the_most_uncertain_candidates_then_random_ones():
    g = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(2, 6, 8, generator=g)
    torch.manual_seed(3)
    points = uncertainty_points(logits, 20, oversample_ratio=3.0, importance_sample_ratio=0.75)
    assert points.shape == (2, 20, 2) and points.dtype == torch.float32
    torch.manual_seed(3)  # the same draws: 3 * 20 candidates per mask, then 5 random points
    candidates, random = torch.rand(2, 60, 2), torch.rand(2, 5, 2)
    for m in range(2):
        uncertainty = [-abs(slow_point_sample(logits[m], x, y)) for x, y in candidates[m].tolist()]
        most = sorted(range(60), key=lambda i: uncertainty[i], reverse=True)[:15]
        assert sorted(map(tuple, points[m, :15].tolist())) == sorted(map(tuple, candidates[m, most].tolist()))
    torch.testing.assert_close(points[:, 15:], random)


def test_uncertainty_points_concentrate_on_the_uncertain_region():
    logits = torch.full((1, 8, 8), 10.0)
    logits[..., :4] = 0.0  # the left half is maximally uncertain
    torch.manual_seed(0)
    points = uncertainty_points(logits, 100, oversample_ratio=3.0, importance_sample_ratio=0.75)
    assert (points[0, :75, 0] < 0.5).all()
    assert ((points >= 0) & (points <= 1)).all()
    all_random = uncertainty_points(logits, 10, importance_sample_ratio=0.0)
    assert all_random.shape == (1, 10, 2)


# ---------------------------------------------------------------- criterion terms vs slow loops


def slow_focal(logit: float, target: float) -> float:
    p = sigmoid(logit)
    ce = -(target * math.log(p) + (1 - target) * math.log(1 - p))
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = ALPHA * target + (1 - ALPHA) * (1 - target)
    return alpha_t * ce * (1 - p_t) ** GAMMA


def slow_giou_loss(box_a, box_b) -> float:
    ax1, ay1, ax2, ay2 = corners(box_a)
    bx1, by1, bx2, by2 = corners(box_b)
    area_a, area_b = (ax2 - ax1) * (ay2 - ay1), (bx2 - bx1) * (by2 - by1)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = area_a + area_b - inter
    enclosing = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return 1 - (inter / union - (enclosing - union) / enclosing)


INDICES = [
    (torch.tensor([1, 3]), torch.tensor([1, 0])),
    (torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64)),
    (torch.tensor([0, 2, 4]), torch.tensor([2, 0, 1])),
]


def test_class_loss_is_the_focal_loss_of_every_query_and_class():
    outputs, targets = make_batch(0, 5, [2, 0, 3])
    num = torch.tensor(5.0)
    found = make_criterion().loss_labels(outputs, targets, INDICES, num)["loss_class"]
    expected = 0.0
    for b, (queries, tgts) in enumerate(INDICES):
        matched = {q: int(targets[b]["labels"][j]) for q, j in zip(queries.tolist(), tgts.tolist(), strict=True)}
        for q in range(5):
            for c in range(4):
                expected += slow_focal(outputs["logits"][b, q, c].item(), float(matched.get(q) == c))
    assert found.item() == pytest.approx(expected / 5, rel=1e-5)


def test_box_losses_are_l1_and_one_minus_giou_of_matched_pairs():
    outputs, targets = make_batch(1, 5, [2, 0, 3])
    num = torch.tensor(5.0)
    found = make_criterion().loss_boxes(outputs, targets, INDICES, num)
    l1, giou = 0.0, 0.0
    for b, (queries, tgts) in enumerate(INDICES):
        for q, j in zip(queries.tolist(), tgts.tolist(), strict=True):
            predicted, target = outputs["boxes"][b, q].tolist(), targets[b]["boxes"][j].tolist()
            l1 += sum(abs(p - t) for p, t in zip(predicted, target, strict=True))
            giou += slow_giou_loss(predicted, target)
    assert found["loss_bbox"].item() == pytest.approx(l1 / 5, rel=1e-5)
    assert found["loss_giou"].item() == pytest.approx(giou / 5, rel=1e-5)


def test_mask_losses_are_bce_and_dice_on_uncertainty_sampled_points():
    outputs, targets = make_batch(2, 5, [2, 0, 3])
    num = torch.tensor(5.0)
    criterion = make_criterion(num_points=12)
    torch.manual_seed(4)
    found = criterion.loss_masks(outputs, targets, INDICES, num)
    # the same draws: points of the matched masks, image by image, in matched order
    pairs = [(b, q, j) for b, (qs, js) in enumerate(INDICES) for q, j in zip(qs.tolist(), js.tolist(), strict=True)]
    predicted = torch.stack([outputs["masks"][b, q] for b, q, _ in pairs]).detach()
    torch.manual_seed(4)
    points = uncertainty_points(predicted, 12, 3.0, 0.75)
    bce, dice = 0.0, 0.0
    for (b, _, j), mask_logits, mask_points in zip(pairs, predicted, points, strict=True):
        logits = [slow_point_sample(mask_logits, x, y) for x, y in mask_points.tolist()]
        labels = [slow_point_sample(targets[b]["masks"][j].double(), x, y) for x, y in mask_points.tolist()]
        probs = [sigmoid(v) for v in logits]
        bce += sum(-(t * math.log(p) + (1 - t) * math.log(1 - p)) for p, t in zip(probs, labels, strict=True)) / 12
        overlap = sum(p * t for p, t in zip(probs, labels, strict=True))
        dice += 1 - (2 * overlap + 1) / (sum(probs) + sum(labels) + 1)
    assert found["loss_mask"].item() == pytest.approx(bce / 5, rel=1e-5)
    assert found["loss_dice"].item() == pytest.approx(dice / 5, rel=1e-5)


# ---------------------------------------------------------------- criterion behaviour


def test_forward_names_every_term_of_every_layer_and_weights_them():
    outputs, targets = make_batch(3, 5, [2, 1], aux_layers=2)
    criterion = make_criterion()
    losses = criterion(outputs, targets)
    assert list(losses) == TERMS + [f"{t}_0" for t in TERMS] + [f"{t}_1" for t in TERMS]
    assert all(v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    expected = sum(WEIGHTS[name.removesuffix("_0").removesuffix("_1")] * value for name, value in losses.items())
    torch.testing.assert_close(criterion.weighted_total(losses), expected)


def test_gradients_reach_logits_boxes_and_masks_of_every_layer():
    outputs, targets = make_batch(4, 5, [2, 3], aux_layers=1)
    criterion = make_criterion()
    criterion.weighted_total(criterion(outputs, targets)).backward()
    for layer in (outputs, outputs["aux"][0]):
        for key in ("logits", "boxes", "masks"):
            assert layer[key].grad is not None and layer[key].grad.abs().sum() > 0, key


def test_without_any_target_losses_are_finite_and_push_every_query_to_background():
    outputs, targets = make_batch(5, 4, [0, 0], aux_layers=1)
    criterion = make_criterion()
    losses = criterion(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_class"] > 0
    for name in ("loss_bbox", "loss_giou", "loss_mask", "loss_dice"):
        assert losses[name] == 0
    criterion.weighted_total(losses).backward()
    assert (outputs["logits"].grad > 0).all()  # gradient descent lowers every class logit
    for key in ("boxes", "masks"):  # still part of the graph (DDP needs every output used), with zero gradient
        assert outputs[key].grad is not None and (outputs[key].grad == 0).all()


def test_an_image_without_targets_in_a_batch_with_targets():
    outputs, targets = make_batch(6, 4, [0, 3])
    criterion = make_criterion()
    losses = criterion(outputs, targets)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    criterion.weighted_total(losses).backward()
    assert (outputs["logits"].grad[0] > 0).all()
    assert (outputs["boxes"].grad[0] == 0).all() and outputs["boxes"].grad[1].abs().sum() > 0


def test_more_targets_than_queries_matches_every_query_and_normalises_by_all_targets():
    outputs, targets = make_batch(7, 2, [3, 4])
    criterion = make_criterion()
    assert criterion.num_targets(targets, torch.device("cpu")).item() == 7
    losses = criterion(outputs, targets)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    criterion.weighted_total(losses).backward()
    assert (outputs["boxes"].grad.abs().sum((2,)) > 0).all()  # every query is matched


def test_perfect_boxes_give_zero_l1_and_giou():
    outputs, targets = make_batch(8, 5, [2, 0, 3])
    with torch.no_grad():
        for b, (queries, tgts) in enumerate(INDICES):
            outputs["boxes"][b, queries] = targets[b]["boxes"][tgts]
    found = make_criterion().loss_boxes(outputs, targets, INDICES, torch.tensor(5.0))
    assert found["loss_bbox"].item() == 0
    assert found["loss_giou"].item() == pytest.approx(0, abs=1e-6)  # float32 rounding


def test_losses_are_float32_under_bf16_autocast():
    outputs, targets = make_batch(9, 5, [2, 3], aux_layers=1)
    low = {k: v.detach().bfloat16().requires_grad_() for k, v in outputs.items() if k != "aux"}
    low["aux"] = [{k: v.detach().bfloat16().requires_grad_() for k, v in outputs["aux"][0].items()}]
    reference = {k: v.detach().float() for k, v in low.items() if k != "aux"}
    reference["aux"] = [{k: v.detach().float() for k, v in low["aux"][0].items()}]
    criterion = make_criterion()
    torch.manual_seed(0)
    expected = criterion(reference, targets)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        found = criterion(low, targets)
        total = criterion.weighted_total(found)
    assert list(found) == list(expected)
    for name in found:
        assert found[name].dtype == torch.float32
        torch.testing.assert_close(found[name], expected[name])
    total.backward()
    assert all(low[k].grad.abs().sum() > 0 for k in ("logits", "boxes", "masks"))


def test_task_criteria_carry_the_paper_weights():
    detection = detection_criterion(3)
    assert detection.weight_dict == {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    assert detection.losses == ("labels", "boxes")
    assert (detection.matcher.cost_class, detection.matcher.cost_bbox, detection.matcher.cost_giou) == (2.0, 5.0, 2.0)
    assert detection.matcher.cost_mask == detection.matcher.cost_dice == 0
    instance = instance_criterion(3, num_points=16)
    # CMT-DeepLab's reference-point loss (weight 1, the paper's) only for outputs with points: none here
    assert instance.weight_dict == {"loss_class": 2.0, "loss_mask": 5.0, "loss_dice": 5.0, "loss_points": 1.0}
    assert instance.losses == ("labels", "masks", "points")
    assert (instance.matcher.cost_mask, instance.matcher.cost_dice, instance.matcher.cost_bbox) == (5.0, 5.0, 0.0)
    outputs, targets = make_batch(10, 4, [1, 2], classes=3)
    assert list(detection(outputs, targets)) == ["loss_class", "loss_bbox", "loss_giou"]
    assert list(instance(outputs, targets)) == ["loss_class", "loss_mask", "loss_dice"]


def test_joint_criterion_takes_the_keywords_of_the_detection_and_instance_criteria():
    keywords = {}
    for factory in (detection_criterion, instance_criterion):
        keywords.update(
            (name, p.default) for name, p in inspect.signature(factory).parameters.items() if p.kind == p.KEYWORD_ONLY
        )
    joint = inspect.signature(joint_criterion).parameters
    assert {name: joint[name].default for name in keywords} == keywords
    criterion = joint_criterion(3, num_points=16, oversample_ratio=2.0, importance_sample_ratio=0.5, focal_alpha=0.5,
                                focal_gamma=1.0)  # fmt: skip
    assert criterion.weight_dict == {**detection_criterion(3).weight_dict, **instance_criterion(3).weight_dict}
    assert criterion.losses == ("labels", "boxes", "masks", "points")
    assert (criterion.num_points, criterion.oversample_ratio, criterion.importance_sample_ratio) == (16, 2.0, 0.5)
    assert (criterion.focal_alpha, criterion.focal_gamma) == (0.5, 1.0)
    matcher = criterion.matcher
    assert (matcher.focal_alpha, matcher.focal_gamma, matcher.num_points) == (0.5, 1.0, 16)
    outputs, targets = make_batch(10, 4, [1, 2], classes=3)
    assert list(criterion(outputs, targets))[:5] == TERMS


def test_configuration_and_input_errors_are_clear():
    matcher = HungarianMatcher()
    with pytest.raises(ValueError, match="loss_giou"):
        SetCriterion(3, matcher, {"loss_class": 1.0, "loss_bbox": 1.0}, losses=("labels", "boxes"))
    with pytest.raises(ValueError, match="unknown losses"):
        SetCriterion(3, matcher, WEIGHTS, losses=("labels", "keypoints"))
    outputs, targets = make_batch(11, 4, [1, 2])
    del outputs["boxes"]
    with pytest.raises(KeyError, match="outputs\\['boxes'\\]"):
        make_criterion()(outputs, targets)
    with pytest.raises(KeyError, match="loss_extra"):
        make_criterion().weighted_total({"loss_extra_0": torch.tensor(1.0)})


def test_number_of_targets_goes_through_the_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        outputs, targets = make_batch(12, 4, [1, 2])
        criterion = make_criterion()
        assert criterion.num_targets(targets, torch.device("cpu")).item() == 3
        assert all(torch.isfinite(v) for v in criterion(outputs, targets).values())
    finally:
        dist.destroy_process_group()
