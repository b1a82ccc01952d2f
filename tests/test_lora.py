"""LoRA (peft adapters, kohya/A1111 files): parity with diffusers, hand-written files, merged export, main.py."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from helpers import (PROMPT, TXT2IMG_QUICK, advised_command, load_script, script_identity_scores,
                     txt2img_argv, write_photos, write_txt2img_files)
from helpers_a1111 import parse_parameters
from helpers_diffusers import diffusers_unet, randomize_, sd_pipeline
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

import main
from ldm.checkpoint import CheckpointError, read_state_dict
from ldm.checkpoint.lora import read_lora, save_lora, unet_diffusers_path
from ldm.inference import load_model
from ldm.lora import add_trained_adapters, apply_lora_files, model_parts, trained_layers, unet_part
from ldm.modules.lora import DEFAULT_UNET_TARGETS, UNET_TARGET_PRESETS, add_adapters, adapter_layers, \
    export_layers, load_file_adapters, unet_targets
from ldm.png_metadata import model_hash
from ldm.sampling_io import read_png_text
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
TINY_INFERENCE = ROOT / "configs" / "tiny" / "v1-inference.yaml"
TINY_FINETUNE = ROOT / "configs" / "tiny" / "v1-finetune.yaml"
TINY_LORA = ROOT / "configs" / "tiny" / "v1-finetune_lora.yaml"
FULL_INFERENCE = ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
QUIET = ["--accelerator", "cpu", "data.params.num_workers=0", "lightning.callbacks.image_logger.params.disabled=true",
         "lightning.trainer.enable_progress_bar=false", "lightning.trainer.enable_model_summary=false",
         "lightning.trainer.num_sanity_val_steps=0", "lightning.trainer.limit_val_batches=0", "--no_validation"]


@torch.no_grad()
def randomize_adapters(module: torch.nn.Module, seed: int = 0) -> None:
    """Random A and B (B starts at zero, which would make every comparison trivial)."""
    gen = torch.Generator().manual_seed(seed)
    for layer in adapter_layers(module).values():
        for weights in (*layer.lora_A.values(), *layer.lora_B.values()):
            weights.weight.copy_(0.2 * torch.randn(weights.weight.shape, generator=gen))


def unet_inputs(unet, size: int = 16, seq_len: int = 77):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(2, unet.in_channels, size, size, generator=gen), torch.tensor([17, 901]),
            torch.randn(2, seq_len, unet.context_dim, generator=gen))


def random_unet_part(config: Path):
    """A UNet of ``config`` with random weights, and its adapter part (no adapters yet)."""
    torch.manual_seed(0)
    unet = randomize_(instantiate_from_config(OmegaConf.load(config).model.params.unet_config)).eval()
    return unet, unet_part(unet)


def diffusers_lora_error(unet, config: Path, path: Path, size: int) -> float:
    """Largest difference between ``unet`` (adapters on) and diffusers' UNet with its base weights and the file
    at ``path`` loaded as diffusers' pipelines load a LoRA."""
    from diffusers import StableDiffusionPipeline

    base = {k: v for k, v in unet.state_dict().items() if ".lora_" not in k}
    reference = diffusers_unet({"model.diffusion_model." + k.replace(".base_layer", ""): v for k, v in base.items()},
                               config)
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=reference)
    x, t, context = unet_inputs(unet, size=size)
    with torch.no_grad():
        return float((unet(x, t, context=context) - reference(x, t, encoder_hidden_states=context).sample).abs().max())


@pytest.fixture(scope="module")
def trained(tiny_ckpt, tmp_path_factory):
    """The tiny model with random rank-4 (alpha 8) adapters on the UNet and text encoder, and its exported file."""
    model = load_model(TINY_INFERENCE, tiny_ckpt, device="cpu")
    add_trained_adapters(model, rank=4, alpha=8, train_text_encoder=True)
    randomize_adapters(model)
    path = save_lora(tmp_path_factory.mktemp("lora") / "subject.safetensors", trained_layers(model),
                     {"ss_network_dim": 4, "ss_sd_model_hash": model_hash(tiny_ckpt)})
    return model, path


# ------------------------------------------------------------------------------ file layout and diffusers


def test_exported_names_are_kohya_sd_v1_names(trained):
    with safe_open(str(trained[1]), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in keys
    assert "lora_unet_up_blocks_3_attentions_1_transformer_blocks_0_attn2_to_k.alpha" in keys
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_down.weight" in keys
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_module"] == "networks.lora"
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)


def test_diffusers_load_lora_weights_equals_our_adapters(trained, tiny_ckpt, tmp_path):
    """diffusers' pipeline (same base weights) with our file, loaded by load_lora_weights: UNet and text encoder."""
    ours, path = trained
    pipe = sd_pipeline(load_model(TINY_INFERENCE, tiny_ckpt, device="cpu"), TINY_INFERENCE, tmp_path)
    unet = ours.model.diffusion_model
    x, t, context = unet_inputs(unet, seq_len=77)
    with torch.no_grad():
        before = pipe.unet(x, t, encoder_hidden_states=context).sample
        pipe.load_lora_weights(str(path))
        reference = pipe.unet(x, t, encoder_hidden_states=context).sample
        eps = unet(x, t, context=context)
        tokens = ours.cond_stage_model.tokenize(["a photo of a sks woman"])
        text_ref = pipe.text_encoder(tokens).last_hidden_state
        text = ours.get_learned_conditioning(["a photo of a sks woman"])
    assert (reference - before).abs().max() > 1e-2, "the LoRA must change the output for the test to mean anything"
    assert (eps - reference).abs().max() <= 1e-4
    assert (text - text_ref).abs().max() <= 1e-4


def test_full_size_sd_v1_unet_lora_in_diffusers_equals_ours(tmp_path):
    unet, part = random_unet_part(FULL_INFERENCE)
    assert add_adapters(part, DEFAULT_UNET_TARGETS, rank=4, alpha=2) == 16 * 2 * 4  # 16 blocks x 2 attn x 4
    randomize_adapters(unet)
    path = save_lora(tmp_path / "full.safetensors", export_layers(part), {})
    assert diffusers_lora_error(unet, FULL_INFERENCE, path, size=8) <= 1e-4


def test_transformer_preset_adapts_feed_forward_and_proj_layers_as_diffusers_loads_them(tmp_path):
    """--lora_targets transformer (kohya's default set, proj_in/proj_out are 1x1 convolutions): diffusers' UNet with
    our file equals ours, and each transformer block has its 12 layers adapted."""
    unet, part = random_unet_part(TINY_INFERENCE)
    blocks = sum(1 for path, _ in unet.named_modules() if path.endswith("transformer_blocks.0"))
    assert add_adapters(part, unet_targets("transformer"), rank=2, alpha=4) == blocks * 12
    randomize_adapters(unet)
    path = save_lora(tmp_path / "transformer.safetensors", export_layers(part), {})
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight" in keys
    assert diffusers_lora_error(unet, TINY_INFERENCE, path, size=16) <= 1e-4


def test_locon_preset_adapts_resnets_and_resamplers_as_diffusers_loads_them(tmp_path):
    """--lora_targets locon (kohya's LoRA-C3Lier): 3x3 convolutions too; diffusers' UNet with our file equals ours."""
    unet, part = random_unet_part(TINY_INFERENCE)
    adapted = add_adapters(part, unet_targets("locon"), rank=2, alpha=4)
    randomize_adapters(unet)
    path = save_lora(tmp_path / "locon.safetensors", export_layers(part), {})
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        down = handle.get_tensor("lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight")
    for name in ("down_blocks_1_resnets_0_conv_shortcut", "down_blocks_0_downsamplers_0_conv",
                 "mid_block_resnets_1_time_emb_proj", "up_blocks_2_upsamplers_0_conv", "up_blocks_3_resnets_1_conv2",
                 "up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v"):
        assert f"lora_unet_{name}.lora_up.weight" in keys, name
    assert down.shape[2:] == (3, 3)
    assert len(keys) == 3 * adapted
    assert diffusers_lora_error(unet, TINY_INFERENCE, path, size=16) <= 1e-4


@pytest.mark.parametrize("num_res_blocks", [1, 2])
def test_every_unet_layer_name_is_the_diffusers_layer_with_its_weights(num_res_blocks, tmp_path):
    """unet_diffusers_path against diffusers' own conversion of the same weights: each linear/conv layer of ours
    (ResBlocks, resamplers, attention, conv_in/out, time embedding) names the diffusers layer holding its weight."""
    config = OmegaConf.load(TINY_INFERENCE)
    config.model.params.unet_config.params.num_res_blocks = num_res_blocks
    OmegaConf.save(config, tmp_path / "unet.yaml")
    unet, part = random_unet_part(tmp_path / "unet.yaml")
    reference = diffusers_unet({"model.diffusion_model." + k: v for k, v in unet.state_dict().items()},
                               tmp_path / "unet.yaml")
    theirs = dict(reference.named_modules())
    layers = {path: layer for path, layer in unet.named_modules()
              if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))}
    names = {path: unet_diffusers_path(path, num_res_blocks) for path in layers}
    assert None not in names.values(), [path for path, name in names.items() if name is None]
    assert len(set(names.values())) == len(names)
    for path, name in names.items():
        assert name in theirs, (path, name)
        assert torch.equal(theirs[name].weight, layers[path].weight), (path, name)


@pytest.mark.parametrize("preset", ["transformer", "locon"])
def test_preset_file_folds_into_a_fresh_model_as_trained(preset, tiny_ckpt, tmp_path):
    """What --lora (and the toy benchmark's scoring) does with a preset's file: 1x1 and 3x3 convolutions too."""
    trained_model = load_model(TINY_INFERENCE, tiny_ckpt, device="cpu")
    add_trained_adapters(trained_model, rank=2, unet_targets=unet_targets(preset))
    randomize_adapters(trained_model)
    path = save_lora(tmp_path / f"{preset}.safetensors", trained_layers(trained_model), {})
    fresh = load_model(TINY_INFERENCE, tiny_ckpt, device="cpu")
    apply_lora_files(fresh, [str(path)])
    x, t, context = unet_inputs(fresh.model.diffusion_model)
    with torch.no_grad():
        expected = trained_model.model.diffusion_model(x, t, context=context)
        folded = fresh.model.diffusion_model(x, t, context=context)
        base = load_model(TINY_INFERENCE, tiny_ckpt, device="cpu").model.diffusion_model(x, t, context=context)
    assert (expected - base).abs().max() > 1e-2
    assert (folded - expected).abs().max() <= 1e-4


def test_lora_targets_flag_writes_the_preset_or_the_list():
    from argparse import ArgumentParser

    from ldm.train.flags import add_flags, apply_flags

    parser = ArgumentParser()
    add_flags(parser)
    for given, expected in (("transformer", list(UNET_TARGET_PRESETS["transformer"])),
                            ("to_k, to_v", ["to_k", "to_v"])):
        config = OmegaConf.load(TINY_LORA)
        apply_flags(config, parser.parse_args(["--lora_targets", given]))
        assert list(config.lora.unet_targets) == expected


def test_hand_written_kohya_file_folds_into_the_named_layers(tiny_ckpt, tmp_path):
    """A file written here from kohya's naming rule (not by our exporter): linear and 1x1-conv layers."""
    gen = torch.Generator().manual_seed(3)
    names = {  # kohya name -> the CompVis layer it adapts (tiny UNet: num_res_blocks 1, attention at every level)
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
        "lora_unet_up_blocks_1_attentions_0_proj_in": "output_blocks.2.1.proj_in",
    }
    model = load_model(TINY_INFERENCE, tiny_ckpt, device="cpu")
    unet = model.model.diffusion_model
    tensors, expected = {}, {}
    for name, path in names.items():
        weight = unet.get_submodule(path).weight
        out_dim, in_dim = weight.shape[:2]
        down, up = torch.randn(2, in_dim, generator=gen), torch.randn(out_dim, 2, generator=gen)
        extra = weight.shape[2:]
        tensors[f"{name}.lora_down.weight"] = down.reshape(2, in_dim, *extra)
        tensors[f"{name}.lora_up.weight"] = up.reshape(out_dim, 2, *extra)
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
        expected[path] = weight + 0.5 * (1.0 / 2) * (up @ down).reshape(weight.shape)
    te_name = "lora_te_text_model_encoder_layers_1_self_attn_v_proj"
    v_proj = model.cond_stage_model.text_model.encoder.layers[1].self_attn.v_proj.weight
    te_down, te_up = torch.randn(3, v_proj.shape[1], generator=gen), torch.randn(v_proj.shape[0], 3, generator=gen)
    tensors.update({f"{te_name}.lora_down.weight": te_down, f"{te_name}.lora_up.weight": te_up})  # no alpha: = rank
    te_expected = v_proj + 0.5 * te_up @ te_down
    save_file(tensors, str(tmp_path / "hand.safetensors"))

    apply_lora_files(model, [f"{tmp_path / 'hand.safetensors'}:0.5"])
    assert not adapter_layers(model), "folded back into plain layers"
    for path, weight in expected.items():
        torch.testing.assert_close(unet.get_submodule(path).weight, weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.cond_stage_model.text_model.encoder.layers[1].self_attn.v_proj.weight,
                               te_expected, rtol=0, atol=1e-6)


def test_half_base_weights_train_float32_adapters_without_casting_inputs(tiny_ckpt):
    """Under autocast with the base in bfloat16, peft's float32 cast of each adapter input is left out: the
    output is the same to the bit, with fewer copies, and the float32 adapters get finite gradients."""
    from torch.profiler import ProfilerActivity, profile

    model = load_model(TINY_INFERENCE, tiny_ckpt, device="cpu")
    add_trained_adapters(model, rank=4)
    randomize_adapters(model)
    model.hold_frozen_weights_in_half(torch.bfloat16)
    unet = model.model.diffusion_model
    assert not any(layer.cast_input_dtype_enabled for layer in adapter_layers(unet).values())
    x, t, context = unet_inputs(unet, size=8, seq_len=model.cond_stage_model.max_length)

    def forward(cast_inputs: bool) -> tuple[torch.Tensor, int]:
        for layer in adapter_layers(unet).values():
            layer.cast_input_dtype_enabled = cast_inputs
        with profile(activities=[ProfilerActivity.CPU]) as prof, model.weights_autocast():
            out = unet(x, t, context=context)
        return out, sum(event.count for event in prof.key_averages() if event.key == "aten::_to_copy")

    peft_default, peft_copies = forward(True)
    ours, our_copies = forward(False)
    assert torch.equal(ours, peft_default)
    assert our_copies < peft_copies
    ours.float().square().mean().backward()
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_merged_export_equals_adapters_applied(trained, tiny_ckpt, tmp_path):
    _, path = trained
    applied = load_model(TINY_INFERENCE, tiny_ckpt, device="cpu")
    assert load_file_adapters(model_parts(applied), read_lora(path), adapter="x", scale=0.7) > 0
    merged_path = tmp_path / "merged.safetensors"
    assert load_script("export_lora").main(["--config", str(TINY_INFERENCE), "--ckpt", str(tiny_ckpt), "--lora",
                                            f"{path}:0.7", "--merge", str(merged_path)]) == 0
    assert set(read_state_dict(merged_path)) - set(read_state_dict(tiny_ckpt)) <= {
        "cond_stage_model.transformer.text_model.embeddings.position_ids"}, "the released SD v1 layout"
    merged = load_model(TINY_INFERENCE, merged_path, device="cpu")
    assert not adapter_layers(merged)
    x, t, context = unet_inputs(merged.model.diffusion_model)
    with torch.no_grad():
        torch.testing.assert_close(applied.model.diffusion_model(x, t, context=context),
                                   merged.model.diffusion_model(x, t, context=context), rtol=0, atol=1e-5)
        torch.testing.assert_close(applied.get_learned_conditioning([PROMPT]),
                                   merged.get_learned_conditioning([PROMPT]), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ bad input


def write_file(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_bad_files_name_the_first_mismatching_key(tiny_ckpt, tmp_path, trained):
    model = load_model(TINY_INFERENCE, tiny_ckpt, device="cpu")
    unknown = write_file(tmp_path / "sdxl.safetensors", {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 8),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(8, 4)})
    with pytest.raises(CheckpointError, match="key 'lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
                                              r"\.lora_down\.weight' matches no layer") as err:
        apply_lora_files(model, [str(unknown)])
    assert "\n" not in str(err.value)
    assert re.search(r"the closest is 'lora_unet_(down|up)_blocks_\d_attentions_\d_transformer_blocks_0_attn1_to_q'",
                     str(err.value))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    shape = write_file(tmp_path / "shape.safetensors", {f"{name}.lora_down.weight": torch.zeros(4, 7),
                                                         f"{name}.lora_up.weight": torch.zeros(32, 4)})
    with pytest.raises(CheckpointError, match=f"'{name}.lora_down.weight' has shape \\(4, 7\\)"):
        apply_lora_files(model, [str(shape)])
    with pytest.raises(CheckpointError, match="full SD checkpoint.*--actual_resume"):
        read_lora(tiny_ckpt)
    with pytest.raises(CheckpointError, match="LoRA file.*--lora"):
        read_state_dict(trained[1])


def test_another_base_model_warns_with_both_hashes(tiny_ckpt, tmp_path, trained, caplog):
    tensors = {k: v for k, v in read_lora(trained[1]).layers.items()}
    other = save_lora(tmp_path / "other.safetensors", tensors, {"ss_sd_model_hash": "0123456789"})
    model = load_model(TINY_INFERENCE, tiny_ckpt, device="cpu")
    with caplog.at_level(logging.WARNING, logger="ldm.lora"):
        apply_lora_files(model, [str(other)], base_checkpoint=str(tiny_ckpt))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("0123456789" in w and model_hash(tiny_ckpt) in w for w in warnings), warnings


@pytest.mark.parametrize("case, expected", [
    ("rank", "--lora_rank must be at least 1, got 0"),
    ("scale", "--lora scale must be in [-4, 4], got 5"),
    ("full_as_lora", "is a full SD checkpoint, not a LoRA; pass it with --actual_resume"),
    ("lora_as_base", "is a LoRA file (kohya layout), not model weights; pass it with --lora"),
    ("rank_without_lora", "--lora_rank is a LoRA DreamBooth option"),
    ("empty_targets", "--lora_targets , name a preset (attention, transformer, locon) or layers"),
    ("unmatched_targets", "lora targets ['to_qq'] match no layer under lora_unet_"),
])
def test_bad_flags_exit_2_with_one_line_naming_the_flag(case, expected, tiny_ckpt, photo_dir, trained, tmp_path,
                                                          caplog):
    lora = str(trained[1])
    base = ["--data_root", str(photo_dir), "--class_word", "woman", "--logdir", str(tmp_path / "logs"), "-t", *QUIET]
    args = {
        "rank": ["--base", str(TINY_LORA), "--actual_resume", str(tiny_ckpt), "--lora_rank", "0"],
        "scale": ["--base", str(TINY_FINETUNE), "--actual_resume", str(tiny_ckpt), "--lora", f"{lora}:5"],
        "full_as_lora": ["--base", str(TINY_FINETUNE), "--actual_resume", str(tiny_ckpt), "--lora", str(tiny_ckpt)],
        "lora_as_base": ["--base", str(TINY_FINETUNE), "--actual_resume", lora],
        "rank_without_lora": ["--base", str(TINY_FINETUNE), "--actual_resume", str(tiny_ckpt), "--lora_rank", "8"],
        "empty_targets": ["--base", str(TINY_LORA), "--actual_resume", str(tiny_ckpt), "--lora_targets", ","],
        "unmatched_targets": ["--base", str(TINY_LORA), "--actual_resume", str(tiny_ckpt), "--lora_targets", "to_qq"],
    }[case]
    with caplog.at_level(logging.ERROR, logger="main"):
        assert main.main([*args, *base]) == 2
    errors = [r.getMessage() for r in caplog.records if r.name == "main" and r.levelno >= logging.ERROR]
    assert len(errors) == 1 and expected in errors[0] and "\n" not in errors[0], errors


# ------------------------------------------------------------------------------ main.py and txt2img


def lora_run(logdir: Path, name: str, ckpt: Path, photos: Path, *extra: str, quiet=QUIET) -> Path:
    argv = ["--base", str(TINY_LORA), "-t", "--actual_resume", str(ckpt), "--data_root", str(photos),
            "--class_word", "woman", "--logdir", str(logdir), "-n", name, "--lora_rank", "2", "--seed", "5",
            "lightning.modelcheckpoint.params.every_n_train_steps=1", *quiet, *extra]
    assert main.main(argv) == 0
    return next(logdir.glob(f"*_{name}_*")) / "checkpoints"


def test_lora_dreambooth_saves_kohya_files_resumes_exactly_and_feeds_momentum_ti(tiny_ckpt, tmp_path, caplog):
    photos = write_photos(tmp_path / "photos", count=2, size=64)
    logdir = tmp_path / "logs"
    straight = lora_run(logdir, "straight", tiny_ckpt, photos, "--max_steps", "2")
    assert {p.name for p in straight.glob("lora*.safetensors")} == \
        {"lora_gs-1.safetensors", "lora_gs-2.safetensors", "lora.safetensors"}
    assert not list(straight.glob("model_pruned.*")), "LoRA DreamBooth writes adapters, not a full model"
    with safe_open(str(straight / "lora.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_steps"], meta["mti_identifier"]) == \
        ("2", "2", "2", "sks")
    assert meta["ss_sd_model_hash"] == model_hash(tiny_ckpt)
    last = torch.load(straight / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["state_dict"] and all(".lora_A." in k or ".lora_B." in k for k in last["state_dict"])
    assert len(last["optimizer_states"][0]["state"]) == len(last["state_dict"])
    first = read_lora(straight / "lora_gs-1.safetensors")
    final = read_lora(straight / "lora.safetensors")
    assert any(not torch.equal(first.layers[n].up, final.layers[n].up) for n in final.layers), "the adapters train"

    halfway = lora_run(logdir, "halfway", tiny_ckpt, photos, "--max_steps", "1")
    assert main.main(["-r", str(halfway.parent), "-t", "--max_steps", "2", "--seed", "5", *QUIET]) == 0
    resumed = read_lora(halfway / "lora.safetensors")
    for name, layer in final.layers.items():
        assert torch.equal(layer.up, resumed.layers[name].up) and torch.equal(layer.down, resumed.layers[name].down)

    caplog.clear()
    with caplog.at_level(logging.INFO):
        rc = main.main(["--base", str(TINY_FINETUNE), "-t", "--actual_resume", str(tiny_ckpt), "--data_root",
                        str(photos), "--lora", f"{straight / 'lora.safetensors'}:0.8", "--placeholder_string", "sks",
                        "--max_steps", "1", "--logdir", str(logdir), "-n", "ti", *QUIET])
    embedding = next(logdir.glob("*_ti_*")) / "checkpoints" / "embeddings.pt"
    assert rc == 0 and embedding.is_file()
    parsed = load_script("stable_txt2img").build_parser().parse_args(advised_command(caplog)[1])
    assert (parsed.lora, parsed.embedding_path) == ([f"{straight / 'lora.safetensors'}:0.8"], str(embedding)), \
        "the embedding is sampled on the base it trained on: with the --lora files folded in"


def test_training_and_validation_grids_name_the_loras_in_the_png(tiny_ckpt, tmp_path, trained):
    """A LoRA DreamBooth run on a base with a LoRA folded in: the ImageLogger's grids and the validation grids
    name both in A1111's prompt tags, the folded file at its scale and the trained adapters as the file that keeps
    them (``weights`` in the PNG): ``lora_gs-N`` at a save, ``lora`` at the last step, ``lora_gs-N_unsaved`` (and no
    file) between saves."""
    shown = ("lightning.callbacks.image_logger.params.disabled=true", "--no_validation")
    argv = ["--base", str(TINY_LORA), "-t", "--actual_resume", str(tiny_ckpt), "--lora", f"{trained[1]}:0.5",
            "--data_root", str(write_photos(tmp_path / "photos", count=2, size=64)), "--class_word", "woman",
            "--logdir", str(tmp_path / "logs"), "-n", "grids", "--max_steps", "3", "--validation_ddim_steps", "2",
            "lightning.modelcheckpoint.params.every_n_train_steps=2",
            "lightning.callbacks.image_logger.params.batch_frequency=1",
            "lightning.callbacks.image_logger.params.max_images=1",
            "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=2",
            *(arg for arg in QUIET if arg not in shown)]
    assert main.main(argv) == 0
    run = next((tmp_path / "logs").glob("*_grids_*"))
    images = run / "images"
    expected = {1: ("lora_gs-1_unsaved", None), 2: ("lora_gs-2", "lora_gs-2.safetensors"),
                3: ("lora", "lora.safetensors")}
    assert sorted(p.name for p in (images / "validation").iterdir()) == ["step-2.png", "step-3.png"]
    for step, (name, weights) in expected.items():
        grids = list((images / "train").glob(f"*_gs-{step:06}_*.png"))
        assert grids, step
        for grid in grids:
            text = read_png_text(grid)
            assert json.loads(text["momentum_ti"])["weights"] == weights, (grid.name, text["momentum_ti"])
            assert parse_parameters(text["parameters"])["Prompt"].endswith(f" <lora:subject:0.5> <lora:{name}:1>")
        if weights is not None:
            assert (run / "checkpoints" / weights).is_file()
    for step in (2, 3):
        text = read_png_text(images / "validation" / f"step-{step}.png")
        name, weights = expected[step]
        assert text["weights"] == weights
        assert parse_parameters(text["parameters"])["Prompt"].endswith(f" <lora:subject:0.5> <lora:{name}:1>")


def test_lora_dreambooth_keeps_the_best_adapters_and_says_how_to_sample_them(tiny_ckpt, tmp_path, trained,
                                                                             monkeypatch, caplog):
    """Validation with identity scores keeps the best save as lora_best.safetensors (the kohya file of that save,
    its step in ss_steps and best.json); the summary names it with the stable_txt2img.py command on the base and
    the run's --lora files, which runs as printed."""
    script_identity_scores(monkeypatch, [(1.0, 0.62, 0.5), (1.0, 0.50, 1.0), (0.25, 0.30, 1.0)])  # steps 1, 2, 3
    folded = f"{trained[1]}:0.5"
    with caplog.at_level(logging.INFO):
        ckpts = lora_run(tmp_path / "logs", "best", tiny_ckpt, write_photos(tmp_path / "photos", count=2, size=64),
                         "--max_steps", "3", "--lora", folded, "--validation_identity", "--validation_ddim_steps", "2",
                         quiet=[arg for arg in QUIET if arg != "--no_validation"])
    best = ckpts / "lora_best.safetensors"
    record = json.loads((ckpts / "best.json").read_text())
    assert (record["step"], record["file"]) == (2, best.name)
    kept, saved = read_lora(best), read_lora(ckpts / "lora_gs-2.safetensors")
    assert kept.layers.keys() == saved.layers.keys()
    assert all(torch.equal(kept.layers[n].up, layer.up) and torch.equal(kept.layers[n].down, layer.down)
               for n, layer in saved.layers.items())
    assert kept.metadata == saved.metadata and kept.metadata["ss_steps"] == "2"
    assert any("Best LoRA so far: step 2 " in r.getMessage() for r in caplog.records)
    (summary,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Training done")]
    assert f"best LoRA {best} (step 2, identity match 1.00)" in summary

    advice, args = advised_command(caplog)
    assert advice.startswith(f"Use the best LoRA (step 2), {best}. Sample with it: ")
    parsed = load_script("stable_txt2img").build_parser().parse_args(args)
    assert (parsed.ckpt, parsed.lora, parsed.embedding_path) == (str(tiny_ckpt), [folded, str(best)], None)
    assert parsed.prompt == "a photo of a sks woman" and Path(parsed.config).parent == ckpts.parent / "configs"
    monkeypatch.chdir(tmp_path)  # --outdir is relative: outputs/<run>
    assert load_script("stable_txt2img").main([*args, *TXT2IMG_QUICK]) == 0, "the command runs as printed"
    (sample,) = (tmp_path / "outputs" / ckpts.parent.name / "samples").glob("*.png")
    assert read_png_text(sample)["parameters"].splitlines()[0].endswith("<lora:subject:0.5> <lora:lora_best:1>")


def test_txt2img_samples_with_a_lora_and_names_it_in_the_png(tmp_path, trained):
    files = write_txt2img_files(tmp_path)
    script = load_script("stable_txt2img")
    outdir = tmp_path / "out"
    assert script.main(txt2img_argv(files, outdir, "--lora", f"{trained[1]}:0.8", "--n_iter", "1",
                                    embedding=False)) == 0
    parameters = read_png_text(next((outdir / "samples").glob("*.png")))["parameters"]
    assert parameters.splitlines()[0] == f"{PROMPT} <lora:subject:0.8>"
    assert parse_parameters(parameters)["Steps"] == "4"
