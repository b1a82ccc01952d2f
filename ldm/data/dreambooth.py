"""DreamBooth data: photos of the subject paired with class images for prior preservation.

Each item is a subject photo captioned ``a photo of a sks woman`` (:class:`PersonalizedBase` with
the identifier as placeholder and the class word) and, when ``reg_data_root`` is given, one class
image captioned ``a photo of a woman`` under the ``class_`` keys (``class_image``,
``class_caption``, ``class_image_index``, ``class_flipped``). Item ``k`` takes class image
``k % num_class_images``; class images flip with their own random draws.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ldm.data.images import DataRootError
from ldm.data.personalized import PersonalizedBase
from ldm.data.resumable import with_same_draw
from ldm.momentum import DEFAULT_IDENTIFIER

logger = logging.getLogger(__name__)

CLASS_PREFIX = "class_"  # batch keys of the class images (ldm.models.diffusion.prior_loss reads them)

# PersonalizedBase options that class images share with the subject photos (not the prompt options:
# class prompts are always 'a photo of a <class_word>', the prompt the class images were made with).
SHARED_IMAGE_OPTIONS = ("size", "interpolation", "flip_p", "set", "center_crop")


class DreamBoothDataset(PersonalizedBase):
    """Subject photos from ``data_root`` with the identifier; class images from ``reg_data_root``."""

    def __init__(self, data_root: str | Path, reg_data_root: str | Path | None = None,
                 placeholder_token: str = DEFAULT_IDENTIFIER, class_word: str | None = None, **kwargs: Any) -> None:
        if not class_word:
            raise ValueError("DreamBooth needs the subject's class word (e.g. --class_word woman): prompts read "
                             f"'a photo of a {placeholder_token} <class_word>'")
        super().__init__(data_root, placeholder_token=placeholder_token, class_word=class_word, **kwargs)
        self.class_images = self._load_class_images(Path(reg_data_root).expanduser(), class_word, kwargs) \
            if reg_data_root else None

    @staticmethod
    def _load_class_images(root: Path, class_word: str, options: dict[str, Any]) -> PersonalizedBase:
        hint = (f"generate them with scripts/make_class_images.py --ckpt <base.ckpt> --class_word {class_word} "
                f"--outdir {root} (or drop --reg_data_root to train without prior preservation)")
        if not root.is_dir():
            state = "is not a directory" if root.exists() else "does not exist"
            raise DataRootError(f"class images missing: reg_data_root {root} {state}; {hint}")
        shared = {key: options[key] for key in SHARED_IMAGE_OPTIONS if key in options}
        seed = options.get("seed")
        try:
            return PersonalizedBase(root, placeholder_token=class_word, repeats=1,
                                    seed=None if seed is None else seed + 1, **shared)
        except DataRootError as err:
            raise DataRootError(f"class images missing: no usable image in reg_data_root {root}; {hint}") from err

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        if self.class_images is not None:
            extra = self.class_images[with_same_draw(index, index % self.class_images.num_images)]
            item.update({CLASS_PREFIX + key: value for key, value in extra.items()})
        return item
