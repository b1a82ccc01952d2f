#!/usr/bin/env python
"""Benchmark this project against diffusers on the same weights, in one run on one machine.

Rows (``--only`` picks groups): ``unet`` forward, ``vae`` decode, ``ddim`` (20 DDIM steps with
classifier-free guidance), ``ti`` (one momentum-TI training step at batch 1 and 2 against diffusers'
textual-inversion recipe), ``ti_parts`` (the parts of those two steps timed alone, and the lowest
ratio that skipping the VAE encode and the token-table optimizer can give), ``face`` (the TI step
with the facial loss against the same step without it), ``face_prep`` (dlib face crops of the
fixture photos, cold and warm cache) and ``dreambooth`` (one DreamBooth step with prior preservation
against diffusers' ``train_dreambooth.py`` recipe). Each row reports the median time and the peak
extra memory of ours and of the baseline, and their ratios.

    python scripts/benchmark.py --config sd-v1 --device cpu --size 256 --repeats 3 --markdown
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import functools  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.util import instantiate_from_config, randomize_zero_weights  # noqa: E402
from scripts.bench import reference  # noqa: E402
from scripts.bench.measure import (  # noqa: E402
    Measurement,
    measure,
    measure_pair,
    peak_memory,
    precision_context,
    saved_activation_bytes,
    tensor_bytes,
    timed,
)
from scripts.bench.table import Row, markdown_table, plain_table  # noqa: E402

logger = logging.getLogger("benchmark")

CONFIGS = {"tiny": ROOT / "configs" / "tiny" / "v1-finetune.yaml",
           "sd-v1": ROOT / "configs" / "stable-diffusion" / "v1-finetune.yaml"}
DREAMBOOTH_CONFIGS = {"tiny": ROOT / "configs" / "tiny" / "v1-finetune_unfrozen.yaml",
                      "sd-v1": ROOT / "configs" / "stable-diffusion" / "v1-finetune_unfrozen.yaml"}
GROUPS = ("unet", "vae", "ddim", "ti", "ti_parts", "face", "dreambooth", "face_prep")
FACES = ROOT.parent / "shared" / "fixtures" / "faces"
TI_BATCHES = (1, 2)
DDIM_STEPS = 20
GUIDANCE = 7.5
PROMPT = "a photo of a *"
FACIAL_LOSS = {"target": "ldm.modules.face_loss.FacialLoss", "params": {"weight": 1.0}}
DREAMBOOTH_PROMPT, CLASS_PROMPT = "a photo of a sks woman", "a photo of a woman"
PRIOR_LOSS_WEIGHT = 1.0
DREAMBOOTH_WEIGHT_DECAY = 1e-2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny", help="model size")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="fp32, or autocast to bf16/fp16 on both sides")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (median), after 1 warm-up")
    p.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS), help="row groups to run")
    p.add_argument("--batch", type=int, default=1, help="batch of the unet/vae/ddim rows (TI rows: 1 and 2)")
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels (default: 64 tiny; sd-v1 256 on cpu, 512 on cuda)")
    p.add_argument("--ddim-steps", type=int, default=DDIM_STEPS, help="steps of the ddim row")
    p.add_argument("--face-detector", choices=("cnn", "hog"), default="cnn", help="dlib detector of face_prep")
    p.add_argument("--faces", type=Path, default=FACES, help="folder of photos for face_prep")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: every core available)")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = p.parse_args(argv)
    if args.size is None:
        args.size = 64 if args.config == "tiny" else (512 if args.device == "cuda" else 256)
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if min(args.repeats, args.batch, args.threads, args.ddim_steps) < 1:
        p.error("--repeats, --batch, --threads and --ddim-steps must be at least 1")
    if args.size % 8:
        p.error(f"--size must be a multiple of 8 (the VAE downsamples by 8), got {args.size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for but torch sees no CUDA device; use --device cpu")
    return args


class Bench:
    """Our model (built once from the finetune config) and the diffusers models made from its weights."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        config = OmegaConf.load(CONFIGS[args.config])
        config.model.params.facial_loss_config = FACIAL_LOSS
        self.original_config = OmegaConf.to_container(config, resolve=True)
        logger.info("building our LatentDiffusion from %s", CONFIGS[args.config])
        self.ours = instantiate_from_config(config.model).to(self.device).eval()
        ddconfig = config.model.params.first_stage_config.params.ddconfig
        factor = 2 ** (len(ddconfig.ch_mult) - 1)
        self.latent_shape = (int(config.model.params.channels), args.size // factor, args.size // factor)
        self.context_shape = (self.ours.cond_stage_model.max_length,
                              self.ours.cond_stage_model.text_model.config.hidden_size)
        self.lr = float(config.model.base_learning_rate)

    @functools.cached_property
    def checkpoint(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.ours.state_dict().items()}

    @functools.cached_property
    def unet(self):
        return reference.unet(self.original_config, self.checkpoint).to(self.device)

    @functools.cached_property
    def vae(self):
        return reference.vae(self.original_config, self.checkpoint).to(self.device)

    @functools.cached_property
    def text_model(self):
        return reference.text_encoder(self.ours.cond_stage_model.text_model.config, self.checkpoint).to(self.device)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=self.device)

    def under_precision(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` run under the chosen precision (autocast for bf16/fp16)."""
        def run():
            with precision_context(self.device, self.args.precision):
                return fn()
        return run

    def pair(self, ours: Callable[[], Any], ref: Callable[[], Any]) -> tuple[Measurement, Measurement]:
        """Measure both callables under the chosen precision, alternating."""
        return measure_pair(self.under_precision(ours), self.under_precision(ref), self.device, self.args.repeats)

    def measure(self, fn: Callable[[], Any]) -> Measurement:
        """Measure one callable under the chosen precision."""
        return measure(self.under_precision(fn), self.device, self.args.repeats)


# --- inference rows --------------------------------------------------------------------------------
def unet_rows(b: Bench) -> list[Row]:
    n = b.args.batch
    x, t, ctx = b.randn(n, *b.latent_shape), torch.randint(0, 1000, (n,), device=b.device), b.randn(n, *b.context_shape)
    ours_unet, ref_unet = b.ours.model.diffusion_model, b.unet
    ours, ref = b.pair(torch.inference_mode()(lambda: ours_unet(x, t, context=ctx)),
                       torch.inference_mode()(lambda: ref_unet(x, t, encoder_hidden_states=ctx).sample))
    return [Row("unet_forward", "diffusers", ours, ref, f"batch {n}, latent {b.latent_shape[1]}px")]


def vae_rows(b: Bench) -> list[Row]:
    z = b.randn(b.args.batch, *b.latent_shape)
    ref_vae, scale = b.vae, b.ours.scale_factor
    ours, ref = b.pair(torch.inference_mode()(lambda: b.ours.decode_first_stage(z)),
                       torch.inference_mode()(lambda: ref_vae.decode(z / scale).sample))
    return [Row("vae_decode", "diffusers", ours, ref, f"batch {b.args.batch}, {b.args.size}px")]


def ddim_rows(b: Bench) -> list[Row]:
    n = b.args.batch
    x_t, cond, uncond = b.randn(n, *b.latent_shape), b.randn(n, *b.context_shape), b.randn(n, *b.context_shape)
    sampler, ref_unet, steps = DDIMSampler(b.ours), b.unet, b.args.ddim_steps

    @torch.inference_mode()
    def ours():
        return sampler.sample(S=steps, batch_size=n, shape=b.latent_shape, conditioning=cond,
                              unconditional_conditioning=uncond, unconditional_guidance_scale=GUIDANCE,
                              eta=0.0, x_T=x_t, verbose=False)[0]

    ours_m, ref_m = b.pair(ours, lambda: reference.ddim_sample(ref_unet, x_t, cond, uncond, steps, GUIDANCE))
    return [Row(f"ddim{steps}_cfg", "diffusers", ours_m, ref_m, f"batch {n}, scale {GUIDANCE}")]


def optimizer_and_cache_bytes(optimizer: torch.optim.Optimizer, cache, latent_numel: int) -> int:
    """What our step keeps between steps: optimizer state plus the cached posteriors (mean and
    log-variance per latent, fp32)."""
    return tensor_bytes(optimizer.state_dict()["state"]) + len(cache) * 2 * latent_numel * 4


# --- training rows ---------------------------------------------------------------------------------
class OursTIStep:
    """One momentum-TI step of our LatentDiffusion: shared_step, backward, AdamW over the embedding."""

    def __init__(self, b: Bench, batch_size: int, face: bool):
        self.model = b.ours.train()
        self.model.learning_rate = b.lr
        self.model.latent_cache.clear()  # the warm-up step fills it; the timed steps hit it
        size = b.args.size
        self.batch: dict[str, Any] = {
            "image": torch.rand(batch_size, size, size, 3) * 2 - 1,  # [B, H, W, 3] like the dataset
            "caption": [PROMPT] * batch_size,
            "image_index": torch.arange(batch_size),
            "flipped": torch.zeros(batch_size, dtype=torch.bool),
        }
        if face:
            self.batch["face"] = torch.rand(batch_size, size, size, 3) * 2 - 1
            self.batch["has_face"] = torch.ones(batch_size, dtype=torch.bool)
        self.optimizer = torch.optim.AdamW(self.model.trainable_parameters(), lr=b.lr)
        self.latent_numel = b.latent_shape[0] * b.latent_shape[1] * b.latent_shape[2]

    def __call__(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss, _ = self.model.shared_step(self.batch)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def persistent_bytes(self) -> int:
        return optimizer_and_cache_bytes(self.optimizer, self.model.latent_cache, self.latent_numel)

    def release(self) -> None:
        self.model.latent_cache.clear()
        self.model.eval()


def _with_state(m: Measurement, state_bytes: int) -> Measurement:
    """Add the memory a recipe keeps between steps (optimizer state, caches) to a step's peak."""
    peak = None if m.peak_bytes is None else m.peak_bytes + state_bytes
    return Measurement(m.median_s, m.times_s, peak)


def ti_rows(b: Bench) -> list[Row]:
    rows = []
    for n in TI_BATCHES:
        ours = OursTIStep(b, n, face=False)
        pixels = ours.batch["image"].permute(0, 3, 1, 2).contiguous().to(b.device)  # [B, 3, H, W]
        ids = b.ours.cond_stage_model.tokenize([PROMPT] * n)
        ref = reference.TextualInversionStep(b.unet, b.vae, b.text_model, ids, b.ours.embedding_manager.token_ids[0],
                                             pixels, b.ours.scale_factor, lr=b.lr)
        ours_m, ref_m = b.pair(ours, ref)
        rows.append(Row(f"ti_step_b{n}", "diffusers TI", _with_state(ours_m, ours.persistent_bytes()),
                        _with_state(ref_m, tensor_bytes(ref.persistent_state())),
                        f"{b.args.size}px; mem incl. optimizer state/cache"))
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
    for n in TI_BATCHES:
        pixels = torch.rand(n, 3, b.args.size, b.args.size, device=b.device) * 2 - 1
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
    for n in TI_BATCHES:
        with_face, without = OursTIStep(b, n, face=True), OursTIStep(b, n, face=False)
        without.batch = {k: v for k, v in with_face.batch.items() if k not in ("face", "has_face")}
        face_m, plain_m = b.pair(with_face, without)
        rows.append(Row(f"face_step_b{n}", "ours, no face", _with_state(face_m, with_face.persistent_bytes()),
                        _with_state(plain_m, without.persistent_bytes()), f"{b.args.size}px; target <= 1.9"))
        with_face.release()
    return rows


# --- DreamBooth ------------------------------------------------------------------------------------
class OursDreamBoothStep:
    """One DreamBooth step of our LatentDiffusion (UNet trainable, prior preservation on): shared_step,
    backward, AdamW over the trainable parameters, zero_grad."""

    def __init__(self, model, size: int, lr: float, latent_numel: int):
        self.model = model.train()
        self.model.learning_rate = lr
        self.model.latent_cache.clear()  # the warm-up step fills it; the timed steps hit it
        self.batch: dict[str, Any] = {  # one collated item of ldm.data.dreambooth.DreamBoothDataset
            "image": torch.rand(1, size, size, 3) * 2 - 1,  # [1, H, W, 3] like the dataset
            "caption": [DREAMBOOTH_PROMPT],
            "image_index": torch.tensor([0]),
            "flipped": torch.zeros(1, dtype=torch.bool),
            "class_image": torch.rand(1, size, size, 3) * 2 - 1,
            "class_caption": [CLASS_PROMPT],
            "class_image_index": torch.tensor([0]),
            "class_flipped": torch.zeros(1, dtype=torch.bool),
        }
        self.optimizer = torch.optim.AdamW(self.model.trainable_parameters(), lr=lr,
                                           weight_decay=DREAMBOOTH_WEIGHT_DECAY)
        self.latent_numel = latent_numel

    def __call__(self) -> float:
        loss, _ = self.model.shared_step(self.batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def persistent_bytes(self) -> int:
        return optimizer_and_cache_bytes(self.optimizer, self.model.latent_cache, self.latent_numel)

    def release(self) -> None:
        self.optimizer.state.clear()
        self.model.latent_cache.clear()
        self.model.eval()


def dreambooth_rows(b: Bench) -> list[Row]:
    """Our DreamBooth model (its own unfrozen config) against diffusers' recipe on the same weights."""
    config = OmegaConf.load(DREAMBOOTH_CONFIGS[b.args.config])
    config.model.params.prior_loss_config = {"target": "ldm.modules.prior_loss.PriorPreservationLoss",
                                             "params": {"weight": PRIOR_LOSS_WEIGHT}}
    logger.info("building our DreamBooth LatentDiffusion from %s", DREAMBOOTH_CONFIGS[b.args.config])
    model = instantiate_from_config(config.model).to(b.device)
    # zero-initialised layers (the UNet's output conv) would stop every other gradient
    randomize_zero_weights(model.model, std=0.02)
    checkpointing = bool(config.model.params.unet_config.params.get("use_checkpoint", False))
    lr = float(config.model.base_learning_rate)
    latent_numel = b.latent_shape[0] * b.latent_shape[1] * b.latent_shape[2]
    ours = OursDreamBoothStep(model, b.args.size, lr, latent_numel)

    original_config = OmegaConf.to_container(config, resolve=True)
    checkpoint = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    text_model = reference.text_encoder(model.cond_stage_model.text_model.config, checkpoint).to(b.device)
    images = torch.cat([ours.batch["image"], ours.batch["class_image"]])  # [2, H, W, 3]: subject, class
    pixels = images.permute(0, 3, 1, 2).contiguous().to(b.device)  # [2, 3, H, W]
    ids = model.cond_stage_model.tokenize([DREAMBOOTH_PROMPT, CLASS_PROMPT])
    ref = reference.DreamBoothStep(reference.unet(original_config, checkpoint).to(b.device),
                                   reference.vae(original_config, checkpoint).to(b.device), text_model, ids, pixels,
                                   model.scale_factor, gradient_checkpointing=checkpointing,
                                   prior_loss_weight=PRIOR_LOSS_WEIGHT, lr=lr, weight_decay=DREAMBOOTH_WEIGHT_DECAY)
    del checkpoint
    ours_m, ref_m = b.pair(ours, ref)
    row = Row("db_step", "diffusers DB", _with_state(ours_m, ours.persistent_bytes()),
              _with_state(ref_m, tensor_bytes(ref.persistent_state())),
              f"{b.args.size}px, 1 subject + 1 class, ckpt {'on' if checkpointing else 'off'}; ours caches latents "
              "(baseline encodes every step); mem incl. optimizer state/cache")
    ours.release()
    ref.release()
    return [row]


# --- face preparation ------------------------------------------------------------------------------
def face_prep_rows(b: Bench) -> list[Row]:
    from ldm.modules.face import FaceCropper

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


ROW_BUILDERS = {"unet": unet_rows, "vae": vae_rows, "ddim": ddim_rows, "ti": ti_rows, "ti_parts": ti_part_rows,
                "face": face_rows, "face_prep": face_prep_rows, "dreambooth": dreambooth_rows}


def run(args: argparse.Namespace) -> list[Row]:
    """Build the models and measure the selected row groups, in the order of GROUPS."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    rows: list[Row] = []
    for group in GROUPS:
        if group in args.only:
            logger.info("measuring %s", group)
            rows += ROW_BUILDERS[group](bench)
    return rows


def header(args: argparse.Namespace) -> str:
    import diffusers

    return (f"config={args.config} device={args.device} precision={args.precision} size={args.size} "
            f"batch={args.batch} repeats={args.repeats} threads={torch.get_num_threads()} "
            f"torch={torch.__version__} diffusers={diffusers.__version__}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    rows = run(args)
    table = markdown_table(rows) if args.markdown else plain_table(rows)
    sys.stdout.write(header(args) + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
