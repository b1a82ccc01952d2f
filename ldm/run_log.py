"""What a training run tells its user: a step progress bar, metrics on disk for any run length, a summary.

- :class:`StepProgressBar`: the bar counts optimizer steps up to the run's last step
  (``max_steps``) instead of the batches of one epoch, and hides Lightning's ``v_num``.
- :class:`RunSummary`: at the end, writes the last step's ``train/*`` values to CSV and TensorBoard
  when Lightning's ``log_every_n_steps`` skipped that step (so a 3-step run has its metrics on disk),
  then logs one line: steps, time, it/s, final and lowest loss, the best embedding and the samples.
"""
from __future__ import annotations

import logging
import time

from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar

if TYPE_CHECKING:
    from ldm.validation.callback import ValidationSampler

logger = logging.getLogger(__name__)


class StepProgressBar(TQDMProgressBar):
    """Training progress as ``step/max_steps``, kept across epochs; no ``v_num``."""

    def on_train_epoch_start(self, trainer, *args):
        super().on_train_epoch_start(trainer, *args)
        total = trainer.estimated_stepping_batches
        bar = self.train_progress_bar
        bar.total = None if total == float("inf") else int(total)
        bar.n = trainer.global_step
        bar.set_description("Training step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = self.train_progress_bar
        if bar is None or bar.disable or not self._should_update(trainer.global_step, bar.total):
            return
        bar.n = trainer.global_step
        bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``1m15s``; ``3725`` -> ``1h02m05s``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02}m{secs:02}s" if hours else f"{minutes}m{secs:02}s" if minutes else f"{secs}s"


class RunSummary(pl.Callback):
    """Flushes the last step's metrics and logs the end-of-run line (see the module docstring).

    ``validation`` adds the best embedding and where the samples are; place this callback after it,
    so that its final validation has run.
    """

    def __init__(self, validation: ValidationSampler | None = None):
        self.validation = validation
        self._started = 0.0
        self._first_step = 0
        self._losses: list[tuple[int, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        self._started = time.perf_counter()
        self._first_step = trainer.global_step
        self._losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._losses.append((trainer.global_step, loss.detach()))  # no host sync inside the loop

    def on_train_end(self, trainer, pl_module):
        self.flush_last_step(trainer)
        if trainer.is_global_zero:
            logger.info("%s", self.summary(trainer))

    @staticmethod
    def flush_last_step(trainer) -> None:
        """Log the last step's ``train/*`` values when ``log_every_n_steps`` skipped that step."""
        every = trainer.log_every_n_steps
        if not every or trainer.global_step == 0 or trainer.global_step % every == 0 or trainer.should_stop:
            return  # Lightning logged the last step itself
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        if not metrics:
            return
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step - 1)  # Lightning's step of the N-th batch is N - 1
            lg.save()

    def summary(self, trainer) -> str:
        elapsed = time.perf_counter() - self._started
        steps = trainer.global_step - self._first_step
        parts = [f"Training done: {steps} steps (to step {trainer.global_step}) in {format_duration(elapsed)} "
                 f"({steps / elapsed if elapsed > 0 else 0.0:.2f} it/s)"]
        if self._losses:
            values = torch.stack([loss.float().cpu() for _, loss in self._losses])
            lowest = int(values.argmin())
            parts.append(f"loss final {float(values[-1]):.4f}, lowest {float(values[lowest]):.4f} "
                         f"(step {self._losses[lowest][0]})")
        if self.validation is not None:
            parts.append(self.validation.describe())
        return "; ".join(parts)
