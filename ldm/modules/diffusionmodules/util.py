"""Building blocks shared by the diffusion UNet: layer factories, timestep embeddings, checkpointing."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ldm.modules.diffusionmodules.frozen_conv import Conv2d


def checkpoint(
    func: Callable[..., Any], inputs: Sequence[Any], params: Iterable[nn.Parameter], flag: bool
) -> Any:
    """Run ``func(*inputs)``, recomputing its activations in the backward pass when ``flag`` is set.

    Uses PyTorch's non-reentrant checkpointing, so gradients reach every input that requires them
    (e.g. the text conditioning in textual inversion) even when all of ``func``'s weights are frozen,
    and autograd finds the weights by itself: ``params`` is accepted for the original call signature
    only. Outside of autograd (``torch.no_grad``, inference) nothing is recomputed, so ``func`` is
    called directly.
    """
    del params  # non-reentrant checkpointing tracks the parameters that func uses itself
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False
) -> torch.Tensor:
    """Sinusoidal embeddings of (possibly fractional) timesteps, ``[cos | sin]`` as in SD v1.

    Frequencies are ``max_period ** (-i / half)`` for ``i < half = dim // 2`` (Vaswani et al. 2017,
    sec. 3.5, with cos first). ``repeat_only`` repeats the raw timestep ``dim`` times instead.
    Returns a float32 tensor of shape (N, dim).
    """
    if repeat_only:
        return timesteps.float()[:, None].expand(-1, dim)  # (N,) -> (N, dim)
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[:, None] * torch.exp(exponent)[None]  # (N, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))  # (N, dim): odd dims get a zero last column
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` in place and return it."""
    for param in module.parameters():
        param.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes in float32 and returns the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The UNet's standard normalisation: 32-group GroupNorm computed in float32."""
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1D, 2D or 3D convolution (2D: :class:`~ldm.modules.diffusionmodules.frozen_conv.Conv2d`)."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return Conv2d(*args, **kwargs)  # saves no input for backward while frozen
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dims={dims}: use 1, 2 or 3")


def linear(*args: Any, **kwargs: Any) -> nn.Module:
    """A linear layer (kept as a factory for parity with the original module layout)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1D, 2D or 3D average pooling."""
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dims={dims}: use 1, 2 or 3")
