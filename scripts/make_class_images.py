"""Generate the class images of DreamBooth's prior preservation with the base checkpoint.

    python scripts/make_class_images.py --ckpt models/ldm/stable-diffusion-v1/model.ckpt \\
        --class_word woman --outdir inputs/class_woman --n_images 200

Writes OUTDIR/NNNNN.png from the prompt 'a photo of a <class_word>' (settings in the PNG's
AUTOMATIC1111-style ``parameters`` chunk and its ``momentum_ti`` chunk).
Images already there count: only the missing ones are made, so an interrupted run continues.
Each batch is seeded with ``seed + index of its first image``, so the images do not depend on how
often the script was restarted. Then train with ``main.py ... --reg_data_root OUTDIR``.
"""
import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from ldm.cli import run_script
from ldm.data.prompts import DEFAULT_TEMPLATE
from ldm.inference import load_model, resolve_device
from ldm.png_metadata import SampleSettings, model_fields, png_text
from ldm.precision import precision_autocast
from ldm.sampling_io import SAMPLE_PATTERN, next_free_index, save_png, to_pil_images

logger = logging.getLogger("make_class_images")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="base SD v1 checkpoint (.ckpt or .safetensors)")
    p.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml", help="model config")
    p.add_argument("--class_word", required=True, help="the subject's class, e.g. woman")
    p.add_argument("--outdir", required=True, help="folder for the class images (--reg_data_root of main.py)")
    p.add_argument("--n_images", type=int, default=200, help="how many class images the folder should hold")
    p.add_argument("--batch_size", type=int, default=4, help="images per sampling batch")
    p.add_argument("--ddim_steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=42, help="base seed")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--precision", choices=("autocast", "full"), default="autocast",
                   help="autocast: float16 on CUDA; full: float32")
    p.add_argument("--use_ema", action="store_true", help="sample with the checkpoint's EMA weights")
    p.add_argument("--trust_pickle", action="store_true", help="allow checkpoints that need arbitrary code to load")
    return p


def validate_args(args: argparse.Namespace) -> None:
    if args.n_images < 1 or args.batch_size < 1 or args.ddim_steps < 1 or args.seed < 0:
        raise ValueError("--n_images, --batch_size and --ddim_steps must be positive and --seed not negative")
    if len(args.class_word.split()) == 0:
        raise ValueError("--class_word must not be empty: pass the subject's class, e.g. woman")


def existing_images(outdir: Path) -> int:
    """How many numbered images (NNNNN.png) the folder already holds."""
    return sum(1 for entry in outdir.iterdir() if SAMPLE_PATTERN.match(entry.name)) if outdir.is_dir() else 0


def generate(args: argparse.Namespace, model: torch.nn.Module, prompt: str, count: int) -> None:
    """Sample ``count`` images of ``prompt`` into ``args.outdir``."""
    outdir = Path(args.outdir)
    device = model.device
    viewer = SampleSettings(prompt=prompt, negative_prompt="", steps=args.ddim_steps, sampler="DDIM",
                            cfg_scale=args.scale, seed=args.seed, width=0, height=0, **model_fields(args.ckpt))
    details = {"prompt": prompt, "steps": args.ddim_steps, "scale": args.scale, "sampler": "DDIM",
               "checkpoint": args.ckpt}
    done = 0
    while done < count:
        index = next_free_index(outdir)
        batch = min(args.batch_size, count - done)
        generator = torch.Generator(device=device).manual_seed(args.seed + index)
        with torch.no_grad(), precision_autocast(device, args.precision):
            images = model.sample_images([prompt] * batch, ddim_steps=args.ddim_steps, scale=args.scale,
                                         generator=generator)
        for offset, image in enumerate(to_pil_images(images)):
            seed = args.seed + index  # of the batch this image is in
            text = png_text(replace(viewer, seed=seed, width=image.width, height=image.height),
                            {**details, "seed": seed, "index_in_batch": offset})
            save_png(outdir / f"{index + offset:05}.png", image, text)
        done += batch
        logger.info("%d / %d class images", done, count)


def prepare(args: argparse.Namespace) -> int | Callable[[], None]:
    """Check the flags and load the model; returns 0 when nothing is missing, else the generation to run."""
    prompt = DEFAULT_TEMPLATE.format(args.class_word.strip())
    validate_args(args)
    missing = args.n_images - existing_images(Path(args.outdir))
    if missing <= 0:
        logger.info("%s already holds %d class images: nothing to do", args.outdir, args.n_images)
        return 0
    model = load_model(args.config, args.ckpt, use_ema=args.use_ema, trust_pickle=args.trust_pickle,
                       device=resolve_device(args.device))

    def run() -> None:
        logger.info("Generating %d images of '%s' into %s", missing, prompt, args.outdir)
        generate(args, model, prompt, missing)

    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the exit code (0 ok, 2 bad flags or input files)."""
    return run_script(build_parser(), prepare, argv, logger=logger)


if __name__ == "__main__":
    sys.exit(main())
