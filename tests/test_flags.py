"""main.py's flag table (ldm/train/flags.py) and the ignored compatibility keys (ldm/compat.py)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import main
from ldm import compat
from ldm.compat import IGNORED_KEYS, drop_ignored_keys
from ldm.train.flags import FACIAL_LOSS, FACIAL_LOSS_TARGET, FLAGS, FlagError, apply_flags
from ldm.train.run_config import configure
from ldm.train.training import RunPaths, add_run_settings, load_config
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
TI_CONFIG = ROOT / "configs" / "tiny" / "v1-finetune.yaml"
DREAMBOOTH_CONFIG = ROOT / "configs" / "tiny" / "v1-finetune_unfrozen.yaml"


def sample_argv(flag, tmp_path: Path) -> tuple[list[str], object]:
    """A command line giving ``flag`` a value, and the value its config keys should then hold."""
    if flag.type is None:
        return [f"--{flag.name}"], True
    if flag.choices:
        return [f"--{flag.name}", flag.choices[-1]], flag.choices[-1]
    if flag.type is str:
        path = tmp_path / f"{flag.name}.file"
        path.write_text("")
        return [f"--{flag.name}", str(path)], str(path)
    value = flag.type(1) if flag.type is int else 0.5
    return [f"--{flag.name}", str(value)], value


def config_for(flag) -> Path:
    """A tiny config with the section ``flag`` requires (the embedding config when it requires none)."""
    if flag.requires is None:
        return TI_CONFIG
    candidates = sorted((ROOT / "configs" / "tiny").glob("v1-finetune*.yaml"))
    return next(path for path in candidates if OmegaConf.select(OmegaConf.load(path), flag.requires[0]) is not None)


def switches_for(flag) -> list[str]:
    """The flags that switch on the part ``flag`` refines (``--use_facial_loss`` for the face term's weight)."""
    parts = {key.rsplit(".params.", 1)[0] for key in flag.keys if isinstance(key, str)}
    switches = [other.name for other in FLAGS for key in other.keys
                if not isinstance(key, str) and key[0].removesuffix(".target") in parts]
    return [*switches, *([flag.only_with] if flag.only_with else [])]


@pytest.mark.parametrize("flag", FLAGS, ids=[f.name for f in FLAGS])
def test_every_flag_reaches_its_config_keys_and_the_help(flag, tmp_path) -> None:
    assert f"--{flag.name}" in main.build_parser().format_help()
    argv, value = sample_argv(flag, tmp_path)
    argv += [f"--{switch}" for switch in switches_for(flag)]
    config = OmegaConf.load(config_for(flag))
    apply_flags(config, main.build_parser().parse_args(argv))
    for key in flag.keys:
        if isinstance(key, str):
            expected = [value] if flag.as_list or flag.repeat else value
            expected = expected if flag.convert is None else flag.convert(expected)
        else:
            key, expected = key
        for split in ("train", "validation"):
            found = OmegaConf.select(config, key.format(dataset=f"data.params.{split}"))
            assert found == expected, f"--{flag.name} did not write {key}"


def test_a_flag_not_given_leaves_the_config_alone() -> None:
    config = OmegaConf.load(TI_CONFIG)
    apply_flags(config, main.build_parser().parse_args([]))
    assert config == OmegaConf.load(TI_CONFIG)


@pytest.mark.parametrize("argv,config_file,expected", [
    (["--gamma", "1.5"], TI_CONFIG, "--gamma must be in [0, 1]"),
    (["--identifier", "ohwx"], TI_CONFIG, "--identifier is a DreamBooth option: train with --base"),
    (["--placeholder_string", "*"], DREAMBOOTH_CONFIG, "--placeholder_string cannot be used with DreamBooth"),
    (["--actual_resume", "missing.ckpt"], TI_CONFIG, "--actual_resume missing.ckpt does not exist"),
    (["--validation_ddim_steps", "0"], TI_CONFIG, "--validation_ddim_steps must be at least 1, got 0"),
])
def test_bad_flags_are_one_line_errors_naming_the_flag(argv, config_file, expected) -> None:
    with pytest.raises(FlagError) as err:
        apply_flags(OmegaConf.load(config_file), main.build_parser().parse_args(argv))
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_flags_for_parts_the_config_lacks_are_ignored() -> None:
    config = OmegaConf.create({"model": {"params": {}}})
    apply_flags(config, main.build_parser().parse_args(["--gamma", "0.5", "--data_root", "photos"]))
    assert config == OmegaConf.create({"model": {"params": {}}})


def test_ignored_keys_are_accepted_and_a_changed_one_is_logged_once(caplog, monkeypatch) -> None:
    monkeypatch.setattr(compat, "_reported", set())
    config = OmegaConf.load(TI_CONFIG).lightning.callbacks.image_logger
    config.params.clamp = False
    with caplog.at_level(logging.INFO, logger="ldm.compat"):
        instantiate_from_config(config)
        instantiate_from_config(config)
    assert [r.getMessage() for r in caplog.records].count(
        "ImageLogger: clamp=False has no effect here (accepted for the original code's configs)") == 1
    assert "clamp" in IGNORED_KEYS["ImageLogger"]
    with pytest.raises(TypeError, match="unexpected keyword argument 'clam'"):
        drop_ignored_keys("ImageLogger", {"clam": False})


def test_values_of_flags_for_missing_parts_are_not_checked() -> None:
    config = OmegaConf.load(DREAMBOOTH_CONFIG)
    apply_flags(config, main.build_parser().parse_args(["--gamma", "3", "--num_vectors_per_token", "0"]))
    assert OmegaConf.select(config, "model.params.personalization_config") is None


def test_an_empty_string_is_not_given() -> None:
    config = OmegaConf.load(TI_CONFIG)
    apply_flags(config, main.build_parser().parse_args(["--init_word", "", "--data_root", ""]))
    assert config == OmegaConf.load(TI_CONFIG)


def test_dreambooth_captions_with_its_identifier_even_with_an_embedding(tmp_path) -> None:
    config = OmegaConf.merge(OmegaConf.load(DREAMBOOTH_CONFIG),
                             {"model": OmegaConf.load(TI_CONFIG).model})  # both sections
    configure(config, main.build_parser().parse_args(["--identifier", "ohwx"]))
    assert config.data.params.train.params.placeholder_token == "ohwx"


def test_a_resumed_run_does_not_read_the_starting_embedding_again(tmp_path) -> None:
    config = OmegaConf.load(TI_CONFIG)
    opt = main.build_parser().parse_args(["--embedding_manager_ckpt", "start.pt"])
    configure(config, opt)
    assert config.model.params.embedding_manager_ckpt == "start.pt"
    devices, trainer = {"devices": 1}, {"accumulate_grad_batches": 1, "num_nodes": 1}
    resumed = RunPaths(tmp_path, tmp_path / "checkpoints", tmp_path / "configs", tmp_path / "checkpoints/last.ckpt")
    add_run_settings(config, opt, resumed, trainer, devices)
    assert "embedding_manager_ckpt" not in config.model.params
    assert config.model.params.training_seed == opt.seed


# ------------------------------------------------------------------ precedence (README, "Settings")
WITH_FACIAL_LOSS = f"{FACIAL_LOSS}.target={FACIAL_LOSS_TARGET}"


def settled(config_file: Path, argv: list[str], overrides: list[str]):
    """The config a run settles on for ``argv`` (flags) and ``overrides`` (key=value), as run_training does."""
    config = load_config([str(config_file)], overrides)
    configure(config, main.build_parser().parse_args(argv), overrides)
    return config


def test_a_flag_left_out_has_no_value() -> None:
    opt = main.build_parser().parse_args([])
    assert all(not flag.given(opt) for flag in FLAGS)


def test_the_facial_loss_weight_of_a_key_value_is_kept() -> None:
    weight = f"{FACIAL_LOSS}.params.weight=0.5"
    config = settled(TI_CONFIG, ["--use_facial_loss"], [weight])
    assert instantiate_from_config(OmegaConf.select(config, FACIAL_LOSS)).weight == 0.5
    assert settled(TI_CONFIG, ["--use_facial_loss", "--facial_loss_weight", "0.5"], [weight]) is not None
    with pytest.raises(FlagError, match="--facial_loss_weight 2.0 and .*weight=0.5 on the command line disagree"):
        settled(TI_CONFIG, ["--use_facial_loss", "--facial_loss_weight", "2"], [weight])


def test_a_configured_face_detector_is_kept() -> None:
    config = settled(TI_CONFIG, ["--use_facial_loss"], ["data.params.train.params.face_crops.detector=hog"])
    assert config.data.params.train.params.face_crops.detector == "hog"
    assert config.data.params.validation.params.face_crops == {}, "the face crops' own default (cnn)"
    assert config.lightning.validation.identity is True


def key_value(flag, tmp_path: Path) -> tuple[str, str, object]:
    """A ``key=value`` for the config key of ``flag`` that no flag or owner would write by itself."""
    key = flag.keys[0] if isinstance(flag.keys[0], str) else flag.keys[0][0]
    key = key.format(dataset="data.params.train")
    if not isinstance(flag.keys[0], str):
        fixed = flag.keys[0][1]
        value = (not fixed) if isinstance(fixed, bool) else fixed  # the switch's opposite
        return key, str(value).lower() if isinstance(value, bool) else value, value
    argv, value = sample_argv(flag, tmp_path)
    if flag.as_list or getattr(flag, "repeat", False):
        return key, f"[{value}]", [value]
    return key, str(value), value


@pytest.mark.parametrize("flag", FLAGS, ids=[f.name for f in FLAGS])
def test_a_key_value_given_alone_is_never_overwritten(flag, tmp_path) -> None:
    key, text, value = key_value(flag, tmp_path)
    config = settled(config_for(flag), [], [WITH_FACIAL_LOSS, f"{key}={text}"])
    assert OmegaConf.select(config, key) == value, f"{key}={text} was overwritten"


def test_a_given_gamma_wins_over_the_starting_embeddings(tiny_model, tmp_path) -> None:
    from ldm.modules.embedding_manager import EmbeddingManager

    start = EmbeddingManager(tiny_model.cond_stage_model, gamma=1.0).save(tmp_path / "start.pt")
    for argv, expected in ((["--gamma", "0.5"], 0.5), ([], 0.1)):  # the flag, else the config (0.1), not 1.0
        config = settled(TI_CONFIG, ["--embedding_manager_ckpt", str(start), *argv], [])
        torch.manual_seed(0)  # the tiny model's weights, so the file fits its text encoder
        assert instantiate_from_config(config.model).embedding_manager.gamma == expected


def test_a_flag_for_a_missing_part_is_ignored_with_one_line(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="ldm.train.flags"):
        settled(DREAMBOOTH_CONFIG, ["--gamma", "0.5", "--face_detector", "hog"], [])
    assert "--gamma is ignored: the config has no model.params.personalization_config" in caplog.text
    assert "--face_detector is ignored without --use_facial_loss" in caplog.text
