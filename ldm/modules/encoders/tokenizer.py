"""Offline CLIP BPE tokenizer with ids identical to `openai/clip-vit-large-patch14`.

The vocabulary is rebuilt from the BPE merge list that the `clip` package ships
(`bpe_simple_vocab_16e6.txt.gz`), so nothing is ever downloaded. Text is cleaned the way
transformers' `CLIPTokenizer` does it (NFC, whitespace runs to one space, lowercase), split with
CLIP's regex, byte-encoded and merged by rank.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
import os
import unicodedata
from typing import Sequence

import regex
import torch

from ldm.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

DEFAULT_CLIP_VERSION = "openai/clip-vit-large-patch14"  # SD v1's text encoder, built offline
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
# 256 byte symbols, 256 end-of-word byte symbols and 2 special tokens complete the vocabulary.
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2
BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"

# CLIP's pre-tokenisation pattern: special tokens, English contractions, letter runs, single
# digits, runs of other non-space symbols.
_SPLIT_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


def byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def default_bpe_path() -> str:
    """Path of the BPE merge list shipped by the `clip` package (pip `clip-anytorch`)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The `clip` package is not installed; install it with `pip install clip-anytorch` "
            "or pass bpe_path= pointing at bpe_simple_vocab_16e6.txt.gz."
        )
    return os.path.join(list(spec.submodule_search_locations)[0], BPE_FILE_NAME)


def clean_text(text: str) -> str:
    """Normalise like transformers' CLIPTokenizer: NFC, collapse whitespace, lowercase."""
    text = unicodedata.normalize("NFC", text)
    return _WHITESPACE.sub(" ", text).strip().lower()


class CLIPBPETokenizer:
    """CLIP byte-level BPE tokenizer producing fixed-length id tensors.

    `__call__(texts)` gives `[B, max_length]` ids: BOS, at most `max_length - 2` text tokens,
    EOS, then EOS padding (the SD v1 convention).
    """

    def __init__(self, *, bpe_path: str | None = None, max_length: int = 77) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 to hold BOS and EOS, got {max_length}.")
        path = bpe_path or default_bpe_path()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"BPE vocabulary not found at {path}; reinstall `clip-anytorch`.")
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]  # line 0 is a version header
        self.max_length = max_length
        self.byte_encoder = byte_to_unicode()
        self.byte_decoder = {char: b for b, char in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += [BOS_TOKEN, EOS_TOKEN]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.bos_token_id = self.encoder[BOS_TOKEN]
        self.eos_token_id = self.encoder[EOS_TOKEN]
        self.pad_token_id = self.eos_token_id
        self._cache: dict[str, list[str]] = {BOS_TOKEN: [BOS_TOKEN], EOS_TOKEN: [EOS_TOKEN]}

    @property
    def vocab(self) -> dict[str, int]:
        """Token string -> id."""
        return dict(self.encoder)

    @property
    def merges(self) -> list[tuple[str, str]]:
        """BPE merge pairs in rank order."""
        return sorted(self.merge_ranks, key=self.merge_ranks.__getitem__)

    def _bpe(self, word: str) -> list[str]:
        """Merge the byte symbols of one pre-token by rank until no known pair is left."""
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts[:-1], parts[1:])}
            best = min(pairs, key=lambda pair: self.merge_ranks.get(pair, float("inf")))
            if best not in self.merge_ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}.")
        ids: list[int] = []
        for piece in _SPLIT_PATTERN.findall(clean_text(text)):
            # special tokens are printable ASCII, so their byte symbols spell them unchanged
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self._bpe(symbols))
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; word ends become spaces, BOS/EOS are dropped unless asked for."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        special = {self.bos_token_id, self.eos_token_id}
        joined = "".join(self.decoder[i] for i in ids if not (skip_special_tokens and i in special))
        raw = bytearray(self.byte_decoder[char] for char in joined)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Padded, truncated ids `[B, max_length]` (BOS ... EOS EOS-padding)."""
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for text in texts:
            body = self.encode(text)
            if len(body) > self.max_length - 2:
                logger.debug("Truncating prompt of %d tokens to %d.", len(body), self.max_length - 2)
                body = body[: self.max_length - 2]
            row = [self.bos_token_id] + body + [self.eos_token_id]
            rows.append(row + [self.pad_token_id] * (self.max_length - len(row)))
        return torch.tensor(rows, dtype=torch.long)


class PretrainedTokenizerAdapter:
    """Gives a transformers CLIP tokenizer (from a local directory) the CLIPBPETokenizer interface."""

    def __init__(self, tokenizer, *, max_length: int = 77) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS and without truncation."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Padded, truncated ids `[B, max_length]`."""
        if isinstance(texts, str):
            texts = [texts]
        batch = self.tokenizer(
            list(texts), truncation=True, max_length=self.max_length, padding="max_length", return_tensors="pt"
        )
        return batch["input_ids"]


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> CLIPBPETokenizer:
    """The offline CLIP BPE tokenizer of SD v1 (ids of ``openai/clip-vit-large-patch14``)."""
    return CLIPBPETokenizer()


def tokenizer_from_config(config_path: str | os.PathLike[str] | None):
    """The tokenizer of a config's text encoder: a local CLIPTokenizer directory, else SD v1's CLIP BPE."""
    if config_path is None:
        return default_tokenizer()
    from omegaconf import OmegaConf

    config = OmegaConf.load(config_path)
    version = OmegaConf.select(config, "model.params.cond_stage_config.params.version", default=DEFAULT_CLIP_VERSION)
    if version == DEFAULT_CLIP_VERSION:
        return default_tokenizer()
    if not os.path.isdir(version):
        raise CheckpointError(f"{config_path}: cond_stage_config version {version!r} is neither "
                              f"{DEFAULT_CLIP_VERSION!r} nor a local tokenizer directory")
    from transformers import CLIPTokenizer

    return PretrainedTokenizerAdapter(CLIPTokenizer.from_pretrained(version, local_files_only=True))
