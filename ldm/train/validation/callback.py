"""The validation callback: sample grids at every save, identity scores, the best embedding or LoRA.

At every ``every_n_train_steps``-th step N (the steps that write ``embeddings_gs-N.pt`` and
``last.ckpt``) and at the end of training, rank 0 samples every validation prompt ``samples_per_prompt`` times with the
sampler of ``stable_txt2img.py`` (DDIM, eta 0, classifier-free guidance with its negative prompt)
from starting noise drawn once from ``seed``: every save starts from the same noise, so the grids
compare across steps. A grid goes to ``images/validation/step-N.png`` (prompts written to the left
and in the PNG's text chunks, with ``weights``: the file that keeps the weights drawn) and to TensorBoard.
With ``identity`` on, the samples are scored against the training photos
(:class:`ldm.evaluation.IdentityScorer`) and the best save is kept (:mod:`ldm.train.validation.best`): the
embedding, or in LoRA DreamBooth the adapters (``lora_best.safetensors``); full DreamBooth keeps no best model.
With the embedding's moving average on (``ema_decay``), the average is sampled and scored too
(``step-N_ema.png``, ``val/*_ema``), and it may become the best embedding.

The validation of step N runs when the next batch starts, with the weights of step N: after step N's
resume point and metrics are on disk. A run stopped or killed before it (SIGTERM at step N, SIGKILL
while sampling) samples step N when it is resumed with ``-r``, unless its grid is already written.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from ldm.evaluation import IdentityScorer, NoReferenceFaceError
from ldm.lora import BEST_FILE, LoraCheckpoint
from ldm.png_metadata import PARAMETERS_KEY, parameters_text
from ldm.sampling_io import save_png, to_pil_images
from ldm.train.callbacks import ema_file_name, run_sample_settings, step_weights_file
from ldm.train.validation.best import BestSave, IdentityScore
from ldm.train.validation.grid import labelled_grid
from ldm.train.validation.settings import ValidationSettings

logger = logging.getLogger(__name__)

SLOW_FRACTION = 0.1  # sampling longer than this fraction of the training time between saves is reported
EMA_SUFFIX = "_ema"  # of the grid, metrics and TensorBoard tag of the embedding's moving average
METRIC_NAMES = {"detection_rate": "val/face_detect_rate", "mean_distance": "val/identity_distance",
                "fraction_under_threshold": "val/identity_match"}


def starting_noise(settings: ValidationSettings, channels: int, latent_size: int) -> torch.Tensor:
    """The fixed noise [P * S, C, h, w] every validation starts from, drawn on the CPU from ``settings.seed``."""
    shape = (settings.num_samples, channels, latent_size, latent_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(settings.seed))


class ValidationSampler(pl.Callback):
    """Validation grids, identity scores and the best embedding or LoRA of a run (see the module docstring)."""

    def __init__(self, settings: ValidationSettings, *, images_dir: str | Path, ckptdir: str | Path,
                 every_n_train_steps: int, reference_photos: Sequence[Path] = ()):
        self.settings = settings
        self.samples_dir = Path(images_dir) / "validation"
        self.ckptdir = Path(ckptdir)
        self.every_n_train_steps = every_n_train_steps
        self.reference_photos = list(reference_photos)
        self.noise: torch.Tensor | None = None
        self.scorer: IdentityScorer | None = None
        self.best: BestSave | None = None
        self.validated_step: int | None = None
        self.warned_slow = False
        self.no_identity_reason = "--validation_identity to pick the best save"
        self._training_since = 0.0

    # ---------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        self.noise = starting_noise(self.settings, pl_module.channels, pl_module.image_size)
        self.best = self._best_save(trainer, pl_module)
        if self.settings.identity:
            self.scorer = self._load_scorer()
        self._training_since = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step  # the weights after step N, before step N + 1 changes them
        if not (self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0):
            return
        if self.validated_step is None and self.grid_path(step).is_file():
            self.validated_step = step  # resumed after this save's validation had finished
        self.validate(trainer, pl_module, step)

    def on_train_end(self, trainer, pl_module):
        self.validate(trainer, pl_module, trainer.global_step, final=True)

    def _best_save(self, trainer, pl_module) -> BestSave | None:
        """Where the best save goes: the embedding's files, the LoRA of a LoRA DreamBooth run, else nowhere."""
        manager = getattr(pl_module, "embedding_manager", None)
        if manager is not None:
            return BestSave.of_embedding(self.ckptdir, manager)
        lora = next((cb for cb in trainer.callbacks if isinstance(cb, LoraCheckpoint)), None)
        if lora is None:
            return None
        return BestSave(self.ckptdir, lambda path, step, ema: lora.save(pl_module, path.name, step), names=(BEST_FILE,),
                        what="LoRA")

    # ------------------------------------------------------------------------- the work
    def validate(self, trainer, pl_module, step: int, final: bool = False) -> None:
        """Sample, write the grid, score and keep the best, once per step, on rank 0 (``final``: the last step)."""
        if not trainer.is_global_zero or self.noise is None or self.validated_step == step:
            return
        self.validated_step = step
        started = time.perf_counter()
        manager = getattr(pl_module, "embedding_manager", None)
        weights = step_weights_file(trainer, step, final=final)
        try:
            for ema in (False, True) if manager is not None and manager.ema_decay else (False,):
                with manager.ema_scope() if ema else contextlib.nullcontext():
                    images = self.sample(pl_module, trainer.precision_plugin.forward_context())
                self._write_grid(trainer, images, step, ema, weights=weights)
                if self.scorer is not None:
                    self._score(trainer, pl_module, images, step, ema)
        except Exception as err:  # validation must never crash a training run
            logger.warning("Validation at step %d failed (training continues): %s", step, err)
        finished = time.perf_counter()
        self.notice_if_slow(finished - started, started - self._training_since, pl_module.device)
        self._training_since = finished

    @torch.no_grad()
    def sample(self, pl_module, precision: contextlib.AbstractContextManager) -> torch.Tensor:
        """Samples [P * S, 3, H, W] in [-1, 1] on the CPU, prompt-major, from the fixed noise.

        ``precision`` is the training's autocast context (Lightning's ``forward_context()``).
        """
        s, per_prompt = self.settings, self.settings.samples_per_prompt
        was_training = pl_module.training
        pl_module.eval()
        try:
            with precision, pl_module.ema_scope():
                rows = [pl_module.sample_images(
                    [prompt] * per_prompt, ddim_steps=s.ddim_steps, scale=s.scale, eta=s.eta,
                    negative_prompt=s.negative_prompt,
                    x_T=self.noise[i * per_prompt:(i + 1) * per_prompt].to(pl_module.device)).float().cpu()
                    for i, prompt in enumerate(s.prompts)]
        finally:
            pl_module.train(was_training)
        return torch.cat(rows)

    def _write_grid(self, trainer, images: torch.Tensor, step: int, ema: bool = False, *,
                    weights: Path | None = None) -> None:
        """The labelled grid with A1111's ``parameters`` of its first prompt (LoRAs named as ``<lora:name:scale>``)
        and every setting in text chunks, ``weights`` the file that keeps the weights drawn (with ``ema``: its
        moving-average twin), to ``images/validation`` and TensorBoard."""
        s, suffix = self.settings, EMA_SUFFIX if ema else ""
        grid = labelled_grid(images, s.prompts)
        height, width = images.shape[-2:]
        viewer = run_sample_settings(trainer.lightning_module, step, prompt=s.prompts[0],
                                     negative_prompt=s.negative_prompt, steps=s.ddim_steps, cfg_scale=s.scale,
                                     seed=s.seed, width=int(width), height=int(height), weights=weights)
        kept = None if weights is None else ema_file_name(weights.name) if ema else weights.name
        path = save_png(self.grid_path(step, ema), grid, {
            PARAMETERS_KEY: parameters_text(viewer), "prompts": "\n".join(s.prompts), "step": step, "weights": kept,
            "samples_per_prompt": s.samples_per_prompt, "seed": s.seed, "steps": s.ddim_steps, "scale": s.scale,
            "sampler": "DDIM", "eta": s.eta, "negative_prompt": s.negative_prompt})
        for experiment in (lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)):
            experiment.add_image(f"validation/samples{suffix}", np.asarray(grid), step, dataformats="HWC")
        logger.info("Validation samples at step %d%s: %s (weights in %s)", step, " (moving average)" if ema else "",
                    path, kept or "no file")

    def _score(self, trainer, pl_module, images: torch.Tensor, step: int, ema: bool = False) -> None:
        metrics = self.scorer.score(to_pil_images(images))
        suffix = EMA_SUFFIX if ema else ""
        values = {name + suffix: float(metrics[key])
                  for key, name in METRIC_NAMES.items() if metrics[key] is not None}
        for lg in trainer.loggers:
            lg.log_metrics(values, step=step)
        if not metrics["faces"]:
            logger.info("Step %d: no identity score (no face found in the %d validation samples)",
                        step, metrics["images"])
            return
        logger.info("Step %d identity%s: faces in %.0f%% of the samples, mean distance %.3f, %.0f%% the same person",
                    step, " (moving average)" if ema else "", 100 * metrics["detection_rate"],
                    metrics["mean_distance"], 100 * metrics["fraction_under_threshold"])
        if self.best is not None:
            self.best.offer(IdentityScore.from_metrics(step, metrics), ema=ema)

    def _load_scorer(self) -> IdentityScorer | None:
        """The identity scorer of the training photos, or None (with one warning saying why)."""
        if not self.reference_photos:
            self.no_identity_reason = "the training data lists no photos to compare with"
        else:
            try:
                return IdentityScorer.from_photos(self.reference_photos, source="the training data",
                                                  detector=self.settings.identity_detector)
            except NoReferenceFaceError as err:
                self.no_identity_reason = str(err)
            except (ImportError, OSError) as err:
                self.no_identity_reason = f"the face models are unavailable: {err}"
        logger.warning("No identity score in this run: %s", self.no_identity_reason)
        return None

    def notice_if_slow(self, sampling_s: float, training_s: float, device: torch.device | str) -> None:
        """Say once when sampling costs more than SLOW_FRACTION of the training time between saves."""
        if self.warned_slow or training_s <= 0 or sampling_s <= SLOW_FRACTION * training_s:
            return
        self.warned_slow = True
        logger.warning("Validation sampling took %.1f s, %.0f%% of the %.1f s of training since the previous save "
                       "(on %s); turn it off with --no_validation or shorten it with --validation_ddim_steps",
                       sampling_s, 100 * sampling_s / training_s, training_s, device)

    def grid_path(self, step: int, ema: bool = False) -> Path:
        return self.samples_dir / f"step-{step}{EMA_SUFFIX if ema else ''}.png"

    def best_file(self) -> tuple[Path, int] | None:
        """The best save's file (embedding or LoRA) and step, when identity scores picked one."""
        if self.best is None or self.best.best is None:
            return None
        return self.best.path, self.best.best.step

    def describe(self) -> str:
        """Where the samples are and which save is the best, for the end-of-run summary."""
        if self.best is not None and self.best.best is not None:
            best = self.best.best
            choice = (f"best {self.best.what} {self.best.path} (step {best.step}, identity match "
                      f"{best.identity_match:.2f})")
        elif self.scorer is None:
            choice = f"no identity score ({self.no_identity_reason})"
        elif self.best is None:
            choice = "identity scores in the metrics (no embedding or LoRA file to keep in this run)"
        else:
            choice = f"no best {self.best.what} (no save had faces in at least half of its samples)"
        return f"{choice}; validation samples in {self.samples_dir}"
