"""Our side of the training rows: one step as ``main.py`` runs it, without Lightning's loop around it.

A step is what Lightning calls per batch: the loss of ``shared_step`` (recorded by the NaN guard),
backward, the guard's ``on_before_optimizer_step`` (which may skip the update on the device), the
model's ``optimizer_step`` (the fused AdamW step, then the embedding's norm bound and moving average
when they are on) and ``zero_grad``. The batch sits on the device with its indices and flags on the
host, as Lightning hands it over; no step reads a value back (``timed`` synchronizes).
"""
from __future__ import annotations

from typing import Any

import torch

from ldm.data.datamodule import HOST_BATCH_KEYS, keep_on_host
from ldm.nonfinite import supports_fused_optimizer
from .measure import tensor_bytes


def optimizer_and_cache_bytes(optimizer: torch.optim.Optimizer, cache, latent_numel: int) -> int:
    """What our step keeps between steps: optimizer state plus the cached posteriors (mean and
    log-variance per latent, fp32)."""
    return tensor_bytes(optimizer.state_dict()["state"]) + len(cache) * 2 * latent_numel * 4


def on_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch as Lightning passes it to ``training_step``: tensors on the device, indices and flags on the host."""
    batch = keep_on_host(dict(batch))
    return {k: v.to(device) if isinstance(v, torch.Tensor) and k not in HOST_BATCH_KEYS else v
            for k, v in batch.items()}


class OursStep:
    """One training step of our LatentDiffusion on a fixed batch; ``model.learning_rate`` must be set."""

    def __init__(self, model, batch: dict[str, Any], latent_numel: int, weight_decay: float = 1e-2):
        self.model = model.train()
        self.model.latent_cache.clear()  # the warm-up step fills it; the timed steps hit it
        self.batch = on_device(batch, model.device)
        groups = self.model.trainable_parameters()
        self.optimizer = torch.optim.AdamW(groups, lr=model.learning_rate, weight_decay=weight_decay,
                                           fused=supports_fused_optimizer(groups))
        self.latent_numel = latent_numel

    def __call__(self) -> torch.Tensor:
        loss, _ = self.model.shared_step(self.batch)
        self.model.nonfinite.record(loss, 0)
        loss.backward()
        self.model.on_before_optimizer_step(self.optimizer)
        self.model.optimizer_step(0, 0, self.optimizer)  # the model's hook: the step, then the embedding's own
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def persistent_bytes(self) -> int:
        return optimizer_and_cache_bytes(self.optimizer, self.model.latent_cache, self.latent_numel)

    def release(self) -> None:
        self.optimizer.state.clear()
        self.model.latent_cache.clear()
        self.model.eval()


def ti_batch(batch_size: int, size: int, prompt: str, face: bool) -> dict[str, Any]:
    """A personalization batch as the dataset collates it (images [B, H, W, 3] in [-1, 1])."""
    batch: dict[str, Any] = {
        "image": torch.rand(batch_size, size, size, 3) * 2 - 1,
        "caption": [prompt] * batch_size,
        "image_index": torch.arange(batch_size),
        "flipped": torch.zeros(batch_size, dtype=torch.bool),
    }
    if face:
        batch["face"] = torch.rand(batch_size, size, size, 3) * 2 - 1
        batch["has_face"] = torch.ones(batch_size, dtype=torch.bool)
    return batch


def dreambooth_batch(size: int, prompt: str, class_prompt: str) -> dict[str, Any]:
    """One collated item of ldm.data.dreambooth.DreamBoothDataset: a subject image and a class image."""
    return {
        "image": torch.rand(1, size, size, 3) * 2 - 1,
        "caption": [prompt],
        "image_index": torch.tensor([0]),
        "flipped": torch.zeros(1, dtype=torch.bool),
        "class_image": torch.rand(1, size, size, 3) * 2 - 1,
        "class_caption": [class_prompt],
        "class_image_index": torch.tensor([0]),
        "class_flipped": torch.zeros(1, dtype=torch.bool),
    }
