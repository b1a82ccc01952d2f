"""Several interruptions in one run: SIGTERM; SIGKILL while validating right after a save; SIGKILL two steps
after a save (a step already logged is then trained and logged again); SIGTERM; each followed by ``-r``, the
last one to the end. The run ends bit-identical to an uninterrupted one, ``last.ckpt`` is the only resume
point, and the metrics hold each step once, numbered as the files are.

The SIGKILLed runs are subprocesses; the others run in-process, on one CPU thread.
"""
from __future__ import annotations

import csv
import logging
import re
import signal
import subprocess
import sys
from pathlib import Path

import torch
from helpers import ROOT, base_argv, error_lines, only_run, subprocess_env

import main

MAX_STEPS = 9
FLAGS = ("--use_random_prompt", "--descriptive_p", "0.5", "--validation_ddim_steps", "1",
         "lightning.validation.samples_per_prompt=1", "lightning.validation.prompts=[a photo of a *]",
         "lightning.callbacks.image_logger.params.disabled=true", "lightning.trainer.log_every_n_steps=1",
         "lightning.modelcheckpoint.params.every_n_train_steps=3", "--max_steps", str(MAX_STEPS))
SIGTERM_AT = ("lightning.callbacks.interrupt.target=helpers.RaiseAtStep",
              "lightning.callbacks.interrupt.params.action=SIGTERM")


def resume(run: Path, *extra: str) -> int:
    return main.main(["-t", "-r", str(run), "--max_steps", str(MAX_STEPS), "data.params.num_workers=0", *extra])


def saved_step(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def loss_rows(run: Path) -> list[tuple[int, str]]:
    with open(run / "csv" / "metrics.csv") as f:
        return [(int(r["step"]), r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def tensorboard_losses(run: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def killed(run: Path, *overrides: str) -> None:
    """``main.py -t -r run`` in a subprocess that a test hook SIGKILLs."""
    proc = subprocess.run([sys.executable, "main.py", "-t", "-r", str(run), "--max_steps", str(MAX_STEPS), *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=subprocess_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == -signal.SIGKILL, (proc.stdout + proc.stderr)[-3000:]


def test_four_interruptions_end_as_the_uninterrupted_run(tmp_path, photo_dir, tiny_ckpt, one_thread, capfd) -> None:
    logs = tmp_path / "logs"
    common = base_argv(logs, photo_dir, tiny_ckpt, *FLAGS)
    assert main.main([*common, "-n", "straight"]) == 0
    straight = only_run(logs, "straight")

    # SIGTERM at step 2 (saves every 3 steps)
    assert main.main([*common, "-n", "chain", *SIGTERM_AT, "lightning.callbacks.interrupt.params.step=2"]) == 1
    run = only_run(logs, "chain")
    ckpts = run / "checkpoints"
    assert saved_step(ckpts / "last.ckpt") == 2

    # SIGKILL while the validation of the save at step 3 samples: last.ckpt of step 3 is already on disk
    killed(run, "lightning.callbacks.interrupt.params.step=0", "lightning.callbacks.kill.target=helpers.KillWhileSampling",
           "lightning.callbacks.kill.params.step=3")
    assert saved_step(ckpts / "last.ckpt") == 3
    assert not (run / "images" / "validation" / "step-3.png").exists(), "killed before the grid was written"

    # SIGKILL at the end of step 5: step 4 is logged (step 5 would be after the hook), then trained and logged
    # again from step 3
    killed(run, "lightning.callbacks.kill.params.step=0", "lightning.callbacks.halt.target=helpers.KillAtStep",
           "lightning.callbacks.halt.params.step=5")
    assert saved_step(ckpts / "last.ckpt") == 3
    assert [step for step, _ in loss_rows(run)][-1] == 4

    # SIGTERM at step 7, after the save at step 6
    assert resume(run, "lightning.callbacks.halt.params.step=0", "lightning.callbacks.interrupt.params.step=7") == 1
    assert saved_step(ckpts / "last.ckpt") == 7, "the SIGTERM save replaces last.ckpt"

    capfd.readouterr()
    assert resume(run, "lightning.callbacks.interrupt.params.step=0") == 0
    shown = capfd.readouterr()
    assert re.search(rf"Training step: 100%\|[^|]*\| {MAX_STEPS}/{MAX_STEPS} \[", shown.out + shown.err), \
        "after -r the bar counts steps up to max_steps"

    resumed = torch.load(ckpts / "embeddings.pt", weights_only=True)
    expected = torch.load(straight / "checkpoints" / "embeddings.pt", weights_only=True)
    assert resumed["step"] == MAX_STEPS
    assert torch.equal(resumed["string_to_param"]["*"], expected["string_to_param"]["*"])
    assert [p.relative_to(run).as_posix() for p in run.rglob("*.ckpt")] == ["checkpoints/last.ckpt"], \
        "one resume point: never a last-vN.ckpt, nor Lightning's own checkpoints"
    assert saved_step(ckpts / "last.ckpt") == MAX_STEPS
    assert sorted(p.name for p in (run / "images" / "validation").iterdir()) == \
        ["step-3.png", "step-6.png", "step-9.png"], "the resumed run samples the save the kill interrupted"

    steps = list(range(1, MAX_STEPS + 1))
    assert [step for step, _ in loss_rows(straight)] == steps, "step N holds the N-th step's loss"
    assert loss_rows(run) == loss_rows(straight), "one row per step across the resumes, with the same losses"
    assert tensorboard_losses(run) == tensorboard_losses(straight)


def test_a_damaged_resume_point_is_a_one_line_error(tmp_path, caplog) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"\x00 cut short")
    with caplog.at_level(logging.INFO):
        assert main.main(["-t", "-r", str(tmp_path)]) == 2
    (error,) = error_lines(caplog)
    assert error.startswith(f"cannot resume: {tmp_path / 'checkpoints' / 'last.ckpt'}")
