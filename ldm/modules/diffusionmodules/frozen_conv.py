"""Conv2d that keeps only its weight for the backward pass while its parameters are frozen.

PyTorch's convolution saves its input for backward even when the weight does not require grad, although
the input gradient needs only the weight. In personalization the UNet is frozen and only the conditioning
gets gradients, so every conv input held until backward is wasted memory: a third of a ResBlock's saved
activations (its GroupNorm and SiLU save the other two). :class:`Conv2d` computes the same forward and the
same input gradient (``torch.nn.grad.conv2d_input``, one ``convolution_backward`` call as autograd makes)
without saving the input. With trainable weights (DreamBooth) it is a plain ``nn.Conv2d``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _InputGradOnlyConv2d(torch.autograd.Function):
    """conv2d whose backward returns the input gradient only, computed from the weight alone."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.geometry = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        input_shape, stride, padding, dilation, groups = ctx.geometry
        # under autocast the forward ran in grad_output's dtype; autograd casts the result to x's dtype
        grad_input = torch.nn.grad.conv2d_input(input_shape, weight.to(grad_output.dtype), grad_output,
                                                stride, padding, dilation, groups)
        return grad_input, None, None, None, None, None, None


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state-dict keys) that saves no input for backward while frozen."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        if (frozen and x.requires_grad and torch.is_grad_enabled() and self.padding_mode == "zeros"
                and not isinstance(self.padding, str)):
            return _InputGradOnlyConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                              self.groups)
        return super().forward(x)
