"""Conditioning encoders: the frozen CLIP ViT-L/14 text encoder of Stable Diffusion v1.

Parameter names reproduce the SD v1 checkpoint layout (`cond_stage_model.transformer.text_model.*`).
The network is transformers' `CLIPTextModel`; everything is built offline: the config in code,
the weights from the SD checkpoint, the tokenizer from the BPE list the `clip` package ships.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.modules.encoders.tokenizer import DEFAULT_CLIP_VERSION, CLIPBPETokenizer, PretrainedTokenizerAdapter
from ldm.util import to_device_nonblocking

logger = logging.getLogger(__name__)

# Text tower of openai/clip-vit-large-patch14 as in its published config.json. The bos/eos/pad ids
# there are the historical 0/2/1 (transformers keys its legacy EOS pooling on eos == 2); the real
# token ids (49406/49407, EOS padding) live in the tokenizer. Only the pooled output depends on them.
VIT_L14_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

EmbeddingManager = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TextTransformer(nn.Module):
    """Holds the CLIP text model as `.text_model`, so keys read `transformer.text_model.*` (SD v1)."""

    def __init__(self, text_model: CLIPTextModel) -> None:
        super().__init__()
        self.text_model = text_model


def _drop_position_ids(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Checkpoints carry `embeddings.position_ids`; ours is a fixed non-persistent arange, so skip it."""
    state_dict.pop(prefix + "transformer.text_model.embeddings.position_ids", None)


def additive_causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`[1, 1, L, L]` mask added to attention scores: 0 up to the diagonal, the dtype's minimum after it.

    Built here rather than with transformers' mask helpers, whose signature changes between releases;
    every attention implementation (eager, SDPA) accepts an additive float mask.
    """
    return torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)[None, None]


class FrozenCLIPEmbedder(nn.Module):
    """CLIP ViT-L/14 text encoder: prompts -> last hidden states `[B, max_length, D]`.

    `version` is the HF id (config built in code, weights from the SD checkpoint) or a local
    directory holding a saved CLIPTextModel and CLIPTokenizer. `device` is accepted for LDM config
    compatibility and ignored: inputs follow the weights' device.
    """

    def __init__(
        self,
        version: str = DEFAULT_CLIP_VERSION,
        device: str | torch.device | None = None,
        max_length: int = 77,
        freeze: bool = True,
        text_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        overrides = dict(text_config or {})
        unknown = sorted(set(overrides) - set(CLIPTextConfig().to_dict()))
        if unknown:  # CLIPTextConfig would keep it silently
            raise TypeError(f"FrozenCLIPEmbedder() got an unexpected keyword argument '{unknown[0]}' (in text_config)")
        if os.path.isdir(version):
            logger.info("Loading CLIP text encoder and tokenizer from %s", version)
            model = CLIPTextModel.from_pretrained(version, local_files_only=True, **overrides)
            tokenizer = CLIPTokenizer.from_pretrained(version, local_files_only=True)
            self.tokenizer = PretrainedTokenizerAdapter(tokenizer, max_length=max_length)
        elif version == DEFAULT_CLIP_VERSION:
            model = CLIPTextModel(CLIPTextConfig(**{**VIT_L14_TEXT_CONFIG, **overrides}))
            self.tokenizer = CLIPBPETokenizer(max_length=max_length)
        else:
            raise ValueError(
                f"version must be {DEFAULT_CLIP_VERSION!r} (built offline) or an existing local directory "
                f"with a saved CLIPTextModel and CLIPTokenizer; got {version!r}."
            )
        if max_length > model.config.max_position_embeddings:
            raise ValueError(
                f"max_length={max_length} exceeds the encoder's {model.config.max_position_embeddings} positions; "
                "lower max_length."
            )
        self.transformer = TextTransformer(model)
        self.max_length = max_length
        self.frozen = freeze
        self.register_load_state_dict_pre_hook(_drop_position_ids)
        if freeze:
            self.freeze()

    @property
    def text_model(self) -> CLIPTextModel:
        """The transformers CLIP text model."""
        return self.transformer.text_model

    @property
    def token_embedding(self) -> nn.Embedding:
        """Token-embedding table `[vocab, D]` (what textual inversion reads and overrides)."""
        return self.text_model.embeddings.token_embedding

    def freeze(self) -> None:
        """Turn off gradients of every weight and keep the module in eval mode."""
        self.frozen = True
        for param in self.parameters():
            param.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenCLIPEmbedder:
        """Switch mode; a frozen encoder always stays in eval mode."""
        return super().train(mode and not self.frozen)

    def tokenize(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Token ids `[B, max_length]` on the weights' device."""
        if isinstance(texts, str):
            texts = [texts]
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"FrozenCLIPEmbedder expects prompts as str or a list of str, got items of type {bad[0]}.")
        return to_device_nonblocking(self.tokenizer(list(texts)), self.token_embedding.weight.device)

    def encode_from_tokens(
        self, tokens: torch.Tensor, embedding_manager: EmbeddingManager | None = None
    ) -> torch.Tensor:
        """Last hidden states `[B, L, D]` for ids `[B, L]`.

        `embedding_manager(tokens, token_embeds)` may rewrite the token embeddings `[B, L, D]`
        before position embeddings are added (textual inversion's injection point).
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}.")
        tokens = tokens.to(self.token_embedding.weight.device)
        model = self.text_model
        token_embeds = self.token_embedding(tokens)  # [B, L, D]
        if embedding_manager is not None:
            token_embeds = embedding_manager(tokens, token_embeds)
        hidden = model.embeddings(inputs_embeds=token_embeds)  # adds position embeddings, [B, L, D]
        causal_mask = additive_causal_mask(hidden.shape[1], hidden.dtype, hidden.device)
        hidden = model.encoder(inputs_embeds=hidden, attention_mask=causal_mask).last_hidden_state
        return model.final_layer_norm(hidden)

    def forward(self, text: Sequence[str] | str, embedding_manager: EmbeddingManager | None = None) -> torch.Tensor:
        """Last hidden states `[B, max_length, D]` of the prompts."""
        return self.encode_from_tokens(self.tokenize(text), embedding_manager=embedding_manager)

    def encode(self, text: Sequence[str] | str, embedding_manager: EmbeddingManager | None = None) -> torch.Tensor:
        """Same as forward (the LDM `get_learned_conditioning` entry point)."""
        return self(text, embedding_manager=embedding_manager)
