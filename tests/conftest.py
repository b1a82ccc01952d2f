"""Shared fixtures: the tiny momentum-TI model, a trainable tiny checkpoint and a folder of photos."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.util import randomize_zero_weights  # noqa: F401  (tests import it from here)
from omegaconf import OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY_FINETUNE = ROOT / "configs" / "tiny" / "v1-finetune.yaml"


def build_tiny_model(seed: int = 0):
    """A LatentDiffusion with an EmbeddingManager (gamma 0.1) from the tiny finetune config."""
    from ldm.util import instantiate_from_config

    config = OmegaConf.load(TINY_FINETUNE)
    torch.manual_seed(seed)
    model = instantiate_from_config(config.model)
    randomize_zero_weights(model.model, seed)
    model.learning_rate = float(config.model.base_learning_rate)
    return model


@pytest.fixture(scope="session")
def tiny_config():
    return OmegaConf.load(TINY_FINETUNE)


@pytest.fixture(scope="session")
def tiny_model():
    """Built once per session; tests that change its embedding must restore it (see ``fresh_manager``)."""
    return build_tiny_model()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_model) -> Path:
    """The tiny model's base weights (no embedding) as an SD-style ``.ckpt`` for ``--actual_resume``."""
    from ldm.checkpoint import save_checkpoint

    state = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("embedding_manager.")}
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-sd.ckpt", state)


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


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos") / "astronaut")


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


@pytest.fixture
def one_thread():
    """Single-threaded CPU ops, whose results do not depend on how work is split between threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
