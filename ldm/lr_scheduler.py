"""Learning-rate multipliers used by the LDM/SD configs (``scheduler_config`` targets).

Each object is a callable ``step -> factor`` meant for ``torch.optim.lr_scheduler.LambdaLR``;
:func:`lightning_optimizers` wraps an optimizer with one for Lightning's ``configure_optimizers``.
"""
from __future__ import annotations

import bisect
import math
from typing import Any, Mapping, Sequence

import torch

from ldm.util import instantiate_from_config


def lightning_optimizers(optimizer: torch.optim.Optimizer, scheduler_config: Mapping[str, Any] | None):
    """``optimizer`` alone, or with the per-step LambdaLR of ``scheduler_config``, as Lightning takes them."""
    if scheduler_config is None:
        return optimizer
    schedule = instantiate_from_config(scheduler_config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)
    return [optimizer], [{"scheduler": scheduler, "interval": "step", "frequency": 1}]


class LambdaWarmUpCosineScheduler:
    """Linear warm-up from ``lr_start`` to ``lr_max``, then cosine decay to ``lr_min``."""

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float,
                 max_decay_steps: int, verbosity_interval: int = 0):
        self.warm_up_steps = warm_up_steps
        self.lr_min, self.lr_max, self.lr_start = lr_min, lr_max, lr_start
        self.max_decay_steps = max_decay_steps

    def __call__(self, step: int) -> float:
        if step < self.warm_up_steps:
            return (self.lr_max - self.lr_start) / self.warm_up_steps * step + self.lr_start
        progress = min((step - self.warm_up_steps) / (self.max_decay_steps - self.warm_up_steps), 1.0)
        return self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + math.cos(progress * math.pi))


class LambdaLinearScheduler:
    """Repeating cycles of linear warm-up (``f_start`` to ``f_max``) then linear decay to ``f_min``."""

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[int], verbosity_interval: int = 0):
        lengths = {len(warm_up_steps), len(f_min), len(f_max), len(f_start), len(cycle_lengths)}
        if len(lengths) != 1:
            raise ValueError("LambdaLinearScheduler: warm_up_steps, f_min, f_max, f_start and "
                             "cycle_lengths must all have the same length")
        self.warm_up_steps = list(warm_up_steps)
        self.f_min, self.f_max, self.f_start = list(f_min), list(f_max), list(f_start)
        self.cycle_lengths = list(cycle_lengths)
        self.cycle_ends = [sum(self.cycle_lengths[: i + 1]) for i in range(len(self.cycle_lengths))]

    def __call__(self, step: int) -> float:
        cycle = min(bisect.bisect_right(self.cycle_ends, step), len(self.cycle_ends) - 1)
        step -= self.cycle_ends[cycle - 1] if cycle > 0 else 0
        if step < self.warm_up_steps[cycle]:
            slope = (self.f_max[cycle] - self.f_start[cycle]) / self.warm_up_steps[cycle]
            return self.f_start[cycle] + slope * step
        remaining = (self.cycle_lengths[cycle] - step) / self.cycle_lengths[cycle]
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * remaining
