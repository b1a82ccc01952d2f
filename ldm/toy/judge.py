"""The toy world's judge: a small CNN that reads every ground-truth question off an image.

It is trained on fresh renders of the generator (:mod:`ldm.toy.world`), never on diffusion
samples, with blur, noise and colour jitter so that it tolerates what a small autoencoder's decoder
does to edges and colours. Besides one head per question (shape, colour, pattern, accessory,
background, size, position) it has a presence head trained on subject-free images, so a sample
can be judged "no subject". A sample shows subject ``s`` when a subject is present and all four
identity answers equal ``s``'s features.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm.toy.world import (
    BACKGROUNDS, IDENTITY_FEATURES, QUESTIONS, Scene, Subject, all_subjects, random_pose, render,
)

logger = logging.getLogger(__name__)

RESOLUTION = 64
ABSENT_P = 0.1  # fraction of training images without a subject


class UnknownQuestionError(ValueError):
    """A question (attribute) the judge was not trained to answer."""


def check_question(name: str) -> None:
    if name not in QUESTIONS:
        raise UnknownQuestionError(f"the judge knows no attribute '{name}': ask one of {', '.join(QUESTIONS)}")


class ToyJudge(nn.Module):
    """Images [B, 3, 64, 64] in [-1, 1] -> logits per question and a presence logit."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for out in (width, 2 * width, 4 * width, 4 * width):  # 64 -> 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.SiLU()]
            channels = out
        self.features = nn.Sequential(*layers, nn.Flatten())  # [B, 4w * 4 * 4]
        hidden = 8 * width
        self.trunk = nn.Sequential(nn.Linear(channels * 16, hidden), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(values)) for name, values in QUESTIONS.items()})
        self.presence = nn.Linear(hidden, 1)

    def forward(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        h = self.trunk(self.features(images))
        return {name: head(h) for name, head in self.heads.items()}, self.presence(h)[:, 0]


@dataclass
class Verdict:
    """The judge's answers for one image."""

    present: bool
    answers: dict[str, str]

    def subject(self) -> Subject | None:
        """The subject shown, or None when the judge sees none."""
        return Subject(*(self.answers[f] for f in IDENTITY_FEATURES)) if self.present else None

    def shows(self, subject: Subject) -> bool:
        return self.subject() == subject


def to_tensor(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 H x W x 3 images -> float [B, 3, H, W] in [-1, 1]."""
    array = np.stack(list(images)).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def judge(model: ToyJudge, images: torch.Tensor, batch_size: int = 256) -> list[Verdict]:
    """Verdicts for images [B, 3, 64, 64] in [-1, 1] (other sizes are resized)."""
    model.eval()
    if images.shape[-1] != RESOLUTION:
        images = F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True,
                               align_corners=False)
    verdicts = []
    for chunk in images.float().split(batch_size):
        logits, presence = model(chunk)
        answers = {name: logit.argmax(1).tolist() for name, logit in logits.items()}
        for i, present in enumerate((presence > 0).tolist()):
            verdicts.append(Verdict(present, {name: QUESTIONS[name][answers[name][i]] for name in QUESTIONS}))
    return verdicts


# ----------------------------------------------------------------------------------- training
def _absent_image(rng: random.Random) -> np.ndarray:
    """A subject-free training image: a background, sometimes with a smooth colour blob."""
    image = np.empty((RESOLUTION, RESOLUTION, 3), np.float32)
    image[:] = BACKGROUNDS[rng.choice(tuple(BACKGROUNDS))]
    if rng.random() < 0.5:
        y, x = np.mgrid[0:RESOLUTION, 0:RESOLUTION]
        cx, cy, r = rng.uniform(10, 54), rng.uniform(10, 54), rng.uniform(4, 16)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        colour = np.array([rng.uniform(0, 255) for _ in range(3)], np.float32)
        image = image * (1 - blob) + colour * blob
    return image.clip(0, 255).astype(np.uint8)


def render_training_set(count: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """``count`` labelled images: (images [N, 3, 64, 64], labels per question [N], presence [N])."""
    rng = random.Random(f"judge/{seed}")
    subjects = all_subjects()
    images, labels, present = [], {name: [] for name in QUESTIONS}, []
    for _ in range(count):
        if rng.random() < ABSENT_P:
            images.append(_absent_image(rng))
            present.append(0.0)
            for name in QUESTIONS:
                labels[name].append(-100)  # ignored by cross_entropy
            continue
        scene = Scene(rng.choice(subjects), random_pose(rng), rng.choice(tuple(BACKGROUNDS)))
        images.append(np.asarray(render(scene, RESOLUTION)))
        present.append(1.0)
        for name, value in scene.labels().items():
            labels[name].append(QUESTIONS[name].index(value))
    return (to_tensor(images), {k: torch.tensor(v) for k, v in labels.items()}, torch.tensor(present))


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, brightness/colour jitter and pixel noise, per image."""
    b = images.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = rand(b, 1, 1, 1) * 0.8
    images = images * (1 - mix) + blurred * mix
    images = images * (1 + (rand(b, 3, 1, 1) - 0.5) * 0.12) + (rand(b, 3, 1, 1) - 0.5) * 0.12
    images = images + torch.randn(images.shape, generator=generator) * rand(b, 1, 1, 1) * 0.08
    return images.clamp(-1, 1)


def train_judge(num_images: int = 24000, epochs: int = 4, seed: int = 0, batch_size: int = 128) -> ToyJudge:
    """A judge trained from scratch on fresh renders (about 3 minutes on 2 CPU cores)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels, present = render_training_set(num_images, seed)
    model = ToyJudge()
    steps = epochs * (num_images // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    model.train()
    for step in range(steps):
        index = torch.randint(0, num_images, (batch_size,), generator=generator)
        logits, presence = model(augment(images[index], generator))
        loss = F.binary_cross_entropy_with_logits(presence, present[index])
        for name, logit in logits.items():
            loss = loss + F.cross_entropy(logit, labels[name][index], ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            logger.info("judge step %d/%d: loss %.4f", step + 1, steps, loss.item())
    return model.eval()


def accuracy(model: ToyJudge, num_images: int = 2000, seed: int = 1, subjects: Sequence[Subject] | None = None,
             augmented: bool = True) -> dict[str, float]:
    """Per-question accuracy on fresh renders (``seed`` differs from training), plus presence."""
    rng = random.Random(f"judge-eval/{seed}")
    subjects = list(subjects or all_subjects())
    scenes = [Scene(rng.choice(subjects), random_pose(rng), rng.choice(tuple(BACKGROUNDS)))
              for _ in range(num_images)]
    images = to_tensor([np.asarray(render(s, RESOLUTION)) for s in scenes])
    if augmented:
        images = augment(images, torch.Generator().manual_seed(seed))
    verdicts = judge(model, images)
    result = {name: float(np.mean([v.answers[name] == s.labels()[name] for v, s in zip(verdicts, scenes)]))
              for name in QUESTIONS}
    result["identity"] = float(np.mean([v.shows(s.subject) for v, s in zip(verdicts, scenes)]))
    absent = to_tensor([_absent_image(rng) for _ in range(num_images // 4)])
    result["presence"] = float(np.mean([v.present for v in verdicts] + [not v.present for v in judge(model, absent)]))
    return result


def load_judge(path: str | Path) -> ToyJudge:
    """The judge saved at ``path`` (a safetensors file written by ``scripts/toy_pretrain.py``)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"toy judge {path} not found: build it with `python scripts/toy_pretrain.py`")
    model = ToyJudge()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
