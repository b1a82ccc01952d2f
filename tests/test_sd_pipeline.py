"""Stable Diffusion v1 as a whole: checkpoint layout, save/load, diffusers' single-file loader on our
files, and end-to-end guided DDIM / PLMS sampling against diffusers with the same weights.

The reference is diffusers (UNet2DConditionModel, AutoencoderKL, DDIM/PNDM schedulers,
StableDiffusionPipeline) and transformers' CLIPTextModel, loaded from OUR SD-layout weights through
diffusers' own conversion code. Zero-initialised weights are randomised so every weight matters.
"""
from __future__ import annotations

import gc
import logging
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import sd_v1_key_table, sd_v1_shapes
from helpers_diffusers import (
    SD_DDIM_KWARGS,
    diffusers_guided_sample,
    diffusers_unet,
    diffusers_vae,
    randomize_,
    sd_ddim_scheduler,
    transformers_clip,
)
from ldm.checkpoint import CheckpointError, load_weights, read_state_dict, save_checkpoint
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.plms import PLMSSampler
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
FULL_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
TINY_CONFIG = ROOT / "configs" / "tiny" / "v1-inference.yaml"
MODEL_GROUPS = ("model", "first_stage", "cond_stage", "schedule")
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
PROMPTS = ["a photo of a woman, studio lighting", "portrait of a man wearing glasses"]
GUIDANCE = 7.5
DDIM_STEPS = 10
# Guided sampling with random weights is chaotic: latents grow to ~40 and adding 1e-6 noise to x_T
# moves a 10-step guided DDIM sample by ~3e-5 x max|sample| (50 steps: ~2e-3). Parity tolerances of
# sampled outputs are therefore relative to the reference's max |value|; a wrong step rule, schedule
# or guidance formula shows up as differences of order 1e-1 or more.
SAMPLING_RTOL = 1e-4


def build_model(config_path: Path, seed: int = 0) -> LatentDiffusion:
    """LatentDiffusion from an LDM config with random weights (zero-initialised ones randomised too)."""
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.load(config_path).model)
    return randomize_(model, seed).eval()


def max_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    return (ours - ref).abs().max().item()


def guided_ddim(model: LatentDiffusion, x_T: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """Our 10-step DDIM sample (eta 0, guidance 7.5) from ``x_T``, as the original scripts call it."""
    samples, _ = DDIMSampler(model).sample(
        S=DDIM_STEPS, batch_size=x_T.shape[0], shape=tuple(x_T.shape[1:]), conditioning=cond,
        unconditional_conditioning=uncond, unconditional_guidance_scale=GUIDANCE, eta=0.0, x_T=x_T,
        verbose=False)
    return samples


@pytest.fixture(scope="module")
def tiny_model() -> LatentDiffusion:
    return build_model(TINY_CONFIG)


@pytest.fixture(scope="module")
def full_model():
    """The full SD v1 LatentDiffusion (~4.3 GB fp32), built once for this module's full-size tests."""
    model = build_model(FULL_CONFIG)
    yield model
    del model
    gc.collect()


@pytest.fixture(scope="module")
def tiny_file(tiny_model: LatentDiffusion, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-sd-v1.safetensors", tiny_model.state_dict())


# ------------------------------------------------------------------ layout and schedule


@pytest.mark.usefixtures("shared_fixtures")  # checked before the full model is built
def test_full_model_has_exactly_the_sd_v1_checkpoint_keys(full_model: LatentDiffusion) -> None:
    expected = sd_v1_shapes(*MODEL_GROUPS)
    ours = {k: tuple(v.shape) for k, v in full_model.state_dict().items()}
    if POSITION_IDS not in ours:  # a deterministic buffer; checkpoints may carry it, models need not
        expected.pop(POSITION_IDS)
    assert sorted(set(expected) - set(ours)) == [], "keys of the SD v1 checkpoint that the model lacks"
    assert sorted(set(ours) - set(expected)) == [], "model keys that SD v1 checkpoints do not have"
    wrong = {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]}
    assert wrong == {}, f"shape mismatches (ours, checkpoint): {wrong}"
    assert len(ours) == 686 + 248 + 196 + 12 + (POSITION_IDS in ours)


@pytest.mark.parametrize("which", ["tiny_model", "full_model"])
def test_schedule_buffers_are_sd_v1_values(which: str, request: pytest.FixtureRequest) -> None:
    from diffusers import DDPMScheduler

    model = request.getfixturevalue(which)
    betas64 = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    acp64 = torch.cumprod(1.0 - betas64, dim=0)
    acp_prev64 = torch.cat([torch.ones(1, dtype=torch.float64), acp64[:-1]])
    posterior_variance64 = betas64 * (1.0 - acp_prev64) / (1.0 - acp64)
    expected = {
        "betas": betas64,
        "alphas_cumprod": acp64,
        "alphas_cumprod_prev": acp_prev64,
        "sqrt_alphas_cumprod": acp64.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - acp64).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - acp64).log(),
        "sqrt_recip_alphas_cumprod": acp64.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / acp64 - 1.0).sqrt(),
        "posterior_variance": posterior_variance64,
        "posterior_log_variance_clipped": posterior_variance64.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas64 * acp_prev64.sqrt() / (1.0 - acp64),
        "posterior_mean_coef2": (1.0 - acp_prev64) * (1.0 - betas64).sqrt() / (1.0 - acp64),
    }
    for name, value in expected.items():
        buffer = getattr(model.diffusion, name)
        assert buffer.dtype == torch.float32, f"{name} is {buffer.dtype}, SD stores float32"
        torch.testing.assert_close(buffer, value.float(), rtol=1e-6, atol=0, msg=lambda m: f"{name}: {m}")
    assert torch.equal(model.diffusion.betas, betas64.float()), "betas must be computed in float64 then stored as float32"
    assert model.diffusion.alphas_cumprod[-1].item() == pytest.approx(0.00466, abs=1e-5)  # SD v1 alpha_bar_T
    assert model.diffusion.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(1e-20))

    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    diff = max_diff(model.diffusion.alphas_cumprod, reference.alphas_cumprod)
    assert diff <= 1e-6, f"alphas_cumprod vs diffusers DDPMScheduler: max abs diff {diff:.2e} > 1e-6"
    diff = max_diff(model.diffusion.betas, reference.betas)
    assert diff <= 1e-8, f"betas vs diffusers DDPMScheduler: max abs diff {diff:.2e} > 1e-8"


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_save_read_load_round_trip_is_exact(tiny_model: LatentDiffusion, tmp_path: Path, suffix: str) -> None:
    saved = tiny_model.state_dict()
    path = save_checkpoint(tmp_path / f"model{suffix}", saved)
    state = read_state_dict(path)
    assert state.keys() == saved.keys()
    fresh = instantiate_from_config(OmegaConf.load(TINY_CONFIG).model).eval()
    assert not torch.equal(fresh.model.diffusion_model.out[2].weight, tiny_model.model.diffusion_model.out[2].weight)

    report = load_weights(fresh, state)

    assert report.loaded == len(saved) and report.allowed_missing == [] and report.ignored_unexpected == []
    for key, value in fresh.state_dict().items():
        assert value.dtype == saved[key].dtype and torch.equal(value, saved[key]), f"{key} differs after the round trip"
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.equal(fresh.apply_model(x, torch.tensor([500]), context),
                           tiny_model.apply_model(x, torch.tensor([500]), context))


@pytest.mark.usefixtures("shared_fixtures")  # checked before the full model is built
def test_released_full_layout_with_ema_loads_without_ema(full_model: LatentDiffusion) -> None:
    """Every key of a released SD v1 file: no missing key; EMA shadows and position_ids ignored."""
    own = full_model.state_dict()
    table = sd_v1_key_table()
    # tensors the model lacks are zero-stride stand-ins of the right shape (no 3.4 GB EMA copy)
    state = {k: own[k] if k in own else torch.zeros(()).expand(shape) for k, (shape, _) in table.items()}
    marker = "model.diffusion_model.out.2.bias"
    original = own[marker].clone()
    state[marker] = original + 1.0
    try:
        report = load_weights(full_model, state, use_ema=False)
        assert torch.equal(full_model.state_dict()[marker], original + 1.0), "checkpoint values must be loaded"
    finally:
        full_model.state_dict()[marker].copy_(original)
    ema = [k for k, (_, group) in table.items() if group == "ema"]
    assert len(ema) == 688
    assert sorted(report.ignored_unexpected) == sorted(ema + [k for k in [POSITION_IDS] if k not in own])
    assert report.loaded == len(own) and report.allowed_missing == [] and not report.used_ema
    assert full_model.model.diffusion_model.input_blocks[0][0].weight.any(), "EMA stand-ins must not be loaded"


def test_tiny_checkpoint_into_full_config_is_a_clear_error(
    full_model: LatentDiffusion, tiny_model: LatentDiffusion, tmp_path: Path
) -> None:
    tiny_state = tiny_model.state_dict()
    tiny_state["betas"] = torch.zeros(1000)  # would show if anything were loaded before the error
    path = save_checkpoint(tmp_path / "tiny.safetensors", tiny_state)
    with pytest.raises(CheckpointError) as missing:
        full_model.init_from_ckpt(str(path))
    message = str(missing.value)
    assert "\n" not in message and "config does not match" in message
    assert "model.diffusion_model.input_blocks.2.0.in_layers.0.weight" in message  # absent at num_res_blocks 1
    assert full_model.diffusion.betas.any(), "nothing may be loaded from a rejected checkpoint"

    # same key set, tiny shapes: the error names the key and both shapes
    state = dict(full_model.state_dict())
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = tiny_state[key]
    with pytest.raises(CheckpointError) as mismatch:
        load_weights(full_model, state)
    message = str(mismatch.value)
    assert "\n" not in message and key in message
    assert "(32, 4, 3, 3)" in message and "(320, 4, 3, 3)" in message, message


def test_yaml_passed_as_checkpoint_is_a_one_line_error(tiny_model: LatentDiffusion) -> None:
    for load in (read_state_dict, tiny_model.init_from_ckpt):
        with pytest.raises(CheckpointError) as error:
            load(str(TINY_CONFIG))
        message = str(error.value)
        assert "\n" not in message and str(TINY_CONFIG) in message, message


# ------------------------------------------------------------------ diffusers reads our files


def test_diffusers_component_loaders_read_our_safetensors(tiny_model: LatentDiffusion, tiny_file: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    kwargs = dict(original_config=str(TINY_CONFIG), local_files_only=True)
    unet = UNet2DConditionModel.from_single_file(str(tiny_file), **kwargs).eval()
    vae = AutoencoderKL.from_single_file(str(tiny_file), **kwargs).eval()
    assert vae.config.scaling_factor == tiny_model.scale_factor == 0.18215

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([17, 901])
    context = torch.randn(2, 77, 32, generator=gen)
    z = torch.randn(1, 4, 8, 8, generator=gen)
    image = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        eps, eps_ref = tiny_model.apply_model(x, t, context), unet(x, t, encoder_hidden_states=context).sample
        decoded = tiny_model.decode_first_stage(z)
        decoded_ref = vae.decode(z / vae.config.scaling_factor).sample
        mean = tiny_model.encode_first_stage(image).mean
        mean_ref = vae.encode(image).latent_dist.mean
    assert eps.abs().max() > 0.1 and decoded.std() > 0.1, "degenerate outputs would make the comparison vacuous"
    diffs = {"eps": max_diff(eps, eps_ref), "decode": max_diff(decoded, decoded_ref),
             "encode": max_diff(mean, mean_ref)}
    logger.info("single-file loaders vs ours: %s", diffs)
    # tolerance: max abs diff <= 1e-5 in fp32 (same weights, different kernels)
    assert all(d <= 1e-5 for d in diffs.values()), f"max abs diffs vs diffusers' single-file models: {diffs}"


def test_diffusers_pipeline_from_our_file_samples_like_ours(
    tiny_model: LatentDiffusion, tiny_file: Path, tmp_path: Path
) -> None:
    """StableDiffusionPipeline.from_single_file on our file, offline: prompts in, same latents and image out."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    # diffusers' legacy loader fetches CLIP's config and tokenizer from the hub; pass local ones instead
    embedder = tiny_model.cond_stage_model
    pipe = StableDiffusionPipeline.from_single_file(
        str(tiny_file), original_config=str(TINY_CONFIG), local_files_only=True,
        text_encoder=transformers_clip(tiny_model.state_dict(), embedder.text_model.config, tmp_path),
        tokenizer=CLIPTokenizer(vocab=embedder.tokenizer.vocab, merges=embedder.tokenizer.merges, model_max_length=77),
        scheduler=sd_ddim_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))

    with torch.no_grad():
        cond = tiny_model.get_learned_conditioning(PROMPTS)
        uncond = tiny_model.get_learned_conditioning([""] * len(PROMPTS))
        samples = guided_ddim(tiny_model, x_T, cond, uncond)
        decoded = tiny_model.decode_first_stage(samples)
        latents_ref = pipe(PROMPTS, height=128, width=128, num_inference_steps=DDIM_STEPS, guidance_scale=GUIDANCE,
                           eta=0.0, latents=x_T.clone(), output_type="latent").images
        decoded_ref = pipe.vae.decode(latents_ref / pipe.vae.config.scaling_factor).sample

    assert samples.abs().max() > 0.1 and not torch.allclose(samples[0], samples[1], atol=1e-2)
    scales = {"latents": latents_ref.abs().max().item(), "decoded": decoded_ref.abs().max().item()}
    diffs = {"latents": max_diff(samples, latents_ref), "decoded": max_diff(decoded, decoded_ref)}
    logger.info("tiny pipeline parity: max abs diffs %s, max |ref| %s", diffs, scales)
    # tolerance: max abs diff <= 1e-4 x max|ref| (fp32); see SAMPLING_RTOL
    for name, diff in diffs.items():
        assert diff <= SAMPLING_RTOL * scales[name], f"{name}: ours vs StableDiffusionPipeline max abs diff {diff:.3e}"


# ------------------------------------------------------------------ end-to-end sampling


def assert_guided_ddim_parity(model: LatentDiffusion, config_path: Path, x_T: torch.Tensor, prompts: list[str],
                              rtol: float) -> None:
    checkpoint = model.state_dict()
    unet, vae = diffusers_unet(checkpoint, config_path), diffusers_vae(checkpoint, config_path)
    with torch.no_grad():
        cond = model.get_learned_conditioning(prompts)
        uncond = model.get_learned_conditioning([""] * len(prompts))
        samples = guided_ddim(model, x_T, cond, uncond)
        decoded = model.decode_first_stage(samples)
        latents_ref = diffusers_guided_sample(unet, sd_ddim_scheduler(), x_T, cond, uncond, scale=GUIDANCE,
                                              steps=DDIM_STEPS)
        decoded_ref = vae.decode(latents_ref / 0.18215).sample
    del unet, vae
    scales = {"latents": latents_ref.abs().max().item(), "decoded": decoded_ref.abs().max().item()}
    diffs = {"latents": max_diff(samples, latents_ref), "decoded": max_diff(decoded, decoded_ref)}
    logger.info("guided DDIM parity (%s): max abs diffs %s, max |ref| %s", config_path.parent.name, diffs, scales)
    assert scales["latents"] > 0.1 and decoded_ref.std() > 1e-2, "degenerate sample: the comparison would be vacuous"
    for name, diff in diffs.items():
        assert diff <= rtol * scales[name], (
            f"{name}: max abs diff {diff:.3e} > {rtol} x max|ref| ({scales[name]:.3e}) after {DDIM_STEPS} guided "
            "DDIM steps (fp32)")


def test_tiny_guided_ddim_matches_diffusers() -> None:
    model = build_model(TINY_CONFIG, seed=3)
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    # tolerance: max abs diff <= 1e-4 x max|ref| on latents and decoded images (fp32; see SAMPLING_RTOL)
    assert_guided_ddim_parity(model, TINY_CONFIG, x_T, PROMPTS, rtol=SAMPLING_RTOL)


@pytest.mark.slow
def test_full_guided_ddim_matches_diffusers(full_model: LatentDiffusion) -> None:
    """256 px (32x32 latent), batch 1: 10 batched UNet calls each for ours and for diffusers."""
    x_T = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    # tolerance: max abs diff <= 1e-4 x max|ref| on latents and decoded images (fp32; see SAMPLING_RTOL)
    assert_guided_ddim_parity(full_model, FULL_CONFIG, x_T, PROMPTS[:1], rtol=SAMPLING_RTOL)
    gc.collect()


def test_plms_makes_51_unet_calls_for_50_steps(tiny_model: LatentDiffusion) -> None:
    with torch.no_grad():
        cond = tiny_model.get_learned_conditioning(PROMPTS[:1])
        uncond = tiny_model.get_learned_conditioning([""])
    batch_sizes: list[int] = []
    hook = tiny_model.model.diffusion_model.register_forward_hook(
        lambda module, args, output: batch_sizes.append(args[0].shape[0]))
    try:
        PLMSSampler(tiny_model).sample(
            S=50, batch_size=1, shape=(4, 8, 8), conditioning=cond, unconditional_conditioning=uncond,
            unconditional_guidance_scale=GUIDANCE, x_T=torch.randn(1, 4, 8, 8), verbose=False)
    finally:
        hook.remove()
    assert len(batch_sizes) == 51, f"PLMS made {len(batch_sizes)} UNet calls for 50 steps, expected 51"
    assert set(batch_sizes) == {2}, "guidance must batch the conditional and unconditional passes"


def test_tiny_guided_plms_matches_diffusers_pndm(tiny_model: LatentDiffusion) -> None:
    """10 PLMS steps use every rule: the Heun start and the 2nd, 3rd and 4th order Adams-Bashforth steps."""
    from diffusers import PNDMScheduler

    with torch.no_grad():
        cond = tiny_model.get_learned_conditioning(PROMPTS)
        uncond = tiny_model.get_learned_conditioning([""] * len(PROMPTS))
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    samples, _ = PLMSSampler(tiny_model).sample(
        S=DDIM_STEPS, batch_size=2, shape=(4, 8, 8), conditioning=cond, unconditional_conditioning=uncond,
        unconditional_guidance_scale=GUIDANCE, x_T=x_T, verbose=False)
    scheduler_kwargs = {k: v for k, v in SD_DDIM_KWARGS.items() if k != "clip_sample"}
    scheduler = PNDMScheduler(skip_prk_steps=True, **scheduler_kwargs)  # LDM's PLMS, Heun start included
    unet = diffusers_unet(tiny_model.state_dict(), TINY_CONFIG)
    reference = diffusers_guided_sample(unet, scheduler, x_T, cond, uncond, scale=GUIDANCE, steps=DDIM_STEPS)
    diff, scale = max_diff(samples, reference), reference.abs().max().item()
    logger.info("PLMS vs diffusers PNDM (%d steps): max abs diff %.3e, max|ref| %.3e", DDIM_STEPS, diff, scale)
    assert scale > 0.1
    # tolerance: max abs diff <= 5e-4 x max|ref| (fp32; measured ~1e-4). PNDM writes the update as a
    # rearranged DDIM step and the Adams-Bashforth sums (55, -59, 37, -9)/24 magnify its rounding
    # differences, which the chaotic guided chain then amplifies (see SAMPLING_RTOL)
    assert diff <= 5 * SAMPLING_RTOL * scale, f"PLMS vs PNDM: max abs diff {diff:.3e} > 5e-4 x {scale:.3e}"
