"""SD v1 UNet: checkpoint key layout, parity with diffusers on the same weights, gradient checkpointing."""
from __future__ import annotations

import gc
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import sd_v1_shapes
from helpers_diffusers import diffusers_unet, randomize_
from ldm.modules.attention import CrossAttention
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import GroupNorm32, checkpoint, timestep_embedding
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
FULL_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
TINY_CONFIG = ROOT / "configs" / "tiny" / "v1-inference.yaml"
PREFIX = "model.diffusion_model."


def build_unet(config_path: Path, **overrides) -> UNetModel:
    return instantiate_from_config(OmegaConf.load(config_path).model.params.unet_config, **overrides)


def to_diffusers(ours: UNetModel, config_path: Path):
    """diffusers' UNet2DConditionModel with our weights, through diffusers' own converters."""
    return diffusers_unet({PREFIX + k: v for k, v in ours.state_dict().items()}, config_path)


def unet_inputs(model: UNetModel, size: int, seed: int = 1, seq_len: int = 77):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, model.in_channels, size, size, generator=gen)
    t = torch.tensor([17, 901])
    context = torch.randn(2, seq_len, model.context_dim, generator=gen)
    return x, t, context


def assert_parity(ours: UNetModel, reference, size: int, rtol: float) -> None:
    x, t, context = unet_inputs(ours, size)
    with torch.no_grad():
        eps = ours(x, t, context=context)
        eps_ref = reference(x, t, encoder_hidden_states=context).sample
    err = (eps - eps_ref).abs().max().item()
    scale = eps_ref.abs().max().item()
    assert eps.shape == x.shape
    assert scale > 1e-2, "reference output is degenerate; the comparison would be meaningless"
    logging.getLogger(__name__).info("UNet parity: max abs diff %.3e, max|eps_ref| %.3e", err, scale)
    assert err <= rtol * scale, f"max abs diff {err:.3e} > {rtol} x max|eps_ref| ({scale:.3e}) in fp32"


@pytest.fixture(scope="module")
def full_pair():
    torch.manual_seed(0)
    ours = randomize_(build_unet(FULL_CONFIG)).eval()
    reference = to_diffusers(ours, FULL_CONFIG)
    yield ours, reference
    del ours, reference
    gc.collect()


@pytest.mark.usefixtures("shared_fixtures")  # checked before the full UNet is built
def test_state_dict_matches_sd_v1_checkpoint_keys(full_pair):
    expected = {key.removeprefix(PREFIX): shape for key, shape in sd_v1_shapes("model").items()}
    ours = {k: tuple(v.shape) for k, v in full_pair[0].state_dict().items()}
    assert len(expected) == 686
    assert sorted(set(expected) ^ set(ours)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}


def test_full_sd_v1_matches_diffusers(full_pair):
    # tolerance: max abs diff <= 1e-4 x max|eps| (fp32, 32x32 latent, batch 2; measured ~2e-6)
    assert_parity(*full_pair, size=32, rtol=1e-4)


def test_tiny_matches_diffusers():
    torch.manual_seed(0)
    ours = randomize_(build_unet(TINY_CONFIG)).eval()
    # tolerance: max abs diff <= 1e-5 x max|eps| (fp32; measured ~2e-6)
    assert_parity(ours, to_diffusers(ours, TINY_CONFIG), size=16, rtol=1e-5)


def _grads(model: UNetModel, wrt_x: bool):
    x, t, context = unet_inputs(model, 16)
    x.requires_grad_(wrt_x)
    context.requires_grad_(True)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    (model(x, t, context=context) * weights).sum().backward()
    return context.grad, x.grad


@pytest.mark.parametrize("wrt_x", [False, True])
def test_gradient_checkpointing_passes_input_grads_with_frozen_weights(wrt_x):
    plain = randomize_(build_unet(TINY_CONFIG, use_checkpoint=False)).train().requires_grad_(False)
    ckpt = build_unet(TINY_CONFIG, use_checkpoint=True).train().requires_grad_(False)
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    ckpt.middle_block[1].transformer_blocks[0].attn2.register_forward_hook(lambda *_: calls.append(1))

    context_grad, x_grad = _grads(ckpt, wrt_x)
    ref_context_grad, ref_x_grad = _grads(plain, wrt_x)

    assert len(calls) == 2, "the checkpointed block must run again in backward (recomputation)"
    assert context_grad is not None and context_grad.abs().sum() > 0
    torch.testing.assert_close(context_grad, ref_context_grad, rtol=1e-5, atol=1e-6)
    if wrt_x:
        assert x_grad is not None and x_grad.abs().sum() > 0
        torch.testing.assert_close(x_grad, ref_x_grad, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in ckpt.parameters())


def test_checkpoint_runs_once_without_grad():
    calls = []

    def func(a: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return a * 2

    with torch.no_grad():
        out = checkpoint(func, (torch.ones(3),), [], True)
    assert calls == [1] and torch.equal(out, torch.full((3,), 2.0))


def test_timestep_embedding_matches_diffusers_cos_first():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 3, 500, 999])
    emb = timestep_embedding(t, 320)
    ref = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(emb, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(emb[0, :160], torch.ones(160)) and torch.equal(emb[0, 160:], torch.zeros(160))
    assert timestep_embedding(t, 7).shape == (4, 7)


def test_groupnorm32_computes_in_float32_and_keeps_dtype():
    norm = GroupNorm32(32, 64)
    x = torch.randn(2, 64, 4, 4) * 300
    out = norm(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), norm(x), rtol=2e-2, atol=2e-2)


def test_cross_attention_mask_hides_context_tokens():
    torch.manual_seed(0)
    attn = CrossAttention(query_dim=16, context_dim=8, heads=2, dim_head=4)
    x, context = torch.randn(1, 5, 16), torch.randn(1, 6, 8)
    mask = torch.tensor([[True, True, True, False, False, False]])
    torch.testing.assert_close(attn(x, context, mask=mask), attn(x, context[:, :3]))


@pytest.mark.parametrize(
    "override", [{"num_classes": 10}, {"use_scale_shift_norm": True}, {"use_spatial_transformer": False}]
)
def test_unsupported_options_raise(override):
    with pytest.raises(NotImplementedError, match="not implemented"):
        build_unet(TINY_CONFIG, **override)


def test_bad_inputs_raise_clear_errors():
    model = build_unet(TINY_CONFIG)
    x, t, context = unet_inputs(model, 16)
    with pytest.raises(ValueError, match="context"):
        model(x, t)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(x[..., :12], t, context=context)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, t[:1], context=context)
