"""Helpers of ``scripts/benchmark.py``: measuring, the diffusers reference side, our side, tables.

``python scripts/benchmark.py`` imports this package as ``bench`` (a script's folder is first on the
import path); the tests import it as ``scripts.bench``. Its modules import each other relatively, so
both work.
"""
