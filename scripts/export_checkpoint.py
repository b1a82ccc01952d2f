"""Prune a training checkpoint (e.g. a DreamBooth run's last.ckpt) into an SD v1 model file.

    python scripts/export_checkpoint.py logs/<run>/checkpoints/last.ckpt models/ldm/dreambooth/<name>.ckpt --half

The output holds the state dict only, in the released SD v1 key layout (no optimizer, no embedding
manager, no EMA unless --include_ema), as .ckpt or .safetensors (from the output's suffix). It loads
in ``main.py --actual_resume``, ``scripts/stable_txt2img.py --ckpt`` and diffusers' single-file loader.
"""
import argparse
import logging
import sys
from typing import Sequence

from ldm.cli import run_script
from ldm.export import export_checkpoint

logger = logging.getLogger("export_checkpoint")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="training checkpoint, e.g. logs/<run>/checkpoints/last.ckpt")
    p.add_argument("target", help="output file, .ckpt or .safetensors")
    p.add_argument("--half", action="store_true", help="write float16 weights (half the size)")
    p.add_argument("--include_ema", action="store_true", help="keep the EMA weights (model_ema.*)")
    p.add_argument("--ema_weights", action="store_true",
                   help="write the EMA weights as the UNet's weights (instead of the last training weights)")
    p.add_argument("--trust_pickle", action="store_true", help="allow checkpoints that need arbitrary code to load")
    return p


def export(args: argparse.Namespace) -> None:
    path = export_checkpoint(args.source, args.target, half=args.half, include_ema=args.include_ema,
                             ema_weights=args.ema_weights, trust_pickle=args.trust_pickle)
    logger.info("Wrote %s", path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the exit code (0 ok, 2 bad flags or input files)."""
    return run_script(build_parser(), export, argv, logger=logger)


if __name__ == "__main__":
    sys.exit(main())
