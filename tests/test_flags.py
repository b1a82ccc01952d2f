"""main.py's flag table (ldm/flags.py) and the ignored compatibility keys (ldm/compat.py)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import main
from ldm import compat
from ldm.compat import IGNORED_KEYS, drop_ignored_keys
from ldm.flags import FLAGS, FlagError, apply_flags
from ldm.training import RunPaths, add_run_settings, configure
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


@pytest.mark.parametrize("flag", FLAGS, ids=[f.name for f in FLAGS])
def test_every_flag_reaches_its_config_keys_and_the_help(flag, tmp_path) -> None:
    assert f"--{flag.name}" in main.build_parser().format_help()
    argv, value = sample_argv(flag, tmp_path)
    if flag.only_with:
        argv.append(f"--{flag.only_with}")
    config_file = DREAMBOOTH_CONFIG if flag.requires and flag.requires[0] == "dreambooth" else TI_CONFIG
    config = OmegaConf.load(config_file)
    apply_flags(config, main.build_parser().parse_args(argv))
    for key in flag.keys:
        key, expected = (key, [value] if flag.as_list else value) if isinstance(key, str) else key
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
