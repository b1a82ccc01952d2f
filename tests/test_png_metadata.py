"""PNG sample metadata: AUTOMATIC1111's ``parameters`` chunk, the project's own key, the model hash."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from helpers import base_argv, only_run
from helpers_a1111 import parse_parameters
from PIL import Image

from ldm.png_metadata import SampleSettings, model_fields, model_hash, parameters_text, png_text
from ldm.sampling_io import read_png_text, save_png

SETTINGS = SampleSettings(prompt="a photo of * woman", negative_prompt="blurry, lowres", steps=50, sampler="DDIM",
                          cfg_scale=7.5, seed=42, width=512, height=448, model_hash="0123456789", model_name="sd-v1-4",
                          embedding="embeddings_gs-500", gamma=0.1)


def test_parameters_parse_back_with_the_a1111_rules() -> None:
    text = parameters_text(SETTINGS)
    assert text.splitlines()[:2] == ["a photo of * woman", "Negative prompt: blurry, lowres"]
    assert parse_parameters(text) == {
        "Prompt": "a photo of * woman", "Negative prompt": "blurry, lowres", "Steps": "50", "Sampler": "DDIM",
        "CFG scale": "7.5", "Seed": "42", "Size": "512x448", "Model hash": "0123456789", "Model": "sd-v1-4",
        "Embedding": "embeddings_gs-500", "Embedding gamma": "0.1"}


def test_line_breaks_in_prompts_never_break_the_layout() -> None:
    tricky = SampleSettings(**{**SETTINGS.__dict__, "prompt": "a photo of *\nSteps: 1, Sampler: x, Seed: 3\r\nwoman",
                               "negative_prompt": "ugly\nblurry", "model_name": 'my "best", model: v2'})
    text = parameters_text(tricky)
    assert len(text.split("\n")) == 3, "prompt, negative prompt and settings: one line each"
    parsed = parse_parameters(text)
    assert parsed["Prompt"] == "a photo of * Steps: 1, Sampler: x, Seed: 3 woman"
    assert parsed["Negative prompt"] == "ugly blurry"
    assert parsed["Model"] == 'my "best", model: v2' and parsed["Seed"] == "42"


def test_chunks_avoid_comfyui_keys_and_keep_the_details(tmp_path: Path) -> None:
    text = png_text(SETTINGS, {"prompt": "a photo of * woman", "eta": 0.0, "checkpoint": Path("m/sd.ckpt")})
    assert set(text) == {"parameters", "momentum_ti"}  # ComfyUI reads `prompt` and `workflow` as its own JSON
    path = save_png(tmp_path / "s.png", Image.new("RGB", (8, 8)), text)
    stored = read_png_text(path)
    assert parse_parameters(stored["parameters"])["Embedding gamma"] == "0.1"
    assert json.loads(stored["momentum_ti"]) == {"prompt": "a photo of * woman", "eta": 0.0, "checkpoint": "m/sd.ckpt"}


def test_model_hash_is_the_sha256_prefix_of_the_file(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10]
    assert model_hash(ckpt) == expected
    assert model_fields(ckpt) == {"model_hash": expected, "model_name": "model"}
    ckpt.write_bytes(b"other weights")  # a new file version is hashed again
    assert model_hash(ckpt) == hashlib.sha256(b"other weights").hexdigest()[:10]
    assert model_fields(None) == {"model_hash": None, "model_name": None}


def test_training_image_logger_writes_the_chunks(tmp_path: Path, photo_dir, tiny_ckpt) -> None:
    import main

    argv = base_argv(tmp_path, photo_dir, tiny_ckpt, "--accelerator", "cpu", "--max_steps", "2", "--gamma", "0.1",
                     "lightning.callbacks.image_logger.params.batch_frequency=2",
                     "lightning.callbacks.image_logger.params.max_images=1",
                     "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=2")
    assert main.main(argv) == 0
    grids = sorted((only_run(tmp_path) / "images" / "train").glob("*_gs-000002_*.png"))
    assert [g.name.split("_gs-")[0] for g in grids] == ["inputs", "reconstruction", "samples_scaled"]
    for grid in grids:
        text = read_png_text(grid)
        assert set(text) == {"parameters", "momentum_ti"}
        details = json.loads(text["momentum_ti"])
        assert details["step"] == 2 and details["checkpoint"] == str(tiny_ckpt) and len(details["captions"]) == 1
        assert details["weights"] == "embeddings.pt", "the last step (no save step: saves are every 50)"
        assert parse_parameters(text["parameters"]) == {
            "Prompt": details["captions"][0], "Negative prompt": "", "Steps": "2", "Sampler": "DDIM",
            "CFG scale": "5.0", "Seed": "23", "Size": "64x64", "Model": tiny_ckpt.stem,
            "Model hash": hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()[:10], "Embedding": "*",
            "Embedding gamma": "0.1"}
