"""Momentum textual inversion for Stable Diffusion.

The package is layered; a module imports from its own layer and the ones below it, never from a
higher one, and no chain of imports between ldm modules comes back to where it started
(tests/test_import_layers.py checks both, imports inside functions included). Low to high:

    base        ldm.util and the small leaf modules named in LAYERS (momentum, precision, ...)
    checkpoint  ldm.checkpoint: file formats (weights, embeddings, diffusers/A1111 files); tokenizers are passed in
    modules     ldm.modules: nn building blocks, the CLIP text encoder and tokenizer, the embedding manager
    data        ldm.data: datasets, prompts, face crops
    models      ldm.models: autoencoder, latent diffusion and its loss terms, samplers
    app         every ldm module no layer names: inference, export, LoRA, evaluation, the embedding scripts' inputs
    train       ldm.train: the training wing, what main.py runs (flags, settled config, trainer, callbacks, validation)
    toy         ldm.toy: the toy world, its datasets, judge and benchmark (the benchmark runs the training wing)

app, train and toy are the application tier: sampling, export and evaluation need no training code,
and training needs no toy world. Nothing in ldm imports ``main`` or ``scripts``. The toy datasets that
configs name (ldm.toy.scenes) import only the data layer and below, and ldm.toy.world.
"""

# (layer, modules and packages) from low to high. A module belongs to the layer that names it or its
# innermost package; this file (data only) is base, and an ldm module no layer names is app (the one
# layer that names nothing).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("ldm.util", "ldm.momentum", "ldm.precision", "ldm.nonfinite", "ldm.png_metadata",
              "ldm.sampling_io", "ldm.cli", "ldm.lr_scheduler", "ldm.compat")),
    ("checkpoint", ("ldm.checkpoint",)),
    ("modules", ("ldm.modules",)),
    ("data", ("ldm.data",)),
    ("models", ("ldm.models",)),
    ("app", ()),
    ("train", ("ldm.train",)),
    ("toy", ("ldm.toy",)),
)
