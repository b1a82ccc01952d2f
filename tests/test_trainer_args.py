"""Trainer arguments: every lightning.trainer key takes effect or is a one-line error; --gpus needs CUDA."""
from __future__ import annotations

import argparse
import logging

import pytest
import torch
from omegaconf import OmegaConf
from helpers import base_argv, error_lines

import main
from ldm.train import training
from ldm.train.flags import FlagError, apply_flags
from ldm.train.trainer_args import TrainerArgumentError, device_kwargs, trainer_kwargs


def flags(**given) -> argparse.Namespace:
    """main.py's trainer flags as parsed when only ``given`` are on the command line."""
    values = {"precision": None, "accumulate_grad_batches": None, "num_nodes": None, "max_steps": None,
              "max_epochs": None, "gpus": None, "accelerator": None, "devices": None}
    return argparse.Namespace(**{**values, **given})


# ------------------------------------------------------------------------------ resolution


def test_config_keys_take_effect_and_defaults_fill_the_rest() -> None:
    kwargs = trainer_kwargs({"accumulate_grad_batches": 2, "precision": 16, "max_epochs": 3, "benchmark": True})
    assert kwargs == {"accumulate_grad_batches": 2, "precision": "16-mixed", "max_epochs": 3, "benchmark": True,
                      "num_nodes": 1}


def parsed(*argv: str) -> argparse.Namespace:
    return main.build_parser().parse_args(list(argv))


def test_flags_win_over_the_config(caplog) -> None:
    config = OmegaConf.create({"lightning": {"trainer": {"max_steps": 6100, "precision": "32"}}})
    with caplog.at_level(logging.INFO):
        apply_flags(config, parsed("--max_steps", "5", "--precision", "bf16-mixed"))
        kwargs = trainer_kwargs(config.lightning.trainer)
    assert kwargs["max_steps"] == 5 and kwargs["precision"] == "bf16-mixed"
    assert "--max_steps 5 overrides lightning.trainer.max_steps=6100" in caplog.text


@pytest.mark.parametrize("config,expected", [
    ({"gpus": "0,"}, "lightning.trainer.gpus is set by main.py: use --gpus"),
    ({"devices": 2}, "lightning.trainer.devices is set by main.py: use --gpus"),
    ({"callbacks": []}, "use lightning.callbacks.<name> entries"),
    ({"accumulate_grad_batchs": 2}, "accumulate_grad_batchs is not an argument of Lightning's Trainer"),
    ({"precision": "fp8"}, "lightning.trainer.precision='fp8' is not a training precision; use --precision"),
    ({"accumulate_grad_batches": 0}, "lightning.trainer.accumulate_grad_batches=0 must be a whole number >= 1"),
    ({"num_nodes": "two"}, "lightning.trainer.num_nodes='two' must be a whole number >= 1; pass --num_nodes N"),
    ({"max_steps": 1.5}, "lightning.trainer.max_steps=1.5 must be a whole number >= -1"),
])
def test_bad_trainer_keys_are_one_line_errors(config, expected) -> None:
    with pytest.raises(TrainerArgumentError) as err:
        trainer_kwargs(config)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_bad_trainer_flags_are_one_line_errors() -> None:
    with pytest.raises(FlagError) as err:
        apply_flags(OmegaConf.create({}), parsed("--accumulate_grad_batches", "0"))
    assert str(err.value) == "--accumulate_grad_batches must be at least 1, got 0"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("opt,asked", [({"gpus": "0,"}, "--gpus 0,"), ({"accelerator": "gpu"}, "--accelerator gpu")])
def test_asking_for_a_gpu_without_cuda_is_an_error(opt, asked) -> None:
    with pytest.raises(TrainerArgumentError) as err:
        device_kwargs(flags(**opt))
    message = str(err.value)
    assert message.startswith(f"{asked} asks for a GPU, but CUDA is not available: ")
    assert "pass --accelerator cpu" in message and ("driver" in message or "CPU-only build" in message)


def test_accelerator_cpu_is_the_explicit_cpu_way() -> None:
    assert device_kwargs(flags(accelerator="cpu")) == {"accelerator": "cpu", "devices": 1, "strategy": "auto"}
    assert device_kwargs(flags(accelerator="cpu", devices="2"))["strategy"] == "ddp"


# ------------------------------------------------------------------------------ main.py


@pytest.fixture
def built_trainers(monkeypatch) -> list:
    """The Trainers main.py builds (set-up only, no -t)."""
    built = []
    build = training.build_trainer

    def recording(*args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(training, "build_trainer", recording)
    return built


@pytest.mark.parametrize("override,attribute,expected", [
    ("lightning.trainer.accumulate_grad_batches=2", "accumulate_grad_batches", 2),
    ("lightning.trainer.precision=bf16-mixed", "precision", "bf16-mixed"),
    ("lightning.trainer.num_nodes=2", "num_nodes", 2),
    ("lightning.trainer.max_steps=3", "max_steps", 3),
    ("lightning.trainer.max_epochs=2", "max_epochs", 2),
])
def test_dotted_overrides_reach_the_trainer(tmp_path, photo_dir, tiny_ckpt, built_trainers, caplog,
                                            override, attribute, expected) -> None:
    argv = base_argv(tmp_path, photo_dir, tiny_ckpt, "--accelerator", "cpu", override)
    argv.remove("-t")
    with caplog.at_level(logging.INFO):
        assert main.main(argv) == 0, error_lines(caplog)
    trainer = built_trainers[-1]
    value = trainer.num_nodes if attribute == "num_nodes" else getattr(trainer, attribute)
    assert value == expected
    if attribute == "accumulate_grad_batches":  # and the lr scales with it (tiny: batch 1, base lr 8e-4)
        lr = [r.args[0] for r in caplog.records if r.getMessage().startswith("learning rate")]
        assert lr == [pytest.approx(8e-4 * 2)]


@pytest.mark.parametrize("extra,expected", [
    (["lightning.trainer.devices=2"], "lightning.trainer.devices is set by main.py"),
    (["lightning.trainer.not_a_key=1"], "lightning.trainer.not_a_key is not an argument of Lightning's Trainer"),
    (["lightning.trainer.precision=16-mixed"], "16-mixed needs a GPU"),
    (["lightning.trainer.limit_train_batches=-3"], "Lightning's Trainer refused the arguments"),
])
def test_bad_overrides_exit_2_with_one_line(tmp_path, photo_dir, tiny_ckpt, caplog, extra, expected) -> None:
    argv = base_argv(tmp_path, photo_dir, tiny_ckpt, "--accelerator", "cpu", *extra)
    with caplog.at_level(logging.INFO):
        assert main.main(argv) == 2
    errors = error_lines(caplog)
    assert len(errors) == 1 and "\n" not in errors[0] and expected in errors[0], errors
    assert not list(tmp_path.glob("*/checkpoints/*")), "nothing is written"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_seed_gpus_flag_without_cuda_exits_2(tmp_path, photo_dir, tiny_ckpt, caplog) -> None:
    with caplog.at_level(logging.INFO):
        assert main.main(base_argv(tmp_path, photo_dir, tiny_ckpt, "--gpus", "0,")) == 2
    errors = error_lines(caplog)
    assert len(errors) == 1 and "CUDA is not available" in errors[0] and "--accelerator cpu" in errors[0], errors
    assert not list(tmp_path.iterdir()), "nothing is written"
