"""DreamBooth mode of ``main.py``: a config with a ``dreambooth`` section fine-tunes the model itself.

The section (see ``configs/stable-diffusion/v1-finetune_unfrozen.yaml``) and its flags decide the
identifier, prior preservation, which parts train and the pruned export written at the end:

    identifier: sks            # --identifier; one CLIP token, prompts read 'a photo of a sks woman'
    prior_loss_weight: 1.0     # --prior_loss_weight; prior preservation is on with --reg_data_root
    train_unet: true
    train_text_encoder: false  # --train_text_encoder
    export_format: ckpt        # --export_format ckpt|safetensors -> checkpoints/model_pruned.<format>
    export_half: false         # --export_half
    export_ema: false          # keep model_ema.* in the export (needs use_ema)

The flags reach the section through :mod:`ldm.train.flags`; the identifier reaches the captions through
:func:`ldm.train.run_config.settle_placeholder`. A key the section does not know, and other bad input, raise
``ValueError`` with a one-line message; ``ldm.train.training`` reports it and exits 2.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ldm.export import EXPORT_FORMATS, PrunedExport, export_path
from ldm.momentum import DEFAULT_IDENTIFIER, single_token_id

logger = logging.getLogger(__name__)

SECTION = "dreambooth"
PRIOR_LOSS_TARGET = "ldm.models.diffusion.prior_loss.PriorPreservationLoss"
DEFAULT_PRIOR_LOSS_WEIGHT = 1.0
KEYS = ("identifier", "prior_loss_weight", "train_unet", "train_text_encoder", "export_format", "export_half",
        "export_ema")


def identifier_of(config: DictConfig) -> str:
    """The section's identifier (default :data:`~ldm.momentum.DEFAULT_IDENTIFIER`); ValueError unless one word."""
    identifier = str(config[SECTION].get("identifier", DEFAULT_IDENTIFIER))
    if not identifier.strip() or len(identifier.split()) != 1:
        raise ValueError(f"--identifier must be one rare word such as '{DEFAULT_IDENTIFIER}', got '{identifier}'")
    return identifier


def derive_dreambooth(config: DictConfig) -> None:
    """What the ``dreambooth`` section implies for the model (flags are already in it)."""
    section = config.get(SECTION)
    if section is None:
        return
    unknown = sorted(set(section) - set(KEYS))
    if unknown:
        raise ValueError(f"{SECTION}.{unknown[0]} is not a DreamBooth setting (known: {', '.join(KEYS)}); remove it "
                         "or fix its spelling")
    if section.get("export_format", "ckpt") not in EXPORT_FORMATS:
        raise ValueError(f"dreambooth.export_format must be one of {EXPORT_FORMATS}, got '{section.export_format}'")
    data = config.data.params
    model = config.model.params
    weight = float(section.get("prior_loss_weight", DEFAULT_PRIOR_LOSS_WEIGHT))
    if data.train.params.get("reg_data_root"):
        model.prior_loss_config = {"target": PRIOR_LOSS_TARGET, "params": {"weight": weight}}
    elif weight != DEFAULT_PRIOR_LOSS_WEIGHT:
        logger.warning("dreambooth.prior_loss_weight=%g has no effect without --reg_data_root (prior preservation "
                       "is off)", weight)
    if section.get("train_text_encoder", False):
        model.cond_stage_trainable = True
        OmegaConf.update(model, "cond_stage_config.params.freeze", False)


def prepare_dreambooth_model(model: pl.LightningModule, config: DictConfig) -> None:
    """Check the identifier against the tokenizer and freeze what the section does not train."""
    section = config.get(SECTION)
    if section is None:
        return
    single_token_id(model.cond_stage_model.tokenizer, identifier_of(config), "identifier")
    if not section.get("train_unet", True):
        model.model.requires_grad_(False)
    parts = {"UNet": model.model, "text encoder": model.cond_stage_model}
    counts = {name: sum(p.numel() for p in part.parameters() if p.requires_grad) for name, part in parts.items()}
    if not any(counts.values()):
        raise ValueError("nothing to train: the UNet is frozen (dreambooth.train_unet=false) and so is the text "
                         "encoder; set dreambooth.train_unet=true or pass --train_text_encoder")
    logger.info("DreamBooth trains %s; prior preservation %s",
                ", ".join(f"{name} ({n / 1e6:.1f}M parameters)" for name, n in counts.items() if n),
                "on" if getattr(model, "prior_loss", None) is not None else "off (no --reg_data_root)")


def dreambooth_callbacks(config: DictConfig, ckptdir: str | Path) -> list[pl.Callback]:
    """The export of ``model_pruned.<format>`` at the end of a DreamBooth run (none otherwise, and none for
    LoRA DreamBooth, which writes its adapters: see :mod:`ldm.lora`)."""
    section = config.get(SECTION)
    if section is None or config.get("lora") is not None:
        return []
    return [PrunedExport(export_file(config, ckptdir), half=bool(section.get("export_half", False)),
                         include_ema=bool(section.get("export_ema", False)))]


def export_file(config: DictConfig, ckptdir: str | Path) -> Path:
    """The pruned model a (full) DreamBooth run writes at the end: ``ckptdir/model_pruned.<export_format>``."""
    return export_path(ckptdir, config[SECTION].get("export_format", "ckpt"))
