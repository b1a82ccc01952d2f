"""DreamBooth's class-specific prior-preservation loss (Ruiz et al. 2023, eq. 2).

    L = E ||eps - eps_theta(z_t, t, c_subject)||^2 + lambda E ||eps' - eps_theta(z'_t', t', c_class)||^2

where z' are latents of class images the base model generated from ``a photo of a <class_word>``
and c_class is that prompt. The class rows are denoised in the same batched UNet call as the
subject rows (:mod:`ldm.models.diffusion.loss_terms`); their latents are cached under the kind
``"class"``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ldm.data.dreambooth import CLASS_PREFIX
from ldm.models.diffusion.gaussian_diffusion import GaussianDiffusion
from ldm.models.diffusion.latent_cache import batch_cache_keys
from ldm.models.diffusion.loss_terms import LatentEncoder, LossTerm, Rows, Step, batch_images


@dataclass
class PriorBatch:
    """Latents of a batch's class images [P, C, h, w] and their prompts."""

    latents: torch.Tensor
    captions: list[str]


class PriorPreservationLoss(LossTerm):
    """Adds ``weight * L_simple(class images)`` to the latent-diffusion loss."""

    name = "prior"

    def __init__(self, weight: float = 1.0, prefix: str = CLASS_PREFIX):
        if weight <= 0:
            raise ValueError(f"prior_loss_weight must be > 0, got {weight} (drop --reg_data_root to turn "
                             "prior preservation off)")
        self.weight = float(weight)
        self.prefix = prefix

    def class_batch(self, batch: Mapping[str, Any], encode: LatentEncoder,
                    device: torch.device) -> PriorBatch:
        """Cached latents and prompts of the class images a DreamBooth batch carries."""
        image_key, caption_key = self.prefix + "image", self.prefix + "caption"
        if image_key not in batch:
            raise ValueError(f"prior preservation is on but the batch has no '{image_key}': use "
                             "ldm.data.dreambooth.DreamBoothDataset with reg_data_root (--reg_data_root)")
        images = batch_images(batch, image_key).to(device)
        index_key, flipped_key = self.prefix + "image_index", self.prefix + "flipped"
        keys = (batch_cache_keys({"image_index": batch[index_key], "flipped": batch[flipped_key]}, "class")
                if index_key in batch and flipped_key in batch else None)
        return PriorBatch(latents=encode(images, keys), captions=list(batch[caption_key]))

    def prepare(self, step: Step) -> PriorBatch | None:
        """The class batch; None without a batch (latents handed in directly carry no class images)."""
        return None if step.batch is None else self.class_batch(step.batch, step.encode, step.device)

    def prompts(self, prior: PriorBatch) -> list:
        return prior.captions

    def rows(self, prior: PriorBatch, cond: torch.Tensor, main: Rows | None, diffusion: GaussianDiffusion) -> Rows:
        """The class rows, with their own timesteps."""
        return Rows(prior.latents, cond, diffusion.sample_timesteps(prior.latents.shape[0]))
