"""The sampling fast path: the negative prompt encoded once per run, no per-step host reads in the sampler loop.

Host reads are recorded with ``host_reads.HostReadRecorder`` (on a GPU each one waits for it).
"""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import load_script, txt2img_argv, write_txt2img_files
from host_reads import HostReadRecorder

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.plms import PLMSSampler

NEGATIVE = "blurry, lowres"


@pytest.mark.parametrize("sampler_class", [DDIMSampler, PLMSSampler], ids=["ddim", "plms"])
def test_sampler_loop_reads_nothing_per_step(tiny_model, sampler_class) -> None:
    model = copy.deepcopy(tiny_model).eval()
    cond = model.get_learned_conditioning(["a photo of a *"])
    uncond = model.fixed_conditioning("", 1)
    reads = {}
    for steps in (2, 6):
        x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with HostReadRecorder() as recorder, torch.no_grad():
            sampler_class(model).sample(S=steps, batch_size=1, shape=(4, 8, 8), conditioning=cond, eta=0.0,
                                        unconditional_conditioning=uncond, unconditional_guidance_scale=5.0,
                                        x_T=x_T, verbose=False)
        reads[steps] = recorder.calls
    assert len(reads[6]) == len(reads[2]), f"host reads grow with the steps: {reads}"


ENCODE = LatentDiffusion.get_learned_conditioning  # the unrecorded original


@pytest.fixture
def encoded(monkeypatch) -> list[list[str]]:
    """The prompt lists LatentDiffusion.get_learned_conditioning is called with, in order."""
    calls: list[list[str]] = []

    def recording(self, prompts):
        calls.append(list(prompts))
        return ENCODE(self, prompts)

    monkeypatch.setattr(LatentDiffusion, "get_learned_conditioning", recording)
    return calls


def test_fixed_conditioning_is_encoded_once_while_it_cannot_change(tiny_model, encoded) -> None:
    model = copy.deepcopy(tiny_model).eval()
    first = model.fixed_conditioning(NEGATIVE, 2)
    second = model.fixed_conditioning(NEGATIVE, 3)
    assert encoded == [[NEGATIVE]] and first.shape[0] == 2 and second.shape[0] == 3
    assert torch.equal(first[0], second[0]) and torch.equal(first[0], ENCODE(model, [NEGATIVE])[0])
    model.fixed_conditioning("a photo of a *", 1)
    model.fixed_conditioning("a photo of a *", 1)
    assert encoded[1:] == [["a photo of a *"]] * 2, "a prompt with the placeholder is encoded every time"
    model.cond_stage_model.requires_grad_(True)  # e.g. DreamBooth training the text encoder
    model.fixed_conditioning(NEGATIVE, 1)
    assert encoded[-1] == [NEGATIVE], "a trainable text encoder is encoded every time"


def test_txt2img_encodes_the_negative_prompt_once_per_run(tmp_path, encoded) -> None:
    files = write_txt2img_files(tmp_path)  # a tiny checkpoint and embedding, as test_txt2img uses
    argv = txt2img_argv(files, tmp_path / "out", "--negative_prompt", NEGATIVE)  # 2 iterations of a batch of 2
    assert load_script("stable_txt2img").main(argv) == 0
    assert sum(NEGATIVE in prompts for prompts in encoded) == 1, encoded
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 4
