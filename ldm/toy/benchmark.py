"""TI vs momentum TI vs DreamBooth in the toy world, judged by :mod:`ldm.toy.judge`.

Each method is a ``main.py`` run on a held-out subject's photo folder, with the flags a user would
pass; its samples of a fixed prompt suite are judged for identity (fidelity: the plain prompt shows
the subject) and for identity plus the asked attribute (editability: edit prompts). A run is scored
after each of several saves and, for embeddings, at several inference strengths (:class:`Protocol`);
its result is stored so that a restarted benchmark reuses it (:mod:`ldm.toy.records`). The frontiers of
those points are in :mod:`ldm.toy.frontier`; ``docs/toy_benchmark.md`` describes the protocol and results.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pytorch_lightning as pl
import torch

from ldm.toy.cells import ROOT, Method, method
from ldm.toy.world import CLASS_WORD, IDENTITY_FEATURES, Subject
from ldm.toy.judge import ToyJudge, Verdict, check_question, judge
from ldm.util import atomic_write

TOY_MODEL = ROOT / "models" / "toy" / "toy-v1.safetensors"
TOY_JUDGE = ROOT / "models" / "toy" / "toy-judge.safetensors"
TOY_ACCURACY = ROOT / "models" / "toy" / "judge_accuracy.json"
INFERENCE_CONFIG = ROOT / "configs" / "toy" / "v1-inference.yaml"
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
         "lightning.callbacks.image_logger.params.disabled=true"]
NO_SAVES = 100000  # every_n_train_steps that never comes: a run saves at its end only
CLOCK_FILE = "benchmark_clock.json"
CALLBACK_KEY = "lightning.callbacks.toy_benchmark"


def require_toy_models() -> None:
    """Fail with the command that builds them when the pretrained toy files are missing."""
    for path in (TOY_MODEL, TOY_JUDGE):
        if not path.is_file():
            raise FileNotFoundError(f"{path.relative_to(ROOT)} is missing: build it with `{BUILD_COMMAND}`")


def prompt_suite(phrase: str) -> list[tuple[str, str | None, str | None]]:
    """(prompt, question, asked answer) for the plain prompt (no question) and each edit."""
    return [(PLAIN_PROMPT.format(phrase), None, None), *((p.format(phrase), q, a) for p, q, a in EDIT_PROMPTS)]


# ------------------------------------------------------------------------------------- training
class BenchmarkProbe(pl.Callback):
    """Added to benchmark runs through ``lightning.callbacks``: the run's clock, and UNet saves.

    Writes ``benchmark_clock.json`` in the log dir (wall-clock and process CPU times of fit start, train
    start and train end: ``<event>`` and ``<event>_cpu``) and, for each step in ``unet_steps``,
    ``checkpoints/unet_gs-N.safetensors``: the UNet's weights after N steps (a DreamBooth run's saves;
    its full pruned export is written at the end only).
    """

    def __init__(self, unet_steps: Sequence[int] = ()):
        self.unet_steps = {int(s) for s in unet_steps}
        self.clock: dict[str, float] = {}

    def on_fit_start(self, trainer, pl_module):
        self.clock.update(fit_start=time.time(), fit_start_cpu=time.process_time())

    def on_train_start(self, trainer, pl_module):
        self.clock.update(train_start=time.time(), train_start_cpu=time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = pl_module.global_step
        if step in self.unet_steps:
            from safetensors.torch import save_file

            unet = pl_module.model.diffusion_model
            state = {k: v.detach().float().contiguous() for k, v in unet.state_dict().items()}
            path = unet_save(Path(trainer.default_root_dir) / "checkpoints", step)
            atomic_write(path, lambda tmp: save_file(state, str(tmp)))

    def on_train_end(self, trainer, pl_module):
        self.clock.update(train_end=time.time(), train_end_cpu=time.process_time())
        path = Path(trainer.default_root_dir) / CLOCK_FILE
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(self.clock)))


def unet_save(ckptdir: Path, step: int) -> Path:
    return ckptdir / f"unet_gs-{step}.safetensors"


def result_name(m: Method) -> str:
    """The file a run of ``m`` ends with: its embedding (the moving average's with ``--ema_decay``), LoRA or model."""
    from ldm.train.callbacks import ema_file_name

    if m.lora:
        return "lora.safetensors"
    if m.embedding:
        return ema_file_name("embeddings.pt") if m.ema else "embeddings.pt"
    return "model_pruned.safetensors"


def step_saves(result: Path, m: Method, steps: Sequence[int]) -> dict[int, Path]:
    """The files a run saved at ``steps``, next to its final ``result``: embeddings (``embeddings_ema_gs-N.pt``,
    the moving average, with ``--ema_decay``), LoRA files (``lora_gs-N.safetensors``) or UNet weights."""
    from ldm.lora import saved_file_name
    from ldm.train.callbacks import ema_file_name

    if m.lora:
        return {s: result.parent / saved_file_name(s) for s in steps}
    if m.embedding:
        names = {s: f"embeddings_gs-{s}.pt" for s in steps}
        return {s: result.parent / (ema_file_name(name) if m.ema else name) for s, name in names.items()}
    return {s: unet_save(result.parent, s) for s in steps}


def save_flags(m: Method, steps: Sequence[int]) -> list[str]:
    """Config overrides that make a run save at each of ``steps`` and time itself (:class:`BenchmarkProbe`).

    Embedding and LoRA runs save every gcd(steps) steps themselves; a DreamBooth run's saves are UNet weights
    written by :class:`BenchmarkProbe` (main.py's own resume point would hold the whole model).
    """
    every = math.gcd(*steps) if steps and not m.saves_unet else NO_SAVES
    unet_steps = list(steps) if m.saves_unet else []
    return [f"lightning.modelcheckpoint.params.every_n_train_steps={every}",
            f"{CALLBACK_KEY}.target={__name__}.BenchmarkProbe",
            f"{CALLBACK_KEY}.params.unet_steps=[{','.join(str(s) for s in unet_steps)}]"]


def run_main(argv: list[str]) -> Path:
    """Run ``main.py`` in this process (:func:`ldm.train.cli.main`) and return the new log dir under ``-l``.

    The log dir is the one new entry named after this run (its data folder and ``-n``, then the start
    time), so another benchmark writing runs of other cells under the same ``-l`` does not confuse it.
    """
    from ldm.train.cli import build_parser, main
    from ldm.train.training import log_dir_prefix

    opt, _ = build_parser().parse_known_args(argv)
    root, prefix = Path(opt.logdir), log_dir_prefix(opt) + "_"
    before = set(root.glob("*")) if root.exists() else set()
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"main.py {' '.join(argv)} exited with {code}")
    created = sorted(p for p in set(root.glob("*")) - before
                     if p.name.startswith(prefix) and p.name[len(prefix):][:4].isdigit())  # the start time's year
    if len(created) != 1:
        raise RuntimeError(f"expected one new log dir {prefix}<time> under {root}, found {len(created)}")
    return created[0]


def main_argv(m: Method, photos: Path, seed: int, workdir: Path, *, base_ckpt: Path = TOY_MODEL,
              lora: Path | None = None, max_steps: int | None = None, save_steps: Sequence[int] = (),
              class_images: Path | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The ``main.py`` command line of a run of ``m`` (:func:`train`'s arguments)."""
    argv = ["--base", str(m.config), "-t", "--actual_resume", str(base_ckpt), "--accelerator", "cpu",
            "--data_root", str(photos), "-s", str(seed), "-l", str(workdir), "-n", f"{m.name}-s{seed}", *m.flags]
    if m.embedding:
        argv += ["--init_word", CLASS_WORD]
    if lora is not None:
        argv += ["--lora", str(lora)]
    if m.prior:
        if class_images is None:
            raise ValueError(f"{m.name} needs class images (--reg_data_root): make them with "
                             "scripts/make_class_images.py")
        argv += ["--reg_data_root", str(class_images)]
    if max_steps is not None:
        argv += ["--max_steps", str(max_steps)]
    return argv + QUIET + save_flags(m, save_steps) + list(extra)


def train(m: Method, photos: Path, seed: int, workdir: Path, *, base_ckpt: Path = TOY_MODEL,
          lora: Path | None = None, max_steps: int | None = None, save_steps: Sequence[int] = (),
          class_images: Path | None = None, extra: Sequence[str] = ()) -> Path:
    """Run method ``m``; returns its :func:`result_name` file (embedding, LoRA file or DreamBooth model).

    ``base_ckpt`` is the model it starts from, with the LoRA file ``lora`` folded in (``--lora``) when given;
    ``save_steps`` adds saves after those steps (:func:`step_saves` finds them); ``class_images`` is the
    ``--reg_data_root`` of a cell with prior preservation.
    """
    logdir = run_main(main_argv(m, photos, seed, workdir, base_ckpt=base_ckpt, lora=lora, max_steps=max_steps,
                                save_steps=save_steps, class_images=class_images, extra=extra))
    result = logdir / "checkpoints" / result_name(m)
    missing = [p for p in (result, *step_saves(result, m, save_steps).values()) if not p.is_file()]
    if missing:
        raise RuntimeError(f"{m.name}: the run wrote no {missing[0].name} in {logdir}")
    return result


def base_files(m: Method, base_record: dict | None) -> dict[str, Path | None]:
    """What a run of ``m`` trains on and is scored with, from the stored record of its base cell ``m.on``
    (None: a cell on the toy model): ``ckpt`` (``--actual_resume``), ``lora`` (``--lora``: a LoRA DreamBooth
    cell's final adapters, on the toy model) and ``unet`` (a DreamBooth cell's last UNet save, for scoring)."""
    if m.on is None:
        return {"ckpt": TOY_MODEL, "lora": None, "unet": None}
    if method(m.on).lora:
        return {"ckpt": TOY_MODEL, "lora": Path(base_record["result"]), "unet": None}
    return {"ckpt": Path(base_record["result"]), "lora": None, "unet": Path(base_record["unet"])}


def run_clock(result: Path) -> dict[str, float]:
    """The wall-clock times :class:`BenchmarkProbe` wrote for the run of ``result`` (empty if none)."""
    path = result.parent.parent / CLOCK_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


@contextmanager
def unet_weights(model, path: Path | None):
    """``model`` with the UNet weights of ``path`` (a :class:`BenchmarkProbe` save) inside the block.

    The model's own UNet weights are restored afterwards; ``path`` None changes nothing.
    """
    if path is None:
        yield model
        return
    from safetensors.torch import load_file

    unet = model.model.diffusion_model
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.load_state_dict(load_file(str(path)))
    try:
        yield model
    finally:
        unet.load_state_dict(original)


@contextmanager
def lora_weights(model, path: Path | None):
    """``model`` with the LoRA file ``path`` folded into its UNet (and text encoder) weights inside the block
    (:func:`ldm.lora.apply_lora_files`, scale 1).

    The weights of those parts, the attributes the adapters left on them (peft's ``peft_config``) and the
    model's record of applied LoRAs are restored afterwards, bit for bit; ``path`` None changes nothing.
    """
    if path is None:
        yield model
        return
    from ldm.lora import APPLIED_ATTR, apply_lora_files, model_parts

    parts = [part.module for part in model_parts(model)]
    originals = [({k: v.clone() for k, v in module.state_dict().items()}, set(vars(module))) for module in parts]
    applied = getattr(model, APPLIED_ATTR, None)
    apply_lora_files(model, [str(path)])
    try:
        yield model
    finally:
        for module, (weights, attributes) in zip(parts, originals):
            module.load_state_dict(weights)
            for name in set(vars(module)) - attributes:
                delattr(module, name)
        if applied is None:
            delattr(model, APPLIED_ATTR)
        else:
            setattr(model, APPLIED_ATTR, applied)


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
             seed: int, embedding: Path | None = None, strength: float = 1.0,
             ddim_steps: int = SAMPLER["ddim_steps"], bf16: bool = False) -> tuple[SuiteScore, torch.Tensor]:
    """Sample the prompt suite with ``phrase`` (and ``embedding`` attached at ``strength``), judge it."""
    scores, images = judge_settings(model, judge_model, phrase, subject, [(embedding, strength)],
                                    samples_per_prompt=samples_per_prompt, seed=seed, ddim_steps=ddim_steps,
                                    bf16=bf16)
    return scores[0], images


def native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (avx512_bf16 or AMX). Without it, CPU autocast to bfloat16
    is emulated: scoring measured 20-24x slower than fp32 on an AVX2-only EPYC (docs/toy_benchmark.md)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@torch.no_grad()
def judge_settings(model, judge_model: ToyJudge, phrase: str, subject: Subject | None,
                   settings: Sequence[tuple[Path | None, float]], *, samples_per_prompt: int,
                   seed: int, ddim_steps: int = SAMPLER["ddim_steps"],
                   bf16: bool = False) -> tuple[list[SuiteScore], torch.Tensor]:
    """The prompt suite's score with each (embedding or None, strength) of ``settings``, sampled in one batch.

    Each setting's conditioning is encoded with its embedding attached; all settings share the same
    starting noise (drawn from ``seed``), so their scores differ by the setting alone. ``bf16`` samples and
    judges under CPU bfloat16 autocast (docs/toy_benchmark.md, "Time"). Returns the scores and the images
    [settings x prompts x samples, 3, H, W].
    """
    from ldm.inference import attach_embedding

    suite = prompt_suite(phrase)
    batch = [p for p, _, _ in suite for _ in range(samples_per_prompt)]
    conditionings = []
    for embedding, strength in settings:
        model.embedding_manager = None
        if embedding is not None:
            attach_embedding(model, embedding, strength=strength)
        conditionings.append(model.get_learned_conditioning(batch))
    model.embedding_manager = None
    shape = (len(batch), model.channels, model.image_size, model.image_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(model.device)
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
        images = model.sample_images(batch * len(settings), cond=torch.cat(conditionings),
                                     x_T=noise.repeat(len(settings), 1, 1, 1), ddim_steps=ddim_steps,
                                     scale=SAMPLER["scale"]).float()
        verdicts = judge(judge_model, images)
    chunks = [verdicts[i * len(batch):(i + 1) * len(batch)] for i in range(len(settings))]
    return [score_suite(chunk, suite, samples_per_prompt, subject) for chunk in chunks], images


# ------------------------------------------------------------------------------------- frontier runs
STEPS = (25, 50, 100, 200)
STRENGTHS = (0.25, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Protocol:
    """Where each run is scored: after each of ``steps`` and, for embeddings, at each inference strength."""

    steps: tuple[int, ...] = STEPS
    strengths: tuple[float, ...] = STRENGTHS
    samples: int = 8  # per prompt
    ddim_steps: int = SAMPLER["ddim_steps"]
    base_model: str = ""  # the toy model's hash: results of another model are not reused
    bf16: bool = False  # sample and judge under bfloat16 autocast

    @property
    def sampler(self) -> dict:
        """The sampler settings a stored result must match (``bf16`` only when on: fp32 results keep their key)."""
        return {**SAMPLER, "ddim_steps": self.ddim_steps, **({"bf16": True} if self.bf16 else {})}

    def settings(self, m: Method) -> list[tuple[int, float]]:
        """(steps, strength) of each point of a run of ``m``; a model (DreamBooth) has strength 1 only."""
        strengths = self.strengths if m.embedding else (1.0,)
        return [(steps, float(s)) for steps in self.steps for s in strengths]

    def fingerprint(self, m: Method) -> dict:
        """What a stored run result must match to be reused (JSON-normalised)."""
        return json.loads(json.dumps({"flags": m.flags, "on": m.on, "prior": m.prior, "phrase": m.phrase,
                                      "settings": self.settings(m), "samples": self.samples, "sampler": self.sampler,
                                      "base_model": self.base_model,
                                      "prompts": [p for p, _, _ in prompt_suite("{}")]}))


def score_run(model, judge_model: ToyJudge, m: Method, subject: Subject, saves: dict[int, Path], protocol: Protocol,
              *, seed: int, unet: Path | None = None, lora: Path | None = None) -> list[dict]:
    """Judge the prompt suite at every setting of ``protocol``: one point dict per (steps, strength).

    ``saves`` maps steps to the run's saved embedding (or UNet weights for a DreamBooth cell, a LoRA file
    for a LoRA DreamBooth cell); ``unet`` is the DreamBooth UNet and ``lora`` the LoRA file an embedding cell
    was trained on. The same sampling noise (``seed``) is used at every setting, so the points of a run
    differ by the setting alone (:func:`judge_settings`).
    """
    settings = protocol.settings(m)
    if m.embedding:  # one model: every setting in one sampling batch
        groups = [({"unet": unet, "lora": lora}, settings)]
    else:  # a model per save
        kind = "lora" if m.lora else "unet"
        groups = [({kind: saves[steps]}, [(steps, strength)]) for steps, strength in settings]
    points = []
    for weights, group in groups:
        with unet_weights(model, weights.get("unet")), lora_weights(model, weights.get("lora")):
            scores, _ = judge_settings(model, judge_model, m.phrase, subject,
                                       [(saves[steps] if m.embedding else None, strength) for steps, strength in group],
                                       samples_per_prompt=protocol.samples, seed=seed,
                                       ddim_steps=protocol.ddim_steps, bf16=protocol.bf16)
        points += [{"steps": steps, "strength": strength, "fidelity": score.fidelity, "editability": score.editability,
                    "features": score.features, "attribute": score.attribute, "per_prompt": score.per_prompt}
                   for (steps, strength), score in zip(group, scores)]
    return points
