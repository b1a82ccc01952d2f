"""Fold LoRA files into an SD v1 checkpoint: a full model file with the adapters merged into its weights.

    python scripts/export_lora.py --ckpt models/ldm/stable-diffusion-v1/model.ckpt \
        --lora logs/<run>/checkpoints/lora.safetensors:0.8 --merge models/ldm/dreambooth/<name>.safetensors

Each ``--lora FILE[:SCALE]`` (kohya/A1111 layout, scale in [-4, 4], default 1) adds
``scale * alpha / rank * up @ down`` to the layer it names. The output has the released SD v1 key layout
and loads in ``main.py --actual_resume``, ``scripts/stable_txt2img.py --ckpt``, A1111 and diffusers'
single-file loader; sampling it equals sampling the base model with the same ``--lora`` flags.
"""
import argparse
import logging
import sys
from typing import Sequence

from ldm.cli import run_script
from ldm.lora import check_lora_specs, merge_export

logger = logging.getLogger("export_lora")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="the base SD v1 checkpoint the LoRA was trained on")
    p.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml", help="the model's config")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:SCALE]",
                   help="a LoRA file and its scale; repeat for several (folded in order)")
    p.add_argument("--merge", required=True, metavar="OUT",
                   help="write the full checkpoint with the adapters folded in (.ckpt or .safetensors)")
    p.add_argument("--half", action="store_true", help="write float16 weights (half the size)")
    p.add_argument("--trust_pickle", action="store_true", help="allow checkpoints that need arbitrary code to load")
    return p


def export(args: argparse.Namespace) -> None:
    try:
        check_lora_specs(args.lora)
    except ValueError as err:
        raise ValueError(f"--{err}") from None
    path = merge_export(args.config, args.ckpt, args.lora, args.merge, half=args.half, trust_pickle=args.trust_pickle)
    logger.info("Wrote %s (%s folded into %s)", path, ", ".join(args.lora), args.ckpt)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the exit code (0 ok, 2 bad flags or input files)."""
    return run_script(build_parser(), export, argv, logger=logger)


if __name__ == "__main__":
    sys.exit(main())
