"""Textual-inversion embedding files: our momentum format and the original TI format.

Momentum TI places ``e = e_p + gamma * (v - e_p)`` at the placeholder (docs/method.md, "Momentum textual inversion"),
with v trainable and e_p the placeholder's frozen row of the token-embedding table.

A file of ours works unchanged in other tools: the keys they read hold the effective vectors ``e``,
and the momentum state (v, e_p, gamma) lives under the key ``momentum_ti`` that they ignore.

``.pt`` layout (``momentum-ti/2``; plain containers, loadable with ``torch.load(weights_only=True)``)::

    {"string_to_token": {"*": tensor(id)}, "string_to_param": {"*": e [n, D]},   # AUTOMATIC1111 / original TI
     "name": "<*>", "step": int,                                               # diffusers token, A1111 step
     "momentum_ti": {"format": "momentum-ti/2", "string_to_token": {p: id}, "trainable_vectors": {p: v},
                     "base_vectors": {p: e_p} | None, "gamma": float, "text_encoder_fingerprint": str | None,
                     "name": str | None, "training": {anchor_weight, anchor, norm_bound, init_words,
                     init_from_encoder, ema_decay, ema_bias_correction} | None,
                     "ema": bool}}   # ema: v is the moving average of the training (embeddings_ema*)

With one placeholder p the top-level keys use ``*`` (the key A1111 and diffusers read) and p's
token id; a file with several placeholders keys them by placeholder (original TI reads it; A1111 and
diffusers take one placeholder per file, see scripts/convert_embedding.py --placeholder).

``.safetensors`` layout: one tensor per placeholder, ``{"<*>": e [n, D]}`` (the one-tensor file A1111
and diffusers read; the key is the diffusers token), metadata ``format: "pt"`` and ``momentum_ti``:
the JSON of the block above with v and e_p as exact base64 text, plus ``names`` {p: tensor key}.

Older files still load: ``momentum-ti/1`` (``string_to_param`` holds v, plus ``base_vectors``,
``effective_vectors``, ``gamma``, ``format``), and the original TI files
(``{"string_to_token", "string_to_param": nn.ParameterDict}``), which carry neither gamma nor e_p;
gamma then comes from ``default_gamma`` (flag/config). diffusers and AUTOMATIC1111 files
(``ldm.checkpoint.interop``) hold effective vectors: they load with gamma 1 and no e_p.
:func:`ldm.checkpoint.reader.load_embeddings` detects every format from the file's content; this
module reads ours and the original TI's, and checks that vectors fit a text encoder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoint._io import (
    SAFETENSORS_SUFFIX,
    CheckpointError,
    ParameterDictStub,
    decode_metadata,
    detach_for_safetensors,
    tensor_from_text,
    tensor_to_text,
)
from ldm.momentum import mix_vectors
from ldm.util import atomic_write

logger = logging.getLogger(__name__)

FORMAT = "momentum-ti/2"
ORIGINAL_FORMAT = "textual-inversion"
MOMENTUM_KEY = "momentum_ti"  # our own namespace, in a .pt and in safetensors metadata
FOREIGN_PLACEHOLDER = "*"  # the string_to_param key AUTOMATIC1111 and diffusers read
TENSOR_GROUPS_V1 = ("string_to_param", "base_vectors", "effective_vectors")


@dataclass
class EmbeddingFile:
    """Learned placeholder vectors with what is needed to rebuild the vectors the model sees."""

    string_to_token: dict[str, int]
    params: dict[str, torch.Tensor]  # trainable v per placeholder, [n, D]
    base: dict[str, torch.Tensor] | None = None  # e_p per placeholder, [n, D]
    gamma: float | None = None
    step: int | None = None
    fingerprint: str | None = None
    source_format: str = FORMAT
    name: str | None = None  # trigger word in other tools (diffusers token, A1111 name), when known
    training: dict[str, Any] | None = None  # the run's anchoring options (anchor, norm bound, init_words, EMA)
    ema: bool = False  # v is the moving average of the training's v (an embeddings_ema* file)

    def __post_init__(self) -> None:
        if set(self.params) != set(self.string_to_token):
            raise CheckpointError(
                f"placeholders of params {sorted(self.params)} and token ids {sorted(self.string_to_token)} differ"
            )
        for placeholder, vectors in {**self.params, **(self.base or {})}.items():
            if vectors.dim() != 2:
                raise CheckpointError(f"vectors of '{placeholder}' must be [n, D], got shape {tuple(vectors.shape)}")
        if self.base is not None:
            for placeholder, vectors in self.params.items():
                if placeholder not in self.base or self.base[placeholder].shape != vectors.shape:
                    raise CheckpointError(f"base vectors (e_p) of '{placeholder}' are missing or differ in shape from v")

    def effective(self) -> dict[str, torch.Tensor]:
        """e = e_p + gamma * (v - e_p) per placeholder (e = v when gamma is 1)."""
        if self.gamma is None:
            raise CheckpointError("this embedding file stores no gamma; load it with default_gamma (the --gamma flag/config)")
        if self.gamma == 1.0:
            return {placeholder: v.clone() for placeholder, v in self.params.items()}
        if self.base is None:
            raise CheckpointError(
                f"gamma={self.gamma} needs the base vectors e_p, which this file lacks; "
                "rebuild them from the text encoder (EmbeddingManager) instead"
            )
        return {p: mix_vectors(self.base[p], v, self.gamma) for p, v in self.params.items()}

    def as_plain_ti(self) -> EmbeddingFile:
        """The effective vectors as a plain TI embedding (gamma 1, no e_p), e.g. for other tools."""
        return replace(self, params=self.effective(), base=None, gamma=1.0, source_format=ORIGINAL_FORMAT)

    def trigger_names(self) -> dict[str, str]:
        """The word other tools use per placeholder: ``name`` for a one-placeholder file, else ``<p>``."""
        if self.name and len(self.params) == 1:
            return {next(iter(self.params)): self.name}
        return {placeholder: f"<{placeholder}>" for placeholder in self.params}


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """Short content hash of a tensor (e.g. the token-embedding table) to tie an embedding to its encoder."""
    data = tensor.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(str(tuple(data.shape)).encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:16]


def check_dim(emb: EmbeddingFile, dim: int, source: str, target: str) -> None:
    """Error naming ``source`` and both dimensions when the vectors do not fit ``target``."""
    for placeholder, vectors in emb.params.items():
        if vectors.shape[1] != dim:
            raise CheckpointError(
                f"{source}: vectors of '{placeholder}' have dimension {vectors.shape[1]} but {target} uses {dim} "
                "(an SD2 embedding for SD1, or the reverse?); use the checkpoint the embedding was trained for"
            )


def check_encoder_fit(emb: EmbeddingFile, dim: int, fingerprint: str | None, source: str, target: str) -> None:
    """Before taking e_p from ``target`` (a text encoder of width ``dim``): the vectors must fit it, and a file
    trained on another encoder (another ``fingerprint``) is worth a warning."""
    check_dim(emb, dim, source, target)
    if emb.fingerprint and fingerprint and emb.fingerprint != fingerprint:
        logger.warning("%s was trained on another text encoder (fingerprint %s, %s %s); e_p is taken from %s",
                       source, emb.fingerprint, target, fingerprint, target)


def not_an_embedding(path: Path, found: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: not an embedding file ({found}); expected this project's format, an original TI/seed .pt, "
        "a diffusers learned_embeds file or an AUTOMATIC1111 embedding"
    )


def no_gamma_error(source: str | os.PathLike[str]) -> ValueError:
    """The error of a script given a file that stores no gamma (the original code's or TI's) and no --gamma."""
    return ValueError(f"{source} stores no gamma: pass --gamma (0.1 for the original code's momentum runs, "
                      "1 for plain TI)")


# --------------------------------------------------------------------------------- writing


def save_embeddings(path: str | os.PathLike[str], emb: EmbeddingFile) -> Path:
    """Write ``emb`` atomically as ``.pt`` (weights_only-loadable) or ``.safetensors``, format momentum-ti/2.

    The keys other tools read get the effective vectors, so ``emb`` needs gamma (and e_p unless gamma is 1).
    """
    try:
        effective = {p: e.detach().float().cpu().contiguous() for p, e in emb.effective().items()}
    except CheckpointError as err:
        raise CheckpointError(f"{path}: cannot write the effective vectors: {err}") from None
    if len(effective) > 1:
        logger.info("%s holds %d placeholders: AUTOMATIC1111 and diffusers read one per file (export one with "
                    "scripts/convert_embedding.py --placeholder)", path, len(effective))
    if Path(path).suffix == SAFETENSORS_SUFFIX:
        target = _save_safetensors(path, emb, effective)
    else:
        target = atomic_write(path, lambda tmp: torch.save(_pt_payload(emb, effective), tmp))
    logger.info("Saved embedding %s (step %s, gamma %s) to %s", sorted(emb.params), emb.step, emb.gamma, target)
    return target


def _momentum_block(emb: EmbeddingFile) -> dict[str, Any]:
    return {"format": FORMAT, "gamma": emb.gamma, "text_encoder_fingerprint": emb.fingerprint, "name": emb.name,
            "training": emb.training, "ema": emb.ema}


def _pt_payload(emb: EmbeddingFile, effective: dict[str, torch.Tensor]) -> dict[str, Any]:
    token_ids = {p: torch.tensor(i, dtype=torch.int64) for p, i in emb.string_to_token.items()}
    if len(effective) == 1:
        (placeholder, vectors), = effective.items()
        foreign_tokens = {FOREIGN_PLACEHOLDER: token_ids[placeholder]}
        foreign_params = {FOREIGN_PLACEHOLDER: vectors}
        names = {"name": emb.trigger_names()[placeholder]}
    else:
        foreign_tokens, foreign_params, names = dict(token_ids), effective, {}
    block = {
        **_momentum_block(emb),
        "string_to_token": {p: t.clone() for p, t in token_ids.items()},
        "trainable_vectors": _plain(emb.params),
        "base_vectors": None if emb.base is None else _plain(emb.base),
    }
    return {"string_to_token": foreign_tokens, "string_to_param": foreign_params, **names, "step": emb.step,
            MOMENTUM_KEY: block}


def _save_safetensors(path: str | os.PathLike[str], emb: EmbeddingFile, effective: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    names = emb.trigger_names()
    block = {
        **_momentum_block(emb),
        "step": emb.step,
        "string_to_token": dict(emb.string_to_token),
        "names": names,
        "trainable_vectors": {p: tensor_to_text(v) for p, v in emb.params.items()},
        "base_vectors": None if emb.base is None else {p: tensor_to_text(e) for p, e in emb.base.items()},
    }
    tensors = detach_for_safetensors({names[p]: e for p, e in effective.items()})
    metadata = {"format": "pt", MOMENTUM_KEY: json.dumps(block)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _plain(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {p: t.detach().cpu().clone() for p, t in tensors.items()}


# --------------------------------------------------------------------------------- reading


def from_momentum_block(path: Path, block: Mapping[str, Any], *, step: Any) -> EmbeddingFile:
    """A momentum-ti/2 file: v, e_p and gamma exactly as saved (the foreign keys are derived from them)."""
    params, base = block.get("trainable_vectors"), block.get("base_vectors")
    if not isinstance(params, Mapping) or not isinstance(block.get("string_to_token"), Mapping):
        raise CheckpointError(f"{path}: '{MOMENTUM_KEY}' lacks 'trainable_vectors' or 'string_to_token'; re-save the file")
    if isinstance(next(iter(params.values()), None), Mapping):  # safetensors metadata: tensors as text
        params = {p: tensor_from_text(t, str(path)) for p, t in params.items()}
        base = None if base is None else {p: tensor_from_text(t, str(path)) for p, t in base.items()}
    meta = {**block, "step": step}
    meta["string_to_token"] = {p: _token_id(path, p, t) for p, t in block["string_to_token"].items()}
    return _build(path, meta, _vectors(path, params), _vectors(path, base) if base else None)


def from_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
                     ) -> EmbeddingFile | None:
    """A safetensors file of ours (momentum-ti/2 or /1), or None for another layout (diffusers, A1111)."""
    if MOMENTUM_KEY in metadata:
        try:
            block = json.loads(metadata[MOMENTUM_KEY])
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: unreadable '{MOMENTUM_KEY}' metadata ({err.msg}); re-save the file") from None
        if not isinstance(block, Mapping):
            raise CheckpointError(f"{path}: '{MOMENTUM_KEY}' metadata is not a JSON object; re-save the file")
        return from_momentum_block(path, block, step=block.get("step"))
    meta = decode_metadata(metadata)
    if not isinstance(meta.get("string_to_token"), dict):
        return None
    groups: dict[str, dict[str, torch.Tensor]] = {group: {} for group in TENSOR_GROUPS_V1}
    for key, tensor in tensors.items():
        group, _, placeholder = key.partition(".")
        if group in groups and placeholder:
            groups[group][placeholder] = tensor
    return _build(path, meta, groups["string_to_param"], groups["base_vectors"] or None)


def from_pickle(path: Path, obj: Any) -> EmbeddingFile:
    """An original TI/seed or momentum-ti/1 pickle (``string_to_token`` and ``string_to_param``)."""
    if not isinstance(obj, Mapping) or "string_to_param" not in obj or "string_to_token" not in obj:
        keys = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise not_an_embedding(path, f"expected 'string_to_token' and 'string_to_param', got {keys}; "
                                     "model checkpoints go to --ckpt/--actual_resume")
    params = obj["string_to_param"]
    if isinstance(params, ParameterDictStub):
        params = params.params
    if not isinstance(params, Mapping):
        raise CheckpointError(f"{path}: 'string_to_param' is a {type(params).__name__}, expected a dict of tensors")
    meta = dict(obj)
    meta["string_to_token"] = {p: _token_id(path, p, t) for p, t in obj["string_to_token"].items()}
    base = obj.get("base_vectors")
    return _build(path, meta, _vectors(path, params), _vectors(path, base) if base else None)


def _build(path: Path, meta: Mapping[str, Any], params: dict[str, torch.Tensor], base: dict | None) -> EmbeddingFile:
    gamma, step = meta.get("gamma"), meta.get("step")
    try:
        return EmbeddingFile(
            string_to_token={str(p): int(i) for p, i in meta["string_to_token"].items()},
            params=params,
            base=base,
            gamma=None if gamma is None else float(gamma),
            step=None if step is None else int(step),
            fingerprint=meta.get("text_encoder_fingerprint"),
            source_format=str(meta.get("format", ORIGINAL_FORMAT)),
            name=meta.get("name") if isinstance(meta.get("name"), str) else None,
            training=dict(meta["training"]) if isinstance(meta.get("training"), Mapping) else None,
            ema=meta.get("ema") is True,
        )
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _token_id(path: Path, placeholder: str, token: Any) -> int:
    if isinstance(token, torch.Tensor) and token.numel() == 1 and not token.is_floating_point():
        return int(token.item())
    if isinstance(token, int):
        return token
    raise CheckpointError(f"{path}: token id of '{placeholder}' must be one integer, got {token!r}")


def _vectors(path: Path, per_placeholder: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Plain [n, D] tensors (Parameters detached, [D] made [1, D])."""
    result: dict[str, torch.Tensor] = {}
    for placeholder, tensor in per_placeholder.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: vectors of '{placeholder}' are a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach()
        result[str(placeholder)] = tensor.unsqueeze(0) if tensor.dim() == 1 else tensor  # [D] -> [1, D]
    return result
