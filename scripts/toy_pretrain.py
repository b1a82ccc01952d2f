"""Build the toy world's models from fixed seeds: autoencoder, text-to-image model and judge.

    python scripts/toy_pretrain.py            # every stage: about 2 hours on one CPU core

1. ``autoencoder``: ``main.py --base configs/toy/autoencoder.yaml``, then ``... configs/toy/autoencoder_full.yaml``:
   the AutoencoderKL (reconstruction + KL loss) on 32 px crops, then on whole images, exported to
   ``models/toy/toy-autoencoder.safetensors``.
2. ``diffusion``: ``main.py --base configs/toy/v1-inference.yaml configs/toy/attention8.yaml configs/toy/pretrain.yaml``:
   the UNet (cross-attention at 8x8 and 4x4) and the text encoder on captioned scenes of the non-held-out
   subjects, exported (fp16) to ``WORKDIR/toy-v1-stage1.safetensors``.
3. ``judge``: trained on fresh renders: ``models/toy/toy-judge.safetensors``, with its measured
   accuracy in ``models/toy/judge_accuracy.json`` (the next stage's probe reads with it).
4. ``grow``: the stage-2 weights in ``v1-inference.yaml``'s UNet, which adds cross-attention at 16x16 (the
   new blocks start with zero output): ``WORKDIR/toy-v1-grown.safetensors``.
5. ``continue``: ``configs/toy/pretrain_continue.yaml`` (full captions, peak learning rate) in resumable
   chunks, probing after each how well held-out subjects' descriptions are drawn
   (``description_curve.json``); the last chunk becomes ``models/toy/toy-v1.safetensors``, an SD
   v1-layout checkpoint.

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
from ldm.toy.benchmark import run_main

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("toy_pretrain")

STAGES = ("autoencoder", "diffusion", "judge", "grow", "continue")
TOY_DIR = ROOT / "models" / "toy"
AUTOENCODER_FILE = "toy-autoencoder.safetensors"
MODEL_FILE = "toy-v1.safetensors"
JUDGE_FILE = "toy-judge.safetensors"
ACCURACY_FILE = "judge_accuracy.json"
CURVE_FILE = "description_curve.json"
STAGE1_FILE = "toy-v1-stage1.safetensors"
GROWN_FILE = "toy-v1-grown.safetensors"
STAGE1_ARCHITECTURE = ROOT / "configs" / "toy" / "attention8.yaml"
SHIPPED_CONTINUE_STEPS = 5000  # the continuation the shipped model had (docs/toy_world.md)
PROBE_SUBJECTS = 8  # per group (held-out, seen) in the full-description probe
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
    """The first stage's UNet (``attention8.yaml``) and text encoder, from random weights."""
    from ldm.export import export_checkpoint

    logdir = run_main(["--base", str(ROOT / "configs/toy/v1-inference.yaml"), str(STAGE1_ARCHITECTURE),
                       str(ROOT / "configs/toy/pretrain.yaml"),
                       "-t", "-n", "toy-pretrain", "--accelerator", "cpu", "-l", str(workdir), "-s", str(SEED),
                       f"model.params.first_stage_config.params.ckpt_path={out / AUTOENCODER_FILE}"])
    return export_checkpoint(logdir / "checkpoints" / "last.ckpt", workdir / STAGE1_FILE, half=True,
                             ema_weights=True, trust_pickle=True)


def train_judge_stage(out: Path) -> Path:
    from safetensors.torch import save_file

    from ldm.toy.world import held_out_pool
    from ldm.toy.judge import accuracy, train_judge
    from ldm.util import atomic_write

    model = train_judge(seed=SEED)
    path = atomic_write(out / JUDGE_FILE, lambda tmp: save_file(model.state_dict(), str(tmp)))
    report = {"fresh_renders": accuracy(model, seed=1), "held_out_subjects": accuracy(model, seed=2,
                                                                                        subjects=held_out_pool())}
    text = json.dumps(report, indent=1) + "\n"
    atomic_write(out / ACCURACY_FILE, lambda tmp: tmp.write_text(text))
    logger.info("Judge accuracy: %s", text)
    return path


def model_config(overlays: Sequence[Path] = ()):
    """``v1-inference.yaml`` with ``overlays`` merged over it."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(*(OmegaConf.load(p) for p in (ROOT / "configs/toy/v1-inference.yaml", *overlays)))


def grow_checkpoint(source: Path, target: Path, overlays: Sequence[Path] = ()) -> Path:
    """``source``'s weights in the larger model of ``v1-inference.yaml`` (+ ``overlays``).

    Blocks the source lacks keep their initialisation; a spatial transformer's output projection starts
    at zero, so the grown model draws exactly what ``source`` draws until training moves them.
    """
    from ldm.checkpoint import read_state_dict, save_checkpoint
    from ldm.checkpoint.weights import is_ignorable_extra
    from ldm.util import instantiate_from_config

    torch.manual_seed(SEED)
    model = instantiate_from_config(model_config(overlays).model)
    grown = model.state_dict()
    old = {k: v for k, v in read_state_dict(source).items() if not is_ignorable_extra(k)}
    unknown = sorted(set(old) - set(grown))
    if unknown:
        raise RuntimeError(f"{source} holds {unknown[0]}, which the grown model does not have: it must only add blocks")
    mismatched = [k for k in old if old[k].shape != grown[k].shape]
    if mismatched:
        raise RuntimeError(f"{mismatched[0]} changes shape in the grown model: it must only add blocks")
    added = sorted(set(grown) - set(old))
    logger.info("Grew %s by %d tensors (%s ...)", source.name, len(added), ", ".join(added[:2]))
    state = {k: (old[k] if k in old else v).float() for k, v in grown.items() if not k.startswith("model_ema.")}
    return save_checkpoint(target, state)


def probe(ckpt: Path, out: Path, config: Path) -> dict:
    """Full-description fidelity and per-feature accuracy of ``ckpt`` on held-out and seen subjects."""
    from ldm.inference import load_model
    from ldm.toy.world import held_out_pool, pretraining_subjects
    from ldm.toy.probes import description_probe
    from ldm.toy.judge import load_judge

    model, judge_model = load_model(config, ckpt, device="cpu"), load_judge(out / JUDGE_FILE)
    groups = {"held_out": held_out_pool()[:PROBE_SUBJECTS], "seen": pretraining_subjects()[:PROBE_SUBJECTS]}
    return {name: description_probe(model, judge_model, subjects) for name, subjects in groups.items()}


def chunk_file(chunk_dir: Path, done: int) -> Path:
    """The export of the continuation after ``done`` extra steps."""
    return chunk_dir / f"toy-v1-continued-{done}.safetensors"


def continue_diffusion(workdir: Path, out: Path, steps: int, chunk: int, start: Path, overlays: Sequence[Path] = (),
                       overrides: Sequence[str] = ()) -> Path:
    """More pretraining of ``start`` with full captions, in resumable chunks.

    ``overlays`` are configs merged over ``v1-inference.yaml`` (the architecture), ``overrides`` are
    main.py ``key=value`` settings of the runs.

    Each chunk starts from the previous chunk's export (EMA weights; a fresh optimizer) and is probed;
    the curve goes to ``out/description_curve.json``. Run again, it goes on from the latest chunk file in
    ``workdir/continue`` and probes only the chunks the curve lacks.
    """
    from omegaconf import OmegaConf

    from ldm.export import export_checkpoint
    from ldm.util import atomic_write

    chunk_dir = workdir / "continue"
    # the latest finished chunk is where training goes on (earlier chunks' files may have been cleaned up)
    first = max((done for done in range(chunk, steps + 1, chunk) if chunk_file(chunk_dir, done).is_file()), default=0)
    previous = start if first == 0 else chunk_file(chunk_dir, first)
    if first == 0:
        require(start, "grow")
    chunk_dir.mkdir(parents=True, exist_ok=True)
    curve_path = out / CURVE_FILE
    curve = json.loads(curve_path.read_text()) if curve_path.is_file() else {}
    merged_config = chunk_dir / "inference.yaml"
    merged = model_config(overlays)
    atomic_write(merged_config, lambda tmp: OmegaConf.save(merged, tmp))
    for done in range(first, steps + 1, chunk):
        ckpt = previous if done == first else chunk_file(chunk_dir, done)
        if not ckpt.is_file():
            configs = [str(merged_config), *(str(ROOT / f"configs/toy/{name}.yaml")
                                            for name in ("pretrain", "pretrain_continue"))]
            logdir = run_main(["--base", *configs, "-t", "-n", f"toy-continue-{done}", "--accelerator", "cpu",
                               "-l", str(workdir), "-s", str(SEED + done), "--actual_resume", str(previous),
                               "--max_steps", str(chunk), "lightning.trainer.enable_progress_bar=false", *overrides])
            export_checkpoint(logdir / "checkpoints" / "last.ckpt", ckpt, half=True, ema_weights=True,
                              trust_pickle=True)
        if str(done) not in curve:
            began = time.perf_counter()
            curve[str(done)] = probe(ckpt, out, merged_config)
            logger.info("After %d more steps: %s (probe %.0f s)", done, curve[str(done)], time.perf_counter() - began)
            text = json.dumps(curve, indent=1) + "\n"
            atomic_write(curve_path, lambda tmp: tmp.write_text(text))
        previous = ckpt
    return previous


def copy_atomically(source: Path, target: Path) -> Path:
    import shutil

    from ldm.util import atomic_write

    return atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def write_checksums(out: Path) -> None:
    from ldm.util import atomic_write

    shipped = [out / name for name in (MODEL_FILE, JUDGE_FILE) if (out / name).is_file()]
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in shipped]
    atomic_write(out / "SHA256SUMS", lambda tmp: tmp.write_text("".join(lines)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                   help="what to build, in this order (default: all)")
    p.add_argument("--out", type=Path, default=TOY_DIR,
                   help="where the models go (default models/toy; the continue stage's last chunk becomes "
                   f"{MODEL_FILE} there, so give experiments their own --out)")
    p.add_argument("--workdir", type=Path, default=ROOT / "logs" / "toy-pretrain",
                   help="log root of the main.py runs and the intermediate models")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixes the numerics)")
    p.add_argument("--continue-steps", type=int, default=SHIPPED_CONTINUE_STEPS,
                   help=f"stage continue: pretraining steps with full captions (default {SHIPPED_CONTINUE_STEPS})")
    p.add_argument("--chunk", type=int, default=1000, help="stage continue: steps per resumable chunk (default 1000)")
    p.add_argument("--overlay", type=Path, action="append", default=[],
                   help="stages grow and continue: a config merged over v1-inference.yaml (an experiment's model)")
    p.add_argument("--start", type=Path, help=f"stage continue: the checkpoint to continue (default: WORKDIR/{GROWN_FILE})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="stage continue: a main.py setting of every chunk (e.g. a learning-rate factor)")
    return p


def require(path: Path, stage: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run --stages {stage} first (with the same --workdir and --out)")
    return path


def build(args: argparse.Namespace) -> None:
    if args.chunk < 1 or args.continue_steps < 0:
        raise ValueError(f"--chunk must be at least 1 and --continue-steps at least 0, got {args.chunk} and "
                         f"{args.continue_steps}")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for stage in args.stages:
        start = time.perf_counter()
        if stage == "autoencoder":
            train_autoencoder(args.workdir, args.out)
        elif stage == "diffusion":
            require(args.out / AUTOENCODER_FILE, "autoencoder")
            train_diffusion(args.workdir, args.out)
        elif stage == "judge":
            train_judge_stage(args.out)
        elif stage == "grow":
            grow_checkpoint(require(args.workdir / STAGE1_FILE, "diffusion"), args.workdir / GROWN_FILE, args.overlay)
        else:
            last = continue_diffusion(args.workdir, args.out, args.continue_steps, args.chunk,
                                      args.start or args.workdir / GROWN_FILE, args.overlay, args.overrides)
            copy_atomically(last, args.out / MODEL_FILE)
        logger.info("Stage %s took %.1f min", stage, (time.perf_counter() - start) / 60)
    write_checksums(args.out)


def main(argv: Sequence[str] | None = None) -> int:
    return run_script(build_parser(), build, argv, logger=logger, errors=(ValueError, OSError, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
