"""Cache of frozen-VAE posteriors for the few training images of a personalization run.

The first stage is frozen, so the posterior N(mean, exp(logvar)) of each training image (and of its flip
and face crop) never changes: it is computed once and each step draws a fresh sample from it,
which is the same distribution as encoding every step at a fraction of the cost.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Mapping, Sequence

import torch

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

CacheKey = tuple[Hashable, ...]


def batch_cache_keys(batch: Mapping[str, Any], kind: str) -> list[CacheKey] | None:
    """Keys ``(kind, image_index, flipped)`` for a batch from a personalization dataset, else None."""
    if "image_index" not in batch or "flipped" not in batch:
        return None
    indices, flipped = host_values(batch["image_index"]), host_values(batch["flipped"])
    return [(kind, int(i), bool(f)) for i, f in zip(indices, flipped)]


def host_values(values) -> list:
    """A batch entry of indices or flags as a list (read from a tensor only when it is one)."""
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


class LatentCache:
    """Maps a key to the (mean, logvar) of its posterior; misses are encoded in one batched call."""

    def __init__(self) -> None:
        self._mean: dict[CacheKey, torch.Tensor] = {}
        self._logvar: dict[CacheKey, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._mean)

    def clear(self) -> None:
        self._mean.clear()
        self._logvar.clear()

    def posterior(
        self,
        keys: Sequence[CacheKey],
        images: torch.Tensor,
        encode: Callable[[torch.Tensor], DiagonalGaussianDistribution],
    ) -> DiagonalGaussianDistribution:
        """Posterior of each image [B, 3, H, W], encoding only those whose key is not cached."""
        if len(keys) != images.shape[0]:
            raise ValueError(f"{len(keys)} cache keys for a batch of {images.shape[0]} images")
        missing = [i for i, key in enumerate(keys) if key not in self._mean]
        if missing:
            fresh = encode(images[missing])
            for row, i in enumerate(missing):
                self._mean[keys[i]] = fresh.mean[row].detach().float()
                self._logvar[keys[i]] = fresh.logvar[row].detach().float()
        mean = torch.stack([self._mean[k] for k in keys]).to(images.device)
        logvar = torch.stack([self._logvar[k] for k in keys]).to(images.device)
        # DiagonalGaussianDistribution takes mean and logvar concatenated on channels: [B, 2C, h, w]
        return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
