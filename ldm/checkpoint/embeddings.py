"""Textual-inversion embedding files: our momentum format and the original TI format.

Momentum TI places ``e = e_p + gamma * (v - e_p)`` at the placeholder (DESIGN.md, "The method"),
with v trainable and e_p the placeholder's frozen row of the token-embedding table.

``.pt`` layout (plain containers, loadable with ``torch.load(weights_only=True)``)::

    {"string_to_token": {p: tensor(id)}, "string_to_param": {p: v [n, D]},
     "base_vectors": {p: e_p [n, D]}, "effective_vectors": {p: e [n, D]}, "gamma": float,
     "step": int, "text_encoder_fingerprint": str | None, "format": "momentum-ti/1"}

``.safetensors`` layout: tensors ``string_to_param.<p>``, ``base_vectors.<p>``,
``effective_vectors.<p>`` (``<p>`` is everything after the first dot, so any placeholder round
trips); metadata (JSON strings) ``format``, ``string_to_token`` ({p: id}), ``gamma``, ``step``,
``text_encoder_fingerprint``.

The original TI files (``{"string_to_token", "string_to_param": nn.ParameterDict}``) carry neither
gamma nor e_p; gamma then comes from ``default_gamma`` (flag/config).

diffusers and AUTOMATIC1111 files (``ldm.checkpoint.interop``) hold effective vectors: they load with
gamma 1 and no e_p. :func:`load_embeddings` detects every format from the file's content.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoint._io import (
    PARAMETER_DICT_GLOBAL,
    SAFETENSORS_SUFFIX,
    CheckpointError,
    ParameterDictStub,
    check_readable,
    decode_metadata,
    detach_for_safetensors,
    encode_metadata,
    read_safetensors,
    safe_torch_load,
    sniff_format,
)
from ldm.util import atomic_write

logger = logging.getLogger(__name__)

FORMAT = "momentum-ti/1"
ORIGINAL_FORMAT = "textual-inversion"
TENSOR_GROUPS = ("string_to_param", "base_vectors", "effective_vectors")


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
        return {p: self.base[p] + self.gamma * (v - self.base[p]) for p, v in self.params.items()}

    def as_plain_ti(self) -> EmbeddingFile:
        """The effective vectors as a plain TI embedding (gamma 1, no e_p), e.g. for other tools."""
        return replace(self, params=self.effective(), base=None, gamma=1.0, source_format=ORIGINAL_FORMAT)


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """Short content hash of a tensor (e.g. the token-embedding table) to tie an embedding to its encoder."""
    data = tensor.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(str(tuple(data.shape)).encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:16]


def save_embeddings(path: str | os.PathLike[str], emb: EmbeddingFile) -> Path:
    """Write ``emb`` atomically as ``.pt`` (weights_only-loadable) or ``.safetensors``."""
    effective = _effective_or_none(emb)
    groups = {"string_to_param": emb.params, "base_vectors": emb.base, "effective_vectors": effective}
    if Path(path).suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import save_file

        tensors = {f"{group}.{p}": t for group, per in groups.items() if per for p, t in per.items()}
        scalars = {"string_to_token": dict(emb.string_to_token), **_scalars(emb)}
        metadata = {"format": FORMAT, **encode_metadata(scalars)}
        tensors = detach_for_safetensors(tensors)
        target = atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    else:
        payload: dict[str, Any] = {
            "string_to_token": {p: torch.tensor(i, dtype=torch.int64) for p, i in emb.string_to_token.items()},
            **{group: _plain(per) for group, per in groups.items() if per is not None},
            **_scalars(emb),
            "format": FORMAT,
        }
        target = atomic_write(path, lambda tmp: torch.save(payload, tmp))
    logger.info("Saved embedding %s (step %s, gamma %s) to %s", sorted(emb.params), emb.step, emb.gamma, target)
    return target


def _effective_or_none(emb: EmbeddingFile) -> dict[str, torch.Tensor] | None:
    if emb.gamma is None or (emb.base is None and emb.gamma != 1.0):
        return None
    return emb.effective()


def _plain(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {p: t.detach().cpu().clone() for p, t in tensors.items()}


def _scalars(emb: EmbeddingFile) -> dict[str, Any]:
    return {
        "gamma": emb.gamma,
        "step": emb.step,
        "text_encoder_fingerprint": emb.fingerprint,
    }


def load_embeddings(
    path: str | os.PathLike[str], *, default_gamma: float | None = None, expected_dim: int | None = None
) -> EmbeddingFile:
    """Read any supported embedding file (ours, original TI/seed, diffusers, A1111), detected by content.

    gamma falls back to ``default_gamma`` when the file stores none; ``expected_dim`` (the text
    encoder's width) turns a dimension mismatch into an error naming the file and both sizes.
    """
    from ldm.checkpoint import interop

    path = Path(path)
    check_readable(path)
    if sniff_format(path) == "safetensors":
        emb = _from_safetensors(path)
    else:
        obj = safe_torch_load(path, extra_safe={PARAMETER_DICT_GLOBAL: ParameterDictStub})
        if interop.looks_like_vector_dict(obj) and "string_to_param" not in obj:
            emb = interop.from_foreign_tensors(path, obj, {})
        else:
            emb = _from_pickle(path, obj)
    if emb.gamma is None and default_gamma is not None:
        logger.info("%s stores no gamma; using gamma=%s from the flag/config", path, default_gamma)
        emb = replace(emb, gamma=float(default_gamma))
    if expected_dim is not None:
        interop.check_dim(emb, expected_dim, str(path), "the text encoder")
    return emb


def _from_safetensors(path: Path) -> EmbeddingFile:
    from ldm.checkpoint import interop

    tensors, metadata = read_safetensors(path)
    meta = decode_metadata(metadata)
    if not isinstance(meta.get("string_to_token"), dict):
        return interop.from_foreign_tensors(path, tensors, meta)
    groups: dict[str, dict[str, torch.Tensor]] = {group: {} for group in TENSOR_GROUPS}
    for key, tensor in tensors.items():
        group, _, placeholder = key.partition(".")
        if group in groups and placeholder:
            groups[group][placeholder] = tensor
    return _build(path, meta, groups["string_to_param"], groups["base_vectors"] or None)


def _from_pickle(path: Path, obj: Any) -> EmbeddingFile:
    if not isinstance(obj, Mapping) or "string_to_param" not in obj or "string_to_token" not in obj:
        keys = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path}: not an embedding file (expected 'string_to_token' and 'string_to_param', got {keys}); "
            "model checkpoints go to --ckpt/--actual_resume"
        )
    from ldm.checkpoint import interop

    params = obj["string_to_param"]
    if isinstance(params, ParameterDictStub):
        params = params.params
    if not isinstance(params, Mapping):
        raise CheckpointError(f"{path}: 'string_to_param' is a {type(params).__name__}, expected a dict of tensors")
    meta = dict(obj)
    meta["string_to_token"] = {p: _token_id(path, p, t) for p, t in obj["string_to_token"].items()}
    if "format" not in meta and interop.is_a1111_pickle(meta):
        meta.update(format=interop.A1111_FORMAT, gamma=1.0)  # A1111 stores the vectors the model sees
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
