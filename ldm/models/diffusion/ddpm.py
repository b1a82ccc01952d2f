"""Lightning glue for Latent Diffusion (Rombach et al. 2022), assembled from the parts it is handed.

The model names none of its maths: the diffusion process (schedule buffers, ``q_sample``, per-sample
losses) is :class:`GaussianDiffusion`, the loss is the sum of a list of terms (:mod:`loss_terms`: the
image, and the face crops, class images and embedding penalties a config adds), the embedding manager's
training rules are :class:`Personalization`, the latent cache is :mod:`latent_cache`, the samplers are
:mod:`ddim`/:mod:`plms`, the conditioning routing is :mod:`wrapper`.
This class builds the parts from a config and runs the steps.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from ldm import precision
from ldm.compat import drop_ignored_keys
from ldm.lr_scheduler import lightning_optimizers
from ldm.models.diffusion.compiled_unet import compile_mode
from ldm.models.diffusion.gaussian_diffusion import GaussianDiffusion, keep_state_at_top_level
from ldm.models.diffusion.latent_cache import LatentCache, batch_cache_keys
from ldm.models.diffusion.loss_terms import ImageLoss, LossTerm, Step, batch_images, sum_terms
from ldm.models.diffusion.personalization import Personalization
from ldm.models.diffusion.wrapper import DiffusionWrapper
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.nonfinite import NonFiniteLossTracker, supports_fused_optimizer
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

NOTHING_TO_TRAIN = ("nothing to train: every parameter is frozen by this config "
                    "(use a personalization_config, unfreeze_model or a trainable UNet)")
# GaussianDiffusion's arguments, given at the top of the model's params as in the original configs
DIFFUSION_KEYS = ("timesteps", "beta_schedule", "linear_start", "linear_end", "cosine_s", "given_betas",
                  "v_posterior", "parameterization", "loss_type", "l_simple_weight", "original_elbo_weight",
                  "learn_logvar", "logvar_init", "noise_offset")


class LatentDiffusion(pl.LightningModule):
    """Diffusion in the latent space of a frozen autoencoder, conditioned by a text encoder.

    With ``personalization_config`` (textual inversion), every UNet, VAE and text-encoder weight is
    frozen and only the embedding manager's vectors train, unless ``unfreeze_model`` is set.
    """

    def __init__(
        self,
        first_stage_config: Mapping[str, Any],
        cond_stage_config: Mapping[str, Any] | str,
        unet_config: Mapping[str, Any],
        num_timesteps_cond: int | None = None,
        cond_stage_key: str = "image",
        cond_stage_trainable: bool = False,
        concat_mode: bool = True,
        cond_stage_forward: str | None = None,
        conditioning_key: str | None = None,
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        personalization_config: Mapping[str, Any] | None = None,
        embedding_reg_weight: float = 0.0,
        unfreeze_model: bool = False,
        model_lr: float = 0.0,
        facial_loss_config: Mapping[str, Any] | None = None,
        prior_loss_config: Mapping[str, Any] | None = None,
        embedding_manager_ckpt: str | None = None,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        monitor: str = "val/loss",
        use_ema: bool = True,
        first_stage_key: str = "image",
        image_size: int = 256,
        channels: int = 3,
        scheduler_config: Mapping[str, Any] | None = None,
        compile_unet: bool | str = False,
        learning_rate: float | None = None,
        training_seed: int | None = None,
        trust_pickle: bool = False,
        **kwargs: Any,
    ):
        super().__init__()
        drop_ignored_keys("LatentDiffusion", {k: v for k, v in kwargs.items() if k not in DIFFUSION_KEYS})
        self.diffusion = GaussianDiffusion(**{k: v for k, v in kwargs.items() if k in DIFFUSION_KEYS})
        keep_state_at_top_level(self, "diffusion")  # SD checkpoints hold betas, alphas_cumprod, ... at the top
        self.num_timesteps_cond = num_timesteps_cond or 1
        if self.num_timesteps_cond > self.diffusion.num_timesteps:
            raise ValueError("num_timesteps_cond cannot exceed timesteps")
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.model.compile_unet(compile_mode(compile_unet))
        self.half_weight_dtype: torch.dtype | None = None  # set by hold_frozen_weights_in_half
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model)
        self.scheduler_config = scheduler_config
        if monitor is not None:
            self.monitor = monitor
        self.learning_rate = learning_rate  # main.py sets it from base_learning_rate (ldm.train.training)
        self.training_seed = training_seed  # main.py's --seed: see step_rng
        self.init_checkpoint: str | None = None  # the weights file loaded last (its hash goes in PNGs)
        self.stopped_on_nonfinite_loss = False
        self.nonfinite = NonFiniteLossTracker()
        self.scale_by_std = scale_by_std
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        self.cond_stage_forward = cond_stage_forward
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        else:
            self.scale_factor = scale_factor
        self.first_stage_model = self._frozen(instantiate_from_config(first_stage_config))
        self.cond_stage_model = self._build_cond_stage(cond_stage_config)
        self.latent_cache = LatentCache()
        self._fixed_conditioning: dict[tuple, torch.Tensor] = {}  # see fixed_conditioning
        # the loss is the sum of these terms (ldm.models.diffusion.loss_terms): the image, then the config's
        self.loss_terms: list[LossTerm] = [ImageLoss(), *(instantiate_from_config(c) for c in
                                                          (facial_loss_config, prior_loss_config) if c is not None)]
        self.personalization = Personalization(embedding_reg_weight, unfreeze_model, model_lr)
        self.embedding_manager = None
        if personalization_config is not None:
            self._personalize(personalization_config)
        self.restarted_from_ckpt = False
        if ckpt_path:
            self.init_from_ckpt(ckpt_path, ignore_keys, trust_pickle=trust_pickle)
            self.restarted_from_ckpt = True
        if embedding_manager_ckpt:
            if self.embedding_manager is None:
                raise ValueError("embedding_manager_ckpt needs a config with personalization_config")
            self.embedding_manager.load(embedding_manager_ckpt)

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), use_ema: bool = False,
                       trust_pickle: bool = False) -> None:
        """Load weights from a checkpoint through the project's checkpoint module (strict keys)."""
        from ldm.checkpoint import load_weights, read_state_dict

        state = read_state_dict(path, trust_pickle=trust_pickle)
        state = {k: v for k, v in state.items() if not any(k.startswith(i) for i in ignore_keys)}
        load_weights(self, state, use_ema=use_ema, allow_missing_prefixes=self.weights_not_in_checkpoints())
        if self.use_ema and not any(k.startswith("model_ema.") for k in state):
            self.model_ema = LitEma(self.model)  # an exported file has no EMA: it starts at the loaded weights
            logger.info("%s holds no EMA weights: the EMA starts from its model weights", path)
        self.init_checkpoint = str(path)
        self.on_weights_loaded()
        logger.info("Restored weights from %s", path)

    @contextmanager
    def ema_scope(self, context: str | None = None):
        """Temporarily swap the EMA weights into the model (no-op without EMA)."""
        if not self.use_ema:
            yield None
            return
        self.model_ema.store(self.model.parameters())
        self.model_ema.copy_to(self.model)
        if context is not None:
            logger.info("%s: switched to EMA weights", context)
        try:
            yield None
        finally:
            self.model_ema.restore(self.model.parameters())
            if context is not None:
                logger.info("%s: restored training weights", context)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond=None, return_ids: bool = False):
        """Run the denoiser; ``cond`` is a tensor, a list of tensors or a dict of kind -> list."""
        if not isinstance(cond, dict):
            if cond is not None and not isinstance(cond, list):
                cond = [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond} if cond is not None else {}
        with self.weights_autocast():
            output = self.model(x_noisy, t, **cond)
        return output[0] if isinstance(output, tuple) and not return_ids else output

    def hold_frozen_weights_in_half(self, dtype: torch.dtype) -> int:
        """Hold every frozen conv/linear weight in ``dtype`` (see :mod:`ldm.precision`) and run the parts
        under autocast to it from now on; returns the number of parameters cast."""
        count = precision.hold_frozen_weights_in_half(self.frozen_weight_modules(), dtype)
        self.half_weight_dtype = dtype
        return count

    def weights_autocast(self):
        """Autocast to the half dtype of the frozen weights, when they are held in one."""
        return precision.weights_autocast(self.device, self.half_weight_dtype)

    def p_losses(self, x_start: torch.Tensor, cond, t: torch.Tensor, noise: torch.Tensor | None = None):
        """The image term alone at timesteps ``t`` (conditioning ``cond`` given): ``(loss, loss_dict)``."""
        prefix = "train" if self.training else "val"
        diffusion = self.diffusion
        loss, loss_dict = diffusion.reduce_losses(
            *diffusion.per_sample_losses(self.apply_model, x_start, cond, t, noise), prefix)
        loss_dict[f"{prefix}/loss"] = loss.detach()
        return loss, loss_dict

    @contextmanager
    def step_rng(self):
        """Seed torch's RNG from (``training_seed``, micro-batch count, rank) for one training step.

        Each step's timesteps, noise and latent samples then depend only on the step, so a run
        resumed with ``-r`` draws what the uninterrupted run would have. No-op without a seed.
        """
        if self.training_seed is None:
            yield
            return
        count = self.trainer.fit_loop.epoch_loop.total_batch_idx  # restored from the checkpoint on resume
        seed = (self.training_seed * 1_000_003 + count) * 1_009 + self.global_rank
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed % 2**63)
            yield

    def training_step(self, batch, batch_idx):
        with self.step_rng():
            loss, loss_dict = self.shared_step(batch)
        # no host read here: a NaN/Inf loss is noted on the device, its update skipped in
        # on_before_optimizer_step, and the ranks agree on stopping every N steps (ldm.nonfinite)
        self.nonfinite.record(loss, self.global_step)
        self.log_dict(loss_dict, prog_bar=True, on_step=True, on_epoch=False, batch_size=self._batch_size(batch))
        return loss  # the step's number is logged by ldm.train.run_metrics.StepNumbering (1 for the first step)

    def on_before_optimizer_step(self, optimizer) -> None:
        self.nonfinite.skip_update_if_bad(optimizer)

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        _, loss_dict = self.shared_step(batch)
        with self.ema_scope():
            _, loss_dict_ema = self.shared_step(batch)
        loss_dict.update({f"{k}_ema": v for k, v in loss_dict_ema.items()})
        self.log_dict(loss_dict, prog_bar=False, on_step=False, on_epoch=True, batch_size=self._batch_size(batch))

    def _batch_size(self, batch) -> int:
        return len(batch[self.first_stage_key])

    def on_train_batch_end(self, *args, **kwargs):
        if self.use_ema:
            self.model_ema(self.model)

    def configure_optimizers(self):
        groups = [g for g in self.trainable_parameters() if g["params"]]
        if not groups:
            raise ValueError(NOTHING_TO_TRAIN)
        # fused: one kernel per step, and it can skip a step on the device (see ldm.nonfinite)
        optimizer = torch.optim.AdamW(groups, lr=self.learning_rate, fused=supports_fused_optimizer(groups))
        return lightning_optimizers(optimizer, self.scheduler_config)

    @staticmethod
    def _frozen(module: nn.Module) -> nn.Module:
        module.eval()
        for param in module.parameters():
            param.requires_grad = False
        return module

    def _build_cond_stage(self, config):
        if config == "__is_first_stage__":
            return self.first_stage_model
        if config == "__is_unconditional__":
            return None
        model = instantiate_from_config(config)
        return model if self.cond_stage_trainable else self._frozen(model)

    def _personalize(self, config: Mapping[str, Any]) -> None:
        for part in self.personalization.frozen_parts(self.model, self.cond_stage_model):
            self._frozen(part)
        self.embedding_manager = self.personalization.build_manager(config, self.cond_stage_model)
        self.strict_loading = False  # training checkpoints may keep only the embedding (see on_save_checkpoint)

    def weights_not_in_checkpoints(self) -> tuple[str, ...]:
        """State-dict prefixes a base checkpoint may lack (a new embedding, or EMA weights)."""
        ema = ("model_ema.",) if self.use_ema else ()
        return ema + self.personalization.prefixes_not_in_checkpoints(self.embedding_manager)

    def frozen_weight_modules(self) -> dict[str, nn.Module | None]:
        return {"UNet": self.model, "VAE": self.first_stage_model, "text encoder": self.cond_stage_model}

    def on_weights_loaded(self) -> None:
        """Re-read e_p and the init words from the freshly loaded text encoder."""
        self.personalization.on_weights_loaded(self.embedding_manager)

    def train(self, mode: bool = True):
        """Switch modes, keeping frozen parts in eval mode (the original patched ``train``)."""
        super().train(mode)
        self.first_stage_model.eval()
        if self.cond_stage_model is not None and not self.cond_stage_trainable:
            self.cond_stage_model.eval()
        return self

    # --- first stage -------------------------------------------------------------------------
    def encode_first_stage(self, x: torch.Tensor):
        with self.weights_autocast():
            return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior) -> torch.Tensor:
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"encoder_posterior of type {type(encoder_posterior)} is not supported")
        return self.scale_factor * z

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        with self.weights_autocast():
            return self.first_stage_model.decode(z / self.scale_factor)

    def encode_to_latents(self, images: torch.Tensor, cache_keys=None) -> torch.Tensor:
        """Scaled latents of images [B, 3, H, W]; posteriors are cached by key when keys are given."""
        if cache_keys is None:
            with torch.no_grad():
                return self.get_first_stage_encoding(self.encode_first_stage(images)).detach()
        posterior = self.latent_cache.posterior(cache_keys, images, self._encode_posterior)
        return self.scale_factor * posterior.sample()

    @torch.no_grad()
    def _encode_posterior(self, images: torch.Tensor) -> DiagonalGaussianDistribution:
        return self.encode_first_stage(images)

    # --- conditioning ------------------------------------------------------------------------
    def get_learned_conditioning(self, c):
        """Text (or other) conditioning; the embedding manager injects the learned vectors."""
        with self.weights_autocast():
            if self.cond_stage_forward is not None:
                return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
            encode = getattr(self.cond_stage_model, "encode", None)
            if not callable(encode):
                return self.cond_stage_model(c)
            c = encode(c, embedding_manager=self.embedding_manager) if self.embedding_manager else encode(c)
        return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c

    def fixed_conditioning(self, prompt: str, batch_size: int) -> torch.Tensor:
        """Conditioning of ``prompt`` repeated ``batch_size`` times: [B, L, D].

        With a frozen text encoder and no placeholder in the prompt (the unconditional or negative side
        of guidance) it never changes, so it is encoded once and reused (per device and precision).
        """
        manager = self.embedding_manager
        trainable = any(p.requires_grad for p in self.cond_stage_model.parameters())
        if trainable or (manager is not None and any(p in prompt for p in manager.placeholders)):
            return self.get_learned_conditioning([prompt] * batch_size)
        autocast = torch.is_autocast_enabled(self.device.type) and torch.get_autocast_dtype(self.device.type)
        key = (prompt, str(self.device), self.half_weight_dtype, autocast)
        if key not in self._fixed_conditioning:
            self._fixed_conditioning[key] = self.get_learned_conditioning([prompt]).detach()
        return self._fixed_conditioning[key].expand(batch_size, -1, -1)

    # --- training ----------------------------------------------------------------------------
    def get_input(self, batch: Mapping[str, Any], key: str) -> list:
        """Latents and raw conditioning of a batch: ``[z, c]``."""
        images = batch_images(batch, key).to(self.device)
        z = self.encode_to_latents(images, batch_cache_keys(batch, "image"))
        return [z, batch[self.cond_stage_key]]

    def shared_step(self, batch: Mapping[str, Any]):
        z, c = self.get_input(batch, self.first_stage_key)
        return self(z, c, batch)

    def forward(self, x: torch.Tensor, c, batch: Mapping[str, Any] | None = None,
                noise: torch.Tensor | None = None):
        """The loss of latents ``x`` [B, C, h, w] with prompts ``c``: the sum of the loss terms, whose extra
        rows (face crops, class images) come from ``batch`` (none without one). ``(loss, loss_dict)``."""
        prefix = "train" if self.training else "val"
        step = Step(latents=x, prompts=list(c), batch=batch, encode=self.encode_to_latents, device=self.device)
        loss, loss_dict = sum_terms([*self.loss_terms, *self.personalization.loss_terms], step, self.diffusion,
                                    self.apply_model, self.get_learned_conditioning, prefix, noise)
        loss_dict.update(self.personalization.metrics(self.embedding_manager, prefix))
        return loss, loss_dict

    def trainable_parameters(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups: the embedding (and the unfrozen UNet), else what requires grad."""
        if self.embedding_manager is not None:
            return self.personalization.parameter_groups(self.embedding_manager, self.model, self.learning_rate)
        params = [p for p in self.model.parameters() if p.requires_grad]
        params += [self.diffusion.logvar] if self.diffusion.learn_logvar else []
        if self.cond_stage_trainable:
            params += [p for p in self.cond_stage_model.parameters() if p.requires_grad]
        return [{"params": params, "lr": self.learning_rate}]

    def optimizer_step(self, *args, **kwargs) -> None:
        """Lightning's step, then the embedding's norm bound and moving average (after every update of v)."""
        super().optimizer_step(*args, **kwargs)
        self.personalization.after_optimizer_step(self.embedding_manager)

    def on_train_batch_start(self, batch, batch_idx):
        if self.scale_by_std and self.global_step == 0 and batch_idx == 0 and not self.restarted_from_ckpt:
            z = self.encode_to_latents(batch_images(batch, self.first_stage_key).to(self.device))
            self.scale_factor = 1.0 / (z / self.scale_factor).flatten().std()
            logger.info("scale_by_std: scale_factor set to %.5f", float(self.scale_factor))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Textual inversion keeps only trainable weights in training checkpoints (no 4 GB copies)."""
        checkpoint["state_dict"] = self.personalization.checkpoint_state(self.embedding_manager,
                                                                         checkpoint["state_dict"])

    # --- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample_images(self, prompts: Sequence[str], *, ddim_steps: int = 50, scale: float = 5.0,
                      eta: float = 0.0, generator: torch.Generator | None = None,
                      x_T: torch.Tensor | None = None, negative_prompt: str = "",
                      cond: torch.Tensor | None = None) -> torch.Tensor:
        """Decoded DDIM samples for ``prompts``, in [-1, 1], shape [B, 3, H, W].

        ``x_T`` [B, C, h, w] is the starting noise (drawn from ``generator`` when None); ``negative_prompt``
        is the unconditional side of classifier-free guidance. ``cond`` [B, L, D], when given, is the
        prompts' conditioning computed beforehand (e.g. each part with another embedding attached).
        """
        from ldm.models.diffusion.ddim import DDIMSampler

        cond = self.get_learned_conditioning(list(prompts)) if cond is None else cond
        uncond = self.fixed_conditioning(negative_prompt, len(prompts)) if scale != 1.0 else None
        shape = (self.channels, self.image_size, self.image_size)
        samples, _ = DDIMSampler(self).sample(
            S=ddim_steps, conditioning=cond, batch_size=len(prompts), shape=shape, verbose=False,
            unconditional_guidance_scale=scale, unconditional_conditioning=uncond, eta=eta,
            generator=generator, x_T=x_T)
        return self.decode_first_stage(samples).clamp(-1, 1)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 4, ddim_steps: int = 50,
                   unconditional_guidance_scale: float = 5.0, **_) -> dict[str, torch.Tensor]:
        """Inputs, reconstructions and samples with the batch's prompts, for the image logger."""
        images = batch_images(batch, self.first_stage_key)[:N].to(self.device)
        prompts = list(batch[self.cond_stage_key][:N])
        z = self.encode_to_latents(images)
        with self.ema_scope():
            samples = self.sample_images(prompts, ddim_steps=ddim_steps, scale=unconditional_guidance_scale)
        return {"inputs": images, "reconstruction": self.decode_first_stage(z).clamp(-1, 1),
                "samples_scaled": samples}
