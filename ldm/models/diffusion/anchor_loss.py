"""The embedding's penalty terms: the pull toward its anchor (``--anchor_weight``, docs/method.md
"Anchoring") and the older squared regulariser (``embedding_reg_weight``). Both are loss terms
(:mod:`ldm.models.diffusion.loss_terms`) that need no UNet call.

For each placeholder p with effective vectors e_k = e_p + gamma (v_k - e_p) (k = 1..n) and anchor a_k
(``init``: the start e_0 = e_p + gamma (v_0 - e_p); ``e_p``: the placeholder's own row),

    L_anchor = w * 1/|P| * sum_{p in P} sum_k ||e_k - a_k||_2

an unsquared L2 distance per vector, as Cross Initialization (Pang et al., CVPR 2024) adds to keep the
embedding near where it started. Its gradient w.r.t. e_k has the constant length w (pointing at the
anchor) wherever e_k != a_k, so the pull does not fade near the anchor, and it acts on e whatever gamma is.

The older ``embedding_reg_weight`` (kept for old configs) is a different term: the mean squared offset of v
from its start, ``w' * mean_j (v - v_0)_j^2`` over the n*D entries. Since e - e_0 = gamma (v - v_0), it is
``w' / (gamma^2 n D) * ||e - e_0||^2``: a squared pull toward ``init``, weighted w'/gamma^2 per entry on e.
"""
from __future__ import annotations

import torch

from ldm.models.diffusion.loss_terms import LossTerm
from ldm.momentum import check_anchor_weight, vector_norms


class AnchorLoss(LossTerm):
    """Adds ``weight * ||e - anchor||_2`` per vector of ``manager`` (an embedding manager) to the loss."""

    name = "anchor"

    def __init__(self, weight: float, manager):
        self.weight = check_anchor_weight(weight)
        self.manager = manager

    def penalty(self) -> torch.Tensor:
        """The unweighted term: the sum over vectors of ||e - a||, averaged over placeholders (a scalar)."""
        manager = self.manager
        distances = [vector_norms(manager.effective_vectors(i) - manager.anchor_vectors(i)).sum()
                     for i in range(len(manager.vectors))]
        return torch.stack(distances).mean()


class EmbeddingRegulariser(LossTerm):
    """Adds ``weight * mean_j (v - v_0)_j^2`` of ``manager``'s trained vectors to the loss (module docstring)."""

    name = "embedding_reg"

    def __init__(self, weight: float, manager):
        self.weight = weight
        self.manager = manager

    def penalty(self) -> torch.Tensor:
        return self.manager.embedding_to_coarse_loss()
