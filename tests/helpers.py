"""Plain helpers shared by the tests; fixtures and pytest hooks are in conftest.py.

Topic helpers with their own dependencies are beside this module: ``helpers_diffusers`` (diffusers and
transformers references), ``helpers_a1111`` (AUTOMATIC1111's PNG reading rule) and ``host_reads``.
Test modules import from these and never from one another; config targets of the training CLI's test
hooks (``lightning.callbacks.<name>.target=helpers.<Class>``) point here too.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import shlex
import signal
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.checkpoint import EmbeddingFile, save_checkpoint, save_embeddings
from ldm.modules.embedding_manager import EmbeddingManager
from ldm.util import instantiate_from_config, randomize_zero_weights

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/tiny/v1-finetune.yaml"  # relative: main.py resolves it from the project root
TINY_FINETUNE = ROOT / TINY
TINY_INFERENCE = ROOT / "configs" / "tiny" / "v1-inference.yaml"
TOKEN_TABLE = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
WOMAN, STAR = 2308, 265  # CLIP ids of the init word and the placeholder


# ------------------------------------------------------------------------ shared fixtures (../shared)

SHARED_FIXTURES_ENV = "MTI_SHARED_FIXTURES"
SHARED_FIXTURES_ABSENT = "needs the shared fixtures (absent)"  # the skip reason conftest counts
SEED_EMBEDDING = "embeddings/seed_gamma0.1_random_desc_face_gs-1649.pt"  # published by the original code


def in_ci(environ=None) -> bool:
    """Whether ``CI`` is set to a true value (``true``, ``1``, ``yes``, ``on``)."""
    environ = os.environ if environ is None else environ
    return environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


@functools.lru_cache(maxsize=None)
def origin_checkout(root: Path) -> Path | None:
    """The checkout ``root`` was cloned from, when its ``origin`` remote is a local path (no network)."""
    try:
        url = subprocess.run(["git", "-C", str(root), "config", "--get", "remote.origin.url"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if url.startswith("file://"):
        url = unquote(urlparse(url).path)
    elif not url or "://" in url or ":" in url.split("/", 1)[0]:  # empty, a URL, or scp-like host:path
        return None
    path = Path(url).expanduser()
    path = (path if path.is_absolute() else root / path).resolve()
    return path.parent if path.name == ".git" else path


def shared_fixtures_candidates(root: Path = ROOT, environ=None) -> list[Path]:
    """Where the shared fixtures may be, in order: ``$MTI_SHARED_FIXTURES`` alone when it is set; else
    ``<root>/../shared/fixtures``, then ``<origin>/../shared/fixtures`` for a clone of a local checkout."""
    environ = os.environ if environ is None else environ
    if environ.get(SHARED_FIXTURES_ENV):
        return [Path(environ[SHARED_FIXTURES_ENV]).expanduser()]
    places = [root.parent / "shared" / "fixtures"]
    if not places[0].is_dir() and (origin := origin_checkout(root)) is not None:
        places.append(origin.parent / "shared" / "fixtures")
    return places


def locate_shared_fixtures(root: Path = ROOT, environ=None) -> Path | None:
    """The shared fixtures folder, or None when none of the candidates is a folder."""
    return next((p for p in shared_fixtures_candidates(root, environ) if p.is_dir()), None)


def shared_fixture(relpath: str = "", *, required: bool = True, root: Path = ROOT, environ=None) -> Path | None:
    """``<shared fixtures>/relpath``. When it is missing: a test failure under CI (a CI run must not pass by
    skipping), else a skip (or None when not ``required``, for a test that also runs without it)."""
    base = locate_shared_fixtures(root, environ)
    if base is not None and (base / relpath).exists():
        return base / relpath
    if in_ci(environ):
        if base is None:
            where = ", ".join(map(str, shared_fixtures_candidates(root, environ)))
            pytest.fail(f"CI: the shared fixtures are missing (looked in {where}); "
                        f"set {SHARED_FIXTURES_ENV}=DIR to the fixtures folder", pytrace=False)
        pytest.fail(f"CI: shared fixture {relpath} is missing from {base} "
                    f"(found through {SHARED_FIXTURES_ENV} or ../shared/fixtures)", pytrace=False)
    if not required:
        return None
    pytest.skip(SHARED_FIXTURES_ABSENT if base is None else f"shared fixture {relpath} is absent from {base}")


def sd_v1_key_table() -> dict[str, tuple[tuple[int, ...], str]]:
    """``key -> (shape, group)`` of a released SD v1 checkpoint (``sd-v1-checkpoint-keys.tsv``; ``scalar``
    is shape ())."""
    table = {}
    for line in shared_fixture("sd-v1-checkpoint-keys.tsv").read_text().splitlines():
        if line.startswith("#") or line.startswith("key\t") or not line.strip():
            continue
        key, shape, group = line.split("\t")
        table[key] = (() if shape == "scalar" else tuple(int(s) for s in shape.split("x")), group)
    return table


def sd_v1_shapes(*groups: str) -> dict[str, tuple[int, ...]]:
    """``key -> shape`` of the SD v1 checkpoint keys in ``groups``."""
    return {key: shape for key, (shape, group) in sd_v1_key_table().items() if group in groups}


# ------------------------------------------------------------------------------ models and data


def build_tiny_model(seed: int = 0):
    """A LatentDiffusion with an EmbeddingManager (gamma 0.1) from the tiny finetune config."""
    config = OmegaConf.load(TINY_FINETUNE)
    torch.manual_seed(seed)
    model = instantiate_from_config(config.model)
    randomize_zero_weights(model.model, seed)
    model.learning_rate = float(config.model.base_learning_rate)
    return model


def load_script(name: str):
    """Import ``scripts/<name>.py`` as module ``name`` (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_photos(folder: Path, count: int = 3, size: int = 80) -> Path:
    """``count`` small RGB variations of scikit-image's astronaut photo."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    base = Image.fromarray(data.astronaut())
    for i in range(count):
        img = base.rotate(8 * i).resize((size + 4 * i, size), Image.Resampling.BICUBIC)
        img.save(folder / f"photo_{i}.{'png' if i % 2 else 'jpg'}")
    return folder


def make_batch(image_index=(0, 1), flipped=(False, True), size: int = 64, seed: int = 0,
               captions=None) -> dict:
    """A personalization batch as the DataLoader yields it (channels-last images in [-1, 1])."""
    gen = np.random.default_rng(seed)
    n = len(image_index)
    images = gen.uniform(-1, 1, size=(n, size, size, 3)).astype(np.float32)
    return {
        "image": torch.from_numpy(images),
        "caption": list(captions or ["a photo of a *"] * n),
        "image_index": torch.tensor(image_index),
        "flipped": torch.tensor(flipped),
    }


class Evil:
    """Pickles to ``os.system('touch marker')``: loading it must be refused before anything runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, ("touch " + shlex.quote(str(self.marker)),))


# ------------------------------------------------------------------------------- txt2img


PROMPT = "photo of a * woman"
TXT2IMG_SMALL = ["--H", "64", "--W", "64", "--ddim_steps", "4", "--n_samples", "2", "--n_iter", "2",
                 "--config", str(TINY_INFERENCE), "--device", "cpu"]


def write_txt2img_files(root: Path) -> dict[str, Path]:
    """A tiny random checkpoint (zero-initialised layers randomised, so outputs depend on the prompt)
    and embeddings for it: gamma 0.5 with a far-away v, and an SD2-sized (1024-d) one."""
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(TINY_INFERENCE).model)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and not param.any():
                param.normal_(0.0, 0.05)
    ckpt = save_checkpoint(root / "tiny.ckpt", model.state_dict())
    manager = EmbeddingManager(model.cond_stage_model, placeholder_strings=["*"], initializer_words=["woman"],
                               gamma=0.5)
    with torch.no_grad():
        manager.vectors[0].normal_(0.0, 1.0)
    embedding = manager.save(root / "emb.pt", step=7)
    sd2 = save_embeddings(root / "sd2.pt", EmbeddingFile({"*": 265}, {"*": torch.randn(1, 1024)}, gamma=1.0))
    text = root / "config_as_ckpt.yaml"
    text.write_text(TINY_INFERENCE.read_text())
    return {"ckpt": ckpt, "embedding": embedding, "sd2": sd2, "yaml": text, "root": root}


def txt2img_argv(files: dict[str, Path], outdir: Path, *extra: str, embedding: bool = True) -> list[str]:
    """stable_txt2img.py flags for a small run on ``write_txt2img_files``' checkpoint (and embedding)."""
    argv = [*TXT2IMG_SMALL, "--ckpt", str(files["ckpt"]), "--outdir", str(outdir), "--prompt", PROMPT]
    if embedding:
        argv += ["--embedding_path", str(files["embedding"])]
    return [*argv, *extra]


# ---------------------------------------------------------------------------- training CLI


def base_argv(logdir: Path, data_root: Path, ckpt: Path, *extra: str) -> list[str]:
    """main.py flags for a run on the tiny config from ``ckpt`` (in-process: ``main.main(argv)``)."""
    return ["--base", TINY, "-t", "--data_root", str(data_root), "--logdir", str(logdir),
            "--actual_resume", str(ckpt), "data.params.num_workers=0", *extra]


def only_run(logdir: Path, name: str = "") -> Path:
    runs = [p for p in logdir.iterdir() if p.is_dir() and name in p.name]
    assert len(runs) == 1, f"expected one log dir matching '{name}' in {logdir}, got {runs}"
    return runs[0]


def error_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name == "main"]


class ScriptedScorer:
    """Stands in for IdentityScorer: returns the scripted (detection rate, mean distance, match) of each validation
    in turn."""

    def __init__(self, script):
        self.script = list(script)

    def score(self, images):
        rate, distance, match = self.script.pop(0)
        return {"images": len(images), "faces": round(rate * len(images)), "detection_rate": rate,
                "mean_distance": distance, "median_distance": distance, "fraction_under_threshold": match}


def script_identity_scores(monkeypatch, script) -> None:
    """The validation of a run scores its samples with ``script`` (see :class:`ScriptedScorer`), not with dlib."""
    from ldm.train.validation import callback

    scorer = ScriptedScorer(script)
    monkeypatch.setattr(callback.IdentityScorer, "from_photos", classmethod(lambda cls, *a, **k: scorer))


TXT2IMG_QUICK = ["--n_samples", "1", "--n_iter", "1", "--ddim_steps", "2", "--device", "cpu"]


def advised_command(caplog) -> tuple[str, list[str]]:
    """The end-of-run advice (``Use ...``) and the ``stable_txt2img.py`` arguments of its command."""
    (advice,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Use ")]
    command = shlex.split(advice.split("Sample with it: ")[1])
    assert command[:2] == ["python", "scripts/stable_txt2img.py"], command
    return advice, command[2:]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for ``python main.py`` in a subprocess that can import this module's hooks."""
    paths = [str(ROOT / "tests"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **extra}


# training_step logs through self.log, which warns and does nothing without a Trainer
no_trainer_log_warning = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


# --------------------------------------------- training hooks (config targets: helpers.<Class>)


class GatherEmbeddings(pl.Callback):
    """At train end, gathers the embedding of every rank and (rank 0) writes the comparison to ``out``."""

    def __init__(self, out: str):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        local = pl_module.embedding_manager.vectors[0].detach()
        gathered = pl_module.all_gather(local)  # [world, n, D]
        if trainer.is_global_zero:
            result = {"world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__,
                      "max_diff": float((gathered - gathered[0]).abs().max()),
                      "rank0": gathered[0].tolist()}
            Path(self.out).write_text(json.dumps(result))


class RaiseAtStep(pl.Callback):
    """Interrupts the run like a user (Ctrl-C) or the OS (a signal) at ``step``."""

    def __init__(self, step: int, action: str):
        self.step, self.action = step, action

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        if self.action == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), getattr(signal, self.action))


class KillAtStep(pl.Callback):
    """SIGKILLs its own process (no handler runs, nothing is saved) at the end of ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillWhileSampling(pl.Callback):
    """SIGKILLs its own process in the first validation sampling after the end of ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            pl_module.sample_images = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)


class NaNOnRankOne(pl.Callback):
    """From step ``step`` on, rank 1's cached latents are NaN, so only its loss is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == self.step:
            for key, mean in pl_module.latent_cache._mean.items():
                pl_module.latent_cache._mean[key] = torch.full_like(mean, float("nan"))
