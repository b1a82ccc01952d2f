"""--compile_unet: the UNet through torch.compile at a few static shapes, eagerly for the others.

The dispatch (which shapes compile, the eager fallback, the logging) is tested with torch.compile
replaced by a counting stand-in; one slow test compiles the tiny UNet with inductor on the CPU and
compares it with eager (tolerance 1e-5 of the largest value, float32: inductor fuses and reorders
sums; measured 2e-6 for the output and 4e-6 for the gradient to the context). Compiling the tiny
UNet's forward and backward takes minutes on a 2-core CPU, hence the slow mark. CUDA graphs
(``reduce-overhead``) are checked in tests/test_cuda.py.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch

import main
from ldm.models.diffusion import compiled_unet
from ldm.models.diffusion.compiled_unet import CompiledUNet, compile_mode
from ldm.train.flags import apply_flags


class FakeCompile:
    """Stands in for torch.compile: counts compilations and calls the module as it is."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, module, **options):
        self.calls.append(options)
        return module


@pytest.fixture
def fake_compile(monkeypatch) -> FakeCompile:
    fake = FakeCompile()
    monkeypatch.setattr(compiled_unet.torch, "compile", fake)
    return fake


def unet_inputs(batch: int, side: int = 8):
    gen = torch.Generator().manual_seed(batch)
    return (torch.randn(batch, 4, side, side, generator=gen), torch.randint(0, 1000, (batch,), generator=gen),
            torch.randn(batch, 77, 32, generator=gen))


@pytest.mark.parametrize("value,expected", [(False, None), (None, None), ("off", None), (True, "auto"),
                                            ("reduce-overhead", "reduce-overhead")])
def test_compile_mode_from_config(value, expected) -> None:
    assert compile_mode(value) == expected


def test_unknown_compile_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="compile_unet must be true, false or one of"):
        compile_mode("fastest")


def test_flag_writes_the_config_key() -> None:
    from omegaconf import OmegaConf

    opt = main.build_parser().parse_args(["--compile_unet"])
    config = OmegaConf.create({"model": {"params": {}}})
    apply_flags(config, opt)
    assert config.model.params.compile_unet == "auto"
    assert main.build_parser().parse_args([]).compile_unet is None, "off unless asked for"


def test_only_the_first_shapes_compile_and_the_rest_run_eagerly(tiny_model, fake_compile, caplog) -> None:
    unet = tiny_model.model.diffusion_model
    compiled = CompiledUNet(unet, mode="auto", max_signatures=2)
    with caplog.at_level(logging.INFO, logger=compiled_unet.__name__), torch.no_grad():
        for batch in (2, 2, 1, 1, 3, 3, 2):
            x, t, context = unet_inputs(batch)
            assert torch.equal(compiled(x, t, context=context), unet(x, t, context=context))
    assert fake_compile.calls == [{"mode": "default", "dynamic": False}], "one torch.compile, static shapes"
    assert [s[0] for s in compiled.compiled_signatures] == [(2, 4, 8, 8), (1, 4, 8, 8)]
    assert [s[0] for s in compiled.eager_signatures] == [(3, 4, 8, 8)]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("UNet compiled for input" in m for m in messages) == 2, "compile time logged once per shape"
    assert sum("runs eagerly" in m for m in messages) == 1, "the fallback is logged once per shape"


def test_grad_mode_is_part_of_the_signature(tiny_model, fake_compile) -> None:
    compiled = CompiledUNet(tiny_model.model.diffusion_model, mode="auto", max_signatures=2)
    x, t, context = unet_inputs(1)
    with torch.no_grad():
        compiled(x, t, context=context)
    compiled(x, t, context=context.requires_grad_(True))
    assert len(compiled.compiled_signatures) == 2, "sampling and training compile separate graphs"


def test_the_model_option_keeps_checkpoint_keys(tiny_model, fake_compile) -> None:
    model = copy.deepcopy(tiny_model)
    keys = list(model.state_dict())
    model.model.compile_unet("auto")
    assert list(model.state_dict()) == keys, "no _orig_mod. prefix in checkpoints"
    x, t, context = unet_inputs(2)
    with torch.no_grad():
        out = model.apply_model(x, t, context)
    assert model.model.compiled_unet.compiled_signatures and out.shape == x.shape
    model.model.compile_unet(None)
    assert model.model.compiled_unet is None


@pytest.mark.slow
def test_inductor_compiled_unet_matches_eager_forward_and_backward(tiny_model) -> None:
    unet = tiny_model.model.diffusion_model
    compiled = CompiledUNet(unet, mode="auto", max_signatures=1)
    x, t, context = unet_inputs(2, side=16)
    results = []
    for call in (compiled, unet):
        ctx = context.clone().requires_grad_(True)
        out = call(x, t, context=ctx)
        out.square().mean().backward()
        results.append((out.detach(), ctx.grad))
    (out_c, grad_c), (out_e, grad_e) = results
    assert compiled.compile_seconds, "the call was compiled"
    assert (out_c - out_e).abs().max() <= 1e-5 * out_e.abs().max(), "compiled output vs eager (tol 1e-5 x max)"
    assert (grad_c - grad_e).abs().max() <= 1e-5 * grad_e.abs().max(), "gradient to the context (tol 1e-5 x max)"
