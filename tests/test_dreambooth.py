"""DreamBooth on the tiny SD v1: data, prior-preservation loss, what trains, the pruned export, main.py."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import TXT2IMG_QUICK, advised_command, load_script, sd_v1_shapes, write_photos
from omegaconf import OmegaConf
from torch.utils.data import default_collate

import main
from ldm.checkpoint import load_weights, read_state_dict
from ldm.data.dreambooth import DreamBoothDataset
from ldm.train.dreambooth import prepare_dreambooth_model
from ldm.export import export_pruned, pruned_state_dict
from ldm.inference import load_model
from ldm.train.training import configure
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
TINY_UNFROZEN = ROOT / "configs" / "tiny" / "v1-finetune_unfrozen.yaml"
TINY_FINETUNE = ROOT / "configs" / "tiny" / "v1-finetune.yaml"
TINY_INFERENCE = ROOT / "configs" / "tiny" / "v1-inference.yaml"
PRUNED_GROUPS = ("model", "first_stage", "cond_stage", "schedule")
# Fast, quiet CPU runs of main.py: no workers, no sample grids, no validation.
QUIET = ["--accelerator", "cpu", "data.params.num_workers=0", "lightning.callbacks.image_logger.params.disabled=true",
         "lightning.trainer.enable_progress_bar=false", "lightning.trainer.enable_model_summary=false",
         "lightning.trainer.num_sanity_val_steps=0", "lightning.trainer.limit_val_batches=0"]


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("class") / "woman", count=4, size=64)


def dreambooth_config(args: list[str]):
    """The tiny unfrozen config with main.py's flags applied, as run_training does."""
    opt, dotlist = main.build_parser().parse_known_args(["--base", str(TINY_UNFROZEN), *args])
    config = OmegaConf.merge(OmegaConf.load(TINY_UNFROZEN), OmegaConf.from_dotlist(dotlist))
    configure(config, opt)
    return config


def dreambooth_model(args: list[str]):
    """The DreamBooth model and its train dataset for ``args`` (main.py flags)."""
    config = dreambooth_config(args)
    model = instantiate_from_config(config.model)
    prepare_dreambooth_model(model, config)
    model.learning_rate = 1e-3
    return model, instantiate_from_config(config.data.params.train)


@pytest.fixture(scope="module")
def base_args(tiny_ckpt, photo_dir, class_dir) -> list[str]:
    return ["--actual_resume", str(tiny_ckpt), "--data_root", str(photo_dir), "--reg_data_root", str(class_dir),
            "--class_word", "woman"]


@pytest.fixture(scope="module")
def prior_model(base_args):
    """A DreamBooth model with prior weight 0.5 and a batch of 2 subject photos with 2 class images."""
    model, data = dreambooth_model([*base_args, "--prior_loss_weight", "0.5"])
    return model, default_collate([data[0], data[1]])


def tiny_layout() -> set[str]:
    """The SD v1 keys of the tiny model: its own state dict plus CLIP's position ids."""
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.load(TINY_INFERENCE).model)
    return set(model.state_dict()) | {"cond_stage_model.transformer.text_model.embeddings.position_ids"}


# --------------------------------------------------------------------------------------------- data
def test_dataset_pairs_subject_photos_with_class_images(photo_dir, class_dir):
    data = DreamBoothDataset(photo_dir, reg_data_root=class_dir, class_word="woman", size=64, repeats=2, seed=0)
    item = data[0]
    assert item["caption"] == "a photo of a sks woman"
    assert item["class_caption"] == "a photo of a woman"
    assert item["image"].shape == item["class_image"].shape == (64, 64, 3)
    assert len(data) == 6
    assert [data[k]["class_image_index"] for k in range(6)] == [0, 1, 2, 3, 0, 1]
    plain = DreamBoothDataset(photo_dir, class_word="man", placeholder_token="ohwx", size=64)
    assert plain[0]["caption"] == "a photo of a ohwx man"
    assert not any(key.startswith("class_") for key in plain[0])


# ------------------------------------------------------------------------------------------- losses
def test_prior_loss_is_main_plus_weighted_prior_from_one_unet_call(prior_model):
    model, batch = prior_model
    z, captions = model.get_input(batch, "image")
    sizes = []
    hook = model.model.diffusion_model.register_forward_hook(lambda _m, args, _o: sizes.append(args[0].shape[0]))
    with torch.no_grad():
        torch.manual_seed(7)
        loss, logs = model(z, captions, batch)
        # The same draws in forward's order: class latents, subject timesteps, class timesteps, one noise.
        torch.manual_seed(7)
        prior = model.loss_terms[-1].class_batch(batch, model.encode_to_latents, model.device)
        t, t_class = model.diffusion.sample_timesteps(2), model.diffusion.sample_timesteps(2)
        noise = torch.randn((4, *z.shape[1:]))
        main_term, _ = model.p_losses(z, model.get_learned_conditioning(captions), t, noise[:2])
        prior_term, _ = model.p_losses(prior.latents, model.get_learned_conditioning(prior.captions), t_class,
                                       noise[2:])
    hook.remove()
    assert sizes[0] == 4, "subject and class rows must share one UNet call"
    assert prior.captions == ["a photo of a woman"] * 2 and captions == ["a photo of a sks woman"] * 2
    assert not torch.allclose(prior_term, main_term)
    # tolerance: fp32, one batch of 4 vs two batches of 2; the tiny UNet's 1x1 bottleneck GroupNorm
    # amplifies rounding differences between batch shapes (seen 1e-7 to 2.4e-5 relative)
    torch.testing.assert_close(loss, main_term + 0.5 * prior_term, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logs["train/loss_prior"], prior_term, rtol=1e-4, atol=1e-6)


def test_class_latents_are_cached_under_their_own_kind(prior_model):
    model, batch = prior_model
    model.latent_cache.clear()
    encodes = []
    hook = model.first_stage_model.encoder.register_forward_hook(lambda _m, args, _o: encodes.append(args[0].shape[0]))
    with torch.no_grad():
        model.shared_step(batch)
        model.shared_step(batch)
    hook.remove()
    assert encodes == [2, 2], "first step encodes 2 photos and 2 class images, the second step none"
    assert len(model.latent_cache) == 4


# ----------------------------------------------------------------------------------- what trains
@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_one_step_trains_the_unet_and_the_text_encoder_only_when_asked(base_args, train_text_encoder):
    model, data = dreambooth_model(base_args + (["--train_text_encoder"] if train_text_encoder else []))
    assert model.model.diffusion_model.output_blocks[0][0].use_checkpoint, "gradient checkpointing is on"
    optimizer = model.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    before = {key: value.clone() for key, value in model.state_dict().items()}
    model.train()
    loss, _ = model.shared_step(default_collate([data[0]]))
    loss.backward()
    optimizer.step()
    changed = {key for key, value in model.state_dict().items() if not torch.equal(value, before[key])}
    unet = {key for key in before if key.startswith("model.diffusion_model.")}
    text = {key for key in before if key.startswith("cond_stage_model.")}
    assert len(changed & unet) > 0.9 * len(unet)
    assert not any(key.startswith("first_stage_model.") for key in changed)
    assert bool(changed & text) == train_text_encoder


# ------------------------------------------------------------------------------------------ export
def test_export_of_full_sd_v1_has_the_released_layout():
    with torch.device("meta"):  # keys and shapes only: no memory, no time
        model = instantiate_from_config(OmegaConf.load(ROOT / "configs/stable-diffusion/v1-inference.yaml").model)
    exported = pruned_state_dict(model.state_dict())
    assert {key: tuple(value.shape) for key, value in exported.items()} == sd_v1_shapes(*PRUNED_GROUPS)


def test_export_of_the_tiny_model_round_trips(tmp_path, tiny_model):
    state = tiny_model.state_dict()  # momentum-TI model: has an embedding manager, which is left out
    state["model_ema.decay"] = torch.tensor(0.9999)
    full = export_pruned(state, tmp_path / "model.ckpt")
    half = export_pruned(state, tmp_path / "model-fp16.safetensors", half=True)
    exported = read_state_dict(full)
    assert set(exported) == tiny_layout()
    assert set(torch.load(full, map_location="cpu", weights_only=True)) == {"state_dict"}, "no optimizer state"
    assert exported["cond_stage_model.transformer.text_model.embeddings.position_ids"].tolist() == [list(range(77))]
    halved = read_state_dict(half)
    assert {v.dtype for k, v in halved.items() if k.endswith("weight")} == {torch.float16}
    assert halved["alphas_cumprod"].dtype == torch.float32, "schedule buffers stay exact"
    plain = export_pruned(state, tmp_path / "model.safetensors")
    assert 0.45 < half.stat().st_size / plain.stat().st_size < 0.55
    with_ema = read_state_dict(export_pruned(state, tmp_path / "ema.ckpt", include_ema=True))
    assert set(with_ema) - set(exported) == {"model_ema.decay"}
    fresh = instantiate_from_config(OmegaConf.load(TINY_INFERENCE).model)
    load_weights(fresh, exported)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_export_loads_in_diffusers_single_file_and_in_load_model(tmp_path, tiny_ckpt):
    from diffusers import UNet2DConditionModel

    path = export_pruned(read_state_dict(tiny_ckpt), tmp_path / "dreambooth.safetensors")
    ours = load_model(TINY_INFERENCE, path, device="cpu")  # what stable_txt2img.py --ckpt does
    reference = UNet2DConditionModel.from_single_file(str(path), original_config=str(TINY_INFERENCE),
                                                      local_files_only=True).eval()
    gen = torch.Generator().manual_seed(0)
    # 16x16 latents as in test_unet: at 8x8 the 1x1 bottom level makes GroupNorm ill-conditioned
    x, context = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        eps = ours.model.diffusion_model(x, t, context=context)
        eps_ref = reference(x, t, encoder_hidden_states=context).sample
    scale = eps_ref.abs().max().item()
    assert scale > 1e-2
    # tolerance: max abs diff <= 1e-5 x max|eps_ref| (fp32, same weights)
    assert (eps - eps_ref).abs().max().item() <= 1e-5 * scale


def test_export_cli_prunes_a_training_checkpoint(tmp_path, tiny_ckpt, caplog):
    script = load_script("export_checkpoint")
    target = tmp_path / "pruned.ckpt"
    assert script.main([str(tiny_ckpt), str(target), "--half"]) == 0
    assert set(read_state_dict(target)) == tiny_layout()
    ti_only = tmp_path / "ti-last.ckpt"
    torch.save({"state_dict": {"embedding_manager.vectors.0": torch.zeros(1, 32)}}, ti_only)
    with caplog.at_level(logging.ERROR):
        assert script.main([str(ti_only), str(tmp_path / "x.ckpt")]) == 2
    assert "no UNet weights" in caplog.text


# ------------------------------------------------------------------------------------ class images
def test_make_class_images_generates_the_missing_ones(tmp_path, tiny_ckpt, photo_dir):
    script = load_script("make_class_images")
    outdir = tmp_path / "class"
    args = ["--ckpt", str(tiny_ckpt), "--config", str(TINY_INFERENCE), "--class_word", "woman", "--outdir",
            str(outdir), "--n_images", "3", "--batch_size", "2", "--ddim_steps", "2", "--device", "cpu"]
    assert script.main(args) == 0
    names = sorted(p.name for p in outdir.iterdir())
    assert names == ["00000.png", "00001.png", "00002.png"]
    from helpers_a1111 import parse_parameters

    from ldm.sampling_io import read_png_text

    viewer = parse_parameters(read_png_text(outdir / "00002.png")["parameters"])
    assert viewer["Prompt"] == "a photo of a woman" and viewer["Seed"] == "44"  # the seed of its batch: 42 + 2
    assert script.main(args) == 0 and len(list(outdir.iterdir())) == 3
    data = DreamBoothDataset(photo_dir, reg_data_root=outdir, class_word="woman", size=64)
    assert data.class_images.num_images == 3


# ------------------------------------------------------------------------------------- main.py
def test_main_trains_exports_and_momentum_ti_runs_on_the_export(tmp_path, base_args, tiny_ckpt, photo_dir, caplog,
                                                                monkeypatch):
    logdir = tmp_path / "logs"
    with caplog.at_level(logging.INFO):
        rc = main.main(["--base", str(TINY_UNFROZEN), "-t", *base_args, "--train_text_encoder", "--export_format",
                        "safetensors", "--precision", "bf16-mixed", "--max_steps", "1", "--logdir", str(logdir),
                        "-n", "db", *QUIET])
    assert rc == 0
    ckptdir = next(logdir.glob("*db*")) / "checkpoints"
    advice, args = advised_command(caplog)  # the summary's command samples the exported model as printed
    assert advice.startswith(f"Use the final model, {ckptdir / 'model_pruned.safetensors'}. Sample with it: ")
    parsed = load_script("stable_txt2img").build_parser().parse_args(args)
    assert (parsed.ckpt, parsed.lora, parsed.embedding_path) == (str(ckptdir / "model_pruned.safetensors"), [], None)
    assert parsed.prompt == "a photo of a sks woman"
    pruned = read_state_dict(ckptdir / "model_pruned.safetensors")
    assert set(pruned) == tiny_layout()
    base = read_state_dict(tiny_ckpt)
    assert not torch.equal(pruned["model.diffusion_model.out.2.weight"], base["model.diffusion_model.out.2.weight"])
    last = torch.load(ckptdir / "last.ckpt", map_location="cpu", weights_only=False)  # our own file
    assert last["global_step"] == 1
    assert {k for k in last["state_dict"] if k.startswith("model.diffusion_model.")} == \
        {k for k in pruned if k.startswith("model.diffusion_model.")}, "last.ckpt keeps the full UNet"
    assert len(last["optimizer_states"][0]["state"]) > 0
    for key, value in pruned.items():
        if key in last["state_dict"]:
            assert torch.equal(value, last["state_dict"][key]), key

    rc = main.main(["--base", str(TINY_FINETUNE), "-t", "--actual_resume", str(ckptdir / "model_pruned.safetensors"),
                    "--data_root", str(photo_dir), "--max_steps", "2", "--logdir", str(logdir), "-n", "ti", *QUIET])
    assert rc == 0
    assert (next(logdir.glob("*ti*")) / "checkpoints" / "embeddings.pt").is_file()
    monkeypatch.chdir(tmp_path)  # --outdir is relative: outputs/<run>
    assert load_script("stable_txt2img").main([*args, *TXT2IMG_QUICK]) == 0, "the command runs as printed"


@pytest.mark.parametrize("case, expected", [
    ("empty_reg", "class images missing: no usable image"),
    ("missing_reg", "class images missing: reg_data_root"),
    ("identifier", "identifier 'zxqvbnm' must be a single CLIP token"),
    ("nothing_trainable", "nothing to train"),
    ("ti_config", "--reg_data_root is a DreamBooth option"),
    ("zero_weight", "prior_loss_weight must be > 0"),
])
def test_bad_input_exits_2_with_one_line_before_training(tmp_path, base_args, case, expected, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {
        "empty_reg": ["--base", str(TINY_UNFROZEN), *base_args, "--reg_data_root", str(empty)],
        "missing_reg": ["--base", str(TINY_UNFROZEN), *base_args, "--reg_data_root", str(tmp_path / "nope")],
        "identifier": ["--base", str(TINY_UNFROZEN), *base_args, "--identifier", "zxqvbnm"],
        "nothing_trainable": ["--base", str(TINY_UNFROZEN), *base_args, "dreambooth.train_unet=false"],
        "ti_config": ["--base", str(TINY_FINETUNE), *base_args],
        "zero_weight": ["--base", str(TINY_UNFROZEN), *base_args, "--prior_loss_weight", "0"],
    }[case]
    with caplog.at_level(logging.ERROR, logger="main"):
        rc = main.main([*args, "-t", "--logdir", str(tmp_path / "logs"), *QUIET])
    errors = [r.getMessage() for r in caplog.records if r.name == "main" and r.levelno >= logging.ERROR]
    assert rc == 2
    assert len(errors) == 1 and expected in errors[0] and "\n" not in errors[0], errors
    assert not list((tmp_path / "logs").glob("*/checkpoints"))


@pytest.mark.parametrize("kind", ["stable-diffusion", "tiny"])
def test_unfrozen_configs_train_the_unet_with_gradient_checkpointing(kind):
    config = OmegaConf.load(ROOT / "configs" / kind / "v1-finetune_unfrozen.yaml")
    assert "personalization_config" not in config.model.params
    assert config.model.params.unet_config.params.use_checkpoint is True
    assert config.dreambooth.identifier == "sks" and config.dreambooth.prior_loss_weight == 1.0
    assert {config.data.params[split].target for split in ("train", "validation")} == \
        {"ldm.data.dreambooth.DreamBoothDataset"}
    opt = main.build_parser().parse_args(["--train_text_encoder", "--reg_data_root", "class", "--identifier", "ohwx"])
    configure(config, opt)
    assert config.model.params.cond_stage_config.params.freeze is False
    assert config.model.params.prior_loss_config.params.weight == 1.0
    assert config.data.params.validation.params.placeholder_token == "ohwx"
