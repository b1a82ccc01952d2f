"""LoRA files in the kohya / AUTOMATIC1111 layout: module names, reading and writing.

One entry per adapted linear or convolution layer; ``<name>`` is the layer's diffusers module path with ``_`` for ``.``
(what kohya's sd-scripts write for SD v1 and what A1111, ComfyUI and diffusers' ``load_lora_weights`` read)::

    lora_unet_<name>.lora_down.weight   [r, in]    (peft's lora_A; [r, in, k, k] for a convolution)
    lora_unet_<name>.lora_up.weight     [out, r]   (peft's lora_B; [out, r, 1, 1] for a convolution)
    lora_unet_<name>.alpha              []         W' = W + scale * alpha / r * up @ down
    lora_te_<name>.*                    the text encoder, transformers' CLIP names
                                        (text_model.encoder.layers.0.self_attn.q_proj)

e.g. ``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k``. Metadata (strings) uses
kohya's ``ss_*`` keys (``ss_network_dim``, ``ss_network_alpha``, ``ss_steps``, ``ss_sd_model_hash``: A1111's
10-digit sha256 of the base checkpoint) plus ``mti_identifier`` (the DreamBooth identifier).

The CompVis UNet numbers its blocks in one list per side (``input_blocks.i.j``, ``output_blocks.i.j``: a
ResBlock at j = 0, an attention block at j = 1, a resampler last); diffusers numbers the same blocks per
resolution level (:func:`unet_diffusers_path`). Nothing else of the diffusers layout is needed: a file's
names are matched against the names the model's own layers get.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.checkpoint._io import (
    CheckpointError,
    check_readable,
    detach_for_safetensors,
    read_safetensors,
    safe_torch_load,
    sniff_format,
)
from ldm.util import atomic_write

logger = logging.getLogger(__name__)

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
LORA_PREFIXES = (UNET_PREFIX, TEXT_ENCODER_PREFIX, "lora_te1_", "lora_te2_")
DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
KEY = re.compile(r"^(?P<name>lora_[A-Za-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
FULL_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "state_dict", "first_stage_model.", "cond_stage_model.")
SCALE_RANGE = (-4.0, 4.0)
# metadata keys (kohya's names where kohya has one)
META_RANK, META_ALPHA, META_STEPS = "ss_network_dim", "ss_network_alpha", "ss_steps"
META_BASE_HASH, META_BASE_NAME, META_IDENTIFIER = "ss_sd_model_hash", "ss_sd_model_name", "mti_identifier"
FIXED_METADATA = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"}
_UNET_BLOCK = re.compile(r"^(?P<side>input_blocks|output_blocks)\.(?P<index>\d+)\.(?P<slot>\d+)\.(?P<rest>.+)$")
# a CompVis ResBlock's layers -> diffusers' ResnetBlock2D names (the norms are not adaptable)
_RESBLOCK_LAYERS = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
                    "skip_connection": "conv_shortcut"}
_OUTER_LAYERS = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
                 "time_embed.2": "time_embedding.linear_2", "out.2": "conv_out"}


@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer: ``delta W = alpha / rank * up @ down`` (rank = ``down.shape[0]``)."""

    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [out, r]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file's layers by kohya name (``lora_unet_...``) and its metadata (strings)."""

    layers: dict[str, LoraLayer]
    metadata: dict[str, str] = field(default_factory=dict)
    path: str = ""

    @property
    def base_hash(self) -> str | None:
        return self.metadata.get(META_BASE_HASH) or None


# --------------------------------------------------------------------------------- names


def unet_diffusers_path(path: str, num_res_blocks: int) -> str | None:
    """The diffusers path of a linear/conv layer of a CompVis UNet; None for a path with none.

    With n = ``num_res_blocks``, each resolution level holds n + 1 blocks per side:
    ``input_blocks.i`` -> level, block = divmod(i - 1, n + 1) (block n is the level's Downsample),
    ``output_blocks.i`` -> divmod(i, n + 1) (its Upsample sits after the last block's ResBlock/attention).
    Inside a block, slot 0 is a ResBlock (``down_blocks.<level>.resnets.<block>``: ``in_layers.2`` ->
    ``conv1`` ...), slot 1 an attention block (``attentions.<block>``, whose layers have the same names in
    both layouts); ``middle_block.0/1/2`` are ``mid_block.resnets.0``, ``attentions.0``, ``resnets.1``.
    """
    if path in _OUTER_LAYERS:
        return _OUTER_LAYERS[path]
    if path.startswith("middle_block."):
        slot, _, rest = path[len("middle_block."):].partition(".")
        if slot == "1":
            return f"mid_block.attentions.0.{rest}"
        return _resblock_path(f"mid_block.resnets.{int(slot) // 2}", rest) if slot in ("0", "2") else None
    match = _UNET_BLOCK.match(path)
    if match is None:
        return None
    index, slot, rest = int(match["index"]), int(match["slot"]), match["rest"]
    if match["side"] == "input_blocks":
        level, block = divmod(index - 1, num_res_blocks + 1)
        if block == num_res_blocks:  # the Downsample: one convolution, "op"
            return f"down_blocks.{level}.downsamplers.0.conv" if rest == "op" else None
        side = "down_blocks"
    else:
        level, block = divmod(index, num_res_blocks + 1)
        if rest == "conv":  # the Upsample's one convolution (no ResBlock or attention block has a layer "conv")
            return f"up_blocks.{level}.upsamplers.0.conv"
        side = "up_blocks"
    if slot == 0:
        return _resblock_path(f"{side}.{level}.resnets.{block}", rest)
    return f"{side}.{level}.attentions.{block}.{rest}" if slot == 1 else None


def _resblock_path(block: str, rest: str) -> str | None:
    return f"{block}.{_RESBLOCK_LAYERS[rest]}" if rest in _RESBLOCK_LAYERS else None


def text_encoder_diffusers_path(path: str) -> str | None:
    """transformers' CLIP path of a layer of ``FrozenCLIPEmbedder`` (``transformer.text_model.*`` -> ``text_model.*``)."""
    return path[len("transformer."):] if path.startswith("transformer.text_model.") else None


def kohya_name(prefix: str, diffusers_path: str) -> str:
    """``lora_unet_`` / ``lora_te_`` + the diffusers path with ``_`` for ``.``."""
    return prefix + diffusers_path.replace(".", "_")


# --------------------------------------------------------------------------------- reading


def looks_like_lora(keys) -> bool:
    """True when every key is a kohya LoRA key (``lora_unet_...``, ``lora_te_...``)."""
    keys = list(keys)
    return bool(keys) and all(str(k).startswith(LORA_PREFIXES) for k in keys)


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` -> (file, scale); scale 1 when left out, and within [-4, 4]."""
    path, _, scale_text = spec.rpartition(":") if re.search(r":[-+.\d]+$", spec) else (spec, "", "")
    try:
        scale = float(scale_text) if scale_text else 1.0
    except ValueError:
        raise ValueError(f"lora '{spec}': the scale after ':' must be a number") from None
    if not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
        raise ValueError(f"lora scale must be in [{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}], got {scale:g} in '{spec}'")
    return path, scale


def read_lora(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> LoraFile:
    """A kohya-layout LoRA file (``.safetensors``, or a ``.pt``/``.ckpt`` of the same tensors).

    Raises :class:`CheckpointError` (one line) for a full checkpoint or an embedding (naming the flag that
    takes it), a key outside the layout, a layer without its down or up weight, or shapes that do not chain.
    """
    path = Path(path)
    check_readable(path)
    if sniff_format(path) == "safetensors":
        tensors, metadata = read_safetensors(path)
    else:
        obj = safe_torch_load(path, trust_pickle=trust_pickle)
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a LoRA (a dict of lora_unet_* tensors)")
        tensors, metadata = obj, {}
    _refuse_other_files(path, tensors)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = KEY.match(str(key))
        if match is None or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: key '{key}' is not a kohya LoRA key (<lora_unet_|lora_te_><module>."
                                  "lora_down.weight / .lora_up.weight / .alpha)")
        parts.setdefault(match["name"], {})[match["part"]] = tensor
    layers = {name: _layer(path, name, found) for name, found in parts.items()}
    return LoraFile(layers, {str(k): str(v) for k, v in metadata.items()}, str(path))


def _refuse_other_files(path: Path, tensors) -> None:
    keys = [str(k) for k in tensors]
    if any(k.startswith(FULL_CHECKPOINT_PREFIXES) for k in keys):
        raise CheckpointError(f"{path}: is a full SD checkpoint, not a LoRA; pass it with --actual_resume "
                              "(main.py) or --ckpt (scripts)")
    if "string_to_param" in keys or "emb_params" in keys:
        raise CheckpointError(f"{path}: is a textual-inversion embedding, not a LoRA; pass it with "
                              "--embedding_manager_ckpt (main.py) or --embedding_path (scripts)")
    if not keys:
        raise CheckpointError(f"{path}: holds no tensors; pass a kohya/A1111 LoRA file")


def _layer(path: Path, name: str, found: dict[str, torch.Tensor]) -> LoraLayer:
    if DOWN not in found or UP not in found:
        missing = DOWN if DOWN not in found else UP
        raise CheckpointError(f"{path}: '{name}' has no {missing}; the file is incomplete")
    down, up = found[DOWN], found[UP]
    if down.dim() not in (2, 4) or up.dim() != down.dim():
        raise CheckpointError(f"{path}: '{name}.{DOWN}' has shape {tuple(down.shape)} and {UP} {tuple(up.shape)}: "
                              "not a linear ([r, in]) or convolution ([r, in, k, k]) LoRA layer")
    if up.shape[1] != down.shape[0]:
        raise CheckpointError(f"{path}: '{name}': {UP} {tuple(up.shape)} does not chain with {DOWN} "
                              f"{tuple(down.shape)}")
    alpha = float(found[ALPHA]) if ALPHA in found else float(down.shape[0])  # kohya: no alpha means alpha = rank
    return LoraLayer(down.float(), up.float(), alpha)


# --------------------------------------------------------------------------------- writing


def save_lora(path: str | os.PathLike[str], layers: dict[str, LoraLayer], metadata: dict[str, object]) -> Path:
    """Write ``layers`` (by kohya name) as a kohya-layout ``.safetensors`` with string ``metadata``."""
    from safetensors.torch import save_file

    if Path(path).suffix != ".safetensors":
        raise CheckpointError(f"{path}: a LoRA file must end in .safetensors")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.{DOWN}"] = layer.down.float()
        tensors[f"{name}.{UP}"] = layer.up.float()
        tensors[f"{name}.{ALPHA}"] = torch.tensor(float(layer.alpha))
    tensors = detach_for_safetensors(tensors)
    text = {**FIXED_METADATA, **{str(k): str(v) for k, v in metadata.items() if v is not None}}
    written = atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=text))
    logger.info("Wrote LoRA (%d layers) to %s", len(layers), written)
    return written
