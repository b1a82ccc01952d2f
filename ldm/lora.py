"""LoRA in ``main.py`` and the scripts: LoRA DreamBooth, ``--lora FILE[:SCALE]`` and the merged export.

LoRA DreamBooth is a DreamBooth config (``dreambooth`` section, see :mod:`ldm.train.dreambooth`) with a ``lora``
section (``configs/stable-diffusion/v1-finetune_lora.yaml``)::

    lora:
      rank: 4                    # --lora_rank (kohya users often take 16-32)
      alpha: 4                   # --lora_alpha (default: the rank, i.e. scale 1)
      unet_targets: [to_q, to_k, to_v, to_out.0]
      text_encoder_targets: [q_proj, k_proj, v_proj, out_proj]   # used with --train_text_encoder

The base weights are frozen (held in half precision under mixed precision, as for TI); the adapters and
their optimizer state are float32. Every save writes ``checkpoints/lora_gs-N.safetensors`` and the end
``checkpoints/lora.safetensors`` in the kohya/A1111 layout (:mod:`ldm.checkpoint.lora`), and validation with
identity scores keeps the best save as ``checkpoints/lora_best.safetensors``; ``last.ckpt``
holds the adapters and the optimizer state only (the base comes from ``--actual_resume`` again on ``-r``).

``--lora FILE[:SCALE]`` (config key ``lora_files``, any number) folds trained adapters into the base weights
of any run before it trains, e.g. momentum TI on the identifier of a LoRA DreamBooth run.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import CheckpointError
from ldm.checkpoint.lora import (
    META_ALPHA,
    META_BASE_HASH,
    META_BASE_NAME,
    META_IDENTIFIER,
    META_RANK,
    META_STEPS,
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    parse_lora_spec,
    read_lora,
    save_lora,
    text_encoder_diffusers_path,
    unet_diffusers_path,
)
from ldm.export import export_pruned
from ldm.modules.lora import (
    DEFAULT_TEXT_ENCODER_TARGETS,
    DEFAULT_UNET_TARGETS,
    TRAINED_ADAPTER,
    AdapterPart,
    adapter_layers,
    add_adapters,
    export_layers,
    fold_adapters,
    load_file_adapters,
)
from ldm.png_metadata import model_hash

logger = logging.getLogger(__name__)

SECTION = "lora"
FILES_KEY = "lora_files"
APPLIED_ATTR = "applied_loras"  # on a model: (name, scale) of each LoRA file folded into its base weights
ADAPTER_KEY_MARKERS = (".lora_A.", ".lora_B.")


def check_lora_specs(specs: list[str]) -> None:
    """``--lora FILE[:SCALE]`` values: the file exists and the scale is in [-4, 4] (ValueError names the flag)."""
    for spec in specs:
        path, _ = parse_lora_spec(spec)
        if not Path(path).is_file():
            raise ValueError(f"lora file {path} does not exist")


def unet_part(unet: torch.nn.Module) -> AdapterPart:
    """A CompVis ``UNetModel`` as an adapter part (kohya prefix ``lora_unet_``)."""
    return AdapterPart(unet, UNET_PREFIX, partial(unet_diffusers_path, num_res_blocks=unet.num_res_blocks))


def model_parts(model: torch.nn.Module) -> list[AdapterPart]:
    """The UNet and (when it is CLIP) the text encoder of a LatentDiffusion, as adapter parts."""
    parts = [unet_part(model.model.diffusion_model)]
    if hasattr(model.cond_stage_model, "text_model"):
        parts.append(AdapterPart(model.cond_stage_model, TEXT_ENCODER_PREFIX, text_encoder_diffusers_path))
    return parts


def apply_lora_files(model: torch.nn.Module, specs: list[str], *, base_checkpoint: str | None = None) -> None:
    """Fold each ``FILE[:SCALE]`` into the model's base weights, in order.

    A file whose metadata names another base model than ``base_checkpoint`` (by A1111's hash) is applied
    with a warning naming both hashes.
    """
    parts = model_parts(model)
    base_hash = model_hash(base_checkpoint) if base_checkpoint and Path(base_checkpoint).is_file() else None
    for index, spec in enumerate(specs):
        path, scale = parse_lora_spec(spec)
        lora = read_lora(path)
        if lora.base_hash and base_hash and lora.base_hash != base_hash:
            logger.warning("%s was trained on base model %s, but this model is %s (%s): applying it anyway",
                           path, lora.base_hash, base_hash, base_checkpoint)
        count = load_file_adapters(parts, lora, adapter=f"file{index}", scale=scale)
        for part in parts:
            fold_adapters(part.module)
        logger.info("LoRA %s applied at scale %g (%d layers folded into the base weights)", path, scale, count)
    setattr(model, APPLIED_ATTR, (*getattr(model, APPLIED_ATTR, ()), *lora_tags(specs)))


def lora_tags(specs: list[str]) -> list[tuple[str, float]]:
    """(name, scale) of each ``FILE[:SCALE]``, as A1111 names a LoRA in prompts (``<lora:name:scale>``)."""
    return [(Path(path).stem, scale) for path, scale in map(parse_lora_spec, specs)]


FINAL_FILE = "lora.safetensors"  # what a LoRA DreamBooth run writes at the end
BEST_FILE = "lora_best.safetensors"  # its save with the best validation identity score


def saved_file_name(step: int) -> str:
    """The LoRA file a LoRA DreamBooth run writes at save step ``step``."""
    return f"lora_gs-{step}.safetensors"


def unsaved_name(step: int) -> str:
    """How grids name the trained adapters of a step that no file keeps (a step between saves)."""
    return f"{Path(saved_file_name(step)).stem}_unsaved"


def prompt_loras(model: torch.nn.Module, trained_name: str) -> tuple[tuple[str, float], ...]:
    """The LoRAs in ``model``'s weights as A1111 names them in a prompt (``<lora:name:scale>``): the files folded
    into its base (``--lora``), then its trained adapters as ``trained_name`` (scale 1): the stem of the file
    that keeps them (``lora_gs-N``, ``lora``), or :func:`unsaved_name`."""
    tags = tuple(getattr(model, APPLIED_ATTR, ()))
    if any(TRAINED_ADAPTER in layer.lora_A for layer in adapter_layers(model).values()):
        tags += ((trained_name, 1.0),)
    return tags


# --------------------------------------------------------------------------------- LoRA DreamBooth


def add_trained_adapters(model: torch.nn.Module, *, rank: int = 4, alpha: float | None = None,
                         unet_targets: Sequence[str] = DEFAULT_UNET_TARGETS,
                         text_encoder_targets: Sequence[str] = DEFAULT_TEXT_ENCODER_TARGETS,
                         train_text_encoder: bool = False) -> None:
    """Freeze the UNet and text encoder and add the trained adapters (the text encoder's only when asked)."""
    if int(rank) < 1:
        raise ValueError(f"--lora_rank (lora.rank) must be at least 1, got {rank}")
    model.model.requires_grad_(False)
    model.cond_stage_model.requires_grad_(False)
    unet, *text = model_parts(model)
    add_adapters(unet, unet_targets, rank=int(rank), alpha=alpha)
    if train_text_encoder:
        if not text:
            raise ValueError("--train_text_encoder with LoRA needs a CLIP text encoder")
        add_adapters(text[0], text_encoder_targets, rank=int(rank), alpha=alpha)
        model.cond_stage_trainable = True  # its adapters go into the optimizer's group
    model.strict_loading = False  # last.ckpt holds the adapters only


def prepare_lora_model(model: torch.nn.Module, config: DictConfig) -> None:
    """Fold the ``lora_files`` into the base weights, then add the ``lora`` section's trained adapters."""
    specs = list(config.get(FILES_KEY) or [])
    if specs:
        apply_lora_files(model, specs, base_checkpoint=getattr(model, "init_checkpoint", None))
    section = config.get(SECTION)
    if section is None:
        return
    dreambooth = config.get("dreambooth") or {}
    settings = OmegaConf.to_container(section, resolve=True)
    add_trained_adapters(model, **settings, train_text_encoder=bool(dreambooth.get("train_text_encoder", False)))


def trained_layers(model: torch.nn.Module) -> dict:
    """The trained adapters of every part, by kohya name."""
    layers = {}
    for part in model_parts(model):
        layers.update(export_layers(part, TRAINED_ADAPTER))
    return layers


def lora_callbacks(config: DictConfig, ckptdir: str | Path, every_n_train_steps: int) -> list[pl.Callback]:
    """The LoRA file saves of a LoRA DreamBooth run (none otherwise)."""
    section = config.get(SECTION)
    if section is None:
        return []
    base = OmegaConf.select(config, "model.params.ckpt_path")
    metadata = {META_RANK: section.get("rank", 4), META_ALPHA: section.get("alpha", section.get("rank", 4)),
                META_IDENTIFIER: OmegaConf.select(config, "dreambooth.identifier"),
                META_BASE_NAME: Path(base).stem if base else None}
    return [LoraCheckpoint(ckptdir, every_n_train_steps, metadata, base_checkpoint=base)]


class LoraCheckpoint(pl.Callback):
    """Writes ``lora_gs-N.safetensors`` every N steps and ``lora.safetensors`` at the end (kohya layout), and
    keeps only the adapters in ``last.ckpt`` (with the optimizer state, as Lightning writes it).

    :meth:`save` also writes ``lora_best.safetensors`` for the validation (:mod:`ldm.train.validation.best`).
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int, metadata: dict[str, Any], *,
                 base_checkpoint: str | None = None):
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = every_n_train_steps
        self.metadata = metadata
        self.base_checkpoint = base_checkpoint

    def save(self, pl_module: pl.LightningModule, name: str, step: int | None = None) -> Path | None:
        """The trained adapters as ``name`` in the checkpoint folder (atomically), ``ss_steps`` the step they are at
        (default: the model's); rank 0 only, and not when they hold NaN/Inf."""
        if not pl_module.trainer.is_global_zero:
            return None
        layers = trained_layers(pl_module)
        if not all(torch.isfinite(layer.down).all() and torch.isfinite(layer.up).all() for layer in layers.values()):
            logger.error("LoRA adapters hold NaN/Inf: %s not written, the last good file is kept", name)
            return None
        base_hash = model_hash(self.base_checkpoint) if self.base_checkpoint else None
        step = pl_module.global_step if step is None else step
        metadata = {**self.metadata, META_STEPS: int(step), META_BASE_HASH: base_hash}
        return save_lora(self.dirpath / name, layers, metadata)

    def is_save_step(self, step: int) -> bool:
        return bool(self.every_n_train_steps) and step > 0 and step % self.every_n_train_steps == 0

    def weights_file(self, pl_module: pl.LightningModule, step: int, final: bool = False) -> Path | None:
        """The file that keeps the adapters of ``step`` (``final``: the run's last step), None between saves."""
        if self.is_save_step(step):
            return self.dirpath / saved_file_name(step)
        return self.dirpath / FINAL_FILE if final else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        stopped = getattr(pl_module, "stopped_on_nonfinite_loss", False)
        if self.is_save_step(pl_module.global_step) and not stopped:
            self.save(pl_module, saved_file_name(pl_module.global_step))

    def on_train_end(self, trainer, pl_module):
        self.save(pl_module, FINAL_FILE)

    def on_exception(self, trainer, pl_module, exception):
        try:
            self.save(pl_module, FINAL_FILE)
        except Exception as err:  # never hide the exception that stopped training
            logger.error("Could not save the LoRA on exit: %s", err)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if any(marker in k for marker in ADAPTER_KEY_MARKERS)}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        expected = {k for k in pl_module.state_dict() if any(marker in k for marker in ADAPTER_KEY_MARKERS)}
        missing = sorted(expected - set(checkpoint["state_dict"]))
        if missing:
            raise CheckpointError(f"the resumed checkpoint lacks {len(missing)} LoRA adapter weights (e.g. "
                                  f"'{missing[0]}'): it was saved with another lora rank or targets")


# --------------------------------------------------------------------------------- merged export


def merge_export(config_path: str | os.PathLike[str], ckpt: str | os.PathLike[str], specs: list[str],
                 target: str | os.PathLike[str], *, half: bool = False, trust_pickle: bool = False) -> Path:
    """A full SD v1 checkpoint of ``ckpt`` with the LoRA files folded in, in the released key layout."""
    from ldm.inference import load_model

    model = load_model(config_path, ckpt, trust_pickle=trust_pickle, device="cpu")
    apply_lora_files(model, specs, base_checkpoint=str(ckpt))
    return export_pruned(model.state_dict(), target, half=half, meta={"lora_files": ",".join(specs)})

