"""Noise schedules of DDPM (Ho et al. 2020) as pure functions returning the buffers.

Everything is computed in float64 and handed back as float32 tensors, as in the original code.
"""
from __future__ import annotations

import math

import torch

SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> torch.Tensor:
    """Betas in float64. ``"linear"`` is LDM's (and SD's "scaled linear"): linear in sqrt(beta)."""
    if schedule == "linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64) ** 2
    if schedule == "cosine":  # Nichol & Dhariwal 2021, eq. 17
        steps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        return (1 - alphas[1:] / alphas[:-1]).clamp(0, 0.999)
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    if schedule == "sqrt":
        return torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5
    raise ValueError(f"unknown beta schedule '{schedule}': use linear, cosine, sqrt_linear or sqrt")


def _float64_buffers(betas: torch.Tensor, v_posterior: float) -> dict[str, torch.Tensor]:
    """All schedule quantities in float64 (eqs. 4, 6 and 7 of DDPM), plus ``alphas``."""
    betas = betas.to(torch.float64)
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = (1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (
        1.0 - alphas_cumprod
    ) + v_posterior * betas
    return {
        "alphas": alphas,
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": torch.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        # the variance is 0 at t = 0, so the log is clipped
        "posterior_log_variance_clipped": torch.log(posterior_variance.clamp(min=1e-20)),
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
    }


def diffusion_buffers(betas: torch.Tensor, v_posterior: float = 0.0) -> dict[str, torch.Tensor]:
    """The 12 DDPM buffers of an SD checkpoint as float32, computed from betas in float64."""
    buffers = _float64_buffers(betas, v_posterior)
    return {name: buffers[name].to(torch.float32) for name in SCHEDULE_BUFFERS}


def vlb_weights(betas: torch.Tensor, parameterization: str, v_posterior: float = 0.0) -> torch.Tensor:
    """Per-timestep weights turning the simple loss into the variational bound term."""
    b = _float64_buffers(betas, v_posterior)
    if parameterization == "eps":
        weights = b["betas"] ** 2 / (2 * b["posterior_variance"] * b["alphas"] * (1 - b["alphas_cumprod"]))
    elif parameterization == "x0":
        weights = 0.5 * b["alphas_cumprod"].sqrt() / (2.0 * 1 - b["alphas_cumprod"])
    else:
        raise ValueError(f"unknown parameterization '{parameterization}': use eps or x0")
    weights[0] = weights[1]  # posterior variance is 0 at t = 0
    return weights.to(torch.float32)


def extract(buffer: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``buffer[t]`` shaped [B, 1, ..., 1] to broadcast against a tensor with ``ndim`` dims."""
    return buffer.gather(0, t).reshape(t.shape[0], *([1] * (ndim - 1)))
