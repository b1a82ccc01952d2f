"""TI vs momentum TI vs DreamBooth in the toy world, judged by :mod:`ldm.toy_judge`.

Each method is a ``main.py`` run on a held-out subject's photo folder, with the flags a user would
pass; its samples of a fixed prompt suite are judged for identity (fidelity: the plain prompt shows
the subject) and for identity plus the asked attribute (editability: edit prompts). ``docs/toy_benchmark.md``
describes the protocol and the results.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ldm.data.toy_world import CLASS_WORD, IDENTITY_FEATURES, Subject
from ldm.toy_judge import ToyJudge, Verdict, check_question, judge

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
TOY_MODEL = ROOT / "models" / "toy" / "toy-v1.safetensors"
TOY_JUDGE = ROOT / "models" / "toy" / "toy-judge.safetensors"
TOY_ACCURACY = ROOT / "models" / "toy" / "judge_accuracy.json"
INFERENCE_CONFIG = ROOT / "configs" / "toy" / "v1-inference.yaml"
FINETUNE_CONFIG = ROOT / "configs" / "toy" / "v1-finetune.yaml"
DREAMBOOTH_CONFIG = ROOT / "configs" / "toy" / "v1-finetune_unfrozen.yaml"
BUILD_COMMAND = "python scripts/toy_pretrain.py"

PLAIN_PROMPT = "a photo of a {}"
# (prompt, question, asked answer): each edit changes a context or attribute the photos never show.
EDIT_PROMPTS: tuple[tuple[str, str, str], ...] = (
    ("a photo of a {} on a black background", "background", "black"),
    ("a photo of a {} on a pink background", "background", "pink"),
    ("a photo of a {} on a brown background", "background", "brown"),
    ("a photo of a small {}", "size", "small"),
)
SAMPLER = {"ddim_steps": 25, "scale": 3.0}
QUIET = ["--no_validation", "lightning.trainer.enable_progress_bar=false",
         "lightning.callbacks.image_logger.params.disabled=true",
         "lightning.modelcheckpoint.params.every_n_train_steps=100000"]


@dataclass(frozen=True)
class Method:
    """A personalization recipe: main.py flags and the subject phrase its prompts use."""

    name: str
    flags: tuple[str, ...]
    phrase: str  # replaces {} in the prompt suite
    dreambooth_first: bool = False  # start from this subject's DreamBooth model
    embedding: bool = True  # False: the run's result is a model (DreamBooth), not an embedding


MOMENTUM_PROMPTS = ("--class_word", CLASS_WORD, "--descriptive_p", "0.1", "--use_random_prompt")
METHODS: tuple[Method, ...] = (
    Method("ti", ("--gamma", "1"), "*"),
    Method("momentum_0.5", ("--gamma", "0.5"), "*"),
    Method("momentum_0.1", ("--gamma", "0.1"), "*"),
    Method("momentum_0.1_prompts", ("--gamma", "0.1", *MOMENTUM_PROMPTS), f"* {CLASS_WORD}"),
    Method("dreambooth", ("--class_word", CLASS_WORD), f"sks {CLASS_WORD}", embedding=False),
    Method("dreambooth_momentum_0.1", ("--gamma", "0.1", "--placeholder_string", "sks", *MOMENTUM_PROMPTS),
           f"sks {CLASS_WORD}", dreambooth_first=True),
)
METHOD_NAMES = tuple(m.name for m in METHODS)


def method(name: str) -> Method:
    for m in METHODS:
        if m.name == name:
            return m
    raise ValueError(f"unknown method '{name}': use one of {', '.join(METHOD_NAMES)}")


def require_toy_models() -> None:
    """Fail with the command that builds them when the pretrained toy files are missing."""
    for path in (TOY_MODEL, TOY_JUDGE):
        if not path.is_file():
            raise FileNotFoundError(f"{path.relative_to(ROOT)} is missing: build it with `{BUILD_COMMAND}`")


def prompt_suite(phrase: str) -> list[tuple[str, str | None, str | None]]:
    """(prompt, question, asked answer) for the plain prompt (no question) and each edit."""
    return [(PLAIN_PROMPT.format(phrase), None, None), *((p.format(phrase), q, a) for p, q, a in EDIT_PROMPTS)]


# ------------------------------------------------------------------------------------- training
def run_main(argv: list[str]) -> Path:
    """Run ``main.py`` in this process and return the new log dir under ``-l``."""
    import main as entry

    root = Path(argv[argv.index("-l") + 1])
    before = set(root.glob("*")) if root.exists() else set()
    code = entry.main(argv)
    if code != 0:
        raise RuntimeError(f"main.py {' '.join(argv)} exited with {code}")
    created = sorted(set(root.glob("*")) - before)
    if len(created) != 1:
        raise RuntimeError(f"expected one new log dir under {root}, found {len(created)}")
    return created[0]


def train(m: Method, photos: Path, seed: int, workdir: Path, *, base_ckpt: Path = TOY_MODEL,
          max_steps: int | None = None, extra: Sequence[str] = ()) -> Path:
    """Run method ``m``; returns the embedding file (or the DreamBooth model for ``dreambooth``)."""
    config = DREAMBOOTH_CONFIG if not m.embedding else FINETUNE_CONFIG
    argv = ["--base", str(config), "-t", "--actual_resume", str(base_ckpt), "--accelerator", "cpu",
            "--data_root", str(photos), "-s", str(seed), "-l", str(workdir), "-n", f"{m.name}-s{seed}", *m.flags]
    if m.embedding:
        argv += ["--init_word", CLASS_WORD]
    if max_steps is not None:
        argv += ["--max_steps", str(max_steps)]
    logdir = run_main(argv + QUIET + list(extra))
    result = logdir / "checkpoints" / ("embeddings.pt" if m.embedding else "model_pruned.safetensors")
    if not result.is_file():
        raise RuntimeError(f"{m.name}: the run wrote no {result.name} in {logdir}")
    return result


# ------------------------------------------------------------------------------------- sampling
def load_toy_model(ckpt: Path = TOY_MODEL):
    from ldm.inference import load_model

    return load_model(INFERENCE_CONFIG, ckpt, device="cpu")


@torch.no_grad()
def sample(model, prompts: Sequence[str], samples_per_prompt: int, seed: int) -> torch.Tensor:
    """Decoded samples [P * n, 3, 64, 64] in [-1, 1], prompt-major, with fixed seeds."""
    batch = [p for p in prompts for _ in range(samples_per_prompt)]
    generator = torch.Generator().manual_seed(seed)
    return model.sample_images(batch, generator=generator, **SAMPLER)


@dataclass
class SuiteScore:
    """Judged samples of one prompt suite."""

    fidelity: float
    editability: float
    attribute: float  # fraction of edit samples with the asked attribute, subject or not
    features: float  # plain-prompt samples: mean fraction of the 4 identity features judged right
    per_prompt: dict[str, float] = field(default_factory=dict)


def score_suite(verdicts: Sequence[Verdict], suite, samples_per_prompt: int, subject: Subject | None) -> SuiteScore:
    """Fidelity (plain prompt shows ``subject``) and editability (edit shows it and the asked attribute)."""
    chunks = [verdicts[i * samples_per_prompt:(i + 1) * samples_per_prompt] for i in range(len(suite))]
    per_prompt, plain, edits, attributes, features = {}, [], [], [], []
    for (prompt, question, asked), chunk in zip(suite, chunks):
        right_subject = [subject is not None and v.shows(subject) for v in chunk]
        if question is None:
            plain += right_subject
            features += [feature_match(v, subject) for v in chunk]
            per_prompt[prompt] = float(np.mean(right_subject))
            continue
        check_question(question)
        has_attribute = [v.present and v.answers[question] == asked for v in chunk]
        both = [s and a for s, a in zip(right_subject, has_attribute)]
        edits += both
        attributes += has_attribute
        per_prompt[prompt] = float(np.mean(both))
    return SuiteScore(float(np.mean(plain)), float(np.mean(edits)), float(np.mean(attributes)),
                      float(np.mean(features)), per_prompt)


def feature_match(verdict: Verdict, subject: Subject | None) -> float:
    """Fraction of ``subject``'s identity features the judge reads in a sample (0 without a subject)."""
    if subject is None or not verdict.present:
        return 0.0
    pairs = zip(IDENTITY_FEATURES, subject.features())
    return float(np.mean([verdict.answers[name] == value for name, value in pairs]))


def evaluate(model, judge_model: ToyJudge, phrase: str, subject: Subject | None, *, samples_per_prompt: int,
             seed: int, embedding: Path | None = None) -> tuple[SuiteScore, torch.Tensor]:
    """Sample the prompt suite with ``phrase`` (and ``embedding`` attached), judge it."""
    from ldm.inference import attach_embedding

    model.embedding_manager = None
    if embedding is not None:
        attach_embedding(model, embedding)
    suite = prompt_suite(phrase)
    images = sample(model, [p for p, _, _ in suite], samples_per_prompt, seed)
    model.embedding_manager = None
    return score_suite(judge(judge_model, images), suite, samples_per_prompt, subject), images


def prompt_following(model, judge_model: ToyJudge, samples_per_prompt: int = 8, seed: int = 0) -> dict[str, float]:
    """How often the pretrained model draws the asked background / size / colour for the class word."""
    from ldm.data.toy_world import BACKGROUNDS, BODY_COLOURS, SIZES

    asks = ([(f"a photo of a {CLASS_WORD} on a {b} background", "background", b) for b in BACKGROUNDS]
            + [(f"a photo of a {s} {CLASS_WORD}", "size", s) for s in SIZES]
            + [(f"a photo of a {c} {CLASS_WORD}", "colour", c) for c in BODY_COLOURS])
    model.embedding_manager = None
    verdicts = judge(judge_model, sample(model, [a[0] for a in asks], samples_per_prompt, seed))
    result = {}
    for i, (_, question, answer) in enumerate(asks):
        chunk = verdicts[i * samples_per_prompt:(i + 1) * samples_per_prompt]
        result.setdefault(question, []).extend(v.present and v.answers[question] == answer for v in chunk)
    return {question: float(np.mean(hits)) for question, hits in result.items()}


def description_probe(model, judge_model: ToyJudge, subjects: Sequence[Subject], *, samples_per_subject: int = 8,
                      seed: int = 0, scale: float = SAMPLER["scale"]) -> dict[str, float]:
    """How well the model draws each subject from its full description (``Subject.describe``).

    Returns ``fidelity`` (all four identity features right) and, per feature, the fraction of samples
    where the judge reads it right (a sample without a subject counts as wrong).
    """
    model.embedding_manager = None
    prompts = [PLAIN_PROMPT.format(s.describe()) for s in subjects]
    batch = [p for p in prompts for _ in range(samples_per_subject)]
    images = model.sample_images(batch, generator=torch.Generator().manual_seed(seed),
                                 ddim_steps=SAMPLER["ddim_steps"], scale=scale)
    verdicts = judge(judge_model, images)
    truth = [s for s in subjects for _ in range(samples_per_subject)]
    result = {"fidelity": float(np.mean([v.shows(s) for v, s in zip(verdicts, truth)]))}
    for i, name in enumerate(IDENTITY_FEATURES):
        result[name] = float(np.mean([v.present and v.answers[name] == s.features()[i] for v, s in zip(verdicts, truth)]))
    return result
