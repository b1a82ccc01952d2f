"""The toy benchmark's cells: each a personalization recipe (``main.py`` flags and the prompts' subject phrase).

The default cells are sections 3 and 4 of the frontier protocol (docs/toy_benchmark.md, "Cells"); the
anchoring options (issue 19) and the LoRA cells (issue 20) run by name. :mod:`ldm.toy.benchmark` trains and
scores them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ldm.toy.world import CLASS_WORD

ROOT = Path(__file__).resolve().parents[2]
FINETUNE_CONFIG = ROOT / "configs" / "toy" / "v1-finetune.yaml"
DREAMBOOTH_CONFIG = ROOT / "configs" / "toy" / "v1-finetune_unfrozen.yaml"
LORA_CONFIG = ROOT / "configs" / "toy" / "v1-finetune_lora.yaml"
TOY_INIT_WORDS = ROOT / "inputs" / "init_words" / "toy_features.txt"  # the pretraining subjects' feature words


@dataclass(frozen=True)
class Method:
    """A personalization recipe (a benchmark cell): main.py flags and the subject phrase its prompts use."""

    name: str
    flags: tuple[str, ...]
    phrase: str  # replaces {} in the prompt suite
    on: str | None = None  # starts from the final model (or LoRA) of this DreamBooth cell (same subject and seed)
    embedding: bool = True  # False: the run's result is a model (DreamBooth), not an embedding
    prior: bool = False  # DreamBooth with prior preservation on class images of the pretrained model
    lora: bool = False  # LoRA DreamBooth (embedding False): the run's result is an adapter file
    note: str = ""  # what the cell is for (in the benchmark's JSON)
    baseline: str | None = None  # the cell it is compared with, run for run (default: ``on``)

    @property
    def ema(self) -> bool:
        """The run keeps a moving average of the embedding (``--ema_decay``), which is what is scored."""
        return "--ema_decay" in self.flags

    @property
    def compared_with(self) -> str | None:
        """The cell whose runs this one's are paired with (same subjects and seeds): the one it adds a step or
        an option to, or the one with the same step in e-space."""
        return self.baseline or self.on

    @property
    def saves_unet(self) -> bool:
        """A full DreamBooth run: its saves are UNet weights (:class:`BenchmarkProbe`), not files main.py writes."""
        return not self.embedding and not self.lora

    @property
    def config(self) -> Path:
        """The config ``main.py`` trains the cell with."""
        if self.lora:
            return LORA_CONFIG
        return FINETUNE_CONFIG if self.embedding else DREAMBOOTH_CONFIG


MOMENTUM_PROMPTS = ("--class_word", CLASS_WORD, "--descriptive_p", "0.1", "--use_random_prompt")
ON_SKS = ("--placeholder_string", "sks", *MOMENTUM_PROMPTS)


def base_lr(value: str) -> str:
    """The config override of the base learning rate (main.py multiplies it by the batch size)."""
    return f"model.base_learning_rate={value}"


# Sections 3 and 4 of the frontier protocol (docs/toy_benchmark.md). With Adam, momentum gamma at base lr
# x equals TI at base lr gamma * x from another start (docs/method.md), so each momentum cell has a TI
# cell with the same step in e-space: ti / momentum_0.1_lr8e-3, ti_lr8e-5 / momentum_0.1.
FRONTIER_CELLS: tuple[Method, ...] = (
    Method("ti", ("--gamma", "1"), "*", note="TI, base lr 8e-4 x batch 8"),
    Method("ti_lr8e-5", ("--gamma", "1", base_lr("8e-5")), "*", note="TI at momentum 0.1's e-space step"),
    Method("momentum_0.1", ("--gamma", "0.1"), "*", note="momentum 0.1, base lr 8e-4", baseline="ti_lr8e-5"),
    Method("momentum_0.1_lr8e-3", ("--gamma", "0.1", base_lr("8e-3")), "*", note="momentum 0.1 at TI's e-space step",
           baseline="ti"),
    Method("ti_original_step", ("--gamma", "1", base_lr("5e-3"), "data.params.batch_size=2"), "*",
           note="the original TI config's step: base lr 5e-3 x batch 2", baseline="ti"),
    Method("dreambooth", ("--class_word", CLASS_WORD), f"sks {CLASS_WORD}", embedding=False,
           note="DreamBooth without prior preservation"),
    Method("dreambooth_momentum_0.1", ("--gamma", "0.1", *ON_SKS), f"sks {CLASS_WORD}", on="dreambooth",
           note="the original code's recipe: momentum 0.1 on sks of the DreamBooth model"),
    Method("dreambooth_ti_lr8e-5", ("--gamma", "1", base_lr("8e-5"), *ON_SKS), f"sks {CLASS_WORD}", on="dreambooth",
           note="TI on sks of the DreamBooth model at the recipe's e-space step"),
    Method("dreambooth_prior", ("--class_word", CLASS_WORD, "--prior_loss_weight", "1"), f"sks {CLASS_WORD}",
           embedding=False, prior=True, note="DreamBooth with prior preservation (class images of the toy model)",
           baseline="dreambooth"),
    Method("dreambooth_prior_momentum_0.1", ("--gamma", "0.1", *ON_SKS), f"sks {CLASS_WORD}", on="dreambooth_prior",
           note="the original code's recipe on the prior-preserving DreamBooth model"),
    Method("dreambooth_prior_lr4e-5", ("--class_word", CLASS_WORD, "--prior_loss_weight", "1", base_lr("4e-5")),
           f"sks {CLASS_WORD}", embedding=False, prior=True,
           note="dreambooth_prior at 4x the learning rate (base lr 4e-5 x batch 8): at 1e-5 it barely learns in 200 steps",
           baseline="dreambooth"),
    Method("dreambooth_prior_lr4e-5_momentum_0.1", ("--gamma", "0.1", *ON_SKS), f"sks {CLASS_WORD}",
           on="dreambooth_prior_lr4e-5", note="the original code's recipe on dreambooth_prior_lr4e-5's model"),
)
# cells of the earlier single-point protocol, still runnable by name
EARLIER_CELLS: tuple[Method, ...] = (
    Method("momentum_0.5", ("--gamma", "0.5"), "*", note="earlier protocol"),
    Method("momentum_0.1_prompts", ("--gamma", "0.1", *MOMENTUM_PROMPTS), f"* {CLASS_WORD}", note="earlier protocol"),
)

# Issue 19: each anchoring option (docs/method.md, "Anchoring") alone on ANCHORED_CELLS, anchor init (the start
# e_0, the default). The pull's gradient on e has length w; the loss's gradient on e at the start measured
# 0.004-0.005 for TI and 0.012-0.017 for momentum 0.1 (16 batches of 8, subject 0, loss 0.02-0.1), so w = 1e-3
# is a quarter to a twelfth of it: the pull wins once that gradient has fallen so far. The moving average
# (decay 0.99) has no bias correction: after 25 steps 0.78 of it is still the start. momentum_0.1_lr8e-3 is
# momentum 0.1 at a step where its embedding leaves the start in 200 steps, so the options have a drift to act on.
ANCHORED_CELLS = ("ti", "momentum_0.1", "momentum_0.1_lr8e-3", "dreambooth_momentum_0.1")
ANCHORING_OPTIONS: tuple[tuple[str, tuple[str, ...], str], ...] = (  # (name suffix, flags, note)
    ("anchor", ("--anchor_weight", "1e-3"), "pull toward the start: 1e-3 * ||e - e_0|| per vector (a quarter of the "
                                            "loss's gradient on e at TI's start)"),
    ("norm_bound", ("--norm_bound",), "e scaled back to the start's norm after each step (only its direction trains)"),
    ("init_words", ("--init_words", str(TOY_INIT_WORDS)),
     "v starts from the mean of the toy world's feature words (inputs/init_words/toy_features.txt)"),
    ("cross_init", ("--init_words", str(TOY_INIT_WORDS), "--init_from_encoder"),
     "Cross Initialization: v starts from the text encoder's output for the feature words' mean at the placeholder"),
    ("ema", ("--ema_decay", "0.99"), "its moving average of e (decay 0.99) is scored: the embeddings_ema* saves"),
    ("ema_bc", ("--ema_decay", "0.99", "--ema_bias_correction"),
     "its bias-corrected moving average of e (decay 0.99; the start drops out at the first update) is scored"),
)


def with_option(cell: Method, suffix: str, flags: tuple[str, ...], note: str) -> Method:
    """``cell`` with one more option: the cell ``<cell>_<suffix>``."""
    return replace(cell, name=f"{cell.name}_{suffix}", flags=(*cell.flags, *flags), note=f"{cell.name} + {note}",
                   baseline=cell.name)


ANCHORING_CELLS = tuple(with_option(cell, *option) for option in ANCHORING_OPTIONS
                        for cell in FRONTIER_CELLS if cell.name in ANCHORED_CELLS)


def lora_cell(name: str, note: str, *, rank: int = 4, lr: str | None = None, targets: str | None = None) -> Method:
    """A LoRA DreamBooth cell without prior preservation, compared with full DreamBooth."""
    flags = ("--class_word", CLASS_WORD, "--lora_rank", str(rank), *(("--lora_targets", targets) if targets else ()),
             *((base_lr(lr),) if lr else ()))
    return Method(name, flags, f"sks {CLASS_WORD}", embedding=False, lora=True, baseline="dreambooth", note=note)


def recipe_on(cell: str, note: str) -> Method:
    """The original code's recipe (momentum 0.1 on ``sks``) on the model or LoRA of ``cell``."""
    return Method(f"{cell}_momentum_0.1", ("--gamma", "0.1", *ON_SKS), f"sks {CLASS_WORD}", on=cell, note=note)


# Issue 20: LoRA DreamBooth (configs/toy/v1-finetune_lora.yaml) and the original recipe on it.
LORA_CELLS: tuple[Method, ...] = (
    lora_cell("lora_dreambooth", "LoRA DreamBooth without prior preservation: rank 4 (alpha 4) adapters on the UNet's "
                                 "attention projections, base lr 1e-4 x batch 8"),
    recipe_on("lora_dreambooth",
              "the original code's recipe on the toy model with the LoRA DreamBooth adapters (--lora)"),
    lora_cell("lora_dreambooth_lr1e-3", "lora_dreambooth at 10x the learning rate: base lr 1e-3 x batch 8", lr="1e-3"),
    recipe_on("lora_dreambooth_lr1e-3", "the original code's recipe on lora_dreambooth_lr1e-3's adapters"),
    lora_cell("lora_dreambooth_r16_lr1e-3", "lora_dreambooth_lr1e-3 at rank 16 (alpha 16): 4x the adapters' capacity",
              rank=16, lr="1e-3"),
    lora_cell("lora_dreambooth_lr3e-3", "lora_dreambooth at 30x the learning rate: base lr 3e-3 x batch 8", lr="3e-3"),
    lora_cell("lora_dreambooth_r16_lr5e-4", "rank 16 (alpha 16) at half lora_dreambooth_lr1e-3's rate (rank 16 at 1e-3 "
                                            "breaks the model)", rank=16, lr="5e-4"),
    lora_cell("lora_dreambooth_lr1.5e-3", "rank 4 between lr 1e-3 (the tuned point) and 3e-3 (breaks the model)",
              lr="1.5e-3"),
    lora_cell("lora_dreambooth_transformer_lr1e-3", "lora_dreambooth_lr1e-3 on every layer of the transformer blocks "
                                                    "(kohya's default): the feed-forward and proj_in/proj_out too",
              lr="1e-3", targets="transformer"),
    recipe_on("lora_dreambooth_transformer_lr1e-3",
              "the original code's recipe on lora_dreambooth_transformer_lr1e-3's adapters"),
    lora_cell("lora_dreambooth_locon_lr1e-3", "lora_dreambooth_transformer_lr1e-3 with the ResBlocks' and resamplers' "
                                              "convolutions too (LoCon)", lr="1e-3", targets="locon"),
    lora_cell("lora_dreambooth_locon_lr5e-4", "lora_dreambooth_locon_lr1e-3 at half the rate (at 1e-3 it breaks the "
                                              "model by step 200)", lr="5e-4", targets="locon"),
)
# Several vectors for the placeholder: the full description that draws a subject is 6-7 tokens (pattern, colour,
# shape, class word, accessory), and one vector trained for 200 steps finds the combination less often than those
# words do (docs/toy_benchmark.md). Each vector starts from the init word and takes its cell's step; on
# momentum 0.1 (issue 19's baseline) at its own step and at TI's e-space step.
VECTOR_CELLS: tuple[Method, ...] = tuple(
    with_option(cell, "vectors_4", ("--num_vectors_per_token", "4"),
                "4 vectors for the placeholder, each starting from the init word")
    for cell in FRONTIER_CELLS if cell.name in ("ti", "momentum_0.1", "momentum_0.1_lr8e-3"))
METHODS: tuple[Method, ...] = (*FRONTIER_CELLS, *EARLIER_CELLS, *ANCHORING_CELLS, *VECTOR_CELLS, *LORA_CELLS)
METHOD_NAMES = tuple(m.name for m in METHODS)
FRONTIER_METHODS = tuple(m.name for m in FRONTIER_CELLS)  # the default cells
QUICK_METHODS = ("ti", "momentum_0.1")


def method(name: str) -> Method:
    for m in METHODS:
        if m.name == name:
            return m
    raise ValueError(f"unknown method '{name}': use one of {', '.join(METHOD_NAMES)}")
