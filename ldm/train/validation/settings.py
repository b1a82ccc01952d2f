"""What the validation of a training run samples, and how: read from ``lightning.validation`` and flags.

Config keys (all optional), with ``main.py`` flags that set them::

    lightning:
      validation:
        enabled: true            # --no_validation sets false
        prompts: [...]           # a list; '*' stands for the placeholder
        prompts_file: FILE       # --validation_prompts FILE: one prompt per line
        samples_per_prompt: 2
        ddim_steps: 10           # --validation_ddim_steps N
        scale: 7.5               # stable_txt2img.py's default guidance
        seed: 42                 # seed of the fixed starting noise
        identity: false          # --validation_identity (and --use_facial_loss) set true
        identity_detector: hog   # dlib detector of the identity score (evaluate_identity.py's default)

The default prompts are the training prompt ``a photo of a {}`` and three edits of it, with ``{}``
the training subject (``*``, or ``* woman`` with a class word).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ldm.data.prompts import DEFAULT_TEMPLATE
from ldm.sampling_io import DEFAULT_NEGATIVE_PROMPT, read_prompt_file

PLACEHOLDER_IN_FILES = "*"
VALIDATION_EDITS: tuple[str, ...] = (
    "a close-up portrait photo of a {} smiling",
    "an oil painting of a {}",
    "a photo of a {} in a city street at night",
)


def default_prompts(subject: str) -> list[str]:
    """The training prompt and three edits of it around ``subject`` (e.g. ``* woman``)."""
    return [template.format(subject) for template in (DEFAULT_TEMPLATE, *VALIDATION_EDITS)]


@dataclass(frozen=True)
class ValidationSettings:
    """Prompts, sampler settings and scoring of the validation samples (stable_txt2img.py's sampler)."""

    prompts: tuple[str, ...]
    samples_per_prompt: int = 2
    ddim_steps: int = 10
    scale: float = 7.5
    eta: float = 0.0
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    seed: int = 42
    identity: bool = False
    identity_detector: str = "hog"

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("validation prompts are empty: give at least one prompt")
        for key in ("samples_per_prompt", "ddim_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"validation {key} must be at least 1, got {getattr(self, key)}")
        if self.identity_detector not in ("hog", "cnn"):
            raise ValueError(f"validation identity_detector must be hog or cnn, got {self.identity_detector!r}")

    @property
    def num_samples(self) -> int:
        return len(self.prompts) * self.samples_per_prompt

    @classmethod
    def from_config(cls, node: Mapping[str, Any], *, subject: str, placeholder: str) -> ValidationSettings:
        """Settings from the ``lightning.validation`` node; ``*`` in given prompts becomes ``placeholder``."""
        options = dict(node)
        options.pop("enabled", None)
        unknown = sorted(set(options) - set(cls.__dataclass_fields__) - {"prompts_file"})
        if unknown:
            raise ValueError(f"unknown lightning.validation keys {unknown}; "
                             f"known: {sorted({*cls.__dataclass_fields__, 'prompts_file', 'enabled'})}")
        prompts_file = options.pop("prompts_file", None)
        given: Sequence[str] | None = options.pop("prompts", None)
        if prompts_file:
            try:
                given = read_prompt_file(prompts_file)
            except ValueError as err:
                raise ValueError(f"validation prompts: {err}") from None
        prompts = [p.replace(PLACEHOLDER_IN_FILES, placeholder) for p in given] if given else default_prompts(subject)
        return cls(prompts=tuple(prompts), **options)
