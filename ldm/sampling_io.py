"""Writing sampled images: numbered PNGs with their settings in PNG text chunks, never overwriting."""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.util import atomic_write

# The unconditional prompt of classifier-free guidance in stable_txt2img.py and the validation samples.
DEFAULT_NEGATIVE_PROMPT = (
    "disfigured, deformed, ugly, bad anatomy, bad proportions, extra limbs, missing limbs, extra fingers, "
    "fused fingers, mutated hands, poorly drawn hands, poorly drawn face, cross-eyed, long neck, duplicate, "
    "cropped, out of frame, blurry, lowres, jpeg artifacts, watermark, signature, text"
)

SAMPLE_PATTERN = re.compile(r"^(\d+)\.png$")
GRID_PATTERN = re.compile(r"^grid-(\d+)\.png$")


def next_free_index(directory: str | os.PathLike[str], pattern: re.Pattern[str] = SAMPLE_PATTERN) -> int:
    """One past the highest number among the files of ``directory`` matching ``pattern`` (0 if none)."""
    folder = Path(directory)
    if not folder.is_dir():
        return 0
    numbers = [int(match.group(1)) for entry in folder.iterdir() if (match := pattern.match(entry.name))]
    return max(numbers, default=-1) + 1


def read_prompt_file(path: str | os.PathLike[str]) -> list[str]:
    """The non-empty lines of a prompt file (one prompt per line); ValueError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} not found; pass a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} has no prompts (empty or blank lines only); write one prompt per line")
    return prompts


def to_pil_images(images: torch.Tensor) -> list[Image.Image]:
    """PIL images of a batch [B, 3, H, W] in [-1, 1]."""
    array = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = array.permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
    return [Image.fromarray(np.ascontiguousarray(item)) for item in array]


def save_png(path: str | os.PathLike[str], image: Image.Image, text: Mapping[str, object]) -> Path:
    """Write ``image`` atomically with ``text`` as PNG tEXt/iTXt chunks (values stringified, None skipped)."""
    info = PngInfo()
    for key, value in text.items():
        if value is not None:
            info.add_itxt(key, str(value))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_png_text(path: str | os.PathLike[str]) -> dict[str, str]:
    """The text chunks of a PNG written by :func:`save_png` (or any other PNG)."""
    with Image.open(path) as image:
        image.load()
        return dict(getattr(image, "text", {}))


def to_grid_image(images: torch.Tensor, nrow: int | None = None) -> Image.Image:
    """A grid PIL image of images [N, 3, H, W] in [-1, 1]."""
    images = images.detach().float().cpu().clamp(-1, 1)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    grid = torchvision.utils.make_grid((images + 1) / 2, nrow=nrow)  # [3, H', W'] in [0, 1]
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)
