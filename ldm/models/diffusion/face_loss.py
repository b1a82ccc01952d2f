"""The facial loss term of momentum textual inversion (docs/method.md, "Facial loss").

Total loss = L_simple(image) + lambda * L_simple(face crop): the aligned face crop of each training
photo is encoded (cached like the image latents), noised at the same timestep and denoised with the
same prompt, in the same batched UNet call as the main term (:mod:`ldm.models.diffusion.loss_terms`).
Photos with no face add no face term.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ldm.models.diffusion.gaussian_diffusion import GaussianDiffusion
from ldm.models.diffusion.latent_cache import batch_cache_keys, host_values
from ldm.models.diffusion.loss_terms import LatentEncoder, LossTerm, Rows, Step, batch_images
from ldm.util import to_device_nonblocking


@dataclass
class FaceBatch:
    """Latents of the face crops [F, C, h, w] and the batch rows they belong to [F]."""

    latents: torch.Tensor
    rows: torch.Tensor


class FacialLoss(LossTerm):
    """Adds ``weight * L_simple(face crop)`` to the latent-diffusion loss."""

    name = "face"

    def __init__(self, weight: float = 1.0, face_key: str = "face", has_face_key: str = "has_face"):
        if weight < 0:
            raise ValueError(f"facial loss weight must be >= 0, got {weight}")
        self.weight = float(weight)
        self.face_key = face_key
        self.has_face_key = has_face_key

    def face_latents(self, batch: Mapping[str, Any] | None, encode: LatentEncoder,
                    device: torch.device) -> FaceBatch | None:
        """Cached latents of the batch's face crops, or None when no photo in it has a face."""
        if batch is None or self.face_key not in batch:
            return None
        # flags on the host (ldm.data.datamodule.keep_on_host keeps them there): no GPU read
        rows = [i for i, has_face in enumerate(host_values(batch[self.has_face_key])) if has_face]
        if not rows:
            return None
        device_rows = to_device_nonblocking(torch.tensor(rows), device)
        crops = batch_images(batch, self.face_key).to(device)[device_rows]
        keys = batch_cache_keys(batch, "face")
        keys = [keys[i] for i in rows] if keys is not None else None
        return FaceBatch(latents=encode(crops, keys), rows=device_rows)

    def prepare(self, step: Step) -> FaceBatch | None:
        return self.face_latents(step.batch, step.encode, step.device)

    def rows(self, face: FaceBatch, cond: torch.Tensor, main: Rows | None, diffusion: GaussianDiffusion) -> Rows:
        """The face rows: each crop reuses its photo's prompt and timestep (from the image rows ``main``)."""
        return Rows(face.latents, main.cond[face.rows], main.t[face.rows])
