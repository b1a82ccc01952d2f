"""Datasets and photo folders of the toy world (:mod:`ldm.toy.world`).

``ToyScenes`` is the pretraining set: a fixed list of random scenes of the non-held-out subjects,
captioned anew at every draw (a random subset of the scene's words, random TI templates, and empty
captions with probability ``caption_dropout`` so the model learns the unconditional branch of
classifier-free guidance). Items carry ``image_index`` so the latent cache encodes each scene once.

:func:`write_photo_folder` writes a held-out subject's "photos", like a user's folder: a few images
in varied poses but in only the contexts of :data:`PHOTO_BACKGROUNDS`, so that prompts asking for
other backgrounds or a small size are real edits.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ldm.data.prompts import IMAGENET_TEMPLATES_SMALL
from ldm.data.resumable import ItemRandom
from ldm.util import atomic_write
from ldm.toy.world import (
    Scene, Subject, caption, held_out_subject, pretraining_subjects, random_pose, render, BACKGROUNDS,
)

logger = logging.getLogger(__name__)

PHOTO_BACKGROUNDS = ("white", "gray")
PHOTO_SIZE = "large"
PHOTO_RESOLUTION = 64


def scene_list(num_scenes: int, seed: int) -> list[Scene]:
    """``num_scenes`` random scenes of the pretraining subjects (never a held-out one)."""
    rng = random.Random(seed)
    subjects = pretraining_subjects()
    return [Scene(rng.choice(subjects), random_pose(rng), rng.choice(tuple(BACKGROUNDS))) for _ in range(num_scenes)]


class ToyScenes(Dataset):
    """Pretraining images of the toy world: items ``{"image", "caption", "image_index", "flipped"}``."""

    def __init__(self, size: int = 64, num_scenes: int = 16384, seed: int = 0, caption_dropout: float = 0.1,
                 p_word: float = 0.6, random_template_p: float = 0.5, crop: int | None = None,
                 full_caption_p: float = 0.0) -> None:
        super().__init__()
        for name, value in (("caption_dropout", caption_dropout), ("full_caption_p", full_caption_p)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.full_caption_p = full_caption_p
        self.size = size
        self.seed = seed
        self.caption_dropout = caption_dropout
        self.p_word = p_word
        self.random_template_p = random_template_p
        if crop is not None and not 0 < crop <= size:
            raise ValueError(f"crop must be between 1 and size={size}, got {crop}")
        self.crop = crop
        self.scenes = scene_list(num_scenes, seed)
        self._pixels: dict[int, np.ndarray] = {}
        self._random = ItemRandom(seed)
        logger.info("Toy world: %d scenes of %d subjects at %d px", num_scenes, len(pretraining_subjects()), size)

    def __len__(self) -> int:
        return len(self.scenes)

    def image(self, index: int) -> np.ndarray:
        """Scene ``index`` as float32 H x W x 3 in [-1, 1] (rendered once, then kept)."""
        if index not in self._pixels:
            self._pixels[index] = np.asarray(render(self.scenes[index], self.size))
        return self._pixels[index].astype(np.float32) / 127.5 - 1.0

    def caption(self, index: int, rng: random.Random) -> str:
        if rng.random() < self.caption_dropout:
            return ""
        template = rng.choice(IMAGENET_TEMPLATES_SMALL) if rng.random() < self.random_template_p else "a photo of a {}"
        return caption(self.scenes[index], rng, template, self.p_word, self.full_caption_p)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self._random.for_index(index)
        if self.crop is not None:  # random square crops: cheap steps for a fully convolutional autoencoder
            top, left = rng.randrange(self.size - self.crop + 1), rng.randrange(self.size - self.crop + 1)
            return {"image": self.image(index)[top:top + self.crop, left:left + self.crop]}
        return {"image": self.image(index), "caption": self.caption(index, rng), "image_index": index,
                "flipped": False}


def write_photo_folder(subject_seed: int, folder: str | Path, num_photos: int = 12, seed: int = 0) -> Subject:
    """Write held-out subject ``subject_seed``'s photos (PNG) into ``folder``; returns the subject."""
    if not 5 <= num_photos <= 20:
        raise ValueError(f"a photo folder holds 5 to 20 photos, got {num_photos}")
    subject = held_out_subject(subject_seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"photos/{subject_seed}/{seed}")
    for i in range(num_photos):
        scene = Scene(subject, random_pose(rng, size=PHOTO_SIZE), PHOTO_BACKGROUNDS[i % len(PHOTO_BACKGROUNDS)])
        photo = render(scene, PHOTO_RESOLUTION)
        # atomic: a benchmark running beside this one may be training on the same folder
        atomic_write(folder / f"{i:02d}.png", lambda tmp: photo.save(tmp, format="PNG"))
    return subject
