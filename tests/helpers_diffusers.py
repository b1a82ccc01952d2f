"""Shared test helpers: the diffusers / transformers reference built from OUR SD-v1-layout weights.

Every builder takes a checkpoint-layout state dict (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.*``: what ``LatentDiffusion.state_dict()`` returns) and
converts it with diffusers' own single-file helpers, so the reference shares no code with ours.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."

# SD v1's DDIM configuration as diffusers spells it (scaled-linear betas, "leading" spacing with
# steps_offset 1 gives LDM's 1, 21, ..., 981; the final step moves to alphas_cumprod[0]).
SD_DDIM_KWARGS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give zero-initialised weights (zero_module convs), norm scales and biases random values.

    Other weights keep their (already random) init, so every parameter takes part in a comparison.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.ndim == 1 and name.endswith("weight"):  # norm scales (ones)
            param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
        elif param.ndim == 1:  # biases (mostly zeros)
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
        elif not param.any():  # zero_module weights: scale like PyTorch's default init
            param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(3 * param[0].numel()))
    return model


def original_config(config_path: Path) -> dict[str, Any]:
    """An LDM YAML config as the plain dict diffusers' config mappers expect."""
    return OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)


def diffusers_unet(checkpoint: Mapping[str, torch.Tensor], config_path: Path):
    """diffusers' UNet2DConditionModel holding the ``model.diffusion_model.*`` weights (shared, not copied)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    checkpoint = dict(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # image_size is only diffusers' sample_size metadata
        config = create_unet_diffusers_config_from_ldm(original_config(config_path), checkpoint, image_size=512)
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device("meta"):
        reference = UNet2DConditionModel(**config)
    result = reference.load_state_dict(converted, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    return reference.eval()


def diffusers_vae(checkpoint: Mapping[str, torch.Tensor], config_path: Path):
    """diffusers' AutoencoderKL holding the ``first_stage_model.*`` weights (shared, not copied)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    checkpoint = dict(checkpoint)
    config = create_vae_diffusers_config_from_ldm(original_config(config_path), checkpoint)
    converted = convert_ldm_vae_checkpoint(checkpoint, config)
    with torch.device("meta"):
        reference = AutoencoderKL(**config)
    result = reference.load_state_dict(converted, strict=True, assign=True)  # every key must come from ours
    assert not result.missing_keys and not result.unexpected_keys, result
    return reference.eval()


def transformers_clip(checkpoint: Mapping[str, torch.Tensor], text_config, workdir: Path):
    """transformers' CLIPTextModel with the ``cond_stage_model.*`` weights, via diffusers' CLIP converter.

    ``text_config`` (a ``CLIPTextConfig``) is written to ``workdir`` because the converter reads a
    local config folder; nothing is fetched. Attention is the eager path, independent of our SDPA.
    """
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    config_dir = Path(workdir) / "clip_config"
    text_config.save_pretrained(config_dir)
    checkpoint = {k: v.clone() for k, v in checkpoint.items() if k.startswith(TEXT_PREFIX)}
    reference = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, checkpoint, config=str(config_dir), local_files_only=True
    )
    reference.set_attn_implementation("eager")
    return reference.eval()


def sd_ddim_scheduler():
    """diffusers' DDIMScheduler configured as SD v1's DDIM sampler."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_DDIM_KWARGS)


@torch.no_grad()
def diffusers_guided_sample(unet, scheduler, x_T: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, *,
                          scale: float, steps: int) -> torch.Tensor:
    """Latents after ``steps`` steps of ``scheduler`` (DDIM eta 0, PNDM, ...) with classifier-free guidance."""
    scheduler.set_timesteps(steps)
    latents = x_T * scheduler.init_noise_sigma
    context = torch.cat([uncond, cond])  # [2B, L, D]
    for t in scheduler.timesteps:
        eps = unet(torch.cat([latents, latents]), t, encoder_hidden_states=context).sample  # [2B, C, H, W]
        eps_uncond, eps_cond = eps.chunk(2)
        latents = scheduler.step(eps_uncond + scale * (eps_cond - eps_uncond), t, latents).prev_sample
    return latents


def sd_pipeline(model: nn.Module, config_path: Path, workdir: Path):
    """diffusers' StableDiffusionPipeline holding the weights of our ``LatentDiffusion``, built offline.

    The tokenizer is transformers' CLIPTokenizer on the vocabulary and merges our BPE tokenizer reads.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    state = model.state_dict()
    text = model.cond_stage_model
    bpe = text.tokenizer
    return StableDiffusionPipeline(
        vae=diffusers_vae(state, config_path), unet=diffusers_unet(state, config_path),
        text_encoder=transformers_clip(state, text.text_model.config, workdir),
        tokenizer=CLIPTokenizer(vocab=bpe.vocab, merges=bpe.merges, model_max_length=77),
        scheduler=sd_ddim_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
