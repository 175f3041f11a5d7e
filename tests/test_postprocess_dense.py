"""Semantic and panoptic post-processing: hand-made cases (competing queries, overlap-ratio rejection, stuff
merging, void) and a slow per-pixel reference of Mask2Former's semantic and panoptic inference."""

import math

import pytest
import torch
import torch.nn.functional as F

from clusterformer.heads import panoptic_postprocess, resize_mask_logits, semantic_postprocess
from clusterformer.metrics.panoptic import PanopticQuality

CLASSES, THINGS = 4, {0, 1}  # 2 and 3 are stuff
# mask logits; after the x4 bilinear upsampling a pixel keeps the sign of its cell with |logit| >= 2.5 across a straight
# boundary (at a corner between cells of the other sign it can flip)
ON, OFF = 10.0, -10.0


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def cells_mask(cells: set[tuple[int, int]], size=(4, 4)) -> torch.Tensor:
    """Mask logits ``ON`` on the given low-resolution cells, ``OFF`` elsewhere."""
    mask = torch.full(size, OFF)
    for i, j in cells:
        mask[i, j] = ON
    return mask


def class_logits(scores: dict[int, float]) -> torch.Tensor:
    """A query's class logits: the given class probabilities, 0.01 for the other classes."""
    logits = torch.full((CLASSES,), logit(0.01))
    for c, p in scores.items():
        logits[c] = logit(p)
    return logits


def run(queries: list[tuple[dict, set]], **kwargs):
    """One 16x16 image (4x4 cells of 4x4 pixels) from ``(class scores, cells)`` per query."""
    logits = torch.stack([class_logits(s) for s, _ in queries])[None]
    masks = torch.stack([cells_mask(c) for _, c in queries])[None]
    (result,) = panoptic_postprocess(logits, masks, [(16, 16)], [(16, 16)], THINGS, **kwargs)
    return result


def pixels_of(cells: set[tuple[int, int]]) -> torch.Tensor:
    region = torch.zeros(16, 16, dtype=torch.bool)
    for i, j in cells:
        region[4 * i : 4 * i + 4, 4 * j : 4 * j + 4] = True
    return region


ALL = {(i, j) for i in range(4) for j in range(4)}
LEFT = {(i, j) for i in range(4) for j in range(2)}
RIGHT = ALL - LEFT
ROWS = [{(i, j) for j in range(4)} for i in range(4)]  # full-width strips: no corners for the upsampling to round


# ---------------------------------------------------------------- slow references


def slow_resized_probs(masks: torch.Tensor, input_size, output_size) -> torch.Tensor:
    padded = (masks.shape[-2] * 4, masks.shape[-1] * 4)
    up = F.interpolate(masks.double()[None], size=padded, mode="bilinear", align_corners=False)
    up = up[..., : input_size[0], : input_size[1]]
    return F.interpolate(up, size=output_size, mode="bilinear", align_corners=False)[0].sigmoid()


def slow_semantic(logits, masks, input_size, output_size) -> list[list[int]]:
    probs = slow_resized_probs(masks, input_size, output_size)
    class_probs = [[1 / (1 + math.exp(-v)) for v in row] for row in logits.double().tolist()]
    result = []
    for y in range(output_size[0]):
        row = []
        for x in range(output_size[1]):
            pixel = [probs[q, y, x].item() for q in range(len(class_probs))]
            scores = [sum(class_probs[q][c] * pixel[q] for q in range(len(pixel))) for c in range(len(class_probs[0]))]
            row.append(max(range(len(scores)), key=lambda c: (scores[c], -c)))
        result.append(row)
    return result


def slow_panoptic(logits, masks, input_size, output_size, score_threshold, overlap_threshold, mask_threshold=0.5):
    """Mask2Former's ``panoptic_inference``, pixel by pixel."""
    height, width = output_size
    kept = []
    for q, row in enumerate(logits.double().tolist()):
        probs = [1 / (1 + math.exp(-v)) for v in row]
        best = max(range(len(probs)), key=lambda c: (probs[c], -c))
        if probs[best] > score_threshold:
            kept.append((q, probs[best], best))
    ids = [[0] * width for _ in range(height)]
    segments = []
    if not kept:
        return ids, segments
    probs = slow_resized_probs(masks[[q for q, _, _ in kept]], input_size, output_size).tolist()
    winner = [[0] * width for _ in range(height)]
    for y in range(height):
        for x in range(width):
            values = [score * probs[k][y][x] for k, (_, score, _) in enumerate(kept)]
            winner[y][x] = max(range(len(values)), key=lambda k: (values[k], -k))
    stuff = {}
    for k, (_, score, label) in enumerate(kept):
        won = sum(winner[y][x] == k for y in range(height) for x in range(width))
        own = sum(probs[k][y][x] >= mask_threshold for y in range(height) for x in range(width))
        claimed = [(y, x) for y in range(height) for x in range(width) if winner[y][x] == k and probs[k][y][x] >= 0.5]
        if won == 0 or own == 0 or not claimed or won / own < overlap_threshold:
            continue
        if label not in THINGS and label in stuff:
            segment = stuff[label]
            segment["score"] = max(segment["score"], score)
        else:
            segment = {"id": len(segments) + 1, "label": label, "isthing": label in THINGS, "score": score, "area": 0}
            segments.append(segment)
            if label not in THINGS:
                stuff[label] = segment
        for y, x in claimed:
            ids[y][x] = segment["id"]
        segment["area"] += len(claimed)
    return ids, segments


# ---------------------------------------------------------------- semantic


def test_semantic_map_takes_the_class_of_the_query_covering_each_pixel():
    logits = torch.stack([class_logits({1: 0.9}), class_logits({2: 0.8})])[None]
    masks = torch.stack([cells_mask(LEFT), cells_mask(RIGHT)])[None]
    (semantic,) = semantic_postprocess(logits, masks, [(16, 16)], [(16, 16)])
    assert semantic.shape == (16, 16) and semantic.dtype == torch.int64
    assert (semantic[pixels_of(LEFT)] == 1).all() and (semantic[pixels_of(RIGHT)] == 2).all()
    # a confident query's class outweighs a weak query's on the pixels both cover
    masks = torch.stack([cells_mask(ALL), cells_mask(RIGHT)])[None]
    logits = torch.stack([class_logits({1: 0.3}), class_logits({2: 0.9})])[None]
    (semantic,) = semantic_postprocess(logits, masks, [(16, 16)], [(16, 16)])
    assert (semantic[pixels_of(LEFT)] == 1).all() and (semantic[pixels_of(RIGHT)] == 2).all()


@pytest.mark.parametrize("input_size, output_size", [((8, 12), (8, 12)), ((7, 10), (11, 9)), ((8, 9), (5, 6))])
def test_semantic_map_equals_a_per_pixel_reference(input_size, output_size):
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(2, 5, CLASSES, generator=g)
    masks = 3 * torch.randn(2, 5, 2, 3, generator=g)
    results = semantic_postprocess(logits, masks, [input_size] * 2, [output_size] * 2)
    for b, semantic in enumerate(results):
        assert semantic.shape == output_size
        assert semantic.tolist() == slow_semantic(logits[b], masks[b], input_size, output_size)


# ---------------------------------------------------------------- panoptic: hand-made cases


def test_two_queries_competing_for_pixels_split_them_by_score_times_mask():
    # query 0 covers everything with score 0.85, query 1 the left half with score 0.95: query 1 takes the left
    result = run([({0: 0.85}, ALL), ({1: 0.95}, LEFT)], score_threshold=0.5, overlap_threshold=0.4)
    ids, segments = result["ids"], result["segments_info"]
    assert ids.dtype == torch.int32 and ids.shape == (16, 16)
    assert (ids[pixels_of(RIGHT)] == 1).all() and (ids[pixels_of(LEFT)] == 2).all()
    assert [(s["id"], s["label"], s["isthing"], s["area"]) for s in segments] == [(1, 0, True, 128), (2, 1, True, 128)]
    assert segments[0]["score"] == pytest.approx(0.85) and segments[1]["score"] == pytest.approx(0.95)


def test_a_query_left_with_less_than_the_overlap_ratio_of_its_mask_is_dropped():
    # the same scene: query 0 wins only half of its mask, under the default overlap threshold of 0.8
    result = run([({0: 0.85}, ALL), ({1: 0.95}, LEFT)], score_threshold=0.5)
    ids, segments = result["ids"], result["segments_info"]
    assert [(s["id"], s["label"], s["area"]) for s in segments] == [(1, 1, 128)]
    assert (ids[pixels_of(LEFT)] == 1).all()
    assert (ids[pixels_of(RIGHT)] == 0).all()  # its pixels become void, not another query's


def test_the_overlap_ratio_counts_won_pixels_below_the_mask_threshold_too():
    # Mask2Former's rule: query 0 wins 192 pixels (cols 4-15), 96 of them in its own mask (p >= 0.5 on cols 0-9):
    # 192 / 160 passes the overlap threshold where 96 / 160 would not; it keeps cols 4-9, cols 10-15 are void
    masks = torch.stack([cells_mask(LEFT), cells_mask({(i, 0) for i in range(4)})])
    masks[0][masks[0] == OFF] = -1.0  # the right half at probability 0.27
    logits = torch.stack([class_logits({2: 0.9}), class_logits({0: 0.99})])[None]
    (result,) = panoptic_postprocess(logits, masks[None], [(16, 16)], [(16, 16)], THINGS, score_threshold=0.5)
    assert [(s["label"], s["area"]) for s in result["segments_info"]] == [(2, 96), (0, 64)]
    columns = result["ids"][0].tolist()
    assert columns == [2] * 4 + [1] * 6 + [0] * 6 and (result["ids"] == result["ids"][0]).all()


def test_stuff_queries_of_one_class_merge_and_things_stay_apart():
    queries = [
        ({0: 0.95}, ROWS[0]),  # a thing of class 0
        ({3: 0.9}, ROWS[1]),  # stuff, class 3
        ({3: 0.85}, ROWS[2]),  # stuff, class 3 again: joins segment 2
        ({0: 0.95}, ROWS[3]),  # another thing of class 0: its own segment
        ({2: 0.95}, set()),  # a confident stuff query without mask: no segment
    ]
    result = run(queries, score_threshold=0.8)
    ids, segments = result["ids"], result["segments_info"]
    assert [(s["id"], s["label"], s["isthing"], s["area"]) for s in segments] == [
        (1, 0, True, 64),
        (2, 3, False, 128),
        (3, 0, True, 64),
    ]
    assert segments[1]["score"] == pytest.approx(0.9)  # the highest score of the merged queries
    assert (ids[pixels_of(ROWS[0])] == 1).all() and (ids[pixels_of(ROWS[3])] == 3).all()
    assert (ids[pixels_of(ROWS[1] | ROWS[2])] == 2).all()


def test_pixels_where_no_query_is_confident_are_void():
    nobody = run([({0: 0.7}, ALL), ({3: 0.75}, ALL)])  # both under the default score threshold 0.8
    assert (nobody["ids"] == 0).all() and nobody["segments_info"] == []
    # a confident query's mask covers only the left half: the right half is void
    half = run([({0: 0.9}, LEFT), ({1: 0.5}, ALL)])
    assert (half["ids"][pixels_of(LEFT)] == 1).all() and (half["ids"][pixels_of(RIGHT)] == 0).all()
    assert [(s["label"], s["area"]) for s in half["segments_info"]] == [(0, 128)]
    # thresholds are strict: a score equal to the threshold is out
    logits = torch.full((1, 1, CLASSES), -5.0)
    logits[0, 0, 1] = 0.0  # score 0.5
    masks = torch.full((1, 1, 4, 4), ON)
    (result,) = panoptic_postprocess(logits, masks, [(16, 16)], [(16, 16)], THINGS, score_threshold=0.5)
    assert result["segments_info"] == []


# ---------------------------------------------------------------- panoptic: reference and formats


@pytest.mark.parametrize("seed", range(4))
def test_panoptic_merging_equals_a_per_pixel_reference(seed):
    g = torch.Generator().manual_seed(seed)
    num_queries, input_size, output_size = 8, (10, 13), (12, 9)
    logits = torch.randn(2, num_queries, CLASSES, generator=g) + 2 * (torch.rand(2, num_queries, 1, generator=g) > 0.4)
    masks = 4 * torch.randn(2, num_queries, 3, 4, generator=g)
    results = panoptic_postprocess(
        logits, masks, [input_size] * 2, [output_size] * 2, THINGS, score_threshold=0.6, overlap_threshold=0.6
    )
    labelled = 0
    for b, result in enumerate(results):
        ids, segments = slow_panoptic(logits[b], masks[b], input_size, output_size, 0.6, 0.6)
        assert result["ids"].shape == output_size and result["ids"].dtype == torch.int32
        assert result["ids"].tolist() == ids
        assert len(result["segments_info"]) == len(segments)
        for found, expected in zip(result["segments_info"], segments, strict=True):
            assert found["category_id"] == found["label"]
            assert {k: found[k] for k in ("id", "label", "isthing", "area")} == {
                k: expected[k] for k in ("id", "label", "isthing", "area")
            }
            assert found["score"] == pytest.approx(expected["score"], rel=1e-6)
            assert found["area"] == int((result["ids"] == found["id"]).sum())
        labelled += len(segments)
    assert labelled > 0


def test_panoptic_output_feeds_the_panoptic_quality_metric():
    queries = [({0: 0.95}, ROWS[0]), ({3: 0.9}, ROWS[1]), ({3: 0.85}, ROWS[2]), ({0: 0.95}, ROWS[3])]
    logits = torch.stack([class_logits(s) for s, _ in queries])[None]
    masks = torch.stack([cells_mask(c) for _, c in queries])[None]
    category_ids = [1, 2, 7, 9]
    (result,) = panoptic_postprocess(logits, masks, [(16, 16)], [(16, 16)], THINGS, category_ids=category_ids)
    assert [s["category_id"] for s in result["segments_info"]] == [1, 9, 1]
    categories = [{"id": i, "isthing": int(c in THINGS)} for c, i in enumerate(category_ids)]
    metric = PanopticQuality(categories)
    metric.update(result["ids"], result["segments_info"], result["ids"], result["segments_info"])
    assert metric.compute()["All"]["pq"] == pytest.approx(1.0)


def test_resize_mask_logits_upsamples_crops_then_resizes():
    masks = torch.randn(3, 2, 3)
    resized = resize_mask_logits(masks, (8, 12), (6, 10), (9, 4))
    up = F.interpolate(masks[None], size=(8, 12), mode="bilinear", align_corners=False)[..., :6, :10]
    torch.testing.assert_close(resized, F.interpolate(up, size=(9, 4), mode="bilinear", align_corners=False)[0])
    assert resize_mask_logits(masks.bfloat16(), (8, 12), (8, 12), (8, 12)).dtype == torch.float32
