"""Training entrypoint: momentum textual inversion (and LDM training) with PyTorch Lightning.

    python main.py --base configs/stable-diffusion/v1-finetune.yaml -t ...

The parser and ``main`` live in :mod:`ldm.train.cli` (``python main.py --help`` lists the options);
this file keeps ``python main.py`` and ``import main`` working.
"""
from __future__ import annotations

import sys

from ldm.train.cli import Override, build_parser, main, str2bool, take_overrides

__all__ = ["Override", "build_parser", "main", "str2bool", "take_overrides"]

if __name__ == "__main__":
    sys.exit(main())
