"""Frozen weights held in half precision under mixed precision (ldm/precision.py), on the CPU in bfloat16.

Tolerances against float32 eager, measured on the tiny model at 128 px (16x16 latents; at 64 px its 1x1
bottleneck amplifies rounding): loss 5e-4 relative, embedding gradient 5% (bf16 keeps 8 bits), the
embedding's displacement after 5 AdamW steps 3% (cosine 0.9996). The tests allow 10x, 3x and 3x. Against
float32 weights under the same autocast, half weights are bit-identical: autocast rounds those weights
to the same half values on every call.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from helpers import TOKEN_TABLE, WOMAN, base_argv, make_batch, only_run
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from ldm.checkpoint import load_embeddings
from ldm.precision import MATMUL_LAYERS, weights_autocast
from ldm.train.training import hold_frozen_weights_in_half

BF16 = torch.bfloat16
SIZE = 128


@pytest.fixture(scope="module")
def batch():
    return make_batch(size=SIZE)


def fresh(tiny_model, half: bool):
    model = copy.deepcopy(tiny_model).train()
    model.latent_cache.clear()  # the session model may hold latents of other tests' images under the same keys
    if half:
        model.hold_frozen_weights_in_half(BF16)
    return model


def train(model, batch, steps: int, autocast: bool) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """``steps`` AdamW steps on the embedding: (losses, first gradient, displacement of v)."""
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=8e-4, fused=True)
    vector = model.embedding_manager.vectors[0]
    start = vector.detach().clone()
    losses, first_grad = [], None
    for step in range(steps):
        torch.manual_seed(step)
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            loss, _ = model.shared_step(batch)
        loss.backward()
        first_grad = vector.grad.clone() if first_grad is None else first_grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, first_grad, vector.detach() - start


def tensors_in(obj) -> list[torch.Tensor]:
    """Every tensor in nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [t for value in values for t in tensors_in(value)]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_frozen_matmul_weights_are_half_and_the_rest_float32(tiny_model) -> None:
    model = copy.deepcopy(tiny_model)
    cast = model.hold_frozen_weights_in_half(BF16)
    assert cast == sum(p.numel() for p in model.parameters() if p.dtype == BF16) > 0
    for part in (model.model, model.first_stage_model, model.cond_stage_model):
        for layer in part.modules():
            own = list(layer.parameters(recurse=False))
            if isinstance(layer, MATMUL_LAYERS):
                assert all(p.dtype == BF16 for p in own), f"{type(layer).__name__} kept float32 weights"
            elif own:  # normalisation layers and embedding tables
                assert all(p.dtype == torch.float32 for p in own), f"{type(layer).__name__} was cast"
    assert all(p.dtype == torch.float32 for p in model.embedding_manager.parameters()), "what trains stays float32"
    assert model.diffusion.alphas_cumprod.dtype == torch.float32 and model.diffusion.logvar.dtype == torch.float32


def test_trained_weights_keep_float32_masters(tiny_model) -> None:
    model = copy.deepcopy(tiny_model)
    model.model.requires_grad_(True)  # as DreamBooth trains the UNet
    model.hold_frozen_weights_in_half(BF16)
    assert all(p.dtype == torch.float32 for p in model.model.parameters())
    assert all(p.dtype == BF16 for layer in model.first_stage_model.modules() if isinstance(layer, MATMUL_LAYERS)
               for p in layer.parameters(recurse=False))


@pytest.mark.parametrize("precision,dreambooth,expected", [
    ("bf16-mixed", False, BF16), ("32", False, torch.float32), ("bf16-mixed", True, torch.float32)])
def test_the_training_entrypoint_casts_under_mixed_precision_only(tiny_model, precision, dreambooth,
                                                                  expected) -> None:
    model = copy.deepcopy(tiny_model)
    config = OmegaConf.create({"dreambooth": {"identifier": "sks"}} if dreambooth else {})
    hold_frozen_weights_in_half(model, config, precision)
    assert model.first_stage_model.decoder.conv_out.weight.dtype == expected
    assert model.half_weight_dtype == (BF16 if expected == BF16 else None)


class WeightCasts(TorchDispatchMode):
    """Counts dtype conversions whose source is the storage of one of ``params``."""

    def __init__(self, params):
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr() for p in params}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].untyped_storage().data_ptr() in self.storages:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("half", [False, True], ids=["float32 weights", "half weights"])
def test_no_weight_is_cast_per_call(tiny_model, batch, half: bool) -> None:
    model = fresh(tiny_model, half)
    model.shared_step(batch)  # fills the latent cache
    frozen = [p for p in model.parameters() if not p.requires_grad]
    with WeightCasts(frozen) as casts, torch.autocast("cpu", dtype=BF16):
        loss, _ = model.shared_step(batch)
        loss.backward()
    if half:
        assert casts.count == 0, f"{casts.count} weight casts in a step with half weights"
    else:
        assert casts.count > 50, "autocast casts float32 weights on every call (what half weights remove)"


def test_half_weights_match_autocast_exactly_and_float32_within_bf16(tiny_model, batch) -> None:
    eager = train(fresh(tiny_model, half=False), batch, steps=5, autocast=False)
    autocast = train(fresh(tiny_model, half=False), batch, steps=5, autocast=True)
    half = train(fresh(tiny_model, half=True), batch, steps=5, autocast=True)
    assert half[0] == autocast[0] and torch.equal(half[2], autocast[2]), "half weights must equal autocast's"
    assert all(abs(h - e) <= 5e-3 * abs(e) for h, e in zip(half[0], eager[0])), (half[0], eager[0])
    assert relative(half[1], eager[1]) <= 0.15, "first embedding gradient: bf16 vs float32 (tol 0.15)"
    assert relative(half[2], eager[2]) <= 0.1, "embedding displacement after 5 steps: bf16 vs float32 (tol 0.1)"


def test_sampling_with_half_weights_needs_no_autocast_of_its_own(tiny_model) -> None:
    model = fresh(tiny_model, half=True).eval()
    reference = fresh(tiny_model, half=False).eval()
    assert not torch.is_autocast_enabled("cpu")
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # the config's image_size
    with torch.no_grad():
        images = model.sample_images(["a photo of a *"], ddim_steps=3, x_T=noise)
        with weights_autocast(torch.device("cpu"), BF16):
            expected = reference.sample_images(["a photo of a *"], ddim_steps=3, x_T=noise)
    assert torch.equal(images, expected), "outside autocast the model enters its own, as autocast with fp32 weights"


def test_cli_trains_and_samples_with_half_weights_under_bf16_mixed(tmp_path, photo_dir, tiny_ckpt, caplog) -> None:
    import main

    argv = base_argv(tmp_path, photo_dir, tiny_ckpt, "-n", "bf16", "--accelerator", "cpu", "--precision",
                     "bf16-mixed", "--max_steps", "2", "--no_validation",
                     "lightning.callbacks.image_logger.params.batch_frequency=2",
                     "lightning.callbacks.image_logger.params.max_images=1",
                     "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=2")
    with caplog.at_level(logging.INFO):
        assert main.main(argv) == 0
    assert "frozen weights held in bfloat16" in caplog.text
    run = only_run(tmp_path, "bf16")
    path = run / "checkpoints" / "embeddings.pt"
    floats = [t for t in tensors_in(torch.load(path, weights_only=True)) if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 for t in floats), "a saved embedding is float32"
    vector = load_embeddings(path).params["*"]
    init = torch.load(tiny_ckpt, weights_only=True)["state_dict"][TOKEN_TABLE][WOMAN]
    assert (vector[0] - init).abs().max() > 1e-5, "the embedding trained"
    assert list((run / "images" / "train").glob("samples_scaled_gs-*.png")), "in-run sampling ran on half weights"
    assert "Sample logging failed" not in caplog.text

