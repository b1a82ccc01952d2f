"""main.py on the tiny config: end to end, lr scaling, resume, DDP on 2 CPU processes, bad input.

Runs start from ``tiny_ckpt`` (the tiny model with its zero-initialised weights randomized, see
conftest) so that gradients reach the embedding. Most runs are in-process (``main.main(argv)``);
one end-to-end run and the DDP run are real subprocesses.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (ROOT, STAR, TINY, TOKEN_TABLE, WOMAN, base_argv, error_lines, only_run, subprocess_env,
                     write_photos)

import main
from ldm.checkpoint import load_embeddings
from ldm.models.diffusion.ddpm import LatentDiffusion


def vectors(path: Path) -> torch.Tensor:
    """The trainable v of an embedding file (its string_to_param holds e for other tools)."""
    return load_embeddings(path).params["*"]


# ----------------------------------------------------------------------------- end to end


def test_seed_command_end_to_end_subprocess(tmp_path, photo_dir, tiny_ckpt) -> None:
    device = ["--gpus", "0,"] if torch.cuda.is_available() else ["--accelerator", "cpu"]  # --gpus needs CUDA
    argv = base_argv(tmp_path, photo_dir, tiny_ckpt, "-n", "e2e", *device, "--gamma", "0.1",
                     "--max_steps", "6", "lightning.modelcheckpoint.params.every_n_train_steps=3",
                     "lightning.callbacks.image_logger.params.batch_frequency=3",
                     "lightning.callbacks.image_logger.params.max_images=2",
                     "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=5")
    proc = subprocess.run([sys.executable, "main.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    run = only_run(tmp_path, "astronaut_e2e_")  # logs/<data dir>_<name>_<time>
    ckpts = run / "checkpoints"
    for name in ("embeddings.pt", "embeddings_gs-3.pt", "embeddings_gs-6.pt", "last.ckpt"):
        assert (ckpts / name).is_file(), f"{name} missing: {sorted(os.listdir(ckpts))}"
    assert list((run / "configs").glob("*-project.yaml"))
    assert list((run / "images" / "train").glob("samples_scaled_gs-*.png")), "sample grids logged"

    with open(run / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert rows and all(math.isfinite(float(r["train/loss"])) for r in rows)

    saved = load_embeddings(ckpts / "embeddings.pt")
    assert saved.step == 6 and saved.gamma == pytest.approx(0.1)
    table = torch.load(tiny_ckpt, weights_only=True)["state_dict"][TOKEN_TABLE]
    assert torch.equal(saved.base["*"][0], table[STAR]), "e_p is the checkpoint's row of '*'"
    moved = (saved.params["*"][0] - table[WOMAN]).abs().max()
    assert moved > 1e-4, "the embedding must have trained away from the init word 'woman'"

    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6 and last["optimizer_states"]
    assert all(k.startswith("embedding_manager.") for k in last["state_dict"]), "no UNet/VAE/CLIP copies"
    assert (ckpts / "last.ckpt").stat().st_size < 100_000


# ---------------------------------------------------------------------------- lr scaling


@pytest.mark.parametrize("extra,expected", [
    ([], 8e-4 * 2 * 1 * 3),
    (["--scale_lr", "false"], 8e-4),
    (["--accelerator", "cpu", "--devices", "2"], 8e-4 * 2 * 2 * 3),
])
def test_scale_lr(tmp_path, photo_dir, tiny_ckpt, caplog, extra, expected) -> None:
    argv = [*base_argv(tmp_path, photo_dir, tiny_ckpt, "data.params.batch_size=2", "--accumulate_grad_batches", "3",
                       *extra)]
    argv.remove("-t")  # set up model, data and trainer only
    with caplog.at_level(logging.INFO):
        assert main.main(argv) == 0
    lr = [r.args[0] for r in caplog.records if r.getMessage().startswith("learning rate")]
    assert lr == [pytest.approx(expected)], "lr = base_lr * batch * devices * accumulation with --scale_lr"


# -------------------------------------------------------------------------------- resume


def test_resume_matches_an_uninterrupted_run(tmp_path, tiny_ckpt, one_thread) -> None:
    one_photo = write_photos(tmp_path / "one", count=1)
    # One photo, no flips: the data stream is the same whatever the resume point (see the report on
    # the data loader); everything else (timesteps, noise, latent samples, Adam state) must resume.
    common = base_argv(tmp_path / "logs", one_photo, tiny_ckpt, "data.params.train.params.flip_p=0")
    assert main.main([*common, "-n", "straight", "--max_steps", "6"]) == 0
    assert main.main([*common, "-n", "split", "--max_steps", "3"]) == 0
    split = only_run(tmp_path / "logs", "split")
    first_half = vectors(split / "checkpoints" / "embeddings.pt")
    assert main.main(["-t", "-r", str(split), "--max_steps", "6", "data.params.num_workers=0"]) == 0

    straight = vectors(only_run(tmp_path / "logs", "straight") / "checkpoints" / "embeddings.pt")
    resumed = load_embeddings(split / "checkpoints" / "embeddings.pt")
    assert resumed.step == 6
    assert not torch.allclose(resumed.params["*"], first_half, atol=1e-5), "the resumed run trained"
    # Measured on this tiny model: one step fewer moves the embedding by 5e-4 and another seed by 6e-3,
    # while only changing the CPU thread count between the runs moves it by 3e-5 (the loss amplifies
    # rounding); one thread makes the runs bit-identical here, 1e-4 leaves room for other CPUs' kernels.
    diff = float((resumed.params["*"] - straight).abs().max())
    assert diff <= 1e-4, f"3 steps + resume to 6 differ from 6 straight steps by {diff:.2e} (tol 1e-4; a step is ~5e-4)"


# ---------------------------------------------------------------------------------- DDP


def test_ddp_two_cpu_processes_end_with_the_same_embedding(tmp_path, photo_dir, tiny_ckpt) -> None:
    out = tmp_path / "gathered.json"
    argv = base_argv(tmp_path / "logs", photo_dir, tiny_ckpt, "-n", "ddp", "--accelerator", "cpu", "--devices", "2",
                     "--max_steps", "4", "lightning.callbacks.image_logger.params.disabled=true",
                     "lightning.callbacks.gather.target=helpers.GatherEmbeddings",
                     f"lightning.callbacks.gather.params.out={out}")
    proc = subprocess.run([sys.executable, "main.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=subprocess_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["strategy"] == "DDPStrategy"
    assert result["max_diff"] == 0.0, "both ranks must hold the same embedding"
    saved = load_embeddings(only_run(tmp_path / "logs", "_ddp_") / "checkpoints" / "embeddings.pt")
    assert saved.step == 4
    assert torch.equal(saved.params["*"], torch.tensor(result["rank0"]))


# ------------------------------------------------------------------------------ bad input


def _non_images(tmp_path: Path) -> Path:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a photo")
    (folder / "data.csv").write_text("a,b\n1,2\n")
    (folder / ".hidden.jpg").write_bytes(b"\xff\xd8")
    return folder


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _partial_ckpt(tmp_path: Path) -> Path:
    from ldm.checkpoint import save_checkpoint

    return save_checkpoint(tmp_path / "partial.ckpt", {"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)})


BAD_INPUTS = {
    "missing data_root": (lambda t: {"data_root": t / "nowhere"}, "does not exist"),
    "empty data_root": (lambda t: {"data_root": _empty(t)}, "no usable images"),
    "only non-images": (lambda t: {"data_root": _non_images(t)}, "no usable images"),
    "gamma above 1": (lambda t: {"extra": ["--gamma", "1.5"]}, "--gamma must be in [0, 1]"),
    "multi-token placeholder": (lambda t: {"extra": ["--placeholder_string", "sks person"]}, "['sks', 'person']"),
    "multi-token init word": (lambda t: {"extra": ["--init_word", "young woman"]}, "['young', 'woman']"),
    "missing checkpoint": (lambda t: {"ckpt": t / "missing.ckpt"}, "does not exist"),
    "YAML as checkpoint": (lambda t: {"ckpt": ROOT / TINY}, "v1-finetune.yaml"),
    "checkpoint not fitting the config": (lambda t: {"ckpt": _partial_ckpt(t)}, "missing"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(tmp_path, photo_dir, tiny_ckpt, caplog, case: str) -> None:
    make, expected = BAD_INPUTS[case]
    spec = make(tmp_path)
    logdir = tmp_path / "logs"
    argv = base_argv(logdir, spec.get("data_root", photo_dir), spec.get("ckpt", tiny_ckpt), *spec.get("extra", []))
    with caplog.at_level(logging.INFO):
        assert main.main(argv) == 2
    errors = error_lines(caplog)
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert expected in errors[0], errors[0]
    assert not list(logdir.glob("*/checkpoints/*")), "nothing may be written before training starts"


def test_a_config_without_a_validation_split_runs_no_validation_loop(tmp_path, photo_dir, tiny_ckpt,
                                                                     recwarn) -> None:
    argv = base_argv(tmp_path, photo_dir, tiny_ckpt, "--max_steps", "2", "--no_validation", "data.params.validation=null",
                     "lightning.callbacks.image_logger.params.disabled=true")
    assert main.main(argv) == 0
    warned = [str(w.message) for w in recwarn if "across ranks is zero" in str(w.message)]
    assert not warned, f"Lightning was handed an empty validation loader: {warned}"


def test_nan_loss_stops_and_keeps_the_last_good_embedding(tmp_path, photo_dir, tiny_ckpt, monkeypatch, caplog) -> None:
    forward = LatentDiffusion.forward

    def nan_after_3_steps(self, *args, **kwargs):
        loss, loss_dict = forward(self, *args, **kwargs)
        return (loss * float("nan"), loss_dict) if self.global_step >= 3 else (loss, loss_dict)

    monkeypatch.setattr(LatentDiffusion, "forward", nan_after_3_steps)
    argv = base_argv(tmp_path, photo_dir, tiny_ckpt, "-n", "nan", "--max_steps", "8",
                     "lightning.modelcheckpoint.params.every_n_train_steps=3")
    with caplog.at_level(logging.INFO):
        code = main.main(argv)
    assert code == 1, "a run stopped by a NaN loss must not report success"
    assert "Loss is nan at step 3" in caplog.text
    ckpts = only_run(tmp_path, "nan") / "checkpoints"
    good = vectors(ckpts / "embeddings_gs-3.pt")
    final = vectors(ckpts / "embeddings.pt")
    assert torch.isfinite(final).all()
    assert torch.equal(final, good), "the NaN step changed nothing"
    assert not (ckpts / "embeddings_gs-6.pt").exists()


def test_embedding_with_nan_never_overwrites_the_last_good_file(tmp_path, tiny_model, caplog) -> None:
    from types import SimpleNamespace

    from ldm.train.callbacks import EmbeddingCheckpoint
    from ldm.modules.embedding_manager import EmbeddingManager

    manager = EmbeddingManager(tiny_model.cond_stage_model, gamma=0.1)
    resume_points = []  # the steps last.ckpt was written at

    def save_checkpoint(path, weights_only):
        resume_points.append(module.global_step)
        Path(path).write_text("ckpt")

    trainer = SimpleNamespace(is_global_zero=True, save_checkpoint=save_checkpoint)
    module = SimpleNamespace(embedding_manager=manager, trainer=trainer, global_step=5)
    callback = EmbeddingCheckpoint(tmp_path, every_n_train_steps=5)
    callback.on_train_batch_end(module.trainer, module, None, None, 0)
    good = vectors(tmp_path / "embeddings_gs-5.pt")
    with torch.no_grad():
        manager.vectors[0][0, 0] = float("nan")
    callback.on_train_end(module.trainer, module)
    module.global_step = 10
    callback.on_train_batch_end(module.trainer, module, None, None, 0)
    assert not (tmp_path / "embeddings.pt").exists() and not (tmp_path / "embeddings_gs-10.pt").exists()
    assert torch.equal(vectors(tmp_path / "embeddings_gs-5.pt"), good)
    assert resume_points == [5], "last.ckpt keeps the last good step too"
    assert "Embedding holds NaN/Inf" in caplog.text
