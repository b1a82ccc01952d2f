"""Sample settings as PNG text chunks in the layout image tools read.

``parameters`` follows AUTOMATIC1111's "PNG Info" layout, which A1111, ComfyUI, civitai and image
browsers parse::

    a photo of * woman
    Negative prompt: blurry, lowres
    Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 0123456789, Model: sd-v1-4, Embedding: embeddings_gs-500, Embedding gamma: 0.1

Rules of that layout kept here: the prompt and the negative prompt each stay on their own line, so
line breaks inside them are written as spaces (a new line would be read as another field); a value
holding ``,``, ``:``, ``"`` or a line break is JSON-quoted. ``Model hash`` is the first 10 hex digits
of the checkpoint file's sha256, as A1111 computes it.

This project's own details (exact prompts, file paths, eta, ...) go under one key,
``momentum_ti`` (JSON). No key is ``prompt`` or ``workflow``: ComfyUI reads those as its own JSON.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PARAMETERS_KEY = "parameters"
PROJECT_KEY = "momentum_ti"
MODEL_HASH_DIGITS = 10
LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class SampleSettings:
    """What a viewer shows for one image: the A1111 fields plus the embedding, its gamma and strength."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str  # "DDIM" or "PLMS"
    cfg_scale: float
    seed: int | None  # None: not known (left out)
    width: int
    height: int
    model_hash: str | None = None
    model_name: str | None = None
    embedding: str | None = None  # the embedding file's stem, as A1111 names embeddings
    gamma: float | None = None
    strength: float | None = None  # inference strength: e_p + strength * (e - e_p) at the placeholder
    loras: tuple[tuple[str, float], ...] = ()  # (file stem, scale): '<lora:name:scale>' in the prompt, as A1111


def parameters_text(settings: SampleSettings) -> str:
    """The A1111 ``parameters`` chunk: prompt line (with A1111's ``<lora:name:scale>`` tags of the LoRAs
    applied), ``Negative prompt:`` line, then the settings line."""
    fields = {
        "Steps": settings.steps, "Sampler": settings.sampler, "CFG scale": settings.cfg_scale, "Seed": settings.seed,
        "Size": f"{settings.width}x{settings.height}", "Model hash": settings.model_hash,
        "Model": settings.model_name, "Embedding": settings.embedding, "Embedding gamma": settings.gamma,
        "Embedding strength": settings.strength,
    }
    line = ", ".join(f"{key}: {_field_value(value)}" for key, value in fields.items() if value is not None)
    prompt = " ".join([one_line(settings.prompt), *(f"<lora:{name}:{scale:g}>" for name, scale in settings.loras)])
    return f"{prompt}\nNegative prompt: {one_line(settings.negative_prompt)}\n{line}"


def png_text(settings: SampleSettings, details: Mapping[str, Any]) -> dict[str, str]:
    """The text chunks of one image: ``parameters`` and this project's ``momentum_ti`` JSON."""
    return {PARAMETERS_KEY: parameters_text(settings), PROJECT_KEY: json.dumps(dict(details), default=str)}


def one_line(text: str) -> str:
    """``text`` with every line break written as a space."""
    return LINE_BREAK.sub(" ", text)


def _field_value(value: Any) -> str:
    text = one_line(str(value))
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"') else text


def model_hash(path: str | os.PathLike[str]) -> str:
    """A1111's model hash: the first 10 hex digits of the file's sha256 (cached per file version)."""
    stat = Path(path).stat()
    return _sha256_prefix(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_prefix(path: str, size: int, mtime_ns: int) -> str:
    logger.info("Hashing %s (%.1f GB) for the PNGs' Model hash", path, size / 1e9)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:MODEL_HASH_DIGITS]


def model_fields(path: str | os.PathLike[str] | None) -> dict[str, str | None]:
    """``model_hash`` and ``model_name`` (the file's stem) of a checkpoint, or None for both without one."""
    if path is None:
        return {"model_hash": None, "model_name": None}
    return {"model_hash": model_hash(path), "model_name": Path(path).stem}
