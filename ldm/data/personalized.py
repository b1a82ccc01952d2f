"""The personalization dataset: a few photos of one subject, captioned with the placeholder token.

Constructor keys follow textual inversion's ``PersonalizedBase`` plus the original code's prompt-engineering
keys (``class_word``, ``descriptive_p``, ``use_random_prompt``) and a ``seed``. All photos are
decoded once, cropped/resized and kept in memory, so ``__getitem__`` does no disk IO.

Randomness (flips, templates, descriptive words) comes from a per-dataset ``random.Random``, never
the global ``random`` module. In the main process it is seeded with ``seed``. Inside a DataLoader
worker it is re-seeded on first use from ``(seed, worker seed)``; torch derives the worker seed from
its own RNG for each worker and epoch, so workers draw different captions and runs are reproducible
when torch is seeded too (e.g. Lightning's ``seed_everything``). No ``worker_init_fn`` is needed.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ldm.data.images import DataRootError, ScanResult, check_data_root, iter_image_folder
from ldm.data.prompts import DESCRIPTIVE_WORDS, PromptBuilder
from ldm.data.resumable import ItemRandom

__all__ = ["PersonalizedBase", "BaseImages", "DataRootError"]

logger = logging.getLogger(__name__)

MIN_SIDE_DIVISOR = 4  # a photo's shorter side must be at least a quarter of the training size ...
MIN_SIDE_ORIGINAL_SIZE = 32  # ... or this many pixels when images keep their own size (size None)

INTERPOLATIONS = {
    "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class BaseImages(NamedTuple):
    """The resized training images and their mirror images, float [N, 3, H, W] in [-1, 1]."""

    images: torch.Tensor
    flipped: torch.Tensor


def _to_unit_range(img: Image.Image) -> np.ndarray:
    """uint8 RGB image -> float32 H x W x 3 array in [-1, 1]."""
    return np.asarray(img, dtype=np.float32) / 127.5 - 1.0


def default_min_image_side(size: int | None) -> int:
    """Photos whose shorter side is under this are skipped: a quarter of ``size``, or 32 px without a size."""
    return MIN_SIDE_ORIGINAL_SIZE if size is None else max(1, size // MIN_SIDE_DIVISOR)


class PersonalizedBase(Dataset):
    """Photos of one subject from ``data_root``, each item ``{"image", "caption", "image_index", "flipped"}``.

    ``len`` is ``num_images * repeats`` for ``set="train"`` and ``num_images`` otherwise; item ``k``
    shows image ``k % num_images``, flipped horizontally with probability ``flip_p``. Photos whose
    shorter side is under ``min_image_side`` (default: a quarter of ``size``, 32 px without a size)
    are skipped and listed with the other skipped files. A :class:`~ldm.data.resumable.DrawKey`
    index seeds the item's flip and caption from its draw number (exact resume).
    """

    def __init__(
        self,
        data_root: str | Path,
        size: int | None = None,
        repeats: int = 100,
        interpolation: str = "bicubic",
        flip_p: float = 0.5,
        set: str = "train",  # noqa: A002 - textual inversion's config key
        placeholder_token: str = "*",
        per_image_tokens: bool = False,
        center_crop: bool = False,
        mixing_prob: float = 0.25,
        coarse_class_text: str | None = None,
        class_word: str | None = None,
        descriptive_p: float = 0.0,
        descriptive_words: Sequence[str] | None = None,
        use_random_prompt: bool = False,
        seed: int | None = None,
        face_crops: Mapping[str, Any] | None = None,
        min_image_side: int | None = None,
    ) -> None:
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got '{interpolation}'")
        if size is not None and (not isinstance(size, int) or size <= 0):
            raise ValueError(f"size must be a positive integer (e.g. 512) or None, got {size!r}")
        if not isinstance(repeats, int) or repeats <= 0:
            raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be a probability in [0, 1], got {flip_p}")
        self.data_root = check_data_root(data_root)
        self.size = size
        self.min_image_side = default_min_image_side(size) if min_image_side is None else min_image_side
        self.repeats = repeats
        self.interpolation = interpolation
        self.flip_p = flip_p
        self.split = set
        self.center_crop = center_crop
        self.seed = seed
        self.prompts = PromptBuilder(
            placeholder_token=placeholder_token,
            class_word=class_word,
            coarse_class_text=coarse_class_text,
            use_random_prompt=use_random_prompt,
            descriptive_p=descriptive_p,
            descriptive_words=tuple(descriptive_words) if descriptive_words else DESCRIPTIVE_WORDS,
            per_image_tokens=per_image_tokens,
            mixing_prob=mixing_prob,
        )
        self.scan, self._images, self._num_upscaled = self._load_folder()
        self._mirrored = [ImageOps.mirror(img) for img in self._images]
        self.prompts.check_num_images(self.num_images)
        self._random = ItemRandom(seed)
        self._faces = self._prepare_faces(face_crops) if face_crops is not None else None
        logger.info(self.summary())

    # ----------------------------------------------------------------------------------- loading
    def _prepare(self, img: Image.Image) -> Image.Image:
        """Optional centre crop to a square (textual inversion's offsets), then resize."""
        if self.center_crop:
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
        if self.size is not None:
            img = img.resize((self.size, self.size), resample=INTERPOLATIONS[self.interpolation])
        return img

    def _load_folder(self) -> tuple[ScanResult, list[Image.Image], int]:
        scan, images, num_upscaled = ScanResult(), [], 0
        for path, image, reason in iter_image_folder(self.data_root):
            if image is None:
                scan.skipped.append((path, reason))
                continue
            if min(image.size) < self.min_image_side:
                scan.skipped.append((path, f"too small: {image.width}x{image.height}, the shorter side must be at "
                                           f"least {self.min_image_side} px"))
                continue
            if self.size is not None and min(image.size) < self.size:
                num_upscaled += 1
            scan.images.append(path)
            images.append(self._prepare(image))
        if not images:
            raise DataRootError(
                f"no usable images in {self.data_root}: found {scan.num_entries} files, "
                f"skipped: {scan.describe_skipped()} — put 5-20 photos of one person there"
            )
        return scan, images, num_upscaled

    def _prepare_faces(self, options: Mapping[str, Any]) -> list[tuple[Image.Image, Image.Image] | None]:
        """Aligned face crops (and their mirror images) per photo, via the cached dlib pipeline."""
        from ldm.data.face import FaceCropper, default_cache_dir, write_crops

        if self.size is None:
            raise ValueError("face crops need a training size: set size (e.g. 512)")
        options = dict(options)
        crops_dir = options.pop("crops_dir", None)
        options.setdefault("cache_dir", default_cache_dir())
        crops = FaceCropper(size=self.size, **options).prepare(self.image_paths)
        if crops_dir:
            write_crops(dict(zip(self.image_paths, crops)), crops_dir)
        if not any(crops):
            logger.warning("No face found in any of the %d photos: training continues without the facial loss "
                           "term (check the photos, or try --face_detector hog/cnn)", self.num_images)
        return [None if c is None else (c.image, ImageOps.mirror(c.image)) for c in crops]

    # ------------------------------------------------------------------------------- public API
    @property
    def num_images(self) -> int:
        return len(self._images)

    @property
    def image_paths(self) -> list[Path]:
        return list(self.scan.images)

    @property
    def skipped(self) -> list[tuple[Path, str]]:
        return list(self.scan.skipped)

    def base_images(self) -> BaseImages:
        """All images as prepared for training, un-flipped and flipped, float [N, 3, H, W] in [-1, 1]."""
        sizes = {img.size for img in self._images}
        if len(sizes) > 1:
            raise ValueError(f"training images have different sizes {sorted(sizes)}: set size (e.g. 512)")
        images = torch.stack([TF.pil_to_tensor(img) for img in self._images]).float() / 127.5 - 1.0
        flipped = torch.stack([TF.pil_to_tensor(img) for img in self._mirrored]).float() / 127.5 - 1.0
        return BaseImages(images=images, flipped=flipped)

    def summary(self) -> str:
        """A human-readable description of what the dataset will train on."""
        example = self.prompts.build(random.Random(self.seed), 0)
        size = "original" if self.size is None else f"{self.size}x{self.size}"
        lines = [
            f"PersonalizedBase({self.split}): {self.num_images} images from {self.data_root}, "
            f"{len(self)} items (repeats={self.repeats if self.split == 'train' else 1})",
            f"skipped {len(self.scan.skipped)}: {self.scan.describe_skipped()}",
            f"size {size} ({self.interpolation}, center_crop={self.center_crop}), flip_p={self.flip_p}"
            + (f", {self._num_upscaled} images smaller than size are upscaled" if self._num_upscaled else ""),
            f"prompts: {self.prompts.describe()}; example: '{example}'",
        ]
        if self._faces is not None:
            lines.append(f"faces: {sum(f is not None for f in self._faces)} of {self.num_images} photos have a "
                         "usable face (the others add no face term)")
        return "\n  ".join(lines)

    # --------------------------------------------------------------------------- torch Dataset
    def __len__(self) -> int:
        return self.num_images * self.repeats if self.split == "train" else self.num_images

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        image_index = index % self.num_images
        rng = self._random.for_index(index)
        flipped = rng.random() < self.flip_p
        image = self._mirrored[image_index] if flipped else self._images[image_index]
        item = {
            "image": _to_unit_range(image),  # H x W x 3, channels last like textual inversion
            "caption": self.prompts.build(rng, image_index),
            "image_index": image_index,
            "flipped": flipped,
        }
        if self._faces is not None:
            face = self._faces[image_index]
            item["has_face"] = face is not None
            item["face"] = (_to_unit_range(face[int(flipped)]) if face is not None
                            else np.zeros_like(item["image"]))
        return item
