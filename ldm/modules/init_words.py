"""Starts for the placeholder vectors from words: the mean embedding of several words (``--init_words``),
and its text encoder output (``--init_from_encoder``).

Cross Initialization (Pang et al., CVPR 2024) starts a face's embedding from the mean of celebrity names'
embeddings instead of one class word. Here ``v_0`` is the mean, over the known words of a list, of each
word's own mean token row (a word of several tokens counts once, as the mean of its tokens):

    v_0 = 1/|W| * sum_{w in W} 1/|t(w)| * sum_{k in t(w)} E[k]        (E: the token-embedding table)

A list is a text file with one word a line (blank lines and ``#`` comments skipped) or a comma-separated
string. A word is unknown when it gives no token, or a token the table lacks or that only stands for
unknown text (the tokenizer's BOS/EOS ids, which a transformers tokenizer returns for unknown text):
it is skipped and counted in the log.

With ``init_from_encoder`` the start goes through the frozen text encoder once, as Cross Initialization
does: the start [n, D] (the mean above, or one init word's row, repeated for the n vectors) stands in
for the placeholder in the prompt that is the placeholder alone (``<bos> v_1 .. v_n <eos> ...``), and
the encoder's output (after its final layer norm) at those n positions is the start instead
(:func:`encoder_output_start`; one vector per position).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

logger = logging.getLogger(__name__)

FILE_SUFFIXES = (".txt", ".lst", ".list")  # a value ending so (or with a path separator) is a file name


@dataclass(frozen=True)
class InitWords:
    """The known words of a list and their token ids, with where the list came from."""

    source: str
    words: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    skipped: tuple[str, ...]

    def mean_row(self, table: torch.Tensor) -> torch.Tensor:
        """The mean of the words' mean token rows of ``table`` [V, D]: [D] in float32."""
        rows = [table[list(ids)].float().mean(0) for ids in self.token_ids]  # one [D] per word
        return torch.stack(rows).mean(0)

    def describe(self) -> dict[str, object]:
        """What an embedding file records about its start."""
        return {"source": self.source, "words": list(self.words), "skipped": list(self.skipped)}


def read_word_list(value: str | Sequence[str]) -> tuple[list[str], str]:
    """The words of ``value`` (a file, a comma-separated string or a list) and a name for messages."""
    if not isinstance(value, str):
        words = [str(w).strip() for w in value]
        return [w for w in words if w], "init_words"
    path = Path(value).expanduser()
    if path.is_file():
        lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
        return [line for line in lines if line], f"init_words file {path}"
    if "," not in value and (value.endswith(FILE_SUFFIXES) or "/" in value):
        raise ValueError(f"init_words file {path} does not exist (give a file with one word a line, or a "
                         "comma-separated list)")
    return [w.strip() for w in value.split(",") if w.strip()], "init_words list"


def resolve_init_words(value: str | Sequence[str], tokenizer, vocab_size: int) -> InitWords:
    """The known words of ``value`` with their token ids; ValueError naming the source when none is known."""
    words, source = read_word_list(value)
    if not words:
        raise ValueError(f"{source} holds no words")
    special = {getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "unk_token_id")}
    known, ids, skipped = [], [], []
    for word in words:
        tokens = tuple(tokenizer.encode(word))
        if tokens and all(0 <= t < vocab_size and t not in special for t in tokens):
            known.append(word)
            ids.append(tokens)
        else:
            skipped.append(word)
    if not known:
        raise ValueError(f"{source}: none of its {len(words)} words is known to the tokenizer")
    logger.info("init_words: the start is the mean of %d words from %s (%d unknown skipped%s)", len(known),
                source, len(skipped), f": {', '.join(skipped[:10])}" if skipped else "")
    return InitWords(source, tuple(known), tuple(ids), tuple(skipped))


@torch.no_grad()
def encoder_output_start(embedder, placeholder: str, token_id: int, start: torch.Tensor) -> torch.Tensor:
    """Cross Initialization's start: ``embedder``'s output at the placeholder's positions of the prompt
    ``placeholder`` when ``start`` [n, D] stands there (``<bos> v_1 .. v_n <eos> ...``): [n, D] in float32."""
    tokens = embedder.tokenize(placeholder)  # [1, L]
    hits = (tokens[0] == token_id).nonzero().flatten()
    if len(hits) != 1:
        raise ValueError(f"init_from_encoder: the placeholder '{placeholder}' is not one token of its own prompt")
    pos, n = int(hits[0]), start.shape[0]
    if pos + n > tokens.shape[1]:
        raise ValueError(f"init_from_encoder: {n} vectors do not fit the encoder's {tokens.shape[1]} positions")

    def place(_tokens: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """``start`` at positions pos .. pos+n-1 of ``embeds`` [1, L, D], the rest shifted right (length L)."""
        vectors = start.to(embeds)[None]  # [1, n, D]
        return torch.cat([embeds[:, :pos], vectors, embeds[:, pos + 1:]], dim=1)[:, :embeds.shape[1]]

    hidden = embedder.encode_from_tokens(tokens, embedding_manager=place)  # [1, L, D]
    return hidden[0, pos:pos + n].float()
