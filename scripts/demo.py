"""`make demo`: momentum textual inversion that visibly learns, on a CPU, in a few minutes.

It uses the toy world (docs/toy_benchmark.md): a small SD v1-structured model pretrained by main.py
on procedurally drawn "toys", and a judge that reads identity and attributes off an image.

1. Writes the photo folder of a held-out subject (one the model never saw) to inputs/toy/subject-N/.
2. Runs the original code's recipe with main.py: DreamBooth on the photos (identifier ``sks``), then
   a momentum embedding (gamma 0.1, class word, descriptive words) anchored on ``sks``.
3. Samples the subject in new contexts as the toy benchmark does (ldm/toy/benchmark.py: its prompt
   suite, sampler settings and fixed noise) and writes the samples into outputs/toy-demo/, with
   grid.png: a row per model, the first sample of each prompt.
4. Judges the samples and prints, per prompt, how many show the subject and the asked attribute,
   next to the init word alone on the pretrained model.

Real use needs an SD v1 / DreamBooth checkpoint; see README.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

logger = logging.getLogger("demo")

def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def save_samples(images, folder: Path, prompt: str) -> None:
    """Numbered PNGs of ``images`` [N, 3, H, W] in [-1, 1] in ``folder``, after the ones already there."""
    from ldm.sampling_io import next_free_index, save_png, to_pil_images

    start = next_free_index(folder)
    for offset, image in enumerate(to_pil_images(images)):
        save_png(folder / f"{start + offset:05d}.png", image, {"parameters": prompt})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subject-seed", type=int, default=0, help="held-out subject to learn (0-23)")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max_steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--logdir", type=Path, default=ROOT / "logs", help="where main.py writes the run")
    parser.add_argument("--outdir", type=Path, default=ROOT / "outputs" / "toy-demo", help="where samples go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from ldm.toy.benchmark import (
        TOY_JUDGE,
        TOY_MODEL,
        evaluate,
        load_toy_model,
        prompt_suite,
        require_toy_models,
        train,
    )
    from ldm.toy.cells import method
    from ldm.toy.judge import load_judge
    from ldm.toy.scenes import write_photo_folder
    from ldm.train.validation.grid import labelled_grid
    from ldm.util import atomic_write

    try:
        require_toy_models()
        photos = ROOT / "inputs" / "toy" / f"subject-{args.subject_seed}"
        subject = write_photo_folder(args.subject_seed, photos)
    except (FileNotFoundError, ValueError) as err:
        logger.error("%s", err)
        return 2
    logger.info("Learning held-out subject %d (%s) from %s", args.subject_seed, subject.describe(), photos)
    dreambooth_model = train(method("dreambooth"), photos, seed=0, workdir=args.logdir, max_steps=args.max_steps)
    recipe = method("dreambooth_momentum_0.1")
    embedding = train(recipe, photos, seed=0, workdir=args.logdir, base_ckpt=dreambooth_model,
                      max_steps=args.max_steps)
    logger.info("DreamBooth model: %s; momentum embedding: %s", dreambooth_model, embedding)

    judge_model = load_judge(TOY_JUDGE)
    report = {"subject": subject.describe(), "embedding": str(embedding), "prompts": {}}
    runs = (("init word", "toy", TOY_MODEL, None),
            ("DreamBooth + momentum TI", recipe.phrase, dreambooth_model, embedding))
    firsts = []  # per run, the first sample of each prompt: the grid's rows
    for label, phrase, ckpt, emb in runs:
        score, images = evaluate(load_toy_model(ckpt), judge_model, phrase, subject,
                                 samples_per_prompt=args.samples, seed=0, embedding=emb)
        for (prompt, _, _), chunk in zip(prompt_suite(phrase), images.split(args.samples)):
            save_samples(chunk, args.outdir / slug(label) / slug(prompt), prompt)
        firsts.append(images[::args.samples])
        report["prompts"][label] = score.per_prompt
        logger.info("%s: fidelity %.2f, editability %.2f", label, score.fidelity, score.editability)
        for prompt, value in score.per_prompt.items():
            logger.info("    %-45s %.2f of samples show the subject (and the asked attribute)", prompt, value)
    (args.outdir / "scores.json").write_text(json.dumps(report, indent=1) + "\n")
    grid = labelled_grid(torch.cat(firsts), [label for label, *_ in runs])
    atomic_write(args.outdir / "grid.png", lambda tmp: grid.save(tmp, format="PNG"))
    logger.info("Samples in %s (one folder per prompt), the first of each prompt in grid.png (columns: %s); "
                "scores in %s", args.outdir, "; ".join(p for p, _, _ in prompt_suite("*")), args.outdir / "scores.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
