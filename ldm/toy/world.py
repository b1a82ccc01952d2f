"""A procedural world in which personalization can be seen to learn (see ``docs/toy_benchmark.md``).

A *subject* is the analogue of a person: an identity made of four features that no single word
names (body shape, body colour, inner pattern, accessory). A *pose* places it on the canvas
(size, position, rotation, mirror) and a *context* is the background colour. Every content word of
the vocabulary is one CLIP token, and captions read like SD v1 prompts:
``a photo of a small red striped round toy with a hat on a pink background``; ``toy`` is the class
word (the analogue of ``woman``).

Everything is drawn from a seed: :func:`render` is a pure function of (subject, pose, context,
resolution), anti-aliased by supersampling. A fixed pool of subjects is held out of pretraining
(:data:`HELD_OUT_POOL_SIZE` of them, chosen by :data:`WORLD_SEED`); the benchmark draws its subjects
from that pool.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

CLASS_WORD = "toy"
SHAPES: tuple[str, ...] = ("round", "square", "triangle", "diamond")
BODY_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (40, 165, 55), "blue": (35, 75, 215),
    "yellow": (235, 210, 35), "purple": (135, 55, 185), "orange": (245, 130, 25),
}
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted")
ACCESSORIES: tuple[str, ...] = ("none", "hat", "horns")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (238, 238, 238), "black": (22, 22, 22), "gray": (128, 128, 128),
    "pink": (245, 165, 205), "brown": (115, 75, 35),
}
SIZES: dict[str, float] = {"small": 0.17, "large": 0.27}  # body radius as a fraction of the side
POSITIONS: dict[str, float] = {"left": 0.28, "center": 0.5, "right": 0.72}  # x of the centre
ACCESSORY_COLOUR = (0, 185, 185)  # teal: differs from every body and background colour
LIGHT_BODIES = ("yellow", "orange")  # their pattern is drawn dark, the others' light
MAX_ROTATION_DEG = 20.0  # beyond 45 degrees a square would be a diamond

IDENTITY_FEATURES = ("shape", "colour", "pattern", "accessory")
WORLD_SEED = 2024
HELD_OUT_POOL_SIZE = 24
SUPERSAMPLE = 4


@dataclass(frozen=True, order=True)
class Subject:
    """An identity: the four features a judge must all get right to name the subject."""

    shape: str
    colour: str
    pattern: str
    accessory: str

    def __post_init__(self) -> None:
        for name, value, allowed in zip(IDENTITY_FEATURES, self.features(), (SHAPES, BODY_COLOURS, PATTERNS,
                                                                              ACCESSORIES)):
            if value not in allowed:
                raise ValueError(f"unknown {name} '{value}': use one of {sorted(allowed)}")

    def features(self) -> tuple[str, str, str, str]:
        return (self.shape, self.colour, self.pattern, self.accessory)

    @property
    def name(self) -> str:
        """A file-system-friendly id, e.g. ``red-striped-round-hat``."""
        return f"{self.colour}-{self.pattern}-{self.shape}-{self.accessory}"

    def describe(self) -> str:
        """The full caption phrase: ``red striped round toy with a hat``."""
        words = [self.colour, *([] if self.pattern == "plain" else [self.pattern]), self.shape, CLASS_WORD]
        return " ".join(words) + accessory_phrase(self.accessory)


@dataclass(frozen=True)
class Pose:
    size: str
    position: str
    rotation_deg: float
    mirror: bool
    jitter: tuple[float, float, float]  # dx, dy, relative radius change


@dataclass(frozen=True)
class Scene:
    subject: Subject
    pose: Pose
    background: str

    def labels(self) -> dict[str, str]:
        """Ground truth of every question the judge answers."""
        return {**asdict(self.subject), "background": self.background, "size": self.pose.size,
                "position": self.pose.position}


QUESTIONS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": tuple(BODY_COLOURS), "pattern": PATTERNS, "accessory": ACCESSORIES,
    "background": tuple(BACKGROUNDS), "size": tuple(SIZES), "position": tuple(POSITIONS),
}


def accessory_phrase(accessory: str) -> str:
    return {"none": "", "hat": " with a hat", "horns": " with horns"}[accessory]


def all_subjects() -> list[Subject]:
    return [Subject(*combo) for combo in itertools.product(SHAPES, BODY_COLOURS, PATTERNS, ACCESSORIES)]


def held_out_pool() -> list[Subject]:
    """The subjects that never appear in pretraining, in a fixed order (the benchmark takes the first ones)."""
    subjects = all_subjects()
    return random.Random(WORLD_SEED).sample(subjects, HELD_OUT_POOL_SIZE)


def pretraining_subjects() -> list[Subject]:
    held_out = set(held_out_pool())
    return [s for s in all_subjects() if s not in held_out]


def held_out_subject(subject_seed: int) -> Subject:
    """Held-out subject number ``subject_seed`` (0-based index into :func:`held_out_pool`)."""
    pool = held_out_pool()
    if not 0 <= subject_seed < len(pool):
        raise ValueError(f"subject seed {subject_seed} does not exist: held-out subjects are numbered 0 to "
                         f"{len(pool) - 1}")
    return pool[subject_seed]


def random_pose(rng: random.Random, size: str | None = None, position: str | None = None) -> Pose:
    size = size or rng.choice(tuple(SIZES))
    if position is None:
        position = rng.choice(tuple(POSITIONS)) if size == "small" else "center"
    jitter = (rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03), rng.uniform(-0.08, 0.08))
    return Pose(size, position, rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG), rng.random() < 0.5, jitter)


# ----------------------------------------------------------------------------------- rendering
def _body_frame(side: int, pose: Pose) -> tuple[np.ndarray, np.ndarray, float]:
    """Body-frame coordinates (u, v) of every pixel centre (v points down, radius 1) and the radius."""
    radius = SIZES[pose.size] * (1.0 + pose.jitter[2]) * side
    cx = (POSITIONS[pose.position] + pose.jitter[0]) * side
    cy = (0.56 + pose.jitter[1]) * side  # below the middle: room for a hat
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    theta = np.deg2rad(pose.rotation_deg)
    dx, dy = x - cx, y - cy
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / radius
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / radius
    return (-u if pose.mirror else u), v, radius


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == "round":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if shape == "diamond":
        return np.abs(u) / 0.8 + np.abs(v) <= 1.0
    return (v <= 0.75) & (np.abs(u) <= (v + 1.0) * 0.62)  # triangle, apex up


SHAPE_TOP = {"round": -1.0, "square": -0.85, "diamond": -1.0, "triangle": -1.0}
DOTS = ((-0.4, -0.3), (0.35, -0.35), (0.0, 0.1), (-0.35, 0.45), (0.4, 0.4))


def _pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if pattern == "striped":
        return np.floor((v + 2.0) / 0.3).astype(int) % 2 == 0
    if pattern == "dotted":
        return np.any([(u - a) ** 2 + (v - b) ** 2 <= 0.17 ** 2 for a, b in DOTS], axis=0)
    return np.zeros_like(u, dtype=bool)


def _accessory_mask(accessory: str, top: float, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if accessory == "hat":
        brim = (np.abs(u) <= 0.7) & (v >= top - 0.15) & (v <= top + 0.02)
        crown = (np.abs(u) <= 0.4) & (v >= top - 0.65) & (v < top - 0.15)
        return brim | crown
    if accessory == "horns":
        height = top + 0.1 - v  # 0 at the horn base, grows upwards
        return np.any([(height >= 0) & (height <= 0.6) & (np.abs(u - c) <= 0.2 * (1 - height / 0.6))
                       for c in (-0.45, 0.45)], axis=0)
    return np.zeros_like(u, dtype=bool)


def render(scene: Scene, resolution: int = 32) -> Image.Image:
    """The scene as an RGB image of ``resolution`` pixels a side (drawn at 4x, then box-filtered)."""
    side = resolution * SUPERSAMPLE
    u, v, _ = _body_frame(side, scene.pose)
    subject = scene.subject
    canvas = np.empty((side, side, 3), dtype=np.float32)
    canvas[:] = BACKGROUNDS[scene.background]
    body = _shape_mask(subject.shape, u, v)
    canvas[body] = BODY_COLOURS[subject.colour]
    pattern_colour = (25, 25, 25) if subject.colour in LIGHT_BODIES else (245, 245, 245)
    canvas[body & _pattern_mask(subject.pattern, u, v)] = pattern_colour
    canvas[_accessory_mask(subject.accessory, SHAPE_TOP[subject.shape], u, v) & ~body] = ACCESSORY_COLOUR
    # box filter: [side, side, 3] -> [res, S, res, S, 3] -> mean over each S x S block
    small = canvas.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(small + 0.5, 0, 255).astype(np.uint8), "RGB")


# ------------------------------------------------------------------------------------ captions
def caption(scene: Scene, rng: random.Random, template: str = "a photo of a {}", p_word: float = 0.6,
            full_p: float = 0.0) -> str:
    """A pretraining caption: the class word with a random subset of the scene's words.

    With probability ``full_p`` the subject is named in full (``Subject.describe``, as the benchmark's
    full-description prompt does), so that a caption naming every identity feature means exactly that
    subject; size and background are still named at random.
    """
    subject, pose = scene.subject, scene.pose
    if full_p > 0 and rng.random() < full_p:
        phrase = subject.describe()
        if rng.random() < p_word:
            phrase = f"{pose.size} {phrase}"
        if rng.random() < p_word:
            phrase += f" on a {scene.background} background"
        return template.format(phrase)
    words = []
    for word in (pose.size, subject.colour, subject.pattern, subject.shape):
        if rng.random() < (p_word / 2 if word == "plain" else p_word):
            words.append(word)
    phrase = " ".join([*words, CLASS_WORD])
    if subject.accessory != "none" and rng.random() < p_word:
        phrase += accessory_phrase(subject.accessory)
    if rng.random() < p_word:
        phrase += f" on a {scene.background} background"
    if pose.size == "small" and rng.random() < p_word:
        phrase += f" {position_phrase(pose.position)}"
    return template.format(phrase)


def position_phrase(position: str) -> str:
    return "in the center" if position == "center" else f"on the {position}"

