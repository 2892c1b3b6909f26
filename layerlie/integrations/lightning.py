"""A Lightning callback that measures equivariance along a fit (docs/method.md §2, 4, 7).

:class:`LieMonitor` builds a :class:`layerlie.Monitor` when the fit starts, once Lightning has
put the module on its device, with the probe batch moved there; it measures every ``every``
optimizer steps, before the step's batch, and logs :meth:`layerlie.Monitor.scalars` (LEE per
group, and with ``layers`` the shares by layer type) to every logger of the trainer. As with
the monitor in a plain loop, the fit is bit-identical with and without it.

Example:
    >>> import torch, lightning.pytorch as pl
    >>> from layerlie.integrations.lightning import LieMonitor
    >>> callback = LieMonitor(torch.randn(2, 3, 32, 32), groups=["translate_x"], every=10, layers=True)
    >>> callback.monitor is None  # built at fit start: pl.Trainer(callbacks=[callback]).fit(module, data)
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from layerlie.core.groups import DEFAULT_GROUPS, Group
from layerlie.deprecation import renamed
from layerlie.measure.lie import check_images
from layerlie.integrations.monitor import Metrics, Monitor, MonitorError


class LieMonitor(pl.Callback):
    """Measure a LightningModule's equivariance on a probe batch along its fit (docs/method.md §2, 4, 7).

    Args:
        x: the probe images ``(B, C, H, W)``, normalized as the model expects, on any
            device and in any floating dtype: a copy goes to the module's at fit start.
        groups, every, layers, metrics, scheme, store, run: as for :class:`layerlie.Monitor`;
            the step is the trainer's ``global_step``.
        submodule: the attribute path of the network inside the LightningModule (``"net"``, or
            ``"backbone.model"``) when the module's own forward does not map images to logits.

    Attributes:
        monitor: the :class:`layerlie.Monitor` of the current fit (None before the first):
            ``callback.monitor.table()`` after ``trainer.fit``.
    """

    @renamed(x_probe="x")
    def __init__(self, x: torch.Tensor, groups: str | Group | Iterable[str | Group] = DEFAULT_GROUPS,
                 *, every: int = 50, layers: bool = False, metrics: Metrics = False, scheme: str = "central",
                 store: str | Path | None = None, run: str | None = None, submodule: str | None = None) -> None:
        super().__init__()
        check_images(x)
        self.x = x.detach().clone()
        self.groups, self.submodule = groups, submodule
        self.options = dict(every=every, layers=layers, metrics=metrics, scheme=scheme, store=store, run=run)
        self.monitor: Monitor | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the monitor on the module's device and in its dtype (docs/method.md §2)."""
        net = self._network(pl_module)
        param = next(iter(net.parameters()), None)
        device, dtype = (param.device, param.dtype) if param is not None else (pl_module.device, pl_module.dtype)
        self.monitor = Monitor(net, self.x.to(device=device, dtype=dtype), self.groups, **self.options)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object,
                             batch_idx: int) -> None:
        """Measure when the step is due, and log the measurement to the trainer's loggers."""
        step = trainer.global_step
        if self.monitor.step(step):
            scalars = self.monitor.scalars(step)
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)

    def _network(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.submodule is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.submodule)
        except AttributeError:
            children = [name for name, _ in pl_module.named_children()]
            raise MonitorError(f"submodule={self.submodule!r} is not in {type(pl_module).__name__}; its children "
                               f"are {', '.join(children) or 'none'}") from None
