"""The toy world: a small procedural world to train, personalize and judge on a CPU (docs/toy_world.md).

``world`` (subjects, rendering, captions), ``scenes`` (its datasets and photo folders; configs name
``ldm.toy.scenes.ToyScenes``), ``judge`` (reads identity and attributes off an image), ``benchmark``
(methods, prompt suite, scores) and ``frontier`` (fidelity-editability frontiers).

Kept free of imports, so a config that names a toy dataset loads only ``world`` and ``scenes``.
"""
