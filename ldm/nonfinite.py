"""Stop on a NaN/Inf loss without a host sync in every step, and without letting DDP hang.

Each step records on the device whether its loss is finite (:class:`NonFiniteLossTracker`), and an
update whose gradient is NaN/Inf is skipped on the device (the fused optimizer's ``found_inf``), so
the weights never take a NaN. The ranks agree whether any of them saw a non-finite loss every N steps,
at every checkpoint step, at each epoch end and at the end (:class:`NonFiniteLossStop`): one host
read and one all-reduce each time, at the same step on every rank. The run then stops, keeping its
last good weights.
"""
from __future__ import annotations

import logging
from typing import Callable

import pytorch_lightning as pl
import torch

logger = logging.getLogger(__name__)

DEFAULT_EVERY_N_STEPS = 50


FUSED_DEVICE_TYPES = ("cpu", "cuda")


def supports_fused_optimizer(groups: list[dict]) -> bool:
    """Whether every parameter of the optimizer groups can use the fused Adam/AdamW kernels."""
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(p.device.type in FUSED_DEVICE_TYPES and p.is_floating_point() for p in params)


def raw_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer behind Lightning's ``LightningOptimizer`` wrapper (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Fused Adam/AdamW read ``found_inf`` and skip the whole update on the device when it is set."""
    return bool(optimizer.defaults.get("fused"))


class NonFiniteLossTracker:
    """Device-side record of non-finite losses: nothing is read on the host until :meth:`agree`."""

    def __init__(self) -> None:
        self.first_step: torch.Tensor | None = None  # int64: the first step with a non-finite loss, or -1
        self.first_value: torch.Tensor | None = None  # that loss

    def record(self, loss: torch.Tensor, step: int) -> None:
        """Note whether ``loss`` (of training step ``step``) is finite."""
        loss = loss.detach().float()
        bad = ~torch.isfinite(loss)
        if self.first_step is None:
            self.first_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self.first_value = torch.zeros((), device=loss.device)
        first = bad & (self.first_step < 0)
        self.first_step = torch.where(first, step, self.first_step)
        self.first_value = torch.where(first, loss, self.first_value)

    def skip_update_if_bad(self, optimizer) -> None:
        """Make the coming optimizer step change nothing if a gradient is NaN/Inf.

        The gradients decide, not this rank's loss: DDP has averaged them, so every rank takes the same
        decision and the replicas stay equal (a NaN loss on one rank makes every rank's gradient NaN).
        Fused optimizers skip on the device; any other optimizer needs a host read of the flag here.
        Only ``found_inf`` is set: a ``GradScaler`` (16-mixed) multiplies its scale into ``grad_scale`` when
        there is one, and replaces ``found_inf`` with its own check, which sees NaN/Inf too.
        """
        optimizer = raw_optimizer(optimizer)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        found_inf = (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).float()  # [] on the grads' device
        if skips_on_device(optimizer):
            optimizer.found_inf = found_inf
        elif bool(found_inf):
            optimizer.zero_grad(set_to_none=True)

    def agree(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> bool:
        """Whether any rank recorded a non-finite loss; ``reduce_sum`` sums a tensor on ``device`` over the ranks.

        Every rank must call this at the same step (it is a collective in DDP); the one host read is here.
        """
        if self.first_step is None:
            local = torch.zeros((), dtype=torch.long, device=device)
        else:
            local = (self.first_step >= 0).long()
        return bool(reduce_sum(local).item() > 0)

    def first(self) -> tuple[int, float] | None:
        """(step, loss) of this rank's first non-finite loss, or None (reads the device: call after agree)."""
        if self.first_step is None or int(self.first_step) < 0:
            return None
        return int(self.first_step), float(self.first_value)


class NonFiniteLossStop(pl.Callback):
    """Agrees across ranks on non-finite losses every ``every_n_train_steps`` and at every checkpoint step,
    and stops the run when there was one. Place it before the callbacks that save."""

    def __init__(self, every_n_train_steps: int = DEFAULT_EVERY_N_STEPS, save_every_n_train_steps: int = 0):
        if every_n_train_steps < 1:
            raise ValueError(f"the non-finite loss check interval must be at least 1 step, got {every_n_train_steps}")
        self.every_n_train_steps = every_n_train_steps
        self.save_every_n_train_steps = save_every_n_train_steps

    def _due(self, step: int) -> bool:
        saves = self.save_every_n_train_steps
        return step % self.every_n_train_steps == 0 or bool(saves and step % saves == 0)

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tracker = getattr(pl_module, "nonfinite", None)
        if tracker is None or getattr(pl_module, "stopped_on_nonfinite_loss", False):
            return
        if not tracker.agree(lambda t: trainer.strategy.reduce(t, reduce_op="sum"), pl_module.device):
            return
        first = tracker.first()
        if first is None:
            logger.error("A loss was NaN/Inf on another rank: stopping at step %d; the last good weights are kept.",
                         trainer.global_step)
        else:
            logger.error("Loss is %s at step %d on this rank (not finite on at least one): stopping at step %d; "
                         "steps with a NaN/Inf loss changed no weight, the last good ones are kept.",
                         first[1], first[0], trainer.global_step)
        pl_module.stopped_on_nonfinite_loss = True
        trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._due(trainer.global_step):
            self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._check(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._check(trainer, pl_module)
