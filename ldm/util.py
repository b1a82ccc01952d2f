"""Small helpers shared across the package: building objects from config dicts."""
from __future__ import annotations

import importlib
from typing import Any, Mapping


def get_obj_from_str(path: str) -> Any:
    """Return the object named by a dotted path such as ``ldm.models.autoencoder.AutoencoderKL``."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"'{path}' is not a dotted path of the form package.module.Name")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ValueError(f"module '{module_name}' has no attribute '{attr}' (from target '{path}')") from err


def instantiate_from_config(config: Mapping[str, Any], **overrides: Any) -> Any:
    """Build ``config.target(**config.params, **overrides)``, the LDM config convention."""
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError(f"expected a 'target' key in config, got keys {sorted(config)}")
    params = dict(config.get("params", None) or {})
    params.update(overrides)
    return get_obj_from_str(config["target"])(**params)


def count_params(model, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (only the trainable ones when asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def exists(value: Any) -> bool:
    return value is not None


def default(value: Any, fallback: Any) -> Any:
    """``value`` unless it is None, else ``fallback`` (called if callable)."""
    if value is not None:
        return value
    return fallback() if callable(fallback) else fallback
