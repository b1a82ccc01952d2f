"""What the pretrained toy model draws from text alone: attribute words one at a time, and full descriptions.

Both probes sample the model without any embedding and let the judge read the samples; they bound what a
text-embedding method can reach through the same text path (docs/toy_world.md).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ldm.toy.benchmark import PLAIN_PROMPT, SAMPLER, sample
from ldm.toy.judge import ToyJudge, judge
from ldm.toy.world import CLASS_WORD, IDENTITY_FEATURES, Subject


def prompt_following(model, judge_model: ToyJudge, samples_per_prompt: int = 8, seed: int = 0) -> dict[str, float]:
    """How often the pretrained model draws the asked attribute, one word at a time, for the class word.

    Covers the context (background, size) and each identity feature (shape, colour, pattern, accessory):
    a feature the model cannot draw from its one word caps every text-embedding method's fidelity.
    """
    from ldm.toy.world import ACCESSORIES, BACKGROUNDS, BODY_COLOURS, PATTERNS, SHAPES, SIZES, accessory_phrase

    asks = ([(f"a photo of a {CLASS_WORD} on a {b} background", "background", b) for b in BACKGROUNDS]
            + [(f"a photo of a {s} {CLASS_WORD}", "size", s) for s in SIZES]
            + [(f"a photo of a {c} {CLASS_WORD}", "colour", c) for c in BODY_COLOURS]
            + [(f"a photo of a {s} {CLASS_WORD}", "shape", s) for s in SHAPES]
            + [(f"a photo of a {p} {CLASS_WORD}", "pattern", p) for p in PATTERNS]
            + [(f"a photo of a {CLASS_WORD}{accessory_phrase(a)}", "accessory", a) for a in ACCESSORIES if a != "none"])
    model.embedding_manager = None
    verdicts = judge(judge_model, sample(model, [a[0] for a in asks], samples_per_prompt, seed))
    result = {}
    for i, (_, question, answer) in enumerate(asks):
        chunk = verdicts[i * samples_per_prompt:(i + 1) * samples_per_prompt]
        result.setdefault(question, []).extend(v.present and v.answers[question] == answer for v in chunk)
    return {question: float(np.mean(hits)) for question, hits in result.items()}


def description_probe(model, judge_model: ToyJudge, subjects: Sequence[Subject], *, samples_per_subject: int = 8,
                      seed: int = 0, scale: float = SAMPLER["scale"],
                      ddim_steps: int = SAMPLER["ddim_steps"]) -> dict[str, float]:
    """How well the model draws each subject from its full description (``Subject.describe``).

    Returns ``fidelity`` (all four identity features right) and, per feature, the fraction of samples
    where the judge reads it right (a sample without a subject counts as wrong).
    """
    model.embedding_manager = None
    prompts = [PLAIN_PROMPT.format(s.describe()) for s in subjects]
    batch = [p for p in prompts for _ in range(samples_per_subject)]
    images = model.sample_images(batch, generator=torch.Generator().manual_seed(seed),
                                 ddim_steps=ddim_steps, scale=scale)
    verdicts = judge(judge_model, images)
    truth = [s for s in subjects for _ in range(samples_per_subject)]
    result = {"fidelity": float(np.mean([v.shows(s) for v, s in zip(verdicts, truth)]))}
    for i, name in enumerate(IDENTITY_FEATURES):
        result[name] = float(np.mean([v.present and v.answers[name] == s.features()[i] for v, s in zip(verdicts, truth)]))
    return result
