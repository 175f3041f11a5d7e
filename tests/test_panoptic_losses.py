"""The panoptic criterion (paper Eq. 7): every term against a slow loop written from its formula (python floats),
its stop-gradients, and its behaviour on empty, all-void, single-segment and crowded images."""

import math

import pytest
import torch
import torch.nn.functional as F

from clusterformer.losses import (
    PANOPTIC_LOSS_TERMS,
    PanopticCriterion,
    SetCriterion,
    panoptic_criterion,
    sample_at_centres,
    uncertainty_points,
)
from clusterformer.losses.matching import HungarianMatcher
from helpers import sigmoid, slow_point_sample

CLASSES, THINGS = 5, {0, 1, 2}  # classes 3 and 4 are stuff
ALPHA = 0.75  # PQ-style positive weight
# the terms of outputs without reference points (loss_points: CMT-DeepLab's decoder only)
ALL_TERMS = [term for name, terms in PANOPTIC_LOSS_TERMS.items() if name != "points" for term in terms]
WEIGHTS = dict.fromkeys([*ALL_TERMS, "loss_points"], 1.0)
# image 0: queries 1, 3 <- targets 1, 0; image 1: nothing; image 2: queries 0, 2, 4 <- targets 2, 0, 1
INDICES = [
    (torch.tensor([1, 3]), torch.tensor([1, 0])),
    (torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64)),
    (torch.tensor([0, 2, 4]), torch.tensor([2, 0, 1])),
]


def make_criterion(num_points=12, **kwargs) -> PanopticCriterion:
    matcher = HungarianMatcher(cost_bbox=0.0, cost_giou=0.0, num_points=num_points)
    return PanopticCriterion(CLASSES, matcher, WEIGHTS, thing_classes=THINGS, num_points=num_points, **kwargs)


def make_targets(g: torch.Generator, num_segments: list[int], size=(8, 8), void=True) -> list[dict]:
    """Non-overlapping segments cut from a random id map (0 = void when ``void``), random classes."""
    targets = []
    for n in num_segments:
        ids = torch.randint(0 if void else 1, n + 1, size, generator=g)
        labels = torch.randint(0, CLASSES, (n,), generator=g)
        targets.append(
            {
                "labels": labels,
                "masks": torch.stack([ids == k + 1 for k in range(n)]) if n else torch.zeros(0, *size, dtype=bool),
                "isthing": torch.tensor([int(c) in THINGS for c in labels.tolist()], dtype=torch.bool),
            }
        )
    return targets


def make_batch(seed: int, num_queries: int, num_segments: list[int], size=(8, 8), low=(4, 4), aux_layers=0, dim=3):
    """Leaf predictions (``requires_grad``) at ``low`` resolution, targets at ``size``."""
    g = torch.Generator().manual_seed(seed)
    batch = len(num_segments)

    def layer():
        return {
            "logits": (2 * torch.randn(batch, num_queries, CLASSES, generator=g)).requires_grad_(),
            "masks": (3 * torch.randn(batch, num_queries, *low, generator=g)).requires_grad_(),
        }

    outputs = layer()
    outputs["pixel_embeddings"] = torch.randn(batch, dim, *low, generator=g).requires_grad_()
    outputs["semantic_logits"] = (2 * torch.randn(batch, CLASSES, *low, generator=g)).requires_grad_()
    if aux_layers:
        outputs["aux"] = [layer() for _ in range(aux_layers)]
    return outputs, make_targets(g, num_segments, size)


# ---------------------------------------------------------------- slow references (python floats)


def centre(i: int, low: int, high: int) -> int:
    """The full-resolution pixel under the centre of low-resolution cell ``i``."""
    return min(int((i + 0.5) * high / low), high - 1)


def slow_low_res(target: dict, low) -> list[list[int]]:
    """Segment index (or -1 for void) of every low-resolution cell."""
    masks = target["masks"]
    high = masks.shape[-2:]
    cells = [[-1] * low[1] for _ in range(low[0])]
    for i in range(low[0]):
        for j in range(low[1]):
            for k in range(masks.shape[0]):
                if masks[k, centre(i, low[0], high[0]), centre(j, low[1], high[1])]:
                    cells[i][j] = k
                    break
    return cells


def slow_bce(logit: float, target: float) -> float:
    p = sigmoid(logit)
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def slow_pq(outputs, targets, indices):
    logits, masks = outputs["logits"].double(), outputs["masks"].double()
    batch, num_queries, h, w = masks.shape
    class_total, dice_total = 0.0, 0.0
    for b in range(batch):
        cells = slow_low_res(targets[b], (h, w))
        probs = [[[0.0] * w for _ in range(h)] for _ in range(num_queries)]
        for i in range(h):
            for j in range(w):
                if cells[i][j] < 0:
                    continue  # void: no probability counted
                exps = [math.exp(masks[b, q, i, j].item()) for q in range(num_queries)]
                for q in range(num_queries):
                    probs[q][i][j] = exps[q] / sum(exps)
        matched = dict(zip(indices[b][0].tolist(), indices[b][1].tolist(), strict=True))
        class_term, dice_term = 0.0, 0.0
        for q in range(num_queries):
            if q not in matched:
                class_term += (1 - ALPHA) * sum(slow_bce(logits[b, q, c].item(), 0.0) for c in range(CLASSES))
                continue
            t = matched[q]
            label = int(targets[b]["labels"][t])
            inside = [(i, j) for i in range(h) for j in range(w) if cells[i][j] == t]
            intersection = sum(probs[q][i][j] for i, j in inside)
            total = sum(map(sum, probs[q])) + len(inside)
            dice = (2 * intersection + 1) / (total + 1)
            similarity = 2 * intersection / (total + 1e-5)
            bce = sum(slow_bce(logits[b, q, c].item(), float(c == label)) for c in range(CLASSES))
            class_term += ALPHA * similarity * bce
            dice_term += ALPHA * sigmoid(logits[b, q, label].item()) * (1 - dice)
        class_total += class_term / num_queries
        dice_total += dice_term / num_queries
    return class_total / batch, dice_total / batch


def slow_mask_id(outputs, targets, indices):
    masks = outputs["masks"].double()
    batch, num_queries, h, w = masks.shape
    total = 0.0
    for b in range(batch):
        cells = slow_low_res(targets[b], (h, w))
        query_of = dict(zip(indices[b][1].tolist(), indices[b][0].tolist(), strict=True))  # target -> query
        loss, count = 0.0, 0
        for i in range(h):
            for j in range(w):
                if cells[i][j] not in query_of:
                    continue  # void or an unmatched target
                logits = [masks[b, q, i, j].item() for q in range(num_queries)]
                log_norm = math.log(sum(math.exp(v) for v in logits))
                loss += log_norm - logits[query_of[cells[i][j]]]
                count += 1
        total += loss / count if count else 0.0
    return total / batch


def slow_discrimination(embeddings: torch.Tensor, cells: list[list[int]], pixels=None, temperature=0.3) -> float:
    """The contrastive loss of one image over ``pixels`` (``(i, j)``; default: every non-void cell)."""
    if pixels is None:
        pixels = [(i, j) for i, row in enumerate(cells) for j, k in enumerate(row) if k >= 0]
    if not pixels:
        return 0.0
    vectors = []
    for i, j in pixels:
        v = embeddings[:, i, j].double().tolist()
        norm = math.sqrt(sum(x * x for x in v))
        vectors.append([x / norm for x in v])
    loss = 0.0
    for a, (ia, ja) in enumerate(pixels):
        logits = [sum(x * y for x, y in zip(vectors[a], vb, strict=True)) / temperature for vb in vectors]
        log_norm = math.log(sum(math.exp(v) for v in logits))
        positives = [p for p, (ip, jp) in enumerate(pixels) if cells[ip][jp] == cells[ia][ja]]
        loss += sum(log_norm - logits[p] for p in positives) / len(positives)
    return loss / len(pixels)


def slow_semantic(semantic_logits: torch.Tensor, semantic_maps: list[torch.Tensor]) -> float:
    batch, classes, h, w = semantic_logits.shape
    total = 0.0
    for b in range(batch):
        high = semantic_maps[b].shape
        loss, count = 0.0, 0
        for i in range(h):
            for j in range(w):
                label = int(semantic_maps[b][centre(i, h, high[0]), centre(j, w, high[1])])
                if label == 255:
                    continue
                logits = [semantic_logits[b, c, i, j].item() for c in range(classes)]
                loss += math.log(sum(math.exp(v) for v in logits)) - logits[label]
                count += 1
        total += loss / count if count else 0.0
    return total / batch


# ---------------------------------------------------------------- terms vs slow loops


def test_sample_at_centres_is_nearest_exact_interpolation():
    g = torch.Generator().manual_seed(0)
    for high, low in [((8, 8), (4, 4)), ((7, 10), (3, 4)), ((4, 5), (8, 9)), ((6, 6), (6, 6))]:
        maps = torch.randn(2, *high, generator=g)
        expected = F.interpolate(maps[None], size=low, mode="nearest-exact")[0]
        torch.testing.assert_close(sample_at_centres(maps, low), expected)
        assert sample_at_centres(maps > 0, low).dtype == torch.bool  # any dtype, no conversion
    rows = sample_at_centres(torch.arange(8)[:, None].expand(8, 8), (4, 4))[:, 0]
    assert rows.tolist() == [1, 3, 5, 7]


def test_class_terms_split_the_bce_of_every_query_by_thing_and_stuff_columns():
    outputs, targets = make_batch(0, 5, [2, 0, 3])
    found = make_criterion().loss_labels(outputs, targets, INDICES, torch.tensor(5.0))
    thing, stuff = 0.0, 0.0
    for b, (queries, tgts) in enumerate(INDICES):
        matched = {q: int(targets[b]["labels"][t]) for q, t in zip(queries.tolist(), tgts.tolist(), strict=True)}
        for q in range(5):
            for c in range(CLASSES):
                loss = slow_bce(outputs["logits"][b, q, c].item(), float(matched.get(q) == c))
                if c in THINGS:
                    thing += loss
                else:
                    stuff += loss
    assert found["loss_class_thing"].item() == pytest.approx(thing / 5, rel=1e-5)
    assert found["loss_class_stuff"].item() == pytest.approx(stuff / 5, rel=1e-5)


def test_mask_terms_split_the_point_sampled_bce_and_dice_by_target_kind():
    outputs, targets = make_batch(1, 5, [2, 0, 3])
    torch.manual_seed(2)
    found = make_criterion(num_points=10).loss_masks(outputs, targets, INDICES, torch.tensor(5.0))
    pairs = [(b, q, t) for b, (qs, ts) in enumerate(INDICES) for q, t in zip(qs.tolist(), ts.tolist(), strict=True)]
    predicted = torch.stack([outputs["masks"][b, q] for b, q, _ in pairs]).detach()
    torch.manual_seed(2)
    points = uncertainty_points(predicted, 10, 3.0, 0.75)
    expected = {name: 0.0 for name in PANOPTIC_LOSS_TERMS["masks"]}
    for (b, _, t), mask_logits, mask_points in zip(pairs, predicted, points, strict=True):
        kind = "thing" if bool(targets[b]["isthing"][t]) else "stuff"
        probs = [sigmoid(slow_point_sample(mask_logits, x, y)) for x, y in mask_points.tolist()]
        labels = [slow_point_sample(targets[b]["masks"][t].double(), x, y) for x, y in mask_points.tolist()]
        pairs_pl = list(zip(probs, labels, strict=True))
        expected[f"loss_mask_{kind}"] += sum(-(y * math.log(p) + (1 - y) * math.log(1 - p)) for p, y in pairs_pl) / 10
        expected[f"loss_dice_{kind}"] += 1 - (2 * sum(p * y for p, y in pairs_pl) + 1) / (sum(probs) + sum(labels) + 1)
    kinds = {bool(targets[b]["isthing"][t]) for b, _, t in pairs}
    assert kinds == {True, False}  # the batch exercises both buckets
    for name, value in expected.items():
        assert found[name].item() == pytest.approx(value / 5, rel=1e-5), name


def test_with_equal_weights_things_and_stuff_add_up_to_the_set_criterion():
    outputs, targets = make_batch(2, 5, [2, 0, 3])
    num = torch.tensor(5.0)
    panoptic = make_criterion(num_points=10, focal_alpha=0.25, focal_gamma=2.0)
    weights = {"loss_class": 1, "loss_mask": 1, "loss_dice": 1}
    plain = SetCriterion(CLASSES, panoptic.matcher, weights, losses=("labels", "masks"), num_points=10)
    split = panoptic.loss_labels(outputs, targets, INDICES, num)
    whole = plain.loss_labels(outputs, targets, INDICES, num)
    torch.testing.assert_close(split["loss_class_thing"] + split["loss_class_stuff"], whole["loss_class"])
    torch.manual_seed(3)
    split = panoptic.loss_masks(outputs, targets, INDICES, num)
    torch.manual_seed(3)
    whole = plain.loss_masks(outputs, targets, INDICES, num)
    torch.testing.assert_close(split["loss_mask_thing"] + split["loss_mask_stuff"], whole["loss_mask"])
    torch.testing.assert_close(split["loss_dice_thing"] + split["loss_dice_stuff"], whole["loss_dice"])


@pytest.mark.parametrize("low", [(4, 4), (3, 5)])
def test_pq_style_loss_equals_its_formula(low):
    outputs, targets = make_batch(4, 5, [2, 0, 3], low=low)
    found = make_criterion().loss_pq(outputs, targets, INDICES, torch.tensor(5.0))
    class_term, dice_term = slow_pq(outputs, targets, INDICES)
    assert found["loss_pq_class"].item() == pytest.approx(class_term, rel=1e-5)
    assert found["loss_pq_dice"].item() == pytest.approx(dice_term, rel=1e-5)


def test_pq_style_loss_weights_are_constants():
    outputs, targets = make_batch(5, 5, [2, 0, 3])
    found = make_criterion().loss_pq(outputs, targets, INDICES, torch.tensor(5.0))
    # the dice term reaches the class logits only through its (stopped) weight, and the class term the masks
    grad = torch.autograd.grad(found["loss_pq_dice"], outputs["logits"], retain_graph=True, allow_unused=True)[0]
    assert grad is None or (grad == 0).all()
    grad = torch.autograd.grad(found["loss_pq_class"], outputs["masks"], retain_graph=True, allow_unused=True)[0]
    assert grad is None or (grad == 0).all()
    assert torch.autograd.grad(found["loss_pq_dice"], outputs["masks"], retain_graph=True)[0].abs().sum() > 0
    assert torch.autograd.grad(found["loss_pq_class"], outputs["logits"])[0].abs().sum() > 0


def test_pq_style_class_term_pushes_unmatched_queries_to_no_object():
    outputs, targets = make_batch(6, 5, [2, 0, 3])
    found = make_criterion().loss_pq(outputs, targets, INDICES, torch.tensor(5.0))
    (grad,) = torch.autograd.grad(found["loss_pq_class"], outputs["logits"])
    assert (grad[1] > 0).all()  # image 1 has no target: every class logit of every query goes down
    assert (grad[0, [0, 2, 4]] > 0).all()  # unmatched queries of image 0


@pytest.mark.parametrize("low", [(4, 4), (5, 3)])
def test_mask_id_cross_entropy_equals_its_formula(low):
    outputs, targets = make_batch(7, 5, [2, 0, 3], low=low)
    found = make_criterion().loss_mask_id(outputs, targets, INDICES, torch.tensor(5.0))
    assert found["loss_mask_id"].item() == pytest.approx(slow_mask_id(outputs, targets, INDICES), rel=1e-5)


def test_mask_id_cross_entropy_ignores_pixels_of_unmatched_targets():
    outputs, targets = make_batch(8, 5, [3])
    indices = [(torch.tensor([2]), torch.tensor([1]))]  # targets 0 and 2 are unmatched
    found = make_criterion().loss_mask_id(outputs, targets, indices, torch.tensor(3.0))
    assert found["loss_mask_id"].item() == pytest.approx(slow_mask_id(outputs, targets, indices), rel=1e-5)
    (grad,) = torch.autograd.grad(found["loss_mask_id"], outputs["masks"])
    cells = torch.tensor(slow_low_res(targets[0], (4, 4)))
    assert (grad[0][:, cells != 1] == 0).all() and grad[0][:, cells == 1].abs().sum() > 0


def test_instance_discrimination_equals_its_formula_on_all_pixels():
    outputs, targets = make_batch(9, 5, [2, 0, 3], low=(4, 3), dim=4)
    found = make_criterion().loss_instance_discrimination(outputs, targets, INDICES, torch.tensor(5.0))
    expected = sum(
        slow_discrimination(outputs["pixel_embeddings"][b], slow_low_res(targets[b], (4, 3))) for b in range(3)
    )
    assert found["loss_instance_discrimination"].item() == pytest.approx(expected / 3, rel=1e-5)


def test_instance_discrimination_samples_pixels_by_inverse_segment_area():
    g = torch.Generator().manual_seed(10)
    ids = torch.ones(8, 8, dtype=torch.int64)
    ids[:2, :2] = 2  # a 4-pixel segment in a 60-pixel one
    targets = [{"labels": torch.tensor([3, 0]), "masks": torch.stack([ids == 1, ids == 2])}]
    outputs = {"pixel_embeddings": torch.randn(1, 3, 8, 8, generator=g)}
    criterion = make_criterion(num_samples=8)
    cells = slow_low_res(targets[0], (8, 8))
    area = torch.tensor([60.0 if k == 0 else 4.0 for row in cells for k in row])
    torch.manual_seed(11)
    found = criterion.loss_instance_discrimination(outputs, targets, None, None)["loss_instance_discrimination"]
    torch.manual_seed(11)
    chosen = torch.multinomial(area.pow(-1.5), 8, replacement=False).tolist()
    pixels = [(p // 8, p % 8) for p in chosen]
    expected = slow_discrimination(outputs["pixel_embeddings"][0], cells, pixels)
    assert found.item() == pytest.approx(expected, rel=1e-5)
    # the small segment holds 1/16 of the pixels but most of the probability mass (area^-0.5 per segment)
    small = 0
    for seed in range(40):
        torch.manual_seed(seed)
        small += sum(area[p] == 4 for p in torch.multinomial(area.pow(-1.5), 8, replacement=False).tolist())
    assert small / (40 * 4) > 0.6


def test_semantic_loss_equals_its_formula_with_a_given_map_and_a_rendered_one():
    outputs, targets = make_batch(12, 5, [2, 0, 3], low=(4, 3))
    g = torch.Generator().manual_seed(13)
    maps = [torch.randint(0, CLASSES, (8, 8), generator=g) for _ in range(3)]
    for semantic in maps:
        semantic[torch.rand(8, 8, generator=g) < 0.3] = 255
    given = [{**t, "semantic": m} for t, m in zip(targets, maps, strict=True)]
    criterion = make_criterion()
    found = criterion.loss_semantic(outputs, given, INDICES, None)["loss_semantic"]
    assert found.item() == pytest.approx(slow_semantic(outputs["semantic_logits"], maps), rel=1e-5)
    rendered = []
    for t in targets:
        semantic = torch.full((8, 8), 255)
        for mask, label in zip(t["masks"], t["labels"], strict=True):
            semantic[mask] = label
        rendered.append(semantic)
    found = criterion.loss_semantic(outputs, targets, INDICES, None)["loss_semantic"]
    assert found.item() == pytest.approx(slow_semantic(outputs["semantic_logits"], rendered), rel=1e-5)


# ---------------------------------------------------------------- criterion behaviour


def test_forward_names_every_term_and_leaves_out_those_without_their_input():
    outputs, targets = make_batch(14, 5, [2, 3], aux_layers=2)
    criterion = make_criterion()
    losses = criterion(outputs, targets)
    per_layer = [t for t in ALL_TERMS if t not in ("loss_instance_discrimination", "loss_semantic")]
    assert list(losses) == ALL_TERMS + [f"{t}_{i}" for i in range(2) for t in per_layer]
    assert all(v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    del outputs["pixel_embeddings"], outputs["semantic_logits"]
    assert list(criterion(outputs, targets))[: len(per_layer)] == per_layer
    only = make_criterion(losses=("pq", "mask_id"))
    assert list(only(outputs, targets))[:3] == ["loss_pq_class", "loss_pq_dice", "loss_mask_id"]


def test_gradients_reach_every_output_of_every_layer():
    outputs, targets = make_batch(15, 5, [2, 3], aux_layers=1)
    criterion = make_criterion()
    criterion.weighted_total(criterion(outputs, targets)).backward()
    for layer in (outputs, outputs["aux"][0]):
        for key in ("logits", "masks"):
            assert layer[key].grad is not None and layer[key].grad.abs().sum() > 0, key
    for key in ("pixel_embeddings", "semantic_logits"):
        assert outputs[key].grad.abs().sum() > 0, key


def test_each_term_backpropagates_to_its_inputs():
    outputs, targets = make_batch(16, 5, [2, 0, 3])
    criterion = make_criterion()
    torch.manual_seed(0)
    losses = criterion(outputs, targets)
    inputs = {
        "loss_pq_class": "logits",
        "loss_pq_dice": "masks",
        "loss_mask_id": "masks",
        "loss_instance_discrimination": "pixel_embeddings",
        "loss_semantic": "semantic_logits",
        "loss_class_thing": "logits",
        "loss_mask_stuff": "masks",
    }
    for term, key in inputs.items():
        (grad,) = torch.autograd.grad(losses[term], outputs[key], retain_graph=True)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, term


def _assert_finite_with_finite_gradients(outputs, targets, criterion=None):
    criterion = criterion or make_criterion()
    losses = criterion(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    criterion.weighted_total(losses).backward()
    for key in ("logits", "masks", "pixel_embeddings", "semantic_logits"):
        assert outputs[key].grad is not None and torch.isfinite(outputs[key].grad).all(), key
    return losses


def test_images_without_segments_give_finite_losses_and_push_queries_to_no_object():
    outputs, targets = make_batch(17, 4, [0, 0])
    losses = _assert_finite_with_finite_gradients(outputs, targets)
    for name in ("loss_mask_thing", "loss_dice_thing", "loss_mask_stuff", "loss_dice_stuff", "loss_pq_dice"):
        assert losses[name] == 0, name
    for name in ("loss_mask_id", "loss_instance_discrimination", "loss_semantic"):
        assert losses[name] == 0, name
    assert losses["loss_class_thing"] > 0 and losses["loss_pq_class"] > 0
    assert (outputs["logits"].grad > 0).all()
    assert (outputs["masks"].grad == 0).all() and (outputs["pixel_embeddings"].grad == 0).all()


def test_all_void_images_give_finite_losses():
    outputs, targets = make_batch(18, 4, [0, 0])
    for target in targets:
        target["semantic"] = torch.full((8, 8), 255)
    losses = _assert_finite_with_finite_gradients(outputs, targets)
    assert losses["loss_semantic"] == 0
    # segments too small to survive the downsampling (no low-resolution cell centre on them) are void too
    outputs, targets = make_batch(19, 4, [0, 0])
    for target in targets:
        target["masks"] = torch.zeros(2, 8, 8, dtype=torch.bool)
        target["masks"][0, 0, 0] = target["masks"][1, 2, 2] = True
        target["labels"], target["isthing"] = torch.tensor([0, 4]), torch.tensor([True, False])
    losses = _assert_finite_with_finite_gradients(outputs, targets)
    assert losses["loss_mask_id"] == 0 and losses["loss_instance_discrimination"] == 0


def test_a_single_segment_covering_the_image():
    outputs, targets = make_batch(20, 4, [1])
    targets[0]["masks"][:] = True
    losses = _assert_finite_with_finite_gradients(outputs, targets)
    assert losses["loss_mask_id"] > 0
    # identical embeddings: every pixel is its own and everyone's positive, the loss is log(number of pixels)
    outputs["pixel_embeddings"] = torch.ones(1, 3, 4, 4)
    found = make_criterion().loss_instance_discrimination(outputs, targets, None, None)
    assert found["loss_instance_discrimination"].item() == pytest.approx(math.log(16), rel=1e-6)


def test_more_segments_than_queries():
    outputs, targets = make_batch(21, 2, [5, 4], low=(4, 4))
    losses = _assert_finite_with_finite_gradients(outputs, targets)
    assert all(losses[name] > 0 for name in ("loss_pq_class", "loss_pq_dice", "loss_mask_id"))


def test_crowd_segments_are_dropped_and_become_void():
    outputs, targets = make_batch(22, 5, [3, 2])
    crowded = [dict(t) for t in targets]
    extra = torch.zeros(1, 8, 8, dtype=torch.bool)
    extra[0, :4, :4] = True
    for t in crowded:
        t["masks"] = torch.cat([t["masks"] & ~extra, extra])
        t["labels"] = torch.cat([t["labels"], torch.tensor([1])])
        t["isthing"] = torch.cat([t["isthing"], torch.tensor([True])])
        t["iscrowd"] = torch.tensor([0] * (len(t["labels"]) - 1) + [1])
    plain = [{**t, "masks": t["masks"] & ~extra} for t in targets]
    criterion = make_criterion()
    torch.manual_seed(0)
    expected = criterion(outputs, plain)
    torch.manual_seed(0)
    found = criterion(outputs, crowded)
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], msg=name)


def test_isthing_is_derived_from_thing_classes_or_checked_against_them():
    outputs, targets = make_batch(23, 5, [2, 3])
    without = [{k: v for k, v in t.items() if k != "isthing"} for t in targets]
    criterion = make_criterion()
    torch.manual_seed(0)
    expected = criterion(outputs, targets)
    torch.manual_seed(0)
    found = criterion(outputs, without)
    for name in expected:
        torch.testing.assert_close(found[name], expected[name])
    targets[1]["isthing"] = ~targets[1]["isthing"]
    with pytest.raises(ValueError, match="image 1: segments"):
        criterion(outputs, targets)


def test_configuration_and_input_errors_are_clear():
    with pytest.raises(ValueError, match="thing_classes \\[7\\]"):
        PanopticCriterion(CLASSES, HungarianMatcher(), WEIGHTS, thing_classes=[0, 7])
    with pytest.raises(ValueError, match="loss_semantic"):
        weights = {k: v for k, v in WEIGHTS.items() if k != "loss_semantic"}
        PanopticCriterion(CLASSES, HungarianMatcher(), weights, thing_classes=THINGS)
    outputs, targets = make_batch(24, 5, [2, 3])
    targets[0]["semantic"] = torch.full((8, 8), 9)
    with pytest.raises(ValueError, match="image 0: semantic map values \\[9\\]"):
        make_criterion()(outputs, targets)
    targets[0]["labels"][0] = CLASSES
    with pytest.raises(ValueError, match="labels span"):
        make_criterion()(outputs, targets)


def test_losses_are_float32_under_bf16_autocast():
    outputs, targets = make_batch(25, 5, [2, 3], aux_layers=1)
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
    assert all(low[k].grad.abs().sum() > 0 for k in ("logits", "masks", "pixel_embeddings", "semantic_logits"))


def test_panoptic_criterion_carries_the_paper_weights():
    criterion = panoptic_criterion(133, range(80), num_points=16)
    assert criterion.weight_dict == {
        "loss_class_thing": 5.0,
        "loss_mask_thing": 5.0,
        "loss_dice_thing": 5.0,
        "loss_class_stuff": 3.0,
        "loss_mask_stuff": 3.0,
        "loss_dice_stuff": 3.0,
        "loss_pq_class": 3.0,
        "loss_pq_dice": 3.0,
        "loss_mask_id": 0.3,
        "loss_instance_discrimination": 1.0,
        "loss_semantic": 1.0,
        "loss_points": 1.0,
    }
    assert criterion.losses == tuple(PANOPTIC_LOSS_TERMS)
    assert criterion.thing_classes == list(range(80)) and int(criterion.thing_columns.sum()) == 80
    assert (criterion.focal_alpha, criterion.focal_gamma, criterion.pq_alpha) == (-1.0, 0.0, 0.75)
    matcher = criterion.matcher
    assert (matcher.cost_class, matcher.cost_mask, matcher.cost_dice, matcher.cost_bbox) == (2.0, 5.0, 5.0, 0.0)
    halved = panoptic_criterion(133, range(80), aux_weight=0.5)
    assert halved.weight_dict["loss_pq_class"] == 1.5 and halved.weight_dict["loss_mask_id"] == 0.15
    outputs, targets = make_batch(26, 4, [2, 1])
    small = panoptic_criterion(CLASSES, THINGS, num_points=8, num_samples=16)
    losses = small(outputs, targets)
    total = small.weighted_total(losses)
    expected = sum(small.weight_dict[name] * value for name, value in losses.items())
    torch.testing.assert_close(total, expected)
