"""Validation during training: grids from fixed noise at every save, identity scores, the best embedding."""
from __future__ import annotations

import csv
import importlib.util
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import base_argv, only_run, script_identity_scores, shared_fixture
from PIL import Image

import main
from ldm.export import PrunedExport
from ldm.lora import LoraCheckpoint
from ldm.sampling_io import read_png_text
from ldm.train.callbacks import EmbeddingCheckpoint, step_weights_file
from ldm.train.validation.best import BestSave, IdentityScore
from ldm.train.validation.callback import ValidationSampler
from ldm.train.validation.settings import ValidationSettings, default_prompts

QUICK = ("lightning.callbacks.image_logger.params.disabled=true",
         "lightning.modelcheckpoint.params.every_n_train_steps=2", "--validation_ddim_steps", "2")


def vectors(path: Path) -> torch.Tensor:
    return torch.load(path, weights_only=True)["string_to_param"]["*"]


# ------------------------------------------------------------------------------- settings


def test_default_prompts_are_the_training_prompt_and_three_edits() -> None:
    prompts = default_prompts("* woman")
    assert prompts[0] == "a photo of a * woman" and len(prompts) == 4
    assert all("* woman" in p for p in prompts) and len(set(prompts)) == 4


def test_prompt_file_lines_with_the_placeholder_replaced(tmp_path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("a photo of * at the beach\n\n  * as a knight  \n")
    settings = ValidationSettings.from_config({"prompts_file": str(path), "ddim_steps": 5}, subject="sks woman",
                                              placeholder="sks")
    assert settings.prompts == ("a photo of sks at the beach", "sks as a knight") and settings.ddim_steps == 5


@pytest.mark.parametrize("node,expected", [
    ({"prompts_file": "missing.txt"}, "validation prompts: missing.txt not found"),
    ({"ddim_steps": 0}, "ddim_steps must be at least 1"),
    ({"ddim_step": 5}, "unknown lightning.validation keys ['ddim_step']"),
])
def test_bad_settings_say_what_is_wrong(node, expected) -> None:
    with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        ValidationSettings.from_config(node, subject="*", placeholder="*")


def test_slow_sampling_is_reported_once(tmp_path, caplog) -> None:
    sampler = ValidationSampler(ValidationSettings(prompts=("a",)), images_dir=tmp_path, ckptdir=tmp_path,
                                every_n_train_steps=10)
    with caplog.at_level(logging.WARNING):
        sampler.notice_if_slow(sampling_s=0.5, training_s=10.0, device="cpu")  # 5%: fine
        sampler.notice_if_slow(sampling_s=3.0, training_s=10.0, device="cpu")
        sampler.notice_if_slow(sampling_s=9.0, training_s=10.0, device="cpu")
    slow = [r.getMessage() for r in caplog.records if "Validation sampling took" in r.getMessage()]
    assert len(slow) == 1 and "30%" in slow[0] and "--no_validation" in slow[0]


# ---------------------------------------------------------------------------- best rule


def test_best_embedding_rule_on_scripted_scores(tmp_path, tiny_model) -> None:
    manager = tiny_model.embedding_manager
    best = BestSave.of_embedding(tmp_path, manager)
    script = [  # step, detection rate, mean distance, match fraction; expected: becomes the best?
        (10, 0.25, 0.30, 1.00, False),  # faces in under half the samples: never the best
        (20, 0.75, 0.70, 0.50, True),
        (30, 1.00, 0.65, 0.50, True),  # same match, lower distance
        (40, 1.00, 0.55, 0.75, True),  # higher match
        (50, 1.00, 0.55, 0.75, False),  # a tie keeps the earlier save
        (60, 1.00, 0.20, 0.50, False),  # lower match loses whatever the distance
        (70, 0.00, None, None, False),  # no face at all
    ]
    for step, rate, distance, match, expected in script:
        assert best.offer(IdentityScore(step, rate, distance, match)) is expected, step
    record = json.loads((tmp_path / "best.json").read_text())
    assert record["step"] == 40 and record["identity_match"] == 0.75 and "face_detect_rate >= 0.5" in record["rule"]
    assert torch.load(tmp_path / "embeddings_best.pt", weights_only=True)["step"] == 40
    assert (tmp_path / "embeddings_best.safetensors").is_file()
    resumed = BestSave.of_embedding(tmp_path, manager)  # a resumed run continues from best.json
    assert resumed.best.step == 40 and not resumed.offer(IdentityScore(80, 1.0, 0.6, 0.5))


# ------------------------------------------------------------------------------ in a run


def test_grids_at_every_save_start_from_the_same_noise(tmp_path, photo_dir, tiny_ckpt) -> None:
    # gamma 0: the embedding does not change the conditioning, so equal noise gives pixel-equal grids
    argv = base_argv(tmp_path, photo_dir, tiny_ckpt, "-n", "grids", "--gamma", "0", "--max_steps", "4", *QUICK)
    assert main.main(argv) == 0
    samples = only_run(tmp_path, "grids") / "images" / "validation"
    assert sorted(p.name for p in samples.iterdir()) == ["step-2.png", "step-4.png"]
    first, second = (Image.open(samples / name) for name in ("step-2.png", "step-4.png"))
    assert first.size == second.size and first.tobytes() == second.tobytes()
    text = read_png_text(samples / "step-4.png")
    assert text["prompts"].splitlines() == default_prompts("*") and text["step"] == "4" and text["steps"] == "2"
    assert text["weights"] == "embeddings_gs-4.pt"
    assert list((only_run(tmp_path, "grids") / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("kind", ["embedding", "lora", "dreambooth"])
def test_grids_name_the_file_that_keeps_the_weights_of_their_step(tmp_path, kind) -> None:
    """One rule for every kind of run: the save's file at a save step, the final file at the last step, none
    between saves (full DreamBooth keeps only the latest last.ckpt while it trains: no file at a save)."""
    module = SimpleNamespace(embedding_manager=object() if kind == "embedding" else None)
    writer = {"embedding": [], "lora": [LoraCheckpoint(tmp_path, 2, {})],
              "dreambooth": [PrunedExport(tmp_path / "model_pruned.ckpt")]}[kind]
    trainer = SimpleNamespace(callbacks=[EmbeddingCheckpoint(tmp_path, every_n_train_steps=2), *writer],
                              lightning_module=module)
    names = {"embedding": ("embeddings_gs-2.pt", "embeddings.pt", "embeddings_gs-4.pt"),
             "lora": ("lora_gs-2.safetensors", "lora.safetensors", "lora_gs-4.safetensors"),
             "dreambooth": (None, "model_pruned.ckpt", "model_pruned.ckpt")}[kind]
    found = [step_weights_file(trainer, step, final=final) for step, final in ((1, False), (2, False), (3, True),
                                                                                (4, True))]
    assert [path.name if path else None for path in found] == [None, *names]


def test_grids_differ_once_the_embedding_trains(tmp_path, photo_dir, tiny_ckpt) -> None:
    argv = base_argv(tmp_path, photo_dir, tiny_ckpt, "-n", "moving", "--gamma", "1", "--max_steps", "4", *QUICK,
                     "model.base_learning_rate=0.05")
    assert main.main(argv) == 0
    samples = only_run(tmp_path, "moving") / "images" / "validation"
    assert Image.open(samples / "step-2.png").tobytes() != Image.open(samples / "step-4.png").tobytes()


def test_run_keeps_the_best_scored_save(tmp_path, photo_dir, tiny_ckpt, monkeypatch, caplog) -> None:
    script = [(1.0, 0.62, 0.5), (1.0, 0.50, 1.0), (0.25, 0.30, 1.0)]  # saves at steps 2, 4, 6
    script_identity_scores(monkeypatch, script)
    argv = base_argv(tmp_path, photo_dir, tiny_ckpt, "-n", "best", "--max_steps", "6", "--validation_identity",
                     *QUICK)
    with caplog.at_level(logging.INFO):
        assert main.main(argv) == 0
    ckpts = only_run(tmp_path, "best") / "checkpoints"
    assert json.loads((ckpts / "best.json").read_text())["step"] == 4
    assert torch.equal(vectors(ckpts / "embeddings_best.pt"), vectors(ckpts / "embeddings_gs-4.pt"))
    with open(ckpts.parent / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/identity_match")]
    assert [(int(r["step"]), float(r["val/identity_match"]), float(r["val/face_detect_rate"])) for r in rows] == \
        [(2, 0.5, 1.0), (4, 1.0, 1.0), (6, 1.0, 0.25)]
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Training done")]
    assert len(summary) == 1 and "embeddings_best.pt (step 4" in summary[0] and "images/validation" in summary[0]
    (advice,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Use ")]
    assert advice.startswith(f"Use the best embedding (step 4), {ckpts / 'embeddings_best.pt'}. Sample with it: ")
    assert f"--embedding_path {ckpts / 'embeddings_best.pt'} " in advice


@pytest.mark.skipif(importlib.util.find_spec("dlib") is None, reason="needs dlib")
def test_no_best_embedding_without_faces_in_the_samples(tmp_path, tiny_ckpt, caplog) -> None:
    photos = tmp_path / "obama"
    photos.mkdir()
    for name in ("obama_1.jpg", "obama_2.jpg"):
        shutil.copy(shared_fixture(f"faces/{name}"), photos / name)
    argv = base_argv(tmp_path / "logs", photos, tiny_ckpt, "-n", "noface", "--max_steps", "2",
                     "--validation_identity", *QUICK)
    with caplog.at_level(logging.INFO):
        assert main.main(argv) == 0, "random weights draw no faces; the run goes on"
    run = only_run(tmp_path / "logs", "noface")
    assert not list(run.glob("checkpoints/*best*")), "no best is picked without faces"
    assert "Step 2: no identity score (no face found in the 8 validation samples)" in caplog.text
    with open(run / "csv" / "metrics.csv") as f:
        rates = [float(r["val/face_detect_rate"]) for r in csv.DictReader(f) if r.get("val/face_detect_rate")]
    assert rates == [0.0]


def test_no_validation_flag_samples_nothing(tmp_path, photo_dir, tiny_ckpt) -> None:
    argv = base_argv(tmp_path, photo_dir, tiny_ckpt, "-n", "off", "--max_steps", "2", "--no_validation", *QUICK)
    assert main.main(argv) == 0
    assert not (only_run(tmp_path, "off") / "images" / "validation").exists()


def test_missing_validation_prompt_file_exits_2_with_one_line(tmp_path, photo_dir, tiny_ckpt, caplog) -> None:
    argv = base_argv(tmp_path, photo_dir, tiny_ckpt, "--validation_prompts", str(tmp_path / "nope.txt"))
    with caplog.at_level(logging.INFO):
        assert main.main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "nope.txt not found" in errors[0]
