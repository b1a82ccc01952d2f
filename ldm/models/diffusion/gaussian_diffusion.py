"""The diffusion maths a latent-diffusion model owns: its schedule buffers, q_sample and per-sample losses.

DDPM (Ho et al. 2020): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq. 4), trained with the simple loss
||eps - eps_theta(x_t, t)||^2 (eq. 14), optionally weighted by a learned per-timestep log-variance and
mixed with the variational bound (LDM's ``p_losses``). The denoiser is not part of this module: the
losses take a ``denoise(x_t, t, cond)`` callable, so the maths knows nothing of UNets or prompts.

Checkpoints of the original code hold the schedule at the top level (``betas``, ``alphas_cumprod``,
...); :func:`keep_state_at_top_level` keeps those keys when the part is a child of the model.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from ldm.models.diffusion.losses import per_sample_loss
from ldm.models.diffusion.schedule import diffusion_buffers, extract, make_beta_schedule, vlb_weights

Denoise = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


class GaussianDiffusion(nn.Module):
    """The noise schedule (12 float32 buffers of an SD checkpoint) and the training losses built on it."""

    def __init__(
        self,
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas: Sequence[float] | None = None,
        v_posterior: float = 0.0,
        parameterization: str = "eps",
        loss_type: str = "l2",
        l_simple_weight: float = 1.0,
        original_elbo_weight: float = 0.0,
        learn_logvar: bool = False,
        logvar_init: float = 0.0,
        noise_offset: float = 0.0,
    ):
        super().__init__()
        if parameterization not in ("eps", "x0"):
            raise ValueError(f"parameterization '{parameterization}' is not supported: use eps or x0")
        self.parameterization = parameterization
        self.loss_type = loss_type
        self.v_posterior = v_posterior
        self.l_simple_weight = l_simple_weight
        self.original_elbo_weight = original_elbo_weight
        self.learn_logvar = learn_logvar
        self.noise_offset = noise_offset
        self.linear_start, self.linear_end = linear_start, linear_end
        if given_betas is not None:
            betas = torch.as_tensor(given_betas, dtype=torch.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.num_timesteps = int(betas.shape[0])
        for name, value in diffusion_buffers(betas, v_posterior).items():
            self.register_buffer(name, value)
        self.register_buffer("lvlb_weights", vlb_weights(betas, parameterization, v_posterior), persistent=False)
        logvar = torch.full((self.num_timesteps,), float(logvar_init))
        if learn_logvar:
            self.logvar = nn.Parameter(logvar, requires_grad=True)
        else:  # non-persistent: released checkpoints have no logvar key unless it was learned
            self.register_buffer("logvar", logvar, persistent=False)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) (DDPM eq. 4)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise)

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_0 from x_t and the predicted noise (inverse of eq. 4)."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * noise)

    def sample_timesteps(self, batch_size: int) -> torch.Tensor:
        """Uniformly random training timesteps, one per sample: [B] (long, on the schedule's device)."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=self.betas.device).long()

    def training_noise(self, x_start: torch.Tensor) -> torch.Tensor:
        """The loss's noise: N(0, I), plus ``noise_offset`` times one N(0, 1) draw per sample and channel.

        Offset noise (Guttenberg 2023): SD's schedule leaves some of the image's mean in x_T, so a model
        trained on plain noise never learns to choose an image's overall colour from the prompt.
        """
        noise = torch.randn_like(x_start)
        if self.noise_offset:
            per_channel = torch.randn(*x_start.shape[:2], *([1] * (x_start.ndim - 2)), device=x_start.device,
                                      dtype=x_start.dtype)  # [B, C, 1, 1]
            noise = noise + self.noise_offset * per_channel
        return noise

    def per_sample_losses(self, denoise: Denoise, x_start: torch.Tensor, cond, t: torch.Tensor,
                          noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Simple (log-variance weighted) and VLB losses of each sample, shape [B] each, from one
        ``denoise(x_t, t, cond)`` call."""
        noise = self.training_noise(x_start) if noise is None else noise
        prediction = denoise(self.q_sample(x_start, t, noise), t, cond)
        target = noise if self.parameterization == "eps" else x_start
        simple = per_sample_loss(prediction, target, self.loss_type)
        logvar_t = self.logvar[t]
        weighted = simple / torch.exp(logvar_t) + logvar_t
        vlb = self.lvlb_weights[t] * simple
        return weighted, vlb

    def reduce_losses(self, weighted: torch.Tensor, vlb: torch.Tensor, prefix: str):
        """Total loss and the logged terms, as in LDM's ``p_losses``: ``(loss, loss_dict)``."""
        loss_dict = {f"{prefix}/loss_simple": weighted.mean().detach()}
        if self.learn_logvar:
            loss_dict[f"{prefix}/loss_gamma"] = weighted.mean().detach()
            loss_dict["logvar"] = self.logvar.data.mean()
        loss = self.l_simple_weight * weighted.mean()
        loss_dict[f"{prefix}/loss_vlb"] = vlb.mean().detach()
        loss = loss + self.original_elbo_weight * vlb.mean()
        return loss, loss_dict


def keep_state_at_top_level(owner: nn.Module, name: str) -> None:
    """Save and load the state of ``owner.<name>`` under ``owner``'s own prefix (``betas``, not
    ``<name>.betas``), first in the state dict, as the original code's checkpoints hold it."""
    part_prefix = name + "."

    def save(_module, state_dict, prefix, _metadata) -> None:
        moved = {prefix + key[len(prefix + part_prefix):]: state_dict.pop(key)
                 for key in [k for k in state_dict if k.startswith(prefix + part_prefix)]}
        rest = {key: state_dict.pop(key) for key in [k for k in state_dict if k.startswith(prefix)]}
        state_dict.update(moved)
        state_dict.update(rest)

    def load(_module, state_dict, prefix, *_args) -> None:
        for key in getattr(owner, name).state_dict(keep_vars=True):
            if prefix + key in state_dict:
                state_dict[prefix + part_prefix + key] = state_dict.pop(prefix + key)

    owner.register_state_dict_post_hook(save)
    owner.register_load_state_dict_pre_hook(load)
