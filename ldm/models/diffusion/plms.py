"""PLMS sampler (pseudo linear multistep, Liu et al. 2022) with the original LDM `PLMSSampler` API.

The first step is the pseudo improved-Euler (Heun) start, which calls the model twice, so S steps
make S + 1 model calls; later steps combine the last 2-4 eps with Adams-Bashforth weights.
"""
import torch
from torch import Tensor

from ldm.models.diffusion.ddim import SamplerBase, StepFn, StepOptions
from ldm.models.diffusion.sampling_steps import StepSchedule, plms_eps, plms_first_eps


class PLMSSampler(SamplerBase):
    """Pseudo linear multistep sampler; deterministic (eta must be 0)."""

    name = "PLMS"

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        if ddim_eta != 0:
            raise ValueError(f"ddim_eta must be 0 for PLMS, got {ddim_eta}; use DDIMSampler for eta > 0")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)

    def _step_fn(self, sched: StepSchedule, opts: StepOptions) -> StepFn:
        old_eps: list[Tensor] = []  # eps at the previous steps, oldest first (at most 3 kept)

        def step(x: Tensor, ts: Tensor, index: int) -> tuple[Tensor, Tensor]:
            e_t = self._eps(x, ts, opts)
            if old_eps:
                e_prime = plms_eps(e_t, old_eps)
            else:
                x_next, _ = self._update(x, e_t, index, sched, opts)
                t_next = torch.full_like(ts, sched.timestep_values[max(index - 1, 0)])  # [B]
                e_prime = plms_first_eps(e_t, self._eps(x_next, t_next, opts))
            old_eps.append(e_t)
            if len(old_eps) > 3:
                old_eps.pop(0)
            return self._update(x, e_prime, index, sched, opts)

        return step
