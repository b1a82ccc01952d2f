"""LoRA DreamBooth against full DreamBooth: one training step each on the same config, batch and precision.

Both models are built from their own configs (``v1-finetune_unfrozen.yaml`` and ``v1-finetune_lora.yaml``
beside it) with prior preservation; the LoRA model holds its frozen base in the half dtype under mixed
precision, as ``main.py`` does (``ldm.train.training.hold_frozen_weights_in_half``). The note gives the size of
the LoRA file (rank 4, the config's default) against the pruned full checkpoint DreamBooth writes, and the
file each ``--lora_targets`` preset would write (:func:`preset_file_sizes`).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from omegaconf import OmegaConf

from bench.measure import tensor_bytes
from bench.ours import OursStep, dreambooth_batch
from bench.table import Row
from ldm.checkpoint.lora import LoraLayer, save_lora
from ldm.export import pruned_state_dict
from ldm.lora import add_trained_adapters, trained_layers, unet_part
from ldm.modules.lora import TRAINED_ADAPTER, UNET_TARGET_PRESETS, adapter_layers, add_adapters
from ldm.util import instantiate_from_config, randomize_zero_weights

logger = logging.getLogger("benchmark")

PRIOR_LOSS = {"target": "ldm.models.diffusion.prior_loss.PriorPreservationLoss", "params": {"weight": 1.0}}
PROMPT, CLASS_PROMPT = "a photo of a sks woman", "a photo of a woman"


def _model(config_path: Path, device):
    config = OmegaConf.load(config_path)
    config.model.params.prior_loss_config = PRIOR_LOSS
    model = instantiate_from_config(config.model).to(device)
    randomize_zero_weights(model.model, std=0.02)  # the zero output conv would stop every other gradient
    model.learning_rate = float(config.model.base_learning_rate)
    return model, config


def preset_file_sizes(config: Path, rank: int) -> dict[str, int]:
    """Bytes of the rank-``rank`` LoRA file of each ``--lora_targets`` preset on ``config``'s UNet.

    The UNet is built on the meta device (shapes only); the file is written with zero adapters of the shapes
    peft gives them, so the size is the real file's, header included.
    """
    unet_config = OmegaConf.load(config).model.params.unet_config
    sizes = {}
    for preset, targets in UNET_TARGET_PRESETS.items():
        with torch.device("meta"):
            unet = instantiate_from_config(unet_config)
        part = unet_part(unet)
        add_adapters(part, targets, rank=rank)
        names = part.kohya_names()
        layers = {names[path]: LoraLayer(torch.zeros(layer.lora_A[TRAINED_ADAPTER].weight.shape),
                                         torch.zeros(layer.lora_B[TRAINED_ADAPTER].weight.shape), float(rank))
                  for path, layer in adapter_layers(unet).items()}
        with tempfile.TemporaryDirectory() as tmp:
            sizes[preset] = save_lora(Path(tmp) / "lora.safetensors", layers, {}).stat().st_size
    return sizes


def lora_rows(b, dreambooth_config: Path) -> list[Row]:
    """``lora_db_step``: a LoRA DreamBooth step against a full DreamBooth step, with the file sizes."""
    batch = dreambooth_batch(b.args.size, PROMPT, CLASS_PROMPT)
    lora_config = dreambooth_config.with_name("v1-finetune_lora.yaml")
    rank = int(OmegaConf.load(lora_config).lora.get("rank", 4))
    sizes: dict[str, int] = {}

    def full_step() -> OursStep:
        full, _ = _model(dreambooth_config, b.device)
        sizes["checkpoint"] = tensor_bytes(list(pruned_state_dict(full.state_dict()).values())) // 2  # fp16 export
        return OursStep(full, batch, b.latent_numel)

    def lora_step() -> OursStep:
        lora, _ = _model(lora_config, b.device)
        add_trained_adapters(lora, rank=rank)
        if b.weight_dtype is not None:
            lora.hold_frozen_weights_in_half(b.weight_dtype)
        with tempfile.TemporaryDirectory() as tmp:
            sizes["lora"] = save_lora(Path(tmp) / "lora.safetensors", trained_layers(lora), {}).stat().st_size
        return OursStep(lora, batch, b.latent_numel)

    lora_m, full_m = b.pair_built(lora_step, full_step)
    mode = "measured one after the other (--sequential)" if b.args.sequential else "timed alternately"
    presets = ", ".join(f"{preset} {size / 1e6:.2f} MB ({size / sizes['checkpoint']:.2%})"
                        for preset, size in preset_file_sizes(lora_config, rank).items())
    return [Row("lora_db_step", "our full DB", lora_m, full_m,
                f"{b.args.size}px, 1 subject + 1 class, rank {rank} on to_q/k/v/out, {mode}; LoRA file "
                f"{sizes['lora'] / 1e6:.2f} MB vs fp16 checkpoint {sizes['checkpoint'] / 1e6:.0f} MB "
                f"({sizes['lora'] / sizes['checkpoint']:.2%}); --lora_targets files: {presets}; "
                "mem incl. optimizer state")]
