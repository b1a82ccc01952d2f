"""The facial loss term of momentum textual inversion (DESIGN.md, "The method").

Total loss = L_simple(image) + lambda * L_simple(face crop): the aligned face crop of each training
photo is encoded (cached like the image latents), noised at the same timestep and denoised with the
same prompt, in the same batched UNet call as the main term. Photos with no face add no face term.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ldm.models.diffusion.latent_cache import batch_cache_keys


@dataclass
class FaceBatch:
    """Latents of the face crops [F, C, h, w] and the batch rows they belong to [F]."""

    latents: torch.Tensor
    rows: torch.Tensor


class FacialLoss:
    """Adds ``weight * L_simple(face crop)`` to the latent-diffusion loss."""

    def __init__(self, weight: float = 1.0, face_key: str = "face", has_face_key: str = "has_face"):
        if weight < 0:
            raise ValueError(f"facial loss weight must be >= 0, got {weight}")
        self.weight = float(weight)
        self.face_key = face_key
        self.has_face_key = has_face_key

    def face_latents(self, model, batch: Mapping[str, Any]) -> FaceBatch | None:
        """Cached latents of the batch's face crops, or None when no photo in it has a face."""
        if self.face_key not in batch:
            return None
        has_face = torch.as_tensor(batch[self.has_face_key]).bool().cpu()
        if not has_face.any():
            return None
        rows = has_face.nonzero().flatten()
        crops = model.batch_images(batch, self.face_key)[rows].to(model.device)
        keys = batch_cache_keys(batch, "face")
        keys = [keys[i] for i in rows.tolist()] if keys is not None else None
        return FaceBatch(latents=model.encode_to_latents(crops, keys), rows=rows.to(model.device))

    def losses(self, model, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, face: FaceBatch, prefix: str,
               noise: torch.Tensor | None = None):
        """Main and face terms from one UNet call on the concatenated batch: ``(loss, loss_dict)``.

        ``noise`` [B + F, C, h, w] (optional) is the noise of the image rows followed by the face rows.
        """
        n = x.shape[0]
        # [B + F, C, h, w]: the face crops reuse their photo's prompt and timestep
        x_all = torch.cat([x, face.latents.to(x.dtype)])
        cond_all = torch.cat([cond, cond[face.rows]])
        t_all = torch.cat([t, t[face.rows]])
        weighted, vlb = model.per_sample_losses(x_all, cond_all, t_all, noise)
        loss, loss_dict = model.reduce_losses(weighted[:n], vlb[:n], prefix)
        face_loss, _ = model.reduce_losses(weighted[n:], vlb[n:], prefix)
        loss = loss + self.weight * face_loss
        loss_dict[f"{prefix}/loss_face"] = face_loss.detach()
        loss_dict[f"{prefix}/loss"] = loss.detach()
        return loss, loss_dict
