"""Text-to-image sampling with Stable Diffusion v1 and a (momentum) textual-inversion embedding.

    python scripts/stable_txt2img.py --ddim_eta 0.0 --n_samples 8 --n_iter 2 --scale 7 --ddim_steps 100 \\
        --ckpt models/ldm/dreambooth/<name>.ckpt --embedding_path <run>/checkpoints/embeddings_ep-2.pt \\
        --prompt "photo of a * woman" --outdir outputs/<name>

Writes OUTDIR/samples/NNNNN.png (numbered after the highest existing one; settings in the PNG's
AUTOMATIC1111-style ``parameters`` chunk and, in full, its ``momentum_ti`` chunk) and one
OUTDIR/grid-NNNN.png per run. The negative prompt is the unconditional side of
classifier-free guidance. Same seed and device give identical images.
"""
import argparse
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from ldm.sampling_io import to_grid_image
from ldm.checkpoint import probe_weights_file
from ldm.cli import run_script
from ldm.inference import (
    attach_embedding,
    latent_downsampling,
    load_config,
    load_model,
    resolve_device,
)
from ldm.lora import apply_lora_files, check_lora_specs, lora_tags
from ldm.models.diffusion.compiled_unet import COMPILE_MODES
from ldm.models.diffusion.ddim import DDIMSampler, SamplerBase
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.embedding_manager import EmbeddingManager, load_embeddings
from ldm.momentum import check_gamma, check_strength
from ldm.png_metadata import SampleSettings, model_fields, png_text
from ldm.precision import precision_autocast, precision_dtype
from ldm.sampling_io import (
    DEFAULT_NEGATIVE_PROMPT,
    GRID_PATTERN,
    next_free_index,
    read_prompt_file,
    save_png,
    to_pil_images,
)

logger = logging.getLogger("stable_txt2img")


class UsageError(ValueError):
    """A flag value or input file the script cannot use; the message says which and what to pass."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="a painting of a virus monster playing guitar", help="the prompt to render")
    p.add_argument("--negative_prompt", default=DEFAULT_NEGATIVE_PROMPT,
                   help="unconditional prompt of classifier-free guidance ('' for the plain empty prompt)")
    p.add_argument("--from-file", dest="from_file", default=None, help="file with one prompt per line")
    p.add_argument("--outdir", default="outputs/txt2img-samples", help="directory to write results to")
    p.add_argument("--skip_grid", action="store_true", help="do not write the grid of all samples")
    p.add_argument("--skip_save", action="store_true", help="do not write the individual samples")
    p.add_argument("--ddim_steps", type=int, default=50, help="number of sampling steps")
    p.add_argument("--plms", action="store_true", help="use PLMS sampling (instead of DDIM)")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--fixed_code", action="store_true", help="reuse one starting noise for every iteration")
    p.add_argument("--n_iter", type=int, default=2, help="how many batches to sample per prompt batch")
    p.add_argument("--H", type=int, default=512, help="image height in pixels")
    p.add_argument("--W", type=int, default=512, help="image width in pixels")
    p.add_argument("--C", type=int, default=4, help="latent channels")
    p.add_argument("--f", type=int, default=8, help="downsampling factor of the autoencoder")
    p.add_argument("--n_samples", type=int, default=8, help="batch size: samples per prompt per iteration")
    p.add_argument("--n_rows", type=int, default=0, help="images per grid row (0: n_samples)")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml", help="model config")
    p.add_argument("--ckpt", default="models/ldm/stable-diffusion-v1/model.ckpt", help="model checkpoint")
    p.add_argument("--embedding_path", default=None, help="textual-inversion embedding file (any supported format)")
    p.add_argument("--gamma", type=float, default=None,
                   help="re-mix a momentum embedding: e = e_p + gamma * (v - e_p) (default: the stored gamma)")
    p.add_argument("--strength", type=float, default=None,
                   help="inference strength S in [0, 4]: the placeholder gets e_p + S * (e - e_p), where e is the "
                        "embedding's vector (after --gamma) and e_p the placeholder's own row in the model; "
                        "1 = as trained (default), 0 = the model without the embedding, 2 = twice as far from e_p")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="fold a LoRA (kohya/A1111 .safetensors) into the model, SCALE in [-4, 4] (default 1); "
                        "repeat for several")
    p.add_argument("--seed", type=int, default=42, help="seed of the sampling noise")
    p.add_argument("--precision", choices=("full", "autocast"), default="autocast",
                   help="autocast: float16 on CUDA, with the weights held in float16 (CPU always runs float32)")
    p.add_argument("--compile_unet", nargs="?", const="auto", default=None, choices=COMPILE_MODES,
                   help="torch.compile the UNet (auto: CUDA graphs on a GPU); pays off over many samples")
    p.add_argument("--use_ema", action="store_true", help="load the checkpoint's EMA weights into the UNet")
    p.add_argument("--trust_pickle", action="store_true",
                   help="allow checkpoints that need arbitrary code to unpickle (only for files you trust)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    return p


def validate_args(args: argparse.Namespace) -> None:
    """Numeric flags that need no file or model."""
    positive = {"--ddim_steps": args.ddim_steps, "--n_iter": args.n_iter, "--n_samples": args.n_samples,
                "--H": args.H, "--W": args.W, "--C": args.C, "--f": args.f}
    for flag, value in positive.items():
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    multiple = math.lcm(8, args.f)
    for flag, value in (("--H", args.H), ("--W", args.W)):
        if value % multiple:
            raise UsageError(f"{flag}={value} must be a multiple of {multiple} (8 and --f={args.f}); "
                             f"pass e.g. {multiple * max(1, round(value / multiple))}")
    if args.n_rows < 0 or args.ddim_eta < 0 or args.seed < 0:
        raise UsageError("--n_rows, --ddim_eta and --seed must not be negative")
    if not args.scale > 0:
        raise UsageError(f"--scale must be > 0 (1 = no guidance, e.g. 7.5), got {args.scale}")
    if args.plms and args.ddim_eta != 0:
        raise UsageError(f"--plms is deterministic and needs --ddim_eta 0, got {args.ddim_eta}; drop --plms for eta > 0")
    for flag, value, check, what in (("--gamma", args.gamma, check_gamma, "re-mixes"),
                                     ("--strength", args.strength, check_strength, "scales")):
        if value is None:
            continue
        if args.embedding_path is None:
            raise UsageError(f"{flag} {what} an embedding: pass --embedding_path too")
        try:
            check(value)
        except ValueError as err:
            raise UsageError(f"{flag}: {err}") from None


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of this run: --prompt, or the non-empty lines of --from-file."""
    if args.from_file is None:
        return [args.prompt]
    try:
        return read_prompt_file(args.from_file)
    except ValueError as err:
        raise UsageError(f"--from-file {err}") from None


def preflight(args: argparse.Namespace) -> None:
    """Fail on bad files before the (large) model is built; errors name the flag."""
    checks = [("--config", load_config, args.config), ("--ckpt", probe_weights_file, args.ckpt)]
    if args.embedding_path is not None:
        checks.append(("--embedding_path", load_embeddings, args.embedding_path))
    if args.lora:
        checks.append(("--lora", check_lora_specs, args.lora))
    for flag, check, value in checks:
        try:
            check(value)
        except (ValueError, OSError) as err:
            raise UsageError(f"{flag}: {err}") from None


def check_model_fit(args: argparse.Namespace, model: torch.nn.Module) -> None:
    if args.C != model.channels:
        raise UsageError(f"--C={args.C} but the model's latents have {model.channels} channels; pass --C {model.channels}")
    factor = latent_downsampling(model)
    if factor is not None and args.f != factor:
        raise UsageError(f"--f={args.f} but the autoencoder downsamples by {factor}; pass --f {factor}")


def warn_missing_placeholders(model: torch.nn.Module, manager: EmbeddingManager, prompts: Sequence[str],
                              source: str) -> None:
    """One warning when some prompts do not contain (after tokenizing) a placeholder of the embedding."""
    tokens = model.cond_stage_model.tokenize(list(prompts))  # [P, L]
    ids = torch.tensor(manager.token_ids, device=tokens.device)
    missing = [p for p, has in zip(prompts, torch.isin(tokens, ids).any(dim=1).tolist()) if not has]
    if missing:
        logger.warning("%d of %d prompts lack the placeholder %s of %s, so the embedding does not affect them "
                       "(e.g. %r)", len(missing), len(prompts), manager.placeholders, source, missing[0])


def make_sampler(model: torch.nn.Module, args: argparse.Namespace) -> SamplerBase:
    """DDIM or PLMS, with its step schedule built once here so bad step counts fail before any output."""
    sampler = PLMSSampler(model) if args.plms else DDIMSampler(model)
    try:
        sampler.make_schedule(ddim_num_steps=args.ddim_steps, ddim_eta=args.ddim_eta, verbose=False)
    except ValueError as err:
        raise UsageError(f"--ddim_steps {args.ddim_steps}: {err}") from None
    return sampler


def prompt_batches(args: argparse.Namespace, prompts: list[str]) -> list[list[str]]:
    """--prompt: one batch of n_samples copies; --from-file: the prompts in batches of n_samples."""
    if args.from_file is None:
        return [prompts * args.n_samples]
    return [prompts[i:i + args.n_samples] for i in range(0, len(prompts), args.n_samples)]


def embedding_strength(args: argparse.Namespace) -> float | None:
    """--strength, 1 (as trained) when not given, None without an embedding."""
    if args.embedding_path is None:
        return None
    return 1.0 if args.strength is None else args.strength


def run_settings(args: argparse.Namespace, model: torch.nn.Module, sampler: SamplerBase) -> dict[str, object]:
    """This run's settings as recorded in every PNG (the project's ``momentum_ti`` key)."""
    gamma = model.embedding_manager.gamma if args.embedding_path is not None else None
    return {"negative_prompt": args.negative_prompt, "seed": args.seed, "steps": args.ddim_steps,
            "scale": args.scale, "sampler": sampler.name, "eta": args.ddim_eta, "checkpoint": args.ckpt,
            "embedding": args.embedding_path, "gamma": gamma, "strength": embedding_strength(args),
            "H": args.H, "W": args.W}


def viewer_settings(args: argparse.Namespace, settings: dict[str, object]) -> SampleSettings:
    """This run's fields of the A1111 ``parameters`` chunk (the prompt is set per image)."""
    return SampleSettings(
        prompt="", negative_prompt=args.negative_prompt, steps=args.ddim_steps, sampler=str(settings["sampler"]),
        cfg_scale=args.scale, seed=args.seed, width=args.W, height=args.H, **model_fields(args.ckpt),
        embedding=Path(args.embedding_path).stem if args.embedding_path else None, gamma=settings["gamma"],
        strength=settings["strength"],
        loras=tuple(lora_tags(args.lora)))


@torch.no_grad()
def generate(args: argparse.Namespace, model: torch.nn.Module, sampler: SamplerBase,
             batches: list[list[str]]) -> Iterator[tuple[int, list[str], torch.Tensor]]:
    """Yield (iteration, prompts, images [B, 3, H, W] in [-1, 1] on CPU) for every batch, n_iter times.

    All noise comes from one generator seeded with --seed on the model's device; with --fixed_code the
    starting noise x_T is drawn once and reused.
    """
    device = model.device
    shape = (args.C, args.H // args.f, args.W // args.f)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    fixed_code = torch.randn((args.n_samples, *shape), generator=generator, device=device) if args.fixed_code else None
    jobs = [(iteration, batch) for iteration in range(args.n_iter) for batch in batches]
    for iteration, batch in tqdm(jobs, desc="Sampling", unit="batch"):
        x_T = (fixed_code[:len(batch)] if fixed_code is not None
               else torch.randn((len(batch), *shape), generator=generator, device=device))
        with precision_autocast(device, args.precision):
            cond = model.get_learned_conditioning(batch)
            uncond = model.fixed_conditioning(args.negative_prompt, len(batch)) if args.scale != 1.0 else None
            latents, _ = sampler.sample(S=args.ddim_steps, conditioning=cond, batch_size=len(batch), shape=shape,
                                        verbose=False, unconditional_guidance_scale=args.scale,
                                        unconditional_conditioning=uncond, eta=args.ddim_eta, x_T=x_T,
                                        generator=generator)
            images = model.decode_first_stage(latents)
        yield iteration, batch, images.float().clamp(-1, 1).cpu()


def sample(args: argparse.Namespace, model: torch.nn.Module, sampler: SamplerBase, prompts: list[str]) -> None:
    """Write every sample (numbered after the existing ones) and one grid of the run."""
    settings = run_settings(args, model, sampler)
    viewer = viewer_settings(args, settings)
    sample_dir = Path(args.outdir) / "samples"
    index = next_free_index(sample_dir)
    all_images = []
    for iteration, batch, images in generate(args, model, sampler, prompt_batches(args, prompts)):
        if not args.skip_save:
            for prompt, image in zip(batch, to_pil_images(images)):
                text = png_text(replace(viewer, prompt=prompt), {"prompt": prompt, **settings, "iteration": iteration})
                save_png(sample_dir / f"{index:05}.png", image, text)
                index += 1
        all_images.append(images)
    if not args.skip_grid:
        grid_path = Path(args.outdir) / f"grid-{next_free_index(args.outdir, GRID_PATTERN):04}.png"
        grid = to_grid_image(torch.cat(all_images), nrow=args.n_rows or args.n_samples)
        # a grid shows its first prompt to viewers, as A1111 does; the project key lists them all
        text = png_text(replace(viewer, prompt=prompts[0]), {"prompts": list(dict.fromkeys(prompts)), **settings})
        save_png(grid_path, grid, text)
        logger.info("Wrote grid %s", grid_path)
    logger.info("Samples are in %s", Path(args.outdir).resolve())


def prepare(args: argparse.Namespace) -> Callable[[], None]:
    """Check flags and files, load the model and embedding; returns the sampling to run.

    UsageError and CheckpointError are ValueErrors: run_script reports them as one line.
    """
    validate_args(args)
    prompts = read_prompts(args)
    device = resolve_device(args.device)
    if args.precision == "autocast" and device.type != "cuda":
        logger.info("--precision autocast applies on CUDA only; sampling in float32 on %s", device)
    preflight(args)
    model = load_model(args.config, args.ckpt, use_ema=args.use_ema, trust_pickle=args.trust_pickle,
                       device=device)
    check_model_fit(args, model)
    try:
        apply_lora_files(model, args.lora, base_checkpoint=args.ckpt)
    except ValueError as err:
        raise UsageError(f"--lora: {err}") from None
    sampler = make_sampler(model, args)
    if args.embedding_path is not None:
        try:
            manager = attach_embedding(model, args.embedding_path, gamma=args.gamma, strength=embedding_strength(args))
        except ValueError as err:
            raise UsageError(f"--embedding_path: {err}") from None
        warn_missing_placeholders(model, manager, prompts, args.embedding_path)
    use_fast_path(args, model, device)
    return lambda: sample(args, model, sampler, prompts)


def use_fast_path(args: argparse.Namespace, model: torch.nn.Module, device: torch.device) -> None:
    """float16 weights under --precision autocast on CUDA (autocast would round them the same way on
    every call) and the compiled UNet with --compile_unet."""
    dtype = precision_dtype(device, args.precision)
    if dtype is not None:
        model.hold_frozen_weights_in_half(dtype)
    if args.compile_unet:
        model.model.compile_unet(args.compile_unet)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the exit code (0 ok, 2 bad flags or input files)."""
    return run_script(build_parser(), prepare, argv, logger=logger)


if __name__ == "__main__":
    sys.exit(main())
