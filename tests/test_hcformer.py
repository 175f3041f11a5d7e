"""HCFormer's hierarchical clustering pixel path: Eq. 3 and Eq. 5 against slow loops, borders and odd sizes,
the module's shapes on a real backbone, gradients and torch.export."""

import math
import os

import pytest
import timm
import torch
import torch.nn.functional as F

import clusterformer  # noqa: F401
from clusterformer.heads import ClusteringDecoder
from clusterformer.heads.hcformer import (
    MIN_SCALE,
    HCFormerPixelPath,
    carry_back,
    carry_back_through,
    local_cluster_assignment,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NANO_CHANNELS = (32, 64, 128, 256)


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


@pytest.fixture(scope="module")
def nano_features():
    """A real clusterformer_nano's dense features of a 64 x 64 and of a 72 x 88 image (odd maps at strides 8-32)."""
    torch.manual_seed(0)
    backbone = timm.create_model("clusterformer_nano").eval()
    with torch.no_grad():
        return {hw: backbone.forward_dense(torch.randn(2, 3, *hw))[0] for hw in ((64, 64), (72, 88))}


@pytest.mark.parametrize("hw", [(64, 64), (72, 88)])
def test_pixel_path_shapes_on_the_nano_backbone(nano_features, hw):
    features = nano_features[hw]
    stride4, stride32 = features[0].shape[-2:], features[-1].shape[-2:]
    path = HCFormerPixelPath(NANO_CHANNELS, dim=32, mask_dim=16)
    mask_features, levels = path(features)
    assert mask_features.shape == (2, 16, *stride4)
    assert [tuple(level.shape) for level in levels] == [(2, 32, *stride32)] * 3  # the paper: stride 32 only
    assert [a.shape for a in path.assignments(features)] == [(2, 9, *f.shape[-2:]) for f in features[:3]]

    carried = HCFormerPixelPath(NANO_CHANNELS, dim=32, mask_dim=16, decoder_levels="carried")
    mask_features, levels = carried(features)
    assert mask_features.shape == (2, 16, *stride4)
    assert [tuple(level.shape) for level in levels] == [(2, 32, *f.shape[-2:]) for f in features[:0:-1]]

    boxes_only = HCFormerPixelPath(NANO_CHANNELS, dim=32, mask_dim=None)
    mask_features, levels, assignments = boxes_only.forward_with_assignments(features)
    assert mask_features is None and assignments is None and len(levels) == 3


def test_mask_logits_are_the_stride32_logits_carried_back(float64, nano_features):
    """einsum(E_mask, mask_features) at stride 4 = Eq. 4's logits on the cluster features (stride 32) carried
    back by Eq. 5: the decoding is linear, so carrying back the features or the logits is the same."""
    torch.manual_seed(0)
    features = [f.double() for f in nano_features[(72, 88)]]
    path = HCFormerPixelPath(NANO_CHANNELS, dim=32, mask_dim=16)
    mask_features, _, assignments = path.forward_with_assignments(features)
    mask_embed = torch.randn(2, 5, 16)
    logits32 = torch.einsum("bqe,behw->bqhw", mask_embed, path.cluster_embedding(features[-1]))
    expected = torch.einsum("bqe,behw->bqhw", mask_embed, mask_features)
    torch.testing.assert_close(carry_back_through(logits32, assignments), expected)


def test_gradients_reach_the_scales_and_every_projection(nano_features):
    torch.manual_seed(0)
    path = HCFormerPixelPath(NANO_CHANNELS, dim=32, mask_dim=16)
    mask_features, levels = path(nano_features[(72, 88)])
    (mask_features.square().mean() + levels[0].square().mean()).backward()  # no regularisation: Eq. 3-5 alone
    for name, parameter in path.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert (path.scales.grad != 0).all()  # every level's scale


def test_regularization_is_the_sum_of_the_absolute_scales():
    path = HCFormerPixelPath(NANO_CHANNELS, dim=32, mask_dim=16)
    torch.testing.assert_close(path.scales.detach(), torch.full((3,), 0.1))
    with torch.no_grad():
        path.scales.copy_(torch.tensor([0.2, -0.5, 0.05]))
    assert path.regularization().item() == pytest.approx(0.75)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="decoder_levels"):
        HCFormerPixelPath(NANO_CHANNELS, decoder_levels="fpn")
    with pytest.raises(ValueError, match="four backbone maps"):
        HCFormerPixelPath(NANO_CHANNELS[1:])
    with pytest.raises(ValueError, match="odd"):
        HCFormerPixelPath(NANO_CHANNELS, window=4)


@pytest.mark.parametrize(
    "decoder_levels, masked_attention", [("cluster", False), ("carried", False), ("carried", True)]
)
def test_the_clustering_decoder_runs_on_the_pixel_path(nano_features, decoder_levels, masked_attention):
    """In place of the FPN (``decoder.pixel_decoder``) the decoder's layers cluster the path's levels, with masked
    attention too, and the masks come out at stride 4."""
    torch.manual_seed(0)
    features = nano_features[(72, 88)]
    decoder = ClusteringDecoder(
        NANO_CHANNELS, center_dim=12, num_centers=6, num_queries=6, dim=32, mask_dim=16, num_heads=4, ffn_dim=64,
        masked_attention=masked_attention,
    )  # fmt: skip
    decoder.pixel_decoder = HCFormerPixelPath(NANO_CHANNELS, dim=32, mask_dim=16, decoder_levels=decoder_levels)
    embed = torch.nn.Linear(32, 16)
    seen = []

    def predict(state, mask_features, assignments, hw):
        if hw is not None:
            seen.append(hw)
        return {"masks": torch.einsum("bqe,behw->bqhw", embed(state), mask_features)}

    states, mask_features = decoder(features, torch.randn(2, 6, 12), predict)
    assert len(states) == 6 and mask_features.shape == (2, 16, 18, 22)
    expected = [(3, 3)] * 3 if decoder_levels == "cluster" else [(3, 3), (5, 6), (9, 11)]
    assert seen == expected * 2


def test_torch_export_of_the_pixel_path(nano_features):
    """Exported at a tiny size, the program computes what the module does."""
    torch.manual_seed(0)
    path = HCFormerPixelPath(NANO_CHANNELS, dim=32, mask_dim=16, decoder_levels="carried").eval()
    features = list(nano_features[(72, 88)])
    program = torch.export.export(path, (features,))
    exported_masks, exported_levels = program.module()(features)
    masks, levels = path(features)
    torch.testing.assert_close(exported_masks, masks)
    for exported, eager in zip(exported_levels, levels, strict=True):
        torch.testing.assert_close(exported, eager)


class Pyramid(torch.nn.Module):
    """The pixel path on a cheap stand-in for the backbone with its size arithmetic (each map ``ceil(h/2) x
    ceil(w/2)`` of the previous one), from a stride-4 map ``(B, 32, h, w)``; returns a flat tuple."""

    def __init__(self, path):
        super().__init__()
        pairs = zip(NANO_CHANNELS[:-1], NANO_CHANNELS[1:], strict=True)
        self.widen = torch.nn.ModuleList(torch.nn.Conv2d(a, b, 1) for a, b in pairs)
        self.path = path

    def forward(self, stride4):
        features = [stride4]
        for widen in self.widen:
            h, w = features[-1].shape[-2:]  # padded bottom/right to even sizes, as the backbone's PatchMerging
            padded = F.pad(features[-1], (0, 2 * ((w + 1) // 2) - w, 0, 2 * ((h + 1) // 2) - h))
            features.append(widen(F.avg_pool2d(padded, 2)))
        masks, levels = self.path(features)
        return (masks, *levels)


def test_exported_pixel_path_follows_the_input_size():
    """Height, width and batch stay dynamic in the exported program: it matches the module at odd sizes other
    than the example's."""
    from torch.export import Dim

    torch.manual_seed(0)
    model = Pyramid(HCFormerPixelPath(NANO_CHANNELS, dim=32, mask_dim=16, decoder_levels="carried")).eval()
    dims = {0: Dim("batch", min=1), 2: Dim("height", min=16), 3: Dim("width", min=16)}
    program = torch.export.export(model, (torch.randn(2, 32, 16, 24),), dynamic_shapes=(dims,), strict=False)
    for shape in ((1, 32, 17, 21), (3, 32, 23, 16)):
        stride4 = torch.randn(shape)
        with torch.no_grad():
            for exported, eager in zip(program.module()(stride4), model(stride4), strict=True):
                torch.testing.assert_close(exported, eager)


def test_onnx_export_of_the_pixel_path_runs_in_onnxruntime(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = Pyramid(HCFormerPixelPath(NANO_CHANNELS, dim=32, mask_dim=16, decoder_levels="carried")).eval()
    names = ["mask_features", "level32", "level16", "level8"]
    axes = {name: {0: "batch", 2: f"height_{name}", 3: f"width_{name}"} for name in ["stride4", *names]}
    path = tmp_path / "pixel_path.onnx"
    torch.onnx.export(
        model, (torch.randn(2, 32, 16, 24),), str(path), input_names=["stride4"], output_names=names,
        dynamic_axes=axes, opset_version=18, dynamo=False,
    )  # fmt: skip
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    stride4 = torch.randn(1, 32, 17, 21)
    with torch.no_grad():
        expected = model(stride4)
    for ran, eager in zip(session.run(None, {"stride4": stride4.numpy()}), expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(ran), eager, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not os.environ.get("CLUSTERFORMER_SLOW_TESTS"), reason="about 20 s; CLUSTERFORMER_SLOW_TESTS=1")
def test_nano_backbone_and_pixel_path_export_with_dynamic_image_size():
    """As ``clusterformer export`` traces dense models (non-strict, images from 64 pixels): the backbone's odd
    maps reach the pixel path as symbolic sizes."""
    from torch.export import Dim

    torch.manual_seed(0)

    class Dense(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = timm.create_model("clusterformer_nano")
            self.path = HCFormerPixelPath(NANO_CHANNELS, dim=32, mask_dim=16, decoder_levels="carried")

        def forward(self, images):
            masks, levels = self.path(self.backbone.forward_dense(images)[0])
            return (masks, *levels)

    model = Dense().eval()
    dims = {0: Dim("batch", min=1), 2: Dim("height", min=64), 3: Dim("width", min=64)}
    program = torch.export.export(model, (torch.randn(2, 3, 64, 96),), dynamic_shapes=(dims,), strict=False)
    images = torch.randn(1, 3, 72, 88)
    with torch.no_grad():
        for exported, eager in zip(program.module()(images), model(images), strict=True):
            torch.testing.assert_close(exported, eager, atol=1e-5, rtol=1e-4)


def test_the_tasks_add_the_temperature_regularisation_to_the_loss():
    """``decoder.pixel_path: hcformer``: the training loss is the criterion's plus 0.1 x sum |s| (HCFormer's L_reg)."""
    from clusterformer.heads.denoising import target_boxes
    from clusterformer.tasks import SetTask

    torch.manual_seed(0)
    task = SetTask("instance", "clusterformer_nano", num_classes=3, loss={"num_points": 16},
                   decoder=dict(num_queries=5, dim=32, mask_dim=32, num_layers=2, num_heads=4, ffn_dim=64,
                                pixel_path="hcformer"))  # fmt: skip
    assert type(task.model.decoder.pixel_decoder).__name__ == "HCFormerPixelPath"
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 4:30, 4:30], masks[1, 30:60, 20:50] = True, True
    targets = [{"labels": torch.tensor([0, 2]), "masks": masks, "boxes": target_boxes({"masks": masks})}] * 2
    torch.manual_seed(1)
    total, losses = task.training_loss(torch.randn(2, 3, 64, 64), targets)
    regularisation = task.model.decoder.pixel_decoder.regularization()
    torch.testing.assert_close(losses["loss_reg"], regularisation)
    criterion_total = task.criterion.weighted_total({k: v for k, v in losses.items() if k != "loss_reg"})
    torch.testing.assert_close(total, criterion_total + 0.1 * regularisation)
    total.backward()
    assert all(p.grad is not None for n, p in task.model.decoder.pixel_decoder.named_parameters() if "scale" in n)


def test_training_steps_lower_the_loss_of_a_model_on_the_pixel_path():
    """``decoder.pixel_path: hcformer``: a few steps of an instance model on one batch lower its loss."""
    from clusterformer.heads import build_set_model
    from clusterformer.heads.denoising import target_boxes
    from clusterformer.losses import SetLossSettings
    from clusterformer.tasks.sets import set_criterion
    from helpers import set_losses_over_steps

    torch.manual_seed(0)
    model = build_set_model("clusterformer_nano", num_classes=3, boxes=False, masks=True, num_queries=6, dim=32,
                            mask_dim=32, num_layers=3, num_heads=4, ffn_dim=64, pixel_path="hcformer")  # fmt: skip
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 4:30, 4:30], masks[1, 30:60, 20:50] = True, True
    targets = [{"labels": torch.tensor([0, 2]), "masks": masks, "boxes": target_boxes({"masks": masks})}] * 2
    criterion = set_criterion(3, False, True, SetLossSettings(num_points=64))
    model.train()
    values = set_losses_over_steps(model, criterion, torch.randn(2, 3, 64, 64), targets)
    assert values[-1] < values[0]
