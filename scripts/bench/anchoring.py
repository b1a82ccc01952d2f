"""The anchoring rows: a TI step with each option of issue 19 (and 4 vectors for the placeholder) against the
same step without it.

Each option's model is built from the benchmark's config with the option set under
``personalization_config.params`` (as ``main.py --anchor_weight ...`` sets it) and given the same
weights as the plain model, then both steps are timed alternately on the same batch. The target is
a ratio of at most 1.05 (docs/benchmarks.md).
"""
from __future__ import annotations

import copy
from pathlib import Path

from ldm.util import instantiate_from_config

from .ours import OursStep, ti_batch
from .table import Row

ROOT = Path(__file__).resolve().parents[2]
OPTIONS: dict[str, dict[str, object]] = {
    "control": {},  # a second model without options: the comparison's own bias (two instances, one timed first)
    "anchor_pull": {"anchor_weight": 0.01, "anchor": "init"},
    "norm_bound": {"norm_bound": True},
    "init_words": {"init_words": str(ROOT / "inputs" / "init_words" / "given_names.txt")},
    "ema": {"ema_decay": 0.99},
    "ema_bias_corrected": {"ema_decay": 0.99, "ema_bias_correction": True},
    "vectors_4": {"num_vectors_per_token": 4},
    "all_four": {"anchor_weight": 0.01, "norm_bound": True, "ema_decay": 0.99,
                 "init_words": str(ROOT / "inputs" / "init_words" / "given_names.txt")},
}
TARGET = "target <= 1.05"


def describe(options: dict[str, object]) -> str:
    """The options as flags would show them, a word list by its file name."""
    if not options:
        return "no option: the control"
    return ", ".join(f"{k}={Path(str(v)).name if k == 'init_words' else v}" for k, v in options.items())


def option_model(b, options: dict[str, object]):
    """The benchmark's model with ``options`` in its embedding's config and the plain model's weights."""
    config = copy.deepcopy(b.config.model)
    config.params.personalization_config.params.update(options)
    model = instantiate_from_config(config)
    weights = {k: v for k, v in b.checkpoint.items() if not k.startswith("embedding_manager.")}
    model.load_state_dict(weights, strict=False)  # the plain model's float32 weights; the embedding is new
    model.on_weights_loaded()  # e_p and the start from the loaded text encoder
    if b.weight_dtype is not None:
        model.hold_frozen_weights_in_half(b.weight_dtype)
    model.learning_rate = b.lr
    return model.to(b.device)


def anchoring_rows(b, prompt: str) -> list[Row]:
    """One row per option and batch: the step with the option against the plain TI step."""
    rows = []
    for name, options in OPTIONS.items():
        model = option_model(b, options)
        for n in b.args.ti_batches:
            plain = b.ti_step(n)
            anchored = OursStep(model, ti_batch(n, b.args.size, prompt, face=False), b.latent_numel)
            anchored.batch = plain.batch  # the same images and captions
            anchored_m, plain_m = b.pair(anchored, plain)
            rows.append(Row(f"{name}_b{n}", "plain TI step", anchored_m, plain_m,
                            f"{b.args.size}px; {describe(options)}; {TARGET}"))
            anchored.release()
            plain.release()
        del model
    return rows
