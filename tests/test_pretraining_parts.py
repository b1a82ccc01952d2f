"""Pieces the toy model's pretraining adds: autoencoder training, offset noise, EMA export, split-less data."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError, ema_key, read_state_dict, save_checkpoint
from ldm.data.datamodule import DataModuleFromConfig
from ldm.export import ema_as_model, export_checkpoint
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]


def toy_model_config():
    return OmegaConf.load(ROOT / "configs/toy/v1-inference.yaml").model


def test_autoencoder_training_lowers_its_loss_and_saves_first_stage_keys():
    config = OmegaConf.load(ROOT / "configs/toy/autoencoder.yaml").model
    torch.manual_seed(0)
    module = instantiate_from_config(config)
    module.learning_rate = 1e-3
    scenes = instantiate_from_config({"target": "ldm.toy.scenes.ToyScenes", "params": {"size": 32, "num_scenes": 4}})
    images = torch.stack([torch.from_numpy(scenes.image(i)) for i in range(4)]).permute(0, 3, 1, 2)  # [4, 3, 32, 32]
    optimizer = module.configure_optimizers()[0][0]
    first, _ = module.losses(images)
    for _ in range(25):
        loss, logs = module.losses(images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss < 0.8 * first  # 0.72 measured
    assert {"train/rec_l1", "train/rec_l2", "train/kl", "train/loss"} <= set(logs)
    assert all(key.startswith("first_stage_model.") for key in module.state_dict())


def test_offset_noise_adds_one_draw_per_sample_and_channel():
    params = OmegaConf.to_container(toy_model_config().params)
    params.pop("first_stage_config")
    params["first_stage_config"] = {"target": "ldm.models.autoencoder.IdentityFirstStage"}
    plain = instantiate_from_config({"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params})
    shifted = instantiate_from_config({"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                                       "params": {**params, "noise_offset": 0.5}})
    x = torch.zeros(512, 4, 16, 16)
    torch.manual_seed(0)
    plain_means = plain.diffusion.training_noise(x).mean(dim=(2, 3))
    torch.manual_seed(0)
    shifted_means = shifted.diffusion.training_noise(x).mean(dim=(2, 3))
    # the mean of 256 N(0, 1) pixels has std 1/16; the offset adds 0.5 N(0, 1) per sample and channel
    assert plain_means.std() == pytest.approx(1 / 16, rel=0.15)
    assert shifted_means.std() == pytest.approx((0.5 ** 2 + 1 / 256) ** 0.5, rel=0.15)


def test_ema_weights_export_as_the_model(tmp_path):
    state = {"model.diffusion_model.a.weight": torch.zeros(2), "cond_stage_model.w": torch.ones(1),
             ema_key("model.diffusion_model.a.weight"): torch.full((2,), 7.0), "model_ema.num_updates": torch.tensor(3)}
    swapped = ema_as_model(state)
    assert torch.equal(swapped["model.diffusion_model.a.weight"], torch.full((2,), 7.0))
    assert not any(key.startswith("model_ema.") for key in swapped)
    source = save_checkpoint(tmp_path / "last.ckpt", state)
    exported = read_state_dict(export_checkpoint(source, tmp_path / "model.safetensors", ema_weights=True))
    assert torch.equal(exported["model.diffusion_model.a.weight"], torch.full((2,), 7.0))
    with pytest.raises(CheckpointError, match="no EMA weights"):
        ema_as_model({"model.diffusion_model.a.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="lack"):
        ema_as_model({**state, "model.diffusion_model.b.weight": torch.zeros(1)})


def test_a_data_config_without_validation_gives_no_validation_batches():
    data = DataModuleFromConfig(batch_size=2, train={"target": "ldm.toy.scenes.ToyScenes",
                                                     "params": {"size": 32, "num_scenes": 4}}, num_workers=0)
    data.setup("fit")
    assert data.val_dataloader() == []


def test_a_file_without_ema_weights_starts_the_ema_at_its_weights(tmp_path):
    """Continuing pretraining from an exported (EMA-less) file: the EMA starts where the model starts."""
    config = OmegaConf.load(ROOT / "configs/tiny/v1-inference.yaml").model
    config.params.use_ema = True
    model = instantiate_from_config(config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model_ema.")}
    state = {k: v + 1.0 if k.startswith("model.diffusion_model.") and v.is_floating_point() else v
             for k, v in state.items()}
    path = save_checkpoint(tmp_path / "exported.safetensors", state)
    model.init_from_ckpt(str(path))
    with model.ema_scope():
        ema = {k: v.clone() for k, v in model.model.state_dict().items()}
    assert all(torch.equal(ema[k], v) for k, v in model.model.state_dict().items())
    key = "diffusion_model.out.2.weight"
    assert torch.equal(ema[key], state["model." + key])
