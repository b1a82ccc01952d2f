#!/usr/bin/env python
"""Benchmark this project against diffusers on the same weights, in one run on one machine.

Rows (``--only`` picks groups): ``unet`` forward, ``vae`` decode, ``ddim`` (20 DDIM steps with
classifier-free guidance), ``sample`` (prompt to image: 50 guided DDIM steps and the decode, against
``StableDiffusionPipeline``), ``ti`` (one momentum-TI training step against diffusers'
textual-inversion recipe, at each of ``--ti-batches``), ``ti_parts`` (the parts of those steps timed
alone, and the lowest ratio that skipping the VAE encode and the token-table optimizer can give),
``face`` (the TI step with the facial loss against the same step without it), ``anchoring`` (the TI
step with each option of issue 19, --anchor_weight, --norm_bound, --init_words, --ema_decay, against
the plain step; scripts/bench/anchoring.py), ``face_prep`` (dlib
face crops of the fixture photos, cold and warm cache), ``dreambooth`` (one DreamBooth step with prior
preservation against diffusers' ``train_dreambooth.py`` recipe), ``validation`` (in-run validation
sampling at a save against the training steps between two saves, and the identity score of its
samples) and, only when named since compiling takes minutes, ``compiled`` (the TI step and the
sampling with ``--compile_unet``, against diffusers eager and with ``torch.compile`` on its UNet).
Each row reports the median time and the peak extra memory of ours and of the baseline, their
ratios, and the FLOP rate achieved (FlopCounterMode) with its share of the GPU's dense half peak.

``--precision fp16|bf16`` runs each side as its users would under mixed precision, with autocast:
ours holds its frozen weights in half precision (as ``main.py --precision 16-mixed|bf16-mixed`` and
``stable_txt2img.py`` do); diffusers' textual-inversion recipe holds the UNet and VAE in half precision
and its trained text encoder in float32, ``train_dreambooth.py`` the VAE and text encoder in half
precision and its trained UNet in float32, ``StableDiffusionPipeline`` everything in half precision.

    python scripts/benchmark.py --config sd-v1 --device cpu --size 256 --repeats 3 --markdown
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.util import instantiate_from_config, randomize_zero_weights
from bench import reference
from bench.anchoring import anchoring_rows
from bench.context import CONFIGS, PROMPT, Bench
from bench.flops import dense_half_peak_tflops
from bench.lora import lora_rows
from bench.measure import (
    Measurement,
    peak_memory,
    saved_activation_bytes,
    tensor_bytes,
    timed,
    with_state,
)
from bench.ours import OursStep, dreambooth_batch
from bench.speed_rows import compiled_rows, sample_rows
from bench.table import Row, markdown_table, plain_table
from bench.validation import validation_rows

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("benchmark")

DREAMBOOTH_CONFIGS = {"tiny": ROOT / "configs" / "tiny" / "v1-finetune_unfrozen.yaml",
                      "sd-v1": ROOT / "configs" / "stable-diffusion" / "v1-finetune_unfrozen.yaml"}
GROUPS = ("unet", "vae", "ddim", "sample", "ti", "ti_parts", "face", "anchoring", "dreambooth", "lora", "face_prep",
          "validation", "compiled")
OPT_IN_GROUPS = ("compiled",)  # run only when named in --only
FACES = ROOT.parent / "shared" / "fixtures" / "faces"
TI_BATCHES = {"cpu": (1, 2), "cuda": (1, 2, 8)}
DDIM_STEPS = 20
SAMPLE_STEPS = 50
GUIDANCE = 7.5
DREAMBOOTH_PROMPT, CLASS_PROMPT = "a photo of a sks woman", "a photo of a woman"
PRIOR_LOSS_WEIGHT = 1.0
DREAMBOOTH_WEIGHT_DECAY = 1e-2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny", help="model size")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="fp32, or mixed precision with half-precision weights as each side's users run it")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (median), after 1 warm-up")
    p.add_argument("--only", nargs="+", choices=GROUPS, default=[g for g in GROUPS if g not in OPT_IN_GROUPS],
                   help=f"row groups to run (default: all but {', '.join(OPT_IN_GROUPS)})")
    p.add_argument("--batch", type=int, default=1, help="batch of the unet/vae/ddim/sample rows")
    p.add_argument("--ti-batches", type=int, nargs="+", default=None,
                   help="batches of the ti, ti_parts, face and compiled rows (default: 1 2 on cpu, 1 2 8 on cuda)")
    p.add_argument("--sample-steps", type=int, default=SAMPLE_STEPS, help="DDIM steps of the sample rows")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense half-precision peak (default: known NVIDIA data-center GPUs)")
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels (default: 64 tiny; sd-v1 256 on cpu, 512 on cuda)")
    p.add_argument("--ddim-steps", type=int, default=DDIM_STEPS, help="steps of the ddim row")
    p.add_argument("--face-detector", choices=("cnn", "hog"), default="cnn", help="dlib detector of face_prep")
    p.add_argument("--faces", type=Path, default=FACES, help="folder of photos for face_prep")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: every core available)")
    p.add_argument("--sequential", action="store_true",
                   help="lora rows: build, measure and free each side before building the other (for a pair of "
                        "models that does not fit in memory at once; the times are then not interleaved)")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = p.parse_args(argv)
    if args.size is None:
        args.size = 64 if args.config == "tiny" else (512 if args.device == "cuda" else 256)
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    args.ti_batches = tuple(args.ti_batches or TI_BATCHES[args.device])
    if min(args.repeats, args.batch, args.threads, args.ddim_steps, args.sample_steps, *args.ti_batches) < 1:
        p.error("--repeats, --batch, --threads, --ti-batches, --ddim-steps and --sample-steps must be at least 1")
    if args.size % 8:
        p.error(f"--size must be a multiple of 8 (the VAE downsamples by 8), got {args.size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for but torch sees no CUDA device; use --device cpu")
    return args


# --- inference rows --------------------------------------------------------------------------------
def unet_rows(b: Bench) -> list[Row]:
    n = b.args.batch
    x, t, ctx = b.randn(n, *b.latent_shape), torch.randint(0, 1000, (n,), device=b.device), b.randn(n, *b.context_shape)
    ours_unet, ref_unet = b.ours.model.diffusion_model, b.unet
    ours = torch.inference_mode()(lambda: ours_unet(x, t, context=ctx))
    ref = torch.inference_mode()(lambda: ref_unet(x, t, encoder_hidden_states=ctx).sample)
    ours_m, ref_m = b.pair(ours, ref)
    return [Row("unet_forward", "diffusers", ours_m, ref_m, f"batch {n}, latent {b.latent_shape[1]}px",
                b.flops(ours), b.flops(ref))]


def vae_rows(b: Bench) -> list[Row]:
    z = b.randn(b.args.batch, *b.latent_shape)
    ref_vae, scale = b.vae, b.ours.scale_factor
    ours = torch.inference_mode()(lambda: b.ours.decode_first_stage(z))
    ref = torch.inference_mode()(lambda: ref_vae.decode(z / scale).sample)
    ours_m, ref_m = b.pair(ours, ref)
    return [Row("vae_decode", "diffusers", ours_m, ref_m, f"batch {b.args.batch}, {b.args.size}px", b.flops(ours),
                b.flops(ref))]


def ddim_rows(b: Bench) -> list[Row]:
    n = b.args.batch
    x_t, cond, uncond = b.randn(n, *b.latent_shape), b.randn(n, *b.context_shape), b.randn(n, *b.context_shape)
    sampler, ref_unet, steps = DDIMSampler(b.ours), b.unet, b.args.ddim_steps

    @torch.inference_mode()
    def ours():
        return sampler.sample(S=steps, batch_size=n, shape=b.latent_shape, conditioning=cond,
                              unconditional_conditioning=uncond, unconditional_guidance_scale=GUIDANCE,
                              eta=0.0, x_T=x_t, verbose=False)[0]

    def ref():
        return reference.ddim_sample(ref_unet, x_t, cond, uncond, steps, GUIDANCE)

    ours_m, ref_m = b.pair(ours, ref)
    return [Row(f"ddim{steps}_cfg", "diffusers", ours_m, ref_m, f"batch {n}, scale {GUIDANCE}", b.flops(ours),
                b.flops(ref))]


# --- training rows ---------------------------------------------------------------------------------
def ti_rows(b: Bench) -> list[Row]:
    rows = []
    for n in b.args.ti_batches:
        ours = b.ti_step(n)
        ref = b.reference_ti_step(ours)
        ours_m, ref_m = b.pair(ours, ref)
        rows.append(Row(f"ti_step_b{n}", "diffusers TI", with_state(ours_m, ours.persistent_bytes()),
                        with_state(ref_m, tensor_bytes(ref.persistent_state())),
                        f"{b.args.size}px; mem incl. optimizer state/cache", b.flops(ours), b.flops(ref)))
        ours.release()
        ref.release()
    return rows


def table_adamw_row(b: Bench) -> Row:
    """The recipe's optimizer step: AdamW over the whole token table, then every other row restored."""
    table = b.text_model.get_input_embeddings().weight.detach().clone().requires_grad_(True)
    table.grad = torch.randn_like(table)  # the dense gradient the recipe's backward leaves
    original, keep_rows = table.detach().clone(), torch.ones(table.shape[0], dtype=torch.bool, device=b.device)
    keep_rows[b.ours.embedding_manager.token_ids[0]] = False
    optimizer = torch.optim.AdamW([table], lr=b.lr)

    def step():
        optimizer.step()
        with torch.no_grad():
            table[keep_rows] = original[keep_rows]

    return Row("ti_part_table_adamw", "-", b.measure(step), None, "AdamW over the token table + row restore")


def ti_part_rows(b: Bench) -> list[Row]:
    """Each part of the two TI steps timed alone, then the floor of the ``ti_step`` ratio.

    Both recipes run the text encoder forward + backward and the frozen UNet forward + backward to its
    conditioning (``ti_part_unet`` compares ours with diffusers' there); only the baseline adds the VAE
    encode and AdamW over the whole token table with the restore of its rows. With equally fast UNets,
    (text + unet) / (text + unet + vae + table) is the lowest ratio skipping those two can give.
    """
    adamw = table_adamw_row(b)
    rows = [adamw]
    ours_unet = b.ours.model.diffusion_model
    for n in b.args.ti_batches:
        pixels = torch.rand(n, 3, b.args.size, b.args.size, device=b.device, dtype=b.half_or_float32) * 2 - 1
        x, t = b.randn(n, *b.latent_shape), torch.randint(0, 1000, (n,), device=b.device)
        context = b.randn(n, *b.context_shape)

        def text_step():
            b.ours.get_learned_conditioning([PROMPT] * n).square().mean().backward()

        def unet_step(unet_call):
            def step():
                ctx = context.clone().requires_grad_(True)
                F.mse_loss(unet_call(ctx).float(), x.float()).backward()
            return step

        text = b.measure(text_step)
        b.ours.embedding_manager.zero_grad(set_to_none=True)
        vae = b.measure(torch.no_grad()(lambda: b.vae.encode(pixels).latent_dist.sample()))
        ours_m, ref_m = b.pair(unet_step(lambda ctx: ours_unet(x, t, context=ctx)),
                               unet_step(lambda ctx: b.unet(x, t, encoder_hidden_states=ctx).sample))
        with_skips = text.median_s + ref_m.median_s
        full = with_skips + vae.median_s + adamw.ours.median_s
        rows += [Row(f"ti_part_text_b{n}", "-", text, None, "our text encoder + embedding, forward + backward"),
                 Row(f"ti_part_unet_b{n}", "diffusers", ours_m, ref_m, "frozen UNet forward + backward to the context"),
                 Row(f"ti_part_vae_b{n}", "-", vae, None, f"VAE encode + sample, {b.args.size}px (baseline only)"),
                 Row(f"ti_floor_b{n}", "sum of parts", Measurement(with_skips, [with_skips], None),
                     Measurement(full, [full], None),
                     "(text + unet) / (text + unet + vae + table AdamW), diffusers' UNet time on both sides"),
                 saved_activation_row(b, n)]
    return rows


def saved_activation_row(b: Bench, n: int) -> Row:
    """The frozen UNets' forward with grad to the context: time, and the activations kept for backward."""
    x, t = b.randn(n, *b.latent_shape), torch.randint(0, 1000, (n,), device=b.device)
    context = b.randn(n, *b.context_shape)

    def forward(unet_call):
        return b.under_precision(lambda: unet_call(context.clone().requires_grad_(True)))

    ours_unet, ref_unet = b.ours.model.diffusion_model, b.unet
    ours = forward(lambda ctx: ours_unet(x, t, context=ctx))
    ref = forward(lambda ctx: ref_unet(x, t, encoder_hidden_states=ctx).sample)
    ours_m, ref_m = b.pair(ours, ref)
    return Row(f"ti_part_saved_b{n}", "diffusers",
               Measurement(ours_m.median_s, ours_m.times_s, saved_activation_bytes(ours, ours_unet)),
               Measurement(ref_m.median_s, ref_m.times_s, saved_activation_bytes(ref, ref_unet)),
               "UNet forward with grad to the context; MiB = activations kept for backward, weights excluded")


def face_rows(b: Bench) -> list[Row]:
    rows = []
    for n in b.args.ti_batches:
        with_face, without = b.ti_step(n, face=True), b.ti_step(n)
        without.batch = {k: v for k, v in with_face.batch.items() if k not in ("face", "has_face")}
        face_m, plain_m = b.pair(with_face, without)
        rows.append(Row(f"face_step_b{n}", "ours, no face", with_state(face_m, with_face.persistent_bytes()),
                        with_state(plain_m, without.persistent_bytes()), f"{b.args.size}px; target <= 1.3",
                        b.flops(with_face), b.flops(without)))
        with_face.release()
    return rows


# --- DreamBooth ------------------------------------------------------------------------------------
def dreambooth_rows(b: Bench) -> list[Row]:
    """Our DreamBooth model (its own unfrozen config) against diffusers' recipe on the same weights."""
    config = OmegaConf.load(DREAMBOOTH_CONFIGS[b.args.config])
    config.model.params.prior_loss_config = {"target": "ldm.models.diffusion.prior_loss.PriorPreservationLoss",
                                             "params": {"weight": PRIOR_LOSS_WEIGHT}}
    logger.info("building our DreamBooth LatentDiffusion from %s", DREAMBOOTH_CONFIGS[b.args.config])
    model = instantiate_from_config(config.model).to(b.device)
    # zero-initialised layers (the UNet's output conv) would stop every other gradient
    randomize_zero_weights(model.model, std=0.02)
    checkpointing = bool(config.model.params.unet_config.params.get("use_checkpoint", False))
    model.learning_rate = lr = float(config.model.base_learning_rate)
    ours = OursStep(model, dreambooth_batch(b.args.size, DREAMBOOTH_PROMPT, CLASS_PROMPT), b.latent_numel,
                    weight_decay=DREAMBOOTH_WEIGHT_DECAY)

    original_config = OmegaConf.to_container(config, resolve=True)
    checkpoint = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # train_dreambooth.py holds the frozen VAE and text encoder in the mixed-precision dtype; ours keeps
    # them in float32 for its export (ldm.train.training.hold_frozen_weights_in_half)
    frozen_dtype = b.weight_dtype
    text_model = b.placed(reference.text_encoder(model.cond_stage_model.text_model.config, checkpoint), frozen_dtype)
    images = torch.cat([ours.batch["image"], ours.batch["class_image"]])  # [2, H, W, 3]: subject, class
    pixels = images.permute(0, 3, 1, 2).contiguous()  # [2, 3, H, W]
    ids = model.cond_stage_model.tokenize([DREAMBOOTH_PROMPT, CLASS_PROMPT])
    ref = reference.DreamBoothStep(reference.unet(original_config, checkpoint).to(b.device),
                                   b.placed(reference.vae(original_config, checkpoint), frozen_dtype), text_model,
                                   ids, pixels, model.scale_factor, gradient_checkpointing=checkpointing,
                                   prior_loss_weight=PRIOR_LOSS_WEIGHT, lr=lr, weight_decay=DREAMBOOTH_WEIGHT_DECAY,
                                   weight_dtype=b.half_or_float32)
    del checkpoint
    ours_m, ref_m = b.pair(ours, ref)
    row = Row("db_step", "diffusers DB", with_state(ours_m, ours.persistent_bytes()),
              with_state(ref_m, tensor_bytes(ref.persistent_state())),
              f"{b.args.size}px, 1 subject + 1 class, ckpt {'on' if checkpointing else 'off'}; ours caches latents "
              "(baseline encodes every step); mem incl. optimizer state/cache", b.flops(ours), b.flops(ref))
    ours.release()
    ref.release()
    return [row]


# --- face preparation ------------------------------------------------------------------------------
def face_prep_rows(b: Bench) -> list[Row]:
    from ldm.data.face import FaceCropper

    folder = b.args.faces
    paths = sorted(p for p in folder.glob("*") if p.is_file() and not p.name.startswith(".")) if folder.is_dir() else []
    if not paths:
        return [Row("face_prep", "-", None, None, f"skipped: no photos in {folder}")]
    detector = b.args.face_detector
    with tempfile.TemporaryDirectory() as cache_dir:
        def prepare():
            return FaceCropper(size=b.args.size, detector=detector, cache_dir=cache_dir).prepare(paths)

        with peak_memory(torch.device("cpu")) as peak:
            cold_s = timed(prepare, torch.device("cpu"))
        cold = Measurement(cold_s, [cold_s], peak[0])
        warm_times = [timed(prepare, torch.device("cpu")) for _ in range(b.args.repeats)]
        with peak_memory(torch.device("cpu")) as peak:
            found = sum(c is not None for c in prepare())
    warm = Measurement(sorted(warm_times)[len(warm_times) // 2], warm_times, peak[0])
    note = f"{len(paths)} photos, {found} faces, {detector}, {b.args.size}px"
    return [Row("face_prep_cold", "-", cold, None, note + "; includes dlib model load"),
            Row("face_prep_warm", "cold cache", warm, cold, note + "; disk cache hits")]


def validation_group_rows(b: Bench) -> list[Row]:
    """In-run validation sampling against the training between two saves, and identity scoring."""
    step = b.ti_step(1)
    try:
        return validation_rows(b, CONFIGS[b.args.config], b.under_precision(step))
    finally:
        step.release()


ROW_BUILDERS = {"unet": unet_rows, "vae": vae_rows, "ddim": ddim_rows, "sample": sample_rows, "ti": ti_rows,
                "ti_parts": ti_part_rows, "face": face_rows, "anchoring": lambda b: anchoring_rows(b, PROMPT),
                "face_prep": face_prep_rows,
                "dreambooth": dreambooth_rows, "lora": lambda b: lora_rows(b, DREAMBOOTH_CONFIGS[b.args.config]),
                "validation": validation_group_rows, "compiled": compiled_rows}


def run(args: argparse.Namespace) -> list[Row]:
    """Build the models and measure the selected row groups, in the order of GROUPS."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    rows: list[Row] = []
    for group in GROUPS:
        if group in args.only:
            logger.info("measuring %s", group)
            group_rows = ROW_BUILDERS[group](bench)
            logger.info("%s rows:\n%s", group, plain_table(group_rows))  # kept if a later group fails
            rows += group_rows
    return rows


def peak_tflops(args: argparse.Namespace) -> float | None:
    """The dense half-precision peak the "% peak" column compares with (half-precision runs only)."""
    if args.precision == "fp32":
        return None
    return args.peak_tflops or dense_half_peak_tflops(torch.device(args.device))


def header(args: argparse.Namespace) -> str:
    import diffusers

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    return (f"config={args.config} device={device} precision={args.precision} size={args.size} "
            f"batch={args.batch} ti_batches={','.join(map(str, args.ti_batches))} repeats={args.repeats} "
            f"threads={torch.get_num_threads()} peak_tflops={peak_tflops(args)} "
            f"torch={torch.__version__} diffusers={diffusers.__version__}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    rows = run(args)
    peak = peak_tflops(args)
    table = markdown_table(rows, peak) if args.markdown else plain_table(rows, peak)
    sys.stdout.write(header(args) + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
