"""Reading any supported embedding file, its format detected from the content.

Ours (``momentum-ti/2`` and ``/1``) and the original TI/seed files are parsed by
:mod:`ldm.checkpoint.embeddings`, diffusers and AUTOMATIC1111 files by :mod:`ldm.checkpoint.interop`.
Those foreign files name their token by text, so reading them needs the text encoder's tokenizer,
passed in as ``tokenizer`` (``ldm.modules.embedding_manager.load_embeddings`` passes SD v1's CLIP
tokenizer when none is given).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from ldm.checkpoint import interop
from ldm.checkpoint._io import (
    PARAMETER_DICT_GLOBAL,
    ParameterDictStub,
    check_readable,
    decode_metadata,
    read_safetensors,
    safe_torch_load,
    sniff_format,
)
from ldm.checkpoint.embeddings import (
    MOMENTUM_KEY,
    EmbeddingFile,
    check_dim,
    from_momentum_block,
    from_pickle,
    from_safetensors,
)

logger = logging.getLogger(__name__)


def load_embeddings(
    path: str | os.PathLike[str], *, default_gamma: float | None = None, expected_dim: int | None = None,
    tokenizer=None,
) -> EmbeddingFile:
    """Read any supported embedding file (ours, original TI/seed, diffusers, A1111), detected by content.

    gamma falls back to ``default_gamma`` when the file stores none; ``expected_dim`` (the text
    encoder's width) turns a dimension mismatch into an error naming the file and both sizes.
    ``tokenizer`` maps a diffusers/A1111 file's token to its id (needed for those files only).
    """
    path = Path(path)
    check_readable(path)
    if sniff_format(path) == "safetensors":
        tensors, metadata = read_safetensors(path)
        emb = from_safetensors(path, tensors, metadata)
        if emb is None:
            emb = interop.from_foreign_tensors(path, tensors, decode_metadata(metadata), tokenizer)
    else:
        obj = safe_torch_load(path, extra_safe={PARAMETER_DICT_GLOBAL: ParameterDictStub})
        if isinstance(obj, Mapping) and isinstance(obj.get(MOMENTUM_KEY), Mapping):
            emb = from_momentum_block(path, obj[MOMENTUM_KEY], step=obj.get("step"))
        elif interop.looks_like_vector_dict(obj) and "string_to_param" not in obj:
            emb = interop.from_foreign_tensors(path, obj, {}, tokenizer)
        else:
            emb = from_pickle(path, obj)
            if "format" not in obj and interop.is_a1111_pickle(obj):
                emb = replace(emb, source_format=interop.A1111_FORMAT, gamma=1.0)  # A1111 stores what the model sees
    if emb.gamma is None and default_gamma is not None:
        logger.info("%s stores no gamma; using gamma=%s from the flag/config", path, default_gamma)
        emb = replace(emb, gamma=float(default_gamma))
    if expected_dim is not None:
        check_dim(emb, expected_dim, str(path), "the text encoder")
    return emb
