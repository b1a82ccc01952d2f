"""Model weights: read SD/Lightning checkpoints safely, load them strictly, save them atomically.

Key layout is the released Stable Diffusion v1 one (the tests compare every key and shape with the
list of a released checkpoint; README "Tests"). Keys a checkpoint may carry that the model need not
have (the allow-list):

* ``*position_ids``: CLIP's position-id buffer, deterministic and non-persistent in transformers;
* ``model_ema.*``: LitEma shadows of the UNet (``model_ema.`` + parameter name without dots, plus
  ``model_ema.decay`` / ``model_ema.num_updates``), used only with ``use_ema=True``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldm.util import atomic_write
from ldm.checkpoint._io import (
    SAFETENSORS_SUFFIX,
    CheckpointError,
    check_readable,
    decode_metadata,
    detach_for_safetensors,
    encode_metadata,
    read_safetensors,
    safe_torch_load,
    sniff_format,
)
from ldm.checkpoint.lora import looks_like_lora

logger = logging.getLogger(__name__)

EMA_PREFIX = "model_ema."
DIFFUSION_PREFIX = "model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
TEXT_MODEL_PREFIX = TEXT_ENCODER_PREFIX + "text_model."
MAX_LISTED = 10


@dataclass
class Checkpoint:
    """A checkpoint's state dict and its scalar metadata (``global_step``, ``epoch``, ...)."""

    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadReport:
    """What :func:`load_weights` did."""

    loaded: int
    ignored_unexpected: list[str]
    allowed_missing: list[str]
    renamed: int
    used_ema: bool


def read_checkpoint(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Checkpoint:
    """Read a ``.ckpt``/``.pt``/``.pth`` (with or without ``state_dict``) or ``.safetensors`` file on CPU."""
    path = Path(path)
    check_readable(path)
    if sniff_format(path) == "safetensors":
        tensors, metadata = read_safetensors(path)
        if not tensors:
            raise CheckpointError(f"{path}: safetensors file holds no tensors; pass a model checkpoint")
        checkpoint = Checkpoint(tensors, decode_metadata(metadata))
    else:
        obj = safe_torch_load(path, trust_pickle=trust_pickle)
        checkpoint = Checkpoint(_extract_state_dict(path, obj), _scalar_meta(obj))
    if looks_like_lora(checkpoint.state_dict):
        raise CheckpointError(f"{path}: is a LoRA file (kohya layout), not model weights; pass it with --lora "
                              "FILE[:SCALE] on top of an SD checkpoint")
    return checkpoint


def read_state_dict(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint file; see :func:`read_checkpoint`."""
    return read_checkpoint(path, trust_pickle=trust_pickle).state_dict


def read_checkpoint_meta(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> dict[str, Any]:
    """Scalar metadata of a checkpoint (``global_step``, ``epoch``, ...); empty when none is stored."""
    return read_checkpoint(path, trust_pickle=trust_pickle).meta


def _extract_state_dict(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a checkpoint (a dict of tensors or a dict with "
            "'state_dict'); pass a model checkpoint"
        )
    if "string_to_param" in obj:
        raise CheckpointError(f"{path}: is a textual-inversion embedding file, not model weights; pass it as the embedding")
    state = obj.get("state_dict", obj)
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{path}: has no (or an empty) state dict; pass a model checkpoint")
    not_tensors = [str(key) for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{path}: not a checkpoint: {len(not_tensors)} entries are not tensors "
            f"(e.g. {not_tensors[:MAX_LISTED]}); pass a model checkpoint"
        )
    return {str(key): value.detach() for key, value in state.items()}


def _scalar_meta(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, Mapping) or "state_dict" not in obj:
        return {}
    return {key: value for key, value in obj.items() if isinstance(value, (bool, int, float, str))}


def ema_key(name: str) -> str:
    """LitEma key of a diffusion parameter: ``model.a.b.weight`` -> ``model_ema.abweight``."""
    if not name.startswith(DIFFUSION_PREFIX):
        raise ValueError(f"'{name}' is not a diffusion-model key (expected the prefix '{DIFFUSION_PREFIX}')")
    return EMA_PREFIX + name[len(DIFFUSION_PREFIX) :].replace(".", "")


def is_ignorable_extra(key: str) -> bool:
    """True for checkpoint keys the model may lack (position ids, EMA shadows)."""
    return key.endswith("position_ids") or key.startswith(EMA_PREFIX)


def load_weights(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    use_ema: bool = False,
    allow_missing_prefixes: tuple[str, ...] = (),
) -> LoadReport:
    """Load ``state_dict`` into ``model``: no missing key, only allow-listed extras, matching shapes."""
    expected = model.state_dict()
    state = dict(state_dict)
    renamed = _align_text_encoder_keys(state, expected)
    if use_ema:
        _apply_ema(state, model)
    missing = [key for key in expected if key not in state]
    allowed_missing = [k for k in missing if k.endswith("position_ids") or k.startswith(tuple(allow_missing_prefixes))]
    _raise_listed(
        [k for k in missing if k not in allowed_missing],
        "missing from the checkpoint",
        "the config does not match the checkpoint (or the file is incomplete)",
    )
    unexpected = [key for key in state if key not in expected]
    _raise_listed(
        [k for k in unexpected if not is_ignorable_extra(k)],
        "in the checkpoint but not in the model",
        "the config does not match the checkpoint",
    )
    mismatched = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    _raise_listed(mismatched, "with mismatched shapes", "the config does not match the checkpoint")
    to_load = {key: value for key, value in state.items() if key in expected}
    result = model.load_state_dict(to_load, strict=False)
    assert set(result.missing_keys) == set(allowed_missing) and not result.unexpected_keys, result
    ignored = [k for k in unexpected if is_ignorable_extra(k)]
    logger.info(
        "Loaded %d tensors (%d extra keys ignored, %d allowed missing, EMA %s)",
        len(to_load), len(ignored), len(allowed_missing), "used" if use_ema else "not used",
    )
    return LoadReport(len(to_load), ignored, allowed_missing, renamed, use_ema)


def _raise_listed(keys: list[str], what: str, hint: str) -> None:
    if keys:
        shown = "; ".join(keys[:MAX_LISTED]) + ("; ..." if len(keys) > MAX_LISTED else "")
        raise CheckpointError(f"{len(keys)} keys {what}: {shown} - {hint}")


def _align_text_encoder_keys(state: dict[str, torch.Tensor], expected: Mapping[str, Any]) -> int:
    """Rename text-encoder keys with/without the ``text_model.`` level to what the model uses."""
    renamed = 0
    for key in list(state):
        if key in expected or not key.startswith(TEXT_ENCODER_PREFIX):
            continue
        if key.startswith(TEXT_MODEL_PREFIX):
            other = TEXT_ENCODER_PREFIX + key[len(TEXT_MODEL_PREFIX) :]
        else:
            other = TEXT_MODEL_PREFIX + key[len(TEXT_ENCODER_PREFIX) :]
        if other in expected and other not in state:
            state[other] = state.pop(key)
            renamed += 1
    return renamed


def _apply_ema(state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Replace each ``model.*`` parameter in ``state`` by its ``model_ema.*`` shadow."""
    if not any(key.startswith(EMA_PREFIX) for key in state):
        raise CheckpointError("use_ema=True but the checkpoint has no EMA weights ('model_ema.*' keys); load without use_ema")
    names = [name for name, _ in model.named_parameters() if name.startswith(DIFFUSION_PREFIX)]
    if not names:
        raise CheckpointError(f"use_ema=True but the model has no '{DIFFUSION_PREFIX}*' parameters to take EMA weights")
    _raise_listed(
        [ema_key(name) for name in names if ema_key(name) not in state],
        "of EMA weights missing",
        "the checkpoint's EMA does not cover the model; load without use_ema",
    )
    for name in names:
        state[name] = state[ema_key(name)]


def save_checkpoint(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    *,
    extra: dict[str, Any] | None = None,
    half: bool = False,
) -> Path:
    """Write ``{"state_dict": ..., **extra}`` (``.ckpt``/``.pt``) or a ``.safetensors`` file, atomically."""
    extra = dict(extra or {})
    if "state_dict" in extra:
        raise CheckpointError("'state_dict' cannot be an extra key of save_checkpoint; pass it as state_dict")
    tensors = {key: (value.half() if half and value.is_floating_point() else value) for key, value in state_dict.items()}
    tensors = detach_for_safetensors(tensors)
    if Path(path).suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import save_file

        metadata = {"format": "pt", **encode_metadata(extra)}
        target = atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    else:
        target = atomic_write(path, lambda tmp: torch.save({"state_dict": tensors, **extra}, tmp))
    logger.info("Saved %d tensors to %s", len(tensors), target)
    return target
