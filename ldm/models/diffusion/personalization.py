"""Textual inversion's part of the latent-diffusion model: the embedding manager's training rules.

:class:`Personalization` owns what the embedding manager (``ldm.modules.embedding_manager``) changes in
training: which parts stay frozen, the optimizer's parameter groups, the embedding's penalty terms and
norm metrics, the norm bound and moving average after each update, and what a training checkpoint keeps.

The manager itself stays a submodule of the model (``embedding_manager.*`` in its state dict), since
inference and tests attach or swap one there; each method is handed the model's current manager
(``None`` for a model without one) instead of keeping its own reference.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

from ldm.models.diffusion.anchor_loss import AnchorLoss, EmbeddingRegulariser
from ldm.models.diffusion.loss_terms import LossTerm
from ldm.util import instantiate_from_config

PREFIX = "embedding_manager."  # the manager's state-dict keys in the model


class Personalization:
    """The embedding manager's training rules, for a model that holds the manager as ``embedding_manager``.

    Only the embedding's vectors train, unless ``unfreeze_model`` also trains the UNet (at ``model_lr``).
    ``embedding_reg_weight`` > 0 adds the older squared regulariser, the manager's ``anchor_weight`` > 0
    the anchor term (:mod:`ldm.models.diffusion.anchor_loss`).
    """

    def __init__(self, embedding_reg_weight: float = 0.0, unfreeze_model: bool = False, model_lr: float = 0.0):
        self.embedding_reg_weight = embedding_reg_weight
        self.unfreeze_model = unfreeze_model
        self.model_lr = model_lr
        self.loss_terms: list[LossTerm] = []  # the embedding's penalties, set by build_manager

    def build_manager(self, config: Mapping[str, Any], embedder: nn.Module) -> nn.Module:
        """The manager of ``config`` on the text encoder ``embedder``, its vectors trainable; the penalty
        terms are bound to it."""
        manager = instantiate_from_config(config, embedder=embedder)
        for param in manager.embedding_parameters():
            param.requires_grad = True
        terms = [EmbeddingRegulariser(self.embedding_reg_weight, manager)] if self.embedding_reg_weight > 0 else []
        weight = manager.anchor_weight
        self.loss_terms = terms + ([AnchorLoss(weight, manager)] if weight > 0 else [])
        return manager

    def frozen_parts(self, unet: nn.Module, text_encoder: nn.Module) -> Sequence[nn.Module]:
        """The parts that textual inversion freezes: the UNet and text encoder, none when unfrozen."""
        return () if self.unfreeze_model else (unet, text_encoder)

    def parameter_groups(self, manager: nn.Module, unet: nn.Module, lr: float | None) -> list[dict[str, Any]]:
        """Optimizer groups: the embedding at ``lr``, and the UNet's trainable weights at ``model_lr`` when
        unfrozen."""
        groups = [{"params": list(manager.embedding_parameters()), "lr": lr}]
        if self.unfreeze_model:
            groups.append({"params": [p for p in unet.parameters() if p.requires_grad], "lr": self.model_lr})
        return groups

    @staticmethod
    def metrics(manager: nn.Module | None, prefix: str) -> dict[str, Any]:
        """The drift CrossInit describes, ``||e||`` and ``||e - e_p||``, under ``prefix`` (none without a manager)."""
        return {} if manager is None else {f"{prefix}/{k}": v for k, v in manager.norm_metrics().items()}

    @staticmethod
    def after_optimizer_step(manager: nn.Module | None) -> None:
        """The embedding's norm bound and moving average, after every update of v."""
        if manager is not None:
            manager.after_optimizer_step()

    @staticmethod
    def on_weights_loaded(manager: nn.Module | None) -> None:
        """Re-read e_p and the init words from the freshly loaded text encoder."""
        if manager is not None:
            manager.initialize_from_embedder()

    @staticmethod
    def prefixes_not_in_checkpoints(manager: nn.Module | None) -> tuple[str, ...]:
        """The manager's state-dict prefix, which a base checkpoint lacks (a new embedding)."""
        return (PREFIX,) if manager is not None else ()

    def checkpoint_state(self, manager: nn.Module | None, state_dict: dict) -> dict:
        """What a training checkpoint keeps of ``state_dict``: with a frozen model only the embedding (no 4 GB
        copies), else all of it."""
        if manager is None or self.unfreeze_model:
            return state_dict
        return {k: v for k, v in state_dict.items() if k.startswith(PREFIX)}
