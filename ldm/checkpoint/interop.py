"""Embedding files of other tools: diffusers and AUTOMATIC1111, read and written.

Layouts (all hold the *effective* vectors the text encoder sees, i.e. gamma 1 and no e_p)::

    diffusers   learned_embeds.safetensors / .bin   {token: e [n, D]}   (older files: [D])
    A1111 .pt   {"string_to_token": {"*": 265}, "string_to_param": {"*": e [n, D]}, "name": str,
                 "step": int, "sd_checkpoint": str | None, "sd_checkpoint_name": str | None}
    A1111 .safetensors   {"emb_params": e [n, D]}  (the kohya/A1111 single-tensor convention;
                 A1111 and diffusers read any one-tensor file, the trigger word is the file name)

This project's own files (``momentum-ti/2``, ``ldm.checkpoint.embeddings``) already have the A1111
``.pt`` keys and the one-tensor ``.safetensors`` layout, so these exports are only needed to re-mix
with another gamma, pick one placeholder of several, or rename the token.

Our placeholders must be single CLIP tokens; a diffusers token such as ``<cat-toy>`` is not, so a
one-token diffusers file becomes placeholder ``*`` and keeps its token as ``EmbeddingFile.name``.
Token ids come from the ``tokenizer`` the caller passes (``ldm.modules.encoders.tokenizer``:
``default_tokenizer()`` for SD v1, ``tokenizer_from_config()`` for a config's text encoder).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoint._io import (
    SAFETENSORS_SUFFIX,
    CheckpointError,
    detach_for_safetensors,
)
from ldm.checkpoint.embeddings import (
    FOREIGN_PLACEHOLDER,
    EmbeddingFile,
    check_encoder_fit,
    not_an_embedding,
    save_embeddings,
    tensor_fingerprint,
)
from ldm.checkpoint.weights import (
    TEXT_ENCODER_PREFIX,
    TEXT_MODEL_PREFIX,
    read_state_dict,
)
from ldm.momentum import single_token, single_token_id
from ldm.util import atomic_write

logger = logging.getLogger(__name__)

DIFFUSERS_FORMAT = "diffusers"
A1111_FORMAT = "a1111"
A1111_SAFETENSORS_KEY = "emb_params"
TOKEN_TABLE_SUFFIX = "embeddings.token_embedding.weight"
MAX_FOREIGN_TOKENS = 16  # more one-tensor entries than this is a model state dict, not an embedding
MAX_VECTORS = 75  # a prompt holds at most 75 tokens between BOS and EOS
MIN_DIM = 16  # narrower "vectors" are not token embeddings
EXPORT_SUFFIXES = {
    "ours": (".pt", ".safetensors"),
    "ti": (".pt",),
    "diffusers": (".safetensors", ".bin"),
    "a1111": (".pt", ".safetensors"),
}


# --------------------------------------------------------------------------------- reading


def from_foreign_tensors(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, Any], tokenizer
                         ) -> EmbeddingFile:
    """A diffusers ``{token: e}`` or A1111 ``{"emb_params": e}`` file (safetensors or pickle).

    ``tokenizer`` (the text encoder's) gives the token ids.
    """
    if {"clip_l", "clip_g"} <= set(tensors):
        raise CheckpointError(
            f"{path}: an SDXL embedding (clip_l/clip_g vectors); this project runs SD v1 (768-d CLIP ViT-L/14)"
        )
    _check_vector_dict(path, tensors)
    if tokenizer is None:
        raise CheckpointError(f"{path}: a diffusers/AUTOMATIC1111 embedding names its token by text; reading it "
                              "needs the text encoder's tokenizer (tokenizer=)")
    vectors = {str(k): t.detach().float().reshape(-1, t.shape[-1]) for k, t in tensors.items()}  # [D] -> [1, D]
    step = metadata.get("step")
    common = {"base": None, "gamma": 1.0, "step": None if step is None else int(step)}
    if set(vectors) == {A1111_SAFETENSORS_KEY}:
        name = str(metadata.get("name") or path.stem)
        return EmbeddingFile({FOREIGN_PLACEHOLDER: _star_id(tokenizer)},
                             {FOREIGN_PLACEHOLDER: vectors[A1111_SAFETENSORS_KEY]},
                             source_format=A1111_FORMAT, name=name, **common)
    ids = {token: single_token(tokenizer, token) for token in vectors}
    if all(i is not None for i in ids.values()):
        name = next(iter(vectors)) if len(vectors) == 1 else None
        return EmbeddingFile(ids, vectors, source_format=DIFFUSERS_FORMAT, name=name, **common)
    if len(vectors) == 1:
        token = next(iter(vectors))
        logger.warning("%s: diffusers token '%s' is not one CLIP token; it is placeholder '%s' here (write '%s' "
                       "in prompts)", path, token, FOREIGN_PLACEHOLDER, FOREIGN_PLACEHOLDER)
        return EmbeddingFile({FOREIGN_PLACEHOLDER: _star_id(tokenizer)}, {FOREIGN_PLACEHOLDER: vectors[token]},
                             source_format=DIFFUSERS_FORMAT, name=token, **common)
    bad = sorted(t for t, i in ids.items() if i is None)
    raise CheckpointError(f"{path}: diffusers tokens {bad} are not single CLIP tokens; save each token in its own "
                          "file (each then loads as placeholder '*') or rename them to one-token words")


def looks_like_vector_dict(obj: Any) -> bool:
    """True for a small ``{str: tensor}`` mapping (the diffusers/A1111-safetensors layouts)."""
    return (isinstance(obj, Mapping) and 0 < len(obj) <= MAX_FOREIGN_TOKENS
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def _check_vector_dict(path: Path, tensors: Mapping[str, Any]) -> None:
    if not looks_like_vector_dict(tensors):
        keys = sorted(map(str, tensors))[:8]
        raise not_an_embedding(path, f"{len(tensors)} entries, keys {keys}")
    for key, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.dim() not in (1, 2) or tensor.shape[-1] < MIN_DIM or (
                tensor.dim() == 2 and tensor.shape[0] > MAX_VECTORS):
            raise not_an_embedding(path, f"'{key}' is a {tensor.dtype} tensor of shape {tuple(tensor.shape)}, "
                                         f"not [n, D] vectors")


def _star_id(tokenizer) -> int:
    token_id = single_token(tokenizer, FOREIGN_PLACEHOLDER)
    assert token_id is not None, "'*' is one token in CLIP's vocabulary"
    return token_id


def is_a1111_pickle(obj: Mapping[str, Any]) -> bool:
    """A1111's ``.pt`` is the TI layout plus ``name``/``step``/``sd_checkpoint`` entries."""
    return "name" in obj or "sd_checkpoint" in obj or "sd_checkpoint_name" in obj


# --------------------------------------------------------------------------------- e_p from a checkpoint


def token_table(ckpt: str | os.PathLike[str], *, trust_pickle: bool = False) -> torch.Tensor:
    """The text encoder's token-embedding table ``[vocab, D]`` of an SD checkpoint (no model is built)."""
    state = read_state_dict(ckpt, trust_pickle=trust_pickle)
    for prefix in (TEXT_MODEL_PREFIX, TEXT_ENCODER_PREFIX):
        table = state.get(prefix + TOKEN_TABLE_SUFFIX)
        if table is not None:
            return table.detach().float()
    raise CheckpointError(f"{ckpt}: no text-encoder token table ('{TEXT_MODEL_PREFIX}{TOKEN_TABLE_SUFFIX}'); "
                          "pass the full SD v1 checkpoint (not a UNet-only or LoRA file)")


def with_base_from_table(emb: EmbeddingFile, table: torch.Tensor, source: str) -> EmbeddingFile:
    """``emb`` with e_p read from ``table`` (rows of its placeholders' token ids)."""
    fingerprint = tensor_fingerprint(table)
    check_encoder_fit(emb, table.shape[1], fingerprint, source, "the checkpoint's text encoder")
    base = {}
    for placeholder, token_id in emb.string_to_token.items():
        if not 0 <= token_id < table.shape[0]:
            raise CheckpointError(f"{source}: token id {token_id} of '{placeholder}' is outside the checkpoint's "
                                  f"vocabulary of {table.shape[0]}")
        base[placeholder] = table[token_id].expand_as(emb.params[placeholder]).clone()
    return replace(emb, base=base, fingerprint=fingerprint)


# --------------------------------------------------------------------------------- writing


def check_export_suffix(path: str | os.PathLike[str], target: str) -> None:
    suffixes = EXPORT_SUFFIXES[target]
    if Path(path).suffix not in suffixes:
        raise CheckpointError(f"{path}: a {target} embedding file must end in {' or '.join(suffixes)}")


def export_embedding(path: str | os.PathLike[str], emb: EmbeddingFile, target: str, *, tokenizer,
                     token: str | None = None, checkpoint_name: str | None = None) -> Path:
    """Write ``emb`` for ``target`` ('ours', 'ti', 'diffusers', 'a1111'); foreign files get effective vectors.

    ``tokenizer`` (SD v1's CLIP tokenizer for the tools that read these files) gives the A1111 ``*`` id and
    tells whether a diffusers token is already in the vocabulary.
    """
    check_export_suffix(path, target)
    effective = {p: e.detach().float().cpu().contiguous() for p, e in emb.effective().items()}
    if target == "ours":
        return save_embeddings(path, emb)
    if target == "ti":
        payload = {"string_to_token": {p: torch.tensor(i) for p, i in emb.string_to_token.items()},
                   "string_to_param": effective}
        return _save_pickle(path, payload, emb, target)
    if len(effective) != 1:
        raise CheckpointError(f"{target} files hold one placeholder but this embedding has {sorted(effective)}; "
                              "select one with --placeholder")
    placeholder, vectors = next(iter(effective.items()))
    name = token or emb.name or placeholder
    if target == "diffusers":
        _warn_if_in_vocab(name, tokenizer)
        if Path(path).suffix == SAFETENSORS_SUFFIX:
            return _save_safetensors(path, {name: vectors}, {"format": "pt"}, emb, target)
        return _save_pickle(path, {name: vectors}, emb, target)
    if Path(path).suffix == SAFETENSORS_SUFFIX:
        metadata = {"format": "pt", "name": name, **({"step": str(emb.step)} if emb.step is not None else {})}
        return _save_safetensors(path, {A1111_SAFETENSORS_KEY: vectors}, metadata, emb, target)
    payload = {"string_to_token": {FOREIGN_PLACEHOLDER: _star_id(tokenizer)}, "string_to_param": {FOREIGN_PLACEHOLDER: vectors},
               "name": name, "step": emb.step, "sd_checkpoint": None, "sd_checkpoint_name": checkpoint_name}
    return _save_pickle(path, payload, emb, target)


def _warn_if_in_vocab(token: str, tokenizer) -> None:
    if token in tokenizer.vocab:  # the check diffusers' loader makes
        logger.warning("token '%s' is already in CLIP's vocabulary: diffusers' load_textual_inversion refuses it; "
                       "load it with token='<your-token>' or export with --token '<your-token>'", token)


def _save_pickle(path, payload: dict, emb: EmbeddingFile, target: str) -> Path:
    written = atomic_write(path, lambda tmp: torch.save(payload, tmp))
    _log_export(written, emb, target)
    return written


def _save_safetensors(path, tensors: dict, metadata: dict, emb: EmbeddingFile, target: str) -> Path:
    from safetensors.torch import save_file

    tensors = detach_for_safetensors(tensors)
    written = atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    _log_export(written, emb, target)
    return written


def _log_export(path: Path, emb: EmbeddingFile, target: str) -> None:
    logger.info("Wrote %s embedding %s (effective vectors, gamma %s) to %s", target, sorted(emb.params), emb.gamma, path)


# --------------------------------------------------------------------------------- editing


def select_placeholder(emb: EmbeddingFile, placeholder: str, source: str) -> EmbeddingFile:
    """``emb`` reduced to one placeholder."""
    if placeholder not in emb.params:
        raise CheckpointError(f"{source} has no placeholder '{placeholder}'; it has {sorted(emb.params)}")
    keep = [placeholder]
    return replace(emb, string_to_token={p: emb.string_to_token[p] for p in keep},
                   params={p: emb.params[p] for p in keep},
                   base=None if emb.base is None else {p: emb.base[p] for p in keep})


def rename_placeholder(emb: EmbeddingFile, old: str, new: str, tokenizer, source: str) -> EmbeddingFile:
    """``emb`` with placeholder ``old`` called ``new`` (which must be a single token of ``tokenizer``)."""
    if old not in emb.params:
        raise CheckpointError(f"{source} has no placeholder '{old}' to rename; it has {sorted(emb.params)}")
    token_id = single_token_id(tokenizer, new, "new placeholder")
    if new != old and new in emb.params:
        raise CheckpointError(f"{source} already has a placeholder '{new}'; rename to another word")

    def renamed(per: dict | None) -> dict | None:
        return None if per is None else {(new if p == old else p): t for p, t in per.items()}

    tokens = {(new if p == old else p): (token_id if p == old else i) for p, i in emb.string_to_token.items()}
    return replace(emb, string_to_token=tokens, params=renamed(emb.params), base=renamed(emb.base), name=None)


def needs_base_error(source: str, emb: EmbeddingFile) -> CheckpointError:
    return CheckpointError(
        f"{source}: gamma {emb.gamma} needs e_p (the placeholder's row of the text encoder it was trained on), "
        f"which this {emb.source_format} file does not store: pass --ckpt <the SD/DreamBooth checkpoint it was "
        "trained on> and --config"
    )
