"""Builds a run's :class:`ValidationSampler` from the merged config, the data and the model."""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ldm.momentum import DEFAULT_PLACEHOLDER
from ldm.train.run_config import run_placeholder
from ldm.train.validation.callback import ValidationSampler
from ldm.train.validation.settings import ValidationSettings

logger = logging.getLogger(__name__)


def build_validation(config: DictConfig, data, model, *, images_dir: Path, ckptdir: Path,
                     every_n_train_steps: int) -> ValidationSampler | None:
    """The validation callback, or None when ``lightning.validation.enabled`` is false or nothing fits.

    By default validation runs for personalization data (a train dataset with training prompts) on a
    model that samples (``sample_images``); ValueError for bad ``lightning.validation`` settings. The
    placeholder of given prompts comes from the config (:func:`ldm.train.run_config.run_placeholder`).
    """
    node = OmegaConf.to_container(config.get("lightning", {}).get("validation") or OmegaConf.create(), resolve=True)
    enabled = node.get("enabled")
    if enabled is False:
        logger.info("Validation sampling is off (lightning.validation.enabled=false / --no_validation)")
        return None
    train = getattr(data, "datasets", {}).get("train")
    prompts = getattr(train, "prompts", None)
    if prompts is None or not hasattr(model, "sample_images"):
        if enabled:
            logger.warning("Validation sampling needs personalization data and a latent-diffusion model: off")
        return None
    placeholder = run_placeholder(config) or DEFAULT_PLACEHOLDER  # the settled config's, as the captions'
    settings = ValidationSettings.from_config(node, subject=prompts.subject, placeholder=placeholder)
    logger.info("Validation: %d prompts x %d samples, %d DDIM steps, at every save (every %d steps) and at the "
                "end%s; --no_validation turns it off", len(settings.prompts), settings.samples_per_prompt,
                settings.ddim_steps, every_n_train_steps, ", with identity scores" if settings.identity else "")
    return ValidationSampler(settings, images_dir=images_dir, ckptdir=ckptdir, every_n_train_steps=every_n_train_steps,
                             reference_photos=getattr(train, "image_paths", ()))
