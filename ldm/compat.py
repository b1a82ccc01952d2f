"""Keys of the original code's configs that are accepted here and have no effect, all in one table.

A config written for the original code keeps working: these keys are read and dropped. A value other
than the original default is logged once per key, so nobody tunes a setting that does nothing.
Any other unknown key is still an error, as for any Python call.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

logger = logging.getLogger(__name__)

IGNORED_KEYS: dict[str, dict[str, Any]] = {
    # DDIM/PLMS samplers take their own log_every_t; clipping x0 and positional encodings are not used
    # (load_only_unet: a checkpoint is always loaded whole, with strict keys)
    "LatentDiffusion": {"log_every_t": 100, "clip_denoised": True, "use_positional_encodings": False,
                        "load_only_unet": False},
    # grids are always clamped to [-1, 1] and rescaled to [0, 1]; logging is every batch_frequency global steps
    "ImageLogger": {"clamp": True, "rescale": True, "increase_log_steps": True, "log_on_batch_idx": False},
    # the original VQModel's own training options; here it is only a frozen first stage
    "VQModel": {"batch_resize_range": None, "scheduler_config": None, "lr_g_factor": 1.0, "use_ema": False},
    # datasets are map-style and seed their own per-worker randomness
    "DataModuleFromConfig": {"wrap": False, "use_worker_init_fn": False},
}
_reported: set[tuple[str, str]] = set()


def drop_ignored_keys(owner: str, given: Mapping[str, Any]) -> None:
    """Accept ``owner``'s ignored keys in ``given``; log once a non-default value; refuse anything else."""
    ignored = IGNORED_KEYS[owner]
    for key, value in given.items():
        if key not in ignored:
            raise TypeError(f"{owner} got an unexpected keyword argument '{key}'")
        if value != ignored[key] and (owner, key) not in _reported:
            _reported.add((owner, key))
            logger.info("%s: %s=%r has no effect here (accepted for the original code's configs)", owner, key, value)
