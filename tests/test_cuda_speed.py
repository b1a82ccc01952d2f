"""CUDA checks of the fast paths, skipped without a GPU: a steady-state training step does not synchronize
(``torch.cuda.set_sync_debug_mode``), CUDA-graph compilation matches eager, mixed precision holds half weights.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import warnings

import pytest
import torch
from helpers import base_argv, make_batch, no_trainer_log_warning

import main
from ldm.data.datamodule import HOST_BATCH_KEYS, keep_on_host
from ldm.models.diffusion.compiled_unet import CompiledUNet
from ldm.models.diffusion.face_loss import FacialLoss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
SIZE = 128  # 16x16 latents


def cuda_batch(face: bool) -> dict:
    """A batch as Lightning hands it to training_step: tensors on the GPU, indices and flags on the host."""
    batch = make_batch(image_index=(0, 1), flipped=(False, True), size=SIZE)
    if face:
        batch["face"] = batch["image"].flip(1)
        batch["has_face"] = torch.tensor([True, False])
    batch = keep_on_host(batch)
    return {k: v.to(CUDA) if isinstance(v, torch.Tensor) and k not in HOST_BATCH_KEYS else v for k, v in batch.items()}


class LightningLikeStep:
    """What Lightning runs per step under 32 / 16-mixed / bf16-mixed, on a model on the GPU."""

    def __init__(self, model, half: torch.dtype | None):
        self.model, self.half = model, half
        groups = model.trainable_parameters()
        self.optimizer = torch.optim.AdamW(groups, lr=1e-3, fused=True)
        self.scaler = torch.amp.GradScaler("cuda") if half == torch.float16 else None

    def __call__(self, batch) -> torch.Tensor:
        autocast = torch.autocast("cuda", dtype=self.half) if self.half else contextlib.nullcontext()
        with autocast:
            loss = self.model.training_step(batch, 0)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        self.model.on_before_optimizer_step(self.optimizer)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


# set_sync_debug_mode's own notice, once per process (seen with torch 2.11 on an H200): not a sync
PROTOTYPE_NOTICE = "Synchronization debug mode is a prototype feature"


def sync_warnings(fn) -> list[str]:
    """Messages of the synchronizing CUDA calls ``fn`` makes."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    messages = [str(w.message) for w in caught]
    return [m for m in messages if "synchroniz" in m and PROTOTYPE_NOTICE not in m]


@no_trainer_log_warning
@pytest.mark.parametrize("half", [None, torch.float16, torch.bfloat16], ids=["32", "16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("face", [False, True], ids=["ti", "ti+face"])
def test_a_steady_state_training_step_does_not_synchronize(tiny_model, half, face) -> None:
    model = copy.deepcopy(tiny_model).to(CUDA).train()
    if half is not None:
        model.hold_frozen_weights_in_half(half)
    model.loss_terms = model.loss_terms[:1] + ([FacialLoss()] if face else [])
    step, batch = LightningLikeStep(model, half), cuda_batch(face)
    for _ in range(2):  # fills the latent cache, allocator pools and the optimizer state
        step(dict(batch))
    assert sync_warnings(lambda: step(dict(batch))) == []


@no_trainer_log_warning
def test_a_compiled_step_with_cuda_graphs_matches_eager_and_does_not_synchronize(tiny_model) -> None:
    model = copy.deepcopy(tiny_model).to(CUDA).train()
    model.hold_frozen_weights_in_half(torch.bfloat16)
    unet = model.model.diffusion_model
    gen = torch.Generator(CUDA).manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, device=CUDA, generator=gen), torch.tensor([10, 700], device=CUDA)
    context = torch.randn(2, 77, 32, device=CUDA, generator=gen)

    def forward_backward(call):
        ctx = context.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = call(x, t, context=ctx)
        out.float().square().mean().backward()
        return out.detach().float(), ctx.grad

    eager = forward_backward(unet)
    compiled = CompiledUNet(unet, mode="auto")
    for _ in range(3):  # compile, record the CUDA graphs, replay
        graphed = forward_backward(compiled)
    for ours, ref, what in zip(graphed, eager, ("output", "context gradient")):
        # bf16: inductor fuses differently from eager; 2% of the largest value
        assert (ours - ref).abs().max() <= 2e-2 * ref.abs().max(), f"compiled {what} differs from eager"
    assert sync_warnings(lambda: forward_backward(compiled)) == []


def test_cli_holds_frozen_weights_in_half_under_16_mixed(tmp_path, photo_dir, tiny_ckpt, caplog) -> None:
    argv = base_argv(tmp_path, photo_dir, tiny_ckpt, "-n", "half", "--gpus", "0,", "--precision", "16-mixed",
                     "--max_steps", "2", "--no_validation")
    with caplog.at_level(logging.INFO):
        assert main.main(argv) == 0
    assert "frozen weights held in float16" in caplog.text
