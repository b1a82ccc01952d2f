"""Lightning ``Trainer`` arguments from main.py's flags and the merged config's ``lightning.trainer``.

Every ``lightning.trainer.*`` key (in a config or a ``lightning.trainer.key=value`` override) either
takes effect or is a one-line error naming the flag to use:

- ``precision``, ``accumulate_grad_batches``, ``num_nodes``, ``max_steps``, ``max_epochs``: the config
  value, which the flag of the same name overwrites (:mod:`ldm.train.flags`), so one value reaches the Trainer;
- ``accelerator``, ``devices``, ``strategy``, ``gpus``: set by ``--gpus`` / ``--accelerator`` / ``--devices``;
- ``callbacks``, ``logger``, ``default_root_dir``: set by main.py (``lightning.callbacks``, ``--logdir``);
- any other argument of Lightning's Trainer passes through; a key the Trainer does not have is an error.

``--gpus`` naming a GPU when CUDA is unavailable is an error that says why; ``--accelerator cpu`` is
the explicit way to train on the CPU.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("32", "16-mixed", "bf16-mixed")
PRECISION_ALIASES = {"16": "16-mixed", "bf16": "bf16-mixed", "32-true": "32"}  # Lightning's older spellings
DEFAULTS = {"precision": "32", "accumulate_grad_batches": 1, "num_nodes": 1}
MINIMUM = {"accumulate_grad_batches": 1, "num_nodes": 1, "max_steps": -1, "max_epochs": -1}  # -1: no limit
DEVICE_FLAGS = "--gpus (e.g. --gpus 0,), --accelerator or --devices"
OWNED_KEYS = {
    "accelerator": DEVICE_FLAGS, "devices": DEVICE_FLAGS, "strategy": DEVICE_FLAGS, "gpus": DEVICE_FLAGS,
    "callbacks": "lightning.callbacks.<name> entries", "logger": "-l/--logdir (CSV and TensorBoard logs go there)",
    "default_root_dir": "-l/--logdir",
}


class TrainerArgumentError(ValueError):
    """A flag or ``lightning.trainer`` key that cannot be used; the message names what to pass instead."""


@functools.lru_cache(maxsize=1)
def trainer_parameters() -> frozenset[str]:
    """The keyword arguments of Lightning's ``Trainer``."""
    import pytorch_lightning as pl

    return frozenset(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}


def trainer_kwargs(trainer_config: Mapping[str, Any]) -> dict[str, Any]:
    """Trainer arguments (without devices, callbacks and loggers) from the merged ``lightning.trainer``."""
    kwargs = dict(trainer_config)
    for key in kwargs:
        if key in OWNED_KEYS:
            raise TrainerArgumentError(f"lightning.trainer.{key} is set by main.py: use {OWNED_KEYS[key]} instead")
        if key not in trainer_parameters():
            raise TrainerArgumentError(f"lightning.trainer.{key} is not an argument of Lightning's Trainer; "
                                       "remove it or fix its spelling")
    kwargs = {**DEFAULTS, **kwargs}
    kwargs["precision"] = _precision(kwargs["precision"])
    for key, minimum in MINIMUM.items():
        if kwargs.get(key) is not None:
            kwargs[key] = _whole_number(key, kwargs[key], minimum)
    return kwargs


def _precision(value: Any) -> str:
    text = PRECISION_ALIASES.get(str(value), str(value))
    if text not in PRECISIONS:
        raise TrainerArgumentError(f"lightning.trainer.precision={value!r} is not a training precision; use "
                                   f"--precision with one of {', '.join(PRECISIONS)}")
    return text


def _whole_number(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TrainerArgumentError(f"lightning.trainer.{key}={value!r} must be a whole number >= {minimum}; "
                                   f"pass --{key} N")
    return value


def device_kwargs(opt: argparse.Namespace) -> dict[str, Any]:
    """accelerator/devices/strategy from the original code's ``--gpus`` or the explicit ``--accelerator``/``--devices``."""
    gpus = parse_gpu_ids(opt.gpus)
    if opt.accelerator in (None, "gpu", "cuda", "auto") and (gpus or opt.accelerator in ("gpu", "cuda")):
        if not torch.cuda.is_available():
            asked = f"--gpus {opt.gpus}" if gpus else f"--accelerator {opt.accelerator}"
            raise TrainerArgumentError(f"{asked} asks for a GPU, but CUDA is not available: {no_cuda_reason()}; "
                                       "pass --accelerator cpu to train on the CPU")
        devices = gpus or int(opt.devices or 1)
        count = len(devices) if isinstance(devices, list) else devices
        return {"accelerator": "gpu", "devices": devices, "strategy": "ddp" if count > 1 else "auto"}
    accelerator = opt.accelerator or "cpu"
    devices = int(opt.devices or 1)
    if accelerator == "cpu":
        logger.info("Training on the CPU")
    return {"accelerator": accelerator, "devices": devices, "strategy": "ddp" if devices > 1 else "auto"}


def no_cuda_reason() -> str:
    """Why torch sees no GPU, in the terms a user can act on."""
    if torch.version.cuda is None:
        return f"this torch {torch.__version__} is a CPU-only build (install the CUDA wheel pinned in requirements.txt)"
    return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, which needs an NVIDIA driver that "
            "supports it (CUDA 13: driver >= 580, see nvidia-smi) and a visible GPU (Docker: docker run --gpus all)")


def parse_gpu_ids(gpus: str | None) -> list[int]:
    """'0,' -> [0]; '0,1' -> [0, 1]; None or '' -> []."""
    if not gpus:
        return []
    try:
        return [int(g) for g in str(gpus).split(",") if g.strip()]
    except ValueError as err:
        raise TrainerArgumentError(f"--gpus must list GPU ids like '0,' or '0,1', got '{gpus}'") from err
