"""Step time of a resumed run against the same steps of an uninterrupted run, on the tiny config.

    python scripts/benchmark_resume.py [--steps 80] [--resume_at 40] [--repeats 3] [--threads 1]

Each repeat starts ``main.py`` three times in fresh processes, as a user does: ``--steps`` steps
straight; ``--resume_at`` steps; then ``-r`` on to ``--steps``; with no validation, sample grids or
saves in between. :class:`StepClock` (a ``lightning.callbacks`` entry of the runs) notes the wall and
CPU time at the end of every step; a step's time is the difference to the previous step's. The
table gives, per run kind, the median step time over steps ``resume_at + 2`` .. ``steps`` (the first
resumed step, which holds the start-up, is left out), in wall and in CPU seconds of the run's
process (which other processes' load does not change), and the ratios resumed / straight. Repeats
alternate the kinds, so machine load hits both alike. The weights are the tiny config's random
ones; the photos are noise.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.checkpoint import save_checkpoint
from ldm.cli import run_script
from ldm.util import instantiate_from_config

logger = logging.getLogger("benchmark_resume")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/tiny/v1-finetune.yaml"
INFERENCE_CONFIG = ROOT / "configs" / "tiny" / "v1-inference.yaml"
QUIET_RUN = ("--no_validation", "data.params.num_workers=0", "lightning.callbacks.image_logger.params.disabled=true",
             "lightning.modelcheckpoint.params.every_n_train_steps=100000")


class StepClock(pl.Callback):
    """Writes ``{step: [wall seconds, CPU seconds]}`` at the end of each step of the run to ``out`` (JSON)."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.clock: dict[int, tuple[float, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clock[trainer.global_step] = (time.perf_counter(), time.process_time())

    def on_train_end(self, trainer, pl_module):
        self.out.write_text(json.dumps(self.clock))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80, help="steps of the whole run")
    p.add_argument("--resume_at", type=int, default=40, help="step the interrupted run stops at")
    p.add_argument("--repeats", type=int, default=3, help="straight / interrupted-and-resumed pairs")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs")
    return p


def write_inputs(root: Path) -> tuple[Path, Path]:
    """A tiny checkpoint (the tiny config's random weights) and a folder of three noise photos."""
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(INFERENCE_CONFIG).model)
    ckpt = save_checkpoint(root / "tiny.ckpt", model.state_dict())
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(photos / f"photo_{i}.png")
    return ckpt, photos


def run_main(argv: Sequence[str], threads: int, clock: Path) -> dict[int, tuple[float, float]]:
    """``python main.py argv`` in a fresh process, timed by :class:`StepClock`: step -> (wall, CPU) seconds
    since the previous step of the same process. RuntimeError with the output's end when it fails."""
    hook = ["lightning.callbacks.clock.target=benchmark_resume.StepClock", f"lightning.callbacks.clock.params.out={clock}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "scripts"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "main.py", *argv, *hook], cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"main.py failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")
    marks = {int(step): mark for step, mark in json.loads(clock.read_text()).items()}
    return {step: (marks[step][0] - marks[step - 1][0], marks[step][1] - marks[step - 1][1])
            for step in sorted(marks) if step - 1 in marks}


def median_ms(times: dict[int, tuple[float, float]], steps: range, which: int) -> float:
    """The median of the steps' wall (``which`` 0) or CPU (1) times, in ms."""
    return 1000 * statistics.median(times[step][which] for step in steps)


def benchmark(args: argparse.Namespace) -> int:
    if not 0 < args.resume_at < args.steps - 1:
        raise ValueError(f"--resume_at must be between 1 and --steps - 2, got {args.resume_at} and {args.steps}")
    compared = range(args.resume_at + 2, args.steps + 1)
    medians: dict[str, list[tuple[float, float]]] = {"straight": [], "resumed": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt, photos = write_inputs(root)
        common = ["--base", CONFIG, "-t", "--data_root", str(photos), "--actual_resume", str(ckpt), *QUIET_RUN]
        for repeat in range(args.repeats):
            logs, clock = root / f"logs-{repeat}", root / "clock.json"
            whole = run_main([*common, "--logdir", str(logs), "-n", "straight", "--max_steps", str(args.steps)],
                             args.threads, clock)
            run_main([*common, "--logdir", str(logs), "-n", "split", "--max_steps", str(args.resume_at)],
                     args.threads, clock)
            (split,) = logs.glob("*_split_*")
            resumed = run_main(["-t", "-r", str(split), "--max_steps", str(args.steps)], args.threads, clock)
            for kind, times in (("straight", whole), ("resumed", resumed)):
                medians[kind].append((median_ms(times, compared, 0), median_ms(times, compared, 1)))
            logger.info("repeat %d: median step straight %.1f ms (CPU %.1f), resumed %.1f ms (CPU %.1f)",
                        repeat + 1, *medians["straight"][-1], *medians["resumed"][-1])
    wall, cpu = ({kind: statistics.median(m[which] for m in runs) for kind, runs in medians.items()} for which in (0, 1))
    sys.stdout.write("| steps | threads | repeats | straight ms (CPU) | resumed ms (CPU) | wall ratio | CPU ratio |\n"
                     "|---|---|---|---|---|---|---|\n"
                     f"| {compared.start}-{args.steps} | {args.threads} | {args.repeats} "
                     f"| {wall['straight']:.1f} ({cpu['straight']:.1f}) | {wall['resumed']:.1f} ({cpu['resumed']:.1f}) "
                     f"| {wall['resumed'] / wall['straight']:.3f} | {cpu['resumed'] / cpu['straight']:.3f} |\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_script(build_parser(), benchmark, argv, logger=logger, errors=(ValueError, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
