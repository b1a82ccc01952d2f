"""CUDA checks, skipped without a GPU: diffusers parity, CPU/GPU agreement and mixed-precision training.

TF32 is switched off so that fp32 on the GPU is comparable with fp32 on the CPU and with diffusers.
"""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import TINY_FINETUNE, TOKEN_TABLE, WOMAN, base_argv, only_run
from helpers_diffusers import diffusers_unet, diffusers_vae

import main
from ldm.models.diffusion.loss_terms import Rows, batched_losses
from ldm.models.diffusion.ddim import DDIMSampler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
LATENT = (4, 16, 16)  # 128 px: at 64 px the tiny UNet's 1x1 bottleneck amplifies rounding


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def cpu_model(tiny_model):
    """A copy of the session's tiny model in eval mode (the shared original is left as it is)."""
    return copy.deepcopy(tiny_model).eval()


@pytest.fixture(scope="module")
def gpu_model(cpu_model):
    """The same weights on the GPU."""
    return copy.deepcopy(cpu_model).to(CUDA)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


def test_unet_and_vae_match_diffusers_on_cuda(gpu_model):
    checkpoint = gpu_model.state_dict()
    ref_unet = diffusers_unet(checkpoint, TINY_FINETUNE)
    ref_vae = diffusers_vae(checkpoint, TINY_FINETUNE)
    gen = torch.Generator(CUDA).manual_seed(0)
    x = torch.randn(2, *LATENT, device=CUDA, generator=gen)
    t = torch.tensor([3, 901], device=CUDA)
    context = torch.randn(2, 77, gpu_model.cond_stage_model.text_model.config.hidden_size, device=CUDA, generator=gen)
    with torch.inference_mode():
        ref = ref_unet(x, t, encoder_hidden_states=context).sample
        ours = gpu_model.model.diffusion_model(x, t, context=context)
        assert relative_error(ours, ref) <= 1e-5, "UNet fp32 on CUDA differs from diffusers (tol 1e-5 x max|eps|)"
        with torch.autocast("cuda", dtype=torch.float16):
            ours_half = gpu_model.model.diffusion_model(x, t, context=context)
            ref_half = ref_unet(x, t, encoder_hidden_states=context).sample
        assert ours_half.dtype == torch.float16
        assert relative_error(ours_half, ref_half) <= 1e-2, "UNet under autocast differs from diffusers' (tol 1e-2)"

        ref_image = ref_vae.decode(x / gpu_model.scale_factor).sample
        ours_image = gpu_model.decode_first_stage(x)
        assert relative_error(ours_image, ref_image) <= 1e-4, "VAE decode on CUDA differs from diffusers (tol 1e-4)"


def test_ddim_sample_on_cuda_matches_the_cpu(cpu_model, gpu_model):
    x_T = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(1))
    samples = []
    for model in (cpu_model, gpu_model):
        with torch.inference_mode():
            cond = model.get_learned_conditioning(["a photo of a *"])
            uncond = model.get_learned_conditioning([""])
            sample, _ = DDIMSampler(model).sample(S=10, batch_size=1, shape=LATENT, conditioning=cond,
                                                  unconditional_conditioning=uncond, unconditional_guidance_scale=7.5,
                                                  eta=0.0, x_T=x_T.to(model.device), verbose=False)
        samples.append(sample.cpu())
    assert relative_error(samples[1], samples[0]) <= 1e-4, "10 guided DDIM steps: CUDA and CPU differ (tol 1e-4)"


def test_face_rows_loss_and_gradient_match_the_cpu(cpu_model, gpu_model):
    gen = torch.Generator().manual_seed(2)
    z, faces = torch.randn(2, *LATENT, generator=gen), torch.randn(1, *LATENT, generator=gen)
    t, noise = torch.tensor([10, 700]), torch.randn(3, *LATENT, generator=gen)
    results = []
    for model in (cpu_model, gpu_model):
        device = model.device
        cond = model.get_learned_conditioning(["a photo of a *"] * 2)
        rows = [Rows(z.to(device), cond, t.to(device)), Rows(faces.to(device), cond[1:], t[1:].to(device))]
        (main, _), (face, _) = batched_losses(model.diffusion, model.apply_model, rows, "train", noise.to(device))
        loss = main + 0.5 * face
        grads = torch.autograd.grad(loss, list(model.embedding_manager.embedding_parameters()))
        results.append((loss.item(), torch.cat([g.flatten() for g in grads]).cpu()))
    (cpu_loss, cpu_grad), (gpu_loss, gpu_grad) = results
    assert abs(gpu_loss - cpu_loss) <= 1e-5 * abs(cpu_loss), f"loss {gpu_loss} on CUDA vs {cpu_loss} on the CPU"
    assert cpu_grad.norm() > 0
    assert torch.allclose(gpu_grad, cpu_grad, atol=1e-4 * float(cpu_grad.norm()), rtol=0), (
        "embedding gradient on CUDA differs from the CPU's (tol 1e-4 x norm)")


@pytest.mark.parametrize("precision", ["32", "16-mixed", "bf16-mixed"])
def test_cli_trains_on_the_gpu(tmp_path, photo_dir, tiny_ckpt, precision):
    argv = base_argv(tmp_path, photo_dir, tiny_ckpt, "-n", f"gpu{precision}", "--gpus", "0,",
                     "--precision", precision, "--max_steps", "4")
    assert main.main(argv) == 0
    saved = torch.load(only_run(tmp_path) / "checkpoints" / "embeddings.pt", weights_only=True)
    vector = saved["string_to_param"]["*"]
    assert saved["step"] == 4 and vector.dtype == torch.float32 and vector.device.type == "cpu"
    assert torch.isfinite(vector).all(), f"non-finite embedding after {precision} training"
    init = torch.load(tiny_ckpt, weights_only=True)["state_dict"][TOKEN_TABLE][WOMAN]
    assert (vector[0] - init).abs().max() > 1e-4, f"the embedding did not train under {precision}"
