"""The UNet through ``torch.compile`` at a few static input shapes, eager for any other shape.

A training run calls the UNet at one shape (the batch) and samples at another (the guided batch); a
last partial batch or a validation batch would make ``torch.compile`` build yet another graph, which
for the SD v1 UNet takes about a minute. :class:`CompiledUNet` compiles the first ``max_signatures``
signatures it sees (shapes, dtypes, device, grad mode, autocast) with static shapes, logs how long
each compilation took, and runs every later signature eagerly, logged once each.

Mode ``auto`` is ``reduce-overhead`` on CUDA (CUDA graphs: one replay per UNet forward and one per
backward, no per-kernel launches) with channels-last weights (what tensor-core convolutions prefer),
and ``default`` (inductor kernels) elsewhere.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Hashable

import torch
from torch import nn

logger = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_mode(value: Any) -> str | None:
    """A ``compile_unet`` config value as a mode: off (False, None, "off") -> None, True -> "auto"."""
    if value is None or value is False or value == "off":
        return None
    if value is True or value in COMPILE_MODES:
        return "auto" if value is True else value
    raise ValueError(f"compile_unet must be true, false or one of {COMPILE_MODES}, got {value!r}")


def resolved_mode(mode: str, device: torch.device) -> str:
    """``auto``: CUDA graphs on CUDA, inductor's default elsewhere."""
    if mode != "auto":
        return mode
    return "reduce-overhead" if device.type == "cuda" else "default"


def call_signature(x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None) -> Hashable:
    """What a static-shape graph depends on: shapes, dtypes, device, grad mode and autocast state."""
    autocast = torch.is_autocast_enabled(x.device.type)
    return (tuple(x.shape), x.dtype, str(x.device), tuple(timesteps.shape),
            None if context is None else (tuple(context.shape), context.dtype, context.requires_grad),
            torch.is_grad_enabled(), autocast and torch.get_autocast_dtype(x.device.type))


class CompiledUNet:
    """Calls ``unet(x, timesteps, context=...)`` compiled for up to ``max_signatures`` signatures."""

    def __init__(self, unet: nn.Module, mode: str = "auto", max_signatures: int = 2):
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
        if max_signatures < 1:
            raise ValueError(f"max_signatures must be at least 1, got {max_signatures}")
        self.unet = unet
        self.mode = mode
        self.max_signatures = max_signatures
        self.compiled_signatures: list[Hashable] = []
        self.eager_signatures: list[Hashable] = []
        self.compile_seconds: dict[Hashable, float] = {}
        self._compiled: nn.Module | None = None
        self._cuda_graphs = False

    def _compile(self, device: torch.device) -> nn.Module:
        mode = resolved_mode(self.mode, device)
        if device.type == "cuda":
            self.unet.to(memory_format=torch.channels_last)
        self._cuda_graphs = device.type == "cuda" and mode in CUDA_GRAPH_MODES
        logger.info("Compiling the UNet with torch.compile (mode %s%s, static shapes)", mode,
                    ", channels-last weights" if device.type == "cuda" else "")
        return torch.compile(self.unet, mode=mode, dynamic=False)

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        signature = call_signature(x, timesteps, context)
        if signature in self.compiled_signatures:
            return self._run_compiled(x, timesteps, context, **kwargs)
        if len(self.compiled_signatures) < self.max_signatures:
            if self._compiled is None:
                self._compiled = self._compile(x.device)
            start = time.perf_counter()
            out = self._run_compiled(x, timesteps, context, **kwargs)
            self.compile_seconds[signature] = time.perf_counter() - start
            self.compiled_signatures.append(signature)
            logger.info("UNet compiled for input %s (%s) in %.1f s", list(x.shape),
                        "forward with grad" if torch.is_grad_enabled() else "inference",
                        self.compile_seconds[signature])
            return out
        if signature not in self.eager_signatures:
            self.eager_signatures.append(signature)
            logger.info("UNet input %s differs from the %d compiled shape(s): it runs eagerly (no recompilation)",
                        list(x.shape), len(self.compiled_signatures))
        return self.unet(x, timesteps, context=context, **kwargs)

    def _run_compiled(self, x, timesteps, context, **kwargs) -> torch.Tensor:
        if self._cuda_graphs:
            # each call is a new step: the previous call's CUDA-graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
            # a copy outlives the next replay (samplers such as PLMS keep earlier outputs)
            return self._compiled(x, timesteps, context=context, **kwargs).clone()
        return self._compiled(x, timesteps, context=context, **kwargs)
