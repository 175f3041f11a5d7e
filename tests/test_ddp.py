"""Distributed training is real: 2-process DDP on the CPU (gloo) equals one process with the same
global batch."""

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from clusterformer.tasks import ClassificationTask


class FixedData(L.LightningDataModule):
    def __init__(self, batch_size: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(48, 3, 32, 32, generator=g)
        self.labels = torch.randint(0, 4, (48,), generator=g)
        self.batch_size = batch_size

    def train_dataloader(self):
        # No shuffling (Lightning's own sampler always shuffles the training set, so it is turned off):
        # rank r gets the items r, r + 2, ..., and each pair of per-rank batches holds exactly the items
        # of one single-process batch.
        dataset = TensorDataset(self.images, self.labels)
        sampler = DistributedSampler(dataset, shuffle=False) if torch.distributed.is_initialized() else None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, shuffle=False)


class SGDTask(ClassificationTask):
    """Plain SGD: its update is linear in the gradient, so the weights must agree to rounding. (AdamW
    divides by the root of the squared gradient, which turns rounding noise in near-zero gradients
    into full-size steps of either sign.) The step is one at which the loss falls (1.37 -> 0.83 in 3 steps) and the
    two runs stay within the tolerance: with the classifier on the cluster centers, at lr 0.02 the all-reduce's
    rounding grows past it in 3 steps, and at lr 0.1 the nano model diverges."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def train(devices: int, tmp_path, task_class=ClassificationTask) -> ClassificationTask:
    L.seed_everything(0, verbose=False)
    task = task_class(
        "clusterformer_nano", num_classes=4, model_kwargs=dict(center_grid=4), warmup_epochs=0, label_smoothing=0.0
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        use_distributed_sampler=False,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(task, FixedData(batch_size=16 // devices))
    return task


def full_loss(task) -> torch.Tensor:
    data = FixedData(48)
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(task.eval()(data.images), data.labels)


def test_two_process_ddp_matches_one_process(tmp_path):
    single = train(1, tmp_path / "single", SGDTask)
    ddp = train(2, tmp_path / "ddp", SGDTask)
    fresh = SGDTask("clusterformer_nano", num_classes=4, model_kwargs=dict(center_grid=4))
    assert not torch.allclose(fresh.model.head.weight, single.model.head.weight)  # training did something
    assert full_loss(single) < 0.8 * full_loss(fresh)  # and it learnt
    for (name, a), b in zip(single.state_dict().items(), ddp.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(full_loss(single), full_loss(ddp))


def test_two_process_ddp_with_adamw_reaches_the_same_loss(tmp_path):
    single, ddp = train(1, tmp_path / "single"), train(2, tmp_path / "ddp")
    torch.testing.assert_close(full_loss(single), full_loss(ddp), rtol=1e-3, atol=1e-4)
