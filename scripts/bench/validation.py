"""Benchmark rows of in-run validation: what sampling at a save adds to a run, and what scoring costs.

- ``validation_save``: one validation (the default prompts and sampler settings of
  :mod:`ldm.train.validation`, at the benchmark's ``--size``) against the training between two saves
  (``every_n_train_steps`` of the config's momentum-TI steps at batch 1): the time ratio is the
  fraction validation adds to a default run's wall time. The note adds the same ratio in CPU
  seconds of this process, which other processes' load does not change (use ``--threads 1``).
- ``identity_load`` / ``identity_score``: building the identity scorer (dlib models and the
  reference descriptors, once per run) and scoring as many face photos (half the fixture photos,
  at 512 px) as one validation samples, against the other half.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import OmegaConf

from ldm.data.images import load_rgb
from ldm.precision import precision_autocast
from ldm.train.validation.callback import ValidationSampler, starting_noise
from ldm.train.validation.settings import ValidationSettings, default_prompts
from .measure import Measurement, measure, measure_pair
from .table import Row

IDENTITY_SIDE = 512  # the samples of an SD v1 run
STEPS_PER_TIMING = 10  # TI steps per timed call (scaled to the save interval)

if TYPE_CHECKING:
    from .context import Bench


def with_cpu_time(fn, record: list[float]):
    """``fn`` that also appends this process's CPU seconds to ``record`` (robust to other processes' load)."""
    def run():
        start = time.process_time()
        fn()
        record.append(time.process_time() - start)
    return run


def save_interval(config_path: Path) -> int:
    """``every_n_train_steps`` of a finetune config (the default save interval of its runs)."""
    return int(OmegaConf.load(config_path).lightning.modelcheckpoint.params.every_n_train_steps)


def validation_rows(b: Bench, config_path: Path, train_step) -> list[Row]:
    """``train_step``: a callable running one momentum-TI step at batch 1 (the benchmark's ``ti`` step)."""
    every = save_interval(config_path)
    settings = ValidationSettings(prompts=tuple(default_prompts("* woman")))
    model = b.ours
    model.image_size = b.latent_shape[1]  # sample at the benchmark's --size
    sampler = ValidationSampler(settings, images_dir=Path("."), ckptdir=Path("."), every_n_train_steps=every)
    sampler.noise = starting_noise(settings, model.channels, model.image_size)
    steps = min(every, STEPS_PER_TIMING)
    cpu_seconds: dict[str, list[float]] = {"validation": [], "training": []}
    def train_steps():
        for _ in range(steps):
            train_step()

    def validate():
        return sampler.sample(model, precision_autocast(b.device, b.args.precision))

    # alternating, so that the machine's load hits both alike
    validation, timed_steps = measure_pair(with_cpu_time(validate, cpu_seconds["validation"]),
                                           with_cpu_time(train_steps, cpu_seconds["training"]), b.device,
                                           b.args.repeats)
    scale = every / steps
    between_saves = Measurement(scale * timed_steps.median_s, [scale * t for t in timed_steps.times_s],
                                timed_steps.peak_bytes)
    cpu_ratio = statistics.median(cpu_seconds["validation"]) / (scale * statistics.median(cpu_seconds["training"]))
    note = (f"{settings.num_samples} samples ({len(settings.prompts)} prompts x {settings.samples_per_prompt}), "
            f"{settings.ddim_steps} DDIM steps, {b.args.size}px; ratio = time added at a save every {every} steps "
            f"(TI step {1000 * timed_steps.median_s / steps:.1f} ms); CPU-time ratio {cpu_ratio:.2f}")
    return [Row("validation_save", f"{every} TI steps", validation, between_saves, note),
            *identity_rows(b, settings.num_samples)]


def identity_rows(b: Bench, num_samples: int) -> list[Row]:
    from ldm.evaluation import IdentityScorer

    folder = b.args.faces
    paths = sorted(p for p in folder.glob("*.jpg")) if folder.is_dir() else []
    if len(paths) < 2:
        return [Row("identity_score", "-", None, None, f"skipped: no face photos in {folder}")]
    references, samples = paths[: len(paths) // 2], paths[len(paths) // 2:]
    images = [load_rgb(samples[k % len(samples)]).resize((IDENTITY_SIDE,) * 2) for k in range(num_samples)]
    holder: dict[str, IdentityScorer] = {}

    def load():
        holder["scorer"] = IdentityScorer.from_photos(references, source=str(folder))

    cpu_seconds: dict[str, list[float]] = {"load": [], "score": []}
    loaded = measure(with_cpu_time(load, cpu_seconds["load"]), torch.device("cpu"), 1, warmup=0)
    scored = measure(with_cpu_time(lambda: holder["scorer"].score(images), cpu_seconds["score"]),
                     torch.device("cpu"), b.args.repeats)
    note = f"hog detector; {len(references)} reference photos"
    return [Row("identity_load", "-", loaded, None, f"{note}; dlib models + reference descriptors, once per run; "
                f"CPU {1000 * statistics.median(cpu_seconds['load']):.0f} ms"),
            Row("identity_score", "-", scored, None, f"{num_samples} samples of {IDENTITY_SIDE}px, {note}; "
                f"CPU {1000 * statistics.median(cpu_seconds['score']):.0f} ms")]
