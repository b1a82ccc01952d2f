"""Cross-attention transformer blocks of the SD v1 UNet (parameter names as in the SD v1 checkpoints)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.frozen_conv import Conv2d
from ldm.modules.diffusionmodules.util import checkpoint, zero_module


class _GatedGelu(torch.autograd.Function):
    """``hidden * gelu(gate)`` that saves only its two inputs and recomputes ``gelu(gate)`` in backward.

    Plain autograd also keeps ``gelu(gate)``, a third tensor of the same size; the gradients are the
    same operations in the same order (``aten.gelu_backward`` is GELU's own derivative).
    """

    @staticmethod
    def forward(ctx, hidden, gate):
        ctx.save_for_backward(hidden, gate)
        return hidden * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad_output):
        hidden, gate = ctx.saved_tensors
        grad_hidden = grad_output * F.gelu(gate) if ctx.needs_input_grad[0] else None
        grad_gate = torch.ops.aten.gelu_backward(grad_output * hidden, gate) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_gate


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)  # [B, L, dim_out] each
        if torch.is_grad_enabled() and (hidden.requires_grad or gate.requires_grad):
            return _GatedGelu.apply(hidden, gate)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP: (GE)GLU or GELU projection to ``dim * mult``, dropout, projection back."""

    def __init__(
        self, dim: int, dim_out: Optional[int] = None, mult: int = 4, glu: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        inner_dim = dim * mult
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (self-attention when ``context`` is None)."""

    def __init__(
        self,
        query_dim: int,
        context_dim: Optional[int] = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        batch, length, _ = t.shape
        return t.view(batch, length, self.heads, self.dim_head).transpose(1, 2)  # (B, heads, L, dim_head)

    def forward(
        self, x: torch.Tensor, context: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``x``: (B, N, query_dim); ``context``: (B, M, context_dim); ``mask``: optional bool (B, M),
        True where a context token may be attended to. Returns (B, N, query_dim)."""
        context = x if context is None else context
        q, k, v = (self._split_heads(t) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        attn_mask = None if mask is None else mask[:, None, None, :].bool()  # (B, 1, 1, M)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, N, dim_head)
        batch, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, length, self.heads * self.dim_head)  # (B, N, inner_dim)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the context, GEGLU MLP."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: Optional[int] = None,
        gated_ff: bool = True,
        checkpoint: bool = True,
    ) -> None:
        super().__init__()
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(
            query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: norm, 1x1 conv in, blocks, zero-init 1x1 conv out."""

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: Optional[int] = None,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        self.proj_in = Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim, checkpoint=use_checkpoint
            )
            for _ in range(depth)
        )
        self.proj_out = zero_module(Conv2d(inner_dim, in_channels, kernel_size=1))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x``: (B, C, H, W); ``context``: (B, M, context_dim). Returns (B, C, H, W)."""
        batch, _, height, width = x.shape
        h = self.proj_in(self.norm(x))  # (B, inner, H, W)
        inner = h.shape[1]
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, inner)
        for block in self.transformer_blocks:
            h = block(h, context=context)
        # (B, inner, H, W); contiguous, or every later conv runs channels-last and re-lays out its weights
        h = h.transpose(1, 2).reshape(batch, inner, height, width).contiguous()
        return self.proj_out(h) + x
