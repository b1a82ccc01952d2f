"""The settled config's checks (ldm/train/run_config.py) and the issue's mistakes through main.py: exit 2, one line."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers import ROOT, TINY, base_argv, error_lines
from omegaconf import OmegaConf

import main
from ldm.train.run_config import check_config, sections
from ldm.train.training import load_config

TINY_UNFROZEN = "configs/tiny/v1-finetune_unfrozen.yaml"
EMBEDDING = "model.params.personalization_config.params"
MISTAKES = {  # the extra arguments of a tiny run, and what its one error line must say
    "typo in the embedding's settings": ([f"{EMBEDDING}.gama=0.5"],
                                         f"{EMBEDDING}.gama is not a setting of EmbeddingManager"),
    "typo in a part's settings": (["model.params.unet_config.params.foo=1"],
                                  "model.params.unet_config.params.foo is not a setting of UNetModel"),
    "section without target": (["model.params.facial_loss_config.params.wieght=0.5"],
                               "model.params.facial_loss_config has no target (it holds ['params']): pass "
                               "--use_facial_loss"),
    "typo at the top": (["lightnin.trainer.max_steps=1"], "lightnin is not a setting of this project"),
    "typo in lightning": (["lightning.modelcheckpoint.params.every_n_train_step=5"],
                          "lightning.modelcheckpoint.params.every_n_train_step is not a setting"),
    "typo in the text encoder": (["model.params.cond_stage_config.params.text_config.hiden_size=8"],
                                 "model.params.cond_stage_config.params.text_config.hiden_size is not a setting of "
                                 "FrozenCLIPEmbedder"),
    "caption word against the placeholder": (["data.params.train.params.placeholder_token=sks"],
                                             "disagrees with the run's placeholder '*': set it with "
                                             "--placeholder_string"),
    "flag against key=value": (["--gamma", "0.5", f"{EMBEDDING}.gamma=0.3"], "on the command line disagree"),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_mistakes_exit_2_with_one_line_naming_the_key(tmp_path, photo_dir, tiny_ckpt, caplog, case) -> None:
    extra, expected = MISTAKES[case]
    with caplog.at_level(logging.INFO):
        assert main.main(base_argv(tmp_path / "logs", photo_dir, tiny_ckpt, *extra)) == 2
    errors = error_lines(caplog)
    assert len(errors) == 1 and "\n" not in errors[0] and expected in errors[0], errors
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("config", [TINY, TINY_UNFROZEN])
def test_no_pretrained_weights_no_training(tmp_path, photo_dir, caplog, config) -> None:
    argv = ["--base", config, "-t", "--data_root", str(photo_dir), "--logdir", str(tmp_path), "--class_word", "woman"]
    with caplog.at_level(logging.INFO):
        assert main.main(argv) == 2
    (error,) = error_lines(caplog)
    assert "no weights are given: pass --actual_resume" in error


TOY = "configs/toy"
FROM_SCRATCH = [[f"{TOY}/v1-inference.yaml", f"{TOY}/pretrain.yaml"], [f"{TOY}/autoencoder.yaml"],
                [f"{TOY}/autoencoder.yaml", f"{TOY}/autoencoder_full.yaml"]]
TRAINING_RUNS = [*([str(p.relative_to(ROOT))] for p in sorted(ROOT.glob("configs/*/v1-finetune*.yaml"))),
                 *FROM_SCRATCH, [f"{TOY}/v1-inference.yaml", f"{TOY}/pretrain.yaml", f"{TOY}/pretrain_continue.yaml"]]


@pytest.mark.parametrize("bases", FROM_SCRATCH, ids=lambda b: b[-1])
def test_configs_that_train_from_scratch_pass_the_checks(bases) -> None:
    check_config(load_config([str(ROOT / b) for b in bases], []))


@pytest.mark.parametrize("bases", TRAINING_RUNS, ids=lambda b: b[-1])
def test_every_section_the_project_builds_has_a_target_and_known_keys(bases) -> None:
    config = load_config([str(ROOT / b) for b in bases], ["model.params.ckpt_path=given.ckpt"])
    check_config(config)
    found = {name for name, _ in sections(config)}
    assert {"model", "data"} <= found


def test_a_check_without_t_leaves_no_log_dir(tmp_path, photo_dir, tiny_ckpt) -> None:
    argv = [a for a in base_argv(tmp_path / "logs", photo_dir, tiny_ckpt) if a != "-t"]
    assert main.main(argv) == 0
    assert not (tmp_path / "logs").exists()


def test_t_followed_by_an_override_trains_with_it() -> None:
    parser = main.build_parser()
    opt, unknown = parser.parse_known_args(["-t", "lightning.trainer.max_steps=1", "data.params.batch_size=2"])
    assert main.take_overrides(opt) == ["lightning.trainer.max_steps=1"] and opt.train is True
    assert unknown == ["data.params.batch_size=2"]
    opt, _ = parser.parse_known_args(["-t", "false"])
    assert main.take_overrides(opt) == [] and opt.train is False


def tiny_sections() -> list[str]:
    """The sections of the tiny embedding config that take params (lossconfig is read and not built)."""
    config = load_config([str(ROOT / TINY)], [])
    return [name for name, _ in sections(config) if not name.endswith("lossconfig")]


@pytest.mark.parametrize("section", tiny_sections())
def test_an_unknown_key_in_any_built_section_is_one_line_naming_it(tmp_path, photo_dir, tiny_ckpt, caplog,
                                                                   section) -> None:
    argv = [a for a in base_argv(tmp_path, photo_dir, tiny_ckpt, f"{section}.params.bogus_key=1") if a != "-t"]
    with caplog.at_level(logging.INFO):
        assert main.main(argv) == 2
    (error,) = error_lines(caplog)
    assert f"{section}.params.bogus_key is not a setting of" in error


@pytest.mark.parametrize("section", ["model.params.facial_loss_config", "model.params.prior_loss_config"])
def test_the_loss_terms_name_an_unknown_key(section) -> None:
    from ldm.train.dreambooth import PRIOR_LOSS_TARGET
    from ldm.train.flags import FACIAL_LOSS_TARGET
    from ldm.train.run_config import error_line
    from ldm.util import instantiate_from_config

    target = FACIAL_LOSS_TARGET if "facial" in section else PRIOR_LOSS_TARGET
    config = OmegaConf.create()
    OmegaConf.update(config, section, {"target": target, "params": {"wieght": 0.5}}, force_add=True)
    with pytest.raises(TypeError) as err:
        instantiate_from_config(OmegaConf.select(config, section))
    assert error_line(err.value, config).startswith(f"{section}.params.wieght is not a setting of")
