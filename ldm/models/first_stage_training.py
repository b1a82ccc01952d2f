"""Training a KL autoencoder with ``main.py``: reconstruction + KL loss (no LPIPS, no discriminator).

The original trained its first stages with ``LPIPSWithDiscriminator``, whose VGG weights cannot be
fetched offline; the toy world's autoencoder (``configs/toy/autoencoder.yaml``) uses an L1 + L2
reconstruction loss and a small KL weight instead. The autoencoder is held as ``first_stage_model``,
so a run's ``last.ckpt`` carries ``first_stage_model.*`` keys that ``AutoencoderKL(ckpt_path=...)``
and LatentDiffusion's ``first_stage_config`` read directly.
"""
from __future__ import annotations

from typing import Any, Mapping

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from ldm.lr_scheduler import lightning_optimizers
from ldm.util import instantiate_from_config


class FirstStageTraining(pl.LightningModule):
    """Trains ``autoencoder_config`` (an AutoencoderKL) on the ``image_key`` images of the data."""

    def __init__(self, autoencoder_config: Mapping[str, Any], kl_weight: float = 1e-6, l2_weight: float = 1.0,
                 image_key: str = "image", monitor: str | None = None,
                 scheduler_config: Mapping[str, Any] | None = None, learning_rate: float = 1e-4,
                 training_seed: int | None = None) -> None:
        super().__init__()
        self.first_stage_model = instantiate_from_config(autoencoder_config)
        self.kl_weight = kl_weight
        self.l2_weight = l2_weight
        self.image_key = image_key
        self.scheduler_config = scheduler_config
        self.learning_rate = learning_rate  # main.py sets it from base_learning_rate (ldm.train.training)
        self.training_seed = training_seed

    def losses(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its terms for images [B, 3, H, W] in [-1, 1] (KL summed per sample, as LDM)."""
        reconstruction, posterior = self.first_stage_model(images)
        l1 = F.l1_loss(reconstruction, images)
        l2 = F.mse_loss(reconstruction, images)
        kl = posterior.kl().mean()
        loss = l1 + self.l2_weight * l2 + self.kl_weight * kl
        return loss, {"train/rec_l1": l1.detach(), "train/rec_l2": l2.detach(), "train/kl": kl.detach(),
                      "train/loss": loss.detach()}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        images = self.first_stage_model.get_input(batch, self.image_key)
        loss, logs = self.losses(images)
        self.log_dict(logs, prog_bar=True, on_step=True, on_epoch=False, batch_size=images.shape[0])
        return loss

    def trainable_parameters(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.first_stage_model.parameters() if p.requires_grad],
                 "lr": self.learning_rate}]

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.trainable_parameters(), lr=self.learning_rate, betas=(0.9, 0.99))
        return lightning_optimizers(optimizer, self.scheduler_config)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, **_: Any) -> dict[str, torch.Tensor]:
        """Inputs and reconstructions, for the image logger."""
        images = self.first_stage_model.get_input(batch, self.image_key)[:N].to(self.device)
        reconstruction, _ = self.first_stage_model(images, sample_posterior=False)
        return {"inputs": images, "reconstruction": reconstruction.clamp(-1, 1)}
