"""`make demo`: momentum textual inversion end to end on the tiny config, on a CPU, in minutes.

1. Writes demo photos to inputs/demo/ (scikit-image's public-domain astronaut photo, with a few
   flips, crops and rotations) and a tiny SD v1 checkpoint with RANDOM weights to models/ldm/tiny/.
2. Trains a momentum embedding (gamma 0.1) on them with main.py, exactly as a real run would.
3. Samples with the learned embedding through scripts/stable_txt2img.py.

The weights are random, so the images are noise-like: the demo shows the whole workflow (files,
logs, checkpoints, grids) working, not a likeness. Real use needs an SD v1 / DreamBooth checkpoint;
see README.md.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python scripts/demo.py` from anywhere

logger = logging.getLogger("demo")

TINY_INFERENCE = ROOT / "configs/tiny/v1-inference.yaml"
TINY_FINETUNE = ROOT / "configs/tiny/v1-finetune.yaml"


def write_demo_photos(folder: Path) -> list[Path]:
    """A handful of varied views of the astronaut photo (skimage.data.astronaut, public domain)."""
    from PIL import Image
    from skimage import data

    from ldm.util import atomic_write

    photo = Image.fromarray(data.astronaut())  # 512 x 512 RGB
    views = {
        "astronaut.png": photo,
        "astronaut_mirror.png": photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "astronaut_face.png": photo.crop((96, 0, 416, 320)),
        "astronaut_tilt.png": photo.rotate(8, resample=Image.Resampling.BICUBIC, fillcolor=(255, 255, 255)),
    }
    paths = []
    for name, view in views.items():
        path = folder / name
        if not path.exists():
            atomic_write(path, lambda tmp, view=view: view.save(tmp, format="PNG"))
        paths.append(path)
    return paths


def write_random_checkpoint(path: Path, seed: int = 0) -> Path:
    """The tiny SD v1 of configs/tiny with random weights, saved in the SD checkpoint layout."""
    if path.exists():
        return path
    import torch
    from omegaconf import OmegaConf

    from ldm.checkpoint import save_checkpoint
    from ldm.util import instantiate_from_config, randomize_zero_weights

    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.load(TINY_INFERENCE).model)
    randomize_zero_weights(model, seed)  # else the prompt has no effect and nothing trains
    return save_checkpoint(path, model.state_dict())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps (about 0.1-0.3 s each on a CPU)")
    parser.add_argument("--logdir", default=str(ROOT / "logs"), help="where main.py writes the run")
    parser.add_argument("--outdir", default=str(ROOT / "outputs/demo"), help="where the samples go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.warning("DEMO: the tiny model has RANDOM weights; the workflow is real, the images are not a likeness")

    import main as train_main
    from scripts import stable_txt2img

    photos = ROOT / "inputs/demo"
    write_demo_photos(photos)
    ckpt = write_random_checkpoint(ROOT / "models/ldm/tiny/random-weights.ckpt")
    name = "demo"
    code = train_main.main([
        "--base", str(TINY_FINETUNE), "-t", "--actual_resume", str(ckpt), "-n", name,
        "--data_root", str(photos), "--gamma", "0.1", "--descriptive_p", "0.1", "--use_random_prompt",
        "--class_word", "woman", "--max_steps", str(args.steps), "--logdir", args.logdir,
        "data.params.num_workers=0",
    ])
    if code != 0:
        return code
    run = max(Path(args.logdir).glob(f"demo_{name}_*"), key=lambda p: p.stat().st_mtime)
    embedding = run / "checkpoints/embeddings.pt"
    logger.info("Trained embedding: %s", embedding)
    code = stable_txt2img.main([
        "--config", str(TINY_INFERENCE), "--ckpt", str(ckpt), "--embedding_path", str(embedding),
        "--prompt", "a photo of a * woman", "--H", "64", "--W", "64", "--ddim_steps", "20",
        "--n_samples", "4", "--n_iter", "1", "--scale", "7", "--outdir", args.outdir,
    ])
    if code == 0:
        logger.info("Done. Run: %s  Samples: %s  (random weights: noise-like by design)", run, args.outdir)
    return code


if __name__ == "__main__":
    sys.exit(main())
