"""The denoiser of a diffusion model, with its conditioning routed by kind (the original ``DiffusionWrapper``)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ldm.models.diffusion.compiled_unet import CompiledUNet
from ldm.util import instantiate_from_config

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm")


class DiffusionWrapper(nn.Module):
    """Holds the denoiser as ``diffusion_model`` and routes conditioning to it by kind."""

    def __init__(self, diff_model_config: Mapping[str, Any], conditioning_key: str | None):
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"conditioning_key '{conditioning_key}' is not one of {CONDITIONING_KEYS}")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key
        self.compiled_unet: CompiledUNet | None = None  # a plain attribute: state-dict keys stay the same

    def compile_unet(self, mode: str | None) -> None:
        """Call the denoiser through ``torch.compile`` (``mode`` as :func:`compile_mode` returns; None: eager)."""
        self.compiled_unet = CompiledUNet(self.diffusion_model, mode) if mode else None

    def forward(self, x, t, c_concat: Sequence[torch.Tensor] | None = None,
                c_crossattn: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        key = self.conditioning_key
        unet = self.compiled_unet or self.diffusion_model
        if key is None:
            return unet(x, t)
        if key == "concat":
            return unet(torch.cat([x, *c_concat], dim=1), t)
        if key == "crossattn":
            return unet(x, t, context=torch.cat(list(c_crossattn), dim=1))
        if key == "hybrid":
            return unet(torch.cat([x, *c_concat], dim=1), t, context=torch.cat(list(c_crossattn), dim=1))
        return unet(x, t, y=c_crossattn[0])  # "adm": class-conditional
