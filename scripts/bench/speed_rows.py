"""Benchmark rows of the fast paths: prompt-to-image sampling against StableDiffusionPipeline, and the
TI step and sampling with ``--compile_unet`` against diffusers eager and with ``torch.compile``.

- ``sample_ddim{S}_b{B}``: what ``stable_txt2img.py`` runs per batch (the prompts encoded, the
  negative prompt's conditioning reused, S guided DDIM steps at scale 7.5, the decode) against
  ``StableDiffusionPipeline(prompt, num_inference_steps=S, guidance_scale=7.5)`` with its weights in
  the run's precision (no autocast, as users run it).
- ``ti_compiled_b{n}``: our TI step with the UNet compiled (``auto``: CUDA graphs on a GPU), once
  against diffusers' recipe eager and once against the recipe with ``unet = torch.compile(unet)``.
- ``sample_compiled_ddim{S}_b{B}``: the sampling row with our UNet compiled, against the eager pipeline.

Compilation happens in warm-up calls before timing; its time is in the note. FLOPs are counted on
the eager calls (the same arithmetic).
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Callable

import torch

from ldm.models.diffusion.ddim import DDIMSampler
from . import reference
from .measure import measure_pair, tensor_bytes, timed, with_state
from .table import Row

if TYPE_CHECKING:
    from .context import Bench

GUIDANCE = 7.5
PROMPT = "a photo of a * woman"
COMPILE_WARMUP_CALLS = 3  # compile, then (CUDA graphs) record, then replay


def ours_sampling(b: Bench, prompts: list[str], x_T: torch.Tensor) -> Callable[[], torch.Tensor]:
    """stable_txt2img.py's work for one batch, under the run's precision."""
    model, sampler, steps = b.ours, DDIMSampler(b.ours), b.args.sample_steps

    @torch.inference_mode()
    def run() -> torch.Tensor:
        cond = model.get_learned_conditioning(prompts)
        uncond = model.fixed_conditioning("", len(prompts))
        latents, _ = sampler.sample(S=steps, conditioning=cond, batch_size=len(prompts), shape=tuple(x_T.shape[1:]),
                                    verbose=False, unconditional_guidance_scale=GUIDANCE,
                                    unconditional_conditioning=uncond, eta=0.0, x_T=x_T)
        return model.decode_first_stage(latents)

    return b.under_precision(run)


def pipeline_sampling(b: Bench, prompts: list[str], x_T: torch.Tensor) -> Callable[[], torch.Tensor]:
    """StableDiffusionPipeline with every weight in the run's dtype (``torch_dtype=`` in diffusers)."""
    dtype = b.half_or_float32
    text_model = b.placed(copy.deepcopy(b.text_model), b.weight_dtype)
    tokenizer = b.ours.cond_stage_model.tokenizer
    pipe = reference.pipeline(b.unet, b.vae, text_model, tokenizer.vocab, tokenizer.merges)
    latents = x_T.to(dtype)

    @torch.inference_mode()
    def run() -> torch.Tensor:
        return pipe(prompts, height=b.args.size, width=b.args.size, num_inference_steps=b.args.sample_steps,
                    guidance_scale=GUIDANCE, eta=0.0, latents=latents, output_type="pt").images

    return run


def sample_rows(b: Bench) -> list[Row]:
    n, steps = b.args.batch, b.args.sample_steps
    prompts, x_T = [PROMPT] * n, b.randn(n, *b.latent_shape)
    ours, pipe = ours_sampling(b, prompts, x_T), pipeline_sampling(b, prompts, x_T)
    ours_m, pipe_m = measure_pair(ours, pipe, b.device, b.args.repeats)
    return [Row(f"sample_ddim{steps}_b{n}", "SD pipeline", ours_m, pipe_m,
                f"{b.args.size}px, scale {GUIDANCE}, prompt to decoded image", b.flops(ours), b.flops(pipe))]


def warm_up(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of the first call (the compilation) after running ``fn`` COMPILE_WARMUP_CALLS times."""
    first = timed(fn, device)
    for _ in range(COMPILE_WARMUP_CALLS - 1):
        fn()
    return first


def compiled_ti_rows(b: Bench, n: int) -> list[Row]:
    ours = b.ti_step(n)
    eager_ref = b.reference_ti_step(ours)
    flops = b.flops(ours), b.flops(eager_ref)
    b.ours.model.compile_unet("auto")
    compiled_ref = b.reference_ti_step(ours, unet=torch.compile(b.unet))
    ours_s = warm_up(b.under_precision(ours), b.device)
    ref_s = warm_up(b.under_precision(compiled_ref), b.device)
    ours_m, eager_m = b.pair(ours, eager_ref)
    compiled_m = b.measure(compiled_ref)
    note = (f"{b.args.size}px; compile (first call) ours {ours_s:.0f} s, diffusers {ref_s:.0f} s; "
            "mem incl. optimizer state/cache")
    ours_m = with_state(ours_m, ours.persistent_bytes())
    rows = [Row(f"ti_compiled_b{n}", "diffusers TI eager", ours_m,
                with_state(eager_m, tensor_bytes(eager_ref.persistent_state())), note, *flops),
            Row(f"ti_compiled_b{n}", "diffusers TI compiled", ours_m,
                with_state(compiled_m, tensor_bytes(compiled_ref.persistent_state())), note, *flops)]
    for step in (ours, eager_ref, compiled_ref):
        step.release()
    return rows


def compiled_sample_row(b: Bench) -> Row:
    n, steps = b.args.batch, b.args.sample_steps
    prompts, x_T = [PROMPT] * n, b.randn(n, *b.latent_shape)
    ours, pipe = ours_sampling(b, prompts, x_T), pipeline_sampling(b, prompts, x_T)
    flops = b.flops(ours), b.flops(pipe)
    b.ours.model.compile_unet("auto")
    ours_s = warm_up(ours, b.device)
    ours_m, pipe_m = measure_pair(ours, pipe, b.device, b.args.repeats)
    return Row(f"sample_compiled_ddim{steps}_b{n}", "SD pipeline eager", ours_m, pipe_m,
               f"{b.args.size}px, scale {GUIDANCE}; compile (first call) {ours_s:.0f} s", *flops)


def compiled_rows(b: Bench) -> list[Row]:
    """The compiled TI steps at each TI batch, then compiled sampling; the model is eager again after."""
    rows = []
    try:
        for n in b.args.ti_batches:
            rows += compiled_ti_rows(b, n)
            b.ours.model.compile_unet(None)
            torch.compiler.reset()
        rows.append(compiled_sample_row(b))
    finally:
        b.ours.model.compile_unet(None)
        torch.compiler.reset()
    return rows
