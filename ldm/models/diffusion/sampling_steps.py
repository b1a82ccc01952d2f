"""Pure step maths shared by the DDIM and PLMS samplers.

References:
- DDIM: Song et al. 2021, "Denoising Diffusion Implicit Models", eq. (12) (update) and eq. (16) (sigma).
- PLMS: Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds", eq. (12)
  (linear multistep on the noise estimate, with a 2nd-order pseudo improved-Euler start).
- Classifier-free guidance: Ho & Salimans 2022, eq. (6).

Everything here works in float32 and has no state; the samplers own the loops.
"""
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

Conditioning = Tensor | dict | list | None

# Adams-Bashforth coefficients for the PLMS eps combination, newest first (Liu et al. 2022, eq. 12).
_ADAMS_BASHFORTH: dict[int, tuple[tuple[float, ...], float]] = {
    2: ((3.0, -1.0), 2.0),
    3: ((23.0, -16.0, 5.0), 12.0),
    4: ((55.0, -59.0, 37.0, -9.0), 24.0),
}


@dataclass(frozen=True)
class StepSchedule:
    """Per-step tables of a sampler, indexed by step index (0 = least noisy).

    timesteps: DDPM timesteps fed to the model (long); alphas / alphas_prev: alpha-bar at the step
    and at the step it moves to; sigmas: noise std added by each step (zero for deterministic DDIM).
    """

    timesteps: Tensor
    alphas: Tensor
    alphas_prev: Tensor
    sigmas: Tensor
    # host copies the sampling loop branches on (reading the device tensors would wait for the GPU)
    timestep_values: tuple[int, ...] = ()
    noisy_steps: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        if not self.timestep_values:
            object.__setattr__(self, "timestep_values", tuple(self.timesteps.tolist()))
            object.__setattr__(self, "noisy_steps", tuple((self.sigmas > 0).tolist()))

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def to(self, device: torch.device) -> "StepSchedule":
        return StepSchedule(timesteps=self.timesteps.to(device), alphas=self.alphas.to(device),
                            alphas_prev=self.alphas_prev.to(device), sigmas=self.sigmas.to(device),
                            timestep_values=self.timestep_values, noisy_steps=self.noisy_steps)


def make_ddim_timesteps(num_ddim_steps: int, num_train_timesteps: int = 1000,
                        discretize: str = "uniform") -> Tensor:
    """Timesteps of the original LDM DDIM/PLMS samplers, ascending.

    "uniform": c = T // S, arange(0, T, c) + 1 (S=50, T=1000 gives 1, 21, ..., 981). Where T is not
    a multiple of S the original made S + 1 steps, the last one past T (an index error for S=3):
    only the first S are kept, which is the original sequence for every S it could run.
    "quad": (linspace(0, sqrt(0.8 T), S) ** 2).int() + 1.
    """
    if not 0 < num_ddim_steps <= num_train_timesteps:
        raise ValueError(f"the number of sampling steps must be in [1, {num_train_timesteps}] (the model's "
                         f"timesteps), got {num_ddim_steps}: set --ddim_steps (or --validation_ddim_steps) within it")
    if discretize == "uniform":
        stride = num_train_timesteps // num_ddim_steps
        steps = torch.arange(0, num_train_timesteps, stride, dtype=torch.long)[:num_ddim_steps]
    elif discretize == "quad":
        root = torch.linspace(0, (num_train_timesteps * 0.8) ** 0.5, num_ddim_steps, dtype=torch.float64)
        steps = (root ** 2).long()
    else:
        raise ValueError(f"unknown ddim_discretize {discretize!r}; use 'uniform' or 'quad'")
    return steps + 1


def ddim_sigmas(alphas: Tensor, alphas_prev: Tensor, eta: float) -> Tensor:
    """sigma_t = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)) (DDIM eq. 16)."""
    return eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()


def ddim_schedule(alphas_cumprod: Tensor, timesteps: Tensor, eta: float) -> StepSchedule:
    """Tables for the sub-sampled DDIM chain; the last step's previous alpha is alphas_cumprod[0]."""
    if int(timesteps.max()) >= alphas_cumprod.shape[0]:
        raise ValueError(f"timestep {int(timesteps.max())} is out of range for a {alphas_cumprod.shape[0]}-step "
                         "schedule; use fewer sampling steps")
    ac = alphas_cumprod.detach().double().cpu()
    alphas = ac[timesteps]
    alphas_prev = torch.cat([ac[:1], ac[timesteps[:-1]]])
    sigmas = ddim_sigmas(alphas, alphas_prev, eta)
    return StepSchedule(timesteps=timesteps.clone(), alphas=alphas.float(),
                        alphas_prev=alphas_prev.float(), sigmas=sigmas.float())


def original_schedule(alphas_cumprod: Tensor, alphas_cumprod_prev: Tensor, eta: float) -> StepSchedule:
    """Tables for the full DDPM chain (the original `use_original_steps=True`)."""
    ac = alphas_cumprod.detach().double().cpu()
    ac_prev = alphas_cumprod_prev.detach().double().cpu()
    timesteps = torch.arange(ac.shape[0], dtype=torch.long)
    sigmas = ddim_sigmas(ac, ac_prev, eta)
    return StepSchedule(timesteps=timesteps, alphas=ac.float(), alphas_prev=ac_prev.float(), sigmas=sigmas.float())


def ddim_step(x: Tensor, eps: Tensor, alpha: Tensor, alpha_prev: Tensor, sigma: Tensor,
              noise: Tensor | None = None,
              denoised_fn: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """One DDIM update (DDIM eq. 12). Returns (x_prev, pred_x0).

    pred_x0 = (x - sqrt(1 - a) eps) / sqrt(a); x_prev = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev - sigma^2) eps
    + sigma * noise. `noise` is the standard normal draw (already scaled by temperature/dropout);
    `denoised_fn` (e.g. VQ quantization) is applied to pred_x0 before it is used.
    """
    pred_x0 = (x - (1.0 - alpha).sqrt() * eps) / alpha.sqrt()
    if denoised_fn is not None:
        pred_x0 = denoised_fn(pred_x0)
    direction = (1.0 - alpha_prev - sigma ** 2).sqrt() * eps
    x_prev = alpha_prev.sqrt() * pred_x0 + direction
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, pred_x0


def plms_eps(e_t: Tensor, old_eps: Sequence[Tensor]) -> Tensor:
    """Adams-Bashforth combination of the current eps with 1 to 3 previous ones (oldest first)."""
    order = min(len(old_eps), 3) + 1
    if order < 2:
        raise ValueError("plms_eps needs at least one previous eps; the first PLMS step uses the Heun start")
    coeffs, denom = _ADAMS_BASHFORTH[order]
    history = [e_t, *reversed(list(old_eps)[-(order - 1):])]  # newest first
    return sum(c * e for c, e in zip(coeffs, history)) / denom


def plms_first_eps(e_t: Tensor, e_next: Tensor) -> Tensor:
    """Pseudo improved-Euler start: average of eps at x_t and at the DDIM-predicted x_prev."""
    return (e_t + e_next) / 2


def guided_eps(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: eps_u + scale * (eps_c - eps_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def cat_conditioning(uncond: Conditioning, cond: Conditioning) -> Conditioning:
    """Batch-concatenate [uncond, cond] for tensors, lists of tensors, or dicts of either."""
    if isinstance(cond, Tensor):
        return torch.cat([uncond, cond])
    if isinstance(cond, dict):
        return {k: cat_conditioning(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, (list, tuple)):
        return [cat_conditioning(u, c) for u, c in zip(uncond, cond)]
    raise TypeError(f"cannot batch conditioning of type {type(cond).__name__}; pass a tensor, list or dict")


def predict_eps(apply_model: Callable[[Tensor, Tensor, Any], Tensor], x: Tensor, t: Tensor, cond: Conditioning,
                uncond: Conditioning = None, scale: float = 1.0) -> Tensor:
    """Model eps in float32, with classifier-free guidance as one batched call when it applies."""
    if uncond is None or scale == 1.0:
        return apply_model(x, t, cond).float()
    x_in = torch.cat([x, x])  # [2B, C, H, W]
    t_in = torch.cat([t, t])  # [2B]
    eps_u, eps_c = apply_model(x_in, t_in, cat_conditioning(uncond, cond)).float().chunk(2)
    return guided_eps(eps_u, eps_c, scale)


def sample_noise(shape: Sequence[int], device: torch.device, generator: torch.Generator | None = None,
                 temperature: float = 1.0, noise_dropout: float = 0.0) -> Tensor:
    """Standard normal noise (from `generator` if given) times temperature, with optional dropout."""
    if generator is None:
        noise = torch.randn(tuple(shape), device=device)
    else:
        noise = torch.randn(tuple(shape), generator=generator, device=generator.device).to(device)
    noise = noise * temperature
    if noise_dropout > 0.0:
        if generator is None:
            keep = torch.rand(noise.shape, device=device) >= noise_dropout
        else:
            keep = (torch.rand(noise.shape, generator=generator, device=generator.device) >= noise_dropout).to(device)
        noise = noise * keep / (1.0 - noise_dropout)
    return noise


def q_sample(x0: Tensor, alpha: Tensor, noise: Tensor) -> Tensor:
    """Forward diffusion sqrt(a) x0 + sqrt(1 - a) noise; `alpha` broadcasts against x0."""
    return alpha.sqrt() * x0 + (1.0 - alpha).sqrt() * noise
