"""The benchmark's context: our model, built once from the finetune config, and the diffusers models
made from its weights, with the chosen device, precision and repeats. Each row builder of
``scripts/benchmark.py`` and of this package takes one :class:`Bench`.

It lives here, not in the script, so the row builders of this package can name it without importing
``scripts/benchmark.py`` (which imports them).
"""
from __future__ import annotations

import argparse
import functools
import gc
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from ldm.precision import precision_autocast, precision_dtype
from ldm.util import instantiate_from_config
from . import reference
from .flops import count_flops
from .measure import Measurement, measure, measure_pair, with_state
from .ours import OursStep, ti_batch

ROOT = Path(__file__).resolve().parents[2]
logger = logging.getLogger("benchmark")

CONFIGS = {"tiny": ROOT / "configs" / "tiny" / "v1-finetune.yaml",
           "sd-v1": ROOT / "configs" / "stable-diffusion" / "v1-finetune.yaml"}
PROMPT = "a photo of a *"
FACIAL_LOSS = {"target": "ldm.models.diffusion.face_loss.FacialLoss", "params": {"weight": 1.0}}


class Bench:
    """Our model (built once, on first use, from the finetune config) and the diffusers models made from its weights."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        config = OmegaConf.load(CONFIGS[args.config])
        config.model.params.facial_loss_config = FACIAL_LOSS
        self.config = config
        self.original_config = OmegaConf.to_container(config, resolve=True)
        self.weight_dtype = precision_dtype(self.device, args.precision)  # None: float32
        ddconfig = config.model.params.first_stage_config.params.ddconfig
        factor = 2 ** (len(ddconfig.ch_mult) - 1)
        self.latent_shape = (int(config.model.params.channels), args.size // factor, args.size // factor)
        self.lr = float(config.model.base_learning_rate)

    @functools.cached_property
    def ours(self):
        """Our LatentDiffusion, built on first use (row groups that build their own models never pay for it)."""
        logger.info("building our LatentDiffusion from %s", CONFIGS[self.args.config])
        model = instantiate_from_config(self.config.model).to(self.device).eval()
        # the float32 weights the diffusers models are made from, read before ours are cast
        self._checkpoint = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if self.weight_dtype is not None:
            model.hold_frozen_weights_in_half(self.weight_dtype)
        return model

    @property
    def checkpoint(self) -> dict[str, torch.Tensor]:
        """Our weights in float32 as built, before any cast: what the diffusers models are made from."""
        _ = self.ours  # building the model records them
        return self._checkpoint

    @property
    def context_shape(self) -> tuple[int, int]:
        encoder = self.ours.cond_stage_model
        return encoder.max_length, encoder.text_model.config.hidden_size

    @property
    def half_or_float32(self) -> torch.dtype:
        return self.weight_dtype or torch.float32

    def placed(self, module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
        """``module`` on the device, cast to ``dtype`` when one is given (diffusers warns about any cast)."""
        return module.to(self.device) if dtype is None else module.to(self.device, dtype)

    @functools.cached_property
    def unet(self):
        """diffusers' UNet in the recipes' weight dtype (half under mixed precision)."""
        return self.placed(reference.unet(self.original_config, self.checkpoint), self.weight_dtype)

    @functools.cached_property
    def vae(self):
        return self.placed(reference.vae(self.original_config, self.checkpoint), self.weight_dtype)

    @functools.cached_property
    def text_model(self):
        """The text encoder in float32: the TI recipe trains its token table."""
        return reference.text_encoder(self.ours.cond_stage_model.text_model.config, self.checkpoint).to(self.device)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=self.device)

    def under_precision(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` run under the chosen precision (autocast for bf16/fp16)."""
        def run():
            with precision_autocast(self.device, self.args.precision):
                return fn()
        return run

    def pair(self, ours: Callable[[], Any], ref: Callable[[], Any]) -> tuple[Measurement, Measurement]:
        """Measure both callables under the chosen precision, alternating."""
        return measure_pair(self.under_precision(ours), self.under_precision(ref), self.device, self.args.repeats)

    def pair_built(self, build_ours: Callable[[], Any], build_ref: Callable[[], Any]) -> tuple[Measurement, Measurement]:
        """Measure two steps that the builders make (each has ``persistent_bytes()`` and ``release()``), memory
        including what each keeps between steps. Both are built and timed alternately, or, with
        ``--sequential``, each is built, measured alone and freed before the next is built: for models that do
        not fit in memory twice (machine load may then differ between the two sides)."""
        if not self.args.sequential:
            ours, ref = build_ours(), build_ref()
            measured = self.pair(ours, ref)
            result = tuple(with_state(m, step.persistent_bytes()) for m, step in zip(measured, (ours, ref)))
            ours.release()
            ref.release()
            return result  # type: ignore[return-value]
        result = []
        for build in (build_ours, build_ref):
            step = build()
            result.append(with_state(self.measure(step), step.persistent_bytes()))
            step.release()
            del step
            gc.collect()
        return result[0], result[1]

    def measure(self, fn: Callable[[], Any]) -> Measurement:
        """Measure one callable under the chosen precision."""
        return measure(self.under_precision(fn), self.device, self.args.repeats)

    def flops(self, fn: Callable[[], Any]) -> int:
        """FLOPs of one call under the chosen precision."""
        return count_flops(self.under_precision(fn))

    @property
    def latent_numel(self) -> int:
        return self.latent_shape[0] * self.latent_shape[1] * self.latent_shape[2]

    def ti_step(self, n: int, face: bool = False) -> OursStep:
        """Our TI step at batch ``n`` (on the shared model)."""
        self.ours.learning_rate = self.lr
        return OursStep(self.ours, ti_batch(n, self.args.size, PROMPT, face), self.latent_numel)

    def reference_ti_step(self, ours: OursStep, unet=None) -> reference.TextualInversionStep:
        """diffusers' TI recipe on the images of ``ours`` (``unet``: e.g. a compiled one; default ``self.unet``)."""
        pixels = ours.batch["image"].permute(0, 3, 1, 2).contiguous()  # [B, 3, H, W]
        ids = self.ours.cond_stage_model.tokenize(ours.batch["caption"])
        return reference.TextualInversionStep(self.unet if unet is None else unet, self.vae, self.text_model, ids,
                                              self.ours.embedding_manager.token_ids[0], pixels,
                                              self.ours.scale_factor, lr=self.lr, weight_dtype=self.half_or_float32)
