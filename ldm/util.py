"""Small helpers shared across the package: building objects from config dicts."""
from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping


# Config targets that name another place than where the class lives: the original code's configs
# name classes defined in its main.py, and configs saved by older runs name modules since moved.
TARGET_ALIASES = {
    "main.ImageLogger": "ldm.train.callbacks.ImageLogger",
    "main.DataModuleFromConfig": "ldm.data.datamodule.DataModuleFromConfig",
    "ldm.modules.face_loss.FacialLoss": "ldm.models.diffusion.face_loss.FacialLoss",
    "ldm.modules.prior_loss.PriorPreservationLoss": "ldm.models.diffusion.prior_loss.PriorPreservationLoss",
}

# Modules moved whole: a target ``old.Name`` resolves to ``new.Name``. The training wing went under
# ldm/train/ and the toy world under ldm/toy/; configs saved before the move name the old modules.
MODULE_ALIASES = {
    "ldm.callbacks": "ldm.train.callbacks",
    "ldm.dreambooth": "ldm.train.dreambooth",
    "ldm.flags": "ldm.train.flags",
    "ldm.run_config": "ldm.train.run_config",
    "ldm.run_log": "ldm.train.run_log",
    "ldm.run_metrics": "ldm.train.run_metrics",
    "ldm.trainer_args": "ldm.train.trainer_args",
    "ldm.training": "ldm.train.training",
    "ldm.validation.best": "ldm.train.validation.best",
    "ldm.validation.callback": "ldm.train.validation.callback",
    "ldm.validation.grid": "ldm.train.validation.grid",
    "ldm.validation.settings": "ldm.train.validation.settings",
    "ldm.validation.setup": "ldm.train.validation.setup",
    "ldm.data.toy": "ldm.toy.scenes",
    "ldm.data.toy_world": "ldm.toy.world",
    "ldm.toy_judge": "ldm.toy.judge",
    "ldm.toy_benchmark": "ldm.toy.benchmark",
    "ldm.frontier": "ldm.toy.frontier",
}


def resolve_target(path: str) -> str:
    """Where a config target lives now: :data:`TARGET_ALIASES` first, then :data:`MODULE_ALIASES`."""
    if path in TARGET_ALIASES:
        return TARGET_ALIASES[path]
    module_name, _, attr = path.rpartition(".")
    if module_name in MODULE_ALIASES:
        return f"{MODULE_ALIASES[module_name]}.{attr}"
    return path


def get_obj_from_str(path: str) -> Any:
    """Return the object named by a dotted path such as ``ldm.models.autoencoder.AutoencoderKL``.

    Paths that :func:`resolve_target` knows as moved resolve to where the class lives now.
    """
    path = resolve_target(path)
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


def atomic_write(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> Path:
    """Run ``writer(tmp)`` on a temp file next to ``path``, fsync it, then rename it over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        writer(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600 files; use the usual mode
        with tmp.open("rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms (Windows) cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def randomize_zero_weights(model, seed: int = 0, std: float = 0.05) -> None:
    """Give all-zero parameters (zero-initialised output convs, biases) small random values.

    A freshly built SD has zero-initialised attention outputs, so its conditioning has no effect
    and no gradient reaches an embedding; real checkpoints have no such zeros. Used for the
    random-weight tiny model of the demo and the tests.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def to_device_nonblocking(tensor, device):
    """``tensor`` (on the CPU) on ``device``; to a GPU through pinned memory, so the host does not wait.

    A plain ``.to("cuda")`` of pageable memory waits for all queued GPU work before copying.
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
