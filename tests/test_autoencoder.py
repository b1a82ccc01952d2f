"""LDM first stages: SD v1 key layout, parity with diffusers' AutoencoderKL, posterior maths, VQ interface."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import sd_v1_shapes
from helpers_diffusers import diffusers_vae
from ldm.models.autoencoder import AutoencoderKL, VQModelInterface
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
FULL_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
TINY_CONFIG = ROOT / "configs" / "tiny" / "v1-inference.yaml"
PREFIX = "first_stage_model."
ATOL = 1e-4  # fp32 parity tolerance: max abs diff


def _config(path: Path):
    return OmegaConf.load(path)


def _build(path: Path) -> AutoencoderKL:
    params = _config(path).model.params.first_stage_config
    return instantiate_from_config(OmegaConf.to_container(params, resolve=True)).eval()


def _randomize(model: torch.nn.Module) -> None:
    """Perturb every parameter so default-initialised norms (ones/zeros) take part in the comparison."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.add_(0.05 * torch.randn_like(param))


def _diffusers_vae(config_path: Path, state: dict[str, torch.Tensor]):
    """diffusers' AutoencoderKL loaded with our weights through its own single-file conversion."""
    return diffusers_vae({PREFIX + k: v for k, v in state.items()}, config_path)


def test_full_config_reproduces_sd_v1_first_stage_keys() -> None:
    expected = sd_v1_shapes("first_stage")
    ours = {PREFIX + k: tuple(v.shape) for k, v in _build(FULL_CONFIG).state_dict().items()}
    assert set(ours) == set(expected), (
        f"missing {sorted(set(expected) - set(ours))[:5]}, extra {sorted(set(ours) - set(expected))[:5]}"
    )
    wrong = {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]}
    assert not wrong, f"shape mismatches (ours, checkpoint): {wrong}"


@pytest.mark.parametrize(("config_path", "size"), [(TINY_CONFIG, 64), (FULL_CONFIG, 64)], ids=["tiny", "full"])
def test_parity_with_diffusers(config_path: Path, size: int) -> None:
    torch.manual_seed(0)
    model = _build(config_path)
    _randomize(model)
    reference = _diffusers_vae(config_path, model.state_dict())
    x = torch.rand(2, 3, size, size) * 2.0 - 1.0
    with torch.no_grad():
        posterior = model.encode(x)
        ref_posterior = reference.encode(x).latent_dist
        z = posterior.mean
        decoded = model.decode(z)
        ref_decoded = reference.decode(z).sample

    assert posterior.mean.shape == (2, 4, size // 8, size // 8)
    for name, ours, ref in [
        ("parameters", posterior.parameters, ref_posterior.parameters),
        ("mean", posterior.mean, ref_posterior.mean),
        ("std", posterior.std, ref_posterior.std),
        ("decode", decoded, ref_decoded),
    ]:
        assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs diffusers {tuple(ref.shape)}"
        diff = (ours - ref).abs().max().item()
        assert diff <= ATOL, f"{name}: max abs diff {diff:.2e} vs diffusers exceeds {ATOL} (fp32)"
    assert decoded.std() > 0.1, "decoded output is near-constant: the comparison would be vacuous"


def test_forward_samples_or_takes_mode() -> None:
    torch.manual_seed(0)
    model = _build(TINY_CONFIG)
    x = torch.rand(1, 3, 64, 64) * 2.0 - 1.0
    with torch.no_grad():
        dec_mode, posterior = model(x, sample_posterior=False)
        dec_sample, _ = model(x, sample_posterior=True)
        expected = model.decode(posterior.mode())
    assert dec_mode.shape == x.shape
    torch.testing.assert_close(dec_mode, expected)
    assert not torch.allclose(dec_sample, dec_mode), "sampling the posterior should change the decoding"


def test_posterior_sample_is_mean_plus_std_noise() -> None:
    torch.manual_seed(0)
    params = torch.randn(2, 8, 3, 3)
    params[:, 4:, 0, 0] = 50.0  # beyond the logvar clamp
    dist = DiagonalGaussianDistribution(params)
    sample = dist.sample(generator=torch.Generator().manual_seed(123))
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(123))
    torch.testing.assert_close(sample, dist.mean + dist.std * noise)
    assert torch.equal(dist.mean, params[:, :4])
    assert dist.logvar.max().item() == 20.0, "logvar must be clamped to [-30, 20]"
    torch.testing.assert_close(dist.std, torch.exp(0.5 * dist.logvar))
    assert torch.equal(dist.mode(), dist.mean)

    frozen = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(frozen.sample(), frozen.mean)
    assert torch.equal(frozen.kl(), torch.zeros(2))


def test_posterior_kl_and_nll_match_torch_distributions() -> None:
    torch.manual_seed(0)
    dist = DiagonalGaussianDistribution(torch.randn(2, 8, 3, 3))
    other = DiagonalGaussianDistribution(torch.randn(2, 8, 3, 3))
    normal = torch.distributions.Normal(dist.mean, dist.std)
    expected_kl = torch.distributions.kl_divergence(normal, torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(dist.kl(), expected_kl)
    expected_pair = torch.distributions.kl_divergence(normal, torch.distributions.Normal(other.mean, other.std))
    torch.testing.assert_close(dist.kl(other), expected_pair.sum(dim=(1, 2, 3)))
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(dist.nll(x), -normal.log_prob(x).sum(dim=(1, 2, 3)))


def test_vq_interface_round_trip_quantizes_to_codebook() -> None:
    torch.manual_seed(0)
    ddconfig = OmegaConf.to_container(_config(TINY_CONFIG).model.params.first_stage_config.params.ddconfig)
    ddconfig["double_z"] = False
    model = VQModelInterface(embed_dim=4, n_embed=16, ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"})
    model.eval()
    x = torch.rand(1, 3, 32, 32) * 2.0 - 1.0
    with torch.no_grad():
        h = model.encode(x)
        quant = model.quantize(h)[0]
        decoded = model.decode(h)
        decoded_quant = model.decode(quant, force_not_quantize=True)
        decoded_raw = model.decode(h, force_not_quantize=True)
    assert h.shape == (1, 4, 4, 4)
    assert decoded.shape == x.shape
    codebook = model.quantize.embedding.weight  # (n_embed, embed_dim)
    vectors = quant.permute(0, 2, 3, 1).reshape(-1, 4)  # (B, C, h, w) -> (B*h*w, C)
    nearest = torch.cdist(h.permute(0, 2, 3, 1).reshape(-1, 4), codebook).argmin(dim=1)
    torch.testing.assert_close(vectors, codebook[nearest])
    torch.testing.assert_close(decoded, decoded_quant)
    assert not torch.allclose(decoded, decoded_raw), "decode must quantize unless force_not_quantize"


def test_loads_first_stage_from_full_checkpoint(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = _build(TINY_CONFIG)
    state = {PREFIX + k: v.contiguous() for k, v in source.state_dict().items()}
    state["model.diffusion_model.out.0.weight"] = torch.ones(4)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    params = OmegaConf.to_container(_config(TINY_CONFIG).model.params.first_stage_config.params)
    loaded = AutoencoderKL(**params, ckpt_path=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), f"{key} not restored from the checkpoint"
    del state[PREFIX + "decoder.conv_out.bias"]
    save_file(state, str(path))
    with pytest.raises(KeyError, match="lacks 1 first-stage keys"):
        AutoencoderKL(**params, ckpt_path=str(path))
