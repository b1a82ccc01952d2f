"""Exponential moving average of a model's parameters, in the LDM checkpoint layout.

Buffers are named after the tracked parameter with the dots removed (``diffusion_model.out.0.weight``
becomes ``diffusion_modelout0weight``), plus ``decay`` and ``num_updates``, as in released SD files.
"""
from __future__ import annotations

import torch
from torch import nn


class LitEma(nn.Module):
    """EMA of the trainable parameters of ``model`` with LDM's warm-up: decay <= (1+n)/(10+n)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer(
            "num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int)
        )
        self.shadow_names: dict[str, str] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                shadow = name.replace(".", "")
                self.shadow_names[name] = shadow
                self.register_buffer(shadow, param.detach().clone())
        self.stored: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """Move every shadow parameter towards the model's current value."""
        decay = float(self.decay)
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = min(decay, (1 + int(self.num_updates)) / (10 + int(self.num_updates)))
        buffers = dict(self.named_buffers())
        for name, param in model.named_parameters():
            shadow_name = self.shadow_names.get(name)
            if shadow_name is not None and param.requires_grad:
                shadow = buffers[shadow_name]
                shadow.lerp_(param.detach().to(shadow.dtype), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged values into ``model``'s parameters."""
        buffers = dict(self.named_buffers())
        for name, param in model.named_parameters():
            shadow_name = self.shadow_names.get(name)
            if shadow_name is not None:
                param.copy_(buffers[shadow_name])

    def store(self, parameters) -> None:
        """Keep a copy of ``parameters`` so that :meth:`restore` can put them back."""
        self.stored = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters) -> None:
        """Put back the parameters saved by :meth:`store`."""
        for saved, param in zip(self.stored, parameters):
            param.copy_(saved)
        self.stored = []
