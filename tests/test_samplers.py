"""DDIM / PLMS samplers: timestep spacing, call counts, determinism, and parity with diffusers."""
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling_steps import make_ddim_timesteps, plms_eps

SHAPE = (4, 8, 8)  # latent (C, H, W)
BATCH = 2
PARITY_ATOL = 1e-5  # fp32 max abs diff vs diffusers


class FakeEpsModel(torch.nn.Module):
    """Deterministic eps model with the real SD v1 scaled-linear schedule; counts apply_model calls."""

    parameterization = "eps"

    def __init__(self) -> None:
        super().__init__()
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.register_buffer("betas", betas.float())
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.register_buffer("alphas_cumprod_prev", torch.cat([torch.ones(1, dtype=torch.float64),
                                                               alphas_cumprod[:-1]]).float())
        self.num_timesteps = 1000
        self.calls = 0
        self.batch_sizes: list[int] = []

    @property
    def diffusion(self) -> "FakeEpsModel":
        """The schedule the samplers read (a real model's is its GaussianDiffusion part)."""
        return self

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        alpha = self.alphas_cumprod[t].view(-1, 1, 1, 1)  # [B, 1, 1, 1]
        w = (0.5 + t.float() / 1000).view(-1, 1, 1, 1)  # [B, 1, 1, 1]
        c_term = c.mean(dim=(1, 2)).view(-1, 1, 1, 1)  # [B, 1, 1, 1]
        # sqrt(1 - a) x plus a bounded nonlinear residual: keeps pred_x0 at data scale, like a real denoiser
        residual = 0.5 * torch.tanh(x * w) + 0.3 * c_term + 0.1 * torch.sin(3 * x + c_term)
        return (1 - alpha).sqrt() * x + alpha.sqrt() * residual


@pytest.fixture
def model() -> FakeEpsModel:
    return FakeEpsModel()


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "x_T": torch.randn(BATCH, *SHAPE, generator=g),
        "cond": torch.randn(BATCH, 5, 16, generator=g),
        "uncond": torch.randn(BATCH, 5, 16, generator=g),
    }


def _reference_eps(model: FakeEpsModel, x: torch.Tensor, t: int, cond: torch.Tensor,
                   uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Guidance computed with two separate model calls (the sampler batches them)."""
    ts = torch.full((x.shape[0],), int(t), dtype=torch.long)
    eps_c = model.apply_model(x, ts, cond)
    if uncond is None:
        return eps_c
    eps_u = model.apply_model(x, ts, uncond)
    return eps_u + scale * (eps_c - eps_u)


def _diffusers_loop(scheduler, model, inputs, steps: int, scale: float, use_uncond: bool) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    x = inputs["x_T"].clone()
    uncond = inputs["uncond"] if use_uncond else None
    for t in scheduler.timesteps:
        eps = _reference_eps(model, x, int(t), inputs["cond"], uncond, scale)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def _sd_scheduler_kwargs() -> dict:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                set_alpha_to_one=False, steps_offset=1)


def test_uniform_timesteps_and_final_alpha(model):
    timesteps = make_ddim_timesteps(50, 1000, "uniform")
    assert timesteps.tolist() == list(range(1, 1000, 20))
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=50, verbose=False)
    sched = sampler.step_schedule
    assert sampler.ddim_timesteps.tolist() == list(range(1, 1000, 20))
    assert sched.alphas_prev[0] == model.alphas_cumprod[0], "final step must move to alphas_cumprod[0], not 1.0"
    assert torch.equal(sched.alphas, model.alphas_cumprod[timesteps])
    assert torch.equal(sched.alphas_prev[1:], model.alphas_cumprod[timesteps[:-1]])
    assert torch.count_nonzero(sched.sigmas) == 0


def test_plms_first_step_costs_one_extra_call(model, inputs):
    sampler = PLMSSampler(model)
    sampler.sample(50, BATCH, SHAPE, conditioning=inputs["cond"], x_T=inputs["x_T"], verbose=False)
    assert model.calls == 51


def test_guidance_is_one_batched_call(model, inputs):
    sampler = DDIMSampler(model)
    sampler.sample(10, BATCH, SHAPE, conditioning=inputs["cond"], x_T=inputs["x_T"], verbose=False,
                   unconditional_guidance_scale=7.5, unconditional_conditioning=inputs["uncond"])
    assert model.calls == 10 and set(model.batch_sizes) == {2 * BATCH}
    model.batch_sizes.clear()
    sampler.sample(10, BATCH, SHAPE, conditioning=inputs["cond"], x_T=inputs["x_T"], verbose=False,
                   unconditional_guidance_scale=1.0, unconditional_conditioning=inputs["uncond"])
    assert set(model.batch_sizes) == {BATCH}, "scale 1 must skip the unconditional pass"


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_ddim_matches_diffusers(model, inputs, steps, scale):
    """Same maths; the ~2e-6 left comes from diffusers' fp32 cumprod of the betas (ours is fp64, as in LDM)."""
    use_uncond = scale != 1.0
    ours, _ = DDIMSampler(model).sample(
        steps, BATCH, SHAPE, conditioning=inputs["cond"], x_T=inputs["x_T"], eta=0.0, verbose=False,
        unconditional_guidance_scale=scale, unconditional_conditioning=inputs["uncond"] if use_uncond else None)
    scheduler = DDIMScheduler(clip_sample=False, **_sd_scheduler_kwargs())
    ref = _diffusers_loop(scheduler, model, inputs, steps, scale, use_uncond)
    diff = (ours - ref).abs().max().item()
    assert diff <= PARITY_ATOL, f"DDIM vs diffusers max abs diff {diff:.3e} > {PARITY_ATOL} (fp32)"


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_plms_matches_diffusers_pndm(model, inputs, steps, scale):
    """PNDM with skip_prk_steps is LDM's PLMS, Heun start included (it repeats the first timestep)."""
    use_uncond = scale != 1.0
    ours, _ = PLMSSampler(model).sample(
        steps, BATCH, SHAPE, conditioning=inputs["cond"], x_T=inputs["x_T"], verbose=False,
        unconditional_guidance_scale=scale, unconditional_conditioning=inputs["uncond"] if use_uncond else None)
    scheduler = PNDMScheduler(skip_prk_steps=True, **_sd_scheduler_kwargs())
    ref = _diffusers_loop(scheduler, model, inputs, steps, scale, use_uncond)
    diff = (ours - ref).abs().max().item()
    assert diff <= PARITY_ATOL, f"PLMS vs diffusers PNDM max abs diff {diff:.3e} > {PARITY_ATOL} (fp32)"


def test_eta_with_generator_is_deterministic_and_stochastic(model, inputs):
    sampler = DDIMSampler(model)
    kwargs = dict(conditioning=inputs["cond"], x_T=inputs["x_T"], verbose=False)
    first, _ = sampler.sample(10, BATCH, SHAPE, eta=1.0, generator=torch.Generator().manual_seed(7), **kwargs)
    again, _ = sampler.sample(10, BATCH, SHAPE, eta=1.0, generator=torch.Generator().manual_seed(7), **kwargs)
    other, _ = sampler.sample(10, BATCH, SHAPE, eta=1.0, generator=torch.Generator().manual_seed(8), **kwargs)
    plain, _ = sampler.sample(10, BATCH, SHAPE, eta=0.0, **kwargs)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-2
    assert (first - plain).abs().max() > 1e-2
    assert torch.count_nonzero(sampler.step_schedule.sigmas) == 0  # last make_schedule used eta 0


def test_x_T_drawn_from_generator(model, inputs):
    sampler = DDIMSampler(model)
    a, _ = sampler.sample(5, BATCH, SHAPE, conditioning=inputs["cond"], verbose=False,
                          generator=torch.Generator().manual_seed(3))
    b, _ = sampler.sample(5, BATCH, SHAPE, conditioning=inputs["cond"], verbose=False,
                          x_T=torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(a, b)


def test_plms_rejects_eta(model, inputs):
    with pytest.raises(ValueError, match="ddim_eta must be 0 for PLMS"):
        PLMSSampler(model).sample(10, BATCH, SHAPE, conditioning=inputs["cond"], eta=0.5, verbose=False)


def test_only_eps_parameterization(model):
    model.parameterization = "v"
    with pytest.raises(NotImplementedError, match="parameterization"):
        DDIMSampler(model)


def test_bad_x_T_shape(model, inputs):
    with pytest.raises(ValueError, match="x_T has shape"):
        DDIMSampler(model).sample(5, BATCH + 1, SHAPE, conditioning=inputs["cond"], x_T=inputs["x_T"],
                                  verbose=False)


def test_intermediates_and_callbacks(model, inputs):
    seen: list[int] = []
    pred: list[int] = []
    samples, inter = DDIMSampler(model).sample(
        20, BATCH, SHAPE, conditioning=inputs["cond"], x_T=inputs["x_T"], verbose=False, log_every_t=5,
        callback=seen.append, img_callback=lambda x0, i: pred.append(i))
    assert seen == list(range(20)) and pred == list(range(20))
    # start + first step (index 19) + indices 15, 10, 5, 0
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) == 6
    assert torch.equal(inter["x_inter"][0], inputs["x_T"]) and torch.equal(inter["x_inter"][-1], samples)


def test_decode_all_steps_equals_sample(model, inputs):
    sampler = DDIMSampler(model)
    kwargs = dict(unconditional_guidance_scale=5.0, unconditional_conditioning=inputs["uncond"])
    sampled, _ = sampler.sample(10, BATCH, SHAPE, conditioning=inputs["cond"], x_T=inputs["x_T"],
                                verbose=False, **kwargs)
    decoded = sampler.decode(inputs["x_T"], inputs["cond"], t_start=10, verbose=False, **kwargs)
    assert torch.equal(sampled, decoded)


def test_stochastic_encode_uses_ddim_index(model):
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=50, verbose=False)
    x0 = torch.randn(BATCH, *SHAPE)
    noise = torch.randn(BATCH, *SHAPE)
    z = sampler.stochastic_encode(x0, torch.tensor([30] * BATCH), noise=noise)
    alpha = model.alphas_cumprod[30 * 20 + 1]  # DDIM index 30 is DDPM timestep 601
    expected = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    assert torch.allclose(z, expected, atol=1e-6)


def test_zero_mask_keeps_sample(model, inputs):
    sampler = DDIMSampler(model)
    kwargs = dict(conditioning=inputs["cond"], x_T=inputs["x_T"], verbose=False)
    plain, _ = sampler.sample(10, BATCH, SHAPE, **kwargs)
    masked, _ = sampler.sample(10, BATCH, SHAPE, mask=torch.zeros(BATCH, *SHAPE), x0=torch.randn(BATCH, *SHAPE),
                               generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(plain, masked)


def test_plms_eps_weights():
    e = [torch.full((1,), float(v)) for v in (1.0, 2.0, 4.0, 8.0)]  # oldest .. newest
    assert plms_eps(e[3], e[2:3]).item() == pytest.approx((3 * 8 - 4) / 2)
    assert plms_eps(e[3], e[1:3]).item() == pytest.approx((23 * 8 - 16 * 4 + 5 * 2) / 12)
    assert plms_eps(e[3], e[0:3]).item() == pytest.approx((55 * 8 - 59 * 4 + 37 * 2 - 9 * 1) / 24)


@pytest.mark.parametrize("steps", [3, 7, 333, 999])
def test_step_counts_that_do_not_divide_1000_stay_in_range(steps):
    timesteps = make_ddim_timesteps(steps, 1000)
    assert len(timesteps) == steps
    assert int(timesteps.max()) <= 999 and int(timesteps.min()) == 1
