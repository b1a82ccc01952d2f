"""Half-precision frozen weights for mixed-precision training and sampling.

Under autocast every convolution and linear layer runs in half precision; with float32 weights,
autocast casts each frozen weight again on every call (and keeps the copies for backward). Holding
those weights in half precision removes the casts and halves their memory, as diffusers' training
recipes do with ``weight_dtype``. The results are the same as autocast with float32 weights: autocast
would have rounded those weights to the same half values.

What stays float32: everything that trains (the embedding vectors, a DreamBooth UNet: Lightning's
precision plugin keeps them as float32 masters), normalisation layers (autocast computes them in
float32) and embedding tables (looked up, not multiplied; textual inversion reads e_p from the token
table, and the text encoder's residual stream stays float32 as under plain autocast).
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Lightning precision -> the half dtype its autocast computes in
HALF_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
# layers whose weights autocast casts to half precision on every call
MATMUL_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def half_dtype(precision: str | None) -> torch.dtype | None:
    """The half dtype of a Lightning mixed precision (``16-mixed``, ``bf16-mixed``), else None."""
    return HALF_DTYPES.get(str(precision)) if precision is not None else None


def frozen_matmul_layers(module: nn.Module) -> list[nn.Module]:
    """Convolution and linear layers of ``module`` none of whose own parameters train."""
    return [layer for layer in module.modules() if isinstance(layer, MATMUL_LAYERS)
            and not any(p.requires_grad for p in layer.parameters(recurse=False))]


def hold_frozen_weights_in_half(modules: dict[str, nn.Module | None], dtype: torch.dtype) -> int:
    """Cast the frozen convolution and linear weights of each named module to ``dtype``, in place.

    Returns the number of parameters cast; each module's count is logged.
    """
    if dtype not in HALF_DTYPES.values():
        raise ValueError(f"half weights must be float16 or bfloat16, got {dtype}")
    total, seen = 0, set()
    for name, module in modules.items():
        if module is None or id(module) in seen:  # e.g. a first stage that is also the conditioner
            continue
        seen.add(id(module))
        count = 0
        for layer in frozen_matmul_layers(module):
            count += sum(p.numel() for p in layer.parameters(recurse=False))
            layer.to(dtype)
        if count:
            logger.info("%s: %.1fM frozen weights held in %s", name, count / 1e6, str(dtype).replace("torch.", ""))
        total += count
    return total


def weights_autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` unless it is already on; nothing when ``dtype`` is None.

    Half-precision weights need autocast around every call (training steps run under Lightning's; this
    covers sampling, image logging and scripts, which may run outside it).
    """
    if dtype is None or (torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == dtype):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# A script's --precision -> the dtype autocast computes in (None: float32, no autocast). "autocast"
# (stable_txt2img.py, make_class_images.py) depends on the device: see precision_dtype.
PRECISION_DTYPES = {"full": None, "fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The dtype of a script's ``--precision`` on ``device``, None for float32.

    ``fp16``/``bf16`` compute in that dtype on any device; ``autocast`` is float16 on CUDA and float32
    elsewhere; ``full``/``fp32`` is float32.
    """
    if precision == "autocast":
        return torch.float16 if device.type == "cuda" else None
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"unknown precision {precision!r}: expected autocast or one of {sorted(PRECISION_DTYPES)}")
    return PRECISION_DTYPES[precision]


def precision_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for a script's ``--precision`` on ``device`` (:func:`precision_dtype`); nothing for float32."""
    return weights_autocast(device, precision_dtype(device, precision))
