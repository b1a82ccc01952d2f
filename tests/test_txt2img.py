"""scripts/stable_txt2img.py and ldm.inference on the tiny config: outputs, determinism, embeddings, bad input."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PROMPT, ROOT, load_script, txt2img_argv, write_txt2img_files
from helpers_a1111 import parse_parameters
from PIL import Image

from ldm.checkpoint import ema_key, save_checkpoint
from ldm.inference import attach_embedding, load_model
from ldm.sampling_io import next_free_index, read_png_text

TINY_CONFIG = "configs/tiny/v1-inference.yaml"

txt2img = load_script("stable_txt2img")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return write_txt2img_files(tmp_path_factory.mktemp("tiny"))


def run(files: dict[str, Path], outdir: Path, *extra: str, embedding: bool = True) -> int:
    return txt2img.main(txt2img_argv(files, outdir, *extra, embedding=embedding))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def viewer(path: Path) -> dict[str, str]:
    """The sample's settings as AUTOMATIC1111's PNG Info reads them."""
    return parse_parameters(read_png_text(path)["parameters"])


def details(path: Path) -> dict:
    """This project's own record of the sample."""
    return json.loads(read_png_text(path)["momentum_ti"])


def samples(outdir: Path) -> list[Path]:
    return sorted((outdir / "samples").glob("*.png"))


# ---------------------------------------------------------------- outputs


def test_writes_samples_grid_and_text_chunks(files, tmp_path) -> None:
    out = tmp_path / "out"
    assert run(files, out, "--scale", "7", "--ddim_eta", "0.0") == 0
    written = samples(out)
    assert [p.name for p in written] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert [p.name for p in out.glob("grid-*.png")] == ["grid-0000.png"]
    assert Image.open(written[0]).size == (64, 64)
    assert Image.open(out / "grid-0000.png").size[1] > 2 * 64  # 2 rows (iterations) of 2
    text = read_png_text(written[0])
    assert set(text) == {"parameters", "momentum_ti"}, "no ComfyUI key (prompt, workflow)"
    model_hash = hashlib.sha256(files["ckpt"].read_bytes()).hexdigest()[:10]
    assert parse_parameters(text["parameters"]) == {
        "Prompt": PROMPT, "Negative prompt": txt2img.DEFAULT_NEGATIVE_PROMPT, "Steps": "4", "Sampler": "DDIM",
        "CFG scale": "7.0", "Seed": "42", "Size": "64x64", "Model hash": model_hash, "Model": "tiny",
        "Embedding": "emb", "Embedding gamma": "0.5", "Embedding strength": "1.0"}
    expected = {"prompt": PROMPT, "negative_prompt": txt2img.DEFAULT_NEGATIVE_PROMPT, "seed": 42, "steps": 4,
                "scale": 7.0, "sampler": "DDIM", "eta": 0.0, "checkpoint": str(files["ckpt"]),
                "embedding": str(files["embedding"]), "gamma": 0.5, "strength": 1.0, "H": 64, "W": 64, "iteration": 0}
    assert details(written[0]) == expected
    assert viewer(out / "grid-0000.png")["Prompt"] == PROMPT and details(out / "grid-0000.png")["prompts"] == [PROMPT]
    assert not list(out.rglob("*.tmp"))


def test_second_run_continues_numbering_and_is_identical(files, tmp_path) -> None:
    out = tmp_path / "out"
    assert run(files, out) == 0
    first = {p.name: p.read_bytes() for p in samples(out)}
    assert run(files, out) == 0
    written = samples(out)
    assert [p.name for p in written] == [f"{i:05}.png" for i in range(8)]
    assert sorted(p.name for p in out.glob("grid-*.png")) == ["grid-0000.png", "grid-0001.png"]
    for name, data in first.items():
        assert (out / "samples" / name).read_bytes() == data, f"{name} was overwritten"
    for i in range(4):  # same seed, same device: identical pixels
        assert np.array_equal(pixels(written[i]), pixels(written[i + 4])), i
    assert not np.array_equal(pixels(written[0]), pixels(written[1])), "a batch's samples must differ"


def test_different_seed_differs(files, tmp_path) -> None:
    assert run(files, tmp_path / "a", "--seed", "1", "--skip_grid") == 0
    assert run(files, tmp_path / "b", "--seed", "2", "--skip_grid") == 0
    a, b = samples(tmp_path / "a")[0], samples(tmp_path / "b")[0]
    assert np.abs(pixels(a) - pixels(b)).max() > 0
    assert viewer(b)["Seed"] == "2"
    assert not list((tmp_path / "a").glob("grid-*.png"))


def test_plms(files, tmp_path) -> None:
    out = tmp_path / "out"
    assert run(files, out, "--plms", "--n_iter", "1") == 0
    written = samples(out)
    assert len(written) == 2 and viewer(written[0])["Sampler"] == "PLMS"
    assert run(files, tmp_path / "ddim", "--n_iter", "1") == 0
    assert not np.array_equal(pixels(written[0]), pixels(samples(tmp_path / "ddim")[0]))


def test_fixed_code_reuses_noise_across_iterations(files, tmp_path) -> None:
    out = tmp_path / "out"
    assert run(files, out, "--fixed_code", "--skip_grid") == 0
    written = samples(out)
    assert np.array_equal(pixels(written[0]), pixels(written[2]))
    assert np.array_equal(pixels(written[1]), pixels(written[3]))


def test_from_file_batches_prompts(files, tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("photo of a * woman\n\n   \na * woman smiling\nportrait of *\n")
    out = tmp_path / "out"
    assert run(files, out, "--from-file", str(prompts), "--n_iter", "1") == 0
    written = samples(out)  # batches of 2 prompts: [p1, p2], [p3]
    assert [viewer(p)["Prompt"] for p in written] == [
        "photo of a * woman", "a * woman smiling", "portrait of *"]


def test_skip_save_writes_only_grid(files, tmp_path) -> None:
    out = tmp_path / "out"
    assert run(files, out, "--skip_save", "--n_rows", "4") == 0
    assert not (out / "samples").exists()
    grid = Image.open(out / "grid-0000.png")
    assert grid.size[0] > grid.size[1], "4 images per row: one wide row"


def test_negative_prompt_is_the_unconditional_side(files, tmp_path) -> None:
    assert run(files, tmp_path / "a", "--n_iter", "1", "--skip_grid") == 0
    assert run(files, tmp_path / "b", "--n_iter", "1", "--skip_grid", "--negative_prompt", "") == 0
    assert run(files, tmp_path / "c", "--n_iter", "1", "--skip_grid", "--negative_prompt", "", "--scale", "1") == 0
    a, b, c = (samples(tmp_path / d)[0] for d in "abc")
    assert not np.array_equal(pixels(a), pixels(b))
    assert viewer(b)["Negative prompt"] == "" and details(b)["negative_prompt"] == ""
    assert not np.array_equal(pixels(b), pixels(c)), "scale 7.5 vs 1 must differ"


# ---------------------------------------------------------------- embeddings and gamma


def test_gamma_remixes_the_embedding(files, tmp_path) -> None:
    for name, extra in (("stored", ()), ("gamma1", ("--gamma", "1")), ("gamma0", ("--gamma", "0"))):
        assert run(files, tmp_path / name, "--n_iter", "1", "--skip_grid", *extra) == 0
    assert run(files, tmp_path / "plain", "--n_iter", "1", "--skip_grid", embedding=False) == 0
    stored, gamma1, gamma0, plain = (pixels(samples(tmp_path / d)[0]) for d in ("stored", "gamma1", "gamma0", "plain"))
    assert not np.array_equal(stored, gamma1), "--gamma 1 must change a gamma-0.5 embedding's output"
    assert not np.array_equal(stored, plain), "the embedding must change the output"
    assert np.array_equal(gamma0, plain), "gamma 0 must equal the plain model"
    assert viewer(samples(tmp_path / "gamma1")[0])["Embedding gamma"] == "1.0"
    assert "Embedding" not in viewer(samples(tmp_path / "plain")[0])


def test_gamma_zero_conditioning_equals_plain_model(files) -> None:
    model = load_model(ROOT / TINY_CONFIG, files["ckpt"], device="cpu")
    plain = model.get_learned_conditioning([PROMPT, "a * and a *"])
    manager = attach_embedding(model, files["embedding"], gamma=0.0)
    assert model.embedding_manager is manager and manager.gamma == 0.0
    assert torch.equal(model.get_learned_conditioning([PROMPT, "a * and a *"]), plain)
    manager.set_gamma(0.5)
    assert not torch.allclose(model.get_learned_conditioning([PROMPT]), plain[:1])


def test_strength_scales_the_embedding_about_e_p(files, tmp_path) -> None:
    """Strength 1 is the embedding as trained, 0 the placeholder's own row (the plain model)."""
    for name, extra in (("stored", ()), ("s1", ("--strength", "1")), ("s0", ("--strength", "0")),
                        ("s2", ("--strength", "2"))):
        assert run(files, tmp_path / name, "--n_iter", "1", "--skip_grid", *extra) == 0
    assert run(files, tmp_path / "plain", "--n_iter", "1", "--skip_grid", embedding=False) == 0
    first = {d: samples(tmp_path / d)[0] for d in ("stored", "s1", "s0", "s2", "plain")}
    stored, s1, s0, s2, plain = (pixels(path) for path in first.values())
    assert np.array_equal(s1, stored), "strength 1 must be the embedding as trained"
    assert np.array_equal(s0, plain), "strength 0 must place e_p, the placeholder's own row"
    assert not np.array_equal(s2, stored) and not np.array_equal(s2, plain)
    assert viewer(first["s2"])["Embedding strength"] == "2.0" and details(first["s2"])["strength"] == 2.0
    assert "Embedding strength" not in viewer(first["plain"]) and details(first["plain"])["strength"] is None


@pytest.mark.parametrize(("strength", "gamma"), [(0.5, 0.25), (2.0, 1.0)])
def test_strength_is_e_p_plus_s_times_the_offset(files, strength: float, gamma: float) -> None:
    """The file's gamma is 0.5: e_p + s (e - e_p) = e_p + (0.5 s) (v - e_p), i.e. a re-mix at gamma 0.5 s."""
    model = load_model(ROOT / TINY_CONFIG, files["ckpt"], device="cpu")
    attach_embedding(model, files["embedding"], strength=strength)
    scaled = model.get_learned_conditioning([PROMPT])
    attach_embedding(model, files["embedding"], gamma=gamma)
    torch.testing.assert_close(scaled, model.get_learned_conditioning([PROMPT]), rtol=0, atol=1e-5)


def test_load_model_is_frozen_eval_on_device(files) -> None:
    model = load_model(ROOT / TINY_CONFIG, files["ckpt"], device="cpu")
    assert not model.training and not model.model.training and not model.first_stage_model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.device == torch.device("cpu")
    reference = torch.load(files["ckpt"], weights_only=True)["state_dict"]
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(model.state_dict()[key], reference[key])
    manager = attach_embedding(model, files["embedding"])
    assert manager.gamma == 0.5 and manager.placeholders == ["*"]
    assert not any(p.requires_grad for p in manager.parameters())


def test_load_model_use_ema_takes_the_shadow_weights(files, tmp_path) -> None:
    state = torch.load(files["ckpt"], weights_only=True)["state_dict"]
    shadows = {ema_key(k): torch.full_like(v, 0.25) for k, v in state.items()
               if k.startswith("model.") and v.is_floating_point()}
    ckpt = save_checkpoint(tmp_path / "ema.ckpt", {**state, **shadows, "model_ema.decay": torch.tensor(0.9999)})
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(load_model(ROOT / TINY_CONFIG, ckpt, device="cpu").state_dict()[key], state[key])
    ema = load_model(ROOT / TINY_CONFIG, ckpt, use_ema=True, device="cpu")
    assert torch.all(ema.state_dict()[key] == 0.25)
    assert not hasattr(ema, "model_ema"), "EMA is applied at load time, no shadow module is kept"


def test_missing_placeholder_warns(files, tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="stable_txt2img"):
        assert run(files, tmp_path / "out", "--prompt", "a photo of a woman", "--n_iter", "1", "--skip_save") == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "stable_txt2img"]
    assert len(warnings) == 1 and "['*']" in warnings[0].getMessage() and "\n" not in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stable_txt2img"):
        assert run(files, tmp_path / "out2", "--n_iter", "1", "--skip_save") == 0
    assert not [r for r in caplog.records if r.name == "stable_txt2img" and r.levelno >= logging.WARNING]


# ---------------------------------------------------------------- bad input


def _empty_prompt_file(files: dict[str, Path]) -> str:
    empty = files["root"] / "empty.txt"
    empty.write_text("\n  \n")
    return str(empty)


BAD_INPUTS = {  # case: (extra flags from the files, text the one-line error must contain)
    "H not /8": (lambda f: ["--H", "60"], "--H=60 must be a multiple of 8"),
    "W not /f": (lambda f: ["--W", "72", "--f", "16"], "--W=72 must be a multiple of 16"),
    "1024-d embedding for a 32-d encoder": (lambda f: ["--embedding_path", str(f["sd2"])], "dimension 1024"),
    "ckpt as embedding": (lambda f: ["--embedding_path", str(f["ckpt"])], "--embedding_path: "),
    "yaml as embedding": (lambda f: ["--embedding_path", str(f["yaml"])], "text file"),
    "missing embedding": (lambda f: ["--embedding_path", str(f["root"] / "nope.pt")], "not found"),
    "empty prompt file": (lambda f: ["--from-file", _empty_prompt_file(f)], "no prompts"),
    "missing prompt file": (lambda f: ["--from-file", str(f["root"] / "nope.txt")], "not found"),
    "missing ckpt": (lambda f: ["--ckpt", str(f["root"] / "nope.ckpt")], "--ckpt: "),
    "missing config": (lambda f: ["--config", str(f["root"] / "nope.yaml")], "not found"),
    "yaml as ckpt": (lambda f: ["--ckpt", str(f["yaml"])], "--ckpt: "),
    "gamma out of range": (lambda f: ["--gamma", "1.5"], "[0, 1]"),
    "strength over 4": (lambda f: ["--strength", "4.5"], "--strength: strength must be in [0, 4]"),
    "negative strength": (lambda f: ["--strength", "-0.5"], "--strength: strength must be in [0, 4]"),
    "zero guidance scale": (lambda f: ["--scale", "0"], "--scale must be > 0"),
    "negative guidance scale": (lambda f: ["--scale", "-2"], "--scale must be > 0"),
    "plms with eta": (lambda f: ["--plms", "--ddim_eta", "0.5"], "--ddim_eta 0"),
    "wrong latent channels": (lambda f: ["--C", "3"], "--C 4"),
    "wrong downsampling": (lambda f: ["--f", "16"], "--f 8"),
    "too many steps": (lambda f: ["--ddim_steps", "1001"], "--ddim_steps 1001"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_cleanly(files, tmp_path, caplog, case: str) -> None:
    make_flags, expected = BAD_INPUTS[case]
    extra = make_flags(files)
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        code = run(files, out, *extra)
    assert code == 2
    assert not out.exists(), f"{case}: wrote into outdir"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert expected in errors[0], errors[0]


def test_strength_without_an_embedding_is_a_usage_error(files, tmp_path, caplog) -> None:
    with caplog.at_level(logging.ERROR):
        assert run(files, tmp_path / "out", "--strength", "2", embedding=False) == 2
    assert "--strength scales an embedding: pass --embedding_path" in caplog.text


def test_unknown_flag_is_a_usage_error(files, tmp_path) -> None:
    assert txt2img.main(["--no_such_flag"]) == 2


# ---------------------------------------------------------------- helpers and the real command line


def test_next_free_index_follows_the_highest(tmp_path) -> None:
    assert next_free_index(tmp_path / "absent") == 0
    for name in ("00003.png", "00010.png", "notes.png", "00011.jpg", "grid-0005.png"):
        (tmp_path / name).write_bytes(b"")
    assert next_free_index(tmp_path) == 11


def test_seed_command_line_runs_as_a_subprocess(files, tmp_path) -> None:
    """The seed's invocation (small numbers), from the repo root, without PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = tmp_path / "outputs" / "run"
    command = [sys.executable, "scripts/stable_txt2img.py", "--ddim_eta", "0.0", "--n_samples", "1", "--n_iter", "2",
               "--scale", "7", "--ddim_steps", "2", "--ckpt", str(files["ckpt"]), "--embedding_path",
               str(files["embedding"]), "--prompt", PROMPT, "--outdir", str(out),
               "--config", TINY_CONFIG, "--H", "64", "--W", "64"]
    result = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(samples(out)) == 2 and (out / "grid-0000.png").is_file()
