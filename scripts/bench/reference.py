"""The diffusers side of the benchmark, built from an SD v1 state dict with diffusers' own converters.

Everything here takes plain state dicts (SD checkpoint layout) and configs, not ``ldm`` objects, so the
baseline is independent of the code it is compared with.
"""
from __future__ import annotations

import tempfile
import warnings
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_diffusers_clip_model_from_ldm,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# Stable Diffusion v1's training schedule as diffusers spells it.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _load(model: torch.nn.Module, converted: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """Load every weight strictly, as copies (no storage shared with the model under test)."""
    missing, unexpected = model.load_state_dict({k: v.clone() for k, v in converted.items()}, strict=True,
                                                assign=True)
    if missing or unexpected:
        raise RuntimeError(f"diffusers conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def unet(original_config: Mapping[str, Any], checkpoint: Mapping[str, torch.Tensor]) -> UNet2DConditionModel:
    """diffusers' UNet from the ``model.diffusion_model.*`` weights of an SD v1 checkpoint."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        config = create_unet_diffusers_config_from_ldm(dict(original_config), checkpoint)
    converted = convert_ldm_unet_checkpoint(dict(checkpoint), config)
    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    return _load(model, converted)


def vae(original_config: Mapping[str, Any], checkpoint: Mapping[str, torch.Tensor]) -> AutoencoderKL:
    """diffusers' AutoencoderKL from the ``first_stage_model.*`` weights of an SD v1 checkpoint."""
    config = create_vae_diffusers_config_from_ldm(dict(original_config), checkpoint)
    converted = convert_ldm_vae_checkpoint(dict(checkpoint), config)
    with torch.device("meta"):
        model = AutoencoderKL(**config)
    return _load(model, converted)


def text_encoder(text_config: CLIPTextConfig, checkpoint: Mapping[str, torch.Tensor]) -> CLIPTextModel:
    """transformers' CLIPTextModel from the ``cond_stage_model.*`` weights, via diffusers' loader."""
    with tempfile.TemporaryDirectory() as config_dir:
        text_config.save_pretrained(config_dir)
        # diffusers may load into the checkpoint's own tensors: hand it copies
        clip_weights = {k: v.clone() for k, v in checkpoint.items() if k.startswith("cond_stage_model.")}
        model = create_diffusers_clip_model_from_ldm(CLIPTextModel, clip_weights, config=config_dir,
                                                     local_files_only=True)
    return model.eval()


@torch.inference_mode()
def ddim_sample(model: UNet2DConditionModel, x_t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                steps: int, scale: float) -> torch.Tensor:
    """DDIM with classifier-free guidance as diffusers' StableDiffusionPipeline runs it (one batched call)."""
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **SD_SCHEDULE)
    scheduler.set_timesteps(steps, device=x_t.device)
    context = torch.cat([uncond, cond])  # [2B, L, D]
    latents = x_t
    for t in scheduler.timesteps:
        eps_u, eps_c = model(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample.chunk(2)
        eps = eps_u + scale * (eps_c - eps_u)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


def pipeline(unet_model: UNet2DConditionModel, vae_model: AutoencoderKL, text_model: CLIPTextModel,
             vocab: Mapping[str, int], merges: list) -> StableDiffusionPipeline:
    """diffusers' StableDiffusionPipeline on these models with SD v1's DDIM scheduler, offline.

    The tokenizer is transformers' CLIPTokenizer on the vocabulary and merges of our BPE tokenizer.
    """
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **SD_SCHEDULE)
    pipe = StableDiffusionPipeline(vae=vae_model, text_encoder=text_model, unet=unet_model, scheduler=scheduler,
                                   tokenizer=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class RecipeStep:
    """One training step of a diffusers example recipe on a fixed batch.

    The VAE encodes the images every step, noise is added at random timesteps of SD's schedule, the
    UNet predicts it from the text encoder's states, and AdamW (``self.optimizer``, set by the
    subclass) updates what the recipe trains. Subclasses say what trains, how the prompts are
    encoded, the loss and any work after the optimizer step.
    """

    def __init__(self, unet_model: UNet2DConditionModel, vae_model: AutoencoderKL, text_model: CLIPTextModel,
                 input_ids: torch.Tensor, pixels: torch.Tensor, scaling_factor: float, weight_dtype: torch.dtype):
        self.unet, self.vae, self.text_model = unet_model, vae_model, text_model
        self.weight_dtype = weight_dtype  # of the frozen models (--mixed_precision); what trains stays float32
        self.input_ids = input_ids.to(text_model.device)  # [B, 77], tokenized by the data loader in diffusers' recipes
        self.pixels = pixels  # [B, 3, H, W] in [-1, 1]
        self.scaling_factor = scaling_factor
        self.noise_scheduler = DDPMScheduler(**SD_SCHEDULE)
        self.optimizer: torch.optim.Optimizer

    def persistent_state(self) -> list[Any]:
        """Tensors the recipe keeps between steps besides the model weights."""
        return [self.optimizer.state_dict()["state"]]

    def encode_prompts(self) -> torch.Tensor:
        """The text encoder's hidden states the UNet attends to."""
        raise NotImplementedError

    def loss(self, prediction: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(prediction.float(), noise.float())

    def after_step(self) -> None:
        """Work after the optimizer step (none by default)."""

    def __call__(self) -> float:
        # detach() as in the TI recipe; a no-op for the frozen VAE
        latents = self.vae.encode(self.pixels.to(self.weight_dtype)).latent_dist.sample().detach() * self.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                          device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        hidden = self.encode_prompts()
        prediction = self.unet(noisy, t, hidden).sample
        loss = self.loss(prediction, noise)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.after_step()
        return loss.item()

    def release(self) -> None:
        """Drop the optimizer state."""
        self.optimizer.state.clear()


class TextualInversionStep(RecipeStep):
    """One training step of diffusers' ``examples/textual_inversion`` recipe.

    Under mixed precision the recipe holds the UNet and VAE in ``weight_dtype`` and the text encoder in
    float32 (it trains); attention is diffusers' default (SDPA). The VAE encodes the images every step;
    the whole token-embedding table of the text encoder is trainable (the rest frozen) under AdamW, and
    after each step every row but the placeholder's is restored from a copy of the original table.
    """

    def __init__(self, unet_model: UNet2DConditionModel, vae_model: AutoencoderKL, text_model: CLIPTextModel,
                 input_ids: torch.Tensor, placeholder_id: int, pixels: torch.Tensor, scaling_factor: float,
                 lr: float = 5e-4, weight_dtype: torch.dtype = torch.float32):
        super().__init__(unet_model, vae_model, text_model, input_ids, pixels, scaling_factor, weight_dtype)
        for module in (unet_model, vae_model, text_model):
            module.requires_grad_(False)
        self.table = text_model.get_input_embeddings().weight
        self.table.requires_grad_(True)
        text_model.train()
        self.original_table = self.table.detach().clone()
        self.keep_rows = torch.ones(self.table.shape[0], dtype=torch.bool, device=self.table.device)
        self.keep_rows[placeholder_id] = False
        self.optimizer = torch.optim.AdamW([self.table], lr=lr)

    def persistent_state(self) -> list[Any]:
        return [*super().persistent_state(), self.original_table]

    def encode_prompts(self) -> torch.Tensor:
        return self.text_model(self.input_ids)[0].to(self.weight_dtype)

    def after_step(self) -> None:
        with torch.no_grad():
            self.table[self.keep_rows] = self.original_table[self.keep_rows]

    def release(self) -> None:
        """Freeze the table again and drop the optimizer state."""
        self.table.requires_grad_(False)
        self.table.grad = None
        self.text_model.eval()
        super().release()


class DreamBoothStep(RecipeStep):
    """One training step of diffusers' ``examples/dreambooth/train_dreambooth.py`` with prior preservation.

    The text encoder is frozen (its embeddings computed under ``no_grad``); the VAE encodes the subject
    and the class image every step; the UNet denoises both in one call and the loss is the instance MSE
    plus ``prior_loss_weight`` times the class MSE, under AdamW over the UNet's parameters. The batch
    holds the subject prompts and images first, then the class ones ([2B, ...]).
    """

    def __init__(self, unet_model: UNet2DConditionModel, vae_model: AutoencoderKL, text_model: CLIPTextModel,
                 input_ids: torch.Tensor, pixels: torch.Tensor, scaling_factor: float, *,
                 gradient_checkpointing: bool, prior_loss_weight: float = 1.0, lr: float = 1e-6,
                 weight_decay: float = 1e-2, weight_dtype: torch.dtype = torch.float32):
        super().__init__(unet_model, vae_model, text_model, input_ids, pixels, scaling_factor, weight_dtype)
        self.prior_loss_weight = prior_loss_weight
        vae_model.requires_grad_(False)
        text_model.requires_grad_(False)
        unet_model.requires_grad_(True)
        if gradient_checkpointing:
            unet_model.enable_gradient_checkpointing()
        unet_model.train()
        self.optimizer = torch.optim.AdamW(unet_model.parameters(), lr=lr, weight_decay=weight_decay)

    def encode_prompts(self) -> torch.Tensor:
        with torch.no_grad():
            return self.text_model(self.input_ids)[0]

    def loss(self, prediction: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        pred, pred_prior = prediction.chunk(2)
        target, target_prior = noise.chunk(2)
        loss = super().loss(pred, target)
        return loss + self.prior_loss_weight * super().loss(pred_prior, target_prior)

    def release(self) -> None:
        """Drop the optimizer state and put the UNet back in eval mode."""
        super().release()
        self.unet.eval()
