"""The frozen-VAE latent cache: encode once per (image, flip), then sample the cached posterior."""
from __future__ import annotations

import pytest
import torch
from helpers import make_batch

from ldm.models.diffusion.latent_cache import LatentCache, batch_cache_keys
from ldm.models.diffusion.loss_terms import batch_images


@pytest.fixture
def counted(tiny_model):
    """The tiny model with an empty cache and a counter of VAE encoder calls."""
    calls = []
    handle = tiny_model.first_stage_model.encoder.register_forward_hook(
        lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    tiny_model.latent_cache.clear()
    yield tiny_model, calls
    handle.remove()
    tiny_model.latent_cache.clear()


def test_second_step_reuses_the_cache(counted) -> None:
    model, calls = counted
    batch = make_batch(image_index=(0, 1), flipped=(False, True))
    model.get_input(batch, "image")
    assert calls == [2] and len(model.latent_cache) == 2
    model.get_input(batch, "image")
    assert calls == [2], "the same (image_index, flipped) must not be encoded again"
    # only the new key (image 0 flipped) is encoded; the cached one is not re-encoded
    model.get_input(make_batch(image_index=(0, 0), flipped=(True, False)), "image")
    assert calls == [2, 1] and len(model.latent_cache) == 3


def test_batches_without_image_index_encode_every_time(counted) -> None:
    model, calls = counted
    batch = make_batch()
    del batch["image_index"], batch["flipped"]
    model.get_input(batch, "image")
    model.get_input(batch, "image")
    assert calls == [2, 2] and len(model.latent_cache) == 0


def test_cached_latents_are_samples_of_the_posterior(counted) -> None:
    model, _ = counted
    batch = make_batch(image_index=(0, 1), flipped=(False, False))
    images = batch_images(batch, "image")
    with torch.no_grad():
        posterior = model.first_stage_model.encode(images)
    model.get_input(batch, "image")  # fills the cache
    torch.manual_seed(123)
    z = model.get_input(batch, "image")[0]
    torch.manual_seed(123)
    expected = model.scale_factor * (posterior.mean + posterior.std * torch.randn_like(posterior.mean))
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5, msg="seeded draw from the cached posterior")
    # fresh draws each step (not the mean), with the posterior's mean and std
    draws = torch.stack([model.get_input(batch, "image")[0] for _ in range(400)]) / model.scale_factor
    assert not torch.equal(draws[0], draws[1])
    torch.testing.assert_close(draws.mean(0), posterior.mean, atol=4 * float(posterior.std.max()) / 20, rtol=0)
    ratio = draws.std(0) / posterior.std
    assert 0.8 < float(ratio.mean()) < 1.2, "sample std matches the posterior's std"


def test_cache_keys_and_batch_size_mismatch() -> None:
    batch = make_batch(image_index=(2, 0), flipped=(True, False))
    assert batch_cache_keys(batch, "image") == [("image", 2, True), ("image", 0, False)]
    assert batch_cache_keys({"image": batch["image"]}, "image") is None
    with pytest.raises(ValueError, match="2 cache keys for a batch of 1"):
        LatentCache().posterior(batch_cache_keys(batch, "image"), batch["image"][:1], encode=None)
