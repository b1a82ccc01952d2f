"""Build the toy world's models from fixed seeds: autoencoder, text-to-image model and judge.

    python scripts/toy_pretrain.py            # all three stages, about 25 minutes on 2 CPU cores

1. ``main.py --base configs/toy/autoencoder.yaml``, then ``... configs/toy/autoencoder_full.yaml``: the
   AutoencoderKL (reconstruction + KL loss) on 32 px crops, then on whole images, exported to
   ``models/toy/toy-autoencoder.safetensors``.
2. ``main.py --base configs/toy/v1-inference.yaml configs/toy/pretrain.yaml``: the UNet and the text
   encoder on captioned scenes of the non-held-out subjects, exported (fp16) to
   ``models/toy/toy-v1.safetensors``, an SD v1-layout checkpoint.
3. The judge, trained on fresh renders: ``models/toy/toy-judge.safetensors``, with its measured
   accuracy in ``models/toy/judge_accuracy.json``.

``models/toy/SHA256SUMS`` records the files. Training on a CPU is deterministic for a given machine
and thread count (``--threads``, default 2); other machines may differ in the last bits.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from ldm.cli import run_script
from ldm.toy_benchmark import run_main

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("toy_pretrain")

STAGES = ("autoencoder", "diffusion", "judge")
TOY_DIR = ROOT / "models" / "toy"
AUTOENCODER_FILE = "toy-autoencoder.safetensors"
MODEL_FILE = "toy-v1.safetensors"
JUDGE_FILE = "toy-judge.safetensors"
ACCURACY_FILE = "judge_accuracy.json"
SEED = 23


def autoencoder_weights(logdir: Path) -> dict:
    """The ``first_stage_model.*`` weights of a FirstStageTraining run's last.ckpt, unprefixed."""
    from ldm.checkpoint import read_state_dict

    state = read_state_dict(logdir / "checkpoints" / "last.ckpt", trust_pickle=True)
    prefix = "first_stage_model."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def train_autoencoder(workdir: Path, out: Path) -> Path:
    """32 px crops (cheap steps), then a short fine-tune on whole images."""
    from ldm.checkpoint import save_checkpoint

    common = ["-t", "--accelerator", "cpu", "-l", str(workdir), "-s", str(SEED)]
    crops = run_main(["--base", str(ROOT / "configs/toy/autoencoder.yaml"), "-n", "toy-autoencoder-crops", *common])
    stage1 = save_checkpoint(workdir / "toy-autoencoder-crops.safetensors", autoencoder_weights(crops))
    configs = [str(ROOT / "configs/toy/autoencoder.yaml"), str(ROOT / "configs/toy/autoencoder_full.yaml")]
    whole = run_main(["--base", *configs, "-n", "toy-autoencoder-full", *common,
                      f"model.params.autoencoder_config.params.ckpt_path={stage1}"])
    return save_checkpoint(out / AUTOENCODER_FILE, autoencoder_weights(whole))


def train_diffusion(workdir: Path, out: Path) -> Path:
    from ldm.export import export_checkpoint

    logdir = run_main(["--base", str(ROOT / "configs/toy/v1-inference.yaml"), str(ROOT / "configs/toy/pretrain.yaml"),
                       "-t", "-n", "toy-pretrain", "--accelerator", "cpu", "-l", str(workdir), "-s", str(SEED),
                       f"model.params.first_stage_config.params.ckpt_path={out / AUTOENCODER_FILE}"])
    return export_checkpoint(logdir / "checkpoints" / "last.ckpt", out / MODEL_FILE, half=True, ema_weights=True,
                             trust_pickle=True)


def train_judge_stage(out: Path) -> Path:
    from safetensors.torch import save_file

    from ldm.data.toy_world import held_out_pool
    from ldm.toy_judge import accuracy, train_judge
    from ldm.util import atomic_write

    model = train_judge(seed=SEED)
    path = atomic_write(out / JUDGE_FILE, lambda tmp: save_file(model.state_dict(), str(tmp)))
    report = {"fresh_renders": accuracy(model, seed=1), "held_out_subjects": accuracy(model, seed=2,
                                                                                        subjects=held_out_pool())}
    text = json.dumps(report, indent=1) + "\n"
    atomic_write(out / ACCURACY_FILE, lambda tmp: tmp.write_text(text))
    logger.info("Judge accuracy: %s", text)
    return path


def write_checksums(out: Path) -> None:
    from ldm.util import atomic_write

    shipped = [out / name for name in (MODEL_FILE, JUDGE_FILE) if (out / name).is_file()]
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in shipped]
    atomic_write(out / "SHA256SUMS", lambda tmp: tmp.write_text("".join(lines)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="what to build (default: all)")
    p.add_argument("--out", type=Path, default=TOY_DIR, help="where the models go (default models/toy)")
    p.add_argument("--workdir", type=Path, default=ROOT / "logs" / "toy-pretrain",
                   help="log root of the main.py runs")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixes the numerics)")
    return p


def build(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for stage in args.stages:
        start = time.perf_counter()
        if stage == "autoencoder":
            train_autoencoder(args.workdir, args.out)
        elif stage == "diffusion":
            if not (args.out / AUTOENCODER_FILE).is_file():
                raise FileNotFoundError(f"{args.out / AUTOENCODER_FILE} is missing: run --stages autoencoder first")
            train_diffusion(args.workdir, args.out)
        else:
            train_judge_stage(args.out)
        logger.info("Stage %s took %.1f min", stage, (time.perf_counter() - start) / 60)
    write_checksums(args.out)


def main(argv: Sequence[str] | None = None) -> int:
    return run_script(build_parser(), build, argv, logger=logger, errors=(ValueError, OSError, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
