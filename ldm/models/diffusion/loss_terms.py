"""The terms of the training loss, one interface, summed from one batched UNet call.

    L = sum_k weight_k * L_k

A denoising term (the image, the face crops of the facial loss, the class images of prior preservation)
adds rows to the step's one UNet call: latents, conditioning and timesteps. All rows are noised with one
draw and denoised together; each term's L_k is the simple loss of its own rows. A penalty term (the
embedding regulariser, the anchor pull) needs no UNet call: its L_k is a function of the embedding.

A step runs the phases below for every term in list order (the order of the random draws: each term's
cached-latent samples, then each term's timesteps, then one noise for all rows):

1. ``prepare(step)``: what the term denoises this step (latents, prompts), or None for nothing;
2. ``prompts(inputs)``: its prompts, encoded in one text-encoder call with every other term's;
3. ``rows(inputs, cond, main, diffusion)``: its rows (``main`` is the image term's rows);
4. ``penalty()``: a penalty term's unweighted value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from einops import rearrange

from ldm.models.diffusion.gaussian_diffusion import Denoise, GaussianDiffusion
from ldm.models.diffusion.latent_cache import CacheKey


def batch_images(batch: Mapping[str, Any], key: str) -> torch.Tensor:
    """Images of a batch as float [B, C, H, W] (datasets yield channels-last [B, H, W, C])."""
    x = torch.as_tensor(batch[key])
    if x.ndim == 3:
        x = x[..., None]
    return rearrange(x, "b h w c -> b c h w").to(memory_format=torch.contiguous_format).float()


# The frozen first stage as terms see it: (images [N, 3, H, W], cache keys or None) -> scaled latents [N, C, h, w]
LatentEncoder = Callable[[torch.Tensor, Optional[Sequence[CacheKey]]], torch.Tensor]


@dataclass
class Step:
    """What the terms of one training step read: the image latents and prompts, the batch, the encoder."""

    latents: torch.Tensor  # [B, C, h, w]
    prompts: list
    batch: Mapping[str, Any] | None
    encode: LatentEncoder
    device: torch.device


@dataclass
class Rows:
    """The rows one term adds to the UNet call: latents [A, C, h, w], conditioning [A, L, D], timesteps [A]."""

    latents: torch.Tensor
    cond: torch.Tensor
    t: torch.Tensor


class LossTerm:
    """One term of the loss; the defaults add nothing, so a term overrides only the phases it uses."""

    name = "term"
    weight = 1.0

    def prepare(self, step: Step) -> Any | None:
        """The inputs this term denoises this step, or None (no rows)."""
        return None

    def prompts(self, inputs: Any) -> list:
        """Prompts to encode for this term's rows (in the step's one text-encoder call)."""
        return []

    def rows(self, inputs: Any, cond: torch.Tensor, main: Rows | None, diffusion: GaussianDiffusion) -> Rows:
        """This term's rows for the UNet call; ``cond`` [len(prompts), L, D] is its prompts' conditioning."""
        raise NotImplementedError(f"{type(self).__name__} adds no rows")

    def penalty(self) -> torch.Tensor | None:
        """The unweighted value of a term that needs no UNet call (a scalar), else None."""
        return None

    def logs(self, prefix: str, value: torch.Tensor, details: dict) -> dict:
        """What the step logs for this term; ``details`` are the simple/VLB parts of a denoising term."""
        return {f"{prefix}/loss_{self.name}": value.detach()}


class ImageLoss(LossTerm):
    """The main term: the simple loss of the training images' latents with their prompts."""

    name = "image"

    def prepare(self, step: Step) -> Step:
        return step

    def prompts(self, inputs: Step) -> list:
        return list(inputs.prompts)

    def rows(self, inputs: Step, cond: torch.Tensor, main: Rows | None, diffusion: GaussianDiffusion) -> Rows:
        return Rows(inputs.latents, cond, diffusion.sample_timesteps(inputs.latents.shape[0]))

    def logs(self, prefix: str, value: torch.Tensor, details: dict) -> dict:
        return details


def batched_losses(diffusion: GaussianDiffusion, denoise: Denoise, rows: Sequence[Rows], prefix: str,
                   noise: torch.Tensor | None = None) -> list[tuple[torch.Tensor, dict]]:
    """``(loss, details)`` of each row group from one denoiser call.

    ``noise`` [sum A_k, C, h, w] (optional) covers each group's rows in order.
    """
    sizes = [r.latents.shape[0] for r in rows]
    dtype, cond_dtype, device = rows[0].latents.dtype, rows[0].cond.dtype, rows[0].t.device
    # [sum A_k, ...]: every row of every term in one batch
    x_all = torch.cat([r.latents.to(dtype) for r in rows])
    cond_all = torch.cat([r.cond.to(cond_dtype) for r in rows])
    t_all = torch.cat([r.t.to(device) for r in rows])
    weighted, vlb = diffusion.per_sample_losses(denoise, x_all, cond_all, t_all, noise)
    return [diffusion.reduce_losses(w, v, prefix) for w, v in zip(weighted.split(sizes), vlb.split(sizes))]


def sum_terms(terms: Sequence[LossTerm], step: Step, diffusion: GaussianDiffusion, denoise: Denoise,
              condition: Callable[[list], torch.Tensor], prefix: str, noise: torch.Tensor | None = None):
    """``sum_k weight_k * L_k`` over ``terms`` (the first is the image term): ``(loss, loss_dict)``.

    ``condition(prompts)`` encodes all terms' prompts in one call; ``noise`` is as in :func:`batched_losses`.
    """
    prepared = [(term, term.prepare(step)) for term in terms]
    denoising = [(term, inputs) for term, inputs in prepared if inputs is not None]
    prompts = [term.prompts(inputs) for term, inputs in denoising]
    cond = condition([p for group in prompts for p in group]).split([len(group) for group in prompts])
    rows: list[Rows] = []
    for (term, inputs), term_cond in zip(denoising, cond):
        rows.append(term.rows(inputs, term_cond, rows[0] if rows else None, diffusion))
    loss, loss_dict = None, {}
    for (term, _), (value, details) in zip(denoising, batched_losses(diffusion, denoise, rows, prefix, noise)):
        loss = term.weight * value if loss is None else loss + term.weight * value
        loss_dict.update(term.logs(prefix, value, details))
    loss_dict[f"{prefix}/loss"] = loss.detach()
    for term in terms:
        value = term.penalty()
        if value is not None:
            loss = loss + term.weight * value
            loss_dict.update({**term.logs(prefix, value, {}), f"{prefix}/loss": loss.detach()})
    return loss, loss_dict
