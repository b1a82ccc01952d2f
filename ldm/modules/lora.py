"""LoRA adapters on a model's linear and convolution layers, through peft, named in the kohya / A1111 layout.

peft's ``inject_adapter_in_model`` serves the CompVis layout as it is: it wraps any ``nn.Linear`` /
``nn.Conv2d`` whose module path ends in one of the targets (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` in
``ldm.modules.attention.CrossAttention``) in a ``peft.tuners.lora.LoraLayer`` that keeps the original as
``base_layer`` (frozen) and adds ``lora_A`` / ``lora_B`` (float32)::

    y = W x + scale * alpha / r * B (A x)          (Hu et al. 2021, eq. 3; A = lora_down, B = lora_up)

The only code of our own is the naming: an :class:`AdapterPart` says which module takes adapters, its
kohya prefix and how a module path there becomes the diffusers path kohya names are built from.
"""
from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ldm.checkpoint import CheckpointError
from ldm.checkpoint.lora import LoraFile, LoraLayer, kohya_name

logger = logging.getLogger(__name__)

DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TRANSFORMER_TARGETS = (*DEFAULT_UNET_TARGETS, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
# --lora_targets presets: the attention projections (diffusers' train_dreambooth_lora); every linear / 1x1
# convolution of the transformer blocks (kohya's sd-scripts default: attention, feed-forward, proj_in/proj_out);
# those and the ResBlocks' and resamplers' layers, 3x3 convolutions included (kohya's LoRA-C3Lier, i.e.
# --network_args conv_dim=r, LyCORIS' LoCon; here at the same rank as the rest)
UNET_TARGET_PRESETS = {
    "attention": DEFAULT_UNET_TARGETS,
    "transformer": TRANSFORMER_TARGETS,
    "locon": (*TRANSFORMER_TARGETS, "in_layers.2", "emb_layers.1", "out_layers.3", "skip_connection", "op", "conv"),
}
TRAINED_ADAPTER = "trained"
ADAPTABLE = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class AdapterPart:
    """A module that takes adapters, its kohya prefix (``lora_unet_``) and its path -> diffusers path map
    (None for a layer with no name in the kohya layout)."""

    module: nn.Module
    prefix: str
    to_diffusers: Callable[[str], str | None]

    def kohya_names(self) -> dict[str, str]:
        """Module path -> kohya name, for every linear/conv layer that has one (adapted layers included)."""
        from peft.tuners.lora import LoraLayer as PeftLoraLayer

        names = {}
        for path, layer in self.module.named_modules():
            if isinstance(layer, (PeftLoraLayer, *ADAPTABLE)) and ".base_layer" not in path and ".lora_" not in path:
                diffusers = self.to_diffusers(path)
                if diffusers is not None:
                    names[path] = kohya_name(self.prefix, diffusers)
        return names


def unet_targets(text: str) -> list[str]:
    """``--lora_targets``: a preset of :data:`UNET_TARGET_PRESETS` or comma-separated layer-path endings."""
    if text in UNET_TARGET_PRESETS:
        return list(UNET_TARGET_PRESETS[text])
    targets = [name.strip() for name in text.split(",") if name.strip()]
    if not targets:
        raise ValueError(f"name a preset ({', '.join(UNET_TARGET_PRESETS)}) or layers, e.g. to_q,to_k,to_v,to_out.0")
    return targets


def adapter_layers(module: nn.Module) -> dict[str, nn.Module]:
    """peft's LoRA layers in ``module`` by module path (the path the wrapped layer had)."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    return {path: layer for path, layer in module.named_modules() if isinstance(layer, PeftLoraLayer)}


def add_adapters(part: AdapterPart, targets: Iterable[str], *, rank: int = 4, alpha: float | None = None,
                 adapter: str = TRAINED_ADAPTER) -> int:
    """Wrap every layer of ``part`` whose path ends in one of ``targets`` with a trainable rank-``rank`` adapter.

    ``alpha`` defaults to ``rank`` (scale 1, kohya's and peft's convention). The adapter starts at zero
    (``B = 0``), so the model's output is unchanged until it trains. Returns the number of adapted layers.
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(targets)
    if rank < 1:
        raise ValueError(f"lora rank must be at least 1, got {rank}")
    if not targets:
        raise ValueError("lora targets are empty: name the layers to adapt (e.g. [to_q, to_k, to_v, to_out.0])")
    # the linear/conv layers whose paths end in a target (a ResBlock's skip_connection may be an Identity)
    paths = [path for path, layer in part.module.named_modules() if isinstance(layer, ADAPTABLE)
             and any(path == target or path.endswith("." + target) for target in targets)]
    if not paths:
        raise ValueError(f"lora targets {targets} match no layer under {part.prefix}: name linear or convolution "
                         "layers by the end of their module path (e.g. to_q, ff.net.2)")
    config = LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha),
                        target_modules=paths, lora_dropout=0.0, bias="none")
    inject_adapter_in_model(config, part.module, adapter_name=adapter)
    layers = adapter_layers(part.module)
    unnamed = [path for path in layers if part.to_diffusers(path) is None]
    if unnamed:
        raise ValueError(f"lora target '{unnamed[0]}' has no name in the kohya/A1111 layout (a layer SD v1's UNet "
                         "does not have, e.g. a class embedding); name the layers of a preset instead")
    for layer in layers.values():
        # peft casts every input to the adapters' float32; with half base weights the model runs under autocast
        # (LatentDiffusion.weights_autocast), which casts it back, so the cast is one wasted copy per layer
        layer.cast_input_dtype_enabled = False
    logger.info("LoRA: %d layers of %s adapted (rank %d, alpha %g)", len(layers), part.prefix, rank,
                config.lora_alpha)
    return len(layers)


def export_layers(part: AdapterPart, adapter: str = TRAINED_ADAPTER) -> dict[str, LoraLayer]:
    """The weights of ``adapter`` in ``part`` by kohya name (down = A, up = B, alpha)."""
    names = part.kohya_names()
    return {names[path]: LoraLayer(layer.lora_A[adapter].weight.detach().float().cpu(),
                                   layer.lora_B[adapter].weight.detach().float().cpu(),
                                   float(layer.lora_alpha[adapter]))
            for path, layer in adapter_layers(part.module).items() if adapter in layer.lora_A}


def match_file(parts: Iterable[AdapterPart], lora: LoraFile) -> dict[str, tuple[AdapterPart, str]]:
    """Kohya name -> (part, module path) for every layer of ``lora``; one-line CheckpointError at the first
    name that matches no layer of the model."""
    parts = list(parts)
    known = {name: (part, path) for part in parts for path, name in part.kohya_names().items()}
    for name in lora.layers:
        if name not in known:
            example = next(iter(difflib.get_close_matches(name, known, n=1, cutoff=0.0)), "none")
            raise CheckpointError(f"{lora.path}: key '{name}.lora_down.weight' matches no layer of this model (an SD "
                                  f"v1 UNet/CLIP text encoder with {len(known)} adaptable layers; the closest is "
                                  f"'{example}'); was the LoRA made for another architecture (SDXL, SD 2)?")
    return {name: known[name] for name in lora.layers}


def load_file_adapters(parts: Iterable[AdapterPart], lora: LoraFile, adapter: str, scale: float = 1.0) -> int:
    """Add the layers of ``lora`` as adapter ``adapter`` at ``scale`` (frozen); returns the layers adapted.

    Shapes are checked against the layers they adapt: a one-line CheckpointError names the first key that
    does not fit.
    """
    from peft import LoraConfig, inject_adapter_in_model

    matched = match_file(parts, lora)
    by_part: dict[int, tuple[AdapterPart, dict[str, LoraLayer]]] = {}
    for name, (part, path) in matched.items():
        by_part.setdefault(id(part), (part, {}))[1][path] = lora.layers[name]
    for part, layers in by_part.values():
        patterns = {re.escape(path): layer for path, layer in layers.items()}
        first = next(iter(layers.values()))
        config = LoraConfig(r=first.rank, lora_alpha=first.alpha, target_modules=list(layers), lora_dropout=0.0,
                            rank_pattern={p: layer.rank for p, layer in patterns.items()},
                            alpha_pattern={p: layer.alpha for p, layer in patterns.items()}, inference_mode=True)
        inject_adapter_in_model(config, part.module, adapter_name=adapter)
        adapted = adapter_layers(part.module)
        names = part.kohya_names()
        for path, weights in layers.items():
            _copy_weights(lora.path, names[path], adapted[path], adapter, weights, scale)
    return len(matched)


@torch.no_grad()
def _copy_weights(source: str, name: str, layer: nn.Module, adapter: str, weights: LoraLayer, scale: float) -> None:
    down, up = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    for key, target, value in ((f"{name}.lora_down.weight", down, weights.down),
                               (f"{name}.lora_up.weight", up, weights.up)):
        if value.shape != target.shape:
            raise CheckpointError(f"{source}: '{key}' has shape {tuple(value.shape)} but the model's layer needs "
                                  f"{tuple(target.shape)}; the LoRA was made for another model")
        target.copy_(value)
    layer.set_scale(adapter, scale)
    layer.lora_A[adapter].requires_grad_(False)
    layer.lora_B[adapter].requires_grad_(False)


@torch.no_grad()
def fold_adapters(module: nn.Module) -> int:
    """Merge every active adapter into its base weight and put the plain layer back; returns layers folded."""
    layers = adapter_layers(module)
    for path, layer in layers.items():
        layer.merge()
        parent_path, _, child = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, child, layer.get_base_layer())
    return len(layers)
