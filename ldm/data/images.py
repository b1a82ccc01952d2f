"""Robust loading of real-world photos for the personalization dataset.

Phone and camera photos come in many shapes: EXIF-rotated JPEGs, PNGs with alpha, palette GIFs,
CMYK JPEGs, 16-bit grayscale scans. ``load_rgb`` turns every one of them into an upright 8-bit RGB
image; ``scan_image_folder`` lists which files of a folder are usable and why the others are not.
Images are fully decoded at scan time (``Image.load``), so a truncated file is reported up front
instead of failing in the middle of training. ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_MAX_LISTED = 10


class DataRootError(ValueError):
    """The data folder is missing, is not a folder, or holds no usable image."""


class ImageReadError(ValueError):
    """A file could not be turned into an RGB image; ``reason`` is a short human-readable cause."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ScanResult:
    """Usable images of a folder (sorted by name) and the skipped entries with their reasons."""

    images: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def num_entries(self) -> int:
        return len(self.images) + len(self.skipped)

    def describe_skipped(self, limit: int = _MAX_LISTED) -> str:
        """``"a.txt (not an image), b.jpg (truncated)"``, cut after ``limit`` entries."""
        if not self.skipped:
            return "none"
        parts = [f"{path.name} ({reason})" for path, reason in self.skipped[:limit]]
        if len(self.skipped) > limit:
            parts.append(f"... and {len(self.skipped) - limit} more")
        return ", ".join(parts)


def _to_uint8_from_wide(img: Image.Image) -> Image.Image:
    """Scale a 16-bit integer (``I;16*``, ``I``) or float (``F``) image to 8-bit ``L``.

    Integer modes are read as 16-bit data (what PNG/TIFF decoders produce): 0..65535 -> 0..255.
    Float images are taken as 0..1 when their maximum is <= 1, else as 0..255, else as 0..65535.
    """
    arr = np.asarray(img).astype(np.float64)  # H x W
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    if img.mode == "F":
        peak = float(arr.max()) if arr.size else 0.0
        scale = 255.0 if peak <= 1.0 else (1.0 if peak <= 255.0 else 255.0 / 65535.0)
    else:
        arr = np.clip(arr, 0.0, 65535.0)
        scale = 255.0 / 65535.0
    return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent areas are composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "F":
        return _to_uint8_from_wide(img).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Fully decode ``path``, apply its EXIF orientation and return an upright 8-bit RGB image.

    Raises ``ImageReadError`` (with a short ``reason``) when the file is not a readable image.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # full decode: truncated or corrupt data fails here, not during training
            upright = ImageOps.exif_transpose(img)  # a new image, still valid after the file closes
            return to_rgb(upright)
    except UnidentifiedImageError as err:
        raise ImageReadError(path, "not an image") from err
    except Image.DecompressionBombError as err:
        raise ImageReadError(path, "too many pixels") from err
    except (OSError, ValueError, SyntaxError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        reason = "truncated" if "truncated" in message else f"unreadable: {message}"
        raise ImageReadError(path, reason) from err


def check_data_root(root: str | Path) -> Path:
    """Return ``root`` as a Path, raising ``DataRootError`` when it is missing or not a folder."""
    path = Path(root).expanduser()
    hint = "put 5-20 photos of one person in a folder and pass it as data_root"
    if not path.exists():
        raise DataRootError(f"data_root {path} does not exist: {hint}")
    if not path.is_dir():
        raise DataRootError(f"data_root {path} is not a directory: {hint}")
    return path


def _precheck(path: Path) -> str | None:
    """A reason to skip ``path`` without decoding it, or None when it should be decoded."""
    if path.name.startswith("."):
        return "hidden file"
    if path.is_symlink() and not path.exists():
        return "broken link"
    if path.is_dir():
        return "directory, not searched"
    if not path.is_file():
        return "not a regular file"
    if path.stat().st_size == 0:
        return "empty file"
    return None


def iter_image_folder(root: str | Path) -> Iterator[tuple[Path, Image.Image | None, str | None]]:
    """Yield ``(path, rgb_image, None)`` for usable files and ``(path, None, reason)`` for the others.

    Entries come sorted by name; one decoded image is alive at a time, so callers can downsize
    large photos as they go.
    """
    for path in sorted(check_data_root(root).iterdir()):
        reason = _precheck(path)
        if reason is not None:
            yield path, None, reason
            continue
        try:
            yield path, load_rgb(path), None
        except ImageReadError as err:
            yield path, None, err.reason


def scan_image_folder(root: str | Path) -> ScanResult:
    """Decode every file of ``root`` once and report which are usable images."""
    result = ScanResult()
    for path, image, reason in iter_image_folder(root):
        if image is None:
            result.skipped.append((path, reason))
        else:
            result.images.append(path)
    return result
