"""The clustering clusters: distinct centers at initialisation, sharper assignments after a little training,
and the statistics that ``clusterformer explain`` reports (docs/architecture.md, "Does it cluster?")."""

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import clusterformer  # noqa: F401  (registers the models)
from clusterformer.layers import RecurrentClustering
from clusterformer.layers.clustering import cluster_statistics

pytestmark = pytest.mark.usefixtures("one_thread")
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def coffee(size=224):
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.coffee()).resize((size, size), Image.BICUBIC)
    return ((torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - MEAN) / STD)[None]


def stage_statistics(model, images):
    stats = []
    for stage in model.forward_clusters(images):
        per_image = [cluster_statistics(a, c) for a, c in zip(stage["assignments"], stage["centers"], strict=True)]
        stats.append({key: float(np.mean([s[key] for s in per_image])) for key in ("clusters_used",
                      "mean_max_assignment", "center_cosine")})  # fmt: skip
    return stats


def test_statistics_against_their_definitions():
    g = torch.Generator().manual_seed(0)
    assignments = torch.softmax(torch.randn(2, 5, 3, 4, generator=g) * 3, dim=1)  # (heads, K, h, w)
    centers = torch.randn(2, 5, 6, generator=g)
    stats = cluster_statistics(assignments, centers)
    used = [len({int(assignments[h, :, y, x].argmax()) for y in range(3) for x in range(4)}) for h in range(2)]
    assert stats["clusters_used_per_head"] == used and stats["clusters_used"] == pytest.approx(sum(used) / 2)
    assert stats["mean_max_assignment"] == pytest.approx(float(assignments.max(1).values.mean()))
    cosines = [float(F.cosine_similarity(centers[h, i], centers[h, j], dim=0))
               for h in range(2) for i in range(5) for j in range(5) if i != j]  # fmt: skip
    assert stats["center_cosine"] == pytest.approx(np.mean(cosines), abs=1e-6)
    # identical centers and a uniform assignment: what a collapsed clustering reports
    collapsed = cluster_statistics(torch.full((1, 4, 2, 2), 0.25), torch.ones(1, 4, 3))
    assert collapsed["mean_max_assignment"] == pytest.approx(0.25) and collapsed["center_cosine"] == pytest.approx(1)


def test_em_clustering_starts_as_kmeans_in_the_value_space():
    model = timm.create_model("clusterformer_nano", num_classes=0)
    for module in model.modules():
        if isinstance(module, RecurrentClustering):
            torch.testing.assert_close(module.q.weight, torch.eye(module.head_dim))
            torch.testing.assert_close(module.k.weight, module.v.weight)
    literal = timm.create_model("clusterformer_nano", num_classes=0, m_step="sum")
    q = literal.stages[0].blocks[0].clustering.q.weight
    assert not torch.allclose(q, torch.eye(q.shape[0]))


def test_random_tiny_centers_are_distinct_on_a_photograph():
    """ClusterFormer-T with random weights on the coffee photograph: in every stage the last block's centers
    are not one direction (the literal Algorithm 1 makes them identical: cosine 1.000)."""
    torch.manual_seed(0)
    image = coffee()
    with torch.no_grad():
        stats = stage_statistics(timm.create_model("clusterformer_tiny", num_classes=0).eval(), image)
        literal = stage_statistics(timm.create_model("clusterformer_tiny", num_classes=0, m_step="sum").eval(), image)
    assert all(s["center_cosine"] < 0.95 for s in stats), stats
    assert all(s["mean_max_assignment"] > 2 / 100 for s in stats), stats
    assert all(s["center_cosine"] > 0.99 for s in literal[1:]), literal


def train_steps(model, crops, labels, steps=25):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    model.train()
    for step in range(steps):
        index = torch.arange(step * 16, (step + 1) * 16) % len(crops)
        loss = F.cross_entropy(model(crops[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_short_training_on_shapes_sharpens_the_assignments(shapes_dir):
    """25 optimizer steps of the shapes classifier (32 px crops), measured on 64 px validation scenes: the
    assignments stay above uniform and the centers distinct; the literal form stays uniform."""
    from PIL import Image

    root = shapes_dir(0, 24, 4, 64)
    files = sorted((root / "imagefolder" / "train").glob("*/*.png"))
    classes = sorted({f.parent.name for f in files})

    def load(path, size):
        image = Image.open(path).convert("RGB").resize((size, size))
        return (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - MEAN) / STD

    crops = torch.stack([load(f, 32) for f in files])
    labels = torch.tensor([classes.index(f.parent.name) for f in files])
    scenes = torch.stack([load(f, 64) for f in sorted((root / "images" / "val").glob("*.png"))])
    results = {}
    for m_step in ("mean", "sum"):
        torch.manual_seed(0)
        model = timm.create_model("clusterformer_nano", num_classes=len(classes), m_step=m_step)
        with torch.no_grad():
            before = stage_statistics(model.eval(), scenes)
        train_steps(model, crops, labels)
        with torch.no_grad():
            results[m_step] = (before, stage_statistics(model, scenes))
    after = results["mean"][1]
    # every stage above uniform (1 / K = 0.01) after training, with distinct centers
    assert all(s["mean_max_assignment"] > 1.2 / 100 for s in after), after
    assert all(s["center_cosine"] < 0.9 for s in after), after
    # Algorithm 1 to the letter, trained the same way: uniform assignments, the same center everywhere
    assert all(s["mean_max_assignment"] < 1.1 / 100 for s in results["sum"][1]), results["sum"]
    assert results["sum"][1][0]["center_cosine"] > 0.99, results["sum"]
