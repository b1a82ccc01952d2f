"""The validation grid: one row per prompt, one column per sample, the prompt written to the left."""
from __future__ import annotations

import textwrap
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw

from ldm.sampling_io import to_grid_image

LABEL_WIDTH = 200  # pixels of the prompt column
LINE_HEIGHT = 12  # pixels per line of PIL's default font
CHARS_PER_LINE = 30


def labelled_grid(images: torch.Tensor, prompts: Sequence[str]) -> Image.Image:
    """A grid of ``images`` [P * S, 3, H, W] in [-1, 1] (S samples of each of the P prompts, prompt-major)."""
    per_prompt = images.shape[0] // len(prompts)
    grid = to_grid_image(images, nrow=per_prompt)
    row_height = grid.height // len(prompts)
    canvas = Image.new("RGB", (LABEL_WIDTH + grid.width, grid.height), "white")
    canvas.paste(grid, (LABEL_WIDTH, 0))
    draw = ImageDraw.Draw(canvas)
    max_lines = max(1, (row_height - 4) // LINE_HEIGHT)
    for row, prompt in enumerate(prompts):
        lines = textwrap.wrap(prompt, CHARS_PER_LINE, max_lines=max_lines, placeholder=" ...") or [""]
        for k, line in enumerate(lines):
            draw.text((4, row * row_height + 4 + k * LINE_HEIGHT), line, fill="black")
    return canvas
