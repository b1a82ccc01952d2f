"""Ctrl-C, SIGUSR1 and SIGTERM during training save the embedding (and a resumable checkpoint)."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from helpers import base_argv

import main


def run(tmp_path: Path, photo_dir: Path, ckpt: Path, action: str, max_steps: int) -> tuple[int, Path]:
    argv = base_argv(tmp_path / "logs", photo_dir, ckpt, "--max_steps", str(max_steps),
                     "lightning.modelcheckpoint.params.every_n_train_steps=1000",
                     "lightning.callbacks.image_logger.params.disabled=true",
                     "lightning.callbacks.interrupt.target=helpers.RaiseAtStep",
                     "lightning.callbacks.interrupt.params.step=2",
                     f"lightning.callbacks.interrupt.params.action={action}")
    sigint = signal.getsignal(signal.SIGINT)
    try:
        code = main.main(argv)
    except SystemExit as exit_:  # Lightning exits with 1 after handling Ctrl-C
        code = exit_.code
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores SIGINT after a Ctrl-C
    (run_dir,) = (tmp_path / "logs").iterdir()
    return code, run_dir / "checkpoints"


def step_of(path: Path) -> int:
    return torch.load(path, weights_only=True)["step"]


def test_ctrl_c_saves_the_embedding_and_reports_failure(tmp_path, photo_dir, tiny_ckpt) -> None:
    code, ckpts = run(tmp_path, photo_dir, tiny_ckpt, "ctrl-c", max_steps=6)
    assert code == 1, "an interrupted run must not report success"
    assert step_of(ckpts / "embeddings.pt") == 2


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="this OS has no SIGUSR1")
def test_sigusr1_saves_and_training_goes_on(tmp_path, photo_dir, tiny_ckpt) -> None:
    previous = signal.getsignal(signal.SIGUSR1)
    code, ckpts = run(tmp_path, photo_dir, tiny_ckpt, "SIGUSR1", max_steps=5)
    assert code == 0
    assert (ckpts / "last.ckpt").is_file()
    assert step_of(ckpts / "embeddings.pt") == 5, "training went on to the end after the save"
    assert signal.getsignal(signal.SIGUSR1) == previous, "the handler is restored after training"


def test_sigterm_saves_and_stops(tmp_path, photo_dir, tiny_ckpt) -> None:
    code, ckpts = run(tmp_path, photo_dir, tiny_ckpt, "SIGTERM", max_steps=6)
    assert code == 1, "a run stopped by SIGTERM must not report success"
    saved = torch.load(ckpts / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2, "SIGTERM stops the run after the step it arrived in"
    assert step_of(ckpts / "embeddings.pt") == 2
