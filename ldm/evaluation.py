"""Identity and prompt-fidelity metrics for generated images (used by scripts/evaluate_identity.py).

Identity: dlib's face-recognition ResNet gives a 128-d descriptor per face
(:class:`ldm.data.face.FaceEncoder`); a generated face's distance to the reference set is its mean
Euclidean distance to the reference descriptors, and distances under 0.6 count as the same person
(dlib's threshold). CLIP: the textual-inversion paper's evaluation (Gal et al. 2022, sec. 4):
image-image similarity is the mean cosine between CLIP image embeddings of generated and reference
images; text-image similarity is the mean cosine between generated images and the prompt with the
placeholder replaced by its class word. CLIP weights come only from a local file or the clip cache.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import statistics
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ldm.data.face import FaceEncoder
from ldm.data.images import load_rgb, scan_image_folder

logger = logging.getLogger(__name__)

SAME_PERSON_THRESHOLD = 0.6
DEFAULT_CLIP_MODEL = "ViT-B/32"
CLIP_CACHE = Path("~/.cache/clip")


def folder_images(folder: str | os.PathLike[str], role: str) -> list[Path]:
    """The readable images of ``folder`` (sorted); an error naming the folder when there are none."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{role} folder {path} does not exist or is not a folder")
    scan = scan_image_folder(path)
    if not scan.images:
        raise ValueError(f"{role} folder {path} holds no readable image (skipped: {scan.describe_skipped()})")
    if scan.skipped:
        logger.info("%s: skipped %s", path, scan.describe_skipped())
    return scan.images


def iter_images(paths: Sequence[Path]) -> Iterator[tuple[Path, Image.Image]]:
    for path in paths:
        yield path, load_rgb(path)


def identity_metrics(descriptors: Sequence[np.ndarray | None], references: Sequence[np.ndarray],
                     threshold: float = SAME_PERSON_THRESHOLD) -> dict[str, Any]:
    """Detection rate and distances of the detected faces to the reference set (mean over references)."""
    found = [d for d in descriptors if d is not None]
    result: dict[str, Any] = {"images": len(descriptors), "faces": len(found),
                              "detection_rate": len(found) / len(descriptors) if descriptors else None,
                              "mean_distance": None, "median_distance": None, "fraction_under_threshold": None}
    if found:
        refs = np.stack(references)  # [R, 128]
        distances = [float(np.linalg.norm(refs - d, axis=1).mean()) for d in found]
        result.update(mean_distance=float(np.mean(distances)), median_distance=float(statistics.median(distances)),
                      fraction_under_threshold=sum(x < threshold for x in distances) / len(distances))
    return result


class NoReferenceFaceError(ValueError):
    """None of the reference photos shows a face that dlib finds."""


class IdentityScorer:
    """Identity metrics of images against the reference photos of one person.

    The one implementation behind ``scripts/evaluate_identity.py`` and the identity score of a
    training run's validation samples; dlib's models load once, on the first image.
    """

    def __init__(self, encoder: FaceEncoder, reference_descriptors: Sequence[np.ndarray | None], *, source: str,
                 threshold: float = SAME_PERSON_THRESHOLD):
        self.encoder = encoder
        self.threshold = threshold
        self.references = [d for d in reference_descriptors if d is not None]
        if not self.references:
            raise NoReferenceFaceError(
                f"no face found in any of the {len(reference_descriptors)} reference photos in {source}; "
                "pass photos where the face is visible (or try the cnn detector)")

    @classmethod
    def from_photos(cls, paths: Sequence[Path], *, source: str, detector: str = "hog",
                    threshold: float = SAME_PERSON_THRESHOLD) -> IdentityScorer:
        """A scorer whose reference set is the faces of the photos at ``paths``."""
        encoder = FaceEncoder(detector=detector)
        return cls(encoder, [encoder.descriptor(image) for _, image in iter_images(paths)], source=source,
                   threshold=threshold)

    def metrics(self, descriptors: Sequence[np.ndarray | None]) -> dict[str, Any]:
        """:func:`identity_metrics` of ``descriptors`` against the reference set."""
        return identity_metrics(descriptors, self.references, self.threshold)

    def score(self, images: Iterable[Image.Image]) -> dict[str, Any]:
        """Detection rate and distances of ``images`` (one descriptor each) to the reference set."""
        return self.metrics([self.encoder.descriptor(image) for image in images])


def text_for_clip(prompt: str, placeholder: str, class_word: str) -> str:
    """The prompt with the placeholder replaced by the class word ("photo of * woman" -> "photo of woman")."""
    text = prompt.replace(placeholder, class_word)
    repeated = rf"\b({re.escape(class_word)})(\s+\1\b)+"  # "* woman" with class word woman
    return " ".join(re.sub(repeated, r"\1", text, flags=re.IGNORECASE).split())


def find_clip_weights(clip_model: str | None) -> tuple[Path | None, str]:
    """A local CLIP weights file for ``clip_model`` (a path or a clip model name), or None and what was tried."""
    import clip

    name = clip_model or DEFAULT_CLIP_MODEL
    if Path(name).expanduser().is_file():
        return Path(name).expanduser(), name
    models = clip.clip._MODELS  # name -> download URL; the cache file is the URL's last component
    if name not in models:
        return None, f"{name} is neither a file nor one of {sorted(models)}"
    cached = CLIP_CACHE.expanduser() / os.path.basename(models[name])
    return (cached, str(cached)) if cached.is_file() else (None, f"no {cached}; pass --clip_model <file.pt>")


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation (its training statistics)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP's image preprocessing on tensors, with kornia: [B, 3, H, W] in [0, 1] -> [B, 3, size, size].

    The short side is resized to ``size`` (bicubic, antialiased), the centre cropped and the colours
    normalised, as the clip package does on PIL images (and LDM's CLIP image embedder on tensors).
    """
    import kornia

    images = kornia.geometry.transform.resize(images, size, side="short", interpolation="bicubic",
                                              antialias=True).clamp(0, 1)  # bicubic overshoots; PIL clips
    images = kornia.geometry.transform.center_crop(images, (size, size))
    mean, std = torch.tensor(CLIP_MEAN, device=images.device), torch.tensor(CLIP_STD, device=images.device)
    return kornia.enhance.normalize(images, mean, std)


@dataclass
class ClipScorer:
    """A CLIP model (its images preprocessed on tensors by :func:`clip_pixels`): unit-norm image and text embeddings."""

    model: Any
    device: torch.device
    path: Path

    @classmethod
    def load(cls, clip_model: str | None, device: torch.device) -> ClipScorer | None:
        """The scorer, or None (one log line saying why) when the weights are not on disk."""
        if importlib.util.find_spec("clip") is None:
            logger.warning("CLIP weights not found (the clip package is not installed): skipping CLIP metrics")
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # clip imports the deprecated pkg_resources
            import clip

        path, tried = find_clip_weights(clip_model)
        if path is None:
            logger.warning("CLIP weights not found (%s): skipping CLIP metrics", tried)
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # clip.load tries torch.jit.load first
                model, _ = clip.load(str(path), device=device, jit=False)  # its PIL transform: see clip_pixels
        except Exception as err:  # clip/torch raise many types for a file that is not a CLIP model
            raise ValueError(f"{path}: cannot load CLIP weights ({str(err).splitlines()[0][:200]}); "
                             "pass a CLIP .pt file from the clip package's cache") from None
        logger.info("CLIP weights: %s", path)
        return cls(model.eval(), device, path)

    @torch.no_grad()
    def image_embedding(self, image: Image.Image) -> torch.Tensor:
        rgb = torch.from_numpy(np.asarray(image.convert("RGB"))).to(self.device)  # [H, W, 3] uint8
        pixels = clip_pixels(rgb.permute(2, 0, 1)[None].float() / 255, self.model.visual.input_resolution)
        return torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)[0]  # [E]

    @torch.no_grad()
    def text_embedding(self, text: str) -> torch.Tensor:
        import clip

        tokens = clip.tokenize([text], truncate=True).to(self.device)  # [1, 77]
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)[0]


def clip_metrics(generated: Sequence[torch.Tensor], reference: Sequence[torch.Tensor],
                 text: torch.Tensor | None) -> dict[str, float | None]:
    """Mean cosine of generated vs reference image embeddings, and of generated images vs the text."""
    gen = torch.stack(list(generated))  # [G, E], unit rows
    ref = torch.stack(list(reference))  # [R, E]
    return {"clip_image_image": float((gen @ ref.T).mean()),
            "clip_text_image": None if text is None else float((gen @ text).mean())}


# ------------------------------------------------------------------------------------------ reports

TABLE_COLUMNS = [
    ("folder", "folder"), ("images", "images"), ("detection_rate", "face detection rate"),
    ("mean_distance", "mean distance"), ("median_distance", "median distance"),
    ("fraction_under_threshold", "fraction < threshold"), ("clip_image_image", "CLIP image-image"),
    ("clip_text_image", "CLIP text-image"),
]


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(rows: Sequence[dict[str, Any]], threshold: float = SAME_PERSON_THRESHOLD) -> str:
    """One row per generated folder."""
    titles = [title.replace("threshold", f"{threshold:g}") for _, title in TABLE_COLUMNS]
    lines = ["| " + " | ".join(titles) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(TABLE_COLUMNS) - 1)) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(key)).replace("|", "\\|") for key, _ in TABLE_COLUMNS) + " |"
              for row in rows]
    return "\n".join(lines) + "\n"


CHART_METRICS = [("detection_rate", "face detection rate", (66, 133, 244)),
                 ("fraction_under_threshold", "same person (< threshold)", (219, 68, 55)),
                 ("clip_image_image", "CLIP image-image", (244, 180, 0)),
                 ("clip_text_image", "CLIP text-image", (15, 157, 88))]


def bar_chart(rows: Sequence[dict[str, Any]], title: str) -> Image.Image:
    """Grouped bars (one group per folder) of the metrics in [0, 1]; drawn with PIL, no matplotlib needed."""
    bar, gap, plot_h, left, top, bottom = 22, 36, 300, 60, 50, 90
    metrics = [m for m in CHART_METRICS if any(row.get(m[0]) is not None for row in rows)]
    group_w = max(1, len(metrics)) * bar + gap
    width = max(left + len(rows) * group_w + 20, 520)
    image = Image.new("RGB", (width, top + plot_h + bottom + 18 * len(metrics)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 15), title, fill="black")
    for tick in range(0, 11, 2):  # y axis 0..1
        y = top + plot_h - tick * plot_h // 10
        draw.line([(left - 4, y), (width - 10, y)], fill=(220, 220, 220))
        draw.text((10, y - 6), f"{tick / 10:.1f}", fill="black")
    for g, row in enumerate(rows):
        x0 = left + g * group_w + gap // 2
        for k, (key, _, colour) in enumerate(metrics):
            value = row.get(key)
            if value is None:
                continue
            height = round(min(max(float(value), 0.0), 1.0) * plot_h)
            draw.rectangle([x0 + k * bar, top + plot_h - height, x0 + (k + 1) * bar - 3, top + plot_h], fill=colour)
        draw.text((x0, top + plot_h + 8), Path(str(row["folder"])).name[:18], fill="black")
    for k, (_, label, colour) in enumerate(metrics):
        y = top + plot_h + 40 + 18 * k
        draw.rectangle([left, y, left + 12, y + 12], fill=colour)
        draw.text((left + 20, y), label, fill="black")
    return image
