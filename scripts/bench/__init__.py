"""Helpers of ``scripts/benchmark.py`` that do not depend on ``ldm``: measuring, the reference side, tables."""
