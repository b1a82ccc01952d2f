"""The Stable Diffusion v1 noise-prediction UNet, with the LDM constructor keys and SD v1 parameter names.

Structure (Rombach et al. 2022, appendix E; Dhariwal & Nichol 2021 for the ResBlocks): an input conv,
``num_res_blocks`` ResBlocks per level (each followed by a SpatialTransformer at the attention
resolutions), downsampling between levels, a ResBlock-transformer-ResBlock middle, and the mirrored
output path fed by skip connections.
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)

class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Apply the module to ``x`` given the timestep embeddings ``emb``."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands ``emb`` to TimestepBlocks and ``context`` to SpatialTransformers."""

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv."""

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None, padding: int = 1
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 conv or by average pooling."""

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None, padding: int = 1
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=2, padding=padding)
        elif self.channels == self.out_channels:
            self.op = avg_pool_nd(dims, kernel_size=2, stride=2)
        else:
            raise ValueError(
                f"Downsample without conv cannot change channels ({channels} -> {out_channels}): set use_conv=True"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block: norm-SiLU-conv, add the projected timestep embedding, norm-SiLU-dropout-conv."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: Optional[int] = None,
        use_conv: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), linear(emb_channels, self.out_channels))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            kernel_size, padding = (3, 1) if use_conv else (1, 0)
            self.skip_connection = conv_nd(dims, channels, self.out_channels, kernel_size, padding=padding)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]  # (B, C_out, 1, 1)
        h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _reject_unsupported(**options: object) -> None:
    """Raise NotImplementedError for LDM UNet options this SD v1 re-creation does not implement."""
    unsupported = {
        "num_classes": "class-conditional label embeddings",
        "use_fp16": "a built-in fp16 torso (use Lightning precision '16-mixed' or 'bf16-mixed' instead)",
        "use_scale_shift_norm": "scale-shift timestep conditioning",
        "resblock_updown": "ResBlock up/downsampling",
        "use_new_attention_order": "the legacy QKV attention block",
        "n_embed": "codebook-id prediction",
    }
    for name, what in unsupported.items():
        if options[name] not in (None, False):
            raise NotImplementedError(f"UNetModel: {name}={options[name]!r} ({what}) is not implemented; remove it")
    if not options["use_spatial_transformer"]:
        raise NotImplementedError(
            "UNetModel: use_spatial_transformer=False (the legacy attention block) is not implemented; "
            "set use_spatial_transformer: True"
        )
    if options["dims"] != 2:
        raise NotImplementedError(f"UNetModel: dims={options['dims']} is not implemented; only 2D UNets (dims=2)")


class UNetModel(nn.Module):
    """SD v1 UNet predicting the noise ``eps`` from latents ``x``, timesteps and text ``context``.

    Takes the original LDM constructor keys. ``image_size``, ``num_heads_upsample`` and ``legacy``
    do not change the SD v1 architecture and are accepted for config compatibility; options that
    SD v1 does not use raise NotImplementedError.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Optional[int] = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: Optional[int] = None,
        n_embed: Optional[int] = None,
        legacy: bool = True,
    ) -> None:
        super().__init__()
        _reject_unsupported(
            num_classes=num_classes,
            use_fp16=use_fp16,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order,
            n_embed=n_embed,
            use_spatial_transformer=use_spatial_transformer,
            dims=dims,
        )
        if context_dim is None:
            raise ValueError("UNetModel: use_spatial_transformer needs context_dim (the text embedding width)")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("UNetModel: set num_heads or num_head_channels")
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.context_dim = context_dim
        self.use_checkpoint = use_checkpoint
        self._dropout = dropout
        self._transformer_depth = transformer_depth
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)
        )
        self._build_blocks(time_embed_dim, conv_resample)
        self.out = nn.Sequential(
            normalization(model_channels),
            nn.SiLU(),
            zero_module(conv_nd(2, model_channels, out_channels, 3, padding=1)),
        )

    def _res_block(self, channels: int, emb_dim: int, out_channels: int) -> ResBlock:
        return ResBlock(
            channels, emb_dim, self._dropout, out_channels=out_channels, use_checkpoint=self.use_checkpoint
        )

    def _transformer(self, channels: int) -> SpatialTransformer:
        if self.num_head_channels == -1:
            heads, dim_head = self.num_heads, channels // self.num_heads
        else:
            heads, dim_head = channels // self.num_head_channels, self.num_head_channels
        return SpatialTransformer(
            channels,
            heads,
            dim_head,
            depth=self._transformer_depth,
            dropout=self._dropout,
            context_dim=self.context_dim,
            use_checkpoint=self.use_checkpoint,
        )

    def _build_blocks(self, emb_dim: int, conv_resample: bool) -> None:
        """Create input_blocks, middle_block and output_blocks in the SD v1 index layout."""
        ch = self.model_channels
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(2, self.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1  # downsampling factor of the current level
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers: list[nn.Module] = [self._res_block(ch, emb_dim, mult * self.model_channels)]
                ch = mult * self.model_channels
                if ds in self.attention_resolutions:
                    layers.append(self._transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample, out_channels=ch)))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            self._res_block(ch, emb_dim, ch), self._transformer(ch), self._res_block(ch, emb_dim, ch)
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                layers = [self._res_block(ch + skip_channels.pop(), emb_dim, mult * self.model_channels)]
                ch = mult * self.model_channels
                if ds in self.attention_resolutions:
                    layers.append(self._transformer(ch))
                if level and i == self.num_res_blocks:
                    layers.append(Upsample(ch, conv_resample, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

    def _check_inputs(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor], y: Optional[torch.Tensor]
    ) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNetModel: expected x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"UNetModel: latent height and width must be multiples of {factor}, got {tuple(x.shape)}")
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"UNetModel: expected timesteps of shape ({x.shape[0]},), got {tuple(timesteps.shape)}")
        if context is None or context.ndim != 3 or context.shape[-1] != self.context_dim:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"UNetModel: expected context of shape (B, T, {self.context_dim}), got {got}")
        if y is not None:
            raise ValueError("UNetModel: y (class labels) given but this UNet is not class-conditional; pass y=None")

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        y: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Predict eps. ``x``: (B, C_in, H, W); ``timesteps``: (B,); ``context``: (B, T, context_dim)."""
        self._check_inputs(x, timesteps, context, y)
        t_emb = timestep_embedding(timesteps, self.model_channels)  # (B, model_channels), float32
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))  # (B, 4 * model_channels)
        skips = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            h = module(h, emb, context)
        return self.out(h)
