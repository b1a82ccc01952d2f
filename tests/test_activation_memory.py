"""Layers that keep less for backward: the frozen-aware Conv2d and GEGLU's gated GELU.

Each must give the numbers of the plain layer and save fewer activation bytes (what would fail without it).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.modules.attention import GEGLU
from ldm.modules.diffusionmodules.frozen_conv import Conv2d
from scripts.bench.measure import saved_activation_bytes

GEOMETRIES = [
    dict(in_channels=8, out_channels=16, kernel_size=3, padding=1),
    dict(in_channels=8, out_channels=8, kernel_size=3, stride=2, padding=1),  # the UNet's Downsample
    dict(in_channels=8, out_channels=4, kernel_size=1),  # proj_in / skip connections
    dict(in_channels=8, out_channels=8, kernel_size=3, padding=2, dilation=2, groups=4),
]


def pair(geometry: dict, frozen: bool) -> tuple[Conv2d, nn.Conv2d]:
    torch.manual_seed(0)
    ours = Conv2d(**geometry)
    plain = nn.Conv2d(**geometry)
    plain.load_state_dict(ours.state_dict())
    for module in (ours, plain):
        module.requires_grad_(not frozen)
    return ours, plain


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_frozen_forward_and_input_gradient_equal_nn_conv2d(geometry):
    ours, plain = pair(geometry, frozen=True)
    x = torch.randn(2, 8, 13, 11)
    grad_out = torch.randn_like(plain(x))
    results = []
    for module in (ours, plain):
        leaf = x.clone().requires_grad_(True)
        out = module(leaf)
        out.backward(grad_out)
        results.append((out, leaf.grad))
    (out, grad), (ref_out, ref_grad) = results
    assert torch.equal(out, ref_out), "the forward is the same F.conv2d call"
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)
    assert ours.weight.grad is None


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_frozen_conv_saves_no_input(geometry):
    ours, plain = pair(geometry, frozen=True)
    x = torch.randn(2, 8, 13, 11, requires_grad=True)
    assert saved_activation_bytes(lambda: plain(x), plain) == x.numel() * 4, "nn.Conv2d keeps its input"
    assert saved_activation_bytes(lambda: ours(x), ours) == 0, "the frozen conv keeps only its weight"


def test_trainable_conv_is_a_plain_conv():
    ours, plain = pair(GEOMETRIES[0], frozen=False)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    ours(x).square().sum().backward()
    plain(x).square().sum().backward()
    assert ours.weight.grad is not None and ours.bias.grad is not None
    torch.testing.assert_close(ours.weight.grad, plain.weight.grad)


def test_input_gradient_under_autocast_has_the_input_dtype():
    ours, plain = pair(GEOMETRIES[0], frozen=True)
    grads = []
    for module in (ours, plain):
        x = torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        grads.append(x.grad)
    assert grads[0].dtype == torch.float32
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-2, atol=1e-2)


def test_state_dict_keys_are_nn_conv2d_keys():
    assert list(Conv2d(3, 4, 3).state_dict()) == ["weight", "bias"]


def plain_geglu(module: GEGLU, x: torch.Tensor) -> torch.Tensor:
    hidden, gate = module.proj(x).chunk(2, dim=-1)
    return hidden * torch.nn.functional.gelu(gate)


@pytest.mark.parametrize("frozen", [True, False])
def test_geglu_matches_plain_autograd_and_saves_a_third_less(frozen):
    torch.manual_seed(0)
    module = GEGLU(16, 32).requires_grad_(not frozen)
    x0 = torch.randn(2, 10, 16)
    grad_out = torch.randn(2, 10, 32)
    results = []
    for forward in (module, lambda x: plain_geglu(module, x)):
        module.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        out = forward(x)
        out.backward(grad_out)
        results.append((out, x.grad, None if frozen else module.proj.weight.grad.clone()))
    (out, grad, wgrad), (ref_out, ref_grad, ref_wgrad) = results
    assert torch.equal(out, ref_out)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)
    if not frozen:
        torch.testing.assert_close(wgrad, ref_wgrad, rtol=1e-6, atol=1e-7)

    x = x0.clone().requires_grad_(True)
    hidden_bytes = 2 * 10 * 32 * 4  # one [B, L, dim_out] float32 tensor
    plain_saved = saved_activation_bytes(lambda: plain_geglu(module, x), module)
    ours_saved = saved_activation_bytes(lambda: module(x), module)
    assert ours_saved == plain_saved - hidden_bytes, "gelu(gate) must not be kept for backward"


def test_geglu_without_grad_records_nothing():
    module = GEGLU(16, 32).requires_grad_(False)
    with torch.no_grad():
        out = module(torch.randn(1, 4, 16, requires_grad=True))
    assert out.grad_fn is None
