"""Momentum textual inversion: the learned placeholder vectors and their injection into prompts.

For a placeholder token p with frozen row e_p of the text encoder's token table and trainable
vectors v (initialised from an init word), the vector placed at p in every prompt is

    e = e_p + gamma * (v - e_p)                       (docs/method.md, "Momentum textual inversion")

gamma = 1 is plain textual inversion (Gal et al. 2022); gamma = 0 leaves the conditioning of the
frozen model untouched. Prompts without a placeholder pass through unchanged.

The anchoring options (docs/method.md, "Anchoring") live here too, since they act on v: the anchor
(``init``: the start e_0, or ``e_p``) that the pull of :mod:`ldm.models.diffusion.anchor_loss` and the
norm bound refer to, the class-mean start of ``init_words`` and Cross Initialization's start from the
text encoder's output (``init_from_encoder``; both :mod:`ldm.modules.init_words`), and the moving
average of v (so of e, which is affine in v), saved as ``embeddings_ema*`` files.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ldm import checkpoint
from ldm.checkpoint import EmbeddingFile, save_embeddings, tensor_fingerprint
from ldm.checkpoint.embeddings import check_encoder_fit
from ldm.modules.encoders.tokenizer import default_tokenizer
from ldm.modules.init_words import InitWords, encoder_output_start, resolve_init_words
from ldm.momentum import (
    DEFAULT_GAMMA,
    DEFAULT_PLACEHOLDER,
    check_anchor,
    check_anchor_weight,
    check_ema_decay,
    check_gamma,
    mix_vectors,
    rescale_to_norms,
    single_token_id,
    unmix_vectors,
    vector_norms,
)

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
        anchor_weight: float = 0.0,
        anchor: str = "init",
        norm_bound: bool = False,
        init_words: str | Sequence[str] | None = None,
        ema_decay: float = 0.0,
        ema_bias_correction: bool = False,
        init_from_encoder: bool = False,
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
        self.anchor_weight = check_anchor_weight(anchor_weight)
        self.anchor = check_anchor(anchor)
        self.norm_bound = bool(norm_bound)
        self.ema_decay = check_ema_decay(ema_decay)
        self.ema_bias_correction = bool(ema_bias_correction)
        if self.ema_bias_correction and not self.ema_decay:
            raise ValueError("--ema_bias_correction needs a moving average: give --ema_decay D (config: ema_decay)")
        table_size = embedder.token_embedding.weight.shape[0]
        self.init_words: InitWords | None = (resolve_init_words(init_words, tokenizer, table_size)
                                             if init_words else None)
        self.named_count = len(placeholder_strings)  # the placeholders init_words starts (not per-image ones)
        # which placeholders start from words (init_words, or an init word of their own) rather than their own row
        self.starts_from_words = [(self.init_words is not None and i < self.named_count)
                                  or (i < len(words) and bool(words[i])) for i in range(len(placeholders))]
        self.init_from_encoder = bool(init_from_encoder)
        if self.init_from_encoder and not any(self.starts_from_words):
            raise ValueError("--init_from_encoder needs a start to encode: give --init_word W or --init_words "
                             "FILE_OR_LIST (config: initializer_words or init_words)")
        dim = embedder.token_embedding.weight.shape[1]
        count = len(placeholders)
        self.vectors = nn.ParameterList(
            [nn.Parameter(torch.zeros(num_vectors_per_token, dim)) for _ in range(count)])
        # e_p and the initial v, per placeholder: [count, n, D]
        self.register_buffer("base_vectors", torch.zeros(count, num_vectors_per_token, dim))
        self.register_buffer("initial_vectors", torch.zeros(count, num_vectors_per_token, dim))
        self.register_buffer("progressive_counter", torch.zeros((), dtype=torch.long))
        if self.ema_decay:  # the moving average of v, in last.ckpt so that a resume continues it exactly
            self.register_buffer("ema_vectors", torch.zeros(count, num_vectors_per_token, dim))
        if self.ema_bias_correction:  # the updates the average has taken since its start (for its weights)
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.fingerprint: str | None = None
        self.initialize_from_embedder()

    @property
    def embedder(self) -> nn.Module:
        return self._embedder[0]

    @torch.no_grad()
    def initialize_from_embedder(self) -> None:
        """Read e_p and the init words from the text encoder's current table (after loading weights); with
        ``init_from_encoder``, a start from words is the encoder's output for it (Cross Initialization)."""
        table = self.embedder.token_embedding.weight.detach()
        self.fingerprint = tensor_fingerprint(table)
        n = self.num_vectors_per_token
        class_mean = self.init_words.mean_row(table) if self.init_words is not None else None  # [D]
        for i, (token_id, init_id) in enumerate(zip(self.token_ids, self.init_token_ids)):
            self.base_vectors[i] = table[token_id].float().expand(n, -1)
            start = class_mean if class_mean is not None and i < self.named_count else table[init_id].float()
            start = start.expand(n, -1)  # [n, D]
            if self.init_from_encoder and self.starts_from_words[i]:
                start = encoder_output_start(self.embedder, self.placeholders[i], token_id, start)
            self.initial_vectors[i] = start
            self.vectors[i].data.copy_(self.initial_vectors[i])
        self.restart_ema()

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

    # --- anchoring (docs/method.md, "Anchoring") --------------------------------------------------
    def anchor_vectors(self, index: int) -> torch.Tensor:
        """The anchor of placeholder ``index``: [n, D], the start e_0 (``init``) or e_p (``e_p``)."""
        if self.anchor == "e_p":
            return self.base_vectors[index]
        return mix_vectors(self.base_vectors[index], self.initial_vectors[index], self.gamma)

    @torch.no_grad()
    def norm_metrics(self) -> dict[str, torch.Tensor]:
        """Mean over all vectors of ||e|| and ||e - e_p|| (on the device: logging them reads nothing back)."""
        effective = torch.stack([self.effective_vectors(i) for i in range(len(self.vectors))])  # [count, n, D]
        return {"norm_e": vector_norms(effective).mean(),
                "norm_e_minus_e_p": vector_norms(effective - self.base_vectors).mean()}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """After each update of v: the norm bound's projection, then the moving average's step."""
        if self.norm_bound and self.gamma > 0:  # at gamma 0, e = e_p whatever v is
            for i, v in enumerate(self.vectors):
                bounded = rescale_to_norms(self.effective_vectors(i), vector_norms(self.anchor_vectors(i)))
                v.copy_(unmix_vectors(self.base_vectors[i], bounded, self.gamma))  # ||e|| = ||anchor||, per vector
        if self.ema_decay:
            weight = self.ema_weight()
            for average, v in zip(self.ema_vectors, self.vectors):
                average.lerp_(v.float(), weight)  # ema <- (1 - weight) * ema + weight * v

    def ema_weight(self) -> float | torch.Tensor:
        """The weight of this step's v in the moving average: 1 - d, or with bias correction
        (1 - d) / (1 - d^t) at the t-th update, so that the start's weight is 0 from the first update on and
        the average is sum_i d^(t-i) (1 - d) v_i / (1 - d^t) (as Adam corrects its moments). A tensor on the
        buffer's device, so that no step reads the count back."""
        if not self.ema_bias_correction:
            return 1.0 - self.ema_decay
        self.ema_updates += 1
        return ((1.0 - self.ema_decay) / (1.0 - self.ema_decay ** self.ema_updates.double())).float()

    @torch.no_grad()
    def restart_ema(self) -> None:
        """Start the moving average at the current v (a new start, or a loaded file)."""
        if self.ema_decay:
            self.ema_vectors.copy_(torch.stack([v.float() for v in self.vectors]))
        if self.ema_bias_correction:
            self.ema_updates.zero_()

    @contextmanager
    def ema_scope(self):
        """Within the block, v is its moving average (e.g. to sample with it); a no-op without one."""
        if not self.ema_decay:
            yield
            return
        trained = [v.detach().clone() for v in self.vectors]
        with torch.no_grad():
            for v, average in zip(self.vectors, self.ema_vectors):
                v.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for v, kept in zip(self.vectors, trained):
                    v.copy_(kept)

    def training_options(self) -> dict[str, object]:
        """The anchoring options of this run, as its embedding files record them."""
        return {"anchor_weight": self.anchor_weight, "anchor": self.anchor, "norm_bound": self.norm_bound,
                "init_words": self.init_words.describe() if self.init_words is not None else None,
                "init_from_encoder": self.init_from_encoder, "ema_decay": self.ema_decay,
                "ema_bias_correction": self.ema_bias_correction}

    # --- files -------------------------------------------------------------------------------
    def to_file(self, step: int | None = None, ema: bool = False) -> EmbeddingFile:
        """The embedding as a file record (v, e_p, gamma, step, encoder fingerprint, anchoring options);
        with ``ema``, v is its moving average and the file says so."""
        if ema and not self.ema_decay:
            raise ValueError("this embedding keeps no moving average (set ema_decay)")
        vectors = self.ema_vectors if ema else self.vectors
        return EmbeddingFile(
            string_to_token=dict(zip(self.placeholders, self.token_ids)),
            params={p: v.detach().float().cpu().clone() for p, v in zip(self.placeholders, vectors)},
            base={p: self.base_vectors[i].cpu().clone() for i, p in enumerate(self.placeholders)},
            gamma=self.gamma, step=step, fingerprint=self.fingerprint,
            training=self.training_options(), ema=ema)

    def save(self, path: str | os.PathLike[str], step: int | None = None, ema: bool = False) -> Path:
        """Write the embedding (with ``ema``: its moving average) atomically (``.pt`` or ``.safetensors``)."""
        return save_embeddings(path, self.to_file(step, ema=ema))

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
        self.restart_ema()
        logger.info("Loaded embedding %s for %s (gamma %.3g, step %s%s)", source, sorted(emb.params),
                    self.gamma, emb.step, "; it holds the moving average of a training" if emb.ema else "")

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
