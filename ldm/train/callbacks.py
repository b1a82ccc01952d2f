"""Lightning callbacks of the training entrypoint: embedding files, sample grids, signals."""
from __future__ import annotations

import inspect
import logging
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from ldm.compat import drop_ignored_keys
from ldm.lora import prompt_loras, unsaved_name
from ldm.png_metadata import SampleSettings, model_fields, png_text
from ldm.sampling_io import save_png, to_grid_image
from ldm.util import atomic_write

logger = logging.getLogger(__name__)

RESUME_POINT = "last.ckpt"  # what ``main.py -r LOGDIR`` reads in ``LOGDIR/checkpoints``
FINAL_EMBEDDING = "embeddings.pt"  # the embedding file a run writes at the end


def saved_embedding_name(step: int) -> str:
    """The embedding file a run writes at save step ``step``."""
    return f"embeddings_gs-{step}.pt"


class EmbeddingCheckpoint(pl.Callback):
    """Writes ``embeddings_gs-N.pt`` every N steps, ``embeddings_ep-N.pt`` each epoch and
    ``embeddings.pt`` at the end, each with a ``.safetensors`` twin of the same content.

    With ``ema_decay`` set, each file has an ``embeddings_ema*`` twin holding the moving average of v.

    It alone writes ``last.ckpt``, the resume point of ``-r`` (always this one name, replaced
    atomically): at every N-th step before anything else slow happens at that step (validation
    sampling), and at the end. SIGUSR1 saves ``embeddings.pt`` and ``last.ckpt`` between two steps
    and training goes on. Ctrl-C, SIGTERM (which Lightning turns into an exception) and any other
    error save them before exit. A step that stopped the run on a NaN/Inf loss writes neither.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int = 500):
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = every_n_train_steps
        self.save_requested = False
        self._previous_sigusr1 = None
        self._resume_point_step: int | None = None

    @staticmethod
    def _finite(pl_module, name: str) -> bool:
        """False (and one error line) when the embedding holds NaN/Inf: ``name`` is then not written."""
        manager = getattr(pl_module, "embedding_manager", None)
        if manager is None or all(torch.isfinite(p).all() for p in manager.embedding_parameters()):
            return True
        logger.error("Embedding holds NaN/Inf: %s not written, the last good file is kept", name)
        return False

    def _save(self, pl_module, name: str) -> None:
        manager = getattr(pl_module, "embedding_manager", None)
        if manager is None or not pl_module.trainer.is_global_zero or not self._finite(pl_module, name):
            return
        for ema in (False, True) if manager.ema_decay else (False,):
            path = self.dirpath / (ema_file_name(name) if ema else name)
            for target in (path, path.with_suffix(".safetensors")):  # the .safetensors twin for A1111/diffusers
                manager.save(target, step=pl_module.global_step, ema=ema)

    def _save_resumable(self, trainer, pl_module) -> None:
        self._save(pl_module, FINAL_EMBEDDING)
        self._save_resume_point(trainer, pl_module)

    def _save_resume_point(self, trainer, pl_module) -> None:
        """``last.ckpt`` at this step; every rank calls it (Lightning's save is collective), rank 0 writes."""
        if not self._finite(pl_module, RESUME_POINT):
            return

        def save(target: Path) -> None:
            trainer.save_checkpoint(target, weights_only=False)  # with the optimizer and loop states

        path = self.dirpath / RESUME_POINT
        if trainer.is_global_zero:
            atomic_write(path, save)  # a kill while writing leaves the previous one whole
        else:
            save(path)  # joins rank 0's save; writes nothing here
        self._resume_point_step = pl_module.global_step

    def on_train_start(self, trainer, pl_module):
        # After Lightning registered its own handlers, so that its teardown restores the originals.
        self.dirpath.mkdir(parents=True, exist_ok=True)
        if hasattr(signal, "SIGUSR1") and trainer.is_global_zero:
            self._previous_sigusr1 = signal.signal(signal.SIGUSR1, self._on_sigusr1)

    def _on_sigusr1(self, signum, frame) -> None:
        self.save_requested = True  # saved between steps, where the weights are consistent
        if callable(self._previous_sigusr1):
            self._previous_sigusr1(signum, frame)

    def is_save_step(self, step: int) -> bool:
        return bool(self.every_n_train_steps) and step > 0 and step % self.every_n_train_steps == 0

    def weights_file(self, pl_module, step: int, final: bool = False) -> Path | None:
        """The embedding file that keeps the vectors of ``step`` (``final``: the run's last step); None between
        saves and in runs that train no embedding."""
        if getattr(pl_module, "embedding_manager", None) is None:
            return None
        if self.is_save_step(step):
            return self.dirpath / saved_embedding_name(step)
        return self.dirpath / FINAL_EMBEDDING if final else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = pl_module.global_step
        stopped = getattr(pl_module, "stopped_on_nonfinite_loss", False)  # set by ldm.nonfinite at this step
        if self.is_save_step(step) and not stopped:
            self._save(pl_module, saved_embedding_name(step))
            self._save_resume_point(trainer, pl_module)
        if self.save_requested:
            logger.warning("SIGUSR1 received: saving the embedding and a resumable checkpoint")
            self._save_resumable(trainer, pl_module)
            self.save_requested = False

    def on_train_epoch_end(self, trainer, pl_module):
        self._save(pl_module, f"embeddings_ep-{trainer.current_epoch}.pt")

    def on_train_end(self, trainer, pl_module):
        self._save(pl_module, FINAL_EMBEDDING)
        stopped = getattr(pl_module, "stopped_on_nonfinite_loss", False)
        if not stopped and self._resume_point_step != pl_module.global_step:  # -r can go on with a larger --max_steps
            self._save_resume_point(trainer, pl_module)
        self._restore_handler()

    def on_exception(self, trainer, pl_module, exception):
        logger.warning("Training stopped by %s: saving the embedding and a resumable checkpoint",
                       type(exception).__name__)
        try:
            self._save_resumable(trainer, pl_module)
        except Exception as err:  # never hide the exception that stopped training
            logger.error("Could not save on exit: %s", err)
        finally:
            self._restore_handler()

    def _restore_handler(self) -> None:
        if self._previous_sigusr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_sigusr1)
            self._previous_sigusr1 = None


def ema_file_name(name: str) -> str:
    """The moving average's file beside ``name``: ``embeddings_gs-5.pt`` -> ``embeddings_ema_gs-5.pt``."""
    stem, dot, suffix = name.partition(".")
    stem = "embeddings_ema" + stem[len("embeddings"):] if stem.startswith("embeddings") else stem + "_ema"
    return stem + dot + suffix


class ImageLogger(pl.Callback):
    """Every ``batch_frequency`` steps, writes grids from ``pl_module.log_images`` to ``images/train``.

    ``save_dir`` defaults to ``<log dir>/images``. Each PNG carries the AUTOMATIC1111 ``parameters``
    chunk (the grid's first caption, the sampler settings, the model hash of ``checkpoint_path``,
    by default the weights the model loaded; :mod:`ldm.png_metadata`) and the run's details, among them
    ``weights``: the file that keeps the weights drawn (:func:`step_weights_file`), null at a step between saves.
    Failures here (a missing font, odd sizes) are logged and never stop training.
    """

    def __init__(self, batch_frequency: int, max_images: int, disabled: bool = False, log_first_step: bool = False,
                 log_images_kwargs: dict | None = None, save_dir: str | Path | None = None,
                 checkpoint_path: str | Path | None = None, **ignored: Any):
        drop_ignored_keys("ImageLogger", ignored)
        self.batch_frequency = max(1, int(batch_frequency))
        self.max_images = max_images
        self.disabled = disabled
        self.log_first_step = log_first_step
        self.log_images_kwargs = dict(log_images_kwargs or {})
        self.save_dir = Path(save_dir) if save_dir else None
        self.checkpoint_path = checkpoint_path

    def _due(self, step: int) -> bool:
        return (step % self.batch_frequency == 0 and step > 0) or (self.log_first_step and step == 0)

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = pl_module.global_step
        if self.disabled or self.max_images <= 0 or not self._due(step) or not hasattr(pl_module, "log_images"):
            return
        root = (self.save_dir or Path(trainer.default_root_dir) / "images") / "train"
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                images = pl_module.log_images(batch, N=self.max_images, **self.log_images_kwargs)
            root.mkdir(parents=True, exist_ok=True)
            weights = step_weights_file(trainer, step, final=step == trainer.max_steps)
            text = self._png_text(pl_module, batch, images, step=step, weights=weights, epoch=trainer.current_epoch)
            for name, tensor in images.items():
                path = root / f"{name}_gs-{step:06}_e-{trainer.current_epoch:06}_b-{batch_idx:06}.png"
                save_png(path, to_grid_image(tensor[: self.max_images]), text)
        except Exception as err:  # sample logging must never crash a training run
            logger.warning("Sample logging failed at step %d (training continues): %s", step, err)
        finally:
            pl_module.train(was_training)

    def _png_text(self, pl_module, batch, images: dict[str, torch.Tensor], *, step: int, weights: Path | None,
                  **details) -> dict[str, str]:
        """The grids' text chunks: A1111 ``parameters`` of the sampling, the captions, step and weights file in
        ``momentum_ti``."""
        sampling = {**keyword_defaults(pl_module.log_images), **self.log_images_kwargs}
        captions = [str(c) for c in batch[pl_module.cond_stage_key][: self.max_images]]
        checkpoint = self.checkpoint_path or getattr(pl_module, "init_checkpoint", None)
        height, width = next(iter(images.values())).shape[-2:]
        viewer = run_sample_settings(
            pl_module, step, prompt=captions[0] if captions else "", negative_prompt="",
            steps=int(sampling["ddim_steps"]), cfg_scale=float(sampling["unconditional_guidance_scale"]),
            seed=getattr(pl_module, "training_seed", None), width=int(width), height=int(height),
            weights=weights, checkpoint=checkpoint)
        return png_text(viewer, {"captions": captions, "step": step, "weights": weights.name if weights else None,
                                 **details, "checkpoint": checkpoint})


def step_weights_file(trainer, step: int, *, final: bool = False) -> Path | None:
    """The file that keeps the trained weights of ``step`` (``final``: the run's last step), as the saving callbacks
    of ``trainer`` name it (their ``weights_file``: ``embeddings_gs-N.pt``/``embeddings.pt``,
    ``lora_gs-N.safetensors``/``lora.safetensors``, ``model_pruned.*`` at the end); None when no file keeps them."""
    for callback in trainer.callbacks:
        name = getattr(callback, "weights_file", None)
        if callable(name) and (path := name(trainer.lightning_module, step, final)) is not None:
            return path
    return None


def run_sample_settings(pl_module, step: int, *, weights: Path | None = None, checkpoint: str | Path | None = None,
                        **sampling: Any) -> SampleSettings:
    """What a viewer shows for samples a training run draws at ``step`` with ``sampling`` (SampleSettings'
    prompt, negative_prompt, steps, cfg_scale, seed, width, height; DDIM): the model hash of ``checkpoint``
    (default: the weights the model loaded), the embedding's placeholders and gamma, and the LoRAs in the
    model's weights as A1111's ``<lora:name:scale>`` prompt tags (:func:`ldm.lora.prompt_loras`), the trained
    adapters named after ``weights``, the file that keeps them (``lora_gs-N_unsaved`` when none does)."""
    manager = getattr(pl_module, "embedding_manager", None)
    checkpoint = checkpoint or getattr(pl_module, "init_checkpoint", None)
    trained = weights.stem if weights is not None else unsaved_name(step)
    return SampleSettings(**sampling, sampler="DDIM", **model_fields(checkpoint),
                          embedding=" ".join(manager.placeholders) if manager else None,
                          gamma=manager.gamma if manager else None, loras=prompt_loras(pl_module, trained))


def keyword_defaults(function) -> dict[str, object]:
    """The default values of ``function``'s keyword arguments."""
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}
