"""Training-prompt construction for personalization (the original code's "prompt engineering").

A prompt is a template with ``{}`` replaced by the subject: the placeholder token (``*``), or
``* woman`` when a class word is given, optionally preceded by a coarse class text as in textual
inversion. With probability ``descriptive_p`` each descriptive word is appended, comma-separated.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ldm.modules.embedding_manager import PER_IMAGE_TOKENS

DEFAULT_TEMPLATE = "a photo of a {}"

# The object templates of the textual-inversion paper ("imagenet_templates_small").
IMAGENET_TEMPLATES_SMALL: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

# Textual inversion's "dual" templates: the subject, then a per-image token.
IMAGENET_DUAL_TEMPLATES_SMALL: tuple[str, ...] = tuple(t + " with {}" for t in IMAGENET_TEMPLATES_SMALL)
DEFAULT_DUAL_TEMPLATE = DEFAULT_TEMPLATE + " with {}"

# Descriptive words for human photos. The original code extracted its list by hand from PromptHero and did
# not publish it; this list is a reconstruction of the same kind (quality, lighting and camera
# words common in human-photo prompts), deliberately free of words that describe the person's looks
# (eye colour, ethnicity), which the original code found to bias the results.
DESCRIPTIVE_WORDS: tuple[str, ...] = (
    "highly detailed",
    "sharp focus",
    "8k",
    "realistic",
    "photorealistic",
    "professional photography",
    "soft lighting",
    "detailed face",
    "symmetrical face",
    "natural skin",
    "beautiful",
    "studio lighting",
    "bokeh",
    "depth of field",
    "dslr",
    "film grain",
    "cinematic",
    "portrait",
    "high resolution",
    "natural lighting",
)


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


@dataclass(frozen=True)
class PromptBuilder:
    """Draws training captions; all randomness comes from the ``random.Random`` passed in."""

    placeholder_token: str = "*"
    class_word: str | None = None
    coarse_class_text: str | None = None
    use_random_prompt: bool = False
    descriptive_p: float = 0.0
    per_image_tokens: bool = False
    mixing_prob: float = 0.25
    descriptive_words: tuple[str, ...] = DESCRIPTIVE_WORDS

    def __post_init__(self) -> None:
        if not self.placeholder_token or not self.placeholder_token.strip():
            raise ValueError("placeholder_token must be a non-empty string such as '*'")
        _check_probability("descriptive_p", self.descriptive_p)
        _check_probability("mixing_prob", self.mixing_prob)

    @property
    def subject(self) -> str:
        """What replaces ``{}``: ``[coarse ]* [class_word]``."""
        parts = [self.coarse_class_text, self.placeholder_token, self.class_word]
        return " ".join(p for p in parts if p)

    def check_num_images(self, num_images: int) -> None:
        """Raise when per-image tokens are on and there are more images than tokens."""
        if self.per_image_tokens and num_images > len(PER_IMAGE_TOKENS):
            raise ValueError(
                f"per_image_tokens supports at most {len(PER_IMAGE_TOKENS)} images, got {num_images}: "
                "use fewer images or set per_image_tokens=False"
            )

    def build(self, rng: random.Random, image_index: int) -> str:
        """One caption for image ``image_index``."""
        if self.per_image_tokens and rng.random() < self.mixing_prob:
            template = rng.choice(IMAGENET_DUAL_TEMPLATES_SMALL) if self.use_random_prompt else DEFAULT_DUAL_TEMPLATE
            text = template.format(self.subject, PER_IMAGE_TOKENS[image_index % len(PER_IMAGE_TOKENS)])
        else:
            template = rng.choice(IMAGENET_TEMPLATES_SMALL) if self.use_random_prompt else DEFAULT_TEMPLATE
            text = template.format(self.subject)
        if self.descriptive_p > 0.0:
            words = [w for w in self.descriptive_words if rng.random() < self.descriptive_p]
            if words and text.endswith(self.placeholder_token):
                text += " "  # "* , 8k": CLIP reads "*," as one token, which would drop the placeholder
            text = ", ".join([text, *words])
        return text

    def describe(self) -> str:
        """A one-line description of the prompt mode, for the dataset summary."""
        templates = (
            f"random of {len(IMAGENET_TEMPLATES_SMALL)} TI templates" if self.use_random_prompt
            else f"'{DEFAULT_TEMPLATE}'"
        )
        text = f"{templates} with {{}} = '{self.subject}'"
        if self.per_image_tokens:
            text += f", per-image tokens with mixing_prob={self.mixing_prob}"
        if self.descriptive_p > 0.0:
            text += f", descriptive_p={self.descriptive_p} over {len(self.descriptive_words)} words"
        return text
