"""Pruned Stable Diffusion v1 checkpoints: the weights a sampler needs, in the released key layout.

A pruned file holds the state dict only (no optimizer or trainer state): the UNet (``model.*``), the
autoencoder (``first_stage_model.*``), the text encoder (``cond_stage_model.*``, with the
``position_ids`` buffer released files carry) and the schedule buffers. Training-only parts are
left out: the embedding manager always, the EMA shadows (``model_ema.*``) unless asked for.
It loads in ``main.py --actual_resume``, ``scripts/stable_txt2img.py --ckpt`` and diffusers'
single-file loaders.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import pytorch_lightning as pl
import torch

from ldm.checkpoint import CheckpointError, ema_key, read_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("ckpt", "safetensors")
TRAINING_ONLY_PREFIXES = ("embedding_manager.",)
EMA_PREFIX = "model_ema."
UNET_PREFIX = "model.diffusion_model."
POSITION_EMBEDDING_KEY = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
POSITION_IDS_KEY = "cond_stage_model.transformer.text_model.embeddings.position_ids"
KEPT_META = ("global_step", "epoch")


def pruned_state_dict(state_dict: Mapping[str, torch.Tensor], *, include_ema: bool = False) -> dict[str, torch.Tensor]:
    """The SD v1 keys of a model or training state dict, without training-only parts."""
    dropped = TRAINING_ONLY_PREFIXES + (() if include_ema else (EMA_PREFIX,))
    state = {key: value.detach() for key, value in state_dict.items() if not key.startswith(dropped)}
    if not any(key.startswith(UNET_PREFIX) for key in state):
        raise CheckpointError(f"no UNet weights ('{UNET_PREFIX}*') to export: a textual-inversion training "
                              "checkpoint keeps only the embedding; export a DreamBooth run's last.ckpt")
    if include_ema and not any(key.startswith(EMA_PREFIX) for key in state):
        raise CheckpointError("include_ema was asked but there are no EMA weights ('model_ema.*'); export without it")
    if POSITION_EMBEDDING_KEY in state and POSITION_IDS_KEY not in state:
        positions = state[POSITION_EMBEDDING_KEY].shape[0]
        state[POSITION_IDS_KEY] = torch.arange(positions)[None]  # [1, positions] as in released files
    return state


def ema_as_model(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with every ``model.*`` weight replaced by its EMA shadow (and the shadows dropped)."""
    if not any(key.startswith(EMA_PREFIX) for key in state_dict):
        raise CheckpointError("no EMA weights ('model_ema.*') to export: train with use_ema: true, or export "
                              "without --ema_weights")
    state = {}
    for key, value in state_dict.items():
        if key.startswith(EMA_PREFIX):
            continue
        shadow = ema_key(key) if key.startswith("model.") else None
        if shadow is not None and shadow not in state_dict:
            raise CheckpointError(f"the EMA weights lack {shadow}: they do not cover the model")
        state[key] = state_dict[shadow] if shadow is not None else value
    return state


def export_path(directory: str | os.PathLike[str], export_format: str, stem: str = "model_pruned") -> Path:
    """``directory/model_pruned.ckpt`` or ``.safetensors``."""
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got '{export_format}'")
    return Path(directory) / f"{stem}.{export_format}"


def export_pruned(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *, half: bool = False,
                  include_ema: bool = False, meta: Mapping[str, Any] | None = None) -> Path:
    """Write the pruned ``state_dict`` to ``path`` (.ckpt or .safetensors, fp16 weights when ``half``), atomically."""
    suffix = Path(path).suffix.lstrip(".")
    if suffix not in EXPORT_FORMATS:
        raise ValueError(f"{path}: a pruned checkpoint is written as .ckpt or .safetensors, not '.{suffix}'")
    state = pruned_state_dict(state_dict, include_ema=include_ema)
    if half:  # module weights only: the schedule buffers (top-level keys) stay float32 for exact sampling
        state = {key: value.half() if value.is_floating_point() and "." in key else value
                 for key, value in state.items()}
    return save_checkpoint(path, state, extra=dict(meta or {}))


def export_checkpoint(source: str | os.PathLike[str], target: str | os.PathLike[str], *, half: bool = False,
                      include_ema: bool = False, ema_weights: bool = False, trust_pickle: bool = False) -> Path:
    """Prune a training checkpoint (e.g. a DreamBooth run's ``last.ckpt``) into ``target``.

    ``ema_weights`` writes the EMA shadows as the UNet's weights (what sampling with EMA would use).
    """
    if ema_weights and include_ema:
        raise CheckpointError("ema_weights already writes the EMA weights as the model's; drop include_ema")
    checkpoint = read_checkpoint(source, trust_pickle=trust_pickle)
    meta = {key: checkpoint.meta[key] for key in KEPT_META if key in checkpoint.meta}
    state = ema_as_model(checkpoint.state_dict) if ema_weights else checkpoint.state_dict
    return export_pruned(state, target, half=half, include_ema=include_ema, meta=meta)


class PrunedExport(pl.Callback):
    """Writes the pruned checkpoint at the end of training (rank zero only)."""

    def __init__(self, path: str | os.PathLike[str], *, half: bool = False, include_ema: bool = False):
        self.path = Path(path)
        self.half = half
        self.include_ema = include_ema

    def weights_file(self, pl_module: pl.LightningModule, step: int, final: bool = False) -> Path | None:
        """The pruned model keeps the weights of the run's last step (``final``) only."""
        return self.path if final else None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        meta = {"global_step": int(pl_module.global_step), "epoch": int(trainer.current_epoch)}
        export_pruned(pl_module.state_dict(), self.path, half=self.half, include_ema=self.include_ema, meta=meta)
        logger.info("Pruned model written to %s (use it as --actual_resume or --ckpt)", self.path)
