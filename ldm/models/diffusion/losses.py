"""Per-sample diffusion losses (the simple loss of DDPM, eq. 14, and its VLB weighting)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "l2") -> torch.Tensor:
    """Mean over all but the batch dimension of the elementwise ``l1`` or ``l2`` loss: shape [B]."""
    prediction, target = prediction.float(), target.float()
    if loss_type == "l2":
        elementwise = F.mse_loss(prediction, target, reduction="none")
    elif loss_type == "l1":
        elementwise = (prediction - target).abs()
    else:
        raise ValueError(f"unknown loss_type '{loss_type}': use l1 or l2")
    return elementwise.flatten(1).mean(dim=1)
