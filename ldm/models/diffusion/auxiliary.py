"""Extra loss terms that add rows to the one batched UNet call of a training step.

A term (the face crops of the facial loss, the class images of prior preservation) contributes
latents, conditioning and timesteps; all rows are noised with one draw and denoised in one call:

    L = L_simple(main rows) + sum_k weight_k * L_simple(rows of term k)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class AuxiliaryRows:
    """The rows one extra term adds: latents [A, C, h, w], conditioning [A, L, D], timesteps [A]."""

    name: str
    weight: float
    latents: torch.Tensor
    cond: torch.Tensor
    t: torch.Tensor


def batched_losses(model, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, terms: Sequence[AuxiliaryRows],
                   prefix: str, noise: torch.Tensor | None = None):
    """Main and extra terms from one denoiser call: ``(loss, loss_dict)``.

    ``noise`` [B + sum A_k, C, h, w] (optional) covers the main rows first, then each term's rows in order.
    """
    sizes = [x.shape[0], *(term.latents.shape[0] for term in terms)]
    # [B + sum A_k, ...]: every row of every term in one batch
    x_all = torch.cat([x, *(term.latents.to(x.dtype) for term in terms)])
    cond_all = torch.cat([cond, *(term.cond.to(cond.dtype) for term in terms)])
    t_all = torch.cat([t, *(term.t.to(t.device) for term in terms)])
    weighted, vlb = model.per_sample_losses(x_all, cond_all, t_all, noise)
    parts = list(zip(weighted.split(sizes), vlb.split(sizes)))
    loss, loss_dict = model.reduce_losses(*parts[0], prefix)
    for term, (term_weighted, term_vlb) in zip(terms, parts[1:]):
        term_loss, _ = model.reduce_losses(term_weighted, term_vlb, prefix)
        loss = loss + term.weight * term_loss
        loss_dict[f"{prefix}/loss_{term.name}"] = term_loss.detach()
    loss_dict[f"{prefix}/loss"] = loss.detach()
    return loss, loss_dict
