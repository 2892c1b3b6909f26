"""Training frameworks: the Lightning callback and the TensorBoard writer log what the monitor
measures, and the training stays bit-identical (docs/method.md §2, 4)."""

from __future__ import annotations

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

import layerlie as ll
from layerlie.integrations.lightning import LieMonitor

GROUPS = ["translate_x", "rotate"]


class Net(nn.Module):
    """A strided conv, BatchNorm and dropout: the running statistics and the RNG both matter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x))).mean((2, 3))))


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = Net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def fit(tmp_path, callbacks: list, dtype: torch.dtype = torch.float32) -> tuple[Classifier, pl.Trainer]:
    """Six steps on shuffled batches (the sampler draws from the global RNG)."""
    torch.manual_seed(0)
    module = Classifier().to(dtype)
    data = TensorDataset(images(16).to(dtype), torch.arange(16) % 4)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path), callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1)
    trainer.fit(module, DataLoader(data, batch_size=4, shuffle=True))
    return module, trainer


def test_lightning_callback_logs_the_monitor_and_leaves_training_bit_identical(tmp_path):
    plain, _ = fit(tmp_path / "plain", [])
    callback = LieMonitor(images(2), GROUPS, every=2, layers=True, metrics=["eq_t"])
    watched, trainer = fit(tmp_path / "watched", [callback])
    a, b = plain.state_dict(), watched.state_dict()  # weights and BatchNorm running statistics
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    table = callback.monitor.table()
    assert list(table.step.unique()) == [0, 2, 4]
    logged = pd.read_csv(f"{trainer.logger.log_dir}/metrics.csv").set_index("step")
    for _, row in table.iterrows():
        g = row.group
        assert logged.loc[row.step, f"layerlie/lee/{g}"] == pytest.approx(row.lee, rel=1e-6)
        assert logged.loc[row.step, f"layerlie/share_conv/{g}"] == pytest.approx(row.share_conv, rel=1e-6)
        assert logged.loc[row.step, "layerlie/eq_t"] == pytest.approx(row.eq_t, rel=1e-6)
    types = [f"layerlie/share_{t.replace('/', '_').replace(' ', '_')}/rotate" for t in ll.list_layer_types()]
    assert set(types) < set(logged)
    # completeness: the logged shares of the types sum to one, within the logged check (docs/method.md §4)
    sums = logged[types].dropna().sum(axis=1)
    assert ((sums - 1).abs() <= logged["layerlie/share_residual/rotate"].dropna() + 1e-6).all()


def test_lightning_callback_follows_the_module_to_its_dtype(tmp_path):
    callback = LieMonitor(images(1), ["translate_x"], every=100, submodule="net")
    module, _ = fit(tmp_path, [callback], dtype=torch.float64)
    mon = callback.monitor
    assert mon.x.dtype == torch.float64 and mon.model is module.net and len(mon.table()) == 1
    with pytest.raises(ll.LayerlieError, match="submodule='body' is not in Classifier; its children are net"):
        fit(tmp_path, [LieMonitor(images(1), every=100, submodule="body")])


def test_monitor_writes_to_a_tensorboard_writer(tmp_path):
    torch.manual_seed(0)
    net = Net()
    mon = ll.Monitor(net, images(2), GROUPS, every=1, layers=True)
    mon.measure(0)  # before the writer: written when it is attached
    writer = SummaryWriter(tmp_path)
    mon.log_to(writer)
    for step in (1, 2):
        with torch.no_grad():
            net.conv.weight.mul_(1.5)  # stands in for a training step
        mon.step(step)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    table = mon.table()
    for g in GROUPS:
        read = {e.step: e.value for e in events.Scalars(f"layerlie/lee/{g}")}
        want = table[table.group == g].set_index("step").lee
        assert sorted(read) == [0, 1, 2] and read == pytest.approx(want.to_dict(), rel=1e-6)
        shares = {e.step: e.value for e in events.Scalars(f"layerlie/share_conv/{g}")}
        assert shares == pytest.approx(table[table.group == g].set_index("step").share_conv.to_dict(), rel=1e-6)
    assert len(set(table.lee)) == len(table)  # the weights moved: each step's values are its own
    with pytest.raises(ll.LayerlieError, match="log_to needs a writer with add_scalar"):
        mon.log_to(tmp_path)
    with pytest.raises(ll.LayerlieError, match=r"step 7 was not measured; measured steps: \[0, 1, 2\]"):
        mon.scalars(7)
