"""Model loading for the scripts (sampling, evaluation, demo): one place, no per-script copies.

``load_model`` builds a :class:`LatentDiffusion` from an LDM YAML config, loads a checkpoint through
:mod:`ldm.checkpoint` (strict keys, safe unpickling) and returns it frozen, in eval mode, on a
device. ``attach_embedding`` puts a textual-inversion embedding file (any format
:func:`ldm.checkpoint.load_embeddings` reads) on the model's text encoder.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.checkpoint import CheckpointError, probe_weights_file
from ldm.modules.embedding_manager import EmbeddingManager
from ldm.momentum import scale_offset
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU; otherwise the named device."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' was requested but CUDA is not available; use --device cpu or auto")
    return resolved


def load_config(config_path: PathLike) -> DictConfig:
    """An LDM YAML config with a ``model.target``; clear errors for a missing or malformed file."""
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config not found; pass an LDM YAML such as "
                                "configs/stable-diffusion/v1-inference.yaml")
    try:
        config = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path}: config is not valid YAML ({first_line}); pass an LDM YAML config") from None
    model = config.get("model") if isinstance(config, DictConfig) else None
    if not isinstance(model, DictConfig) or "target" not in model:
        raise ValueError(f"{path}: config has no 'model.target'; pass an LDM model config "
                         "(e.g. configs/stable-diffusion/v1-inference.yaml)")
    return config


def load_model(config_path: PathLike, ckpt_path: PathLike, *, use_ema: bool = False, trust_pickle: bool = False,
               device: str | torch.device | None = None) -> torch.nn.Module:
    """A frozen model in eval mode on ``device`` with the weights of ``ckpt_path``.

    ``use_ema`` loads the checkpoint's EMA shadows into the UNet; the config's own ``use_ema``,
    ``ckpt_path`` and ``embedding_manager_ckpt`` are ignored (weights are loaded here, once).
    """
    config = load_config(config_path)
    probe_weights_file(ckpt_path)
    target = resolve_device(device)
    model_config = OmegaConf.to_container(config.model, resolve=True)
    params = model_config.setdefault("params", {})
    params["use_ema"] = False
    params.pop("ckpt_path", None)
    params.pop("embedding_manager_ckpt", None)
    model = instantiate_from_config(model_config)
    model.init_from_ckpt(str(ckpt_path), use_ema=use_ema, trust_pickle=trust_pickle)
    model = model.to(target).eval()
    model.requires_grad_(False)
    logger.info("Loaded %s with %s on %s%s", config_path, ckpt_path, target, " (EMA weights)" if use_ema else "")
    return model


def attach_embedding(model: torch.nn.Module, path: PathLike, gamma: float | None = None,
                     strength: float = 1.0) -> EmbeddingManager:
    """Load an embedding file onto ``model.cond_stage_model`` and set ``model.embedding_manager``.

    ``gamma`` re-mixes a momentum embedding (``e = e_p + gamma * (v - e_p)``); ``None`` keeps the
    stored gamma. ``strength`` s in [0, 4] places ``e_p + s * (e - e_p)`` instead of e (1: e exactly,
    0: e_p exactly); it rescales v about e_p, which rescales e about e_p by the same s. Raises
    ValueError (CheckpointError) for a file that is not an embedding or whose vectors do not fit the
    text encoder.
    """
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: embedding file not found; check --embedding_path")
    manager = EmbeddingManager.from_file(model.cond_stage_model, path, gamma=gamma)
    with torch.no_grad():
        for v, e_p in zip(manager.vectors, manager.base_vectors):
            v.copy_(scale_offset(e_p, v, strength))
    manager = manager.to(model.device).eval()
    manager.requires_grad_(False)
    model.embedding_manager = manager
    return manager


def latent_downsampling(model: torch.nn.Module) -> int | None:
    """The first stage's spatial downsampling factor (8 for SD v1), when it can be read."""
    encoder = getattr(model.first_stage_model, "encoder", None)
    levels = getattr(encoder, "num_resolutions", None)
    return 2 ** (levels - 1) if isinstance(levels, int) else None
