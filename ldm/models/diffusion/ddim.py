"""DDIM sampler (Song et al. 2021) with the original LDM `DDIMSampler` API.

`SamplerBase` holds what DDIM and PLMS share (schedule, guidance, noise, the sampling loop);
the step maths live in `sampling_steps`.
"""
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm import tqdm

from ldm.models.diffusion.sampling_steps import (
    Conditioning,
    StepSchedule,
    ddim_schedule,
    ddim_step,
    make_ddim_timesteps,
    original_schedule,
    predict_eps,
    q_sample,
    sample_noise,
)

logger = logging.getLogger(__name__)

StepFn = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]


@dataclass
class StepOptions:
    """Per-call knobs shared by every step of one sampling run."""

    cond: Conditioning = None
    uncond: Conditioning = None
    guidance_scale: float = 1.0
    temperature: float = 1.0
    noise_dropout: float = 0.0
    generator: torch.Generator | None = None
    score_corrector: Any = None
    corrector_kwargs: dict = field(default_factory=dict)
    quantize_x0: bool = False


class SamplerBase:
    """Shared machinery of the LDM samplers; subclasses define `_step_fn`.

    The model must provide apply_model(x, t, c) -> eps and its diffusion process as ``diffusion``
    (:class:`GaussianDiffusion` or alike: alphas_cumprod, alphas_cumprod_prev, betas, num_timesteps and
    parameterization == "eps").
    """

    name = "base"

    def __init__(self, model: Any, schedule: str = "linear", **kwargs: Any) -> None:
        self.diffusion = model.diffusion
        parameterization = getattr(self.diffusion, "parameterization", "eps")
        if parameterization != "eps":
            raise NotImplementedError(f"{type(self).__name__} supports only parameterization='eps', "
                                      f"got {parameterization!r}")
        self.model = model
        self.schedule = schedule
        self.ddpm_num_timesteps = int(self.diffusion.num_timesteps)
        self.step_schedule: StepSchedule | None = None
        self.full_schedule: StepSchedule | None = None
        self.ddim_timesteps = None

    @property
    def device(self) -> torch.device:
        return self.diffusion.betas.device

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Build the sub-sampled step tables (and the full-chain ones for use_original_steps)."""
        alphas_cumprod = self.diffusion.alphas_cumprod
        if alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError(f"model.diffusion.alphas_cumprod has {alphas_cumprod.shape[0]} entries but num_timesteps is "
                             f"{self.ddpm_num_timesteps}; fix the model's schedule buffers")
        timesteps = make_ddim_timesteps(ddim_num_steps, self.ddpm_num_timesteps, ddim_discretize)
        self.step_schedule = ddim_schedule(alphas_cumprod, timesteps, ddim_eta).to(self.device)
        self.full_schedule = original_schedule(alphas_cumprod, self.diffusion.alphas_cumprod_prev,
                                               ddim_eta).to(self.device)
        self.ddim_timesteps = timesteps.numpy()  # numpy like the original attribute
        if verbose:
            logger.info("%s schedule: %d steps, timesteps %d..%d, eta %g", self.name, len(timesteps),
                        int(timesteps[0]), int(timesteps[-1]), ddim_eta)

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: tuple[int, int, int], conditioning: Conditioning = None,
               callback: Callable[[int], None] | None = None, normals_sequence: Any = None,
               img_callback: Callable[[Tensor, int], None] | None = None, quantize_x0: bool = False,
               eta: float = 0.0, mask: Tensor | None = None, x0: Tensor | None = None, temperature: float = 1.0,
               noise_dropout: float = 0.0, score_corrector: Any = None, corrector_kwargs: dict | None = None,
               verbose: bool = True, x_T: Tensor | None = None, log_every_t: int = 100,
               unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Conditioning = None,
               generator: torch.Generator | None = None, **kwargs: Any) -> tuple[Tensor, dict[str, list[Tensor]]]:
        """Sample a batch from noise. Returns (samples [B, C, H, W], {"x_inter": [...], "pred_x0": [...]})."""
        if len(shape) != 3:
            raise ValueError(f"shape must be (C, H, W), got {tuple(shape)}")
        if mask is not None and x0 is None:
            raise ValueError("mask needs x0 (the known latents to keep); pass x0 with mask")
        if quantize_x0 and not hasattr(getattr(self.model, "first_stage_model", None), "quantize"):
            raise ValueError("quantize_x0 needs a VQ first stage with .quantize; set quantize_x0=False")
        self._warn_batch_mismatch(conditioning, batch_size)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        size = (batch_size, *shape)
        x = self._initial_noise(size, x_T, generator)
        opts = StepOptions(cond=conditioning, uncond=unconditional_conditioning,
                           guidance_scale=unconditional_guidance_scale, temperature=temperature,
                           noise_dropout=noise_dropout, generator=generator, score_corrector=score_corrector,
                           corrector_kwargs=corrector_kwargs or {}, quantize_x0=quantize_x0)
        sched = self.step_schedule
        return self._loop(x, sched, self._step_fn(sched, opts), num_steps=len(sched), mask=mask, x0=x0,
                          generator=generator, callback=callback, img_callback=img_callback,
                          log_every_t=log_every_t, verbose=verbose)

    def _step_fn(self, sched: StepSchedule, opts: StepOptions) -> StepFn:
        raise NotImplementedError

    def _warn_batch_mismatch(self, conditioning: Conditioning, batch_size: int) -> None:
        if conditioning is None:
            return
        first = conditioning[next(iter(conditioning))] if isinstance(conditioning, dict) else conditioning
        first = first[0] if isinstance(first, (list, tuple)) else first
        if isinstance(first, Tensor) and first.shape[0] != batch_size:
            logger.warning("Got %d conditionings but batch-size is %d", first.shape[0], batch_size)

    def _initial_noise(self, size: tuple[int, ...], x_T: Tensor | None,
                       generator: torch.Generator | None) -> Tensor:
        if x_T is None:
            return sample_noise(size, self.device, generator)
        if tuple(x_T.shape) != size:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)} but (batch_size, *shape) is {size}")
        return x_T.to(device=self.device, dtype=torch.float32)

    def _eps(self, x: Tensor, t: Tensor, opts: StepOptions) -> Tensor:
        eps = predict_eps(self.model.apply_model, x, t, opts.cond, opts.uncond, opts.guidance_scale)
        if opts.score_corrector is not None:
            eps = opts.score_corrector.modify_score(self.model, eps, x, t, opts.cond, **opts.corrector_kwargs)
        return eps

    def _update(self, x: Tensor, eps: Tensor, index: int, sched: StepSchedule,
                opts: StepOptions) -> tuple[Tensor, Tensor]:
        """DDIM update from step `index` to the one before it."""
        sigma = sched.sigmas[index]
        noise = None
        if sched.noisy_steps[index]:
            noise = sample_noise(x.shape, x.device, opts.generator, opts.temperature, opts.noise_dropout)
        denoised_fn = self._quantize if opts.quantize_x0 else None
        return ddim_step(x, eps, sched.alphas[index], sched.alphas_prev[index], sigma, noise, denoised_fn)

    def _quantize(self, pred_x0: Tensor) -> Tensor:
        return self.model.first_stage_model.quantize(pred_x0)[0]

    def _loop(self, x: Tensor, sched: StepSchedule, step_fn: StepFn, *, num_steps: int,
              mask: Tensor | None = None, x0: Tensor | None = None, generator: torch.Generator | None = None,
              callback: Callable[[int], None] | None = None,
              img_callback: Callable[[Tensor, int], None] | None = None,
              log_every_t: int = 100, verbose: bool = True) -> tuple[Tensor, dict[str, list[Tensor]]]:
        """Run steps num_steps-1 .. 0 of `sched`; mask keeps x0 (re-noised) where mask == 1."""
        intermediates: dict[str, list[Tensor]] = {"x_inter": [x], "pred_x0": [x]}
        batch = x.shape[0]
        indices = range(num_steps - 1, -1, -1)
        for i, index in enumerate(tqdm(indices, desc=f"{self.name} Sampler", total=num_steps, disable=not verbose)):
            ts = torch.full((batch,), sched.timestep_values[index], device=self.device, dtype=torch.long)
            if mask is not None:
                alpha_t = self.diffusion.alphas_cumprod.to(self.device).float()[ts].view(-1, 1, 1, 1)  # [B, 1, 1, 1]
                known = q_sample(x0.float(), alpha_t, sample_noise(x0.shape, self.device, generator))
                x = known * mask + (1.0 - mask) * x
            x, pred_x0 = step_fn(x, ts, index)
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == num_steps - 1:
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(pred_x0)
        return x, intermediates


class DDIMSampler(SamplerBase):
    """Denoising Diffusion Implicit Models sampler (eta = 0 is deterministic)."""

    name = "DDIM"

    def _step_fn(self, sched: StepSchedule, opts: StepOptions) -> StepFn:
        def step(x: Tensor, ts: Tensor, index: int) -> tuple[Tensor, Tensor]:
            return self._update(x, self._eps(x, ts, opts), index, sched, opts)

        return step

    def _schedule_for(self, use_original_steps: bool) -> StepSchedule:
        sched = self.full_schedule if use_original_steps else self.step_schedule
        if sched is None:
            raise RuntimeError("call make_schedule(ddim_num_steps=...) before stochastic_encode/decode")
        return sched

    @torch.no_grad()
    def stochastic_encode(self, x0: Tensor, t: Tensor, use_original_steps: bool = False,
                          noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Noise x0 to DDIM step index t ([B] long; an index into the DDIM schedule, as in the original)."""
        sched = self._schedule_for(use_original_steps)
        alpha = sched.alphas[t.to(self.device)].view(-1, *([1] * (x0.dim() - 1)))  # [B, 1, 1, 1]
        if noise is None:
            noise = sample_noise(x0.shape, self.device, generator)
        return q_sample(x0.to(self.device, torch.float32), alpha, noise.to(self.device, torch.float32))

    @torch.no_grad()
    def decode(self, x_latent: Tensor, cond: Conditioning, t_start: int, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Conditioning = None, use_original_steps: bool = False,
               generator: torch.Generator | None = None, verbose: bool = True) -> Tensor:
        """Denoise x_latent from DDIM step index t_start down to 0 (img2img)."""
        sched = self._schedule_for(use_original_steps)
        if not 0 < t_start <= len(sched):
            raise ValueError(f"t_start must be in [1, {len(sched)}], got {t_start}")
        opts = StepOptions(cond=cond, uncond=unconditional_conditioning,
                           guidance_scale=unconditional_guidance_scale, generator=generator)
        x = x_latent.to(self.device, torch.float32)
        x, _ = self._loop(x, sched, self._step_fn(sched, opts), num_steps=t_start, generator=generator,
                          verbose=verbose)
        return x
