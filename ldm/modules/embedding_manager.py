"""Momentum textual inversion: the learned placeholder vectors and their injection into prompts.

For a placeholder token p with frozen row e_p of the text encoder's token table and trainable
vectors v (initialised from an init word), the vector placed at p in every prompt is

    e = e_p + gamma * (v - e_p)                       (docs/method.md, "Momentum textual inversion")

gamma = 1 is plain textual inversion (Gal et al. 2022); gamma = 0 leaves the conditioning of the
frozen model untouched. Prompts without a placeholder pass through unchanged.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ldm import checkpoint
from ldm.checkpoint import EmbeddingFile, save_embeddings, tensor_fingerprint
from ldm.checkpoint.embeddings import check_encoder_fit
from ldm.modules.encoders.tokenizer import default_tokenizer
from ldm.momentum import DEFAULT_GAMMA, DEFAULT_PLACEHOLDER, check_gamma, mix_vectors, single_token_id

logger = logging.getLogger(__name__)

PROGRESSIVE_SCALE = 2000  # steps per extra vector with progressive_words, as in textual inversion
# Rare single-character tokens that tell images apart with per_image_tokens (the Hebrew letters,
# as in textual inversion): extra placeholders, and the per-image words of ldm.data.prompts.
PER_IMAGE_TOKENS: tuple[str, ...] = (
    "א", "ב", "ג", "ד", "ה", "ו", "ז", "ח", "ט", "י", "כ",
    "ל", "מ", "נ", "ס", "ע", "פ", "צ", "ק", "ר", "ש", "ת",
)


def load_embeddings(path: str | os.PathLike[str], *, default_gamma: float | None = None,
                    expected_dim: int | None = None, tokenizer=None) -> EmbeddingFile:
    """:func:`ldm.checkpoint.load_embeddings` with SD v1's CLIP tokenizer for diffusers/A1111 files'
    tokens unless another ``tokenizer`` is given."""
    return checkpoint.load_embeddings(path, default_gamma=default_gamma, expected_dim=expected_dim,
                                      tokenizer=tokenizer if tokenizer is not None else default_tokenizer())


class EmbeddingManager(nn.Module):
    """Trainable vectors for placeholder tokens, mixed with the frozen rows by ``gamma``.

    ``gamma`` left out is :data:`~ldm.momentum.DEFAULT_GAMMA`, or the gamma stored in the first file
    loaded; a given ``gamma`` (the config, ``--gamma``) wins over a file's.
    """

    def __init__(
        self,
        embedder: nn.Module,
        placeholder_strings: Sequence[str] = (DEFAULT_PLACEHOLDER,),
        initializer_words: Sequence[str] | None = None,
        per_image_tokens: bool = False,
        num_vectors_per_token: int = 1,
        progressive_words: bool = False,
        gamma: float | None = None,
    ):
        super().__init__()
        if num_vectors_per_token < 1:
            raise ValueError(f"num_vectors_per_token must be at least 1, got {num_vectors_per_token}")
        placeholders = list(placeholder_strings)
        if per_image_tokens:
            placeholders += [t for t in PER_IMAGE_TOKENS if t not in placeholders]
        if len(set(placeholders)) != len(placeholders):
            raise ValueError(f"placeholder strings must be distinct, got {placeholders}")
        self._embedder = [embedder]  # a list, so the text encoder is not registered as a submodule
        tokenizer = embedder.tokenizer
        self.placeholders = placeholders
        self.token_ids = [single_token_id(tokenizer, p, "placeholder") for p in placeholders]
        words = list(initializer_words or [])
        self.init_token_ids = [
            single_token_id(tokenizer, words[i], "init word") if i < len(words) and words[i] else token_id
            for i, token_id in enumerate(self.token_ids)
        ]
        self.num_vectors_per_token = num_vectors_per_token
        self.progressive_words = progressive_words
        self.gamma_is_set = gamma is not None  # a set gamma wins over the one a loaded file stores
        self.gamma = check_gamma(DEFAULT_GAMMA if gamma is None else gamma)
        dim = embedder.token_embedding.weight.shape[1]
        count = len(placeholders)
        self.vectors = nn.ParameterList(
            [nn.Parameter(torch.zeros(num_vectors_per_token, dim)) for _ in range(count)])
        # e_p and the initial v, per placeholder: [count, n, D]
        self.register_buffer("base_vectors", torch.zeros(count, num_vectors_per_token, dim))
        self.register_buffer("initial_vectors", torch.zeros(count, num_vectors_per_token, dim))
        self.register_buffer("progressive_counter", torch.zeros((), dtype=torch.long))
        self.fingerprint: str | None = None
        self.initialize_from_embedder()

    @property
    def embedder(self) -> nn.Module:
        return self._embedder[0]

    @torch.no_grad()
    def initialize_from_embedder(self) -> None:
        """Read e_p and the init words from the text encoder's current table (after loading weights)."""
        table = self.embedder.token_embedding.weight.detach()
        self.fingerprint = tensor_fingerprint(table)
        n = self.num_vectors_per_token
        for i, (token_id, init_id) in enumerate(zip(self.token_ids, self.init_token_ids)):
            self.base_vectors[i] = table[token_id].float().expand(n, -1)
            self.initial_vectors[i] = table[init_id].float().expand(n, -1)
            self.vectors[i].data.copy_(self.initial_vectors[i])

    def set_gamma(self, gamma: float) -> None:
        """Change the momentum ratio (e.g. to re-mix a trained embedding at inference)."""
        self.gamma = check_gamma(gamma)

    def embedding_parameters(self):
        return self.vectors.parameters()

    def effective_vectors(self, index: int) -> torch.Tensor:
        """e = e_p + gamma * (v - e_p) for placeholder ``index``: [n, D] (exact v at gamma 1, e_p at 0)."""
        return mix_vectors(self.base_vectors[index], self.vectors[index], self.gamma)

    def _vectors_in_use(self) -> int:
        if not self.progressive_words:
            return self.num_vectors_per_token
        return min(self.num_vectors_per_token, 1 + int(self.progressive_counter) // PROGRESSIVE_SCALE)

    def forward(self, tokens: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        """Replace placeholder embeddings in ``token_embeds`` [B, L, D] given ids ``tokens`` [B, L]."""
        if self.progressive_words and self.training:
            self.progressive_counter += 1
        used = self._vectors_in_use()
        vectors = [self.effective_vectors(i)[:used].to(token_embeds.dtype) for i in range(len(self.token_ids))]
        if used == 1:
            out = token_embeds
            for token_id, vec in zip(self.token_ids, vectors):
                mask = (tokens == token_id).unsqueeze(-1)  # [B, L, 1]
                out = torch.where(mask, vec[0], out)  # no `if mask.any()`: that would wait for the GPU
            return out
        return self._splice_multi_vector(tokens, token_embeds, vectors)

    def _splice_multi_vector(self, tokens, token_embeds, vectors) -> torch.Tensor:
        """Insert n vectors at each placeholder, shifting the rest right and truncating to L."""
        length = token_embeds.shape[1]
        rows = []
        for row_tokens, row in zip(tokens, token_embeds):
            hits = [(int(pos), k) for k, token_id in enumerate(self.token_ids)
                    for pos in (row_tokens == token_id).nonzero().flatten()]
            for pos, k in sorted(hits, reverse=True):  # right to left keeps earlier positions valid
                row = torch.cat([row[:pos], vectors[k], row[pos + 1:]])[:length]
            rows.append(row)
        return torch.stack(rows)

    def embedding_to_coarse_loss(self) -> torch.Tensor:
        """Mean squared distance of v from its initial value, summed over placeholders."""
        loss = sum(((v - init) ** 2).mean() for v, init in zip(self.vectors, self.initial_vectors))
        return loss / len(self.vectors)

    # --- files -------------------------------------------------------------------------------
    def to_file(self, step: int | None = None) -> EmbeddingFile:
        """The embedding as a file record (v, e_p, gamma, step, encoder fingerprint)."""
        return EmbeddingFile(
            string_to_token=dict(zip(self.placeholders, self.token_ids)),
            params={p: v.detach().float().cpu().clone() for p, v in zip(self.placeholders, self.vectors)},
            base={p: self.base_vectors[i].cpu().clone() for i, p in enumerate(self.placeholders)},
            gamma=self.gamma, step=step, fingerprint=self.fingerprint)

    def save(self, path: str | os.PathLike[str], step: int | None = None) -> Path:
        """Write the embedding atomically (``.pt`` or ``.safetensors``)."""
        return save_embeddings(path, self.to_file(step))

    @torch.no_grad()
    def load(self, path: str | os.PathLike[str], default_gamma: float | None = None) -> EmbeddingFile:
        """Load v for the placeholders of a file this manager knows, and its gamma unless one was given."""
        emb = load_embeddings(path, default_gamma=default_gamma if default_gamma is not None else self.gamma)
        self.apply_file(emb, source=str(path))
        return emb

    @torch.no_grad()
    def apply_file(self, emb: EmbeddingFile, source: str = "embedding file") -> None:
        unknown = sorted(set(emb.params) - set(self.placeholders))
        if unknown:
            raise ValueError(f"{source} has placeholders {unknown} but this model expects {self.placeholders}; "
                             "pass --placeholder_string to match the file")
        check_encoder_fit(emb, self.vectors[0].shape[1], self.fingerprint, source, "the text encoder")
        for placeholder, v in emb.params.items():
            i = self.placeholders.index(placeholder)
            if v.shape[0] != self.vectors[i].shape[0]:
                raise ValueError(f"{source}: '{placeholder}' has {v.shape[0]} vectors but num_vectors_per_token "
                                 f"is {self.vectors[i].shape[0]}; set num_vectors_per_token to match")
            self.vectors[i].data.copy_(v)
        self._settle_gamma(emb.gamma, source)
        logger.info("Loaded embedding %s for %s (gamma %.3g, step %s)", source, sorted(emb.params),
                    self.gamma, emb.step)

    def _settle_gamma(self, stored: float | None, source: str) -> None:
        """The file's gamma unless this manager's was given (the config wins over a loaded file)."""
        if stored is None or stored == self.gamma:
            return
        if self.gamma_is_set:
            logger.info("%s stores gamma %.3g; using the given gamma %.3g", source, stored, self.gamma)
            return
        self.set_gamma(stored)

    @classmethod
    def from_file(cls, embedder: nn.Module, path: str | os.PathLike[str], gamma: float | None = None,
                  default_gamma: float = DEFAULT_GAMMA) -> "EmbeddingManager":
        """A manager for the placeholders of a file; ``gamma`` overrides the stored one."""
        emb = load_embeddings(path, default_gamma=default_gamma)
        sizes = {v.shape[0] for v in emb.params.values()}
        manager = cls(embedder, placeholder_strings=list(emb.params), num_vectors_per_token=max(sizes), gamma=gamma)
        manager.apply_file(emb, source=str(path))
        return manager
