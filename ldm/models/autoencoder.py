"""LDM first stages: the KL autoencoder of Stable Diffusion, VQ autoencoders, and an identity stage.

These are inference modules (plain ``nn.Module``): the project never trains an autoencoder, so
``lossconfig`` is accepted for config compatibility but not instantiated.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ldm.compat import drop_ignored_keys
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

logger = logging.getLogger(__name__)

FIRST_STAGE_PREFIX = "first_stage_model."
# Keys of an autoencoder training checkpoint that belong to the (not built) loss, e.g. LPIPS/discriminator.
TRAINING_ONLY_PREFIXES = ("loss.",)


class _FirstStageBase(nn.Module):
    """Shared encoder/decoder construction and checkpoint loading."""

    def __init__(
        self,
        *,
        ddconfig: Mapping[str, Any],
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
    ) -> None:
        super().__init__()
        self.image_key = image_key
        self.monitor = monitor
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        if colorize_nlabels is not None:
            # Kept so checkpoints of segmentation autoencoders (which store this buffer) load strictly.
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))

    def get_input(self, batch: Mapping[str, torch.Tensor], key: str | None = None) -> torch.Tensor:
        """Image batch ``batch[key]`` as float (B, C, H, W) from the datasets' (B, H, W, C) layout."""
        x = batch[self.image_key if key is None else key]
        if x.dim() == 3:
            x = x[..., None]  # (B, H, W) -> (B, H, W, 1)
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()  # (B, H, W, C) -> (B, C, H, W)

    def init_from_ckpt(self, path: str | Path, ignore_keys: Sequence[str] = ()) -> None:
        """Load weights from an autoencoder checkpoint or a full LDM checkpoint (``first_stage_model.*``).

        Keys starting with any of ``ignore_keys`` and the autoencoder's loss weights are dropped;
        a missing key is an error.
        """
        from ldm.checkpoint import read_state_dict

        state = read_state_dict(path)
        if any(key.startswith(FIRST_STAGE_PREFIX) for key in state):
            state = {k[len(FIRST_STAGE_PREFIX):]: v for k, v in state.items() if k.startswith(FIRST_STAGE_PREFIX)}
        dropped = tuple(ignore_keys) + TRAINING_ONLY_PREFIXES
        state = {k: v for k, v in state.items() if not k.startswith(dropped)}
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing:
            raise KeyError(
                f"checkpoint {path} lacks {len(missing)} first-stage keys (e.g. {missing[:3]}); "
                "check that it is an autoencoder or LDM checkpoint matching ddconfig"
            )
        if unexpected:
            logger.warning("Ignored %d unexpected keys from %s (e.g. %s)", len(unexpected), path, unexpected[:3])
        logger.info("Restored first stage from %s", path)


class AutoencoderKL(_FirstStageBase):
    """KL-regularised autoencoder: ``encode`` gives a diagonal Gaussian posterior over latents."""

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any] | None,
        embed_dim: int,
        ckpt_path: str | Path | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
    ) -> None:
        super().__init__(ddconfig=ddconfig, image_key=image_key, colorize_nlabels=colorize_nlabels, monitor=monitor)
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (the encoder outputs mean and logvar)")
        z_channels = ddconfig["z_channels"]
        self.embed_dim = embed_dim
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images (B, C, H, W) in [-1, 1] -> posterior over latents (B, embed_dim, H/f, W/f)."""
        moments = self.quant_conv(self.encoder(x))
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, embed_dim, h, w) -> images (B, out_ch, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, input: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior


def _vector_quantizer(n_embed: int, embed_dim: int, remap: str | None, sane_index_shape: bool) -> nn.Module:
    """taming-transformers' VectorQuantizer2 (beta 0.25), imported lazily: only VQ models need it."""
    try:
        from taming.modules.vqvae.quantize import VectorQuantizer2
    except ImportError as err:
        raise ImportError("VQModel needs taming-transformers: pip install taming-transformers-rom1504") from err
    return VectorQuantizer2(n_embed, embed_dim, beta=0.25, remap=remap, sane_index_shape=sane_index_shape)


class VQModel(_FirstStageBase):
    """Vector-quantised autoencoder (VQGAN first stage) built on taming's quantizer."""

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any] | None,
        n_embed: int,
        embed_dim: int,
        ckpt_path: str | Path | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        remap: str | None = None,
        sane_index_shape: bool = False,
        **ignored: Any,
    ) -> None:
        drop_ignored_keys("VQModel", ignored)
        super().__init__(ddconfig=ddconfig, image_key=image_key, colorize_nlabels=colorize_nlabels, monitor=monitor)
        z_channels = ddconfig["z_channels"]
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.quantize = _vector_quantizer(n_embed, embed_dim, remap, sane_index_shape)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """Images -> (quantized latents, codebook loss, (perplexity, one-hot, indices))."""
        return self.quantize(self.encode_to_prequant(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b: torch.Tensor) -> torch.Tensor:
        """Codebook indices (B, h, w) -> images."""
        b, h, w = code_b.shape
        quant = self.quantize.get_codebook_entry(code_b.reshape(-1), shape=(b, h, w, self.embed_dim))
        return self.decode(quant)

    def forward(self, input: torch.Tensor, return_pred_indices: bool = False):
        quant, diff, (_, _, indices) = self.encode(input)
        dec = self.decode(quant)
        return (dec, diff, indices) if return_pred_indices else (dec, diff)


class VQModelInterface(VQModel):
    """VQModel as an LDM first stage: diffusion runs on pre-quantization latents, quantized on decode."""

    def __init__(self, embed_dim: int, **kwargs: Any) -> None:
        super().__init__(embed_dim=embed_dim, **kwargs)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_to_prequant(x)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        quant = h if force_not_quantize else self.quantize(h)[0]
        return super().decode(quant)


class IdentityFirstStage(nn.Module):
    """First stage that does nothing (diffusion in pixel space)."""

    def __init__(self, *args: Any, vq_interface: bool = False, **kwargs: Any) -> None:
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def decode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def quantize(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x
