"""What a short run leaves for its user: metrics on disk, a step progress bar, a summary; flags; tiny photos."""
from __future__ import annotations

import csv
import logging
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers import ROOT, TXT2IMG_QUICK, advised_command, base_argv, load_script, only_run, subprocess_env, write_photos
from PIL import Image

import main
from ldm.data.images import DataRootError
from ldm.data.personalized import PersonalizedBase
from ldm.train.run_log import SamplingCommand, format_duration
from ldm.train.training import configure, load_config

TINY = "configs/tiny/v1-finetune.yaml"


def test_a_3_step_run_has_its_metrics_on_disk_and_a_summary(tmp_path, photo_dir, tiny_ckpt, caplog, capfd,
                                                            monkeypatch) -> None:
    # log_every_n_steps is 10 here: Lightning alone would write no train/loss for a 3-step run
    argv = base_argv(tmp_path, photo_dir, tiny_ckpt, "-n", "short", "--max_steps", "3", "--no_validation",
                     "lightning.callbacks.image_logger.params.disabled=true")
    with caplog.at_level(logging.INFO):
        assert main.main(argv) == 0
    run = only_run(tmp_path, "short")
    with open(run / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [3], "the last step's values, at its number (the 3rd step: 3)"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [3]

    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Training done")]
    assert len(summary) == 1 and "3 steps (to step 3)" in summary[0] and "it/s" in summary[0]
    assert "loss final" in summary[0] and "lowest" in summary[0]
    captured = capfd.readouterr()
    bar = captured.out + captured.err
    assert re.search(r"Training step: 100%\|[^|]*\| 3/3 \[", bar), "the bar counts steps up to max_steps"
    assert "v_num" not in bar and "Epoch 0" not in bar.split("Training step")[-1]

    # the next step: the final embedding (no identity scores here) and a command that samples with it
    advice, command = advised_command(caplog)
    final = run / "checkpoints" / "embeddings.pt"
    assert advice.startswith(f"Use the final embedding, {final}. Sample with it: python scripts/stable_txt2img.py ")
    assert command[command.index("--embedding_path") + 1] == str(final)
    assert command[command.index("--prompt") + 1] == "a photo of a *" and "--lora" not in command
    monkeypatch.chdir(tmp_path)  # --outdir is relative: outputs/<run>
    assert load_script("stable_txt2img").main([*command, *TXT2IMG_QUICK]) == 0, "the command runs as printed"
    assert list((tmp_path / "outputs" / run.name / "samples").glob("*.png"))


@pytest.mark.parametrize("factor,named", [(4, True), (8, False), (None, False)])
def test_the_sampling_command_names_an_autoencoder_factor_other_than_sd_s(factor, named) -> None:
    """The toy model's autoencoder downsamples by 4: stable_txt2img.py's default --f 8 would refuse it."""
    command = SamplingCommand(config=Path("run.yaml"), ckpt="toy.safetensors", prompt="a photo of a *", size=64,
                              outdir=Path("outputs/run"), latent_factor=factor).line(Path("e.pt"))
    args = shlex.split(command)
    assert ("--f" in args) == named
    if named:
        assert args[args.index("--f") + 1] == str(factor)


@pytest.mark.parametrize("kind, result, ckpt, loras, embedding", [
    ("embedding", "e.pt", "base.ckpt", ["x.safetensors:0.5"], "e.pt"),
    ("LoRA", "lora_best.safetensors", "base.ckpt", ["x.safetensors:0.5", "lora_best.safetensors"], None),
    ("model", "model_pruned.ckpt", "model_pruned.ckpt", [], None),  # the export holds the folded LoRA already
])
def test_the_sampling_command_passes_each_kind_of_result_with_its_flag(kind, result, ckpt, loras, embedding) -> None:
    command = SamplingCommand(config=Path("run.yaml"), ckpt="base.ckpt", prompt="a photo of a sks woman", size=64,
                              outdir=Path("outputs/run"), kind=kind, loras=("x.safetensors:0.5",)).line(Path(result))
    parsed = load_script("stable_txt2img").build_parser().parse_args(shlex.split(command)[2:])
    assert (parsed.ckpt, parsed.lora, parsed.embedding_path) == (ckpt, loras, embedding)
    assert (parsed.config, parsed.prompt, parsed.H, parsed.outdir) == ("run.yaml", "a photo of a sks woman", 64,
                                                                       "outputs/run")


NOISE = ("💡 Tip", "litlogger", "FLOPs", "in eval mode at the start of training", "deprecated")
QUICK_RUN = ("--max_steps", "2", "--no_validation", "lightning.callbacks.image_logger.params.disabled=true")


def rendered_lines(text: str) -> list[str]:
    """The lines a terminal shows: each carriage return overwrites the line so far."""
    return [line.split("\r")[-1] for line in text.split("\n")]


@pytest.mark.parametrize("stop,code", [((), 0), (("lightning.callbacks.stop.target=helpers.RaiseAtStep",
                                                 "lightning.callbacks.stop.params.step=1",
                                                 "lightning.callbacks.stop.params.action=SIGTERM"), 1)])
def test_a_run_says_only_what_the_user_can_act_on(tmp_path, photo_dir, tiny_ckpt, stop, code) -> None:
    argv = base_argv(tmp_path, photo_dir, tiny_ckpt, *QUICK_RUN, *stop)
    proc = subprocess.run([sys.executable, "main.py", *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=300, env=subprocess_env(OMP_NUM_THREADS="1"))  # one stream, as a terminal shows
    output = proc.stdout.decode()  # bytes: text mode would turn the bar's carriage returns into newlines
    assert proc.returncode == code, output[-3000:]
    assert [n for n in NOISE if n in output] == []
    assert output.count("are in eval mode on purpose") == 1 and "Model parts:" in output
    bars = [line for line in rendered_lines(output) if line.startswith("Training step:")
            and "Received SIGTERM" not in line]  # Lightning's notice, printed where the signal came
    assert len(bars) == 1, "the bar is shown once, complete or where it stopped, before what the run logs after it"
    assert bars[0].startswith("Training step: 100%" if code == 0 else "Training step:  50%")


def test_verbose_shows_what_is_hidden_by_default(tmp_path, photo_dir, tiny_ckpt, caplog, capfd) -> None:
    argv = base_argv(tmp_path, photo_dir, tiny_ckpt, *QUICK_RUN, "--verbose")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        assert main.main(argv) == 0
    shown = capfd.readouterr()
    text = "\n".join([shown.out, shown.err, caplog.text, *(str(w.message) for w in caught)])
    assert [n for n in NOISE[:4] if n not in text] == []


def test_format_duration() -> None:
    assert [format_duration(s) for s in (4.4, 75.2, 3725)] == ["4s", "1m15s", "1h02m05s"]


# ---------------------------------------------------------------------------------- flags


def test_flags_map_to_the_config(tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of *\n")
    opt, _ = main.build_parser().parse_known_args([
        "--base", TINY, "--num_vectors_per_token", "3", "--progressive_words", "--validation_prompts", str(prompts),
        "--validation_ddim_steps", "7", "--validation_identity", "--no_validation", "--num_nodes", "2"])
    config = load_config([TINY], [])
    configure(config, opt)
    embedding = config.model.params.personalization_config.params
    assert embedding.num_vectors_per_token == 3 and embedding.progressive_words is True
    assert dict(config.lightning.validation) == {"enabled": False, "prompts_file": str(prompts), "ddim_steps": 7,
                                                 "identity": True}
    assert config.lightning.trainer.num_nodes == 2


def test_facial_loss_turns_the_identity_score_on(tmp_path) -> None:
    opt, _ = main.build_parser().parse_known_args(["--base", TINY, "--use_facial_loss"])
    config = load_config([TINY], [])
    configure(config, opt)
    assert config.lightning.validation.identity is True and "enabled" not in config.lightning.validation


def test_num_nodes_is_documented_in_the_help() -> None:
    assert "NODE_RANK" in main.build_parser().format_help()


@pytest.mark.parametrize("flag,value,expected", [
    ("--num_vectors_per_token", "0", "--num_vectors_per_token must be at least 1"),
    ("--validation_ddim_steps", "0", "--validation_ddim_steps must be at least 1"),
])
def test_bad_flag_values_exit_2_with_one_line(tmp_path, photo_dir, tiny_ckpt, caplog, flag, value, expected) -> None:
    with caplog.at_level(logging.INFO):
        assert main.main(base_argv(tmp_path, photo_dir, tiny_ckpt, flag, value)) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and expected in errors[0]


# ---------------------------------------------------------------------------- tiny photos


def test_a_1x1_photo_is_skipped_and_named(tmp_path) -> None:
    folder = write_photos(tmp_path / "photos", count=2)
    Image.new("RGB", (1, 1), "red").save(folder / "thumb.png")
    data = PersonalizedBase(folder, size=64)
    assert data.num_images == 2
    assert [(p.name, reason) for p, reason in data.skipped] == [
        ("thumb.png", "too small: 1x1, the shorter side must be at least 16 px")]
    assert "thumb.png (too small" in data.summary()


def test_a_folder_of_thumbnails_stops_with_the_usual_error(tmp_path, tiny_ckpt, caplog) -> None:
    folder = tmp_path / "thumbs"
    folder.mkdir()
    Image.new("RGB", (1, 1), "red").save(folder / "thumb.png")
    with pytest.raises(DataRootError, match=r"no usable images .* thumb.png \(too small: 1x1"):
        PersonalizedBase(folder, size=512)
    with caplog.at_level(logging.INFO):
        assert main.main(base_argv(tmp_path / "logs", folder, tiny_ckpt)) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "thumb.png (too small: 1x1" in errors[0]


def test_min_image_side_is_a_quarter_of_the_training_size(tmp_path) -> None:
    folder = tmp_path / "sizes"
    folder.mkdir()
    for side in (127, 128, 300):
        Image.new("RGB", (side, side + 10), "gray").save(folder / f"{side}.png")
    data = PersonalizedBase(folder, size=512)
    assert sorted(Path(p).name for p in data.image_paths) == ["128.png", "300.png"]
    assert PersonalizedBase(folder, size=512, min_image_side=100).num_images == 3
