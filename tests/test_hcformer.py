"""HCFormer's hierarchical clustering: Eq. 3 and Eq. 5 against slow loops, borders and odd sizes."""

import math

import pytest
import torch
import torch.nn.functional as F

import clusterformer  # noqa: F401
from clusterformer.heads.hcformer import (
    MIN_SCALE,
    carry_back,
    carry_back_through,
    local_cluster_assignment,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def slow_assignment(fine, coarse, scale, window=3):
    """Eq. 3 pixel by pixel: softmax over the coarse neighbours of the fine pixel's parent (those inside the map)
    of the cosine similarity divided by |s|."""
    b, c, height, width = fine.shape
    h, w = coarse.shape[-2:]
    r = window // 2
    out = torch.zeros(b, window * window, height, width)
    for i in range(b):
        for y in range(height):
            for x in range(width):
                f = fine[i, :, y, x] / fine[i, :, y, x].norm()
                logits = {}
                for k in range(window * window):
                    cy, cx = y // 2 + k // window - r, x // 2 + k % window - r
                    if 0 <= cy < h and 0 <= cx < w:
                        p = coarse[i, :, cy, cx] / coarse[i, :, cy, cx].norm()
                        logits[k] = float(f @ p) / max(abs(scale), MIN_SCALE)
                top = max(logits.values())
                total = sum(math.exp(v - top) for v in logits.values())
                for k, v in logits.items():
                    out[i, k, y, x] = math.exp(v - top) / total
    return out


def slow_carry_back(coarse_map, assignment):
    """Eq. 5 pixel by pixel: the assignment-weighted sum of the neighbours' values."""
    b, c, h, w = coarse_map.shape
    kk, height, width = assignment.shape[1:]
    window = math.isqrt(kk)
    r = window // 2
    out = torch.zeros(b, c, height, width)
    for i in range(b):
        for y in range(height):
            for x in range(width):
                for k in range(kk):
                    cy, cx = y // 2 + k // window - r, x // 2 + k % window - r
                    if 0 <= cy < h and 0 <= cx < w:
                        out[i, :, y, x] += assignment[i, k, y, x] * coarse_map[i, :, cy, cx]
    return out


def half(size):
    return tuple((s + 1) // 2 for s in size)


@pytest.mark.parametrize("size, window", [((6, 8), 3), ((5, 7), 3), ((7, 4), 5), ((1, 3), 3)])
def test_assignment_is_eq3_on_the_parents_neighbourhood(float64, size, window):
    torch.manual_seed(0)
    fine, coarse = torch.randn(2, 4, *size), torch.randn(2, 4, *half(size))
    scale = torch.tensor(-0.3)  # |s|: the sign does not matter
    assignment = local_cluster_assignment(fine, coarse, scale, window)
    assert assignment.shape == (2, window * window, *size)
    torch.testing.assert_close(assignment, slow_assignment(fine, coarse, -0.3, window), atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [(6, 8), (5, 7)])
def test_assignment_rows_sum_to_one_and_outside_neighbours_get_nothing(float64, size):
    torch.manual_seed(0)
    assignment = local_cluster_assignment(torch.randn(1, 3, *size), torch.randn(1, 3, *half(size)), 0.5)
    torch.testing.assert_close(assignment.sum(1), torch.ones(1, *size))
    assert (assignment > 0).any(1).all()
    # the top-left pixel's parent is the corner: its neighbours above and to the left (k = 0, 1, 2, 3, 6) are outside
    assert assignment[0, [0, 1, 2, 3, 6], 0, 0].abs().max() == 0
    assert assignment[0, [4, 5, 7, 8], 0, 0].sum() == pytest.approx(1.0)
    # the bottom-right pixel's parent is the other corner
    assert assignment[0, [2, 5, 6, 7, 8], -1, -1].abs().max() == 0


def test_small_scale_is_hard_clustering_to_the_most_similar_neighbour(float64):
    """s -> 0 (Appendix B): each fine pixel goes to its most similar neighbour, and Eq. 5 copies that value."""
    torch.manual_seed(0)
    coarse = torch.randn(1, 8, 3, 4)
    parents = coarse.repeat_interleave(2, 2).repeat_interleave(2, 3)[..., :5, :7]
    fine = parents + 0.01 * torch.randn_like(parents)  # every fine pixel near its parent
    assignment = local_cluster_assignment(fine, coarse, MIN_SCALE)
    torch.testing.assert_close(assignment[:, 4], torch.ones(1, 5, 7))  # the centre of the window: the parent
    values = torch.randn(1, 2, 3, 4)
    copied = values.repeat_interleave(2, 2).repeat_interleave(2, 3)[..., :5, :7]
    torch.testing.assert_close(carry_back(values, assignment), copied)


def paper_clustering(feat, downsampled_feat, scale):
    """Appendix C, Listing 1, as printed (even sizes; the border's missing neighbours are zero features)."""
    batch_size, emb_dim, height, width = feat.shape
    candidate_clusters = F.unfold(downsampled_feat, kernel_size=3, padding=1).reshape(batch_size, emb_dim, 9, -1)
    feat = F.unfold(feat, kernel_size=2, stride=2).reshape(batch_size, emb_dim, 4, -1)
    similarities = torch.einsum("bkcn,bkpn->bcpn", (candidate_clusters, feat)).reshape(batch_size * 9, 4, -1)
    similarities = F.fold(similarities, (height, width), kernel_size=2, stride=2).reshape(batch_size, 9, height, width)
    return (similarities / scale.abs()).softmax(1)


def paper_decode(x, A):
    """Appendix C, Listing 2, as printed."""
    batch_size, _, height, width = A.shape
    n_channels = x.shape[1]
    candidate_clusters = F.unfold(x, kernel_size=3, padding=1).reshape(batch_size, n_channels, 9, -1)
    A = F.unfold(A, kernel_size=2, stride=2).reshape(batch_size, 9, 4, -1)
    decoded_features = torch.einsum("bkcn,bcpn->bkpn", (candidate_clusters, A)).reshape(batch_size, n_channels * 4, -1)
    return F.fold(decoded_features, (height, width), kernel_size=2, stride=2)


def test_matches_the_papers_listings_away_from_the_border(float64):
    """Where all nine neighbours exist the paper's code and this one agree; at the border the listing gives the
    missing neighbours weight exp(0) (zero features) and they carry back zeros, which this one does not."""
    torch.manual_seed(0)
    fine, coarse = F.normalize(torch.randn(2, 4, 10, 12), dim=1), F.normalize(torch.randn(2, 4, 5, 6), dim=1)
    scale = torch.tensor(0.2)
    ours, paper = local_cluster_assignment(fine, coarse, scale), paper_clustering(fine, coarse, scale)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    torch.testing.assert_close(ours[inner], paper[inner])
    values = torch.randn(2, 3, 5, 6)
    torch.testing.assert_close(carry_back(values, ours)[inner], paper_decode(values, paper)[inner])
    assert not torch.allclose(ours[..., 0, 0], paper[..., 0, 0])


@pytest.mark.parametrize("size, window", [((6, 8), 3), ((5, 7), 3), ((1, 1), 3), ((9, 6), 5)])
def test_carry_back_is_eq5(float64, size, window):
    torch.manual_seed(0)
    assignment = local_cluster_assignment(torch.randn(2, 4, *size), torch.randn(2, 4, *half(size)), 0.4, window)
    coarse_map = torch.randn(2, 3, *half(size))
    fine_map = carry_back(coarse_map, assignment)
    assert fine_map.shape == (2, 3, *size)
    torch.testing.assert_close(fine_map, slow_carry_back(coarse_map, assignment), atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [(6, 8), (5, 7), (3, 1)])
def test_carry_back_of_a_constant_map_is_constant_at_the_border_too(float64, size):
    torch.manual_seed(0)
    assignment = local_cluster_assignment(torch.randn(1, 4, *size), torch.randn(1, 4, *half(size)), 0.1)
    constant = torch.tensor([2.5, -1.0])[None, :, None, None].expand(1, 2, *half(size))
    torch.testing.assert_close(carry_back(constant, assignment), constant[..., :1, :1].expand(1, 2, *size))


def test_carry_back_through_three_levels_is_the_composed_loops(float64):
    """The sizes a 72 x 88 image gives the backbone (stride 4: 18 x 22, then 9 x 11, 5 x 6, 3 x 3): odd sizes
    at every level."""
    torch.manual_seed(0)
    sizes = [(18, 22), (9, 11), (5, 6), (3, 3)]
    maps = [torch.randn(1, 4, *s) for s in sizes]
    assignments = [local_cluster_assignment(maps[i], maps[i + 1], 0.3) for i in range(3)]
    coarse_map = torch.randn(1, 2, *sizes[-1])
    expected = coarse_map
    for assignment in reversed(assignments):
        expected = slow_carry_back(expected, assignment)
    decoded = carry_back_through(coarse_map, assignments)
    assert decoded.shape == (1, 2, *sizes[0])
    torch.testing.assert_close(decoded, expected, atol=1e-6, rtol=0)


def test_a_coarse_map_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match=r"a \(6, 8\) map downsamples to \(3, 4\)"):
        local_cluster_assignment(torch.randn(1, 2, 6, 8), torch.randn(1, 2, 3, 3), 0.1)
    with pytest.raises(ValueError, match="must be odd"):
        local_cluster_assignment(torch.randn(1, 2, 6, 8), torch.randn(1, 2, 3, 4), 0.1, window=2)
    with pytest.raises(ValueError, match="downsamples"):
        carry_back(torch.randn(1, 2, 4, 4), torch.full((1, 9, 6, 8), 1 / 9))
